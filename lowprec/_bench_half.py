"""Benchmark suite for the half-precision matmuls (``matmul_fp16``, ``matmul_bf16``).

Built like the INT8 GEMM suite of :mod:`lowprec.bench` and timed by its
:func:`~lowprec.bench.run_suite` / :func:`~lowprec.bench.measure`: a case is
(M, K, N) x variant x threads; GFLOP/s = 2*M*N*K / median time (the table's
"GOP/s" column); ratio = lowprec / the fastest baseline that ran.

    python -m lowprec._bench_half [--quick] [--threads 2] [--shapes 1024x1024x1024]

``SUITE`` is the :class:`lowprec.bench.Suite` to register in ``bench.SUITES``.
Baselines: numpy float32 matmul (BLAS sgemm on float32 copies: the target),
numpy float16 matmul (small shapes only: ~0.4 GFLOP/s here), torch CPU float16
and bfloat16 matmul when torch is installed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np

from . import bench as lb
from . import half

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


VARIANTS = {"fp16->f32": _Op("matmul_fp16"), "bf16->f32": _Op("matmul_bf16")}


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
)


def make_cases(opts: argparse.Namespace) -> list[HalfCase]:
    shapes = getattr(opts, "shapes", None) or (
        QUICK_SHAPES if getattr(opts, "quick", False) else FULL_SHAPES
    )
    variants = getattr(opts, "variants", None) or list(VARIANTS)
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        msg = (
            f"unknown variant(s) {bad} for half_gemm; choose from {', '.join(VARIANTS)}"
        )
        raise SystemExit(msg)
    threads = getattr(opts, "threads", None) or [1, 2]
    return [
        HalfCase(M, K, N, var, t)
        for (M, K, N) in shapes
        for var in variants
        for t in threads
    ]


def check(case, x, got, refs) -> dict:
    """lowprec against float64 on the warm-up output: max |err| / the
    gamma_K bound of the documented contract (<= 1 expected)."""
    a64, b64 = x.a32.astype(np.float64), x.b32.astype(np.float64)
    err = np.abs(np.asarray(got, np.float64) - a64 @ b64)
    K = case.K
    gamma = K * 2.0**-24 / (1 - K * 2.0**-24)
    bound = gamma * (np.abs(a64) @ np.abs(b64))
    return {
        "vs": "float64",
        "max_err_over_bound": float((err / np.maximum(bound, 1e-300)).max()),
        "mismatches": int((err > bound).sum()),
        "max_abs_diff": float(err.max(initial=0.0)),
    }


SUITE = lb.Suite(
    "half_gemm",
    "float16 / bfloat16 matmul with float32 accumulation, prepacked weights",
    make_cases,
    BASELINES,
    check,
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
    opts = p.parse_args(argv)
    baselines, missing = available_baselines()
    for w in lb.environment_warnings():
        print(f"warning: {w}", file=sys.stderr)
    rows = lb.run_suite(
        SUITE, make_cases(opts), baselines, opts.repeat, opts.min_time, {}
    )
    print(f"half isa={half.get_half_isa()}  (GOP/s here = GFLOP/s)")
    print(lb.format_table(rows))
    print(
        "blas:",
        [(b.get("internal_api"), b.get("architecture")) for b in lb.blas_info()],
    )
    for r in rows:
        c = r.get("check", {})
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
