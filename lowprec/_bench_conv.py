"""The INT8 convolution suite of ``lowprec bench`` (issue 4's layers and baselines).

Cases follow :class:`lowprec.bench.GemmCase`'s interface (``make_inputs``,
``build_lowprec``, ``ops``, ``threads``, ``shape``, ``variant``, ``group``, and
``M``/``K``/``N`` as the equivalent GEMM: pixels x C/group*kh*kw x channels), so
:func:`lowprec.bench.run_suite` times them like the GEMM suite. GOP/s =
2 * N * M * C/group * kh * kw * Ho * Wo / t. Register with::

    from ._bench_conv import SUITE as _CONV_SUITE
    SUITES[_CONV_SUITE.name] = _CONV_SUITE
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import bench as lb
from . import conv as lc

# name, batch, C, H(=W), M, k, stride, pad, group
Layer = tuple[str, int, int, int, int, int, int, int, int]
LAYERS: tuple[Layer, ...] = (
    ("stem7x7s2", 1, 3, 224, 64, 7, 2, 3, 1),
    ("3x3c64_56", 1, 64, 56, 64, 3, 1, 1, 1),
    ("1x1c256_56", 1, 256, 56, 64, 1, 1, 0, 1),
    ("3x3c256_14", 1, 256, 14, 256, 3, 1, 1, 1),
    ("dw3x3c144_56", 1, 144, 56, 144, 3, 1, 1, 144),
    ("dw3x3c144_56s2", 1, 144, 56, 144, 3, 2, 1, 144),
    ("3x3c64_56b8", 8, 64, 56, 64, 3, 1, 1, 1),
)
QUICK_LAYERS: tuple[Layer, ...] = (
    ("3x3c32_28", 1, 32, 28, 32, 3, 1, 1, 1),
    ("dw3x3c64_28", 1, 64, 28, 64, 3, 1, 1, 64),
)


@dataclass(frozen=True)
class _Op:
    op: str


VARIANTS = {
    "u8s8->u8 NCHW": "NCHW",
    "u8s8->u8 NHWC": "NHWC",
}


@dataclass
class ConvInputs:
    x: np.ndarray  # (N, C, H, W) uint8
    w: np.ndarray  # (M, C/group, k, k) int8
    x_scale: np.float32
    x_zero_point: np.uint8
    w_scale: np.ndarray  # (M,) float32, per output channel
    y_scale: np.float32
    y_zero_point: np.uint8

    def x_real(self) -> np.ndarray:
        return (
            self.x.astype(np.float32) - np.float32(self.x_zero_point)
        ) * self.x_scale


@dataclass(frozen=True)
class ConvCase:
    name: str
    batch: int
    C: int
    H: int
    Mo: int
    k: int
    stride: int
    pad: int
    groups: int
    variant: str
    threads: int
    suite: str = "int8_conv"

    @property
    def v(self):
        return _Op("qlinear_conv")

    @property
    def Ho(self) -> int:
        return (self.H + 2 * self.pad - self.k) // self.stride + 1

    # the equivalent GEMM, for the JSON rows (run_case reads M, K, N)
    @property
    def M(self) -> int:
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
        return f"qlinear_conv|{self.shape}|{self.variant}|{self.threads}"

    @property
    def attrs(self) -> dict:
        return {
            "group": self.groups,
            "strides": (self.stride, self.stride),
            "pads": (self.pad,) * 4,
        }

    def make_inputs(self) -> ConvInputs:
        rng = np.random.default_rng([self.C, self.H, self.Mo, self.k, self.groups])
        x = rng.integers(0, 256, (self.batch, self.C, self.H, self.H), dtype=np.uint8)
        w = rng.integers(
            -127, 128, (self.Mo, self.C // self.groups, self.k, self.k), dtype=np.int8
        )
        sx = np.float32(0.02)
        sw = rng.uniform(0.003, 0.006, self.Mo).astype(np.float32)
        acc_std = math.sqrt(self.K) * 74.0 * 74.0
        sy = np.float32(sx * 0.0045 * acc_std * 3 / 127)
        return ConvInputs(x, w, sx, np.uint8(113), sw, sy, np.uint8(128))

    def build_lowprec(self, x: ConvInputs) -> Callable[[], np.ndarray]:
        layout = VARIANTS[self.variant]
        packed = lc.pack_conv_weights(x.w, np.int8(0), x.w_scale, group=self.groups)
        xin = (
            x.x if layout == "NCHW" else np.ascontiguousarray(x.x.transpose(0, 2, 3, 1))
        )
        attrs = self.attrs
        return lambda: lc.qlinear_conv(
            xin, x.x_scale, x.x_zero_point, packed, None, None, x.y_scale,
            x.y_zero_point, layout=layout, **attrs,
        )  # fmt: skip


# --------------------------------------------------------------------------- #
# baselines


def _ort_conv(case, x, op, exact=False):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    a = case.attrs
    attrs = {
        "group": a["group"],
        "strides": list(a["strides"]),
        "pads": list(a["pads"]),
        "kernel_shape": [case.k, case.k],
    }
    if op == "QLinearConv":
        # ORT wants one w scale per channel and equal (symmetric) zero points
        inits = {
            "x_scale": np.array(x.x_scale), "x_zero_point": np.array(x.x_zero_point),
            "W": x.w, "w_scale": x.w_scale,
            "w_zero_point": np.zeros(case.Mo, np.int8),
            "y_scale": np.array(x.y_scale), "y_zero_point": np.array(x.y_zero_point),
        }  # fmt: skip
        names = ["X", "x_scale", "x_zero_point", "W", "w_scale", "w_zero_point",
                 "y_scale", "y_zero_point"]  # fmt: skip
        xt, yt, feed_x = TensorProto.UINT8, TensorProto.UINT8, x.x
    elif op == "ConvInteger":
        inits = {"W": x.w, "x_zero_point": np.array(x.x_zero_point)}
        names = ["X", "W", "x_zero_point"]
        xt, yt, feed_x = TensorProto.UINT8, TensorProto.INT32, x.x
    else:
        inits = {"W": x.w.astype(np.float32) * x.w_scale[:, None, None, None]}
        names = ["X", "W"]
        xt, yt, feed_x = TensorProto.FLOAT, TensorProto.FLOAT, x.x_real()
    node = helper.make_node(op, names, ["Y"], **attrs)
    graph = helper.make_graph(
        [node],
        "bench",
        [helper.make_tensor_value_info("X", xt, list(feed_x.shape))],
        [helper.make_tensor_value_info("Y", yt, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = case.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if exact:  # see lowprec.bench._onnx_session: no saturating 16-bit sums
        so.add_session_config_entry("session.x64quantprecision", "1")
    sess = ort.InferenceSession(
        model.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    feed = {"X": feed_x}
    return lambda: sess.run(None, feed)


def _torch_conv(case, x, engine):
    import torch

    if engine not in torch.backends.quantized.supported_engines:
        msg = f"torch quantized engine {engine} missing"
        raise lb.Unsupported(msg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = engine
        conv = torch.ao.nn.quantized.Conv2d(
            case.C, case.Mo, case.k, stride=case.stride, padding=case.pad,
            groups=case.groups,
        )  # fmt: skip
        wf = torch.from_numpy(x.w.astype(np.float32) * x.w_scale[:, None, None, None])
        wq = torch.quantize_per_channel(
            wf, torch.from_numpy(x.w_scale.astype(np.float64)),
            torch.zeros(case.Mo, dtype=torch.long), 0, torch.qint8,
        )  # fmt: skip
        conv.set_weight_bias(wq, None)
        conv.scale = float(x.y_scale)
        conv.zero_point = int(x.y_zero_point)
        xq = torch.quantize_per_tensor(
            torch.from_numpy(x.x_real()), float(x.x_scale), int(x.x_zero_point),
            torch.quint8,
        )  # fmt: skip
        conv(xq)

    def call():
        torch.backends.quantized.engine = engine
        with torch.inference_mode():
            return conv(xq)

    return call


_ALL = frozenset(VARIANTS)
BASELINES: tuple[lb.Baseline, ...] = (
    lb.Baseline(
        "ort_qlconv",
        "onnxruntime QLinearConv, NCHW u8 in/out, per-channel w scales, "
        "constant weights",
        ("onnxruntime", "onnx"), _ALL, True,
        lambda c, x: _ort_conv(c, x, "QLinearConv"),
    ),
    lb.Baseline(
        "ort_qlconv_exact",
        "onnxruntime QLinearConv with session.x64quantprecision=1: exact on CPUs "
        "without VNNI, where its default sums pairs in saturating 16 bits",
        ("onnxruntime", "onnx"), _ALL, True,
        lambda c, x: _ort_conv(c, x, "QLinearConv", exact=True),
    ),
    lb.Baseline(
        "ort_convint",
        "onnxruntime ConvInteger u8s8->i32 (dynamic-quantization conv)",
        ("onnxruntime", "onnx"), _ALL, True,
        lambda c, x: _ort_conv(c, x, "ConvInteger"),
    ),
    lb.Baseline(
        "ort_conv_f32",
        "onnxruntime float32 Conv (context only)",
        ("onnxruntime", "onnx"), _ALL, False,
        lambda c, x: _ort_conv(c, x, "Conv"),
    ),
    lb.Baseline(
        "torch_onednn",
        "torch quantized Conv2d, onednn engine (quint8 in/out, per-channel qint8)",
        ("torch",), _ALL, True,
        lambda c, x: _torch_conv(c, x, "onednn"),
    ),
    lb.Baseline(
        "torch_fbgemm",
        "torch quantized Conv2d, fbgemm engine (quint8 in/out, per-channel qint8)",
        ("torch",), _ALL, True,
        lambda c, x: _torch_conv(c, x, "fbgemm"),
    ),
)  # fmt: skip


def make_cases(opts) -> list[ConvCase]:
    layers = QUICK_LAYERS if getattr(opts, "quick", False) else LAYERS
    variants = [
        v for v in (getattr(opts, "variants", None) or ()) if v in VARIANTS
    ] or ["u8s8->u8 NCHW"]
    return [
        ConvCase(*layer, var, t)
        for layer in layers
        for var in variants
        for t in opts.threads
    ]


def _check(case, x, got, refs) -> dict:
    """lowprec vs ORT QLinearConv on the warm-up call (ORT rounds in float32:
    off-by-one on near-ties is expected, see docs/quantization.md eq. 11).
    Beyond that, ORT's exact mode is asked too (its default saturates 16-bit
    sums on CPUs without VNNI: lowprec.bench._gemm_check) and the row records
    both."""
    if "ort_qlconv" not in refs:
        return {}

    def compare(ref):
        ref = np.asarray(ref)
        if VARIANTS[case.variant] == "NHWC":
            ref = np.ascontiguousarray(ref.transpose(0, 2, 3, 1))
        if ref.shape != got.shape:
            return {"vs": "ort_qlconv", "error": f"shape {got.shape} != {ref.shape}"}
        diff = np.abs(got.astype(np.int64) - ref.astype(np.int64))
        return {
            "vs": "ort_qlconv",
            "max_abs_diff": int(diff.max(initial=0)),
            "mismatches": int(np.count_nonzero(diff)),
        }

    res = compare(refs["ort_qlconv"][0])
    if res.get("max_abs_diff", 0) > 1:
        exact = compare(_ort_conv(case, x, "QLinearConv", exact=True)()[0])
        exact["ort_default_mismatches"] = res["mismatches"]
        exact["ort_default_max_abs_diff"] = res["max_abs_diff"]
        exact["mode"] = "session.x64quantprecision=1"
        return exact
    return res


SUITE = lb.Suite(
    "int8_conv",
    "INT8 convolution: qlinear_conv with prepacked weights (issue 4 layers)",
    make_cases,
    BASELINES,
    _check,
)
