"""Sub-byte weight GEMV / small-batch benchmark: ``SUITE`` for ``lowprec bench``.

Float32 activations (M, K) x weights (K, N) in 4 bits, block 32 (MatMulNBits
layout) or a 4-bit k-means codebook, prepacked, against ONNX Runtime's
``com.microsoft::MatMulNBits`` (constant weights, prepacked at session
creation; accuracy level 0 for the float rows, 4 for the int8-activation rows),
lowprec's own INT8 GEMV (``matmul_integer``, uint8 x int8 weights prepacked:
the kernel with twice the weight bytes, no activation quantization; and
``dynamic_quantize_matmul``, float32 in and out like ``matmul_nbits``) and numpy
float32 (context only).
GOP/s = 2 M K N / t.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import lowprec

from . import bench as _b
from . import nbits as nb

SHAPES = ((4096, 4096), (4096, 11008))
MS = (1, 4, 16)
BLOCK = 32

# variant -> (kind, accuracy level)
VARIANTS = {
    "nbits4 f32": ("nbits", 0),
    "nbits4 int8": ("nbits", 4),
    "codebook4 int8": ("codebook", 4),
}
DEFAULT_VARIANTS = tuple(VARIANTS)


@dataclass(frozen=True)
class _Op:
    op: str


@dataclass
class NBitsInputs:
    a: np.ndarray  # (M, K) float32
    packed: np.ndarray  # MatMulNBits arrays
    scales: np.ndarray
    pk: object  # PackedNBits or PackedCodebook
    w: np.ndarray  # the float32 weights the codes stand for (K, N)


@dataclass(frozen=True)
class NBitsCase:
    M: int
    K: int
    N: int
    variant: str
    threads: int
    suite: str = "nbits"

    @property
    def v(self):
        return _Op(
            "matmul_nbits" if self.variant.startswith("nbits") else "matmul_codebook"
        )

    @property
    def shape(self) -> str:
        return f"{self.M}x{self.K}x{self.N}"

    @property
    def ops(self) -> int:
        return 2 * self.M * self.K * self.N

    @property
    def group(self) -> str:
        return f"nbits|{self.shape}|{self.variant}|{self.threads}"

    @property
    def level(self) -> int:
        return VARIANTS[self.variant][1]

    def make_inputs(self) -> NBitsInputs:
        rng = np.random.default_rng([self.M, self.K, self.N])
        w = (rng.standard_normal((self.K, self.N)) * 0.05).astype(np.float32)
        a = rng.standard_normal((self.M, self.K)).astype(np.float32)
        p, s, _ = nb.quantize_blockwise(w, bits=4, block_size=BLOCK)
        if VARIANTS[self.variant][0] == "nbits":
            pk = nb.pack_nbits(p, s, K=self.K, N=self.N, bits=4, block_size=BLOCK)
            wd = nb.dequantize_blockwise(p, s, K=self.K, bits=4, block_size=BLOCK)
        else:
            idx, cb = nb.kmeans_quantize(w, bits=4, iters=10)
            pk = nb.pack_codebook(idx, cb, K=self.K, N=self.N, bits=4)
            wd = nb.dequantize_codebook(idx, cb, K=self.K, bits=4)
        return NBitsInputs(a, p, s, pk, wd)

    def build_lowprec(self, x: NBitsInputs) -> Callable[[], object]:
        if isinstance(x.pk, nb.PackedNBits):
            return lambda: nb.matmul_nbits(x.a, x.pk, accuracy_level=self.level)
        return lambda: nb.matmul_codebook(x.a, x.pk, accuracy_level=self.level)


def ort_nbits_session(packed, scales, zero_points, *, K, N, bits, block_size,
                      accuracy_level, threads=1):  # fmt: skip
    """An onnxruntime session of one com.microsoft::MatMulNBits node with
    constant weights (input "A" float32 (M, K), output float32 (M, N)); shared
    by this suite and tests/test_nbits.py."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    names = ["A", "B", "S"] + (["Z"] if zero_points is not None else [])
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points.reshape(-1), "Z"))
    node = helper.make_node(
        "MatMulNBits", names, ["Y"], domain="com.microsoft",
        K=K, N=N, bits=bits, block_size=block_size, accuracy_level=accuracy_level,
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "nbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, N])],
        inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )


