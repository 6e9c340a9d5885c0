"""pytest-benchmark: lowprec's INT8 convolution against installed baselines.

The cases are lowprec._bench_conv's (the `lowprec bench --suite int8_conv`
layers). Under the default `--benchmark-disable` each runs once as a smoke test
on tiny layers (the quick ones); `pytest bench --benchmark-enable` measures.
"""

import functools

import numba
import pytest

from lowprec import _bench_conv as bc
from lowprec import bench as lb

THREADS = [t for t in (1, 2) if t <= numba.config.NUMBA_NUM_THREADS]


def _params():
    out = []
    for layer in bc.QUICK_LAYERS:
        for variant in bc.VARIANTS:
            for t in THREADS:
                case = bc.ConvCase(*layer, variant, t)
                impls = ["lowprec"] + [b.name for b in bc.BASELINES]
                for impl in impls:
                    out.append(pytest.param(case, impl, id=f"{case.group}|{impl}"))
    return out


@functools.lru_cache(maxsize=8)
def _inputs(case):
    return case.make_inputs()


@pytest.mark.parametrize(("case", "impl"), _params())
def test_int8_conv(benchmark, case, impl):
    benchmark.group = case.group
    benchmark.extra_info.update(ops=case.ops, shape=case.shape, threads=case.threads)
    x = _inputs(case)
    with lb.limit_threads(case.threads):
        if impl == "lowprec":
            fn = case.build_lowprec(x)
        else:
            b = next(b for b in bc.BASELINES if b.name == impl)
            for mod in b.requires:
                pytest.importorskip(mod)
            try:
                fn = b.build(case, x)
            except lb.Unsupported as e:
                pytest.skip(str(e))
        fn()
        benchmark(fn)
