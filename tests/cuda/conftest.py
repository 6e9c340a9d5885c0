"""The CUDA tests run in their own pytest process:

    NUMBA_ENABLE_CUDASIM=1 pytest tests/cuda     kernels in the numba CUDA simulator
    LOWPREC_CUDA_TESTS=1 pytest tests/cuda       PTX/ptxas compile checks; on a
                                                 GPU machine also the kernels
The normal run (neither variable set) ignores this folder: the simulator must be
chosen before numba is imported, and it is slow (one OS thread per CUDA thread).
"""

import os
import sys

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
