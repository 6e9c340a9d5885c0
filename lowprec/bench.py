"""Benchmark lowprec against the libraries people would otherwise use.

``lowprec bench`` (see :mod:`lowprec.cli`) runs a fixed suite in one process,
lowprec and every installed baseline side by side on the same inputs and thread
count, prints a table, and writes everything needed to reproduce or publish the
numbers to a JSON file (``bench/make_readme_table.py`` turns it into the
README's table).

Layout, so that later suites (convolution, fp16, sparse) slot in:

* a **suite** (:class:`Suite`, registered in :data:`SUITES`) turns the command
  line's selection into a list of cases;
* a **case** (:class:`GemmCase` here) knows its inputs, how to build the lowprec
  callable, and which **baselines** (:class:`Baseline`) apply to it;
* :func:`run_suite` times every implementation of every case the same way
  (:func:`measure`) and returns plain dict rows, which go to the table and JSON.

Only the standard library, numpy and lowprec are imported at module level: the
baselines (onnxruntime, torch), threadpoolctl, tqdm and matplotlib are optional
and imported when used, so ``lowprec --help`` and the suite itself work without
any of them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import functools
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

import lowprec

# --------------------------------------------------------------------------- #
# the INT8 GEMM suite: shapes, variants


Shape = tuple[int, int, int]  # (M, K, N): a (M, K) @ b (K, N)

FULL_SHAPES: tuple[Shape, ...] = (
    (1024, 1024, 1024),
    (2048, 2048, 2048),
    (128, 768, 768),  # BERT-base attention projections, 128 tokens
    (128, 768, 3072),  # BERT-base FFN up-projection
    (16, 384, 1536),  # small-batch MLP
    (1, 4096, 4096),  # single-token decode (GEMV, memory bound)
    (3136, 576, 64),  # 3x3 conv 64->64 at 56x56 as im2col GEMM (ResNet stage 1)
)

# `lowprec bench --quick` is the README's first command: small enough to finish
# in well under a minute on 2 cores with numba compilation and all baselines.
QUICK_SHAPES: tuple[Shape, ...] = (
    (256, 256, 256),
    (64, 512, 512),
    (1, 1024, 1024),
)


@dataclass(frozen=True)
class Variant:
    """One input/output type combination of an INT8 GEMM (B is always int8)."""

    name: str  # "u8s8->i32": A type, B type -> output type
    op: str  # the lowprec function benchmarked
    a_dtype: type
    out_dtype: type


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("u8s8->i32", "matmul_integer", np.uint8, np.int32),
        Variant("s8s8->i32", "matmul_integer", np.int8, np.int32),
        Variant("u8s8->u8 qlinear", "qlinear_matmul", np.uint8, np.uint8),
        # float32 activations quantized inside the call (DynamicQuantizeMatMul)
        Variant("f32->f32 dynamic", "dynamic_quantize_matmul", np.uint8, np.float32),
        # not in the default set; selectable with --variants
        Variant("s8s8->s8 qlinear", "qlinear_matmul", np.int8, np.int8),
    )
}
DEFAULT_VARIANTS = ("u8s8->i32", "s8s8->i32", "u8s8->u8 qlinear", "f32->f32 dynamic")


@dataclass
class GemmInputs:
    """Fixed-seed operands and quantization parameters shared by every implementation.

    Parameters are per tensor and typical of a real model: asymmetric
    activations (nonzero a_zero_point), symmetric int8 weights (b_zero_point 0).
    """

    a: np.ndarray  # (M, K) uint8 or int8
    b: np.ndarray  # (K, N) int8
    a_zero_point: np.generic
    b_zero_point: np.int8
    a_scale: np.float32
    b_scale: np.float32
    y_scale: np.float32
    y_zero_point: np.generic  # output type for qlinear variants

    def a_real(self) -> np.ndarray:
        """The real-valued activations a quantized model would have started from."""
        return (
            self.a.astype(np.float32) - np.float32(self.a_zero_point)
        ) * self.a_scale


@dataclass(frozen=True)
class GemmCase:
    """One row of the table: shape x variant x thread count."""

    M: int
    K: int
    N: int
    variant: str
    threads: int
    suite: str = "int8_gemm"

    @property
    def v(self) -> Variant:
        return VARIANTS[self.variant]

    @property
    def shape(self) -> str:
        return f"{self.M}x{self.K}x{self.N}"

    @property
    def ops(self) -> int:
        # one multiply + one add per (m, k, n): GOP/s = 2*M*N*K / t
        return 2 * self.M * self.K * self.N

    @property
    def group(self) -> str:
        """pytest-benchmark group: every implementation of this case together."""
        return f"{self.v.op}|{self.shape}|{self.variant}|{self.threads}"

    def make_inputs(self) -> GemmInputs:
        rng = np.random.default_rng([self.M, self.K, self.N])  # fixed per shape
        info = np.iinfo(self.v.a_dtype)
        a = rng.integers(info.min, info.max + 1, (self.M, self.K), dtype=self.v.a_dtype)
        b = rng.integers(-128, 128, (self.K, self.N), dtype=np.int8)
        a_zp = self.v.a_dtype(113 if self.v.a_dtype == np.uint8 else -15)
        a_scale, b_scale = np.float32(0.02), np.float32(0.005)
        # y_scale ~ a few standard deviations of the accumulator over 127, so the
        # output spreads over the int8 range instead of saturating everywhere
        acc_std = math.sqrt(self.K) * 74.0 * 74.0
        y_scale = np.float32(a_scale * b_scale * acc_std * 3 / 127)
        out = self.v.out_dtype if self.v.out_dtype in (np.uint8, np.int8) else np.uint8
        y_zp = out(128 if out == np.uint8 else 0)
        return GemmInputs(a, b, a_zp, np.int8(0), a_scale, b_scale, y_scale, y_zp)

    def build_lowprec(self, x: GemmInputs) -> Callable[[], np.ndarray]:
        # Weights are packed once, outside the timing, as the baselines'
        # constant initializers / prepacked weights are.
        if self.v.op == "matmul_integer":
            packed = lowprec.pack_weights(x.b, x.b_zero_point)
            return lambda: lowprec.matmul_integer(x.a, packed, x.a_zero_point)
        if self.v.op == "dynamic_quantize_matmul":
            packed = lowprec.pack_weights(x.b, x.b_zero_point, x.b_scale)
            a_real = x.a_real()
            return lambda: lowprec.dynamic_quantize_matmul(a_real, packed)
        packed = lowprec.pack_weights(x.b, x.b_zero_point, x.b_scale)
        return lambda: lowprec.qlinear_matmul(
            x.a,
            x.a_scale,
            x.a_zero_point,
            packed,
            None,
            None,
            x.y_scale,
            x.y_zero_point,
        )


def make_gemm_cases(
    shapes: Sequence[Shape], variants: Sequence[str], threads: Sequence[int]
) -> list[GemmCase]:
    # threads innermost: the 1- and 2-thread rows of a case sit together
    return [
        GemmCase(M, K, N, var, t)
        for (M, K, N) in shapes
        for var in variants
        for t in threads
    ]


# --------------------------------------------------------------------------- #
# baselines


class Unsupported(Exception):
    """A baseline cannot run this particular case (shape or type limits)."""


@dataclass(frozen=True)
class Baseline:
    """Another library's implementation of the same computation.

    ``build(case, inputs, threads)`` returns a zero-argument callable doing one
    call (all setup, weight packing and session creation outside it), or raises
    :class:`Unsupported`. ``counts``: eligible as the "best baseline" the ratio
    is taken against (numpy float32 is shown for context only).
    """

    name: str
    label: str  # what exactly it runs, for footnotes
    requires: tuple[str, ...]  # modules; any missing -> baseline unavailable
    variants: frozenset[str]
    counts: bool
    build: Callable[[GemmCase, GemmInputs], Callable[[], object]]

    def applies(self, case: GemmCase) -> bool:
        return case.variant in self.variants


def _build_numpy_f32(case, x):
    af = (
        x.a_real() if case.v.op == "dynamic_quantize_matmul" else x.a.astype(np.float32)
    )
    bf = x.b.astype(np.float32)
    out = np.empty((case.M, case.N), np.float32)
    return lambda: np.matmul(af, bf, out=out)


def _onnx_session(
    case, node_inputs, op, inits, a_type, out_type, extra_attrs=None, domain="",
    exact=False,
):  # fmt: skip
    """An ORT session around one node with every operand but A as a constant
    initializer, so ORT prepacks the weights at session creation. exact: ORT's
    session.x64quantprecision, which keeps its u8s8 kernels off the saturating
    16-bit pair sums (vpmaddubsw) on CPUs without VNNI; the timed sessions
    leave ORT's default, what its users get."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    tp = {
        np.dtype(np.uint8): TensorProto.UINT8,
        np.dtype(np.int8): TensorProto.INT8,
        np.dtype(np.int32): TensorProto.INT32,
        np.dtype(np.float32): TensorProto.FLOAT,
    }
    node = helper.make_node(
        op, node_inputs, ["Y"], domain=domain or None, **(extra_attrs or {})
    )
    graph = helper.make_graph(
        [node],
        "bench",
        [helper.make_tensor_value_info("A", tp[np.dtype(a_type)], [case.M, case.K])],
        [helper.make_tensor_value_info("Y", tp[np.dtype(out_type)], [case.M, case.N])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    # opset 13 / IR 8: MatMulInteger-10 and QLinearMatMul-10 semantics, which
    # every onnxruntime since 1.8 implements with prepacked constant weights
    opsets = [helper.make_opsetid("", 13)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = case.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if exact:
        so.add_session_config_entry("session.x64quantprecision", "1")
    sess = ort.InferenceSession(
        model.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    return sess


def _build_ort_matmulinteger(case, x, exact=False):
    inits = {"B": x.b, "a_zero_point": np.array(x.a_zero_point)}
    sess = _onnx_session(
        case, ["A", "B", "a_zero_point"], "MatMulInteger", inits, x.a.dtype,
        np.int32, exact=exact,
    )  # fmt: skip
    feed = {"A": x.a}
    return lambda: sess.run(None, feed)


def _build_ort_qlinearmatmul(case, x, exact=False):
    inits = {
        "a_scale": np.array(x.a_scale),
        "a_zero_point": np.array(x.a_zero_point),
        "B": x.b,
        "b_scale": np.array(x.b_scale),
        "b_zero_point": np.array(x.b_zero_point),
        "y_scale": np.array(x.y_scale),
        "y_zero_point": np.array(x.y_zero_point),
    }
    names = ["A", "a_scale", "a_zero_point", "B", "b_scale", "b_zero_point"]
    sess = _onnx_session(
        case,
        [*names, "y_scale", "y_zero_point"],
        "QLinearMatMul",
        inits,
        x.a.dtype,
        x.y_zero_point.dtype,
        exact=exact,
    )
    feed = {"A": x.a}
    return lambda: sess.run(None, feed)


def _build_ort_dynamic(case, x):
    # com.microsoft DynamicQuantizeMatMul: float A quantized to uint8 per tensor
    # inside the op, int8 B a constant initializer, float32 out
    inits = {
        "B": x.b,
        "b_scale": np.array(x.b_scale),
        "b_zero_point": np.array(x.b_zero_point),
    }
    sess = _onnx_session(
        case,
        ["A", "B", "b_scale", "b_zero_point"],
        "DynamicQuantizeMatMul",
        inits,
        np.float32,
        np.float32,
        domain="com.microsoft",
    )
    feed = {"A": x.a_real()}
    return lambda: sess.run(None, feed)


def _build_torch_int_mm(case, x):
    import torch

    # torch._int_mm is s8 x s8 -> s32. For a uint8-A row, A is shifted to int8
    # outside the timing: the same multiply-accumulate work.
    a = x.a if x.a.dtype == np.int8 else (x.a.astype(np.int16) - 128).astype(np.int8)
    ta = torch.from_numpy(np.ascontiguousarray(a))
    tb = torch.from_numpy(np.ascontiguousarray(x.b))
    try:
        torch._int_mm(ta, tb)
    except (RuntimeError, ValueError, NotImplementedError) as e:
        msg = f"torch._int_mm rejects {case.shape}: {str(e).splitlines()[0][:120]}"
        raise Unsupported(msg) from None
    return lambda: torch._int_mm(ta, tb)


def _build_torch_dynamic_linear(case, x):
    import torch

    engines = torch.backends.quantized.supported_engines
    if "fbgemm" not in engines:
        msg = f"torch quantized engine fbgemm missing ({engines})"
        raise Unsupported(msg)
    torch.backends.quantized.engine = "fbgemm"
    lin = torch.nn.Linear(case.K, case.N, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(x.b.T.astype(np.float32) * x.b_scale))
    with warnings.catch_warnings():
        # torch 2.10+ deprecates quantized tensors; the API still is torch's
        # documented int8 inference path on CPU
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        qmodel = torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8
        )
    xin = torch.from_numpy(x.a_real())

    def call():
        # float32 in -> dynamic u8 quantization of the input -> fbgemm u8s8 GEMM
        # -> float32 out: the whole op is timed, as it is what a user would call
        with torch.inference_mode():
            return qmodel(xin)

    return call


_I32 = frozenset({"u8s8->i32", "s8s8->i32"})
_QLINEAR = frozenset({"u8s8->u8 qlinear", "s8s8->s8 qlinear"})
_DYNAMIC = frozenset({"f32->f32 dynamic"})
_ALL = frozenset(VARIANTS)

BASELINES: tuple[Baseline, ...] = (
    Baseline(
        "numpy_f32",
        "numpy float32 matmul of the same shape (BLAS sgemm; context only)",
        (),
        _ALL,
        False,
        _build_numpy_f32,
    ),
    Baseline(
        "ort_mmint",
        "onnxruntime MatMulInteger, B int8 constant initializer (prepacked), "
        "A's type as the row",
        ("onnxruntime", "onnx"),
        _I32,
        True,
        _build_ort_matmulinteger,
    ),
    Baseline(
        "ort_mmint_exact",
        "onnxruntime MatMulInteger with session.x64quantprecision=1: exact on "
        "CPUs without VNNI, where its default sums pairs in saturating 16 bits",
        ("onnxruntime", "onnx"),
        _I32,
        True,
        functools.partial(_build_ort_matmulinteger, exact=True),
    ),
    Baseline(
        "ort_qlmm",
        "onnxruntime QLinearMatMul (same signedness as the row: u8s8->u8 or "
        "s8s8->s8), B constant initializer, per-tensor scales",
        ("onnxruntime", "onnx"),
        _QLINEAR,
        True,
        _build_ort_qlinearmatmul,
    ),
    Baseline(
        "ort_dynqmm",
        "onnxruntime com.microsoft DynamicQuantizeMatMul: float32 A quantized "
        "per tensor inside the op, B int8 constant initializer, float32 out",
        ("onnxruntime", "onnx"),
        _DYNAMIC,
        True,
        _build_ort_dynamic,
    ),
    Baseline(
        "torch_int_mm",
        "torch._int_mm s8s8->i32 (uint8-A rows run with A shifted to int8)",
        ("torch",),
        _I32,
        True,
        _build_torch_int_mm,
    ),
    Baseline(
        "torch_dyn",
        "torch dynamic quantized nn.Linear (quantize_dynamic, qint8 weights, "
        "fbgemm): float32 in/out incl. input quantization",
        ("torch",),
        _ALL,
        True,
        _build_torch_dynamic_linear,
    ),
)
BASELINE_BY_NAME = {b.name: b for b in BASELINES}


def baseline_availability(
    names: Sequence[str] | None = None,
    pool: Sequence[Baseline] = BASELINES,
) -> tuple[list[Baseline], dict[str, str]]:
    """(installed baselines, {name: why unavailable}) among ``names`` (default
    all) of ``pool`` (a suite's baselines; the INT8 GEMM ones by default)."""
    import importlib

    ok, missing = [], {}
    for b in pool:
        if names is not None and b.name not in names:
            continue
        why = None
        for mod in b.requires:
            try:
                importlib.import_module(mod)
            except Exception as e:  # ImportError, or a broken install
                why = f"{mod} not importable ({type(e).__name__}: {e})"
                break
        if why is None:
            ok.append(b)
        else:
            missing[b.name] = why
    return ok, missing


# --------------------------------------------------------------------------- #
# threads


@contextlib.contextmanager
def limit_threads(threads: int) -> Iterator[None]:
    """numba, torch and numpy's BLAS limited to ``threads`` (ORT: per session).

    Restores the previous settings on exit. torch is only touched if something
    already imported it.
    """
    import numba

    if threads > numba.config.NUMBA_NUM_THREADS:
        msg = (
            f"{threads} threads requested but numba was started with "
            f"NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}"
        )
        raise ValueError(msg)
    prev_numba = numba.get_num_threads()
    numba.set_num_threads(threads)
    torch = sys.modules.get("torch")
    prev_torch = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(threads)
    with contextlib.ExitStack() as stack:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            pass
        else:
            stack.enter_context(threadpool_limits(limits=threads, user_api="blas"))
        try:
            yield
        finally:
            numba.set_num_threads(prev_numba)
            if torch is not None:
                torch.set_num_threads(prev_torch)


# --------------------------------------------------------------------------- #
# timing


@dataclass
class Timing:
    samples_s: list[float]  # seconds per call, one entry per repeat
    calls_per_sample: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    def as_dict(self, ops: int) -> dict:
        return {
            "gops": ops / self.median_s / 1e9,
            "gops_min": ops / max(self.samples_s) / 1e9,
            "gops_max": ops / min(self.samples_s) / 1e9,
            "median_s": self.median_s,
            "samples_s": self.samples_s,
            "calls_per_sample": self.calls_per_sample,
        }


# A case is flagged when the rest of the machine used this many cores during it.
OTHER_LOAD_WARN = 0.25

# Before retrying a disturbed case: give a short burst of other work time to end.
RETRY_PAUSE_S = 2.0

# Pause between implementations, long enough for OpenBLAS's default thread
# timeout (2**28 cycles, ~0.1 s) and the OpenMP / onnxruntime spin phases.
SETTLE_S = 0.2


def calibrate(fn: Callable[[], object], min_time: float) -> tuple[int, float]:
    """Calls per sample so one sample lasts >= min_time; and one timed call.

    The caller has already made a warm-up call (numba compilation, lazy weight
    layouts, ORT's first-run allocations are thus excluded).
    """
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    return max(1, math.ceil(min_time / max(one, 1e-9))), one


def sample(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def measure(
    impls: dict[str, Callable[[], object]],
    repeat: int,
    min_time: float,
    settle: float = SETTLE_S,
    rounds: int = 1,
) -> dict[str, Timing]:
    """Median-of-``repeat`` timing of several implementations of one case.

    Each implementation is timed in contiguous blocks, each after a pause of
    ``settle`` seconds and a fresh warm-up call. Not interleaved call by call:
    every library here keeps its worker threads busy-waiting for a while after
    a call (onnxruntime's spinning pool, OpenBLAS's yield loop, the OpenMP
    runtimes of numba and torch). On a 2-core machine those spinning threads
    take the second core from whichever library runs next, which measured as
    2-50x slowdowns of the 2-thread cases when samples were interleaved. The
    pause lets them park.

    ``rounds`` > 1 spreads the ``repeat`` samples over that many rounds, each
    timing every implementation once in an order rotated by one a round, so a
    slow spell of a shared machine (seconds long on the development VM, where
    one block of our calls ran at 1.6x the time of the next) falls on all of
    them rather than on whichever block it met.
    """
    names = list(impls)
    rounds = max(1, min(rounds, repeat))
    samples: dict[str, list[float]] = {name: [] for name in names}
    calls: dict[str, int] = {}
    for r in range(rounds):
        want = repeat * (r + 1) // rounds  # samples each after this round
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            fn = impls[name]
            if settle > 0:
                time.sleep(settle)
            fn()  # re-warm after the pause: caches, parked threads waking up
            if name not in calls:
                calls[name], one = calibrate(fn, min_time)
                if calls[name] == 1:
                    # the calibration call already is a valid one-call sample
                    samples[name].append(one)
            while len(samples[name]) < want:
                samples[name].append(sample(fn, calls[name]))
    return {name: Timing(samples[name], calls[name]) for name in names}


# --------------------------------------------------------------------------- #
# suites


@dataclass(frozen=True)
class Suite:
    """A named set of cases. ``make_cases(opts)`` -> cases with the GemmCase API:
    ``make_inputs``, ``build_lowprec``, ``ops``, ``threads``, ``shape``,
    ``variant``, ``group``; baselines are those whose ``applies(case)``."""

    name: str
    description: str
    make_cases: Callable[[argparse.Namespace], list]
    baselines: tuple[Baseline, ...]
    check: Callable | None = None  # (case, inputs, lowprec_out, baseline_outs) -> dict
    # (rows, cases, threads) -> peak label: suites whose instruction is not
    # vpdpbusd set each row's peak_gops / pct_peak themselves
    set_peaks: Callable | None = None


def parse_shapes(text: str) -> list[Shape]:
    shapes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        parts = item.split("x")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            msg = f"shape {item!r} is not MxKxN (e.g. 1024x1024x1024)"
            raise argparse.ArgumentTypeError(msg)
        M, K, N = (int(p) for p in parts)
        if min(M, K, N) < 1:
            msg = f"shape {item!r}: every dimension must be >= 1"
            raise argparse.ArgumentTypeError(msg)
        shapes.append((M, K, N))
    if not shapes:
        msg = "no shapes given"
        raise argparse.ArgumentTypeError(msg)
    return shapes


def _gemm_cases(opts: argparse.Namespace) -> list[GemmCase]:
    shapes = opts.shapes or (QUICK_SHAPES if opts.quick else FULL_SHAPES)
    variants = opts.variants or list(DEFAULT_VARIANTS)
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        msg = (
            f"unknown variant(s) {bad} for int8_gemm; choose from {', '.join(VARIANTS)}"
        )
        raise SystemExit(msg)
    return make_gemm_cases(shapes, variants, opts.threads)


def _gemm_check(case, x, got, refs) -> dict:
    """lowprec's output against ORT's on the warm-up call: a free sanity check
    that the numbers being compared are the same computation. Where ORT's
    default differs, its exact mode is asked too (CPUs without VNNI: ORT's u8s8
    kernels saturate 16-bit pair sums; measured on an AVX2 Zen 3, 1024 of 1024
    outputs of a 1x1024x1024 MatMulInteger differed): the row then records
    both, and the check is the exact mode's."""
    exact_build = {
        "ort_mmint": _build_ort_matmulinteger,
        "ort_qlmm": _build_ort_qlinearmatmul,
    }

    def compare(name, ref):
        ref = np.asarray(ref)
        if ref.shape != got.shape:
            return {"vs": name, "error": f"shape {got.shape} != {ref.shape}"}
        diff = np.abs(got.astype(np.int64) - ref.astype(np.int64))
        return {
            "vs": name,
            "max_abs_diff": int(diff.max(initial=0)),
            "mismatches": int(np.count_nonzero(diff)),
        }

    for name, build in exact_build.items():
        if name in refs:
            res = compare(name, refs[name][0])
            if res.get("mismatches"):
                exact = compare(name, build(case, x, exact=True)()[0])
                exact["ort_default_mismatches"] = res["mismatches"]
                exact["ort_default_max_abs_diff"] = res["max_abs_diff"]
                exact["mode"] = "session.x64quantprecision=1"
                return exact
            return res
    return {}


SUITES: dict[str, Suite] = {
    "int8_gemm": Suite(
        "int8_gemm",
        "INT8 GEMM: matmul_integer / qlinear_matmul with prepacked weights",
        _gemm_cases,
        BASELINES,
        _gemm_check,
    ),
}


# --------------------------------------------------------------------------- #
# machine description


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_RELEVANT_FEATURES = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512vnni",
    "avx512bf16",
    "avx512fp16",
    "avxvnni",
    "amx-int8",
    "amx-tile",
    "amx-bf16",
)


def machine_info() -> dict:
    info: dict = {
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    with contextlib.suppress(AttributeError):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        import llvmlite.binding as llvm

        feats = llvm.get_host_cpu_features()
        info["llvm_host_cpu"] = llvm.get_host_cpu_name()
        info["llvm_features"] = {
            f: bool(feats.get(f, False)) for f in _RELEVANT_FEATURES
        }
    except Exception as e:  # pragma: no cover - llvmlite is a dependency
        info["llvm_error"] = str(e)
    import numba

    info["numba_num_threads"] = numba.config.NUMBA_NUM_THREADS
    with contextlib.suppress(Exception):  # only known after a parallel kernel ran
        info["numba_threading_layer"] = numba.threading_layer()
    return info


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in (
        "numpy",
        "numba",
        "llvmlite",
        "onnxruntime",
        "onnx",
        "torch",
        "threadpoolctl",
        "lowprec",
    ):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def blas_info() -> list[dict] | str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    keep = (
        "user_api",
        "internal_api",
        "version",
        "architecture",
        "num_threads",
        "threading_layer",
        "prefix",
        "filepath",
    )
    # torch brings its own OpenBLAS; the one numpy uses lives in numpy's wheel
    # (numpy.libs / numpy/.dylibs) or is the system one numpy was linked to.
    np_dir = os.path.dirname(os.path.dirname(np.__file__))
    out = []
    for d in threadpool_info():
        if d.get("user_api") != "blas":
            continue
        e = {k: d.get(k) for k in keep}
        path = d.get("filepath") or ""
        e["numpy_uses"] = "numpy" in os.path.relpath(path, np_dir).split(os.sep)[0]
        out.append(e)
    if out and not any(e["numpy_uses"] for e in out):
        # not a wheel-bundled BLAS: numpy is linked to the only non-torch one
        for e in out:
            e["numpy_uses"] = "torch" not in (e.get("filepath") or "")
    return out


def peak_instruction() -> str:
    """The instruction whose peak "% of peak" divides by: the INT8 path's."""
    try:
        from lowprec.kernels.int8_gemm_vnni import PEAK_INSTRUCTIONS
    except (ImportError, AttributeError):
        return "vpdpbusd"
    entry = PEAK_INSTRUCTIONS.get(lowprec.get_isa())
    return entry[0] if entry else f"({lowprec.get_isa()}: no probe)"


def measured_peaks(
    threads: Sequence[int], retries: int = 0
) -> tuple[dict[str, float | None], str]:
    """Peak GOP/s of the INT8 path's inner instruction per thread count, if
    lowprec ships the peak probe (vpdpbusd on the VNNI paths)."""
    try:
        from lowprec.kernels.int8_gemm_vnni import measure_peak
    except (ImportError, AttributeError) as e:
        return {str(t): None for t in threads}, f"n/a (no measure_peak: {e})"
    peaks: dict[str, float | None] = {}
    notes = []
    for t in threads:
        try:
            with limit_threads(t):
                # a peak is a maximum: under outside load take the best attempt
                best = 0.0
                for _ in range(retries + 1):
                    load = OtherLoad()
                    best = max(best, float(measure_peak(t)))
                    if (load.cores() or 0) < OTHER_LOAD_WARN:
                        break
                peaks[str(t)] = best
        except Exception as e:  # a probe still under construction must not sink the run
            peaks[str(t)] = None
            notes.append(f"{t} threads: {type(e).__name__}: {e}")
    note = (
        f"measured {peak_instruction()} throughput "
        "(lowprec.kernels.int8_gemm_vnni.measure_peak)"
    )
    if notes:
        note += "; failed for " + "; ".join(notes)
    return peaks, note


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


class OtherLoad:
    """CPU time the rest of the machine used while a case ran, in cores.

    Machine-wide busy time from /proc/stat (steal included: a neighbour VM on a
    shared host) minus this process's own CPU time, over the wall time. On a
    2-core machine, 1.0 means a whole core was taken by someone else, which
    wrecks the 2-thread numbers (every parallel region waits for a descheduled
    worker). None where /proc/stat is unavailable.
    """

    def __init__(self):
        self.t0, self.busy0, self.own0 = self._now()

    @staticmethod
    def _now():
        wall = time.perf_counter()
        own = sum(os.times()[:2])
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return wall, None, own
        user, nice, system, _idle, _iowait, irq, softirq, steal = v
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        return wall, busy, own

    def cores(self) -> float | None:
        t1, busy1, own1 = self._now()
        if self.busy0 is None or busy1 is None or t1 <= self.t0:
            return None
        other = (busy1 - self.busy0) - (own1 - self.own0)
        # clock-tick granularity (10 ms) makes short spans noisy: clamp at 0
        return round(max(0.0, other / (t1 - self.t0)), 2)


def environment_warnings() -> list[str]:
    warns = []
    if os.environ.get("OPENBLAS_CORETYPE"):
        warns.append(
            f"OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} is set: it forces "
            f"an older OpenBLAS kernel and slows numpy's float32 baseline here. For "
            f"this command only: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "
            f"lowprec bench ..."
        )
    if lowprec.get_isa() == "portable":
        warns.append(
            "lowprec runs its portable (plain numba) GEMM path, not a VNNI kernel: "
            f"available paths here: {', '.join(lowprec.available_isas())}"
        )
    return warns


# --------------------------------------------------------------------------- #
# running


class _Progress:
    """tqdm on stderr if installed and stderr is a terminal, else a line per case."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.i, self.bar = total, 0, None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, file=sys.stderr, unit="case", leave=False)

    def start(self, label: str) -> None:
        self.i += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label)
        elif self.enabled:
            print(f"[{self.i}/{self.total}] {label}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self.enabled:
            print(f"  {text}", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_case(
    case,
    baselines: Sequence[Baseline],
    repeat: int,
    min_time: float,
    check: Callable | None = None,
    settle: float = SETTLE_S,
    rounds: int = 1,
) -> dict:
    """Time lowprec and every applicable baseline on one case -> JSON row."""
    x = case.make_inputs()
    row: dict = {
        "suite": case.suite,
        "op": case.v.op,
        "shape": case.shape,
        "M": case.M,
        "K": case.K,
        "N": case.N,
        "variant": case.variant,
        "threads": case.threads,
        "ops": case.ops,
        "group": case.group,
    }
    impls: dict[str, Callable[[], object]] = {}
    skipped: dict[str, str] = {}
    warm: dict[str, object] = {}
    with limit_threads(case.threads):
        impls["lowprec"] = case.build_lowprec(x)
        for b in baselines:
            if not b.applies(case):
                continue
            try:
                impls[b.name] = b.build(case, x)
            except Unsupported as e:
                skipped[b.name] = str(e)
        # warm-up: compile, lazy packing, first-run allocations; outputs kept
        # for the sanity check
        for name in list(impls):
            try:
                warm[name] = impls[name]()
            except Exception as e:
                if name == "lowprec":
                    raise
                skipped[name] = f"failed: {type(e).__name__}: {e}"
                del impls[name]
        if check is not None:
            row["check"] = check(
                case,
                x,
                warm["lowprec"],
                {k: v for k, v in warm.items() if k != "lowprec"},
            )
        timings = measure(impls, repeat, min_time, settle, rounds)
    row["lowprec"] = timings["lowprec"].as_dict(case.ops)
    row["baselines"] = {}
    for b in baselines:
        if not b.applies(case):
            continue
        if b.name in timings:
            row["baselines"][b.name] = {
                **timings[b.name].as_dict(case.ops),
                "counts": b.counts,
            }
        elif b.name in skipped:
            row["baselines"][b.name] = {"skipped": skipped[b.name], "counts": b.counts}
    counted = {
        k: v["gops"]
        for k, v in row["baselines"].items()
        if v.get("counts") and "gops" in v
    }
    if counted:
        best = max(counted, key=counted.get)
        row["best_baseline"] = best
        row["best_baseline_gops"] = counted[best]
        row["ratio"] = row["lowprec"]["gops"] / counted[best]
    else:
        row["best_baseline"] = row["best_baseline_gops"] = row["ratio"] = None
    return row


def _busy(row: dict) -> float:
    return row.get("other_load_cores") or 0.0


def run_suite(
    suite: Suite,
    cases: list,
    baselines: Sequence[Baseline],
    repeat: int,
    min_time: float,
    peaks: dict[str, float | None],
    progress: bool = True,
    settle: float = SETTLE_S,
    retries: int = 0,
    rounds: int = 1,
) -> list[dict]:
    """All cases -> rows. A case during which other processes used the CPU
    (>= OTHER_LOAD_WARN cores) is run again, up to ``retries`` more times after
    a pause; the least disturbed attempt is kept."""
    rows = []
    prog = _Progress(len(cases), progress)
    try:
        for case in cases:
            label = f"{case.shape} {case.variant} t={case.threads}"
            prog.start(label)
            best = None
            for attempt in range(1, retries + 2):
                if attempt > 1:
                    prog.note(f"{label}: machine busy, retry {attempt - 1}/{retries}")
                    time.sleep(RETRY_PAUSE_S)
                load = OtherLoad()
                row = run_case(
                    case, baselines, repeat, min_time, suite.check, settle, rounds
                )
                row["other_load_cores"] = load.cores()
                if best is None or _busy(row) < _busy(best):
                    best = row
                if _busy(best) < OTHER_LOAD_WARN:
                    break
            row = best
            row["attempts"] = attempt
            peak = peaks.get(str(case.threads))
            row["peak_gops"] = peak
            row["pct_peak"] = 100.0 * row["lowprec"]["gops"] / peak if peak else None
            rows.append(row)
            prog.done()
    finally:
        prog.close()
    return rows


# --------------------------------------------------------------------------- #
# output


def _fmt(v: float | None, nd: int = 1) -> str:
    if v is None:
        return "n/a"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.{nd}f}"


def baseline_columns(rows: Sequence[dict]) -> list[str]:
    """Baseline names appearing in any row, in registry order."""
    seen = {name for r in rows for name in r.get("baselines", {})}
    order = [b.name for b in BASELINES]
    return [n for n in order if n in seen] + sorted(seen - set(order))


def format_table(rows: Sequence[dict]) -> str:
    """Fixed-width text table; GOP/s throughout, ratio = lowprec / best baseline."""
    cols = baseline_columns(rows)
    header = ["shape", "variant", "thr", "lowprec", "%peak", *cols, "best", "ratio"]
    # shown only when someone else used the CPU during some case
    show_load = any((r.get("other_load_cores") or 0) >= OTHER_LOAD_WARN for r in rows)
    if show_load:
        header.append("busy")
    lines = []
    for r in rows:
        cells = [
            r["shape"],
            r["variant"],
            str(r["threads"]),
            _fmt(r["lowprec"]["gops"]),
            _fmt(r.get("pct_peak")),
        ]
        for c in cols:
            b = r["baselines"].get(c)
            if b is None:
                cells.append("-")
            elif "gops" in b:
                cells.append(_fmt(b["gops"]))
            else:
                cells.append("skip")
        cells.append(r.get("best_baseline") or "-")
        ratio = r.get("ratio")
        cells.append(
            "-" if ratio is None else f"{ratio:.2f}" + (" <" if ratio < 1 else "")
        )
        if show_load:
            load = r.get("other_load_cores")
            flag = load is not None and load >= OTHER_LOAD_WARN
            cells.append(f"{load:.2f}!" if flag else "")
        lines.append(cells)
    widths = [
        max(len(h), *(len(c[i]) for c in lines)) if lines else len(h)
        for i, h in enumerate(header)
    ]
    left = {0, 1, header.index("best")}

    def fmt_line(cells):
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [fmt_line(header), fmt_line(["-" * w for w in widths])]
    out += [fmt_line(c) for c in lines]
    return "\n".join(out)


def write_plot(rows: Sequence[dict], path: str) -> None:
    """Grouped bar chart of GOP/s per case, lowprec vs each baseline (log scale)."""
    try:
        import matplotlib
    except ImportError:
        msg = "--plot needs matplotlib, which is not installed: pip install matplotlib"
        raise SystemExit(msg) from None
    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    series = ["lowprec", *baseline_columns(rows)]
    labels = [f"{r['shape']}\n{r['variant']}\nt={r['threads']}" for r in rows]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(min(30.0, max(8.0, 0.6 * len(rows) + 2)), 5.5))
    xs = np.arange(len(rows))
    for i, name in enumerate(series):
        vals = []
        for r in rows:
            d = r["lowprec"] if name == "lowprec" else r["baselines"].get(name, {})
            vals.append(d.get("gops", np.nan))
        ax.bar(xs + (i - (len(series) - 1) / 2) * width, vals, width, label=name)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("GOP/s (2*M*N*K / median time)")
    ax.set_title("INT8 GEMM: lowprec vs baselines")
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- #
# command line


def _csv_ints(text: str) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        msg = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not vals or min(vals) < 1:
        msg = f"thread counts must be >= 1, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return vals


def _csv_variants(text: str) -> list[str]:
    # names are checked against the chosen suite's variants when cases are made
    vals = [t.strip() for t in text.split(",") if t.strip()]
    if not vals:
        msg = "--variants needs at least one name"
        raise argparse.ArgumentTypeError(msg)
    return vals


def _csv_baselines(text: str) -> list[str]:
    # names are checked against the chosen suite's baselines in run()
    vals = [t.strip() for t in text.split(",") if t.strip()]
    return [] if vals == ["none"] else vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--suite",
        choices=sorted(SUITES),
        default="int8_gemm",
        help="which suite to run (default: %(default)s)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small shapes only: "
        + ", ".join("x".join(map(str, s)) for s in QUICK_SHAPES),
    )
    p.add_argument(
        "--shapes",
        type=parse_shapes,
        default=None,
        metavar="MxKxN,...",
        help="override the shapes, e.g. 1024x1024x1024,1x4096x4096",
    )
    p.add_argument(
        "--variants",
        type=_csv_variants,
        default=None,
        metavar="V,...",
        help="the suite's variants (int8_gemm default: "
        f"{','.join(DEFAULT_VARIANTS)}; all: {','.join(VARIANTS)})",
    )
    p.add_argument(
        "--threads",
        type=_csv_ints,
        default=[1, 2],
        metavar="1,2",
        help="thread counts (default: 1,2)",
    )
    p.add_argument(
        "--baselines",
        type=_csv_baselines,
        default=None,
        metavar="B,...",
        help=f"restrict baselines ({','.join(BASELINE_BY_NAME)}, or none); "
        "default: all installed",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=5,
        help="timed samples per implementation; the median is reported "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        metavar="R",
        help="spread each implementation's samples over R rounds that take "
        "turns with the other implementations (order rotated a round), so a "
        "slow spell of a shared machine falls on all of them (default: "
        "%(default)s: one block each)",
    )
    p.add_argument(
        "--min-time",
        type=float,
        default=0.1,
        metavar="SECONDS",
        help="each sample repeats the call until it lasts this long "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=SETTLE_S,
        metavar="SECONDS",
        help="pause before timing each implementation so the previous "
        "library's spinning worker threads park (default: %(default)s)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        metavar="N",
        help="rerun a case up to N times when other processes used the CPU "
        "during it; the least disturbed attempt is kept (default: %(default)s)",
    )
    p.add_argument(
        "--json",
        default="bench-results.json",
        metavar="PATH",
        help="where to write the results (default: %(default)s)",
    )
    p.add_argument(
        "--plot",
        default=None,
        metavar="PATH",
        help="also write a bar chart (needs matplotlib)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar / per-case lines on stderr",
    )


def run(opts: argparse.Namespace, argv: Sequence[str] | None = None) -> dict:
    """Run the selected suite; print the table, write JSON (and plot). -> results.

    ``argv``: the command line after ``lowprec`` (recorded in the JSON).
    """
    if (
        min(opts.repeat, opts.rounds) < 1
        or min(opts.min_time, opts.settle, opts.retries) < 0
    ):
        msg = "--repeat, --rounds must be >= 1; --min-time, --settle, --retries >= 0"
        raise SystemExit(msg)
    import numba

    too_many = [t for t in opts.threads if t > numba.config.NUMBA_NUM_THREADS]
    if too_many:
        msg = (
            f"--threads {too_many} exceed numba's NUMBA_NUM_THREADS="
            f"{numba.config.NUMBA_NUM_THREADS} (this machine's cores by default)"
        )
        raise SystemExit(msg)
    suite = SUITES[opts.suite]
    cases = suite.make_cases(opts)
    known = {b.name for b in suite.baselines}
    unknown = sorted(set(opts.baselines or ()) - known)
    if unknown:
        msg = (
            f"--baselines {unknown} are not baselines of suite {suite.name}; "
            f"choose from {', '.join(sorted(known))}"
        )
        raise SystemExit(msg)
    baselines, unavailable = baseline_availability(opts.baselines, suite.baselines)
    warns = environment_warnings()
    for w in warns:
        print(f"warning: {w}", file=sys.stderr)
    load_start = _loadavg()

    peaks, peak_note = measured_peaks(opts.threads, opts.retries)
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    rows = run_suite(
        suite,
        cases,
        baselines,
        opts.repeat,
        opts.min_time,
        peaks,
        progress=not opts.no_progress,
        settle=opts.settle,
        retries=opts.retries,
        rounds=opts.rounds,
    )
    peak_label = f"{peak_instruction()} peak GOP/s"
    if suite.set_peaks is not None:
        peak_label = suite.set_peaks(rows, cases, opts.threads)
    elapsed = time.perf_counter() - t0

    argv = list(sys.argv[1:] if argv is None else argv)
    result = {
        "schema": 1,
        "suite": suite.name,
        "suite_description": suite.description,
        "date": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 2),
        "command": shlex.join(["lowprec", *argv]),
        "sys_argv": list(sys.argv),
        "machine": {
            **machine_info(),
            "loadavg_start": load_start,
            "loadavg_end": _loadavg(),
        },
        "versions": versions(),
        "blas": blas_info(),
        "lowprec": {
            "isa": lowprec.get_isa(),
            "half_isa": lowprec.half.get_half_isa(),
            "available_isas": list(lowprec.available_isas()),
            "version": lowprec.__version__,
        },
        "env": {
            k: os.environ.get(k)
            for k in (
                "OPENBLAS_CORETYPE",
                "OPENBLAS_L2_SIZE",
                "OPENBLAS_NUM_THREADS",
                "OMP_NUM_THREADS",
                "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS",
                "NUMBA_THREADING_LAYER",
                "LOWPREC_ISA",
            )
        },
        "settings": {
            "quick": opts.quick,
            "shapes": sorted(
                {c.shape for c in cases}, key=[c.shape for c in cases].index
            ),
            "variants": list(opts.variants or ()),
            "threads": list(opts.threads),
            "repeat": opts.repeat,
            "min_time_s": opts.min_time,
            "settle_s": opts.settle,
            "retries": opts.retries,
            "rounds": min(opts.rounds, opts.repeat),
            "timing": "median over repeat samples; each sample times a batch of "
            "calls lasting >= min_time after one warm-up call; GOP/s = 2*M*N*K/t",
        },
        "peak_gops": peaks,
        "peak_note": peak_note,
        "baselines": {
            "available": {b.name: b.label for b in baselines},
            "unavailable": unavailable,
            "ratio_against": [b.name for b in baselines if b.counts],
        },
        "warnings": warns,
        "rows": rows,
    }

    print(
        f"lowprec {lowprec.__version__}  isa={result['lowprec']['isa']}  "
        f"cpu={result['machine']['cpu_model']} "
        f"({result['machine'].get('llvm_host_cpu', '?')})"
    )
    peak_txt = ", ".join(f"{t} thr: {_fmt(p)}" for t, p in peaks.items())
    print(f"{peak_label}: {peak_txt}" if suite.set_peaks is None else peak_label)
    print(format_table(rows))
    print(
        "GOP/s = 2*M*N*K / median time; ratio = lowprec / best of "
        + ", ".join(result["baselines"]["ratio_against"] or ["(none run)"])
        + " ('<': lowprec slower); numpy_f32 is context only."
        + (
            "\nbusy: cores other processes used during the case (! = unreliable)"
            if any((r.get("other_load_cores") or 0) >= OTHER_LOAD_WARN for r in rows)
            else ""
        )
    )
    if unavailable:
        print(
            "unavailable baselines: "
            + "; ".join(f"{k} ({v})" for k, v in unavailable.items())
        )
    sat = [r for r in rows if r.get("check", {}).get("ort_default_mismatches")]
    if sat:
        c = max((r["check"] for r in sat), key=lambda c: c["ort_default_mismatches"])
        print(
            f"note: ORT's default kernels differ from the exact result in {len(sat)} "
            f"rows (up to {c['ort_default_mismatches']} outputs, max |diff| "
            f"{c['ort_default_max_abs_diff']}: saturating 16-bit sums on this CPU); "
            "the check used ORT's exact mode (session.x64quantprecision=1), the "
            "timings ORT's default"
        )
    bad = [r for r in rows if r.get("check", {}).get("mismatches")]
    for r in bad:
        c = r["check"]
        print(
            f"note: {r['shape']} {r['variant']} t={r['threads']}: lowprec differs "
            f"from {c['vs']} in {c['mismatches']} outputs (max |diff| "
            f"{c['max_abs_diff']})"
        )
    busy = [r for r in rows if (r.get("other_load_cores") or 0) >= OTHER_LOAD_WARN]
    if busy:
        worst = max(r["other_load_cores"] for r in busy)
        warns.append(
            f"other processes used up to {worst} cores during {len(busy)} of "
            f"{len(rows)} cases (column other_load_cores in the JSON); those "
            f"numbers, 2-thread ones most, are unreliable: rerun on a quiet machine"
        )
    for w in warns:
        print(f"warning: {w}")

    with open(opts.json, "w") as f:
        json.dump(result, f, indent=1, default=_json_default)
    print(f"results: {os.path.abspath(opts.json)}")
    if opts.plot:
        write_plot(rows, opts.plot)
        print(f"plot: {os.path.abspath(opts.plot)}")
    return result


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lowprec.bench ...``: the same as ``lowprec bench ...``."""
    p = argparse.ArgumentParser(
        prog="lowprec bench", description=__doc__.split("\n")[0]
    )
    add_arguments(p)
    opts = p.parse_args(argv)
    run(opts, ["bench", *(sys.argv[1:] if argv is None else argv)])
    return 0


def _register_suites() -> None:
    # the other suites import this module (Suite, measure, ...): register them
    # once it is complete; a suite whose module fails to import is left out
    import importlib

    for mod in ("_bench_conv", "_bench_sparse", "_bench_half", "_bench_nbits"):
        try:
            suite = importlib.import_module(f"lowprec.{mod}").SUITE
        except (ImportError, AttributeError):  # partial installs; or the suite
            continue  # module itself is being imported first (it imports us)
        SUITES[suite.name] = suite


_register_suites()

if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "BASELINES",
    "DEFAULT_VARIANTS",
    "FULL_SHAPES",
    "QUICK_SHAPES",
    "SUITES",
    "VARIANTS",
    "Baseline",
    "GemmCase",
    "Suite",
    "Unsupported",
    "add_arguments",
    "baseline_availability",
    "format_table",
    "limit_threads",
    "make_gemm_cases",
    "measure",
    "run",
]
