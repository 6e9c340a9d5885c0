"""Test helper: arrays that end right before a page no access may touch."""

import numpy as np


def guarded(count, dtype, keep):
    """count dtype items ending right before a PROT_NONE page: a read past the
    end faults (the test process dies) rather than reading unused bytes. The
    mapping is appended to keep (alive for the caller's test)."""
    import ctypes
    import mmap

    dt = np.dtype(dtype)
    page = mmap.PAGESIZE
    nbytes = count * dt.itemsize
    size = -(-nbytes // page) * page
    buf = mmap.mmap(-1, size + page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    assert libc.mprotect(base + size, page, 0) == 0  # PROT_NONE
    keep.append(buf)
    return np.frombuffer(buf, dt, count=count, offset=size - nbytes)
