"""Portable INT8 GEMM kernels: exact on every CPU numba supports.

Every GEMM path in lowprec computes the same raw product

    P[m, n] = sum_k a'[m, k] * b'[k, n]        a' uint8, b' int8, P int32   (eq. 6)

where a' = a + 128 when a is int8 and b' = b - 128 when b is uint8
(docs/quantization.md). Zero points, bias and requantization are applied
afterwards by ``lowprec.kernels.requant`` from row and column sums. A faster
instruction-set path only has to produce the same P from its own packed layout.
"""

import numba
import numpy as np
from numba import njit, prange

from .config import JIT, PJIT
from .requant import epilogue_tile


@njit(**PJIT)
def prepare_a(a, flip, k_pad, out, row_sum):
    # a (M,K) uint8|int8 (any strides) -> out (M,k_pad) uint8 = a' with zero K tail,
    # row_sum (M,) int64 = sum_k a'[m, k]
    M, K = a.shape
    for m in prange(M):
        s = 0
        for k in range(K):
            v = np.uint8(a[m, k]) ^ flip
            out[m, k] = v
            s += np.int64(v)
        for k in range(K, k_pad):
            out[m, k] = 0
        row_sum[m] = s


@njit(**PJIT)
def row_sums_u8(a, row_sum):
    # a (M,K) uint8 -> row_sum (M,) int64
    M, K = a.shape
    for m in prange(M):
        s = 0
        for k in range(K):
            s += np.int64(a[m, k])
        row_sum[m] = s


@njit(**PJIT)
def prepare_b(b, flip, out, col_sum, col_abs):
    # b (K,N) uint8|int8 (any strides) -> out (K,N) int8 = b', col_sum (N,) and
    # col_abs (N,) int64: sum_k b'[k, n] and sum_k |b'[k, n]|
    K, N = b.shape
    for n in prange(N):
        s = 0
        t = 0
        for k in range(K):
            v = np.int8(np.uint8(b[k, n]) ^ flip)
            out[k, n] = v
            s += np.int64(v)
            t += abs(np.int64(v))
        col_sum[n] = s
        col_abs[n] = t


@njit(**PJIT)
def gemm_u8s8(a, b, out, tile_m, tile_n):
    # a (M,K) uint8, b (K,N) int8, out (M,N) int32 = a @ b (eq. 6), wrapping int32
    # Kernel 1: output tiles tile_m x tile_n split across threads; one row of
    # int32 accumulators per output row so the inner n loop vectorizes.
    M, K = a.shape
    N = b.shape[1]
    mt = (M + tile_m - 1) // tile_m
    nt = (N + tile_n - 1) // tile_n
    for t in prange(mt * nt):
        m0 = (t // nt) * tile_m
        n0 = (t % nt) * tile_n
        m1 = min(m0 + tile_m, M)
        n1 = min(n0 + tile_n, N)
        acc = np.empty(n1 - n0, np.int32)
        for m in range(m0, m1):
            acc[:] = 0
            for k in range(K):
                av = np.int32(a[m, k])
                for j in range(n1 - n0):
                    acc[j] += av * np.int32(b[k, n0 + j])
            for j in range(n1 - n0):
                out[m, n0 + j] = acc[j]


# Not inlined into the prange drivers on purpose: numba's parfor passes copy and
# rewrite the whole loop body, and with the tile kernels and the epilogue inlined
# there they took minutes per driver variant; as a call they take seconds.
@njit(nogil=True, cache=True)
def _tile_job(t, nt, a, b, scratch, epi, out):
    # one scratch-sized output tile over the whole K, then the fused epilogue
    za, rs, cs, zb, bias, mult, zy, qlo, qhi, mode, fbias = epi
    M, K = a.shape
    N = out.shape[1]
    tile_m, tile_n = scratch.shape[1], scratch.shape[2]
    m0 = (t // nt) * tile_m
    n0 = (t % nt) * tile_n
    mr = min(tile_m, M - m0)
    nc = min(tile_n, N - n0)
    # one scratch row: the serial drivers get a 1-row scratch and never ask for a
    # thread id (numba.get_thread_id outside a parallel region can crash a
    # process whose threading layer is not started yet)
    tile = scratch[numba.get_thread_id() if scratch.shape[0] > 1 else 0]
    c0 = np.uint64(n0)
    for r in range(mr):
        acc = tile[r]
        acc[:nc] = 0
        arow = a[m0 + r]
        for k in range(K):
            av = np.int32(arow[k])
            brow = b[k]
            # unsigned column index: no wraparound check, so the loop vectorizes
            for jj in range(nc):
                j = np.uint64(jj)
                acc[j] += av * np.int32(brow[c0 + j])
    epilogue_tile(
        tile, mr, nc, m0, n0, za, rs, cs, zb, bias, mult, zy, qlo, qhi, mode, out,
        fbias,
    )  # fmt: skip


@njit(**PJIT)
def gemm_fused(a, b, scratch, epi, out):
    # a (M,K) uint8, b (K,N) int8, scratch (threads,TILE_M,TILE_N) int32,
    # out (M,N) int32|uint8|int8|float32: eq. 6 then eq. 8-13 per tile
    mt = (a.shape[0] + scratch.shape[1] - 1) // scratch.shape[1]
    nt = (out.shape[1] + scratch.shape[2] - 1) // scratch.shape[2]
    for t in prange(mt * nt):
        _tile_job(t, nt, a, b, scratch, epi, out)


@njit(**JIT)
def gemm_fused_serial(a, b, scratch, epi, out):
    # as gemm_fused, on the calling thread (tiny problems)
    mt = (a.shape[0] + scratch.shape[1] - 1) // scratch.shape[1]
    nt = (out.shape[1] + scratch.shape[2] - 1) // scratch.shape[2]
    for t in range(mt * nt):
        _tile_job(t, nt, a, b, scratch, epi, out)
