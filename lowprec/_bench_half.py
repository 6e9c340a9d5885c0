"""Benchmark suite for the half-precision ops (``matmul_fp16``, ``matmul_bf16``,
``conv_fp16``).

Built like the INT8 GEMM suite of :mod:`lowprec.bench` and timed by its
:func:`~lowprec.bench.run_suite` / :func:`~lowprec.bench.measure`: a case is
(M, K, N) x variant x threads, or a convolution layer (the INT8 conv suite's
layers, lowprec._bench_conv.LAYERS) x threads; GFLOP/s = 2*M*N*K / median time
(the table's "GOP/s" column; for a convolution M*K*N is the equivalent GEMM:
pixels x C/group*kH*kW x output channels); ratio = lowprec / the fastest
baseline that ran.

    python -m lowprec._bench_half [--quick] [--threads 2] [--shapes 1024x1024x1024]

"% of peak" is against the instruction each path runs: the measured
``vfmadd231ps zmm`` rate for float16 (F16C+FMA kernels), the measured
``vdpbf16ps zmm`` rate for bfloat16 (``tdpbf16ps`` on the amx_bf16 path;
:func:`measured_peaks`, :func:`apply_peaks`), not the INT8 suites'
``vpdpbusd`` rate.

``SUITE`` is the :class:`lowprec.bench.Suite` to register in ``bench.SUITES``.
Baselines: numpy float32 matmul (BLAS sgemm on float32 copies: the target),
numpy float16 matmul (small shapes only: ~0.4 GFLOP/s here), torch CPU float16
and bfloat16 matmul when torch is installed; onnxruntime's float32 Conv (NCHW,
constant weights, same values) for the convolutions.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np

from . import bench as lb
from . import conv_half, half
from ._bench_conv import LAYERS as CONV_LAYERS
from ._bench_conv import QUICK_LAYERS as CONV_QUICK_LAYERS

FULL_SHAPES: tuple[lb.Shape, ...] = (
    (1024, 1024, 1024),
    (128, 768, 3072),  # BERT-base FFN up-projection
    (16, 384, 1536),  # small-batch MLP
    (1, 4096, 4096),  # single-token decode (GEMV, memory bound)
)
QUICK_SHAPES: tuple[lb.Shape, ...] = ((256, 256, 256), (64, 512, 512), (1, 1024, 1024))

# numpy's float16 matmul runs at ~0.4 GFLOP/s (no BLAS): above this many
# multiply-adds one call would take seconds, so the baseline is skipped
NUMPY_F16_MAX_MACS = 1 << 25


@dataclass(frozen=True)
class _Op:
    op: str


CONV_VARIANT = "fp16->f32 conv"
VARIANTS = {
    "fp16->f32": _Op("matmul_fp16"),
    "bf16->f32": _Op("matmul_bf16"),
    CONV_VARIANT: _Op("conv_fp16"),
}
GEMM_VARIANTS = ("fp16->f32", "bf16->f32")


@dataclass
class HalfInputs:
    a32: np.ndarray  # (M, K) float32, exactly representable in float16
    b32: np.ndarray  # (K, N) float32, idem
    a: np.ndarray  # the variant's half-precision operands: float16, or
    b: np.ndarray  # bfloat16 bit patterns (uint16)


@dataclass(frozen=True)
class HalfCase:
    """One row of the table: shape x variant x thread count."""

    M: int
    K: int
    N: int
    variant: str
    threads: int
    suite: str = "half_gemm"

    @property
    def v(self) -> _Op:
        return VARIANTS[self.variant]

    @property
    def shape(self) -> str:
        return f"{self.M}x{self.K}x{self.N}"

    @property
    def ops(self) -> int:
        return 2 * self.M * self.K * self.N

    @property
    def group(self) -> str:
        return f"{self.v.op}|{self.shape}|{self.variant}|{self.threads}"

    @property
    def bf16(self) -> bool:
        return self.variant.startswith("bf16")

    def make_inputs(self) -> HalfInputs:
        rng = np.random.default_rng([self.M, self.K, self.N])
        a = rng.standard_normal((self.M, self.K), np.float32)
        b = rng.standard_normal((self.K, self.N), np.float32)
        if self.bf16:
            ah, bh = half.float32_to_bfloat16(a), half.float32_to_bfloat16(b)
            return HalfInputs(
                half.bfloat16_to_float32(ah), half.bfloat16_to_float32(bh), ah, bh
            )
        ah, bh = a.astype(np.float16), b.astype(np.float16)
        return HalfInputs(ah.astype(np.float32), bh.astype(np.float32), ah, bh)

    def build_lowprec(self, x: HalfInputs):
        # weights packed once, outside the timing, as the baselines' are
        if self.bf16:
            packed = half.pack_weights_bf16(x.b)
            return lambda: half.matmul_bf16(x.a, packed)
        packed = half.pack_weights_fp16(x.b)
        return lambda: half.matmul_fp16(x.a, packed)


@dataclass
class ConvInputs:
    x: np.ndarray  # (N, C, H, W) float16
    w: np.ndarray  # (M, C/group, k, k) float16
    x32: np.ndarray  # the same values in float32 (the baseline's input)
    w32: np.ndarray


@dataclass(frozen=True)
class HalfConvCase:
    """A convolution layer (lowprec._bench_conv's Layer tuple) x threads."""

    name: str
    batch: int
    C: int
    H: int
    Mo: int
    k: int
    stride: int
    pad: int
    groups: int
    threads: int
    variant: str = CONV_VARIANT
    suite: str = "half_gemm"

    @property
    def v(self) -> _Op:
        return VARIANTS[self.variant]

    @property
    def Ho(self) -> int:
        return (self.H + 2 * self.pad - self.k) // self.stride + 1

    @property
    def M(self) -> int:  # the equivalent GEMM, as _bench_conv.ConvCase
        return self.batch * self.Ho * self.Ho

    @property
    def K(self) -> int:
        return self.C // self.groups * self.k * self.k

    @property
    def N(self) -> int:
        return self.Mo

    @property
    def shape(self) -> str:
        return (
            f"{self.name}:{self.batch}x{self.C}x{self.H}x{self.H}->{self.Mo} "
            f"k{self.k}s{self.stride}g{self.groups}"
        )

    @property
    def ops(self) -> int:
        return 2 * self.M * self.K * self.N

    @property
    def group(self) -> str:
        return f"conv_fp16|{self.shape}|{self.variant}|{self.threads}"

    @property
    def bf16(self) -> bool:
        return False

    @property
    def attrs(self) -> dict:
        return {
            "group": self.groups,
            "strides": (self.stride, self.stride),
            "pads": (self.pad,) * 4,
        }

    def make_inputs(self) -> ConvInputs:
        rng = np.random.default_rng([self.C, self.H, self.Mo, self.k, self.groups])
        x = rng.standard_normal((self.batch, self.C, self.H, self.H), np.float32)
        w = rng.standard_normal(
            (self.Mo, self.C // self.groups, self.k, self.k), np.float32
        )
        xh, wh = x.astype(np.float16), w.astype(np.float16)
        return ConvInputs(xh, wh, xh.astype(np.float32), wh.astype(np.float32))

    def build_lowprec(self, x: ConvInputs):
        packed = conv_half.pack_conv_weights_fp16(x.w, group=self.groups)
        attrs = self.attrs
        return lambda: conv_half.conv_fp16(x.x, packed, **attrs)


def _build_ort_conv(case, x):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    a = case.attrs
    node = helper.make_node(
        "Conv", ["X", "W"], ["Y"], group=a["group"], strides=list(a["strides"]),
        pads=list(a["pads"]), kernel_shape=[case.k, case.k],
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "bench",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x.x32.shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(x.w32, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = case.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(
        model.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    feed = {"X": x.x32}
    return lambda: sess.run(None, feed)


def _build_numpy_f32(case, x):
    out = np.empty((case.M, case.N), np.float32)
    return lambda: np.matmul(x.a32, x.b32, out=out)


def _build_numpy_f16(case, x):
    if case.M * case.K * case.N > NUMPY_F16_MAX_MACS:
        msg = (
            f"numpy float16 matmul skipped above {NUMPY_F16_MAX_MACS} multiply-adds "
            f"(~0.4 GFLOP/s: one {case.shape} call would take seconds)"
        )
        raise lb.Unsupported(msg)
    a, b = x.a32.astype(np.float16), x.b32.astype(np.float16)
    out = np.empty((case.M, case.N), np.float16)
    return lambda: np.matmul(a, b, out=out)


def _build_torch(dtype_name):
    def build(case, x):
        import torch

        dt = getattr(torch, dtype_name)
        ta = torch.from_numpy(x.a32).to(dt)
        tb = torch.from_numpy(x.b32).to(dt)

        def call():
            with torch.inference_mode():
                return torch.matmul(ta, tb)

        return call

    return build


_F16 = frozenset({"fp16->f32"})
_BF16 = frozenset({"bf16->f32"})
_CONV = frozenset({CONV_VARIANT})

BASELINES: tuple[lb.Baseline, ...] = (
    lb.Baseline(
        "numpy_f32",
        "numpy float32 matmul (BLAS sgemm) of the same values",
        (),
        _F16 | _BF16,
        True,
        _build_numpy_f32,
    ),
    lb.Baseline(
        "numpy_f16",
        "numpy float16 matmul (small shapes only)",
        (),
        _F16,
        True,
        _build_numpy_f16,
    ),
    lb.Baseline(
        "torch_f16",
        "torch CPU matmul, float16 tensors",
        ("torch",),
        _F16,
        True,
        _build_torch("float16"),
    ),
    lb.Baseline(
        "torch_bf16",
        "torch CPU matmul, bfloat16 tensors (oneDNN)",
        ("torch",),
        _BF16,
        True,
        _build_torch("bfloat16"),
    ),
    lb.Baseline(
        "ort_conv_f32",
        "onnxruntime float32 Conv, NCHW, constant weights, same values",
        ("onnxruntime", "onnx"),
        _CONV,
        True,
        _build_ort_conv,
    ),
)


def make_cases(opts: argparse.Namespace) -> list:
    quick = getattr(opts, "quick", False)
    shapes = getattr(opts, "shapes", None) or (QUICK_SHAPES if quick else FULL_SHAPES)
    variants = getattr(opts, "variants", None) or list(VARIANTS)
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        msg = (
            f"unknown variant(s) {bad} for half_gemm; choose from {', '.join(VARIANTS)}"
        )
        raise SystemExit(msg)
    threads = getattr(opts, "threads", None) or [1, 2]
    cases: list = [
        HalfCase(M, K, N, var, t)
        for (M, K, N) in shapes
        for var in variants
        if var in GEMM_VARIANTS
        for t in threads
    ]
    if CONV_VARIANT in variants and not getattr(opts, "shapes", None):
        layers = CONV_QUICK_LAYERS if quick else CONV_LAYERS
        cases += [HalfConvCase(*layer, t) for layer in layers for t in threads]
    return cases


def check(case, x, got, refs) -> dict:
    """lowprec against float64 on the warm-up output: max |err| / the
    gamma_K bound of the documented contract (<= 1 expected)."""
    K = case.K
    gamma = K * 2.0**-24 / (1 - K * 2.0**-24)
    if isinstance(case, HalfConvCase):
        # float64 reference through the float32 baseline's own values: ORT's
        # output differs from the exact result by its own rounding, so this
        # reports lowprec against ORT and the bound on the larger of the two
        if "ort_conv_f32" not in refs:
            return {}
        ref = np.asarray(refs["ort_conv_f32"][0], np.float64)
        diff = np.abs(np.asarray(got, np.float64) - ref)
        return {
            "vs": "ort_conv_f32",
            "max_abs_diff": float(diff.max(initial=0.0)),
            "max_rel_diff": float((diff / np.maximum(np.abs(ref), 1e-30)).max()),
            "gamma_K": gamma,
        }
    a64, b64 = x.a32.astype(np.float64), x.b32.astype(np.float64)
    err = np.abs(np.asarray(got, np.float64) - a64 @ b64)
    bound = gamma * (np.abs(a64) @ np.abs(b64))
    return {
        "vs": "float64",
        "max_err_over_bound": float((err / np.maximum(bound, 1e-300)).max()),
        "mismatches": int((err > bound).sum()),
        "max_abs_diff": float(err.max(initial=0.0)),
    }


# --------------------------------------------------------------------------- #
# "% of peak": the instruction each path runs


def peak_kind(case) -> str:
    """ "tdpbf16ps" / "vdpbf16ps" for the bfloat16 cases on the amx_bf16 /
    avx512_bf16 path, "vfmadd231ps ymm" on the avx2_f16c path, else
    "vfmadd231ps" (zmm: float16 paths; the portable bfloat16 path is FMA too)."""
    if case.bf16 and half.get_half_isa() == "amx_bf16":
        return "tdpbf16ps"
    if case.bf16 and half.get_half_isa() == "avx512_bf16":
        return "vdpbf16ps"
    if half.get_half_isa() == "avx2_f16c":
        return "vfmadd231ps ymm"
    return "vfmadd231ps"


def measured_peaks(
    threads, kinds=("vfmadd231ps", "vdpbf16ps", "vfmadd231ps ymm", "tdpbf16ps")
):
    """{(kind, threads): GFLOP/s} of register-only ``vfmadd231ps zmm`` / ``vdpbf16ps
    zmm`` / ``vfmadd231ps ymm`` loops (kernels/fp16_gemm.measure_peak, best of
    7) and of a ``tdpbf16ps`` tile loop (kernels/bf16_gemm_amx.measure_peak);
    None where a probe cannot run (no AVX-512 / AVX512_BF16 / F16C+AVX2 /
    AMX-BF16)."""
    from .kernels import fp16_gemm

    feats = half.available_half_isas()
    can = {
        "vfmadd231ps": "avx512_f16c" in feats,
        "vdpbf16ps": "avx512_bf16" in feats,
        "vfmadd231ps ymm": "avx2_f16c" in feats,
        "tdpbf16ps": "amx_bf16" in feats,
    }
    out = {}
    for kind in kinds:
        for t in threads:
            if not can[kind]:
                out[(kind, t)] = None
            elif kind == "tdpbf16ps":
                from .kernels import bf16_gemm_amx

                out[(kind, t)] = bf16_gemm_amx.measure_peak(t)
            else:
                out[(kind, t)] = fp16_gemm.measure_peak(
                    t, kind == "vdpbf16ps", ymm=kind.endswith("ymm")
                )
    return out


def apply_peaks(rows, cases, peaks) -> None:
    """Set each row's peak_gops / pct_peak / peak_kind from ``peaks`` (in place)."""
    for row, case in zip(rows, cases, strict=True):
        kind = peak_kind(case)
        peak = peaks.get((kind, case.threads))
        row["peak_kind"] = kind
        row["peak_gops"] = peak
        row["pct_peak"] = 100.0 * row["lowprec"]["gops"] / peak if peak else None


def set_peaks(rows, cases, threads) -> str:
    """The Suite hook: FMA / vdpbf16ps / tdpbf16ps peaks per row; returns the
    peak line."""
    peaks = measured_peaks(threads)
    apply_peaks(rows, cases, peaks)
    return "peaks GFLOP/s: " + ", ".join(
        f"{kind} {t} thr: {p:.0f}" for (kind, t), p in peaks.items() if p
    )


SUITE = lb.Suite(
    "half_gemm",
    "float16 / bfloat16 matmul and float16 conv with float32 accumulation, "
    "prepacked weights",
    make_cases,
    BASELINES,
    check,
    set_peaks,
)


def available_baselines(names=None):
    """(installed baselines of this suite, {name: why unavailable})."""
    import importlib

    ok, missing = [], {}
    for b in BASELINES:
        if names is not None and b.name not in names:
            continue
        try:
            for mod in b.requires:
                importlib.import_module(mod)
        except Exception as e:  # ImportError or a broken install
            missing[b.name] = f"{type(e).__name__}: {e}"
        else:
            ok.append(b)
    return ok, missing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lowprec._bench_half")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--shapes", type=lb.parse_shapes, default=None)
    p.add_argument("--threads", type=lb._csv_ints, default=[1, 2])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.1)
    p.add_argument(
        "--variants",
        type=lambda t: [v.strip() for v in t.split(",") if v.strip()],
        default=None,
        help=f"comma-separated, from: {', '.join(VARIANTS)}",
    )
    opts = p.parse_args(argv)
    baselines, missing = available_baselines()
    for w in lb.environment_warnings():
        print(f"warning: {w}", file=sys.stderr)
    cases = make_cases(opts)
    peaks = measured_peaks(opts.threads)
    rows = lb.run_suite(SUITE, cases, baselines, opts.repeat, opts.min_time, {})
    apply_peaks(rows, cases, peaks)
    print(f"half isa={half.get_half_isa()}  (GOP/s here = GFLOP/s)")
    print(
        "peaks GFLOP/s:",
        ", ".join(f"{k} {t} thr {lb._fmt(p)}" for (k, t), p in peaks.items()),
    )
    print(lb.format_table(rows))
    print(
        "blas:",
        [(b.get("internal_api"), b.get("architecture")) for b in lb.blas_info()],
    )
    for r in rows:
        c = r.get("check", {})
        if c.get("vs") == "ort_conv_f32":
            print(
                f"check {r['shape']} t={r['threads']}: max |lowprec - ORT| = "
                f"{c['max_abs_diff']:.3g} (relative {c['max_rel_diff']:.3g})"
            )
            continue
        print(
            f"check {r['shape']} {r['variant']} t={r['threads']}: max |err| / "
            f"gamma_K bound = {c.get('max_err_over_bound', float('nan')):.3g}, "
            f"{c.get('mismatches')} outputs past the bound"
        )
    if missing:
        print("unavailable:", missing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
