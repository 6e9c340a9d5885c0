"""pytest-benchmark: lowprec's INT8 GEMM against installed baselines.

The cases are lowprec.bench's (the `lowprec bench` command's), so both report the
same shapes, variants and baselines. Groups are "op|shape|variant|threads", one
benchmark per implementation inside:

    pytest bench --benchmark-enable                    # everything
    pytest bench --benchmark-enable -m "not slow"      # the quick shapes only

Under the default `--benchmark-disable` each runs once as a smoke test; heavy
shapes (marked slow) then run shrunk, so `pytest` stays fast.
"""

import dataclasses
import functools

import numba
import pytest

from lowprec import bench as lb

THREADS = [t for t in (1, 2) if t <= numba.config.NUMBA_NUM_THREADS]
# Availability is decided once, at collection: a missing library drops its
# parameters instead of producing a skip per case.
AVAILABLE, _UNAVAILABLE = lb.baseline_availability()

# Smoke mode shrinks heavy shapes to at most these sizes (same code paths:
# M=1, M not a multiple of the tile, K not a multiple of 4/64 stay as they were
# for dimensions already below the caps).
SMOKE_CAP = (64, 256, 256)


def _params():
    out = []
    shapes = [(s, False) for s in lb.QUICK_SHAPES]
    shapes += [(s, True) for s in lb.FULL_SHAPES if s not in lb.QUICK_SHAPES]
    for shape, heavy in shapes:
        for variant in lb.DEFAULT_VARIANTS:
            for t in THREADS:
                case = lb.GemmCase(*shape, variant, t)
                impls = ["lowprec"] + [b.name for b in AVAILABLE if b.applies(case)]
                for impl in impls:
                    marks = [pytest.mark.slow] if heavy else []
                    out.append(
                        pytest.param(
                            case, impl, heavy, marks=marks, id=f"{case.group}|{impl}"
                        )
                    )
    return out


@functools.lru_cache(maxsize=8)
def _inputs(case):
    # the same operands for every implementation of a case
    return case.make_inputs()


def _build(case, impl):
    x = _inputs(dataclasses.replace(case, threads=1))
    if impl == "lowprec":
        return case.build_lowprec(x)
    try:
        return lb.BASELINE_BY_NAME[impl].build(case, x)
    except lb.Unsupported as e:
        pytest.skip(str(e))


@pytest.mark.parametrize(("case", "impl", "heavy"), _params())
def test_int8_gemm(benchmark, smoke, case, impl, heavy):
    if smoke and heavy:
        M, K, N = (
            min(d, c) for d, c in zip((case.M, case.K, case.N), SMOKE_CAP, strict=True)
        )
        case = dataclasses.replace(case, M=M, K=K, N=N)
    benchmark.group = case.group
    benchmark.extra_info.update(
        ops=case.ops,
        shape=case.shape,
        variant=case.variant,
        threads=case.threads,
        impl=impl,
    )
    with lb.limit_threads(case.threads):
        fn = _build(case, impl)
        fn()  # warm-up outside the timing: numba compilation, lazy packing
        benchmark(fn)
