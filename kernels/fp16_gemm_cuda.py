"""FP16 GEMM and convolution with float32 accumulation on NVIDIA GPUs (numba-cuda).

    acc[m, n] = sum_k fl32(a[m, k]) * fl32(b[k, n])   k = 0, 1, ..., K-1 in order
    y[m, n]   = clamp(fl32(acc + bias[n]), lo, hi)    (NaN passes the clamp)
    out       = y (float32) | fl16(y) (round to nearest even, overflow -> inf)

The summation order is lowprec.half's contract (one float32 accumulator per
output, k ascending, starting at +0). A product of two float16 values is exact
in float32, so NVVM's fma contraction changes nothing: the GEMM gives the CPU
matmul_fp16's bits exactly. Operands are converted to float32 once, while a
tile is staged in shared memory (cvt.f32.f16; numba-cuda's half arithmetic
would need nvJitLink LTO, conversions do not). Out-of-range rows, columns and
K positions are staged as 0 and add +0.

Tiling as kernels/int8_gemm_cuda.py (kernels/config_cuda.py FP16_*): a block
owns a BM x BN tile; thread (ty, tx) owns rows ty + i*TM and columns tx + j*TN,
an 8 x 8 float32 register tile by default; BK values of K per stage.

The convolution (ONNX Conv, NCHW) is the same loop over an implicit im2col:
rows = output pixels (n, oh, ow), K = (i, j, c) of one group: the CPU
conv_fp16's order (lowprec/conv_half.py), so the bits are the CPU's; w (M,
C/G, kH, kW) is read in place as (M, K') in ONNX order (c, i, j), element
(c, t) of k = t * Cg + c; padded taps are 0.
geo (int64): N, H, W, C, Ho, Wo, kH, kW, sH, sW, dH, dW, pad_top, pad_left,
G, Cg, Mg.
"""

import functools

import numpy as np
from numba import cuda

from .cuda_intrinsics import bits_f32, f32_bits


@cuda.jit(device=True, inline=True)
def f32_to_bf16_bits(y):
    # float32 -> bfloat16 bits, round to nearest even, NaN kept and quieted (as
    # kernels/fp16_gemm.py::f32_to_bf16_bits; cvt.rn.bf16.f32 would return a
    # canonical NaN)
    u = f32_bits(y)
    if (u & 0x7F800000) == 0x7F800000 and (u & 0x7FFFFF) != 0:
        return np.uint16((u >> np.uint32(16)) | np.uint32(0x40))
    return np.uint16(
        (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & 1)) >> np.uint32(16)
    )


def _check(bm, bn, tm, tn):
    if bm % tm or bn % tn:
        msg = (
            f"FP16_BLOCK_M={bm}, FP16_BLOCK_N={bn} must be multiples of "
            f"FP16_THREADS_M={tm}, FP16_THREADS_N={tn}"
        )
        raise ValueError(msg)


@functools.cache
def gemm_kernel(bm, bn, bk, tm, tn, pad, bf16=False):
    """The half GEMM for one tile configuration: float16 operands, or with
    ``bf16`` bfloat16 bit patterns (uint16) summed in kernels/bf16_gemm_cuda.py's
    pair order and optionally rounded to bfloat16 bits on output. ``bf16`` is a
    compile-time constant of the kernel: each variant compiles only its own
    branches."""
    _check(bm, bn, tm, tn)
    rm = bm // tm
    rn = bn // tn
    nthreads = tm * tn
    a_elems = bm * bk
    b_elems = bn * bk
    a_cols = bm + pad
    b_cols = bn + pad

    @cuda.jit
    def gemm_half_f32(a, b, bias, has_bias, lo, hi, bf16_out, out):
        # a (M,K), b (K,N) float16 (or uint16 bfloat16 bits), any strides; bias
        # (1|N,) float32; lo/hi float32; out (M,N) float32|float16, or uint16
        # bfloat16 bits when bf16_out. grid (ceil(M/bm), ceil(N/bn)), block
        # tm*tn threads.
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
        m0 = cuda.blockIdx.x * bm  # rows on x: the grid's only axis past 65535
        n0 = cuda.blockIdx.y * bn
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
                    if bf16:  # bfloat16 -> float32: the bits shifted up (exact)
                        val = bits_f32(np.uint32(np.uint32(a[m, k]) << np.uint32(16)))
                    else:
                        val = np.float32(a[m, k])
                As[kk, mm] = val
            for e in range(tid, b_elems, nthreads):
                kk = e // bn  # n fastest: coalesced across the warp
                nn = e % bn
                n = n0 + nn
                k = k0 + kk
                val = np.float32(0)
                if n < N and k < K:
                    if bf16:
                        val = bits_f32(np.uint32(np.uint32(b[k, n]) << np.uint32(16)))
                    else:
                        val = np.float32(b[k, n])
                Bs[kk, nn] = val
            cuda.syncthreads()
            for kk in range(bk):
                kx = kk ^ 1 if bf16 else kk  # bfloat16: the odd k of a pair first
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
                        if bf16 and bf16_out:
                            out[m, n] = f32_to_bf16_bits(y)
                        else:
                            out[m, n] = y  # float16 out: one cvt.rn.f16.f32

    return gemm_half_f32


