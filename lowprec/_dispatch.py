"""Which instruction-set path runs the INT8 GEMM.

The host's CPU features (as LLVM reports them through llvmlite) decide the path
at first use; ``LOWPREC_ISA=<name>`` in the environment or :func:`set_isa`
override it, so tests can force every path the machine supports in turn.
A path is a backend object with a small interface (see ``_gemm_backends``):

    k_min                A's K is zero-padded to at least this
    pack(b_s8) -> obj    the backend's weight layout, built once per weight
    gemm(a_u8, obj, out) P = a' @ b' (docs/quantization.md, eq. 6) into int32 out
"""

from __future__ import annotations

import functools
import math
import os
import threading

# Most capable first. Each entry: alternative sets of LLVM feature names, any
# one of which suffices. The 256-bit vpdpbusd of avx_vnni is VEX-encoded on
# AVX-VNNI CPUs and EVEX-encoded on AVX-512 VNNI CPUs (LLVM picks).
ISA_REQUIREMENTS = {
    "amx": (("amx-tile", "amx-int8", "avx512f", "avx512bw", "avx512vl", "avx512vnni"),),
    "avx512_vnni": (("avx512f", "avx512bw", "avx512vl", "avx512vnni"),),
    "avx_vnni": (("avx2", "avxvnni"), ("avx2", "avx512vl", "avx512vnni")),
    "avx2": (("avx2",),),
    "portable": ((),),
}
ENV_VAR = "LOWPREC_ISA"

_selected: str | None = None
_backend = None


@functools.cache
def host_features() -> frozenset[str]:
    import llvmlite.binding as llvm

    feats = llvm.get_host_cpu_features()
    return frozenset(name for name, on in feats.items() if on)


def implemented_isas() -> tuple[str, ...]:
    from ._gemm_backends import BACKENDS

    return tuple(name for name in ISA_REQUIREMENTS if name in BACKENDS)


def available_isas() -> tuple[str, ...]:
    """The paths lowprec implements that this CPU can run, best first."""
    return tuple(name for name in implemented_isas() if _supported(name))


def _supported(name: str) -> bool:
    feats = host_features()
    if not any(all(f in feats for f in alt) for alt in ISA_REQUIREMENTS[name]):
        return False
    return name != "amx" or amx_permitted()


# Linux hands a process the AMX tile registers only when asked
# (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)); a tile instruction
# without that permission kills the process with SIGILL.
_ARCH_PRCTL = 158  # x86-64 syscall number
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


