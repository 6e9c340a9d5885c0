"""Lazy CUDA support: recognising device arrays, ``device=`` handling, and the
numba-cuda / CuPy imports. Importing lowprec never imports numba.cuda or cupy;
they load here, on the first call that needs them.

Device arrays are

* anything exposing ``__cuda_array_interface__`` (CuPy, numba DeviceNDArray,
  PyTorch CUDA tensors), recognised without importing their library;
* the CUDA simulator's ``FakeCUDAArray`` (``NUMBA_ENABLE_CUDASIM=1``), which has
  no such attribute and is recognised by its class.
"""

from __future__ import annotations

import sys

import numpy as np

_INSTALL = 'install the CUDA extra: pip install "lowprec[cuda]"'


def is_device_array(x) -> bool:
    """True for CUDA device arrays (CAI objects, simulator arrays)."""
    if hasattr(x, "__cuda_array_interface__"):
        return True
    cls = type(x)
    return cls.__name__ == "FakeCUDAArray" and cls.__module__.startswith(
        "numba.cuda.simulator"
    )


def is_cupy(x) -> bool:
    # never imports cupy: a CuPy array exists only if cupy was imported
    cp = sys.modules.get("cupy")
    return cp is not None and isinstance(x, cp.ndarray)


def use_cuda(*arrays, device=None) -> bool:
    """Whether a call runs on the GPU.

    ``device=None`` follows the arrays (device arrays -> GPU); ``"cuda"`` forces
    the GPU (host arrays are copied there and back); ``"cpu"`` forces the host.
    Mixed host and device arrays are refused: lowprec never copies silently.
    """
    if device not in (None, "cpu", "cuda"):
        msg = f"device must be None, 'cpu' or 'cuda', got {device!r}"
        raise ValueError(msg)
    on_dev = [is_device_array(x) for x in arrays if x is not None]
    if any(on_dev) and not all(on_dev):
        msg = (
            "mixed host (NumPy) and device (CUDA) arrays; move them to one side "
            "first (cupy.asarray / numba.cuda.to_device, or .get() / "
            ".copy_to_host())"
        )
        raise TypeError(msg)
    if device == "cpu":
        if any(on_dev):
            msg = (
                "device='cpu' with CUDA device arrays; copy them to the host "
                "first (.get() / .copy_to_host()) or drop device="
            )
            raise TypeError(msg)
        return False
    return device == "cuda" or any(on_dev)


def cuda():
    """numba.cuda, checked usable: a GPU with a driver, or the simulator.

    Raises ImportError without numba-cuda and RuntimeError without a GPU.
    """
    try:
        from numba import cuda as nb_cuda
    except ImportError as e:  # pragma: no cover - depends on the install
        msg = f"the CUDA path needs numba-cuda ({e}); {_INSTALL}"
        raise ImportError(msg) from e
    if nb_cuda.config.ENABLE_CUDASIM:
        return nb_cuda
    if not nb_cuda.is_available():
        msg = (
            "device='cuda' (or a CUDA array) needs a usable NVIDIA GPU and driver, "
            "and numba.cuda.is_available() is False on this machine; run on the "
            "CPU (NumPy arrays, no device=) or test the CUDA path in the "
            "simulator with NUMBA_ENABLE_CUDASIM=1"
        )
        raise RuntimeError(msg)
    return nb_cuda


def as_kernel_array(x):
    """A numba device view of a device array (zero copy), or x itself."""
    if hasattr(x, "__cuda_array_interface__") and not _is_numba_device(x):
        return cuda().as_cuda_array(x)
    return x


def _is_numba_device(x) -> bool:
    return type(x).__module__.startswith("numba.cuda")


def is_c_contiguous(x) -> bool:
    method = getattr(x, "is_c_contiguous", None)  # numba DeviceNDArray
    if method is not None:
        return bool(method())
    return bool(x.flags["C_CONTIGUOUS"])  # the simulator's NumPy-backed arrays


def to_device(x: np.ndarray):
    return cuda().to_device(np.ascontiguousarray(x))


def to_host(x):
    """A parameter (scale, zero point, bias) given as a device array, on the host."""
    if is_cupy(x):
        return x.get()
    if is_device_array(x):
        return as_kernel_array(x).copy_to_host()
    return x


def empty_like_kind(like, shape, dtype):
    """(kernel array, returned array) for an output allocated like ``like``:
    CuPy in -> CuPy out; anything else -> a numba device array."""
    if is_cupy(like):
        import cupy

        out = cupy.empty(shape, dtype)
        return cuda().as_cuda_array(out), out
    out = cuda().device_array(shape, dtype)
    return out, out


def launch_1d(n: int, threads: int, max_blocks: int | None = None):
    blocks = max(1, -(-n // threads))
    if max_blocks is not None:
        blocks = min(blocks, max_blocks)
    return blocks, threads
