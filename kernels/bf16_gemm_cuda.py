"""BF16 GEMM with float32 accumulation on NVIDIA GPUs (numba-cuda).

    acc[m, n] = 0;  for j = 0, ..., ceil(K/2)-1  (a[m, K] = b[K, n] = 0):
                    acc = fl32(acc + a[m, 2j+1] * b[2j+1, n])
                    acc = fl32(acc + a[m, 2j]   * b[2j, n])
    y[m, n]   = clamp(fl32(acc + bias[n]), lo, hi)    (NaN passes the clamp)
    out       = y (float32) | bf16(y) (uint16 bits, round to nearest even,
                overflow -> inf, NaN kept and quieted)

lowprec.half's bfloat16 order: pairs of k, the odd term first (AVX512_BF16
``vdpbf16ps``). The loop is kernels/fp16_gemm_cuda.py's with the K index of a
stage run as kk ^ 1 (1, 0, 3, 2, ...): a stage starts at an even k, so that is
exactly the pair order, and the zero staged at k = K for odd K adds +0 first
(an accumulator that starts at +0 is never -0, so acc + 0 == acc). bfloat16 ->
float32 is the 16-bit pattern shifted up (exact), done once while a tile is
staged in shared memory. A product of two bfloat16 values (8-bit significands)
is exact in float32 unless it leaves float32's normal range, so NVVM's fma
contraction gives multiply-then-add's bits there: the CPU portable path's bits,
outside the subnormal / overflow products the half module's contract excludes.

The output conversion is kernels/fp16_gemm.py::f32_to_bf16_bits on the integer
bits, not ``cvt.rn.bf16.f32`` (which returns a canonical NaN), so NaN payloads
match the CPU. Tiling: kernels/config_cuda.py FP16_* (BK must be even).
"""

import functools

import numpy as np
from numba import cuda

from .cuda_intrinsics import bits_f32, f32_bits


@functools.cache
def gemm_kernel(bm, bn, bk, tm, tn, pad):
    """The BF16 GEMM for one tile configuration."""
    if bm % tm or bn % tn or bk % 2:
        msg = (
            f"FP16_BLOCK_M={bm}, FP16_BLOCK_N={bn} must be multiples of "
            f"FP16_THREADS_M={tm}, FP16_THREADS_N={tn}, and FP16_BLOCK_K={bk} "
            f"even (bfloat16 pairs of k)"
        )
        raise ValueError(msg)
    rm = bm // tm
    rn = bn // tn
    nthreads = tm * tn
    a_elems = bm * bk
    b_elems = bn * bk
    a_cols = bm + pad
    b_cols = bn + pad

    @cuda.jit
    def gemm_bf16_f32(a, b, bias, has_bias, lo, hi, bf16_out, out):
        # a (M,K) uint16 bfloat16 bits, b (K,N) uint16, any strides; bias (1|N,)
        # float32; lo/hi float32; out (M,N) float32, or uint16 bfloat16 bits
        # when bf16_out. grid (ceil(N/bn), ceil(M/bm)), block tm*tn threads.
        As = cuda.shared.array((bk, a_cols), np.float32)
        Bs = cuda.shared.array((bk, b_cols), np.float32)
        acc = cuda.local.array((rm, rn), np.float32)
        fa = cuda.local.array(rm, np.float32)
        fb = cuda.local.array(rn, np.float32)
        M = a.shape[0]
        K = a.shape[1]
        N = b.shape[1]
        tid = cuda.threadIdx.x
        tx = tid % tn
        ty = tid // tn
        m0 = cuda.blockIdx.y * bm
        n0 = cuda.blockIdx.x * bn
        for i in range(rm):
            for j in range(rn):
                acc[i, j] = 0
        for k0 in range(0, K, bk):
            for e in range(tid, a_elems, nthreads):
                mm = e // bk  # k fastest: a row's K run is contiguous in a
                kk = e % bk
                m = m0 + mm
                k = k0 + kk
                val = np.float32(0)
                if m < M and k < K:
                    val = bits_f32(np.uint32(np.uint32(a[m, k]) << np.uint32(16)))
                As[kk, mm] = val
            for e in range(tid, b_elems, nthreads):
                kk = e // bn  # n fastest: coalesced across the warp
                nn = e % bn
                n = n0 + nn
                k = k0 + kk
                val = np.float32(0)
                if n < N and k < K:
                    val = bits_f32(np.uint32(np.uint32(b[k, n]) << np.uint32(16)))
                Bs[kk, nn] = val
            cuda.syncthreads()
            for kk in range(bk):
                kx = kk ^ 1  # the odd k of each pair first
                for i in range(rm):
                    fa[i] = As[kx, ty + i * tm]
                for j in range(rn):
                    fb[j] = Bs[kx, tx + j * tn]
                for i in range(rm):
                    for j in range(rn):
                        acc[i, j] += fa[i] * fb[j]
            cuda.syncthreads()
        Nb = bias.shape[0]
        for i in range(rm):
            m = m0 + ty + i * tm
            if m < M:
                for j in range(rn):
                    n = n0 + tx + j * tn
                    if n < N:
                        y = acc[i, j]
                        if has_bias:
                            y = np.float32(y + bias[n if Nb > 1 else 0])
                        y = lo if y < lo else y
                        y = hi if y > hi else y
                        if bf16_out:
                            u = f32_bits(y)
                            if (u & 0x7F800000) == 0x7F800000 and (u & 0x7FFFFF) != 0:
                                h = (u >> np.uint32(16)) | np.uint32(0x40)  # quiet NaN
                            else:
                                h = (
                                    u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & 1)
                                ) >> np.uint32(16)
                            out[m, n] = np.uint16(h)
                        else:
                            out[m, n] = y

    return gemm_bf16_f32
