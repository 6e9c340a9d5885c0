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


def _via_contiguous(fused, a_u8, packed, scratch, epi, out, serial, pmax):
    """The register-epilogue tiles store whole vectors: columns must be
    contiguous. For an output whose columns are not, run `fused` into a
    temporary and copy it over; returns whether it did (or whether there is
    nothing to compute)."""
    if out.size == 0:
        return True  # nothing to compute (numpy gives empty arrays 0 strides)
    if out.shape[1] <= 1 or out.strides[1] == out.itemsize:
        return False
    tmp = np.empty(out.shape, out.dtype)
    fused(a_u8, packed, scratch, epi, tmp, serial, pmax)
    out[...] = tmp
    return True


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
        if _via_contiguous(Avx512VnniGemm.fused, a_u8, packed, scratch, epi, out,
                           serial, pmax):  # fmt: skip
            return
        if serial:
            k.gemm_fused_serial(a_u8, packed, epi, out, pmax)
        else:
            k.gemm_fused(a_u8, packed, epi, out, _dispatch.num_threads(), pmax)


@functools.cache
def _amx():
    from .kernels import int8_gemm_amx

    return int8_gemm_amx


class AmxGemm:
    """32 x 64 blocks of AMX tdpbusd tiles with the zmm path's fused epilogue
    (kernels/int8_gemm_amx.py); _dispatch.gemm_backend gives GEMMs of fewer
    than AMX_MIN_ROWS rows to the avx512_vnni tiles."""

    name = "amx"
    k_min = 0  # fused() pads K to a multiple of 64 itself
    # int8 a is flipped to a' as the kernel copies its row blocks to scratch
    # (3136x576x64 s8s8, 1 thread: 463 -> 186 us without prepare_a's pass)
    takes_int8 = True
    tile = None

    @staticmethod
    def pack(b_s8: np.ndarray) -> np.ndarray:
        return _amx().pack_b(b_s8)

    # dynamic_quantize_matmul hands fused() float32 a with its scale and zero
    # point (af, qp) where quantizes_a says so: the row copies quantize it
    # (int8_gemm_amx._copy_rows)
    @staticmethod
    def quantizes_a(M, packed, serial):
        """Whether each row of a would be quantized once: one thread, or row
        blocks to share among the threads (with one block every thread
        would quantize all of a: 128x768x768 on 2 threads lost 9 %)."""
        if serial:
            return True
        threads = _dispatch.num_threads()
        return _amx().block_rows(M, 4 * packed.shape[1], threads) < M

    @staticmethod
    def fused(a_u8, packed, scratch, epi, out, serial=False, pmax=-1, af=None,
              qp=None):  # fmt: skip
        k = _amx()
        if af is None:
            af, qp = _NO_AF, _NO_QP
        elif out.shape[1] > 1 and out.strides[1] != out.itemsize:
            msg = "fused(af=...) needs an output with contiguous columns"
            raise ValueError(msg)
        if _via_contiguous(AmxGemm.fused, a_u8, packed, scratch, epi, out, serial,
                           pmax):  # fmt: skip
            return
        # per-thread scratch for a' row blocks (padded, aligned) where the
        # tiles cannot read a' in place
        kp = 4 * packed.shape[1]
        threads = 1 if serial else _dispatch.num_threads()
        rows = k.block_rows(a_u8.shape[0], kp, threads)
        pad = _dispatch.scratch("amx.a", (threads, rows, kp), np.uint8)
        flip = 0x80 if a_u8.dtype == np.int8 else 0
        if flip:
            a_u8 = _readonly(a_u8.view(np.uint8))
        if serial:
            k.gemm_fused_serial(a_u8, flip, pad, packed, epi, out, pmax, af, qp)
        else:
            k.gemm_fused(a_u8, flip, pad, packed, epi, out, threads, pmax, af, qp)

    @classmethod
    def gemm(cls, a_u8: np.ndarray, packed: np.ndarray, out: np.ndarray) -> None:
        _raw_product(cls, a_u8, packed, out)

    @staticmethod
    def gemv_backend():
        """What _dispatch.gemm_backend runs few-row GEMMs on."""
        return Avx512VnniGemm


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


# AmxGemm.fused's af / qp when a is not quantized as it is copied
_NO_AF = _readonly(np.empty((0, 0), np.float32))
_NO_QP = _readonly(np.zeros(2))


class AvxVnniGemm:
    """6x16 register tiles of vpdpbusd ymm (AVX-VNNI; EVEX form on AVX-512),
    an int32 scratch tile per thread and the numba epilogue."""

    name = "avx_vnni"
    k_min = 4  # K tails are read in place from the last 4 bytes of each row
    takes_int8 = False
    tile = (6, 16)

    @classmethod
    def pack(cls, b_s8: np.ndarray) -> np.ndarray:
        return _ymm().pack_b(b_s8, cls.tile[1])

    @classmethod
    def fused(cls, a_u8, packed, scratch, epi, out, serial=False, pmax=-1):
        k = _ymm()
        if serial:
            k.gemm_fused_serial(a_u8, packed, scratch[:1], epi, out)
        else:
            threads = _dispatch.num_threads()
            k.gemm_fused(a_u8, packed, scratch, epi, out, threads)

    @classmethod
    def gemm(cls, a_u8: np.ndarray, packed: np.ndarray, out: np.ndarray) -> None:
        _raw_product(cls, a_u8, packed, out)


