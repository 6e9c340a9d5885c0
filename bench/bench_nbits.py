"""pytest-benchmark: sub-byte weights (lowprec.nbits) against their baselines.

Cases come from lowprec._bench_nbits (the `nbits` suite of `lowprec bench`).
Small shapes: under the default `--benchmark-disable` each runs once as a smoke
test; `pytest bench/bench_nbits.py --benchmark-enable` measures them. For real
numbers use `lowprec bench --suite nbits` (4096x4096 and 4096x11008).
"""

import functools
import importlib.util

import pytest

from lowprec import _bench_nbits as bn
from lowprec import bench as lb

CASES = [bn.NBitsCase(m, 512, 256, var, 1) for var in bn.VARIANTS for m in (1, 4)]


def _available(b):
    return all(importlib.util.find_spec(m) is not None for m in b.requires)


@functools.lru_cache(maxsize=16)
def _inputs(case):
    return case.make_inputs()


def _params():
    out = []
    for case in CASES:
        impls = ["lowprec"] + [b.name for b in bn.BASELINES if _available(b)]
        out += [pytest.param(case, impl, id=f"{case.group}|{impl}") for impl in impls]
    return out


@pytest.mark.parametrize(("case", "impl"), _params())
def test_nbits(benchmark, case, impl):
    x = _inputs(case)
    if impl == "lowprec":
        fn = case.build_lowprec(x)
    else:
        try:
            fn = {b.name: b for b in bn.BASELINES}[impl].build(case, x)
        except lb.Unsupported as e:
            pytest.skip(str(e))
    benchmark.group = case.group
    benchmark.extra_info.update(ops=case.ops, variant=case.variant)
    with lb.limit_threads(case.threads):
        benchmark(fn)
