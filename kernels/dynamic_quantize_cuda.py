"""ONNX DynamicQuantizeLinear pieces on NVIDIA GPUs (numba-cuda): the min/max
reduction, the per-row quantization of lowprec.dynamic_quantize_matmul
(per_row=True), its per-row multiplier and the float bias pass (docs eq. 14).

The reduction is a grid-stride pass with a tree in shared memory (no warp
shuffles: the simulator has none), one (min, max) pair per block, then the same
kernel once more on one block over those pairs. The per-tensor scale and zero
point are computed on the host from the two floats, in the CPU function's
float32 steps (lowprec/quantize.py), and the quantization itself is
kernels/quantize_cuda.py::quantize_linear.
"""

import functools
import math

import numpy as np
from numba import cuda

from .cuda_intrinsics import rint


def _pow2(n):
    p = 1
    while p < n:
        p *= 2
    return p


@functools.cache
def min_max_kernel(threads):
    """min_max for blocks of ``threads`` threads (a shared-array size)."""
    half = _pow2(threads) // 2

    @cuda.jit
    def min_max(lo_in, hi_in, lo_out, hi_out, bad):
        # lo_in, hi_in (n,) float32 -> lo_out, hi_out (blocks,) float32: min of
        # lo_in and max of hi_in over the block's grid-stride share (+inf / -inf
        # for none); bad (1,) int32 counts blocks that met NaN or +-inf.
        # Pass 1: lo_in = hi_in = x. Pass 2 (one block): the pass-1 outputs,
        # every one finite unless bad is already set (a block reads at least
        # one element: launch_1d gives at most ceil(n / threads) blocks).
        s_lo = cuda.shared.array(threads, np.float32)
        s_hi = cuda.shared.array(threads, np.float32)
        tid = cuda.threadIdx.x
        lo = np.float32(np.inf)
        hi = np.float32(-np.inf)
        nonfinite = False
        for i in range(cuda.grid(1), lo_in.shape[0], cuda.gridsize(1)):
            u = lo_in[i]
            w = hi_in[i]
            if math.isinf(u) or math.isnan(u) or math.isinf(w) or math.isnan(w):
                nonfinite = True
            else:
                lo = min(lo, u)
                hi = max(hi, w)
        if nonfinite:
            cuda.atomic.add(bad, 0, 1)
        s_lo[tid] = lo
        s_hi[tid] = hi
        cuda.syncthreads()
        s = half
        while s > 0:
            if tid < s and tid + s < threads:
                s_lo[tid] = min(s_lo[tid], s_lo[tid + s])
                s_hi[tid] = max(s_hi[tid], s_hi[tid + s])
            cuda.syncthreads()
            s //= 2
        if tid == 0:
            lo_out[cuda.blockIdx.x] = s_lo[0]
            hi_out[cuda.blockIdx.x] = s_hi[0]

    return min_max


@functools.cache
def quantize_rows_kernel(threads):
    """quantize_rows for blocks of ``threads`` threads."""
    half = _pow2(threads) // 2

    @cuda.jit
    def quantize_rows(x, out, scale, zero_point, bad):
        # x (M,K) float32, any strides -> out (M,K) uint8, scale (M,) float32,
        # zero_point (M,) int64; bad (1,) int32 counts rows that are not finite
        # or whose range gives no finite scale. One block per row (grid (M,)):
        # DynamicQuantizeLinear of the row, in the float32 steps of
        # kernels/quantize.py::dynamic_quantize_rows (the range includes 0).
        s_lo = cuda.shared.array(threads, np.float32)
        s_hi = cuda.shared.array(threads, np.float32)
        par = cuda.shared.array(2, np.float32)
        m = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        K = x.shape[1]
        lo = np.float32(0)
        hi = np.float32(0)
        nonfinite = False
        for k in range(tid, K, threads):
            v = x[m, k]
            if math.isinf(v) or math.isnan(v):
                nonfinite = True
            else:
                lo = min(lo, v)
                hi = max(hi, v)
        if nonfinite:
            cuda.atomic.add(bad, 0, 1)
        s_lo[tid] = lo
        s_hi[tid] = hi
        cuda.syncthreads()
        s = half
        while s > 0:
            if tid < s and tid + s < threads:
                s_lo[tid] = min(s_lo[tid], s_lo[tid + s])
                s_hi[tid] = max(s_hi[tid], s_hi[tid + s])
            cuda.syncthreads()
            s //= 2
        if tid == 0:
            lo = s_lo[0]
            hi = s_hi[0]
            rng = np.float32(1) if hi == lo else np.float32(hi - lo)
            sc = np.float32(rng / np.float32(255))
            if not (sc > 0 and sc < np.inf):
                cuda.atomic.add(bad, 0, 1)
                sc = np.float32(1)
            zq = np.float32(np.float32(0) - lo / sc)
            zq = min(max(zq, np.float32(0)), np.float32(255))
            zp = rint(np.float64(zq))
            par[0] = sc
            par[1] = zp
            scale[m] = sc
            zero_point[m] = np.int64(zp)
        cuda.syncthreads()
        sc = par[0]
        zp = np.float64(par[1])
        for k in range(tid, K, threads):
            r = rint(np.float64(x[m, k] / sc)) + zp
            out[m, k] = min(max(r, 0.0), 255.0)

    return quantize_rows


@cuda.jit
def row_col_mult(sa, sb, out):
    # sa (M,) float32, sb (N,) float32 -> out (M,N) float64 = fl32(sa[m] * sb[n])
    # (eq. 14's multiplier, numpy's float32 product as lowprec.gemm._multiplier)
    M = sa.shape[0]
    N = sb.shape[0]
    for i in range(cuda.grid(1), M * N, cuda.gridsize(1)):
        m = i // N
        n = i % N
        out[m, n] = np.float64(np.float32(sa[m] * sb[n]))


@cuda.jit
def add_bias(out, bias):
    # out (M,N) float32 += bias (N,) float32 in place, one float32 rounding:
    # eq. 14's fl32(fl32(acc * mult) + bias[n]) after the GEMM's float32 output
    M = out.shape[0]
    N = out.shape[1]
    for i in range(cuda.grid(1), M * N, cuda.gridsize(1)):
        m = i // N
        n = i % N
        out[m, n] = np.float32(out[m, n] + bias[n])
