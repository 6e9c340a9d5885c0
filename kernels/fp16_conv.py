"""float16 convolution with float32 sums: implicit GEMM, gathered tiles, depthwise.

Every path computes, for each output (n, m, oh, ow) of group g = m // Mg, one
float32 accumulator in the order of lowprec/conv_half.py (the accuracy
contract), on a zero-padded float32 copy ``xp`` of the input:

    acc = +0
    for i in 0..kh-1, j in 0..kw-1, c in 0..Cg-1:           (c fastest)
        acc = fl32(acc + xp[n, g*Cg + c, oh*sh + i*dh, ow*sw + j*dw] * w[m, c, i, j])
    y = clamp(fl32(acc + bias[m]), lo, hi)  -> float32, or float16 (RNE)

Products of two float16 values are exact in float32, so an FMA and a multiply
then add give the same bits. Padding taps are real products with x = +0 (they
leave a finite sum unchanged; 0 * inf gives NaN, as ONNX's reference does).

``geo`` packs the geometry (int64):
    [N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M]

Paths (lowprec/conv_half.py picks one):
  taps     F16C+FMA tile kernel (6 x 64 float32 registers, strided A) called
           once per tap (i, j) over the Cg channels, A read in place from the
           padded NCHW image: A[r, c] = xp[n, c, ., ow0*sw + r*sw + .], row
           stride sw*4 bytes, k stride Hp*Wp*4 bytes. No im2col at all; a
           tile is up to 6 pixels of one output row (1x1 / stride 1 / no pad:
           of one image). The tile stays in a per-thread scratch between taps.
  gather   few channels per group (the 3-channel stem): 6 output pixels'
           patches gathered from a padded NHWC copy into a per-thread
           (6, K) buffer, then one tile-kernel call over K.
  depthwise (C == group, one output channel each): plain loops vectorized by
           LLVM over the output row's pixels, the kh*kw taps in order.
  portable gathered tiles of TM pixels x Mg channels, plain loops.
Weights (both SIMD paths): [G][Mg/64][K][64] float32, K order (i, j, c).
"""

import numba
import numpy as np
from numba import njit, prange

from .config import PJIT
from .fp16_gemm import (
    MR_MAX,
    NR,
    _cvt16,
    _f16_bits_to_f32,
    f32_to_f16_bits,
    make_tile_kernel,
)

TM = 8  # portable: output pixels per tile

# B rows of 64 float32: the weights are tiny next to the activations, and a
# float16 B costs 4 vcvtph2ps per 24 FMAs on the FP pipes (measured: 3x3c64_56
# ... GFLOP/s with float16 B, ... with float32 B, 2 threads)
_c1 = make_tile_kernel(1, "f32", strided_a=True)
_c2 = make_tile_kernel(2, "f32", strided_a=True)
_c3 = make_tile_kernel(3, "f32", strided_a=True)
_c4 = make_tile_kernel(4, "f32", strided_a=True)
_c5 = make_tile_kernel(5, "f32", strided_a=True)
_c6 = make_tile_kernel(6, "f32", strided_a=True)
assert MR_MAX == 6


@njit(inline="always")
def _tile(mr, a, lda, astep, b, ks, c, ldc, accum):
    if mr == 6:
        _c6(a, lda, astep, b, ks, c, ldc, accum)
    elif mr == 5:
        _c5(a, lda, astep, b, ks, c, ldc, accum)
    elif mr == 4:
        _c4(a, lda, astep, b, ks, c, ldc, accum)
    elif mr == 3:
        _c3(a, lda, astep, b, ks, c, ldc, accum)
    elif mr == 2:
        _c2(a, lda, astep, b, ks, c, ldc, accum)
    else:
        _c1(a, lda, astep, b, ks, c, ldc, accum)


# ---------------------------------------------------------------------------
# input: float16 bits -> zero-padded float32 (NCHW, or NHWC for the gather)


@njit(**PJIT)
def pad_nchw(x, xp, pt, pl):
    # x (N, C, H, W) uint16 float16 bits, C-contiguous; xp (N, C, Hp, Wp)
    # float32 <- x at [pt:pt+H, pl:pl+W], zeros around; vcvtph2ps 16 at a time
    N, C, H, W = x.shape
    Hp, Wp = xp.shape[2], xp.shape[3]
    W16 = W - W % 16
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        src = x[n, c]
        dst = xp[n, c]
        for h in range(Hp):
            if h < pt or h >= pt + H:
                dst[h, :] = 0.0
                continue
            row = dst[h]
            row[:pl] = 0.0
            row[pl + W :] = 0.0
            s0 = src.ctypes.data + (h - pt) * W * 2
            d0 = dst.ctypes.data + (h * Wp + pl) * 4
            for w in range(0, W16, 16):
                _cvt16(s0 + 2 * w, d0 + 4 * w)
            for w in range(W16, W):
                row[pl + w] = _f16_bits_to_f32(src[h - pt, w])