@functools.cache
def conv_kernel(bm, bn, bk, tm, tn, pad):
    """The FP16 implicit-GEMM convolution (NCHW) for one tile configuration."""
    _check(bm, bn, tm, tn)
    rm = bm // tm
    rn = bn // tn
    nthreads = tm * tn
    a_elems = bm * bk
    b_elems = bn * bk
    a_cols = bm + pad
    b_cols = bn + pad

    @cuda.jit
    def conv_f16_f32(x, w, geo, bias, has_bias, lo, hi, out):
        # x (N,C,H,W) float16, w (M, Cg*kH*kW) float16, geo int64 (module
        # docstring), bias (1|M,) float32, out (N, M, Ho*Wo) float32|float16.
        # grid (ceil(rows/bm), ceil(Mg/bn), G), block tm*tn threads.
        As = cuda.shared.array((bk, a_cols), np.float32)
        Bs = cuda.shared.array((bk, b_cols), np.float32)
        acc = cuda.local.array((rm, rn), np.float32)
        fa = cuda.local.array(rm, np.float32)
        fb = cuda.local.array(rn, np.float32)
        H = geo[1]
        W = geo[2]
        Ho = geo[4]
        Wo = geo[5]
        kh = geo[6]
        kw_ = geo[7]
        Cg = geo[15]
        Mg = geo[16]
        P = Ho * Wo
        rows = geo[0] * P
        taps = kh * kw_
        K = Cg * taps
        g = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        tx = tid % tn
        ty = tid // tn
        m0 = cuda.blockIdx.x * bm
        n0 = cuda.blockIdx.y * bn
        for i in range(rm):
            for j in range(rn):
                acc[i, j] = 0
        for k0 in range(0, K, bk):
            for e in range(tid, a_elems, nthreads):
                mm = e % bm  # pixels fastest: ow runs are contiguous in x
                kk = e // bm
                r = m0 + mm
                k = k0 + kk
                val = np.float32(0)
                if r < rows and k < K:
                    n = r // P
                    p = r % P
                    ci = k % Cg  # k = (i, j, c), c fastest
                    t = k // Cg
                    ih = (p // Wo) * geo[8] - geo[12] + (t // kw_) * geo[10]
                    iw = (p % Wo) * geo[9] - geo[13] + (t % kw_) * geo[11]
                    if ih >= 0 and ih < H and iw >= 0 and iw < W:
                        val = np.float32(x[n, g * Cg + ci, ih, iw])
                As[kk, mm] = val
            for e in range(tid, b_elems, nthreads):
                kk = e % bk  # k fastest: runs of Cg-strided weights of one row
                nn = e // bk
                c = n0 + nn
                k = k0 + kk
                val = np.float32(0)
                if c < Mg and k < K:
                    val = np.float32(w[g * Mg + c, (k % Cg) * taps + k // Cg])
                Bs[kk, nn] = val
            cuda.syncthreads()
            for kk in range(bk):
                for i in range(rm):
                    fa[i] = As[kk, ty + i * tm]
                for j in range(rn):
                    fb[j] = Bs[kk, tx + j * tn]
                for i in range(rm):
                    for j in range(rn):
                        acc[i, j] += fa[i] * fb[j]
            cuda.syncthreads()
        Nb = bias.shape[0]
        for i in range(rm):
            r = m0 + ty + i * tm
            if r < rows:
                n = r // P
                p = r % P
                for j in range(rn):
                    c = n0 + tx + j * tn
                    if c < Mg:
                        mc = g * Mg + c
                        y = acc[i, j]
                        if has_bias:
                            y = np.float32(y + bias[mc if Nb > 1 else 0])
                        y = lo if y < lo else y
                        y = hi if y > hi else y
                        out[n, mc, p] = y

    return conv_f16_f32