def _build_ort(case, x):
    if VARIANTS[case.variant][0] != "nbits":
        raise _b.Unsupported("MatMulNBits has no codebook weights")
    sess = ort_nbits_session(
        x.packed, x.scales, None, K=case.K, N=case.N, bits=4, block_size=BLOCK,
        accuracy_level=case.level, threads=case.threads,
    )  # fmt: skip
    feed = {"A": x.a}
    return lambda: sess.run(None, feed)[0]


def _build_int8(case, x):
    rng = np.random.default_rng(1)
    b = rng.integers(-127, 128, (case.K, case.N), dtype=np.int8)
    packed = lowprec.pack_weights(b)
    a = rng.integers(0, 256, (case.M, case.K), dtype=np.uint8)
    zp = np.uint8(128)
    return lambda: lowprec.matmul_integer(a, packed, zp)


def _build_int8_dynamic(case, x):
    rng = np.random.default_rng(1)
    b = rng.integers(-127, 128, (case.K, case.N), dtype=np.int8)
    packed = lowprec.pack_weights(b, None, np.float32(0.01))
    return lambda: lowprec.dynamic_quantize_matmul(x.a, packed)


def _build_numpy(case, x):
    out = np.empty((case.M, case.N), np.float32)
    return lambda: np.matmul(x.a, x.w, out=out)


_ALL = frozenset(VARIANTS)
BASELINES = (
    _b.Baseline(
        "ort_nbits",
        "onnxruntime com.microsoft::MatMulNBits, 4 bits block 32, constant weights "
        "(accuracy level as the row: 0 float, 4 int8 activations)",
        ("onnxruntime", "onnx"),
        frozenset(v for v in VARIANTS if VARIANTS[v][0] == "nbits"),
        True,
        _build_ort,
    ),
    _b.Baseline(
        "lowprec_int8",
        "lowprec matmul_integer uint8 x int8, weights prepacked (INT8 GEMV)",
        (),
        _ALL,
        True,
        _build_int8,
    ),
    _b.Baseline(
        "lowprec_int8_dyn",
        "lowprec dynamic_quantize_matmul: float32 in, float32 out, int8 weights "
        "prepacked (the INT8 GEMV that takes what matmul_nbits takes)",
        (),
        _ALL,
        True,
        _build_int8_dynamic,
    ),
    _b.Baseline(
        "numpy_f32",
        "numpy float32 matmul on the dequantized weights (BLAS sgemm)",
        (),
        _ALL,
        False,
        _build_numpy,
    ),
)


def _cases(opts) -> list[NBitsCase]:
    shapes = list(SHAPES)
    ms = MS
    if getattr(opts, "shapes", None):
        shapes = sorted({(K, N) for (_, K, N) in opts.shapes})
        ms = sorted({M for (M, _, _) in opts.shapes})
    variants = getattr(opts, "variants", None) or DEFAULT_VARIANTS
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        msg = f"unknown variant(s) {bad} for nbits; choose from {', '.join(VARIANTS)}"
        raise SystemExit(msg)
    if getattr(opts, "quick", False):
        shapes, ms = [(1024, 1024)], (1,)
    return [
        NBitsCase(M, K, N, var, t)
        for (K, N) in shapes
        for M in ms
        for var in variants
        for t in getattr(opts, "threads", (2,))
    ]


def _check(case, x, got, refs) -> dict:
    """The warm-up output against numpy on the dequantized weights (float
    rows: the accuracy bound's scale; int8 rows: activation rounding)."""
    if "numpy_f32" not in refs:
        return {}
    ref = np.asarray(refs["numpy_f32"])
    err = float(np.max(np.abs(got - ref), initial=0))
    scale = float(np.max(np.abs(ref), initial=0)) or 1.0
    tol = 1e-4 if case.level == 0 else 5e-2
    return {"max_rel_err": err / scale, "ok": err / scale < tol}


SUITE = _b.Suite(
    "nbits",
    "4-bit block-quantized (MatMulNBits) and 4-bit codebook weights, float "
    "activations, GEMV and small batch; GOP/s = 2MKN/t",
    _cases,
    BASELINES,
    _check,
)
