"""INT8 GEMM on NVIDIA GPUs (numba-cuda), with the epilogue of kernels/requant.py.

    P[m, n]   = sum_k a'[m, k] * b'[k, n]                        (docs eq. 6)
    acc[m, n] = P - ZA[m] * colsum_b'[n] - ZB[n] * rowsum[m] + bias[n]   (eq. 8)
    out       = int32 acc | sat(rint(acc * mult + zy)) | float32(acc * mult)

a (M, K) and b (K, N) arrive raw (uint8 or int8, any strides). The sign flips of
eq. 5 (a' = a + a_off as uint8, b' = b - b_off as int8) happen while a tile is
staged in shared memory, packed four K values to a 32-bit word, so the inner
loop is one ``dp4a.u32.s32`` per multiply of four. Out-of-range rows, columns
and K positions are staged as 0, which contributes nothing to P.

Block tiling (kernels/config_cuda.py): a block owns a BM x BN output tile; thread
(ty, tx) owns rows ty + i*TM and columns tx + j*TN (i < BM/TM, j < BN/TN), so a
warp reads 16 consecutive B words (no bank conflicts) and two broadcast A words,
and writes 16 consecutive outputs per row (coalesced).
"""

import functools

import numpy as np
from numba import cuda

from .cuda_intrinsics import dp4a, mul_rn, rint


