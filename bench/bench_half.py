"""pytest-benchmark: lowprec's half-precision matmuls and conv against installed
baselines.

The cases and baselines are lowprec._bench_half's (the half suite of
``lowprec bench``). Groups are "op|shape|variant|threads":

    pytest bench/bench_half.py --benchmark-enable          # measure
    pytest bench/bench_half.py                             # smoke: tiny shapes, once

Under the default ``--benchmark-disable`` every case runs once on a tiny shape.
"""

import dataclasses

import numba
import pytest

import lowprec.bench as lb  # first: it registers the suites, _bench_half among them
from lowprec import _bench_half as hb

THREADS = [t for t in (1, 2) if t <= numba.config.NUMBA_NUM_THREADS]
AVAILABLE, _UNAVAILABLE = hb.available_baselines()
# numpy float16 and torch float16 run at ~0.4-2 GFLOP/s: smoke shapes stay tiny
SMOKE_SHAPE = (9, 40, 70)


def _params():
    out = []
    for shape in (*hb.QUICK_SHAPES, *hb.FULL_SHAPES):
        for variant in hb.GEMM_VARIANTS:
            for t in THREADS:
                case = hb.HalfCase(*shape, variant, t)
                for impl in ["lowprec"] + [
                    b.name for b in AVAILABLE if b.applies(case)
                ]:
                    heavy = shape in hb.FULL_SHAPES
                    marks = [pytest.mark.slow] if heavy else []
                    out.append(
                        pytest.param(case, impl, marks=marks, id=f"{case.group}|{impl}")
                    )
    return out


@pytest.mark.parametrize(("case", "impl"), _params())
def test_half_matmul(benchmark, smoke, case, impl):
    if smoke:
        case = dataclasses.replace(
            case, M=min(case.M, SMOKE_SHAPE[0]), K=SMOKE_SHAPE[1], N=SMOKE_SHAPE[2]
        )
    benchmark.group = case.group
    benchmark.extra_info.update(
        ops=case.ops, shape=case.shape, variant=case.variant, threads=case.threads
    )
    x = case.make_inputs()
    with lb.limit_threads(case.threads):
        if impl == "lowprec":
            fn = case.build_lowprec(x)
        else:
            try:
                fn = next(b for b in AVAILABLE if b.name == impl).build(case, x)
            except lb.Unsupported as e:
                pytest.skip(str(e))
        fn()  # warm-up outside the timing: numba compilation, lazy packing
        benchmark(fn)


# convolutions: the INT8 conv suite's layers; smoke runs shrink them
SMOKE_HW = 12


def _conv_params():
    out = []
    for layer in (*hb.CONV_QUICK_LAYERS, *hb.CONV_LAYERS):
        for t in THREADS:
            case = hb.HalfConvCase(*layer, t)
            for impl in ["lowprec"] + [b.name for b in AVAILABLE if b.applies(case)]:
                marks = [pytest.mark.slow] if layer in hb.CONV_LAYERS else []
                out.append(
                    pytest.param(case, impl, marks=marks, id=f"{case.group}|{impl}")
                )
    return out


@pytest.mark.parametrize(("case", "impl"), _conv_params())
def test_half_conv(benchmark, smoke, case, impl):
    if smoke:
        case = dataclasses.replace(
            case, batch=min(case.batch, 2), H=max(SMOKE_HW, case.k)
        )
    benchmark.group = case.group
    benchmark.extra_info.update(
        ops=case.ops, shape=case.shape, variant=case.variant, threads=case.threads
    )
    x = case.make_inputs()
    with lb.limit_threads(case.threads):
        if impl == "lowprec":
            fn = case.build_lowprec(x)
        else:
            fn = next(b for b in AVAILABLE if b.name == impl).build(case, x)
        out = fn()  # warm-up outside the timing
        if impl == "lowprec":
            assert out.shape == (case.batch, case.Mo, case.Ho, case.Ho)
        benchmark(fn)
