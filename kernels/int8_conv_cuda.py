"""INT8 convolution on NVIDIA GPUs (numba-cuda): implicit GEMM, and a direct
depthwise kernel. Same integers as kernels/int8_conv.py (lowprec/conv.py):

    rows  r = (n, oh, ow)   output pixels;  columns c = output channels of group g
    P[r, c]   = sum_k x'[r, k] * w'[g, k, c]         k = (i*kW + j)*Cg + ci
    acc[r, c] = P - ZA*colsum(w')[c] - ZB[c]*rowsum[g, r] + bias[c]    (eq. 8)
    out       = int32 acc | sat(rint(acc*mult + zy)) | float32(acc*mult)

x' is the input with the sign flip of eq. 5 (x + 128 for int8); a tap in the
padding reads ZA = x_zero_point + flip, i.e. a real 0 (ONNX pads after
subtracting the zero point). Nothing is copied or padded on the host: the
im2col patch is gathered while a tile is staged in shared memory, four K
values per 32-bit word, and the inner loop is the INT8 GEMM's dp4a loop
(kernels/int8_gemm_cuda.py, same tiles and thread mapping). w' arrives
prepacked in GEMM order (lowprec.conv.PackedConvWeights._wk: (G, K, M/G)).
x is (N, C, H, W) (chw=True) or (N, H, W, C); out is (N, M, Ho*Wo) (chw) or
(N, Ho*Wo, M): the kernel writes the caller's layout directly.

geo (int64): N, H, W, C, Ho, Wo, kH, kW, sH, sW, dH, dW, pad_top, pad_left,
G, Cg, Mg.
"""

import functools

import numpy as np
from numba import cuda

from .cuda_intrinsics import dp4a
from .requant_cuda import requant


