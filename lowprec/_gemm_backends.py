"""Host-side drivers for the INT8 GEMM paths (see ``_dispatch`` for the interface).

Each backend provides
    name, k_min         K below k_min is zero-padded (A copied)
    takes_int8          fused() accepts int8 a and forms a' = a + 128 itself
    tile                the (rows, cols) of one thread's int32 scratch tile
                        (None: the backend needs no scratch)
    pack(b_s8)          its weight layout of b' (K, N) int8
    gemm(a, packed, p)  raw P = a' @ b' into int32 p            (eq. 6)
    fused(a, packed, scratch, epi, out, serial, pmax)
                        eq. 6 and the epilogue (eqs. 8-13) in one pass per tile;
                        pmax: a bound on |P| from the weights, or -1
"""

from __future__ import annotations

import functools

import numba
import numpy as np

from . import _dispatch
from .kernels import config
from .kernels import int8_gemm as _portable


class PortableGemm:
    """Plain numba loops; exact on every CPU. ~20-50 GOP/s per core."""

    name = "portable"
    k_min = 0
    takes_int8 = False

    tile = (config.TILE_M, config.TILE_N)

    @staticmethod
    def pack(b_s8: np.ndarray) -> np.ndarray:
        # b' (K,N) int8 row-major is already this path's layout
        return b_s8

    @staticmethod
    def gemm(a_u8: np.ndarray, packed: np.ndarray, out: np.ndarray) -> None:
        _portable.gemm_u8s8(a_u8, packed, out, config.TILE_M, config.TILE_N)

    @staticmethod
    def fused(a_u8, packed, scratch, epi, out, serial=False, pmax=-1):
        fn = _portable.gemm_fused_serial if serial else _portable.gemm_fused
        fn(a_u8, packed, scratch[:1] if serial else scratch, epi, out)


@functools.cache
def _vnni():
    # imported on first use: building the llvmlite intrinsics costs ~0.1 s
    from .kernels import int8_gemm_vnni

    return int8_gemm_vnni


class Avx512VnniGemm:
    """6x64 register tiles of vpdpbusd zmm (kernels/int8_gemm_vnni.py)."""

    name = "avx512_vnni"
    k_min = 4  # K tails are read in place from the last 4 bytes of each row
    takes_int8 = True  # measured: the copy pass cost up to 30% at N = 64

    tile = None  # the epilogue runs on the accumulators: no int32 scratch

    @staticmethod
    def pack(b_s8: np.ndarray) -> np.ndarray:
        k = _vnni()
        return k.pack_b(b_s8)

    @staticmethod
    def gemm(a_u8: np.ndarray, packed: np.ndarray, out: np.ndarray) -> None:
        k = _vnni()
        k.gemm(a_u8, packed, out)

    @staticmethod
    def fused(a_u8, packed, scratch, epi, out, serial=False, pmax=-1):
        k = _vnni()
        if out.shape[1] > 1 and out.strides[1] != out.itemsize:
            # the tile stores vectors: columns must be contiguous
            tmp = np.empty(out.shape, out.dtype)
            Avx512VnniGemm.fused(a_u8, packed, scratch, epi, tmp, serial, pmax)
            out[...] = tmp
        elif serial:
            k.gemm_fused_serial(a_u8, packed, epi, out, pmax)
        else:
            k.gemm_fused(a_u8, packed, epi, out, _dispatch.num_threads(), pmax)


@functools.cache
def _ymm():
    from .kernels import int8_gemm_ymm

    return int8_gemm_ymm


def _readonly(x):
    # the fused drivers take their read-only inputs as read-only arrays (one
    # compiled variant for every caller: see gemm._ro)
    view = x.view()
    view.flags.writeable = False
    return view


class _YmmGemm:
    """Shared driver of the 256-bit paths (kernels/int8_gemm_ymm.py)."""

    name = ""
    path = 0
    k_min = 4  # K tails are read in place from the last 4 bytes of each row
    takes_int8 = False

    @classmethod
    def pack(cls, b_s8: np.ndarray) -> np.ndarray:
        return _ymm().pack_b(b_s8, cls.tile[1])

    @classmethod
    def fused(cls, a_u8, packed, scratch, epi, out, serial=False, pmax=-1):
        k = _ymm()
        fn = k.gemm_fused_serial if serial else k.gemm_fused
        fn(cls.path, a_u8, packed, scratch[:1] if serial else scratch, epi, out)

    @classmethod
    def gemm(cls, a_u8: np.ndarray, packed: np.ndarray, out: np.ndarray) -> None:
        # the raw product is the fused epilogue with every correction zero
        M, N = out.shape
        if a_u8.shape[1] < cls.k_min:
            padded = np.zeros((M, cls.k_min), np.uint8)
            padded[:, : a_u8.shape[1]] = a_u8
            a_u8 = padded
        z1 = _readonly(np.zeros(1, np.int64))
        zn = _readonly(np.zeros(N, np.int64))
        cls.fused(
            _readonly(np.ascontiguousarray(a_u8)), packed,
            np.empty((numba.config.NUMBA_NUM_THREADS, *cls.tile), np.int32),
            (z1, z1, zn, zn, zn, _readonly(np.ones((1, 1))), 0.0, 0.0, 0.0, 0,
             _readonly(np.zeros(1, np.float32))),
            out,
        )  # fmt: skip


class AvxVnniGemm(_YmmGemm):
    """6x16 register tiles of vpdpbusd ymm (AVX-VNNI; EVEX form on AVX-512)."""

    name = "avx_vnni"
    path = 0
    tile = (6, 16)


class Avx2Gemm(_YmmGemm):
    """4x8 register tiles of exact vpmaddwd (no VNNI, no 16-bit saturation)."""

    name = "avx2"
    path = 1
    tile = (4, 8)


BACKENDS = {
    "avx512_vnni": Avx512VnniGemm,
    "avx_vnni": AvxVnniGemm,
    "avx2": Avx2Gemm,
    "portable": PortableGemm,
}