def _raw_product(cls, a_u8, packed, out):
    # the raw product P (the K-chunked path) is the fused epilogue with every
    # correction zero and int32 output
    M, N = out.shape
    if a_u8.shape[1] < cls.k_min:
        padded = np.zeros((M, cls.k_min), np.uint8)
        padded[:, : a_u8.shape[1]] = a_u8
        a_u8 = padded
    z1 = _readonly(np.zeros(1, np.int64))
    zn = _readonly(np.zeros(N, np.int64))
    scratch = None
    if cls.tile is not None:
        scratch = np.empty((numba.config.NUMBA_NUM_THREADS, *cls.tile), np.int32)
    cls.fused(
        _readonly(np.ascontiguousarray(a_u8)), packed, scratch,
        (z1, z1, zn, zn, zn, _readonly(np.ones((1, 1))), 0.0, 0.0, 0.0, 0,
         _readonly(np.zeros(N, np.float32))),
        out,
    )  # fmt: skip


class Avx2Gemm:
    """6x16 register tiles of exact vpmaddwd (no VNNI, no 16-bit saturation)
    on int16 B widened at pack time and A widened per call, with the zmm path's
    fused epilogue on the accumulators (kernels/int8_gemm_ymm.py)."""

    name = "avx2"
    k_min = 1  # pack_a16 pads K itself
    takes_int8 = False
    tile = None  # the epilogue runs on the accumulators: no int32 scratch

    @staticmethod
    def pack(b_s8: np.ndarray) -> np.ndarray:
        return _ymm().pack_b16(b_s8, _ymm().AVX2_NR)

    @staticmethod
    def fused(a_u8, packed, scratch, epi, out, serial=False, pmax=-1):
        k = _ymm()
        if _via_contiguous(Avx2Gemm.fused, a_u8, packed, scratch, epi, out, serial,
                           pmax):  # fmt: skip
            return
        # the tile reads a' widened to uint16 in row blocks (int8_gemm_ymm.pack_a16,
        # inside the driver): one pass per call, M x K against the tiles' M x N x K
        a16 = _dispatch.scratch("avx2.a16", k.a16_shape(*a_u8.shape), np.uint16)
        if serial:
            k.gemm_avx2_serial(a_u8, a16, packed, epi, out, pmax)
        else:
            k.gemm_avx2(a_u8, a16, packed, epi, out, _dispatch.num_threads(), pmax)

    @classmethod
    def gemm(cls, a_u8: np.ndarray, packed: np.ndarray, out: np.ndarray) -> None:
        _raw_product(cls, a_u8, packed, out)

    @staticmethod
    def gemv_backend():
        """What _dispatch.gemm_backend runs few-row GEMMs on."""
        return Avx2GemvGemm


class Avx2GemvGemm:
    """GEMVs on AVX2: int8 weights in avx_vnni's layout, vpmaddubsw on a's
    nibbles summed in int16, the zmm path's fused epilogue, rows in tiles of
    int8_gemm_ymm.GEMV_MR (kernels/int8_gemm_ymm.py, gemv_nibble).
    _dispatch.gemm_backend picks it for at most AVX2_GEMV_ROWS rows on the
    avx2 path."""

    name = "avx2_gemv"
    k_min = 1  # split_nibbles pads K itself
    takes_int8 = True  # split_nibbles flips int8 bytes itself
    tile = None

    @staticmethod
    def pack(b_s8: np.ndarray) -> np.ndarray:
        k = _ymm()
        return k.pack_b(b_s8, k.GEMV_NR)

    @staticmethod
    def fused(a_u8, packed, scratch, epi, out, serial=False, pmax=-1):
        k = _ymm()
        if _via_contiguous(Avx2GemvGemm.fused, a_u8, packed, scratch, epi, out,
                           serial, pmax):  # fmt: skip
            return
        M, K = a_u8.shape
        flip = 0x80 if a_u8.dtype == np.int8 else 0
        nib = _dispatch.scratch("avx2.nib", (M, 2, 4 * packed.shape[1]), np.uint8)
        if a_u8.dtype != np.uint8 or a_u8.flags.writeable:
            a_u8 = _readonly(a_u8.view(np.uint8))
        fn = k.gemv_nibble_serial if serial else k.gemv_nibble
        fn(a_u8, flip, nib, packed, epi, out, pmax, K)

    @classmethod
    def gemm(cls, a_u8: np.ndarray, packed: np.ndarray, out: np.ndarray) -> None:
        _raw_product(cls, a_u8, packed, out)


BACKENDS = {
    "amx": AmxGemm,
    "avx512_vnni": Avx512VnniGemm,
    "avx_vnni": AvxVnniGemm,
    "avx2": Avx2Gemm,
    "portable": PortableGemm,
    # not an instruction-set path: what avx2 runs few-row GEMMs on
    "avx2_gemv": Avx2GemvGemm,
}
