"""INT8 convolution kernels: implicit GEMM on the VNNI tile, portable loops, depthwise.

Every path computes ONNX ConvInteger's exact sum (docs/quantization.md, eqs. 5-9,
with the GEMM's rows = output pixels, columns = output channels of one group):

    P[p, m]   = sum_{i,j,c} x'[n, oh*sh + i*dh, ow*sw + j*dw, g*Cg + c] * w'[m, c, i, j]
    acc[p, m] = P - ZA*colsum(w')[m] - ZB[m]*rowsum[g, p] + bias[m]          (eq. 8)

on a padded NHWC copy (or the caller's NHWC array itself) of the input

  xp  (N, Hp, Wp, C) uint8 = x' = x (+128 if int8), border filled with ZA = the
      input zero point in x' terms, i.e. a real 0: padding taps contribute
      (ZA - ZA) * w = 0 and the zero-point expansion stays exact.

The zero points, bias and requantization are applied per tile: on the VNNI
path by the fused tile of kernels/int8_gemm_vnni.py, on the portable path by
``kernels/requant.py::epilogue_tile`` (mode 0 int32, 1 requantized, 2 float32).
``geo`` packs the geometry (int64):
    [N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M]
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .config import PJIT
from .int8_gemm_amx import AMX_MR, _atile16, _atile32, amx_begin, amx_end
from .int8_gemm_vnni import (
    MR_MAX,
    NR,
    _fused_args,
    narrow_epilogue,
    panel_colsum,
    run_channel_tile,
    run_fused_tile,
    run_seg_tile,
)
from .int8_gemm_ymm import AVX2_MR as YMR
from .int8_gemm_ymm import AVX2_NR as YNR
from .int8_gemm_ymm import ROW_BYTES, run_avx2_tile, widen_rows
from .ir_util import loop as ir_loop
from .ir_util import splat, target_has
from .layout import copy_bytes
from .requant import epilogue_tile

# ---------------------------------------------------------------------------
# row sums (eq. 9), only for nonzero weight zero points


@njit(**PJIT)
def row_sums(xp, geo, za, out):
    # out (G, rows) int64 = rowsum of eq. 9 per group: sum over the taps of
    # (x' - ZA), padded taps included (they add 0)
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    K = kh * kw * Cg
    rows = N * Ho * Wo
    for p in prange(rows):
        n = p // (Ho * Wo)
        q = p - n * Ho * Wo
        oh = q // Wo
        ow = q - oh * Wo
        for g in range(G):
            s = 0
            for i in range(kh):
                for j in range(kw):
                    px = xp[n, oh * sh + i * dh, ow * sw + j * dw]
                    for c in range(g * Cg, g * Cg + Cg):
                        s += np.int64(px[c])
            out[g, p] = s - K * za


@intrinsic
def _memcpy(typingctx, dst, src, n):
    # memcpy of n bytes between int64 addresses (llvm.memcpy: a libc call for a
    # run-time size); numba's byte loop did not vectorize
    def codegen(context, builder, sig, args):
        i8p = ir.IntType(8).as_pointer()
        d = builder.inttoptr(args[0], i8p)
        s = builder.inttoptr(args[1], i8p)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i8p, ir.IntType(64), ir.IntType(1)])
        fn = cgutils.get_or_insert_function(
            builder.module, fnty, "llvm.memcpy.p0.p0.i64"
        )
        builder.call(fn, [d, s, args[2], ir.Constant(ir.IntType(1), 0)])
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64), codegen


@njit(inline="always")
def _copy(dst, src, n):
    # n bytes: inline moves (layout.copy_bytes; the stem's 21-byte runs cost a
    # libc call each otherwise: ~40% of that layer); a call below 8 bytes
    if n < 8:
        _memcpy(dst, src, n)
    else:
        copy_bytes(dst, src, n)


@njit(inline="always")
def _pixel(p, Ho, Wo):
    # output pixel index -> (image, row, column)
    n = p // (Ho * Wo)
    q = p - n * Ho * Wo
    oh = q // Wo
    return n, oh, q - oh * Wo


@njit(inline="always")
def _next_pixel(n, oh, ow, Ho, Wo):
    # the next output pixel by stepping (two divisions per pixel cost part of
    # the 14 % below)
    ow += 1
    if ow == Wo:
        ow = 0
        oh += 1
        if oh == Ho:
            oh = 0
            n += 1
    return n, oh, ow


@njit(inline="always")
def _gather(xp, geo, m0, mr, g, dst):
    # dst (>=mr, >=K) uint8 <- im2col rows of output pixels m0..m0+mr-1, group g,
    # K order (i, j, c). The bytes past K are left alone: the VNNI caller zeroes
    # the buffer once (they meet zero weights; conv_avx2's tiles never read
    # them, or meet zero weight rows); zeroing them per row here, and two
    # divisions per row, cost 14 % of the 3x3 32->64 layer (1.64 -> 1.41 ms,
    # 62 x 14 x 14, 1 thread). With one group and no horizontal dilation a
    # kernel row's kw taps are one run of kw*C input bytes: one copy per kernel
    # row (measured: the per-byte loop made the 3x3 64->64 layer 0.63x the
    # speed of the same GEMM).
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    x0 = xp.ctypes.data
    d0 = dst.ctypes.data
    run = dw == 1 and Cg == C
    n, oh, ow = _pixel(m0, Ho, Wo)
    for r in range(mr):
        if r:
            n, oh, ow = _next_pixel(n, oh, ow, Ho, Wo)
        dr = d0 + r * dst.strides[0]
        for i in range(kh):
            rowoff = (n * Hp + oh * sh + i * dh) * Wp + ow * sw
            if run:
                _copy(dr + i * kw * C, x0 + rowoff * C, kw * C)
            else:
                for j in range(kw):
                    src = x0 + (rowoff + j * dw) * C + g * Cg
                    _copy(dr + (i * kw + j) * Cg, src, Cg)


@njit(inline="always")
def _row_starts(xp, geo, m0, mr, starts):
    # starts[r] = address of output pixel m0+r's first tap in the padded NHWC
    # input (one group, dw == 1): its K row is kh runs of kw*C bytes, one per
    # kernel row, dh*Wp*C bytes apart (the implicit GEMM read in place)
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    x0 = xp.ctypes.data
    n, oh, ow = _pixel(m0, Ho, Wo)
    for r in range(mr):
        starts[r] = x0 + ((n * Hp + oh * sh) * Wp + ow * sw) * C
        n, oh, ow = _next_pixel(n, oh, ow, Ho, Wo)


# ---------------------------------------------------------------------------
# AVX-512 VNNI: implicit GEMM on the 6 x 64 tile of kernels/int8_gemm_vnni.py


@njit(inline="always")
def _job_index(t, mt, tj, nblk):
    # conv_vnni / conv_avx2 job t -> (run of tj pixel tiles, panel block,
    # group), the run fastest
    nrun = (mt + tj - 1) // tj
    rest = t // nrun
    return t % nrun, rest % nblk, rest // nblk


@njit(inline="always")
def _group_narrow(epi, K, pmax):
    # the fused tiles' epilogue case (narrow_epilogue): rs holds row sums for
    # every group or for none (eq. 8), so group 0's epilogue decides for all;
    # pmax bounds |P| (the packed weights' 255 * max sum |w'|)
    return narrow_epilogue(
        (epi[0], epi[1][0], epi[2], epi[3], epi[4], epi[5], epi[6], epi[7], epi[8],
         epi[9], epi[10]),
        K,
        pmax,
    )  # fmt: skip


# called, not inlined, from the prange driver: numba's parfor passes rewrite the
# whole loop body and took minutes with the tiles and epilogue inlined (gemm too)
@njit(nogil=True, cache=True)
def _vnni_job(t, mt, tj, nblk, pb, direct, xp, bp, geo, sa, st, epi, narrow, out):
    # job t = (group, panel block, run of tj pixel tiles), the run fastest: a
    # thread's contiguous prange chunk keeps streaming the same weight panels.
    # Runs of tiles, not single tiles: with K = 288 a tile is ~0.5 us of
    # vpdpbusd and the per-job call and setup were a large share of it.
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    za, rs, cs, zb, bias, mult, zy, qlo, qhi, mode, fbias = epi
    rows = N * Ho * Wo
    ka = sa.shape[2]
    run, blk, g = _job_index(t, mt, tj, nblk)
    tid = numba.get_thread_id()
    buf = sa[tid]
    starts = st[tid]
    # the tile's epilogue sees group g's row sums as the GEMM's per-row term
    epi_g = (za, rs[g], cs, zb, bias, mult, zy, qlo, qhi, mode, fbias)
    npg = bp.shape[1]
    b0 = bp.ctypes.data + g * bp.strides[0]
    for tile in range(run * tj, min(mt, run * tj + tj)):
        m0 = tile * MR_MAX
        mr = min(MR_MAX, rows - m0)
        if direct == 2:
            # rows read in place: kh runs of kw*C bytes (no gather)
            _row_starts(xp, geo, m0, mr, starts)
            run4 = kw * C // 4
            for jn in range(blk * pb, min(npg, blk * pb + pb)):
                run_seg_tile(
                    mr, starts.ctypes.data, dh * Wp * C, b0 + jn * bp.strides[1],
                    kh * run4, run4, m0, g * Mg + jn * NR, min(NR, Mg - jn * NR),
                    epi_g, narrow, xp, out,
                )  # fmt: skip
            continue
        if direct:
            # 1x1, stride 1, one group: the (padded) input pixels are the rows
            a_addr = xp.ctypes.data + m0 * C
            lda = C
            kk = C
        else:
            _gather(xp, geo, m0, mr, g, buf)
            a_addr = buf.ctypes.data
            lda = ka
            # the K loop runs over K bytes, not the row's 64-byte padding:
            # B holds ceil(K/4) k4 rows per panel (reading ka/4 rows overran
            # the last panel and cost 11 % at K = 288)
            kk = max(kh * kw * Cg, 4)
        k4 = kk // 4
        for jn in range(blk * pb, min(npg, blk * pb + pb)):
            run_fused_tile(
                mr,
                a_addr,
                lda,
                b0 + jn * bp.strides[1],
                k4,
                kk - 4 * k4,
                m0,
                g * Mg + jn * NR,
                min(NR, Mg - jn * NR),
                epi_g,
                narrow,
                xp,
                out,
            )


@njit(**PJIT)
def conv_vnni(xp, bp, geo, pb, tj, direct, sa, st, epi, pmax, out):
    # xp (N,Hp,Wp,C) uint8, bp (G,NP,K4,NR,4) int8 (pack_b per group, K order
    # (i,j,c)), sa (threads,MR_MAX,ka) uint8 gather scratch (ka >= max(K, 4)),
    # st (threads,MR_MAX) int64 row starts, epi = the GEMM epilogue tuple with
    # rs (G,1|rows) int64, pmax a bound on |P| (narrow_epilogue), out (rows,
    # M); tj pixel tiles per job. direct: 0
    # gather each tile's im2col rows; 1 the input pixels are the rows (1x1,
    # stride 1); 2 read the rows in place as kernel-row runs (one group,
    # dw == 1, kw*C a multiple of 4)
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    rows = N * Ho * Wo
    mt = (rows + MR_MAX - 1) // MR_MAX
    nblk = (bp.shape[1] + pb - 1) // pb
    nrun = (mt + tj - 1) // tj
    narrow = _group_narrow(epi, kh * kw * Cg, pmax)
    for t in prange(nrun * nblk * G):
        _vnni_job(t, mt, tj, nblk, pb, direct, xp, bp, geo, sa, st, epi, narrow, out)


# ---------------------------------------------------------------------------
# AMX (isa "amx"): conv_vnni's jobs on int8_gemm_amx's 32 x 64 tile blocks.
# A job's im2col rows are gathered into per-thread scratch, 64-byte aligned
# rows of Kp bytes (or, 1x1 stride 1 with C a multiple of 64, read from the
# padded pixels in place), then run panel by panel over the job's tiles (a
# weight panel stays in L1 across them). Rows past the last 32-row tile run
# on a 16-row block and then on the zmm tiles, as the GEMM's.


@njit(inline="always")
def _amx_conv_job(t, mt, tj, nblk, pb, direct, xp, bp, geo, buf, epi, narrow, out):
    # job t = (group, panel block, run of tj 32-row tiles), the run fastest;
    # buf (tj*32, Kp) this thread's gather scratch
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    za, rs, cs, zb, bias, mult, zy, qlo, qhi, mode, fbias = epi
    rows = N * Ho * Wo
    ka = buf.shape[1]
    run, blk, g = _job_index(t, mt, tj, nblk)
    epi_g = (za, rs[g], cs, zb, bias, mult, zy, qlo, qhi, mode, fbias)
    npg = bp.shape[1]
    b0 = bp.ctypes.data + g * bp.strides[0]
    k4 = ka // 4
    r0 = run * tj * AMX_MR
    r1 = min(rows, r0 + tj * AMX_MR)
    if direct:
        a0 = xp.ctypes.data + r0 * C
        lda = C
    else:
        _gather(xp, geo, r0, r1 - r0, g, buf)  # rows r0.. to buf rows 0..
        a0 = buf.ctypes.data
        lda = ka
    m_amx = r0 + (r1 - r0) // 16 * 16
    for jn in range(blk * pb, min(npg, blk * pb + pb)):
        b = b0 + jn * bp.strides[1]
        n0 = g * Mg + jn * NR
        nv = min(NR, Mg - jn * NR)
        for m0 in range(r0, m_amx, AMX_MR):
            args = _fused_args(a0 + (m0 - r0) * lda, lda, b, 4 * NR, k4, 0, m0, n0,
                               nv, epi_g, narrow, xp, out)  # fmt: skip
            if m0 + AMX_MR <= m_amx:
                _atile32(*args)
            else:
                _atile16(*args)
        for m0 in range(m_amx, r1, MR_MAX):
            run_fused_tile(min(MR_MAX, r1 - m0), a0 + (m0 - r0) * lda, lda, b, k4,
                           0, m0, n0, nv, epi_g, narrow, xp, out)  # fmt: skip


@njit(nogil=True, cache=True)
def _amx_conv_jobs(t0, t1, mt, tj, nblk, pb, direct, xp, bp, geo, buf, epi, narrow,
                   out):  # fmt: skip
    # jobs t0..t1-1 inside one tile configuration (int8_gemm_amx._amx_jobs)
    amx_begin()
    for t in range(t0, t1):
        _amx_conv_job(t, mt, tj, nblk, pb, direct, xp, bp, geo, buf, epi, narrow, out)
    amx_end()


@njit(**PJIT)
def conv_amx(xp, bp, geo, pb, tj, direct, sa, epi, pmax, threads, out):
    # xp (N,Hp,Wp,C) uint8, bp (G,NP,K4p,NR,4) int8 (int8_gemm_amx.pack_b per
    # group: K padded to a multiple of 64), sa (threads, tj*32, Kp) uint8
    # gather scratch on 64-byte aligned rows (Kp = 4*K4p), epi, pmax, out as
    # conv_vnni; tj 32-row tiles per job; direct 1: the padded pixels are the
    # rows (1x1, stride 1, one group, C == Kp); threads: jobs are split in
    # equal runs, one tile configuration and one row of sa per run
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    rows = N * Ho * Wo
    mt = (rows + AMX_MR - 1) // AMX_MR
    nblk = (bp.shape[1] + pb - 1) // pb
    jobs = (mt + tj - 1) // tj * nblk * G
    narrow = _group_narrow(epi, bp.shape[2] * 4, pmax)
    for i in prange(threads):
        _amx_conv_jobs(i * jobs // threads, (i + 1) * jobs // threads, mt, tj, nblk,
                       pb, direct, xp, bp, geo, sa[i], epi, narrow, out)  # fmt: skip


# ---------------------------------------------------------------------------
# AVX2 without VNNI: the same jobs as conv_vnni on int8_gemm_ymm's exact
# vpmaddwd tiles (6 x 16). A job's im2col rows are gathered as bytes into
# per-thread scratch (or, 1x1 stride 1, read from the pixels themselves) and
# widened to the tiles' uint16 layout there (int8_gemm_ymm.widen_rows), then
# run panel by panel. It replaced a whole-image gather, a serial pack_a16 pass
# and the GEMM (lowprec/conv.py has the figures); groups other than depthwise
# ran portable loops before (128 channels, 4 groups, 28^2: 5.2 -> 0.68 ms).


@njit(nogil=True, cache=True)
def _avx2_job(t, mt, tj, nblk, pb, direct, xp, bp, geo, sa, s16, epi, narrow, out):
    # job t as _vnni_job's: (group, panel block, run of tj pixel tiles)
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    za, rs, cs, zb, bias, mult, zy, qlo, qhi, mode, fbias = epi
    rows = N * Ho * Wo
    K = kh * kw * Cg
    k2 = (K + 1) // 2
    run, blk, g = _job_index(t, mt, tj, nblk)
    tid = numba.get_thread_id()
    buf = sa[tid]
    a16 = s16[tid]
    akstep = YMR * ROW_BYTES
    kq = -(-K // 16) * 16
    epi_g = (za, rs[g], cs, zb, bias, mult, zy, qlo, qhi, mode, fbias)
    npg = bp.shape[1]
    b0 = bp.ctypes.data + g * bp.strides[0]
    pixels = xp.reshape(-1, C)
    t0 = run * tj
    t1 = min(mt, t0 + tj)
    # the run's rows first, then panel by panel over them: a weight panel stays
    # in L1 across the run's tiles (tile by tile over all panels read them
    # from L2: 3x3 64->64 at 56^2, 1 thread, 2.4 vs 1.6 ms of tiles)
    for tile in range(t0, t1):
        m0 = tile * YMR
        if direct:
            widen_rows(pixels, m0, YMR, tile - t0, a16)
        else:
            _gather(xp, geo, m0, min(YMR, rows - m0), g, buf)
            # whole 16-byte chunks: the bytes past K meet zero weight rows or
            # no pair at all (the stem's K = 147 had a byte loop per row)
            widen_rows(buf[:, :kq], 0, YMR, tile - t0, a16)
    for jn in range(blk * pb, min(npg, blk * pb + pb)):
        b = b0 + jn * bp.strides[1]
        n0 = g * Mg + jn * YNR
        nvalid = min(YNR, Mg - jn * YNR)
        for tile in range(t0, t1):
            m0 = tile * YMR
            run_avx2_tile(
                min(YMR, rows - m0), a16.ctypes.data + (tile - t0) * a16.strides[0],
                akstep, b, k2, m0, n0, nvalid, epi_g, narrow, xp, out,
            )  # fmt: skip


@njit(**PJIT)
def conv_avx2(xp, bp, geo, pb, tj, direct, sa, s16, epi, pmax, out):
    # xp (N,Hp,Wp,C) uint8, bp (G,NP,K2,16,2) int16 (pack_b16 per group, K order
    # (i,j,c)), sa (threads,6,ka) uint8 gather scratch (ka >= 16 Q), s16
    # (threads, >=tj,Q,6,16) uint16 tiles (a16_shape(6 tj, K)); epi, pmax, out,
    # tj as conv_vnni; direct: 1 the (padded) input pixels are the rows (1x1,
    # stride 1, one group), 0 gather
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    rows = N * Ho * Wo
    mt = (rows + YMR - 1) // YMR
    nblk = (bp.shape[1] + pb - 1) // pb
    nrun = (mt + tj - 1) // tj
    narrow = _group_narrow(epi, kh * kw * Cg, pmax)
    for t in prange(nrun * nblk * G):
        _avx2_job(t, mt, tj, nblk, pb, direct, xp, bp, geo, sa, s16, epi, narrow, out)


# ---------------------------------------------------------------------------
# AVX-512 VNNI on NCHW data without transposes: output channels are the GEMM's
# rows (the weights are the broadcast operand), output pixels its columns, so
# the tile writes NCHW output rows directly. The pixels are the vpdpbusd's
# signed vector operand: b = x' - 128 (uint8 x ^ 0x80, int8 x as is), and
# the weights its unsigned one, a = w' + 128. With ZW = ZB + 128 and
# ZX = ZA - 128 (docs/quantization.md, eq. 8 with the roles swapped):
#
#     acc[m, p] = P[m, p] - ZW[m] * colsum(b)[p] + rbias[m]
#     rbias[m]  = bias[m] - ZX * sum_k (a[m, k] - ZW[m])
#
# The input is brought once to "NCHW4": blocks of 4 channels interleaved per
# pixel, padded with the zero point (b = ZX: those taps add 0), and for a
# horizontal stride S the columns split by phase (w % S), so that the taps of
# consecutive output pixels are consecutive 4-byte words for any stride:
#
#   x4 (N, G*Cg4, Hp, S, Wq) uint32,  x4[n, g*Cg4 + c4, h, ph, q] = the bytes
#      b of channels g*Cg + 4*c4 + (0..3) at padded (h, w = q*S + ph), channels
#      past Cg filled with ZX.
#
# A job packs one 64-pixel panel of im2col(b) as [K4][64][4] (K order
# (i, j, c4, 4 channels), one copy per output-row run of a tap row) into
# per-thread scratch, sums its columns with one more vpdpbusd row of ones, and
# runs the group's channel tiles over it. 1x1 stride-1 unpadded convolutions
# skip x4: each job interleaves its panel straight from the NCHW rows
# (_pack_direct). Few channels per group: a dense K instead of the channel
# blocks (conv_nchw4_dense, below). geo4 (int64):
#   [N, C, H, W, G, Cg, Cg4, Hp, S, Wq, Ho, Wo, kh, kw, sh, sw, dh, dw, pt, pl,
#    M, Mg]


# to_nchw4 tasks: runs of this many padded rows of one channel block (the
# per-block setup, with its integer divisions, once per run: per row it took
# a third of the 256 x 56^2 interleave)
NCHW4_ROWS = 8


@njit(**PJIT)
def to_nchw4(x, flip, fill, geo4, x4):
    # x (N,C,H,W) uint8 raw bytes (flip 0x80: uint8 x -> b), x4 (N*G*Cg4*Hp*S*Wq
    # + slack) uint32 flat; fill = the ZX byte
    N, G, Cg4, Hp = geo4[0], geo4[4], geo4[6], geo4[7]
    xf = x.reshape(-1)
    # one task per (image, channel block, run of padded rows): the stem has
    # one block
    runs = (Hp + NCHW4_ROWS - 1) // NCHW4_ROWS
    for t in prange(N * G * Cg4 * runs):
        blk = t // runs
        h0 = (t - blk * runs) * NCHW4_ROWS
        _nchw4_rows(xf, flip, fill, geo4, blk, h0, min(h0 + NCHW4_ROWS, Hp), x4)


def _make_interleave(S):
    """Intrinsic: n words (n a multiple of 16) of one to_nchw4 row,

        dst[q] = pad | keep & (b0 | b1 << 8 | b2 << 16 | b3 << 24)
        b_c    = src_c[q * S] ^ flip                  (S = 1 or 2)

    16 words a step: per channel one 16-byte load (S = 2: two, at bytes 0 and
    15, and their even / odd bytes: nothing past the last byte used is read),
    widened and shifted into place. numba's byte loop did not vectorize.
    Measured, to_nchw4 on 1 thread: the stem's 3 x 224^2 input 98 -> 17 us,
    256 x 56^2 (800 KB) 307 -> 87 us, with runs of rows per task (below)."""
    v8 = ir.VectorType(ir.IntType(8), 16)
    v32 = ir.VectorType(ir.IntType(32), 16)
    i64 = ir.IntType(64)
    pick = [2 * i for i in range(8)] + [16 + 2 * i + 1 for i in range(8)]
    pick = ir.Constant(ir.VectorType(ir.IntType(32), 16), pick)

    def codegen(context, builder, sig, args):
        dst, s0, s1, s2, s3, keep, pad, flip, n = args
        flipv = splat(builder, builder.trunc(flip, ir.IntType(8)), v8)
        keepv = splat(builder, builder.trunc(keep, ir.IntType(32)), v32)
        padv = splat(builder, builder.trunc(pad, ir.IntType(32)), v32)

        def load16(addr):
            return builder.load(builder.inttoptr(addr, v8.as_pointer()), align=1)

        def body(i, carried):
            src_off = builder.mul(i, ir.Constant(i64, S))
            word = None
            for c, src in enumerate((s0, s1, s2, s3)):
                at = builder.add(src, src_off)
                b = load16(at)
                if S == 2:
                    hi = load16(builder.add(at, ir.Constant(i64, 15)))
                    b = builder.shuffle_vector(b, hi, pick)
                w = builder.zext(builder.xor(b, flipv), v32)
                if c:
                    w = builder.shl(w, ir.Constant(v32, [8 * c] * 16))
                word = w if word is None else builder.or_(word, w)
            word = builder.or_(builder.and_(word, keepv), padv)
            at = builder.add(dst, builder.mul(i, ir.Constant(i64, 4)))
            builder.store(word, builder.inttoptr(at, v32.as_pointer()), align=4)
            return carried

        ir_loop(builder, ir.Constant(i64, 0), n, [], body, step=16, name="il4")
        return context.get_dummy_value()

    @intrinsic
    def _il(typingctx, dst, s0, s1, s2, s3, keep, pad, flip, n):
        return types.void(*([types.int64] * 9)), codegen

    return _il


_il4_s1 = _make_interleave(1)
_il4_s2 = _make_interleave(2)


@njit(inline="always")
def _interleave4(S, dst, s0, s1, s2, s3, keep, pad, flip, n):
    if S == 1:
        _il4_s1(dst, s0, s1, s2, s3, np.int64(keep), np.int64(pad), np.int64(flip), n)
    else:
        _il4_s2(dst, s0, s1, s2, s3, np.int64(keep), np.int64(pad), np.int64(flip), n)


@njit(inline="always")
def _chan_src(n, gc, c0, Cg, C, H, W, i, fill, cc):
    # (offset of x[n, channel, i, 0], byte mask, fill bits) for byte cc of a block
    ok = c0 + cc < Cg
    ch = min(gc + c0 + cc, C - 1)
    off = np.uint64(((n * C + ch) * H + i) * W)
    if ok:
        return off, np.uint32(0xFF), np.uint32(0)
    return off, np.uint32(0), np.uint32(fill) << np.uint32(8 * cc)


@njit(nogil=True, cache=True)
def _nchw4_rows(xf, flip, fill, geo4, blk, h0, h1, x4):
    # padded rows h0..h1-1 of block blk = (n, g, c4): S phase rows of Wq words
    N, C, H, W, G, Cg, Cg4, Hp, S, Wq = geo4[:10]
    pt, pl = geo4[18], geo4[19]
    n = blk // (G * Cg4)
    g = (blk - n * G * Cg4) // Cg4
    c0 = 4 * (blk - n * G * Cg4 - g * Cg4)  # first channel of the block in the group
    f4 = np.uint32(fill) * np.uint32(0x01010101)
    # channels past the group's end read channel C-1 under a zero mask and take
    # the fill byte instead (one branch-free loop for every block)
    s0, m0, p0 = _chan_src(n, g * Cg, c0, Cg, C, H, W, 0, fill, 0)
    s1, m1, p1 = _chan_src(n, g * Cg, c0, Cg, C, H, W, 0, fill, 1)
    s2, m2, p2 = _chan_src(n, g * Cg, c0, Cg, C, H, W, 0, fill, 2)
    s3, m3, p3 = _chan_src(n, g * Cg, c0, Cg, C, H, W, 0, fill, 3)
    pad = p0 | p1 | p2 | p3
    keep = m0 | (m1 << np.uint32(8)) | (m2 << np.uint32(16)) | (m3 << np.uint32(24))
    fl = np.uint32(flip)
    uS = np.uint64(S)
    vec = S <= 2
    # rows in the top / bottom padding: the fill word
    for h in range(h0, h1):
        if h < pt or h - pt >= H:
            base = np.uint64((blk * Hp + h) * S * Wq)
            for q in range(np.uint64(S * Wq)):
                x4[base + q] = f4
    ha, hb = max(h0, pt), min(h1, pt + H)  # the rows holding input row h - pt
    for ph in range(S):
        # q with 0 <= q*S + ph - pl < W (once per phase: integer divisions)
        qlo = max(0, (pl - ph + S - 1) // S)
        qhi = max(qlo, min(Wq, (pl + W - ph + S - 1) // S))
        jv = qlo * S + ph - pl
        # 16-word chunks in vector code, the last one overlapping its
        # predecessor (the same words again) instead of a scalar tail
        nv = qhi - qlo if vec and qhi - qlo >= 16 else 0
        full = nv // 16 * 16
        e = nv - 16
        for h in range(ha, hb):
            ri = np.uint64((h - pt) * W)  # input row h - pt of each channel
            row = np.uint64((blk * Hp + h) * S * Wq + ph * Wq)
            for q in range(qlo):
                x4[row + q] = f4
            for q in range(qhi, Wq):
                x4[row + q] = f4
            if nv:
                xa = xf.ctypes.data + np.int64(ri) + jv
                a0, a1 = xa + np.int64(s0), xa + np.int64(s1)
                a2, a3 = xa + np.int64(s2), xa + np.int64(s3)
                d = x4.ctypes.data + 4 * (np.int64(row) + qlo)
                _interleave4(S, d, a0, a1, a2, a3, keep, pad, fl, full)
                if full < nv:
                    _interleave4(S, d + 4 * e, a0 + S * e, a1 + S * e, a2 + S * e,
                                 a3 + S * e, keep, pad, fl, 16)  # fmt: skip
            j0 = ri + np.uint64(jv + nv * S)
            r0 = row + np.uint64(qlo + nv)
            for q in range(np.uint64(qhi - qlo - nv)):
                j = j0 + q * uS
                v = pad | ((np.uint32(xf[s0 + j]) ^ fl) & m0)
                v |= ((np.uint32(xf[s1 + j]) ^ fl) & m1) << np.uint32(8)
                v |= ((np.uint32(xf[s2 + j]) ^ fl) & m2) << np.uint32(16)
                v |= ((np.uint32(xf[s3 + j]) ^ fl) & m3) << np.uint32(24)
                x4[r0 + q] = v


@njit(inline="always")
def _pack_direct(xr, flip, fill, geo4, n, g, p0, nv, dst):
    # dst (address) <- [Cg4][64][4] bytes: pixels p0..p0+nv-1 of image n, group
    # g of a 1x1 stride-1 unpadded convolution, read from the NCHW bytes
    # themselves (4 channel rows, 16 pixels a step; no to_nchw4 pass: 1x1
    # 256 -> 64 at 56^2, 1 thread, 0.09 ms of interleave per call saved)
    N, C, H, W, G, Cg, Cg4 = geo4[:7]
    x0 = xr.ctypes.data
    fl = np.uint32(flip)
    for c4 in range(Cg4):
        c0 = 4 * c4
        s0, m0, q0 = _chan_src(n, g * Cg, c0, Cg, C, H, W, 0, fill, 0)
        s1, m1, q1 = _chan_src(n, g * Cg, c0, Cg, C, H, W, 0, fill, 1)
        s2, m2, q2 = _chan_src(n, g * Cg, c0, Cg, C, H, W, 0, fill, 2)
        s3, m3, q3 = _chan_src(n, g * Cg, c0, Cg, C, H, W, 0, fill, 3)
        pad = q0 | q1 | q2 | q3
        keep = m0 | (m1 << np.uint32(8)) | (m2 << np.uint32(16)) | (m3 << np.uint32(24))
        d = dst + c4 * 4 * NR
        a0 = x0 + np.int64(s0) + p0
        a1 = x0 + np.int64(s1) + p0
        a2 = x0 + np.int64(s2) + p0
        a3 = x0 + np.int64(s3) + p0
        done = 0
        if nv >= 16:
            done = nv // 16 * 16
            _interleave4(1, d, a0, a1, a2, a3, keep, pad, fl, done)
            if done < nv:  # the tail as one more chunk, overlapping (no reads
                e = nv - 16  # past the pixels: the last row ends the array)
                _interleave4(1, d + 4 * e, a0 + e, a1 + e, a2 + e, a3 + e, keep, pad,
                             fl, 16)  # fmt: skip
                done = nv
        for q in range(done, nv):
            j = p0 + q
            v = pad | ((np.uint32(xr[np.int64(s0) + j]) ^ fl) & m0)
            v |= ((np.uint32(xr[np.int64(s1) + j]) ^ fl) & m1) << np.uint32(8)
            v |= ((np.uint32(xr[np.int64(s2) + j]) ^ fl) & m2) << np.uint32(16)
            v |= ((np.uint32(xr[np.int64(s3) + j]) ^ fl) & m3) << np.uint32(24)
            _store(d + 4 * q, v)


@intrinsic
def _store(typingctx, addr, val):
    # *addr = val (a numba integer of any width; unaligned)
    def codegen(context, builder, sig, args):
        ty = context.get_value_type(sig.args[1])
        builder.store(args[1], builder.inttoptr(args[0], ty.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(types.int64, val), codegen


@njit(inline="always")
def _pack_panel(x4, geo4, n, g, p0, nv, dst):
    # dst (address) <- [K4][64][4] bytes: im2col(b) of output pixels p0..p0+nv-1
    # of image n, group g; K order (i, j, c4); columns past nv left as they are
    N, C, H, W, G, Cg, Cg4, Hp, S, Wq, Ho, Wo, kh, kw, sh, sw, dh, dw = geo4[:18]
    x0 = x4.ctypes.data
    k4 = 0
    for i in range(kh):
        for j in range(kw):
            ph = (j * dw) % S
            qo = (j * dw) // S
            for c4 in range(Cg4):
                plane = (n * G * Cg4 + g * Cg4 + c4) * Hp
                d = dst + k4 * 256
                u = 0
                oh = p0 // Wo
                ow = p0 - oh * Wo
                while u < nv:
                    seg = min(nv - u, Wo - ow)
                    src = x0 + 4 * (
                        ((plane + oh * sh + i * dh) * S + ph) * Wq + ow + qo
                    )
                    _copy(d + 4 * u, src, 4 * seg)
                    u += seg
                    oh += 1
                    ow = 0
                k4 += 1


@njit(inline="always")
def _nchw4_job_index(t, nrb, npan, G, P):
    # job t = (image, group, pixel panel, channel block), the channel block
    # fastest (jobs that share a panel are neighbours): (block, n, g, first
    # pixel, valid pixels)
    rb = t % nrb
    rest = t // nrb
    jn = rest % npan
    rest = rest // npan
    p0 = jn * NR
    return rb, rest // G, rest % G, p0, min(NR, P - p0)


@njit(inline="always")
def _nchw4_tiles(rb, nrb, n, g, p0, nv, b, ldb, K4, M, Mg, P, wa, ones, rbias, zw,
                 general, mult, zy, qlo, qhi, cs, out):  # fmt: skip
    # the channel tiles of channel block rb (of nrb) against one packed panel b
    if general:
        panel_colsum(ones.ctypes.data, b, ldb, K4, cs, nv)
    lda = wa.strides[0]
    es = out.itemsize
    mt = (Mg + MR_MAX - 1) // MR_MAX
    for im in range(rb * mt // nrb, (rb + 1) * mt // nrb):
        m = g * Mg + im * MR_MAX
        run_channel_tile(
            min(MR_MAX, g * Mg + Mg - m),
            wa.ctypes.data + m * lda,
            lda,
            b,
            ldb,
            K4,
            out.ctypes.data + ((n * M + m) * P + p0) * es,
            P * es,
            nv,
            rbias.ctypes.data + 8 * m,
            cs,
            zw.ctypes.data + 8 * m,
            general,
            mult.ctypes.data + 8 * m,
            zy,
            qlo,
            qhi,
            out,
        )


@njit(nogil=True, cache=True)
def _nchw4_job(t, npan, nrb, direct, xr, flip, fill, x4, geo4, wa, ones, rbias, zw,
               general, mult, zy, qlo, qhi, buf, csb, out):  # fmt: skip
    # one job of conv_nchw4 (_nchw4_job_index)
    N, C, H, W, G, Cg, Cg4, Hp, S, Wq, Ho, Wo, kh, kw, sh, sw, dh, dw = geo4[:18]
    M, Mg = geo4[20], geo4[21]
    P = Ho * Wo
    rb, n, g, p0, nv = _nchw4_job_index(t, nrb, npan, G, P)
    K4 = kh * kw * Cg4
    tid = numba.get_thread_id()
    ldb = 4 * NR
    b = buf[tid].ctypes.data
    if direct:
        _pack_direct(xr, flip, fill, geo4, n, g, p0, nv, b)
    else:
        _pack_panel(x4, geo4, n, g, p0, nv, b)
    _nchw4_tiles(rb, nrb, n, g, p0, nv, b, ldb, K4, M, Mg, P, wa, ones, rbias, zw,
                 general, mult, zy, qlo, qhi, csb[tid].ctypes.data, out)  # fmt: skip


@njit(**PJIT)
def conv_nchw4(xr, flip, fill, x4, geo4, nrb, direct, wa, ones, rbias, zw, general,
               mult, zy, qlo, qhi, buf, csb, out):  # fmt: skip
    # direct (1x1, stride 1, no padding): panels packed from xr (N*C*H*W raw
    # uint8 bytes: flip 0x80 for uint8 x, fill = the ZX byte), x4 unused; else
    # x4 from to_nchw4. wa (M, K4*4) uint8 = a in K order (i, j, c4, 4), ones
    # (>= K4*4) uint8, rbias / zw (M,) int64, mult (M,) float64, buf (threads,
    # >= K4*256) uint8 and csb (threads, >= 64) int32 scratch, out (N, M, Ho, Wo)
    N, G = geo4[0], geo4[4]
    P = geo4[10] * geo4[11]
    npan = (P + NR - 1) // NR
    for t in prange(N * G * npan * nrb):
        _nchw4_job(t, npan, nrb, direct, xr, flip, fill, x4, geo4, wa, ones, rbias,
                   zw, general, mult, zy, qlo, qhi, buf, csb, out)  # fmt: skip


# ---------------------------------------------------------------------------
# dense K for few channels: the NCHW4 tile's B without the 4-channel padding
#
# K order (i, c, j): run r = i*Cg + c is kernel row i of channel c, kw bytes
# (j = 0..kw-1), and K = kh*Cg*kw bytes are packed back to back in words
# (a 3-channel 7x7 stem: 37 words where the channel blocks take 49). A word
# spans at most two runs when kw >= 3; 16 pixels of one output row read each
# run from one 64-byte window of the padded input row (15*sw + (kw-1)*dw < 64),
# so a word row of 16 pixels is one vpermi2b of two windows. vpermi2b is
# AVX-512 VBMI: these kernels are compiled only on hosts that have it
# (lowprec/conv.py checks).
#
# geoD (int64): [N, C, Hp, Wp, G, Cg, Ho, Wo, kh, kw, sh, sw, dh, dw, K, K4,
#                npan, fill]


@njit(**PJIT)
def pad_bytes(x, flip, fill, geoD, pt, pl, xp):
    # x (N,C,H,W) uint8 raw bytes -> xp flat (N*C*Hp*Wp + 64 slack) uint8: the
    # b bytes (x ^ flip) inside a border of fill
    N, C, Hp, Wp = geoD[0], geoD[1], geoD[2], geoD[3]
    H, W = x.shape[2], x.shape[3]
    xf = x.reshape(-1)
    fb = np.uint8(fill)
    for t in prange(N * C * Hp):
        nc = t // Hp
        i = t - nc * Hp - pt
        d = t * Wp
        if i < 0 or i >= H:
            for q in range(Wp):
                xp[d + q] = fb
            continue
        for q in range(pl):
            xp[d + q] = fb
        for q in range(pl + W, Wp):
            xp[d + q] = fb
        src = (nc * H + i) * W
        n64 = W // 64 * 64
        _xor_copy64(xp.ctypes.data + d + pl, xf.ctypes.data + src, n64, flip)
        if n64 and n64 < W:  # the tail as one more 64 bytes, overlapping
            e = W - 64
            _xor_copy64(xp.ctypes.data + d + pl + e, xf.ctypes.data + src + e, 64, flip)
            n64 = W
        for q in range(n64, W):
            xp[d + pl + q] = xf[src + q] ^ flip


@intrinsic
def _xor_copy64(typingctx, dst, src, n, flip):
    # dst[q] = src[q] ^ flip for q < n (n a multiple of 64), 64 bytes a step
    # (numba's byte loop: ~5 cycles a byte)
    v64 = ir.VectorType(ir.IntType(8), 64)
    i64 = ir.IntType(64)

    def codegen(context, builder, sig, args):
        d, s_, n, f = args
        fv = splat(builder, f, v64)

        def body(q, carried):
            x = builder.load(
                builder.inttoptr(builder.add(s_, q), v64.as_pointer()), align=1
            )
            at = builder.inttoptr(builder.add(d, q), v64.as_pointer())
            builder.store(builder.xor(x, fv), at, align=1)
            return carried

        ir_loop(builder, ir.Constant(i64, 0), n, [], body, step=64, name="xcopy")
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64, types.uint8), codegen


def _make_dense16():
    """Intrinsic: k4n word rows of 16 pixels, row k at dst + k*ldd:
    vpermi2b(window r1(k), idx[k], window r2(k)), the windows being the 64
    bytes at runs[r] + off (runs: int64 addresses; rsel: int64 pairs r1, r2 per
    k; idx: 64 index bytes per k, bit 6 picking the second window)."""
    v64 = ir.VectorType(ir.IntType(8), 64)
    i64 = ir.IntType(64)

    def codegen(context, builder, sig, args):
        dst, ldd, runs, off, rsel, idx, k4n = args
        perm = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(v64, [v64, v64, v64]),
            "llvm.x86.avx512.vpermi2var.qi.512",
        )

        def at(addr, ty):
            return builder.load(builder.inttoptr(addr, ty.as_pointer()), align=1)

        def window(k, half):
            pair = builder.add(rsel, builder.mul(k, ir.Constant(i64, 16)))
            r = at(builder.add(pair, ir.Constant(i64, 8 * half)), i64)
            base = at(builder.add(runs, builder.mul(r, ir.Constant(i64, 8))), i64)
            return at(builder.add(base, off), v64)

        def body(k, carried):
            ix = at(builder.add(idx, builder.mul(k, ir.Constant(i64, 64))), v64)
            w = builder.call(perm, [window(k, 0), ix, window(k, 1)])
            d = builder.add(dst, builder.mul(k, ldd))
            builder.store(w, builder.inttoptr(d, v64.as_pointer()), align=1)
            return carried

        ir_loop(builder, ir.Constant(i64, 0), k4n, [], body, name="dense16")
        return context.get_dummy_value()

    @intrinsic
    def _d16(typingctx, dst, ldd, runs, off, rsel, idx, k4n):
        return types.void(*([types.int64] * 7)), codegen

    return _d16


_dense16 = _make_dense16()


@njit(inline="always")
def _dense_pixel(xp, geoD, n, g, oh, ow, dst):
    # one pixel's K bytes, scalar, into its column (dst: address of its word in
    # K row 0; K rows 4*NR bytes apart); the pad bytes of the last word = fill
    N, C, Hp, Wp, G, Cg, Ho, Wo, kh, kw, sh, sw, dh, dw, K, K4 = geoD[:16]
    k = 0
    for i in range(kh):
        for c in range(Cg):
            row = ((n * C + g * Cg + c) * Hp + oh * sh + i * dh) * Wp + ow * sw
            for j in range(kw):
                _store(dst + (k >> 2) * 4 * NR + (k & 3), xp[row + j * dw])
                k += 1
    while k < 4 * K4:
        _store(dst + (k >> 2) * 4 * NR + (k & 3), np.uint8(geoD[17]))
        k += 1


@njit(inline="always")
def _dense_panel(xp, geoD, rsel, idx, rt, n, g, p0, nv, dst):
    # dst (address) <- [K4][NR][4] bytes: the dense-K columns of output pixels
    # p0..p0+nv-1 of image n, group g (16 a vpermi2b where they share an output
    # row, else one by one); rt: this thread's run addresses (int64 scratch)
    N, C, Hp, Wp, G, Cg, Ho, Wo, kh, kw, sh, sw, dh, dw, K, K4 = geoD[:16]
    x0 = xp.ctypes.data
    oh = -1
    u = 0
    while u < nv:
        p = p0 + u
        r = p // Wo
        ow = p - r * Wo
        if r != oh:
            oh = r
            for i in range(kh):
                for c in range(Cg):
                    ch = n * C + g * Cg + c
                    rt[i * Cg + c] = x0 + (ch * Hp + oh * sh + i * dh) * Wp
        col = dst + 4 * u
        if u + 16 <= nv and ow + 16 <= Wo:
            _dense16(col, 4 * NR, rt.ctypes.data, ow * sw, rsel.ctypes.data,
                     idx.ctypes.data, K4)  # fmt: skip
            if K < 4 * K4:  # the last word's pad bytes
                last = col + (K4 - 1) * 4 * NR
                for q in range(16):
                    for b in range(K - 4 * (K4 - 1), 4):
                        _store(last + 4 * q + b, np.uint8(geoD[17]))
            u += 16
        else:
            _dense_pixel(xp, geoD, n, g, oh, ow, col)
            u += 1


@njit(nogil=True, cache=True)
def _dense_job(t, npan, nrb, xp, geoD, rsel, idx, runs, wa, ones, rbias, zw,
               general, mult, zy, qlo, qhi, buf, csb, out):  # fmt: skip
    # _nchw4_job with the panel packed with a dense K (no 4-channel blocks)
    N, C, Hp, Wp, G, Cg, Ho, Wo, kh, kw, sh, sw, dh, dw, K, K4 = geoD[:16]
    M = out.shape[1]
    Mg = M // G
    P = Ho * Wo
    rb, n, g, p0, nv = _nchw4_job_index(t, nrb, npan, G, P)
    tid = numba.get_thread_id()
    b = buf[tid].ctypes.data
    _dense_panel(xp, geoD, rsel, idx, runs[tid], n, g, p0, nv, b)
    cs = csb[tid].ctypes.data
    _nchw4_tiles(rb, nrb, n, g, p0, nv, b, 4 * NR, K4, M, Mg, P, wa, ones, rbias,
                 zw, general, mult, zy, qlo, qhi, cs, out)  # fmt: skip


@njit(**PJIT)
def conv_nchw4_dense(xp, geoD, rsel, idx, runs, nrb, wa, ones, rbias, zw, general,
                     mult, zy, qlo, qhi, buf, csb, out):  # fmt: skip
    # conv_nchw4 on dense-K panels: xp from pad_bytes; rsel (K4, 2) int64 and
    # idx (K4, 64) uint8 (lowprec/conv.py builds them); runs (threads, >= kh*Cg)
    # int64 scratch; wa in K order (i, c, j); the rest as conv_nchw4
    N, G = geoD[0], geoD[4]
    P = geoD[6] * geoD[7]
    npan = (P + NR - 1) // NR
    for t in prange(N * G * npan * nrb):
        _dense_job(t, npan, nrb, xp, geoD, rsel, idx, runs, wa, ones, rbias, zw,
                   general, mult, zy, qlo, qhi, buf, csb, out)  # fmt: skip


# ---------------------------------------------------------------------------
# portable: the same gather, plain loops for the product


@njit(**PJIT)
def conv_portable(
    xp, wk, geo, sa, sp, za, rs, cs, zb, bias, mult, zy, qlo, qhi, mode, out
):
    # wk (G,K,Mg) int8 = w' in K order (i,j,c); sa (threads,TM,ka) uint8,
    # sp (threads,TM,Mg) int32; tiles of TM output pixels x all Mg channels
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    K = kh * kw * Cg
    rows = N * Ho * Wo
    tm = sa.shape[1]
    ka = sa.shape[2]
    mt = (rows + tm - 1) // tm
    for t in prange(mt * G):
        _portable_job(
            t, mt, K, Mg, tm, ka, rows, xp, wk, geo, sa, sp, za, rs, cs, zb, bias,
            mult, zy, qlo, qhi, mode, out,
        )  # fmt: skip


@njit(nogil=True, cache=True)
def _portable_job(
    t, mt, K, Mg, tm, ka, rows, xp, wk, geo, sa, sp, za, rs, cs, zb, bias, mult,
    zy, qlo, qhi, mode, out,
):  # fmt: skip
    # one tile of tm output pixels x the Mg channels of group g
    g = t // mt
    m0 = (t - g * mt) * tm
    mr = min(tm, rows - m0)
    tid = numba.get_thread_id()
    a = sa[tid]
    p = sp[tid]
    _gather(xp, geo, m0, mr, g, a)
    wg = wk[g]
    for r in range(mr):
        acc = p[r]
        acc[:Mg] = 0
        ar = a[r]
        for k in range(K):
            av = np.int32(ar[k])
            wr = wg[k]
            for j in range(Mg):
                acc[j] += av * np.int32(wr[j])
    epilogue_tile(
        p, mr, Mg, m0, g * Mg, za, rs[g], cs, zb, bias, mult, zy, qlo, qhi,
        mode, out,
    )  # fmt: skip


# ---------------------------------------------------------------------------
# depthwise (group == C, one output channel per group): memory-bound, vectorized
# over channels; the exact int32 sum then the epilogue's arithmetic per element


@njit(inline="always")
def _dw9(xf, wf, base, c, uc, o0, o1, o2, o3, o4, o5, o6, o7, o8):
    # one output element of a 3x3 depthwise conv: 9 taps, exact int32
    s = np.int32(base[c])
    s = np.int32(s + np.int32(np.int32(xf[o0 + c]) * wf[c]))
    s = np.int32(s + np.int32(np.int32(xf[o1 + c]) * wf[uc + c]))
    s = np.int32(s + np.int32(np.int32(xf[o2 + c]) * wf[2 * uc + c]))
    s = np.int32(s + np.int32(np.int32(xf[o3 + c]) * wf[3 * uc + c]))
    s = np.int32(s + np.int32(np.int32(xf[o4 + c]) * wf[4 * uc + c]))
    s = np.int32(s + np.int32(np.int32(xf[o5 + c]) * wf[5 * uc + c]))
    s = np.int32(s + np.int32(np.int32(xf[o6 + c]) * wf[6 * uc + c]))
    s = np.int32(s + np.int32(np.int32(xf[o7 + c]) * wf[7 * uc + c]))
    return np.int32(s + np.int32(np.int32(xf[o8 + c]) * wf[8 * uc + c]))


@njit(**PJIT)
def _depthwise3x3(xf, wf, base, geo, mrow, zy, qlo, qhi, mode, of):
    # 3x3 depthwise: the 9 taps unrolled inside the channel loop, so the sum
    # stays in a register and the epilogue is fused (no int32 round trip
    # through memory per tap, no per-tap loop overhead over only C/16 vectors)
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    uc = np.uint64(C)
    for t in prange(N * Ho):
        n = t // Ho
        oh = t - n * Ho
        r0 = (n * Hp + oh * sh) * Wp
        r1 = r0 + dh * Wp
        r2 = r1 + dh * Wp
        for ow in range(Wo):
            b = ow * sw
            o0 = np.uint64((r0 + b) * C)
            o1 = np.uint64((r0 + b + dw) * C)
            o2 = np.uint64((r0 + b + 2 * dw) * C)
            o3 = np.uint64((r1 + b) * C)
            o4 = np.uint64((r1 + b + dw) * C)
            o5 = np.uint64((r1 + b + 2 * dw) * C)
            o6 = np.uint64((r2 + b) * C)
            o7 = np.uint64((r2 + b + dw) * C)
            o8 = np.uint64((r2 + b + 2 * dw) * C)
            od = np.uint64((t * Wo + ow) * C)
            if mode == 0:
                for c in range(uc):
                    of[od + c] = _dw9(
                        xf, wf, base, c, uc, o0, o1, o2, o3, o4, o5, o6, o7, o8
                    )
            elif mode == 1:
                for c in range(uc):
                    s = _dw9(xf, wf, base, c, uc, o0, o1, o2, o3, o4, o5, o6, o7, o8)
                    # eq. 11 exactly as requant.epilogue_tile mode 1
                    v = np.rint(np.float64(s) * mrow[c] + zy)
                    of[od + c] = min(max(v, qlo), qhi)
            else:
                for c in range(uc):
                    s = _dw9(xf, wf, base, c, uc, o0, o1, o2, o3, o4, o5, o6, o7, o8)
                    v = np.float32(np.float64(s) * mrow[c])
                    of[od + c] = min(max(v, qlo), qhi)


@njit(**PJIT)
def depthwise(xp, wd, base, geo, scratch, mult, zy, qlo, qhi, mode, out):
    # wd (kh*kw, C) int32 = w - w_zp (exact), base (C,) int32 = bias - ZA*sum_t wd
    # so that acc = sum_t x'*wd + base = sum_t (x' - ZA)(w - w_zp) + bias;
    # scratch (threads, C) int32; mult (1, C) float64; out (rows, C).
    # One job per output row (n, oh); channels innermost (vectorized), flat
    # arrays with unsigned offsets so that LLVM vectorizes over c.
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    xf = xp.reshape(-1)
    wf = wd.reshape(-1)
    of = out.reshape(-1)
    mrow = mult[0]
    uc = np.uint64(C)
    if kh == 3 and kw == 3:
        _depthwise3x3(xf, wf, base, geo, mrow, zy, qlo, qhi, mode, of)
        return
    for t in prange(N * Ho):
        n = t // Ho
        oh = t - n * Ho
        acc = scratch[numba.get_thread_id()]
        for ow in range(Wo):
            for c in range(uc):
                acc[c] = base[c]
            for i in range(kh):
                rowoff = (n * Hp + oh * sh + i * dh) * Wp
                for j in range(kw):
                    s0 = np.uint64((rowoff + ow * sw + j * dw) * C)
                    w0 = np.uint64((i * kw + j) * C)
                    for c in range(uc):
                        # numba widens int32 arithmetic to int64; the explicit
                        # truncations let LLVM emit 32-bit vpmulld/vpaddd
                        # (int64 lanes measured 2x slower); the sum is exact
                        prod = np.int32(np.int32(xf[s0 + c]) * wf[w0 + c])
                        acc[c] = np.int32(acc[c] + prod)
            o0 = np.uint64((t * Wo + ow) * C)
            if mode == 0:
                for c in range(uc):
                    of[o0 + c] = acc[c]
            elif mode == 1:
                # eq. 11 exactly as requant.epilogue_tile mode 1
                for c in range(uc):
                    v = np.rint(np.float64(acc[c]) * mrow[c] + zy)
                    of[o0 + c] = min(max(v, qlo), qhi)
            else:
                for c in range(uc):
                    v = np.float32(np.float64(acc[c]) * mrow[c])
                    of[o0 + c] = min(max(v, qlo), qhi)


# ---------------------------------------------------------------------------
# depthwise on NCHW planes: no layout change at all. Each (n, c) plane is padded
# once into per-thread scratch (x' = x ^ flip, border = ZA); 3x3 kernels with
# unit horizontal dilation and stride 1 or 2 then run all nine taps per output
# pixel in registers, vectorized over the pixels of an output row, and
# requantize straight into out[n, c, oh]. Stride 2 reads even / odd columns
# from a deinterleaved copy of the plane, so every load is unit-stride. Other
# shapes accumulate tap by tap into an int32 row. The NHWC kernel above needs
# two transposes around it on NCHW data (0.17 ms for 144 x 56 x 56: more than
# ORT's whole layer). Measured 1 thread, 144 x 56 x 56: 0.33 ms (stride 1).
# Every index is unsigned: a signed one makes numba emit wraparound selects
# that turn each vector load into 16 scalar ones (measured 5x slower).


@njit(inline="always")
def _tap3(pf, r, o, w0, w1, w2):
    # one kernel row: three taps at pf[r + o + {0, 1, 2}] (exact int32)
    u1 = np.uint64(1)
    u2 = np.uint64(2)
    s = np.int32(np.int32(pf[r + o]) * w0)
    s = np.int32(s + np.int32(np.int32(pf[r + o + u1]) * w1))
    return np.int32(s + np.int32(np.int32(pf[r + o + u2]) * w2))


@njit(inline="always")
def _tap3s2(pf, re, ro, o, w0, w1, w2):
    # stride 2: taps 0 and 2 from the even columns, tap 1 from the odd ones
    s = np.int32(np.int32(pf[re + o]) * w0)
    s = np.int32(s + np.int32(np.int32(pf[ro + o]) * w1))
    return np.int32(s + np.int32(np.int32(pf[re + o + np.uint64(1)]) * w2))


@njit(inline="always")
def _dw_row_out(of, o0, acc, uwo, m, zy, qlo, qhi, mode):
    # the epilogue of one output row (eqs. 11 / 13 as requant.epilogue_tile);
    # the mode branch outside the loops keeps each loop vectorized
    if mode == 0:
        for ow in range(uwo):
            of[o0 + ow] = acc[ow]
    elif mode == 1:
        for ow in range(uwo):
            v = np.rint(np.float64(acc[ow]) * m + zy)
            of[o0 + ow] = min(max(v, qlo), qhi)
    else:
        for ow in range(uwo):
            v = np.float32(np.float64(acc[ow]) * m)
            of[o0 + ow] = min(max(v, qlo), qhi)


@njit(inline="always")
def _dw_pad(x, flip, za, geo, pt, pl, pf, n, c, split):
    # plane (n, c) of x' = x ^ flip into pf with a border of za; split: even
    # padded columns first, then odd ones (the stride-2 layout, rows of We)
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    H = x.shape[2]
    W = x.shape[3]
    xf = x.reshape(-1)
    We = np.uint64((Wp + 1) // 2)
    for k in range(pf.shape[0]):
        pf[k] = za
    for i in range(H):
        xo = np.uint64(((n * C + c) * H + i) * W)
        if split:
            # padded column pl + j goes to even[(pl + j) // 2] or odd[...]:
            # two strided copies (a per-byte branch measured 0.37 ms per layer)
            rr = np.uint64(pt + i) * We
            odd = np.uint64(Hp) * We
            for par in range(2):
                j0 = np.uint64((par - pl) % 2)  # first j with (pl + j) % 2 == par
                d0 = rr + np.uint64((pl + j0) // 2) + (odd if par else np.uint64(0))
                cnt = (np.uint64(W) - j0 + np.uint64(1)) // np.uint64(2)
                for q in range(cnt):
                    pf[d0 + q] = xf[xo + j0 + np.uint64(2) * q] ^ flip
        else:
            r = np.uint64((pt + i) * Wp + pl)
            for j in range(np.uint64(W)):
                pf[r + j] = xf[xo + j] ^ flip


@njit(nogil=True, cache=True)
def _dw_plane(t, x, flip, za, wd, base, geo, pt, pl, pf, acc, mult, zy, qlo, qhi,
              mode, out):  # fmt: skip
    # plane t = (n, c): pad, then every output row
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    n = t // C
    c = t - n * C
    of = out.reshape(-1)
    uwo = np.uint64(Wo)
    fast = kh == 3 and kw == 3 and dw == 1 and (sw == 1 or sw == 2)
    We = np.uint64((Wp + 1) // 2)  # even columns per row (stride-2 layout)
    _dw_pad(x, flip, za, geo, pt, pl, pf, n, c, fast and sw == 2)
    b = base[c]
    m = mult[0, c]
    for oh in range(Ho):
        o0 = np.uint64(((n * C + c) * Ho + oh) * Wo)
        if fast:
            w0 = wd[0, c]
            w1 = wd[1, c]
            w2 = wd[2, c]
            w3 = wd[3, c]
            w4 = wd[4, c]
            w5 = wd[5, c]
            w6 = wd[6, c]
            w7 = wd[7, c]
            w8 = wd[8, c]
            if sw == 1:
                r0 = np.uint64(oh * sh * Wp)
                r1 = r0 + np.uint64(dh * Wp)
                r2 = r1 + np.uint64(dh * Wp)
                for ow in range(uwo):
                    s = np.int32(b + _tap3(pf, r0, ow, w0, w1, w2))
                    s = np.int32(s + _tap3(pf, r1, ow, w3, w4, w5))
                    acc[ow] = np.int32(s + _tap3(pf, r2, ow, w6, w7, w8))
            else:
                odd = np.uint64(Hp) * We
                e0 = np.uint64(oh * sh) * We
                e1 = e0 + np.uint64(dh) * We
                e2 = e1 + np.uint64(dh) * We
                for ow in range(uwo):
                    s = np.int32(b + _tap3s2(pf, e0, e0 + odd, ow, w0, w1, w2))
                    s = np.int32(s + _tap3s2(pf, e1, e1 + odd, ow, w3, w4, w5))
                    acc[ow] = np.int32(s + _tap3s2(pf, e2, e2 + odd, ow, w6, w7, w8))
        else:
            for ow in range(uwo):
                acc[ow] = b
            for i in range(kh):
                for j in range(kw):
                    wv = wd[i * kw + j, c]
                    s0 = np.uint64((oh * sh + i * dh) * Wp + j * dw)
                    for ow in range(uwo):
                        p = np.int32(np.int32(pf[s0 + ow * np.uint64(sw)]) * wv)
                        acc[ow] = np.int32(acc[ow] + p)
        _dw_row_out(of, o0, acc, uwo, m, zy, qlo, qhi, mode)


@njit(**PJIT)
def depthwise_nchw(x, flip, za, wd, base, geo, pt, pl, plane, accs, mult, zy, qlo, qhi,
                   mode, out):  # fmt: skip
    # x (N,C,H,W) uint8 (raw bytes; flip 0x80 turns int8 into x'), wd (kh*kw, C)
    # int32 = w - w_zp, base (C,) int32 = bias - ZA*sum_t wd, plane (threads,
    # >= Hp*(Wp+1)) uint8 and accs (threads, Wo) int32 scratch, mult (1, C)
    # float64, out (N, C, Ho, Wo). One job per plane (called, not inlined: the
    # parfor passes are slow on big bodies).
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    for t in prange(N * C):
        tid = numba.get_thread_id()
        _dw_plane(t, x, flip, za, wd, base, geo, pt, pl, plane[tid], accs[tid],
                  mult, zy, qlo, qhi, mode, out)  # fmt: skip


# ---------------------------------------------------------------------------
# 3x3 depthwise on vpdpbusd (AVX-512 VNNI with VBMI byte permutes): for 16
# outputs of a row, one 64-byte load of each input row is permuted so that
# lane l holds the kernel row's three taps (x'[s*l], x'[s*l+1], x'[s*l+2], 0)
# and one vpdpbusd against the splat (w0, w1, w2, 0) adds the three products:
# 3 permutes + 3 vpdpbusd per 16 outputs instead of 27 widening multiplies and
# adds, and stride 2 reads the plain padded row (no even/odd split). Weights
# must fit int8 (w - w_zp in [-128, 127]: symmetric int8 weights, uint8 with
# zero point 128); the others take the int32 kernel above.


def _dw3_pmaddwd(builder, rows, base, stride):
    """_make_dw3's 16 sums where LLVM's target lacks AVX-512 VNNI (AVX2 CPUs,
    which run this kernel too): vpmaddwd on zero-extended bytes, exact (each
    pair x' * w0 + x'' * w1 is below 2 * 255 * 128). Per kernel row, with
    Z(o) = the 16 bytes at p + o widened to 8 int16 pairs:
      stride 2: outputs 0-7 += Z(0)·(w0, w1) + Z(2)·(w2, 0), 8-15 the same at
                p + 16 (output l's taps are bytes 2l, 2l+1, 2l+2);
      stride 1: even outputs 2m take Z(0)·(w0, w1) + Z(2)·(w2, 0), odd ones
                Z(1)·(w0, w1) + Z(3)·(w2, 0), interleaved at the end.
    Reads reach p + 34 (the VNNI form reads 64 bytes)."""
    v8 = ir.VectorType(ir.IntType(32), 8)
    w16 = ir.VectorType(ir.IntType(16), 16)
    b16 = ir.VectorType(ir.IntType(8), 16)
    fnty = ir.FunctionType(v8, [w16, w16])
    pmadd = cgutils.get_or_insert_function(
        builder.module, fnty, "llvm.x86.avx2.pmadd.wd"
    )
    i64 = ir.IntType(64)

    def z(p, off):
        ptr = builder.inttoptr(builder.add(p, ir.Constant(i64, off)), b16.as_pointer())
        return builder.zext(builder.load(ptr, align=1), w16)

    halves = [splat(builder, base, v8), splat(builder, base, v8)]
    for p, w in rows:
        # w: the row's int8 weights (w0, w1, w2, 0), little-endian
        ws = builder.sext(builder.bitcast(w, ir.VectorType(ir.IntType(8), 4)),
                          ir.VectorType(ir.IntType(16), 4))  # fmt: skip
        lanes = ir.VectorType(ir.IntType(32), 16)
        w01 = builder.shuffle_vector(ws, ws, ir.Constant(lanes, [0, 1] * 8))
        w20 = builder.shuffle_vector(ws, ws, ir.Constant(lanes, [2, 3] * 8))
        offs = ((0, 2), (1, 3)) if stride == 1 else ((0, 2), (16, 18))
        for h, (o01, o2) in enumerate(offs):
            s = builder.add(
                builder.call(pmadd, [z(p, o01), w01]),
                builder.call(pmadd, [z(p, o2), w20]),
            )
            halves[h] = builder.add(halves[h], s)
    v16i = ir.VectorType(ir.IntType(32), 16)
    order = (
        [j for m in range(8) for j in (m, 8 + m)] if stride == 1 else list(range(16))
    )
    return builder.shuffle_vector(halves[0], halves[1], ir.Constant(v16i, order))


def _make_dw3(stride):
    from .int8_gemm_vnni import _col_masks, _store_tile, _store_tile_f32, _vpdpbusd

    v64 = ir.VectorType(ir.IntType(8), 64)
    v16 = ir.VectorType(ir.IntType(32), 16)
    vf64 = ir.VectorType(ir.DoubleType(), 16)
    fzero = ir.Constant(ir.VectorType(ir.FloatType(), 16), [-0.0] * 16)
    # byte 4l + t of the permuted row: tap t of output l (t = 3: the zero)
    idx = [stride * (b // 4) + b % 4 if b % 4 < 3 else 64 for b in range(64)]

    def codegen(context, builder, sig, args):
        p0, p1, p2, w0, w1, w2, base, dst, nvalid, mult, zy, qlo, qhi, f32 = args[:14]
        rows = ((p0, w0), (p1, w1), (p2, w2))
        if target_has(context, "avx512vnni"):
            vpd = _vpdpbusd(builder)
            acc = splat(builder, base, v16)
            zero = ir.Constant(v64, None)
            mask = ir.Constant(ir.VectorType(ir.IntType(32), 64), idx)
            for p, w in rows:
                row = builder.load(builder.inttoptr(p, v64.as_pointer()), align=1)
                taps = builder.bitcast(builder.shuffle_vector(row, zero, mask), v16)
                acc = builder.call(vpd, [acc, taps, splat(builder, w, v16)])
        else:
            acc = _dw3_pmaddwd(builder, rows, base, stride)
        # eqs. 11-13 on the 16 sums in registers (the GEMM tile's epilogue, one
        # multiplier for the channel), one masked store of nvalid outputs
        mv = splat(builder, mult, vf64)
        kind = sig.args[-1].dtype
        zero64 = ir.Constant(ir.IntType(64), 0)

        def epilogue(masks):
            def general():
                _store_tile(builder, kind, lambda r, v: acc, masks, 1, 1, dst,
                            zero64, lambda r, v: mv, zy, qlo, qhi,
                            lambda v: fzero)  # fmt: skip

            if kind not in (types.uint8, types.int8):
                general()
                return
            # f32: the caller found the float32 requantization exact (the
            # fused tile's case 3); 14 -> ~6 instructions per 16 outputs
            f32_on = builder.icmp_signed("!=", f32, zero64)
            with builder.if_else(f32_on) as (fast, slow):
                with fast:
                    m32 = splat(builder, builder.fptrunc(mult, ir.FloatType()),
                                ir.VectorType(ir.FloatType(), 16))  # fmt: skip
                    _store_tile_f32(builder, lambda r, v: acc, lambda r, v: m32,
                                    masks, 1, 1, dst, zero64, zy, qlo,
                                    qhi)  # fmt: skip
                with slow:
                    general()

        # whole blocks store without a mask (its lane compares were ~10 of
        # the AVX2 form's ~90 instructions a block; AVX2 has no byte masks)
        whole = builder.icmp_signed("==", nvalid, ir.Constant(ir.IntType(64), 16))
        with builder.if_else(whole) as (full, tail):
            with full:
                epilogue([ir.Constant(ir.VectorType(ir.IntType(1), 16), [1] * 16)])
            with tail:
                epilogue(_col_masks(builder, 1, nvalid))
        return context.get_dummy_value()

    @intrinsic
    def dw3(typingctx, p0, p1, p2, w0, w1, w2, base, dst, nvalid, mult, zy, qlo, qhi,
            f32, out):  # fmt: skip
        if not isinstance(out, types.Array) or out.dtype not in (
            types.int32,
            types.uint8,
            types.int8,
            types.float32,
        ):
            return None
        i64, i32, f8 = types.int64, types.int32, types.float64
        sig = types.void(
            i64, i64, i64, i32, i32, i32, i32, i64, i64, f8, f8, f8, f8, i64, out
        )
        return sig, codegen

    return dw3


_dw3s1 = _make_dw3(1)
_dw3s2 = _make_dw3(2)


@njit(nogil=True, cache=True)
def _dw_plane_vnni(t, x, flip, za, wp, base, geo, pt, pl, pf, mult, zy, qlo, qhi,
                   f32, out):  # fmt: skip
    # plane t = (n, c) of a 3x3, unit-dilation-in-w, stride 1 or 2 depthwise
    # conv: pad, then 16 outputs per dw3 block, sum and epilogue in registers
    # (reads run up to 63 bytes past a row: into the next row or the plane's
    # slack; stores past the row only where the rows after it overwrite them)
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    n = t // C
    c = t - n * C
    _dw_pad(x, flip, za, geo, pt, pl, pf, n, c, False)
    pa = pf.ctypes.data
    w0, w1, w2 = wp[0, c], wp[1, c], wp[2, c]
    b = base[c]
    m = mult[0, c]
    es = out.itemsize
    nblk = (Wo + 15) // 16
    for oh in range(Ho):
        r0 = pa + oh * sh * Wp
        r1 = r0 + dh * Wp
        r2 = r1 + dh * Wp
        o0 = out.ctypes.data + (((n * C + c) * Ho + oh) * Wo) * es
        # a row's last block first, stored whole when its lanes past the row
        # stay in the plane: they land on the next rows' first outputs, all
        # stored later (AVX2 has no byte-masked store: LLVM tests and stores
        # each byte. 144 x 56^2, 1 thread, Zen 3, alternating processes:
        # stride 1 358-360 -> 308-309 us, stride 2 163 -> 133-146 us; ORT's
        # QLinearConv 350-354 and 121-125)
        whole = oh * Wo + 16 * nblk <= Ho * Wo
        for i in range(nblk):
            blk = nblk - 1 if i == 0 else i - 1
            o = 16 * blk * sw
            d = o0 + 16 * blk * es
            nv = 16 if whole else min(16, Wo - 16 * blk)
            if sw == 1:
                _dw3s1(r0 + o, r1 + o, r2 + o, w0, w1, w2, b, d, nv, m, zy, qlo, qhi,
                       f32, out)  # fmt: skip
            else:
                _dw3s2(r0 + o, r1 + o, r2 + o, w0, w1, w2, b, d, nv, m, zy, qlo, qhi,
                       f32, out)  # fmt: skip


@njit(**PJIT)
def depthwise_nchw_vnni(x, flip, za, wp, base, geo, pt, pl, plane, accs, mult, zy,
                        qlo, qhi, mode, out):  # fmt: skip
    # as depthwise_nchw (same arguments; accs unused: the epilogue runs in
    # registers, its mode from out's dtype; mode 3: integer output requantized
    # in float32 lanes, which the caller found exact: |acc| < 2**24 and the
    # multipliers, z_y and bounds of int8_gemm_vnni.narrow_epilogue's case 3)
    # for 3x3 kernels, dw == 1, stride 1 or 2, with wp (3, C) int32 = each
    # kernel row's int8 weights packed (w0, w1, w2, 0) little-endian
    N, C = x.shape[0], x.shape[1]
    f32 = 1 if mode == 3 else 0
    for t in prange(N * C):
        tid = numba.get_thread_id()
        _dw_plane_vnni(t, x, flip, za, wp, base, geo, pt, pl, plane[tid], mult, zy,
                       qlo, qhi, f32, out)  # fmt: skip
