"""Which instruction-set path runs the INT8 GEMM.

The host's CPU features (as LLVM reports them through llvmlite) decide the path
at first use; ``LOWPREC_ISA=<name>`` in the environment or :func:`set_isa`
override it, so tests can force every path the machine supports in turn.
A path is a backend object with a small interface (see ``_gemm_backends``):

    k_align              A's K is zero-padded to a multiple of this
    pack(b_s8) -> obj    the backend's weight layout, built once per weight
    gemm(a_u8, obj, out) P = a' @ b' (docs/quantization.md, eq. 6) into int32 out
"""

from __future__ import annotations

import functools
import os

# Most capable first. Each entry: alternative sets of LLVM feature names, any
# one of which suffices. The 256-bit vpdpbusd of avx_vnni is VEX-encoded on
# AVX-VNNI CPUs and EVEX-encoded on AVX-512 VNNI CPUs (LLVM picks).
ISA_REQUIREMENTS = {
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
    return any(all(f in feats for f in alt) for alt in ISA_REQUIREMENTS[name])


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


def gemm_backend():
    """The backend object of the path in use (cached: called on every GEMM)."""
    global _backend
    if _backend is None:
        from ._gemm_backends import BACKENDS

        _backend = BACKENDS[get_isa()]
    return _backend


def call_on_threads(threads: int, kernel, *args):
    """kernel(*args), with numba's thread count set to 1 for the call when
    ``threads == 1``: a parallel region waits for every pool thread even with
    one task, which costs milliseconds per call when the other core is busy
    (measured: a 512x512 sparse GEMV, 3.4 ms instead of 10 us)."""
    import numba

    if threads != 1 or numba.get_num_threads() == 1:
        return kernel(*args)
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(before)