@functools.cache
def amx_permitted() -> bool:
    """Ask the kernel for the AMX tile state (once per process); whether the
    amx path may run here."""
    import ctypes
    import platform
    import sys

    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.syscall(_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
    except (OSError, AttributeError):
        return False
    return rc == 0


def zmm_isa() -> bool:
    """Whether the path in use has the AVX-512 VNNI kernels (amx runs them
    beside its own GEMM and convolution tiles: small GEMMs and convolutions,
    depthwise convolutions, sparse and n-bit kernels)."""
    return get_isa() in ("amx", "avx512_vnni")


def _check(name: str, source: str) -> str:
    if name not in ISA_REQUIREMENTS:
        msg = (
            f"{source}={name!r} is not an instruction-set path; choose one of "
            f"{', '.join(ISA_REQUIREMENTS)}"
        )
        raise ValueError(msg)
    if name not in implemented_isas():
        msg = (
            f"{source}={name!r} is not implemented in this lowprec version; "
            f"available here: {', '.join(available_isas())}"
        )
        raise ValueError(msg)
    if name not in available_isas():
        need = " or ".join("+".join(alt) for alt in ISA_REQUIREMENTS[name])
        msg = (
            f"{source}={name!r} needs CPU features {need}, which this CPU lacks; "
            f"available here: {', '.join(available_isas())}"
        )
        raise ValueError(msg)
    return name


def get_isa() -> str:
    """The instruction-set path in use (chosen on first call)."""
    global _selected
    if _selected is None:
        env = os.environ.get(ENV_VAR, "").strip()
        _selected = _check(env, ENV_VAR) if env else available_isas()[0]
    return _selected


def set_isa(name: str | None) -> str:
    """Force a path (``None``: back to the environment / best available).

    Returns the path now in use. Raises ValueError for a path this CPU or this
    build cannot run.
    """
    global _selected, _backend
    _selected = None if name is None else _check(name, "isa")
    _backend = None
    return get_isa()


# avx2: GEMMs of at most AVX2_GEMV_ROWS rows run on int8_gemm_ymm.gemv_nibble:
# int8 weights (half the bytes of the avx2 tiles' int16 ones), vpmaddubsw on
# the activations' nibbles summed in int16 lanes. Measured on an AVX2 Zen 3, 1
# thread, best of 5 alternating, us a call (int16 tiles / the avx_vnni tiles'
# nibble form, which ran these before / gemv_nibble; ORT MatMulInteger exact):
# 1 x 768 x 3072 120 / 122 / 71 (68), 1 x 1024 x 1024 63 / 59 / 35 (51),
# 2 x 768 x 3072 142 / 180 / 103 (91), 1 x 64 x 64 8 / 10 / 8 (9); at 4 rows the
# tile spills and the int16 tiles win (196 / 210 us at 4 x 768 x 3072). Weights
# called with both few and many rows keep both layouts in their pack (int8 and
# int16: 3 bytes a weight, besides b' itself).
AVX2_GEMV_ROWS = 2
# amx: GEMMs of fewer rows run on the avx512_vnni tiles (an AMX tile computes
# 16 rows whatever M is).
AMX_MIN_ROWS = 16


def gemm_backend(M: int | None = None):
    """The backend object of the path in use (cached: called on every GEMM);
    with M (the GEMM's rows), the one that runs it."""
    global _backend
    backend = _backend  # (one read: set_isa on another thread resets it)
    if backend is None:
        from ._gemm_backends import BACKENDS

        backend = _backend = BACKENDS[get_isa()]
    if M is not None and (
        (M <= AVX2_GEMV_ROWS and backend.name == "avx2")
        or (M < AMX_MIN_ROWS and backend.name == "amx")
    ):
        # asked of the backend, not imported here: 1.6 -> 0.2 us a call
        return backend.gemv_backend()
    return backend


_num_threads = None


def num_threads() -> int:
    """``numba.get_num_threads()`` (this thread's count), without its per-call
    pool start-up check once the pool runs: numba's own ctypes getter, 1.3 ->
    ~0.3 us, on every small GEMM and convolution call. Falls back to the public
    function if numba's internals differ."""
    global _num_threads
    get = _num_threads
    if get is None:
        import numba

        n = numba.get_num_threads()  # starts the pool (once)
        try:
            from numba.np.ufunc.parallel import _get_num_threads as get
        except ImportError:  # pragma: no cover - numba internals moved
            get = numba.get_num_threads
        if not callable(get) or get() != n:  # pragma: no cover
            get = numba.get_num_threads
        _num_threads = get
        return n
    return get()


def call_on_threads(threads: int, kernel, *args):
    """kernel(*args), with numba's thread count set to 1 for the call when
    ``threads == 1``: a parallel region waits for every pool thread even with
    one task, which costs milliseconds per call when the other core is busy
    (measured: a 512x512 sparse GEMV, 3.4 ms instead of 10 us)."""
    import numba

    if threads != 1:
        return kernel(*args)
    before = num_threads()  # (numba.get_num_threads: ~1.3 us of a small call)
    if before == 1:
        return kernel(*args)
    numba.set_num_threads(1)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(before)


# Per-thread scratch reused across calls. A fresh multi-megabyte numpy array
# is a fresh mmap on Linux: its first touch page-faults inside the kernel, and
# two threads faulting at once serialize on the process's memory map. Measured
# on the batch-8 3x3 convolution, 2 threads: 6.3 ms per call with fresh input
# scratch and output, 3.2 ms with both reused. Per Python thread, so that
# concurrent calls (the kernels release the GIL) never share a buffer.
_scratch = threading.local()
SCRATCH_MAX_BYTES = 64 << 20  # larger requests are not kept


def scratch(name: str, shape, dtype):
    """An uninitialised C-contiguous array of ``shape``/``dtype`` on 64-byte
    alignment, backed by this thread's buffer ``name`` (grown as needed). Valid
    until the next request of the same name on the same thread. A request
    like the last one of its name gets the same array back (0.1 us, against
    1.8 for a new view: engines call one layer shape after another)."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    key = (shape, dtype)
    hit = bufs.get(name)
    if hit is not None and hit[2] == key:
        return hit[3]
    import numpy as np

    dt = np.dtype(dtype)
    count = shape if isinstance(shape, int) else math.prod(shape)
    nbytes = count * dt.itemsize
    raw, off = (None, 0) if hit is None else hit[:2]
    if raw is None or raw.size < nbytes + 64:
        raw = np.empty(nbytes + 64, np.uint8)
        off = (-raw.ctypes.data) % 64
    view = raw[off : off + nbytes].view(dt).reshape(shape)
    if nbytes <= SCRATCH_MAX_BYTES:
        bufs[name] = (raw, off, key, view)
    return view
