"""Sparse-weight SpMM on NVIDIA GPUs (numba-cuda): Y = W @ X, W (M, K) in CSR.

    float  Y[m, n] = clamp(sum_p val[p] * X[col[p], n] + bias[m], lo, hi)
           float32 sums in stored (column) order, as kernels/sparse_gemm.py
    int8   P[m, n] = sum_p (val[p] - zw[m]) * X[col[p], n]        exact int32
           acc = P - zx * rowsum(W - zw)[m] + bias[m]  -> eqs. 11-13
           (kernels/requant_cuda.py), as lowprec.qlinear_spmm

Row split with N tiling (Sputnik, Gale et al. 2020): a block owns ROWS
consecutive rows of W, taken one after the other, and a tile of
blockDim * VN columns of X and Y. For each row the block stages the row's
(column, value) pairs in shared memory, blockDim at a time (one coalesced load
per thread), then every thread runs over the staged pairs and accumulates its
VN columns n = n0 + tid + j * blockDim: a warp reads 32 consecutive elements of
an X row per pair (coalesced) and the same shared pair (broadcast). All
threads of a block work on the same row, so the trip counts and
syncthreads are uniform. Rows are on grid x (the axis without the 65535 limit).
Other formats (bsr4x1, bsr1x4, nm24) are expanded to this CSR on the host
once (SparseMatrix._expanded) and cached on the device with the matrix.
"""

import functools

import numpy as np
from numba import cuda

from .requant_cuda import requant


@functools.cache
def spmm_float_kernel(rows, threads, vn):
    """Float SpMM for ROWS rows per block, <= THREADS threads, VN columns each."""

    @cuda.jit
    def spmm_f32(indptr, cols, vals, x, bias, lo, hi, out):
        # indptr (M+1,) int64, cols (nnz,) int32, vals (nnz,) float32|float16,
        # x (K,N) float32|float16, bias (1|M,) float32, lo/hi float32,
        # out (M,N) float32. grid (ceil(M/rows), ceil(N/(blockDim*vn))).
        sc = cuda.shared.array(threads, np.int32)
        sv = cuda.shared.array(threads, np.float32)
        acc = cuda.local.array(vn, np.float32)
        M = out.shape[0]
        N = out.shape[1]
        tid = cuda.threadIdx.x
        nb = cuda.blockDim.x
        n0 = cuda.blockIdx.y * nb * vn
        Nb = bias.shape[0]
        for rr in range(rows):
            m = cuda.blockIdx.x * rows + rr
            if m < M:  # the same for the whole block
                for j in range(vn):
                    acc[j] = 0
                p1 = indptr[m + 1]
                for q0 in range(indptr[m], p1, nb):
                    q = q0 + tid
                    if q < p1:
                        sc[tid] = cols[q]
                        sv[tid] = np.float32(vals[q])
                    cuda.syncthreads()
                    for e in range(min(nb, p1 - q0)):
                        c = sc[e]
                        wv = sv[e]
                        for j in range(vn):
                            n = n0 + tid + j * nb
                            if n < N:
                                acc[j] += wv * np.float32(x[c, n])
                    cuda.syncthreads()
                bm = bias[m if Nb > 1 else 0]
                for j in range(vn):
                    n = n0 + tid + j * nb
                    if n < N:
                        y = np.float32(acc[j] + bm)
                        y = lo if y < lo else y
                        out[m, n] = hi if y > hi else y

    return spmm_f32


@functools.cache
def spmm_s8_kernel(rows, threads, vn):
    """INT8 SpMM with the fused requantization (same launch shape as float)."""

    @cuda.jit
    def spmm_s8(indptr, cols, vals, zw, x, zx, rs, bias, mult, zy, qlo, qhi, mode,
                out):  # fmt: skip
        # vals (nnz,) int8, zw (M,) int8, x (K,N) uint8|int8 raw, zx int64,
        # rs (M,) int64 = rowsum(W - zw) over stored entries, bias (M,) int64,
        # mult (M,) float64, out (M,N) uint8|int8|float32; mode 1 | 2.
        sc = cuda.shared.array(threads, np.int32)
        sv = cuda.shared.array(threads, np.int32)
        acc = cuda.local.array(vn, np.int32)
        M = out.shape[0]
        N = out.shape[1]
        tid = cuda.threadIdx.x
        nb = cuda.blockDim.x
        n0 = cuda.blockIdx.y * nb * vn
        for rr in range(rows):
            m = cuda.blockIdx.x * rows + rr
            if m < M:
                for j in range(vn):
                    acc[j] = 0
                zm = np.int32(zw[m])
                p1 = indptr[m + 1]
                for q0 in range(indptr[m], p1, nb):
                    q = q0 + tid
                    if q < p1:
                        sc[tid] = cols[q]
                        sv[tid] = np.int32(vals[q]) - zm  # |w - zw| <= 255
                    cuda.syncthreads()
                    for e in range(min(nb, p1 - q0)):
                        c = sc[e]
                        wv = sv[e]
                        for j in range(vn):
                            n = n0 + tid + j * nb
                            if n < N:  # int32 product: exact (<= 255 * 255)
                                acc[j] += wv * np.int32(x[c, n])
                    cuda.syncthreads()
                base = bias[m] - zx * rs[m]
                mm = mult[m]
                for j in range(vn):
                    n = n0 + tid + j * nb
                    if n < N:
                        out[m, n] = requant(
                            np.int64(acc[j]) + base, mm, zy, qlo, qhi, mode
                        )

    return spmm_s8