@functools.cache
def conv_kernel(bm, bn, bkw, tm, tn, pad):
    """The fused implicit-GEMM convolution for one tile configuration."""
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
    a_cols = bm + pad
    b_cols = bn + pad

    @cuda.jit
    def conv_s8_fused(
        x, chw, geo, a_off, za, wk, row_sum, col_sum, zb, bias, mult, zy, qlo,
        qhi, mode, out,
    ):  # fmt: skip
        # x (N,C,H,W)|(N,H,W,C) u8|s8 raw, a_off int32 (eq. 5), za int32 = ZA
        # (x' of a padded tap), wk (G,K,Mg) int8 = w', row_sum (G|1, rows|1)
        # int64, col_sum (M,) int64 = colsum(w'), zb (M,) int64 = ZB, bias (M,)
        # int64, mult (1, 1|M) float64, out (N,M,P)|(N,P,M).
        # grid (ceil(rows/bm), ceil(Mg/bn), G), block tm*tn threads.
        As = cuda.shared.array((bkw, a_cols), np.uint32)
        Bs = cuda.shared.array((bkw, b_cols), np.uint32)
        acc = cuda.local.array((rm, rn), np.int32)
        fa = cuda.local.array(rm, np.uint32)
        fb = cuda.local.array(rn, np.uint32)
        H = geo[1]
        W = geo[2]
        Ho = geo[4]
        Wo = geo[5]
        kw_ = geo[7]
        sh = geo[8]
        sw = geo[9]
        dh = geo[10]
        dw = geo[11]
        pt = geo[12]
        pl = geo[13]
        Cg = geo[15]
        Mg = geo[16]
        P = Ho * Wo
        rows = geo[0] * P
        K = geo[6] * kw_ * Cg
        g = cuda.blockIdx.z
        c0 = g * Cg
        tid = cuda.threadIdx.x
        tx = tid % tn
        ty = tid // tn
        m0 = cuda.blockIdx.x * bm  # rows on x: the grid's only axis past 65535
        n0 = cuda.blockIdx.y * bn
        zbyte = np.uint32(za & 0xFF)
        for i in range(rm):
            for j in range(rn):
                acc[i, j] = 0
        for k0 in range(0, K, kstep):
            for w in range(tid, a_words, nthreads):
                mm = w // bkw
                kq = w % bkw
                r = m0 + mm
                k = k0 + 4 * kq
                word = np.uint32(0)
                if r < rows:
                    n = r // P
                    p = r % P
                    ih0 = (p // Wo) * sh - pt
                    iw0 = (p % Wo) * sw - pl
                    for t in range(4):
                        kk = k + t
                        if kk < K:
                            ci = kk % Cg
                            tap = kk // Cg
                            ih = ih0 + (tap // kw_) * dh
                            iw = iw0 + (tap % kw_) * dw
                            byte = zbyte
                            if ih >= 0 and ih < H and iw >= 0 and iw < W:
                                if chw:
                                    xv = np.int32(x[n, c0 + ci, ih, iw])
                                else:
                                    xv = np.int32(x[n, ih, iw, c0 + ci])
                                byte = np.uint32((xv + a_off) & 0xFF)
                            word |= byte << np.uint32(8 * t)
                As[kq, mm] = word
            for w in range(tid, b_words, nthreads):
                kq = w // bn
                nn = w % bn
                c = n0 + nn
                k = k0 + 4 * kq
                word = np.uint32(0)
                if c < Mg:
                    for t in range(4):
                        if k + t < K:
                            byte = np.int32(wk[g, k + t, c]) & 0xFF
                            word |= np.uint32(byte) << np.uint32(8 * t)
                Bs[kq, nn] = word
            cuda.syncthreads()
            for kq in range(bkw):
                for i in range(rm):
                    fa[i] = As[kq, ty + i * tm]
                for j in range(rn):
                    fb[j] = Bs[kq, tx + j * tn]
                for i in range(rm):
                    for j in range(rn):
                        acc[i, j] = dp4a(fa[i], fb[j], acc[i, j])
            cuda.syncthreads()
        # epilogue: eq. 8 in int64, then eqs. 11-13 (kernels/requant_cuda.py)
        Gr = row_sum.shape[0]
        Rr = row_sum.shape[1]
        Nm = mult.shape[1]
        za64 = np.int64(za)
        for i in range(rm):
            r = m0 + ty + i * tm
            if r < rows:
                n = r // P
                p = r % P
                rsm = row_sum[g if Gr > 1 else 0, r if Rr > 1 else 0]
                for j in range(rn):
                    c = n0 + tx + j * tn
                    if c < Mg:
                        mc = g * Mg + c
                        v = (
                            np.int64(acc[i, j])
                            - za64 * col_sum[mc]
                            - zb[mc] * rsm
                            + bias[mc]
                        )
                        # int32 stores acc itself (no float64 detour)
                        if mode == 0:
                            if chw:
                                out[n, mc, p] = v
                            else:
                                out[n, p, mc] = v
                        else:
                            res = requant(
                                v, mult[0, mc if Nm > 1 else 0], zy, qlo, qhi, mode
                            )
                            if chw:
                                out[n, mc, p] = res
                            else:
                                out[n, p, mc] = res

    return conv_s8_fused


@cuda.jit
def patch_row_sums(x, chw, geo, a_off, za, out):
    # out (G, rows) int64 = sum over the patch of (x' - ZA) (eq. 9; padded taps
    # read ZA and add 0). One thread per (group, output pixel).
    H = geo[1]
    W = geo[2]
    Ho = geo[4]
    Wo = geo[5]
    kh = geo[6]
    kw_ = geo[7]
    Cg = geo[15]
    P = Ho * Wo
    rows = geo[0] * P
    t = cuda.grid(1)
    if t < geo[14] * rows:
        g = t // rows
        r = t % rows
        n = r // P
        p = r % P
        ih0 = (p // Wo) * geo[8] - geo[12]
        iw0 = (p % Wo) * geo[9] - geo[13]
        s = np.int64(0)
        cnt = np.int64(0)
        for i in range(kh):
            ih = ih0 + i * geo[10]
            if ih >= 0 and ih < H:
                for j in range(kw_):
                    iw = iw0 + j * geo[11]
                    if iw >= 0 and iw < W:
                        for ci in range(Cg):
                            if chw:
                                xv = np.int64(x[n, g * Cg + ci, ih, iw])
                            else:
                                xv = np.int64(x[n, ih, iw, g * Cg + ci])
                            s += (xv + a_off) & 0xFF
                        cnt += Cg
        out[g, r] = s - cnt * np.int64(za)


@cuda.jit
def depthwise(x, chw, geo, a_off, za, wd, bias, mult, zy, qlo, qhi, mode, out):
    # Depthwise (G == C, one output channel per group): one thread per output,
    # acc = sum_taps (x' - ZA) * wd[tap, c] + bias[c] (= eq. 8; padded taps add
    # 0), wd (kH*kW, C) int32 = w' - ZB. Threads run over the output's own
    # memory order (pixels fastest for NCHW, channels for NHWC): coalesced
    # stores, and coalesced loads along the same axis.
    H = geo[1]
    W = geo[2]
    C = geo[3]
    Ho = geo[4]
    Wo = geo[5]
    kh = geo[6]
    kw_ = geo[7]
    P = Ho * Wo
    total = geo[0] * P * C
    Nm = mult.shape[1]
    start, step = cuda.grid(1), cuda.gridsize(1)
    for t in range(start, total, step):
        if chw:
            p = t % P
            c = (t // P) % C
            n = t // (P * C)
        else:
            c = t % C
            p = (t // C) % P
            n = t // (P * C)
        ih0 = (p // Wo) * geo[8] - geo[12]
        iw0 = (p % Wo) * geo[9] - geo[13]
        s = np.int64(0)
        for i in range(kh):
            ih = ih0 + i * geo[10]
            if ih >= 0 and ih < H:
                for j in range(kw_):
                    iw = iw0 + j * geo[11]
                    if iw >= 0 and iw < W:
                        if chw:
                            xv = np.int32(x[n, c, ih, iw])
                        else:
                            xv = np.int32(x[n, ih, iw, c])
                        xq = ((xv + a_off) & 0xFF) - za
                        s += np.int64(xq * wd[i * kw_ + j, c])
        v = s + bias[c]
        if mode == 0:
            if chw:
                out[n, c, p] = v
            else:
                out[n, p, c] = v
        else:
            res = requant(v, mult[0, c if Nm > 1 else 0], zy, qlo, qhi, mode)
            if chw:
                out[n, c, p] = res
            else:
                out[n, p, c] = res