@njit(**PJIT)
def pad_nhwc(x, xp, pt, pl):
    # x (N, C, H, W) uint16 float16 bits -> xp (N, Hp, Wp, C) float32, zeros
    # around (used for few channels: a scalar transposition is cheap there)
    N, C, H, W = x.shape
    Hp, _Wp = xp.shape[1], xp.shape[2]
    for t in prange(N * Hp):
        n = t // Hp
        h = t - n * Hp
        dst = xp[n, h]
        if h < pt or h >= pt + H:
            dst[:, :] = 0.0
            continue
        dst[:pl, :] = 0.0
        dst[pl + W :, :] = 0.0
        for c in range(C):
            src = x[n, c, h - pt]
            for w in range(W):
                dst[pl + w, c] = _f16_bits_to_f32(src[w])


# ---------------------------------------------------------------------------
# epilogue: tile (pixels x channels) -> NCHW output


@njit(inline="always")
def _epilogue(tile, mr, nc, p0, m0, HW, bias, has_bias, lo, hi, mode, out32, out16):
    # tile (>=mr, >=nc) float32 sums of pixels p0.. (flat over N*Ho*Wo) and
    # channels m0..; out (N, M, Ho*Wo) float32 (mode 0) or float16 bits (1).
    # y = clamp(fl32(acc + bias)) as kernels/fp16_gemm._epilogue; NaN passes.
    # Plain 2-/3-index element access: a numba sub-array view per row costs
    # atomic reference counting (measured 3x on the stem's epilogue).
    for r in range(mr):
        for j in range(nc):
            v = tile[r, j]
            if has_bias:
                v = np.float32(v + bias[m0 + j])
            v = lo if v < lo else v
            tile[r, j] = hi if v > hi else v
    r0 = 0
    while r0 < mr:
        # the tile's pixels of one image: [r0, r1)
        n = (p0 + r0) // HW
        q0 = p0 + r0 - n * HW - r0
        r1 = min(mr, r0 + HW - (q0 + r0))
        if mode == 0:
            for j in range(nc):
                for r in range(r0, r1):
                    out32[n, m0 + j, q0 + r] = tile[r, j]
        else:
            for j in range(nc):
                for r in range(r0, r1):
                    out16[n, m0 + j, q0 + r] = f32_to_f16_bits(tile[r, j])
        r0 = r1


# ---------------------------------------------------------------------------
# SIMD: taps (implicit GEMM in place) and gather


@njit(inline="always")
def _tile_of(tt, geo, flat):
    # tile tt of the pixel order -> (first flat pixel, pixels, n, oh, ow0).
    # A row (of Wo pixels, or of Ho*Wo when flat) is cut into ceil(L/6) tiles
    # of balanced widths (56 -> 6 x 6 + 4 x 5, not 9 x 6 + 2).
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    L = Ho * Wo if flat else Wo
    nt = (L + MR_MAX - 1) // MR_MAX
    row = tt // nt
    k = tt - row * nt
    w0 = (k * L) // nt
    w1 = ((k + 1) * L) // nt
    if flat:
        return row * L + w0, w1 - w0, row, 0, w0
    n = row // Ho
    oh = row - n * Ho
    return row * Wo + w0, w1 - w0, n, oh, w0


