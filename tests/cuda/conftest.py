"""The CUDA tests run in their own pytest process:

    NUMBA_ENABLE_CUDASIM=1 pytest tests/cuda     kernels in the numba CUDA simulator
    LOWPREC_CUDA_TESTS=1 pytest tests/cuda       PTX/ptxas compile checks; on a
                                                 GPU machine also the kernels
The normal run (neither variable set) ignores this folder: the simulator must be
chosen before numba is imported, and it is slow (one OS thread per CUDA thread).
"""

import os
import sys

import numpy as np
import pytest

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
RUN = SIM or os.environ.get("LOWPREC_CUDA_TESTS") == "1"

collect_ignore_glob = [] if RUN else ["test_*.py"]
# the simulator stubs the compiler: compile checks need the real numba-cuda
collect_ignore = ["test_ptx_compile.py"] if SIM else []

if SIM:
    # the simulator's block manager polls under the GIL: a short switch interval
    # makes small blocks several times faster
    sys.setswitchinterval(1e-4)


def _atomic_shared_arrays():
    """numba-cuda's simulator (0.30) hands out a block's shared arrays with an
    unlocked get -> np.empty -> set on a dict keyed by the calling line: a thread
    switch inside that window gives two threads of one block two different
    arrays, and the kernel reads values another thread never wrote. It failed
    one CI run in six (tests/cuda/test_bf16_cuda.py, 36 of 117 outputs wrong);
    with a sleep forced into np.empty it failed 9 launches in 10. This is the
    same lookup, keyed the same way, made atomic (a threading.Lock here made
    the simulated suite 10x slower: 13 -> 139 s)."""
    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    original = kernelapi.FakeCUDAShared.array

    def array(self, shape, dtype, *args, **kwargs):
        if shape == 0 or args or kwargs:  # dynamic shared memory: no lookup
            return original(self, shape, dtype, *args, **kwargs)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        res = self._allocations.get(key)
        if res is None:
            # dict.setdefault is one step under the GIL (a tuple key hashes
            # in C): the first array stored wins, and every thread gets it
            res = self._allocations.setdefault(key, np.empty(shape, dtype))
        return res

    kernelapi.FakeCUDAShared.array = array


if SIM:
    _atomic_shared_arrays()


def pytest_collection_modifyitems(config, items):
    if not RUN:
        return
    try:
        from numba import cuda
    except ImportError as e:
        skip = pytest.mark.skip(
            reason=f'numba-cuda missing ({e}): pip install ".[cuda]"'
        )
        for item in items:
            item.add_marker(skip)
        return
    gpu = SIM or cuda.is_available()
    skip = pytest.mark.skip(reason="needs a GPU or NUMBA_ENABLE_CUDASIM=1")
    for item in items:
        if "cuda_exec" in item.keywords and not gpu:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_exec: launches kernels (GPU or simulator)")


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiny launch tunables: 13 x 11 @ 11 x 9 spans 2 x 2 blocks, 2 K stages and
    edge tiles in every direction (the same for the FP16 GEMM and the implicit
    GEMM convolutions); SpMM blocks hold 3 rows x 8 columns; 1-D kernels run
    several blocks with a grid-stride loop."""
    from lowprec.kernels import config_cuda as cfg

    for name, value in {
        "BLOCK_M": 8,
        "BLOCK_N": 8,
        "BLOCK_KW": 2,
        "THREADS_M": 4,
        "THREADS_N": 4,
        "SMEM_PAD": 1,
        "THREADS_1D": 8,
        "MAX_BLOCKS_1D": 3,
        "FP16_BLOCK_M": 8,
        "FP16_BLOCK_N": 8,
        "FP16_BLOCK_K": 4,
        "FP16_THREADS_M": 4,
        "FP16_THREADS_N": 4,
        "FP16_SMEM_PAD": 1,
        "SPMM_ROWS": 3,
        "SPMM_THREADS": 4,
        "SPMM_VN": 2,
    }.items():
        monkeypatch.setattr(cfg, name, value)
    return cfg