@functools.cache
def gemm_kernel(bm, bn, bkw, tm, tn, pad):
    """The fused GEMM kernel for one tile configuration (config_cuda)."""
    if bm % tm or bn % tn:
        msg = (
            f"BLOCK_M={bm}, BLOCK_N={bn} must be multiples of "
            f"THREADS_M={tm}, THREADS_N={tn}"
        )
        raise ValueError(msg)
    rm = bm // tm
    rn = bn // tn
    nthreads = tm * tn
    a_words = bm * bkw
    b_words = bn * bkw
    kstep = 4 * bkw
    a_cols = bm + pad  # shared array shapes must be closure constants
    b_cols = bn + pad

    @cuda.jit
    def gemm_s8_fused(
        a, b, a_off, b_off, za, row_sum, col_sum, zb, bias, mult, zy, qlo, qhi,
        mode, out, bad,
    ):  # fmt: skip
        # a (M,K) u8|s8, b (K,N) u8|s8, a_off/b_off int32 (eq. 5),
        # za (1|M,) int64 = ZA, row_sum (1|M,) int64 = sum_k (a - a_zp),
        # col_sum (1|N,) int64 = colsum(b'), zb (1|N,) int64 = ZB, bias (1|N,)
        # int64, mult (1|M, 1|N) float64, out (M,N) int32|uint8|int8|float32,
        # bad (1,) int32 counts int32 outputs that do not fit (mode 0).
        # grid (ceil(M/bm), ceil(N/bn)), block tm*tn threads.
        As = cuda.shared.array((bkw, a_cols), np.uint32)
        Bs = cuda.shared.array((bkw, b_cols), np.uint32)
        acc = cuda.local.array((rm, rn), np.int32)
        fa = cuda.local.array(rm, np.uint32)
        fb = cuda.local.array(rn, np.uint32)
        M = a.shape[0]
        K = a.shape[1]
        N = b.shape[1]
        tid = cuda.threadIdx.x
        tx = tid % tn
        ty = tid // tn
        m0 = cuda.blockIdx.x * bm  # rows on x: the grid's only axis past 65535
        n0 = cuda.blockIdx.y * bn
        for i in range(rm):
            for j in range(rn):
                acc[i, j] = 0
        for k0 in range(0, K, kstep):
            # stage: A words with k fastest (8 threads read 32 contiguous bytes
            # of a row), B words with n fastest (coalesced across the warp)
            for w in range(tid, a_words, nthreads):
                mm = w // bkw
                kw = w % bkw
                # four a' bytes a[m, k:k+4] + a_off (uint8), little-endian; 0
                # outside a. (Inline: a device-function call would make the
                # compile-only path ask for a GPU context.)
                m = m0 + mm
                k = k0 + 4 * kw
                word = np.uint32(0)
                if m < M:
                    for t in range(4):
                        if k + t < K:
                            byte = (np.int32(a[m, k + t]) + a_off) & 0xFF
                            word |= np.uint32(byte) << np.uint32(8 * t)
                As[kw, mm] = word
            for w in range(tid, b_words, nthreads):
                kw = w // bn
                nn = w % bn
                # four b' bytes b[k:k+4, n] - b_off (int8 bit patterns); 0 outside
                n = n0 + nn
                k = k0 + 4 * kw
                word = np.uint32(0)
                if n < N:
                    for t in range(4):
                        if k + t < K:
                            byte = (np.int32(b[k + t, n]) - b_off) & 0xFF
                            word |= np.uint32(byte) << np.uint32(8 * t)
                Bs[kw, nn] = word
            cuda.syncthreads()
            for kw in range(bkw):
                for i in range(rm):
                    fa[i] = As[kw, ty + i * tm]
                for j in range(rn):
                    fb[j] = Bs[kw, tx + j * tn]
                for i in range(rm):
                    for j in range(rn):
                        acc[i, j] = dp4a(fa[i], fb[j], acc[i, j])
            cuda.syncthreads()
        # epilogue (eqs. 8, 11-13), as kernels/requant.py::requantize
        Mz = za.shape[0]
        Mr = row_sum.shape[0]
        Nc = col_sum.shape[0]
        Nz = zb.shape[0]
        Nb = bias.shape[0]
        Mm = mult.shape[0]
        Nm = mult.shape[1]
        for i in range(rm):
            m = m0 + ty + i * tm
            if m < M:
                zam = za[m if Mz > 1 else 0]
                rsm = row_sum[m if Mr > 1 else 0]
                mm = m if Mm > 1 else 0
                for j in range(rn):
                    n = n0 + tx + j * tn
                    if n < N:
                        v = (
                            np.int64(acc[i, j])
                            - zam * col_sum[n if Nc > 1 else 0]
                            - zb[n if Nz > 1 else 0] * rsm
                            + bias[n if Nb > 1 else 0]
                        )
                        if mode == 0:
                            if v < -2147483648 or v > 2147483647:
                                cuda.atomic.add(bad, 0, 1)
                            out[m, n] = v
                        elif mode == 1:
                            r = rint(
                                mul_rn(np.float64(v), mult[mm, n if Nm > 1 else 0]) + zy
                            )
                            out[m, n] = min(max(r, qlo), qhi)
                        else:
                            f = np.float32(
                                mul_rn(np.float64(v), mult[mm, n if Nm > 1 else 0])
                            )
                            out[m, n] = min(max(f, qlo), qhi)

    return gemm_s8_fused


@cuda.jit
def row_sums(a, a_off, za, out):
    # a (M,K) u8|s8, za (1|M,) int64 -> out (M,) int64 = sum_k (a' - ZA) (eq. 9)
    # One thread per row: a warp reads 32 rows byte by byte, and each 128-byte
    # line it touches serves the next 127 iterations from L1.
    m = cuda.grid(1)
    M = a.shape[0]
    K = a.shape[1]
    if m < M:
        s = np.int64(0)
        for k in range(K):
            s += np.int64(a[m, k])
        out[m] = s + K * (np.int64(a_off) - za[m if za.shape[0] > 1 else 0])


@cuda.jit
def col_sums(b, b_off, out):
    # b (K,N) u8|s8 -> out (N,) int64 = colsum(b') = sum_k b[k, n] - K * b_off
    n = cuda.grid(1)
    K = b.shape[0]
    N = b.shape[1]
    if n < N:
        s = np.int64(0)
        for k in range(K):
            s += np.int64(b[k, n])
        out[n] = s - K * np.int64(b_off)