@njit(nogil=True, cache=True)
def _simd_job(
    t, nt, nblk, pb, gather, flat, xp, bp, geo, sa, sp, bias, has_bias, lo, hi,
    mode, out32, out16,
):  # fmt: skip
    # job t = (group, panel block, pixel tile), pixel tile fastest: a thread's
    # contiguous prange chunk keeps streaming the same weight panels
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    tt = t % nt
    rest = t // nt
    blk = rest % nblk
    g = rest // nblk
    tid = numba.get_thread_id()
    tile = sp[tid]
    ctile = tile.ctypes.data
    npg = bp.shape[1]
    HW = Ho * Wo
    if gather:
        # pixel tiles of 6 over N*Ho*Wo; K-contiguous rows in sa[tid]
        p0 = tt * MR_MAX
        mr = min(MR_MAX, N * HW - p0)
        _gather(xp, geo, p0, mr, g, sa[tid])
        ka = sa.shape[2]
        for jn in range(blk * pb, min(npg, blk * pb + pb)):
            b0 = bp.ctypes.data + g * bp.strides[0] + jn * bp.strides[1]
            _tile(mr, sa[tid].ctypes.data, ka * 4, 4, b0, ka, ctile, NR, 0)
            nc = min(NR, Mg - jn * NR)
            _epilogue(
                tile, mr, nc, p0, g * Mg + jn * NR, HW, bias, has_bias, lo, hi,
                mode, out32, out16,
            )  # fmt: skip
        return
    p0, mr, n, oh, ow0 = _tile_of(tt, geo, flat)
    plane = Hp * Wp
    # xp[n, g*Cg, oh*sh, ow0*sw] and the A strides (bytes)
    a0 = xp.ctypes.data + 4 * (((n * C + g * Cg) * Hp + oh * sh) * Wp + ow0 * sw)
    lda = 4 * sw
    astep = 4 * plane
    for jn in range(blk * pb, min(npg, blk * pb + pb)):
        b0 = bp.ctypes.data + g * bp.strides[0] + jn * bp.strides[1]
        for i in range(kh):
            for j in range(kw):
                tap = i * kw + j
                a = a0 + 4 * (i * dh * Wp + j * dw)
                b = b0 + tap * Cg * NR * 4
                _tile(mr, a, lda, astep, b, Cg, ctile, NR, tap)
        nc = min(NR, Mg - jn * NR)
        _epilogue(
            tile, mr, nc, p0, g * Mg + jn * NR, HW, bias, has_bias, lo, hi, mode,
            out32, out16,
        )  # fmt: skip


@njit(inline="always")
def _gather(xp, geo, p0, mr, g, dst):
    # dst (>=mr, ka) float32 <- patches of output pixels p0..p0+mr-1, group g,
    # from xp (N, Hp, Wp, C) NHWC; K order (i, j, c); ka = K
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    xf = xp.reshape(-1)
    ka = dst.shape[1]
    df = dst.reshape(-1)
    ucg = np.uint64(Cg)
    # with dw == 1 and one group a kernel row's taps are kw*C contiguous values
    run = np.uint64(kw * Cg) if (dw == 1 and G == 1) else ucg
    jstep = kw if (dw == 1 and G == 1) else 1
    for r in range(mr):
        p = p0 + r
        n = p // (Ho * Wo)
        q = p - n * Ho * Wo
        oh = q // Wo
        ow = q - oh * Wo
        d0 = np.uint64(r * ka)
        for i in range(kh):
            rowoff = (n * Hp + oh * sh + i * dh) * Wp
            for j in range(0, kw, jstep):
                s0 = np.uint64((rowoff + ow * sw + j * dw) * C + g * Cg)
                o = d0 + np.uint64((i * kw + j) * Cg)
                for c in range(run):
                    df[o + c] = xf[s0 + c]


