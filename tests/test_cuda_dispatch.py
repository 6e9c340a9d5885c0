"""The CUDA dispatch helpers in the normal (CPU) run: lowprec never imports
numba.cuda or cupy by itself, device arrays are recognised without importing
their library, and device="cuda" without a GPU fails clearly."""

import subprocess
import sys

import numpy as np
import pytest

from lowprec import _cuda


class _CAI:
    """A test double: anything with __cuda_array_interface__ is a device array."""

    __cuda_array_interface__ = {"shape": (2,), "typestr": "|u1", "version": 3}


def test_import_does_not_load_cuda_libraries():
    code = (
        "import sys, numpy as np, lowprec; lowprec.matmul_integer("
        "np.ones((2, 2), np.uint8), np.ones((2, 2), np.int8)); "
        "bad = [m for m in ('numba.cuda', 'cupy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_device_arrays_are_recognised():
    host = np.zeros(2, np.uint8)
    assert _cuda.is_device_array(_CAI())
    assert not _cuda.is_device_array(host)
    assert _cuda.use_cuda(_CAI(), _CAI())
    assert not _cuda.use_cuda(host, host)
    assert _cuda.use_cuda(host, device="cuda")
    with pytest.raises(TypeError, match="mixed host"):
        _cuda.use_cuda(host, _CAI())
    with pytest.raises(TypeError, match="device='cpu'"):
        _cuda.use_cuda(_CAI(), device="cpu")
    with pytest.raises(ValueError, match="device must be"):
        _cuda.use_cuda(host, device="gpu")


def test_cuda_without_gpu_is_a_clear_error():
    try:
        from numba import cuda
    except ImportError:
        with pytest.raises(ImportError, match=r"lowprec\[cuda\]"):
            _cuda.cuda()
        return
    if cuda.config.ENABLE_CUDASIM or cuda.is_available():
        pytest.skip("a GPU (or the simulator) is available here")
    with pytest.raises(RuntimeError, match="needs a usable NVIDIA GPU"):
        _cuda.cuda()
