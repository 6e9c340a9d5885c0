"""pytest-benchmark: sparse-weight GEMM (lowprec.sparse) against its baselines.

Cases come from lowprec._bench_sparse (the `sparse` suite of `lowprec bench`).
Tiny shapes: under the default `--benchmark-disable` each runs once as a smoke
test; `pytest bench/bench_sparse.py --benchmark-enable` measures them.
For real numbers use `python -m lowprec._bench_sparse` (1024x1024 and up).
"""

import functools
import importlib.util

import pytest

from lowprec import _bench_sparse as bs
from lowprec import bench as lb

CASES = [
    bs.SparseCase(128, 256, n, s, var, 1)
    for var in ("fp32 csr", "fp16 csr", "fp32 bsr4x1", "fp32 nm24", "int8 bsr1x4")
    for s in (0.7, 0.9)
    for n in (1, 32)
]


def _available(b):
    return all(importlib.util.find_spec(m) is not None for m in b.requires)


@functools.lru_cache(maxsize=64)
def _inputs(case):
    return case.make_inputs()


def _params():
    out = []
    for case in CASES:
        impls = ["lowprec"] + [b.name for b in bs.BASELINES if _available(b)]
        out += [pytest.param(case, impl, id=f"{case.group}|{impl}") for impl in impls]
    return out


@pytest.mark.parametrize(("case", "impl"), _params())
def test_sparse_gemm(benchmark, case, impl):
    x = _inputs(case)
    if impl == "lowprec":
        fn = case.build_lowprec(x)
    else:
        try:
            fn = {b.name: b for b in bs.BASELINES}[impl].build(case, x)
        except lb.Unsupported as e:
            pytest.skip(str(e))
    benchmark.group = case.group
    benchmark.extra_info.update(ops=case.ops, nnz=x.nnz, variant=case.variant)
    with lb.limit_threads(case.threads):
        benchmark(fn)