@njit(**PJIT)
def conv_simd(
    gather, flat, pb, xp, bp, geo, sa, sp, bias, has_bias, lo, hi, mode, out32,
    out16,
):  # fmt: skip
    # xp: (N, C, Hp, Wp) float32 (taps) or (N, Hp, Wp, C) (gather); bp (G, NP,
    # K, NR) float32 packed weights, K order (i, j, c); sa (threads, 6, K)
    # float32 gather scratch; sp (threads, 6, NR) float32 tile scratch; out
    # (N, M, Ho*Wo) float32 (mode 0) / float16 bits (mode 1), the other a dummy
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    if gather:
        nt = (N * Ho * Wo + MR_MAX - 1) // MR_MAX
    elif flat:
        nt = N * ((Ho * Wo + MR_MAX - 1) // MR_MAX)
    else:
        nt = N * Ho * ((Wo + MR_MAX - 1) // MR_MAX)
    nblk = (bp.shape[1] + pb - 1) // pb
    for t in prange(nt * nblk * G):
        _simd_job(
            t, nt, nblk, pb, gather, flat, xp, bp, geo, sa, sp, bias, has_bias,
            lo, hi, mode, out32, out16,
        )  # fmt: skip


# ---------------------------------------------------------------------------
# portable: gathered tiles of TM pixels x Mg channels, plain loops


@njit(nogil=True, cache=True)
def _portable_job(
    t, mt, xp, wk, geo, sa, sp, bias, has_bias, lo, hi, mode, out32, out16
):  # fmt: skip
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    HW = Ho * Wo
    g = t // mt
    p0 = (t - g * mt) * TM
    mr = min(TM, N * HW - p0)
    tid = numba.get_thread_id()
    a = sa[tid]
    acc = sp[tid]
    K = kh * kw * Cg
    # im2col rows in K order (i, j, c) from the NCHW image
    for r in range(mr):
        p = p0 + r
        n = p // HW
        q = p - n * HW
        oh = q // Wo
        ow = q - oh * Wo
        ar = a[r]
        for i in range(kh):
            for j in range(kw):
                k0 = (i * kw + j) * Cg
                for c in range(Cg):
                    ar[k0 + c] = xp[n, g * Cg + c, oh * sh + i * dh, ow * sw + j * dw]
    wg = wk[g]
    for r in range(mr):
        accr = acc[r]
        for jj in range(Mg):
            accr[jj] = np.float32(0.0)
        ar = a[r]
        for k in range(K):
            ak = ar[k]
            wr = wg[k]
            for jj in range(Mg):
                accr[jj] = np.float32(accr[jj] + np.float32(ak * wr[jj]))
    _epilogue(
        acc, mr, Mg, p0, g * Mg, HW, bias, has_bias, lo, hi, mode, out32, out16
    )  # fmt: skip


@njit(**PJIT)
def conv_portable(xp, wk, geo, sa, sp, bias, has_bias, lo, hi, mode, out32, out16):
    # xp (N, C, Hp, Wp) float32, wk (G, K, Mg) float32, K order (i, j, c);
    # sa (threads, TM, K), sp (threads, TM, Mg) float32 scratch
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    mt = (N * Ho * Wo + TM - 1) // TM
    for t in prange(mt * G):
        _portable_job(
            t, mt, xp, wk, geo, sa, sp, bias, has_bias, lo, hi, mode, out32, out16
        )


# ---------------------------------------------------------------------------
# depthwise: one output channel per input channel, vectorized over pixels


@njit(inline="always")
def _dw_finish(acc, a0, Wo, b, has_bias, lo, hi, mode, out32, out16, n, c, q0):
    # y = clamp(fl32(acc + bias)) for one output row acc[a0:a0+Wo], stored.
    # Separate loops per mode: with the float16 branch inside, LLVM left the
    # float32 loop scalar (measured: half the depthwise time).
    for ow in range(a0, a0 + Wo):
        v = acc[ow]
        if has_bias:
            v = np.float32(v + b)
        v = lo if v < lo else v
        acc[ow] = hi if v > hi else v
    if mode == 0:
        for ow in range(Wo):
            out32[n, c, q0 + ow] = acc[a0 + ow]
    else:
        for ow in range(Wo):
            out16[n, c, q0 + ow] = f32_to_f16_bits(acc[a0 + ow])


@njit(inline="always")
def _dw_load_plane(x, n, c, pt, pl, pw, Hp, dst):
    # dst[h*pw + w] (flat) <- zero-padded float32 plane (n, c) of x (float16
    # bits), padded rows Hp, row pitch pw; vcvtph2ps 16 at a time
    H, W = x.shape[2], x.shape[3]
    W16 = W - W % 16
    dst[: Hp * pw] = 0.0
    src = x[n, c]
    s0 = src.ctypes.data
    d0 = dst.ctypes.data
    for h in range(H):
        sr = s0 + h * W * 2
        dr = d0 + ((h + pt) * pw + pl) * 4
        for w in range(0, W16, 16):
            _cvt16(sr + 2 * w, dr + 4 * w)
        for w in range(W16, W):
            dst[(h + pt) * pw + pl + w] = _f16_bits_to_f32(src[h, w])


@njit(nogil=True, cache=True)
def _dw_plane(t, fused, x, xp, wd, geo, pt, pl, sc, acc, bias, has_bias, lo, hi, mode,
              out32, out16):  # fmt: skip
    # output plane (n, c). fused: the input plane is converted from float16
    # into the per-thread scratch sc (flat, pitch Wp) here, no padded copy of
    # the whole input; else it is read from xp (N, C, Hp, Wp) float32.
    # 3x3, stride 1, dilation 1: one flat loop over u = oh*Wp + ow for all
    # rows at once (the Wp - Wo columns past each row are computed and
    # dropped), 9 taps unrolled so the sum stays in a register: LLVM
    # vectorizes it over u with no per-row remainder. Otherwise one pass per
    # tap over each output row. Sum order (i, j) as every path.
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    n = t // C
    c = t - n * C
    if fused:
        _dw_load_plane(x, n, c, pt, pl, Wp, Hp, sc)
        src = sc
    else:
        src = xp[n, c].reshape(-1)
    wc = wd[c]
    b = bias[c] if has_bias else np.float32(0.0)
    z = np.float32(0.0)
    if kh == 3 and kw == 3 and dh == 1 and dw == 1 and sh == 1 and sw == 1:
        w0, w1, w2, w3, w4, w5, w6, w7, w8 = (
            wc[0], wc[1], wc[2], wc[3], wc[4], wc[5], wc[6], wc[7], wc[8],
        )  # fmt: skip
        P = Wp
        # u + 2P + 2 < Hp*P for every u < U: the last row's 2 dropped columns
        # are left out (no read past the plane)
        U = np.uint64(Ho * P - 2)
        x1 = src[P:]
        x2 = src[2 * P :]
        # unsigned indices: numba's negative-index wraparound otherwise stays
        # in the loop and LLVM does not vectorize it (as kernels/int8_conv.py)
        for u in range(U):
            s = np.float32(z + np.float32(src[u] * w0))
            s = np.float32(s + np.float32(src[u + 1] * w1))
            s = np.float32(s + np.float32(src[u + 2] * w2))
            s = np.float32(s + np.float32(x1[u] * w3))
            s = np.float32(s + np.float32(x1[u + 1] * w4))
            s = np.float32(s + np.float32(x1[u + 2] * w5))
            s = np.float32(s + np.float32(x2[u] * w6))
            s = np.float32(s + np.float32(x2[u + 1] * w7))
            acc[u] = np.float32(s + np.float32(x2[u + 2] * w8))
        for oh in range(Ho):
            _dw_finish(
                acc, oh * P, Wo, b, has_bias, lo, hi, mode, out32, out16, n, c,
                oh * Wo,
            )  # fmt: skip
        return
    if kh == 3 and kw == 3 and dh == 1 and dw == 1 and sw == 2:
        w0, w1, w2, w3, w4, w5, w6, w7, w8 = (
            wc[0], wc[1], wc[2], wc[3], wc[4], wc[5], wc[6], wc[7], wc[8],
        )  # fmt: skip
        for oh in range(Ho):
            x0 = src[oh * sh * Wp :]
            x1 = x0[Wp:]
            x2 = x0[2 * Wp :]
            for ow in range(np.uint64(Wo)):
                s = np.float32(z + np.float32(x0[2 * ow] * w0))
                s = np.float32(s + np.float32(x0[2 * ow + 1] * w1))
                s = np.float32(s + np.float32(x0[2 * ow + 2] * w2))
                s = np.float32(s + np.float32(x1[2 * ow] * w3))
                s = np.float32(s + np.float32(x1[2 * ow + 1] * w4))
                s = np.float32(s + np.float32(x1[2 * ow + 2] * w5))
                s = np.float32(s + np.float32(x2[2 * ow] * w6))
                s = np.float32(s + np.float32(x2[2 * ow + 1] * w7))
                acc[ow] = np.float32(s + np.float32(x2[2 * ow + 2] * w8))
            _dw_finish(
                acc, 0, Wo, b, has_bias, lo, hi, mode, out32, out16, n, c, oh * Wo
            )
        return
    for oh in range(Ho):
        for ow in range(Wo):
            acc[ow] = z
        for i in range(kh):
            r0 = (oh * sh + i * dh) * Wp
            for j in range(kw):
                wv = wc[i * kw + j]
                xr = src[r0 + j * dw :]
                if sw == 2:
                    for ow in range(Wo):
                        acc[ow] = np.float32(acc[ow] + np.float32(xr[2 * ow] * wv))
                else:
                    for ow in range(Wo):
                        acc[ow] = np.float32(acc[ow] + np.float32(xr[ow * sw] * wv))
        _dw_finish(acc, 0, Wo, b, has_bias, lo, hi, mode, out32, out16, n, c, oh * Wo)


@njit(**PJIT)
def depthwise(fused, x, xp, wd, geo, pt, pl, sc, acc, bias, has_bias, lo, hi, mode,
              out32, out16):  # fmt: skip
    # x (N, C, H, W) float16 bits (fused) or xp (N, C, Hp, Wp) float32 padded;
    # wd (C, kh*kw) float32; sc (threads, Hp*Wp) and acc (threads, Ho*Wp)
    # float32 scratch; out (N, C, Ho*Wo). One job per (image, channel) plane.
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    for t in prange(N * C):
        tid = numba.get_thread_id()
        _dw_plane(
            t, fused, x, xp, wd, geo, pt, pl, sc[tid], acc[tid], bias, has_bias,
            lo, hi, mode, out32, out16,
        )  # fmt: skip
