"""float16 convolution with float32 sums: implicit GEMM both ways round, depthwise.

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
  taps     F16C+FMA tile kernel (6 pixels x 64 channels, strided A) with the
           whole sum in registers: a loop over the taps (byte offsets offs)
           around the loop over the Cg channels (make_taps_kernel), A read in
           place from the padded NCHW image: A[r, c] = xp[n, c, ., ow0*sw +
           r*sw + .], row stride sw*4 bytes, k stride Hp*Wp*4 bytes; no
           im2col. Jobs are segments of up to TS tiles of one output row;
           bias/clamp on the registers, the segment goes to NCHW through a
           per-thread buffer and 16x16 transposes (_seg_job). With finite
           weights tiles skip the taps that read padding alone, and a row's
           border columns run as tiles down the column (_band_job).
           1x1 / stride 1 / no padding (flat): tiles over the image's
           pixels, converted from float16 per segment.
  rows     the transposed tile (make_rows_kernel: 6 output channels x 64
           positions, weights broadcast, input loaded 16 positions a vector)
           over the taps and channels, on the image split into its sh*sw
           stride phases (pad_phases), so a tap's 64 positions are contiguous
           in one phase plane whatever the stride: positions run over a grid
           of Ho rows of Wq = ceil(Wp/sw) columns, the columns past Wo are
           computed and dropped as each vector is stored (vcompressps, then a
           masked store) straight into NCHW. Few channels per group (the RGB
           stem: 3 channels, its loop unrolled) and narrow layers.
  depthwise (C == group, one output channel each): per plane, the float16
           plane converted into a padded scratch, then a row microkernel
           (_make_dw_row: 16 pixels a vector, taps loop in registers, a row's
           last chunk stored whole where its extra lanes stay in the plane);
           plain loops for strides > 2 and for the portable path.
  portable gathered tiles of TM pixels x Mg channels, plain loops.
Weights: taps [G][Mg/64][K][64], rows [G][Mg/6][K][6] float32, K order (i, j, c).
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .config import PJIT
from .fp16_gemm import (
    MR_MAX,
    NR,
    NV,
    _cvt16,
    _f16_bits_to_f32,
    _f32,
    _fma,
    _i1,
    _i32,
    _i64,
    _splat,
    _vf,
    _vh,
    _vi,
    f16_row_store,
    f32_to_f16_bits,
    fma_step,
)
from .ir_util import if_then as _ir_if
from .ir_util import loop as _ir_loop
from .ir_util import target_has
from .jobs import fetch_add
from .layout import copy_bytes, pool_row2x2

TM = 8  # portable: output pixels per tile


def _tap_sums(builder, ntaps, ks, offs, MR, tap_rows, name, KS=0, pair=False):
    """The MR x 64 float32 sums over ntaps taps x ks channels (c fastest), in
    registers: for tap t, tap_rows(t, off_t) -> (a_rows, a_step, b_of) with
    off_t = offs[t] (int64 at address offs; pair: tap_rows(t, offs[2t],
    offs[2t + 1])), A broadcast from a_rows[r] + k*a_step and B (64 float32)
    at b_of(k). KS > 0: the channel loop unrolled for ks == KS. Zero taps or
    channels: zeros."""
    zero = ir.Constant(_i64, 0)

    def tap(t, ophis):
        step = 16 if pair else 8
        at = builder.add(offs, builder.mul(t, ir.Constant(_i64, step)))
        offs_t = [builder.load(builder.inttoptr(at, _i64.as_pointer()), align=8)]
        if pair:
            bt = builder.add(at, ir.Constant(_i64, 8))
            offs_t.append(
                builder.load(builder.inttoptr(bt, _i64.as_pointer()), align=8)
            )
        a_rows, a_step, b_of = tap_rows(t, *offs_t)

        def kstep(k, phis):
            return fma_step(builder, phis, a_rows, builder.mul(k, a_step), b_of(k))

        if KS:
            phis = ophis
            for k in range(KS):
                phis = kstep(ir.Constant(_i64, k), phis)
            return phis
        return _ir_loop(builder, zero, ks, ophis, kstep, guard=False,
                        name=f"{name}.k")  # fmt: skip

    # the channel loop runs at least once (guard=False), so ks > 0 is folded
    # into the taps loop's trip count
    go = builder.and_(
        builder.icmp_signed(">", ntaps, zero), builder.icmp_signed(">", ks, zero)
    )
    init = [ir.Constant(_vf, None)] * (MR * NV)
    return _ir_loop(builder, zero, builder.select(go, ntaps, zero), init, tap,
                    name=name)  # fmt: skip


def make_taps_kernel(MR):
    """MR x 64 float32 tile over all kernel taps, accumulators in registers.

    _taps(a, lda, astep, b, ks, c, ldc, offs, ntaps)    all int64
      a      address of A at tap 0: A[r, k] = a + offs[2t] + r*lda + k*astep
      offs   address of ntaps int64 pairs, sum order: tap t's A byte offset
             and the byte offset of its ks rows of B from b (only the taps a
             tile needs: those reading padding alone for all its pixels can
             be left out, see _tile_taps)
      b      packed weights, rows of 64 float32, K order (tap, k): row t*ks + k
      ks     channels per tap (Cg); c, ldc as make_tile_kernel's (the tile is
             stored once, at the end, from 0: no per-tap reload of c)
      o      0: store the tile to c. Else y = clamp(fl32(acc + bias[j]), lo,
             hi) as _epilogue (bias: address of the tile's channel 0, read
             only when hb, first nc channels) stored as MR rows of 64 float32
             at o, ostr floats apart

    Two loops of phi nodes (taps, then channels) around the 4*MR FMAs of
    kernels/fp16_gemm.make_tile_kernel: the sum order of the per-tap calls,
    without storing and reloading the 24 accumulators once per tap.
    """

    def codegen(context, builder, sig, args):
        a, lda, step_a, b, ks, c, ldc, offs, ntaps, o, ostr, bias, hb, nc, lo, hi = args
        i8p = ir.IntType(8).as_pointer()
        zero = ir.Constant(_i64, 0)
        fn = builder.function
        c_base = builder.inttoptr(c, i8p)
        ldc4 = builder.mul(ldc, ir.Constant(_i64, 4))
        c_ptrs = []
        for r in range(MR):
            c_row = builder.gep(c_base, [builder.mul(ldc4, ir.Constant(_i64, r))])
            for v in range(NV):
                p = builder.gep(c_row, [ir.Constant(_i64, 64 * v)])
                c_ptrs.append(builder.bitcast(p, _vf.as_pointer()))

        def tap_rows(t, off, boff):
            # tap t: A at a + off (rows lda apart), its B panel of ks rows at
            # b + boff
            a_t = builder.add(a, off)
            b_t = builder.add(b, boff)
            a_rows = [
                builder.inttoptr(
                    builder.add(a_t, builder.mul(lda, ir.Constant(_i64, r))), i8p
                )
                for r in range(MR)
            ]
            b_base = builder.inttoptr(b_t, i8p)
            step_b = ir.Constant(_i64, 4 * NR)
            return (
                a_rows,
                step_a,
                lambda k: builder.gep(b_base, [builder.mul(k, step_b)]),
            )

        fin = _tap_sums(builder, ntaps, ks, offs, MR, tap_rows, "taps", pair=True)
        tostore = fn.append_basic_block("taps.tile")
        direct = fn.append_basic_block("taps.direct")
        done = fn.append_basic_block("taps.done")
        builder.cbranch(builder.icmp_signed("!=", o, zero), direct, tostore)
        builder.position_at_end(tostore)
        for p, ptr in zip(fin, c_ptrs, strict=True):
            builder.store(p, ptr, align=4)
        builder.branch(done)

        # the float32 epilogue on the registers: bias (a vector over the
        # tile's 64 channels; lanes past nc not read), clamp (NaN passes),
        # then rows of 64 at o, ostr floats apart (the caller's channel-major
        # copy follows). Scattering channel-wise straight into NCHW
        # (vscatterdps) measured no faster than the scalar epilogue
        builder.position_at_end(direct)
        m16 = ir.VectorType(_i1, 16)
        lane = ir.Constant(_vi, list(range(16)))
        ncv = _splat(builder, builder.trunc(nc, _i32), _vi)
        use_b = builder.icmp_signed("!=", hb, zero)
        use_bv = _splat(builder, use_b, m16)
        lov, hiv = _splat(builder, lo, _vf), _splat(builder, hi, _vf)
        ldty = ir.FunctionType(_vf, [_vf.as_pointer(), _i32, m16, _vf])
        ld = cgutils.get_or_insert_function(
            builder.module, ldty, "llvm.masked.load.v16f32.p0"
        )
        bvs = []
        for v in range(NV):
            ch = builder.add(lane, ir.Constant(_vi, [16 * v] * 16))
            bm = builder.and_(builder.icmp_signed("<", ch, ncv), use_bv)
            bp_ = builder.inttoptr(
                builder.add(bias, ir.Constant(_i64, 64 * v)), _vf.as_pointer()
            )
            zv = ir.Constant(_vf, None)
            bvs.append(builder.call(ld, [bp_, ir.Constant(_i32, 4), bm, zv]))
        for r in range(MR):
            orow = builder.add(o, builder.mul(ostr, ir.Constant(_i64, 4 * r)))
            for v in range(NV):
                y = fin[r * NV + v]
                y = builder.select(use_b, builder.fadd(y, bvs[v]), y)
                y = builder.select(builder.fcmp_ordered("<", y, lov), lov, y)
                y = builder.select(builder.fcmp_ordered(">", y, hiv), hiv, y)
                pv = builder.inttoptr(
                    builder.add(orow, ir.Constant(_i64, 64 * v)), _vf.as_pointer()
                )
                builder.store(y, pv, align=4)
        builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    i = types.int64
    f = types.float32

    @intrinsic
    def _taps(typingctx, a, lda, astep, b, ks, c, ldc, offs, ntaps, o, ostr, bias,
              hb, nc, lo, hi):  # fmt: skip
        sig = types.void(i, i, i, i, i, i, i, i, i, i, i, i, i, i, f, f)
        return sig, codegen

    return _taps


_t1 = make_taps_kernel(1)
_t2 = make_taps_kernel(2)
_t3 = make_taps_kernel(3)
_t4 = make_taps_kernel(4)
_t5 = make_taps_kernel(5)
_t6 = make_taps_kernel(6)


@njit(inline="always")
def _taps_tile(mr, a, lda, astep, b, ks, c, ldc, offs, ntaps, o, ostr, bias, hb,
               nc, lo, hi):  # fmt: skip
    if mr == 6:
        _t6(a, lda, astep, b, ks, c, ldc, offs, ntaps, o, ostr, bias, hb, nc, lo, hi)
    elif mr == 5:
        _t5(a, lda, astep, b, ks, c, ldc, offs, ntaps, o, ostr, bias, hb, nc, lo, hi)
    elif mr == 4:
        _t4(a, lda, astep, b, ks, c, ldc, offs, ntaps, o, ostr, bias, hb, nc, lo, hi)
    elif mr == 3:
        _t3(a, lda, astep, b, ks, c, ldc, offs, ntaps, o, ostr, bias, hb, nc, lo, hi)
    elif mr == 2:
        _t2(a, lda, astep, b, ks, c, ldc, offs, ntaps, o, ostr, bias, hb, nc, lo, hi)
    else:
        _t1(a, lda, astep, b, ks, c, ldc, offs, ntaps, o, ostr, bias, hb, nc, lo, hi)


# ---------------------------------------------------------------------------
# input: float16 bits -> zero-padded float32 NCHW (taps kernel)


@njit(inline="always")
def _zeros(flat, i0, n):
    for u in range(i0, i0 + n):
        flat[u] = 0.0


@njit(**PJIT)
def pad_nchw(x, xp, pt, pl):
    # x (N, C, H, W) uint16 float16 bits, C-contiguous; xp (N, C, Hp, Wp)
    # float32 <- x at [pt:pt+H, pl:pl+W], zeros around; vcvtph2ps 16 at a
    # time, the row's tail masked. Flat indices, no per-row array views: the
    # views' reference counting and scalar tails took 66-79 us for 64x56x56
    # and 256x14x14 (3 % of those layers' time, 1 thread); now 19-38 us
    N, C, H, W = x.shape
    Hp, Wp = xp.shape[2], xp.shape[3]
    pr = Wp - W - pl
    pb = Hp - H - pt
    W16 = W - W % 16
    flat = xp.reshape(-1)
    xs = x.ctypes.data
    xd = xp.ctypes.data
    for t in prange(N * C):
        d = t * Hp * Wp
        s0 = xs + 2 * t * H * W
        if H == 0:
            _zeros(flat, d, Hp * Wp)
            continue
        _zeros(flat, d, pt * Wp + pl)  # top rows, then row 0's left pad
        for h in range(H):
            r = d + (pt + h) * Wp + pl
            src = s0 + 2 * h * W
            for w in range(0, W16, 16):
                _cvt16(src + 2 * w, xd + 4 * (r + w))
            if W16 < W:
                _cvt16n(src + 2 * W16, xd + 4 * (r + W16), W - W16)
            # this row's right pad and the next one's left pad (or the bottom)
            _zeros(flat, r + W, pr + (pl if h < H - 1 else pb * Wp))


# ---------------------------------------------------------------------------
# epilogue: tile (pixels x channels) -> NCHW output


@njit(inline="always")
def _bias_clamp(tile, mr, nc, m0, bias, has_bias, lo, hi):
    # tile[:mr, :nc] = clamp(fl32(acc + bias[m0 + j])) in place, as
    # kernels/fp16_gemm._epilogue; NaN passes
    for r in range(mr):
        for j in range(nc):
            v = tile[r, j]
            if has_bias:
                v = np.float32(v + bias[m0 + j])
            v = lo if v < lo else v
            tile[r, j] = hi if v > hi else v


@njit(inline="always")
def _epilogue(tile, mr, nc, p0, m0, HW, bias, has_bias, lo, hi, mode, out32, out16):
    # tile (>=mr, >=nc) float32 sums of pixels p0.. (flat over N*Ho*Wo) and
    # channels m0..; out (N, M, Ho*Wo) float32 (mode 0) or float16 bits (1).
    # Plain 2-/3-index element access: a numba sub-array view per row costs
    # atomic reference counting (measured 3x on the stem's epilogue).
    _bias_clamp(tile, mr, nc, m0, bias, has_bias, lo, hi)
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
# SIMD: segments of pixel tiles (taps kernel)


def _transpose16(builder, rows):
    """16 vectors of 16 float32 -> their transpose (rows[r][c] -> out[c][r]):
    four butterfly stages, stage k swapping bit k of the row and the column
    index (two-source shuffles: vunpck*/vshuf*/vperm2 on AVX-512)."""
    rows = list(rows)
    for k in range(4):
        b = 1 << k
        lo_mask = [c if not c & b else 16 + (c ^ b) for c in range(16)]
        hi_mask = [(c | b) if not c & b else 16 + c for c in range(16)]
        nxt = list(rows)
        for r in range(16):
            if r & b:
                continue
            x, y = rows[r], rows[r | b]
            nxt[r] = builder.shuffle_vector(
                x, y, ir.Constant(ir.VectorType(_i32, 16), lo_mask)
            )
            nxt[r | b] = builder.shuffle_vector(
                x, y, ir.Constant(ir.VectorType(_i32, 16), hi_mask)
            )
        rows = nxt
    return rows


@intrinsic
def _tr16(typingctx, src, n, nch, dst, ldd):
    """dst[c*ldd + l] = src[l*NR + c] (float32; ldd in floats) for l < n <= 16
    pixels and c < nch <= 16 channels: 16 pixel rows of the segment buffer to
    16 channel runs of NCHW, one 16x16 transpose in registers (64 shuffles)
    and a masked store per channel. Replaced one vgatherdps per channel and
    16 pixels (gathers of 16 cache lines each)."""

    def codegen(context, builder, sig, args):
        src, n, nch, dst, ldd = args
        m16 = ir.VectorType(_i1, 16)
        lane = ir.Constant(_vi, list(range(16)))
        mask = builder.icmp_signed(
            "<", lane, _splat(builder, builder.trunc(n, _i32), _vi)
        )
        vp = _vf.as_pointer()
        rows = [
            builder.load(
                builder.inttoptr(builder.add(src, ir.Constant(_i64, 4 * NR * r)), vp),
                align=4,
            )
            for r in range(16)
        ]
        cols = _transpose16(builder, rows)
        sty = ir.FunctionType(ir.VoidType(), [_vf, vp, _i32, m16])
        st = cgutils.get_or_insert_function(
            builder.module, sty, "llvm.masked.store.v16f32.p0"
        )
        ld4 = builder.mul(ldd, ir.Constant(_i64, 4))
        fn = builder.function
        for c in range(16):
            # channels past nch (the panel's last, M/group not a multiple of
            # 64) are not stored
            go = fn.append_basic_block(f"tr16.c{c}")
            done = fn.append_basic_block(f"tr16.d{c}")
            builder.cbranch(
                builder.icmp_signed(">", nch, ir.Constant(_i64, c)), go, done
            )
            builder.position_at_end(go)
            p = builder.add(dst, builder.mul(ld4, ir.Constant(_i64, c)))
            builder.call(
                st, [cols[c], builder.inttoptr(p, vp), ir.Constant(_i32, 4), mask]
            )
            builder.branch(done)
            builder.position_at_end(done)
        return context.get_dummy_value()

    i = types.int64
    return types.void(i, i, i, i, i), codegen


TS = 16  # tiles per segment (a job): <= 96 output pixels of one row


@njit(inline="always")
def _hits(p0, n, step, lo, size):
    # does any of p0 + k*step (0 <= k < n) fall in [lo, lo + size)?
    p1 = p0 + (n - 1) * step
    if p1 < lo or p0 >= lo + size:
        return False
    if p0 >= lo:
        return True
    return p0 + ((lo - p0 + step - 1) // step) * step < lo + size


@njit(inline="always")
def _tile_taps(offs, tt, h0, hn, w0, wn, geo, pt, pl, H, W):
    # the taps of a tile (output rows h0.. (hn of them) x columns w0.. (wn))
    # that read the image for at least one of its pixels, as offs's (A, B)
    # offset pairs, into tt, in sum order; returns their count. The others
    # read padding alone: +-0 products, which leave every float32 sum
    # unchanged when the weights are finite (the caller's condition: the sum
    # starts at +0 and so never is -0), so the tile need not run them
    kh, kw, sh, sw, dh, dw = geo[6], geo[7], geo[8], geo[9], geo[10], geo[11]
    nt = 0
    for i in range(kh):
        if not _hits(h0 * sh + i * dh, hn, sh, pt, H):
            continue
        for j in range(kw):
            if not _hits(w0 * sw + j * dw, wn, sw, pl, W):
                continue
            t = i * kw + j
            tt[2 * nt] = offs[2 * t]
            tt[2 * nt + 1] = offs[2 * t + 1]
            nt += 1
    return nt


@njit(inline="always")
def _band_chunks(Ho):
    return (Ho + TS * MR_MAX - 1) // (TS * MR_MAX)


@njit(nogil=True, cache=True)
def _seg_job(
    t, ns, nsr, nblk, pb, flat, fuse, skip, x16, xp, xb, bp, geo, offs, tts, rb, sp,
    bias, has_bias, lo, hi, mode, out32, out16,
):  # fmt: skip
    # job t = (group, panel block, segment), segment fastest (ns jobs per
    # panel block, row segments first). A segment is up to TS pixel tiles of
    # one output row (of one image when flat). float32 output: each tile's
    # kernel applies bias and clamp in registers and stores its pixels x 64
    # channels as rows of the per-thread buffer rb (TS*6, 64); the segment
    # then goes to NCHW as one contiguous run per channel (_tr16: 16x16
    # transposes in registers; one vgatherdps per channel and 16 pixels took
    # 92-105 us for 3136 x 64 outputs, the transposes 20). float16 output:
    # the tile goes through the scratch tile and _epilogue.
    # skip = (pt, pl, H, W, eL, eR): with pt >= 0 tiles leave out the taps
    # that read padding alone (_tile_taps), and the first eL and last eR
    # columns of each row, whose pixels miss kernel columns, are left to
    # _band_job; pt < 0: every tap everywhere
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    pt, pl, H, W, eL, eR = skip
    nseg = (N if flat else N * Ho) * nsr
    sg = t % ns
    rest = t // ns
    blk = rest % nblk
    g = rest // nblk
    if sg >= nseg:
        _band_job(sg - nseg, blk, pb, g, skip, xp, bp, geo, offs, tts, sp, bias,
                  has_bias, lo, hi, mode, out32, out16)  # fmt: skip
        return
    tid = numba.get_thread_id()
    tile = sp[tid]
    ctile = tile.ctypes.data
    buf = rb[tid]
    tt = tts[tid]
    hb = 1 if has_bias else 0
    npg = bp.shape[1]
    HW = Ho * Wo
    L = HW if flat else Wo - eL - eR  # the row's pixels eL .. Wo - eR
    ntr = (L + MR_MAX - 1) // MR_MAX
    row = sg // nsr
    k0 = ((sg - row * nsr) * ntr) // nsr  # near-equal runs of <= TS tiles
    k1 = ((sg - row * nsr + 1) * ntr) // nsr
    if flat:
        n, oh = row, 0
    else:
        n = row // Ho
        oh = row - n * Ho
    W0 = eL + (k0 * L) // ntr
    W1 = eL + (k1 * L) // ntr
    qrow = oh * Wo  # flat pixel of the row's first output in the image
    if fuse:
        # 1x1, stride 1, no padding: the segment's pixels of the group's Cg
        # channels are converted from float16 (x16) into the per-thread
        # xb (Cg, TS*6) here, in cache, rather than a float32 copy of the
        # whole input beforehand (that copy took 0.24-0.37 ms of the 1.6-2.2
        # ms of 1x1c256_56, 1 thread: 3.2 MB written and read back)
        xbt = xb[tid]
        pitch = xbt.shape[1]
        cnt = W1 - W0
        c16 = cnt - cnt % 16
        for c in range(Cg):
            s0 = x16.ctypes.data + 2 * ((n * C + g * Cg + c) * HW + W0)
            d0 = xbt.ctypes.data + 4 * c * pitch
            for u in range(0, c16, 16):
                _cvt16(s0 + 2 * u, d0 + 4 * u)
            if c16 < cnt:
                _cvt16n(s0 + 2 * c16, d0 + 4 * c16, cnt - c16)
        arow = xbt.ctypes.data - 4 * W0
        lda = 4
        astep = 4 * pitch
        ntap = 1
    else:
        # xp[n, g*Cg, oh*sh, 0] in place (NCHW), A strides in bytes
        arow = xp.ctypes.data + 4 * (((n * C + g * Cg) * Hp + oh * sh) * Wp)
        lda = 4 * sw
        astep = 4 * Hp * Wp
        ntap = kh * kw
    taps = offs.ctypes.data
    for jn in range(blk * pb, min(npg, blk * pb + pb)):
        b0 = bp.ctypes.data + g * bp.strides[0] + jn * bp.strides[1]
        m0 = g * Mg + jn * NR
        nc = min(NR, Mg - jn * NR)
        for kt in range(k0, k1):
            w0 = eL + (kt * L) // ntr
            mr = eL + ((kt + 1) * L) // ntr - w0
            a0 = arow + w0 * lda
            if pt >= 0:
                ntap = _tile_taps(offs, tt, oh, 1, w0, mr, geo, pt, pl, H, W)
                taps = tt.ctypes.data
            if mode == 0:
                _taps_tile(
                    mr, a0, lda, astep, b0, Cg, ctile, NR, taps, ntap,
                    buf.ctypes.data + 4 * NR * (w0 - W0), NR, bias.ctypes.data + 4 * m0,
                    hb, nc, lo, hi,
                )  # fmt: skip
            else:
                _taps_tile(
                    mr, a0, lda, astep, b0, Cg, ctile, NR, taps, ntap,
                    0, 0, 0, 0, nc, lo, hi,
                )  # fmt: skip
                _epilogue(
                    tile, mr, nc, n * HW + qrow + w0, m0, HW, bias, has_bias, lo,
                    hi, mode, out32, out16,
                )  # fmt: skip
        if mode == 0:
            cnt = W1 - W0
            o0 = out32.ctypes.data + 4 * ((n * M + m0) * HW + qrow + W0)
            for j in range(0, nc, 16):
                for u in range(0, cnt, 16):
                    _tr16(
                        buf.ctypes.data + 4 * (u * NR + j), min(16, cnt - u),
                        min(16, nc - j), o0 + 4 * (j * HW + u), HW,
                    )  # fmt: skip


@njit(inline="always")
def _band_job(sb, blk, pb, g, skip, xp, bp, geo, offs, tts, sp, bias, has_bias, lo,
              hi, mode, out32, out16):  # fmt: skip
    # band job sb = (image, border column, chunk of <= TS*6 rows): that
    # column's pixels in tiles of up to 6 rows (A rows sh*Wp floats apart),
    # each over the taps that read the image (3x3, pad 1: 6 of 9, corners
    # 4), so the row segments' tiles never run a padding-only kernel column.
    # A 1-pixel tile per row end was slower than the 9 taps in a full tile
    # (256x14x14: 2305 against 2052 us, 1 thread: 4 FMAs a step stream the
    # weights from L2 at 64 bytes a cycle). Few pixels: a scalar epilogue
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    pt, pl, H, W, eL, eR = skip
    nbc = _band_chunks(Ho)
    chunk = sb % nbc
    rest = sb // nbc
    bcol = rest % (eL + eR)
    n = rest // (eL + eR)
    ow = bcol if bcol < eL else Wo - eR - eL + bcol
    h0 = (chunk * Ho) // nbc
    hn = ((chunk + 1) * Ho) // nbc - h0
    ntl = (hn + MR_MAX - 1) // MR_MAX
    tid = numba.get_thread_id()
    tile = sp[tid]
    tt = tts[tid]
    npg = bp.shape[1]
    lda = 4 * sh * Wp
    for jn in range(blk * pb, min(npg, blk * pb + pb)):
        b0 = bp.ctypes.data + g * bp.strides[0] + jn * bp.strides[1]
        m0 = g * Mg + jn * NR
        nc = min(NR, Mg - jn * NR)
        for kt in range(ntl):
            r0 = h0 + (kt * hn) // ntl
            mr = h0 + ((kt + 1) * hn) // ntl - r0
            a0 = xp.ctypes.data + 4 * (((n * C + g * Cg) * Hp + r0 * sh) * Wp + ow * sw)
            ntap = _tile_taps(offs, tt, r0, mr, ow, 1, geo, pt, pl, H, W)
            _taps_tile(
                mr, a0, lda, 4 * Hp * Wp, b0, Cg, tile.ctypes.data, NR, tt.ctypes.data,
                ntap, 0, 0, 0, 0, nc, lo, hi,
            )  # fmt: skip
            _bias_clamp(tile, mr, nc, m0, bias, has_bias, lo, hi)
            for r in range(mr):
                q = (r0 + r) * Wo + ow
                for j in range(nc):
                    if mode == 0:
                        out32[n, m0 + j, q] = tile[r, j]
                    else:
                        out16[n, m0 + j, q] = f32_to_f16_bits(tile[r, j])


@njit(**PJIT)
def conv_simd(
    flat, fuse, nsr, pb, skip, pt, pl, x16, xp, xb, bp, geo, tts, rb, sp, bias,
    has_bias, lo, hi, mode, out32, out16,
):  # fmt: skip
    # not fuse: xp (1, C, Hp, Wp) is filled from x16 here, an image at a
    # time (pad_nchw; one call from Python instead of two: ~3 us of a small
    # layer's ~20)
    # fuse (flat NCHW only): x16 (N, C, H, W) float16 bits converted per
    # segment into xb (threads, Cg, TS*6) float32; xp is then a dummy; bp
    # (G, NP, K, NR) float32 packed weights, K order (i, j, c); rb (threads,
    # TS*6, NR) float32 segment buffer; sp (threads, 6, NR) float32 tile
    # scratch; out (N, M, Ho*Wo) float32 (mode 0) / float16 bits (mode 1),
    # the other a dummy; skip: _seg_job's; tts
    # (threads, >= 2*kh*kw) int64 per-tile tap tables
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    nblk = (bp.shape[1] + pb - 1) // pb
    # the taps' (A, B) byte offsets: A in the padded image, B from the
    # panel's start; sum order (i, j)
    offs = np.empty(2 * kh * kw, np.int64)
    for i in range(kh):
        for j in range(kw):
            t = i * kw + j
            offs[2 * t] = 4 * (i * dh * Wp + j * dw)
            offs[2 * t + 1] = 4 * NR * Cg * t
    if fuse:
        # nsr segments of <= TS tiles per image, every image in one pass
        ns = N * nsr
        for t in prange(ns * nblk * G):
            _seg_job(
                t, ns, nsr, nblk, pb, flat, fuse, skip, x16, xp, xb, bp, geo, offs,
                tts, rb, sp, bias, has_bias, lo, hi, mode, out32, out16,
            )  # fmt: skip
        return
    # one image at a time, padded into xp (1, C, Hp, Wp) and then read while
    # it is still in L2: 8 x 64 x 56 x 56 padded at once (6.9 MB) ran ~5 %
    # slower per image than one image. nsr segments of <= TS tiles per row,
    # then the border columns' band jobs
    geo1 = geo.copy()
    geo1[0] = 1
    ns = Ho * nsr + (skip[4] + skip[5]) * _band_chunks(Ho)
    for n in range(N):
        pad_nchw(x16[n : n + 1], xp, pt, pl)
        o32 = out32[n : n + 1] if mode == 0 else out32
        o16 = out16[n : n + 1] if mode == 1 else out16
        for t in prange(ns * nblk * G):
            _seg_job(
                t, ns, nsr, nblk, pb, flat, fuse, skip, x16, xp, xb, bp, geo1, offs,
                tts, rb, sp, bias, has_bias, lo, hi, mode, o32, o16,
            )  # fmt: skip


# ---------------------------------------------------------------------------
# channels as rows: output channels broadcast, 64 grid positions in vectors

WS = MR_MAX  # floats per K row of the "rows" weight layout (channels padded to 6)


def make_rows_kernel(MR, KS=0):
    """MR output channels x 64 positions float32 tile over all taps, stored NCHW.

    _rows(x, astep, w, ks, offs, ntaps, out, ostr, pos, bias, hb, lo, hi, mode)
      x      address of the tile's first grid position in channel 0's plane
             (float32): B[k, l] = x + offs[t] + c*astep + 4*l, k = (t, c), l < 64
      w      weights of the MR channels: rows of WS float32 in K order (t, c),
             row t*ks + c, channel r at float r
      ks     channels per tap (Cg); KS > 0 compiles the channel loop unrolled
             for ks == KS (few-channel stems: a loop of 3 is mostly overhead)
      out    address of output (n, m0, 0), ostr bytes per channel
      pos    address of 2*NV int64: the grid lanes of vector v to store (a
             16-bit mask: valid column, inside the grid) and the output
             element of its first one; vectors are compressed (vcompressps
             in registers, then a masked store of the first popcount lanes)
             since the grid's pad columns drop out of the NCHW output
      bias   address of bias[m0] (read when hb != 0); lo, hi the clamp
      mode   0: float32 out; 1: float16 bits (vcvtps2ph, nearest even)

    Sum order (t outer, c inner) is the accuracy contract's; each output is
    one accumulator lane, so the bits match every other path.
    """

    def codegen(context, builder, sig, args):
        x, astep, w, ks, offs, ntaps, out, ostr, pos, bias, hb, lo, hi, mode = args
        i8p = ir.IntType(8).as_pointer()
        zero = ir.Constant(_i64, 0)
        fn = builder.function

        def tap_rows(t, off):
            # tap t: B (the input) at x + off + k*astep, the weights' rows of
            # this tap (6 floats per k) broadcast
            x_t = builder.add(x, off)
            w_t = builder.add(w, builder.mul(builder.mul(t, ks),
                                             ir.Constant(_i64, 4 * WS)))  # fmt: skip
            a_rows = [
                builder.inttoptr(builder.add(w_t, ir.Constant(_i64, 4 * r)), i8p)
                for r in range(MR)
            ]
            return (
                a_rows,
                ir.Constant(_i64, 4 * WS),
                lambda k: builder.inttoptr(
                    builder.add(x_t, builder.mul(k, astep)), i8p
                ),
            )

        fin = _tap_sums(builder, ntaps, ks, offs, MR, tap_rows, "rows", KS)

        m16 = ir.VectorType(_i1, 16)
        i16 = ir.IntType(16)
        vi16 = ir.VectorType(i16, 16)
        comp = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_vf, [_vf, _vf, m16]),
            "llvm.x86.avx512.mask.compress.v16f32",
        )  # fmt: skip
        ctpop = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i16, [i16]), "llvm.ctpop.i16"
        )
        posp = builder.inttoptr(pos, _i64.as_pointer())
        cmask, smask, voff = [], [], []
        for v in range(NV):
            mv = builder.trunc(builder.load(builder.gep(posp, [ir.Constant(_i64, v)])),
                               i16)  # fmt: skip
            cnt = builder.call(ctpop, [mv])
            sm = builder.sub(builder.shl(ir.Constant(_i32, 1), builder.zext(cnt, _i32)),
                             ir.Constant(_i32, 1))  # fmt: skip
            cmask.append(builder.bitcast(mv, m16))
            smask.append(builder.bitcast(builder.trunc(sm, i16), m16))
            voff.append(builder.load(builder.gep(posp, [ir.Constant(_i64, NV + v)])))
        use_b = builder.icmp_signed("!=", hb, zero)
        lov, hiv = _splat(builder, lo, _vf), _splat(builder, hi, _vf)
        ys = []
        for r in range(MR):
            bp_ = builder.inttoptr(builder.add(bias, ir.Constant(_i64, 4 * r)),
                                   _f32.as_pointer())  # fmt: skip
            # without a bias (hb == 0) bias points at a 1-element dummy: this
            # loads its element 0 (the caller passes no offset then), unused
            bsel = builder.select(use_b, builder.ptrtoint(bp_, _i64), bias)
            b_r = builder.load(builder.inttoptr(bsel, _f32.as_pointer()), align=4)
            bv = _splat(builder, b_r, _vf)
            for v in range(NV):
                y = fin[r * NV + v]
                y = builder.select(use_b, builder.fadd(y, bv), y)
                y = builder.select(builder.fcmp_ordered("<", y, lov), lov, y)
                y = builder.select(builder.fcmp_ordered(">", y, hiv), hiv, y)
                ys.append(builder.call(comp, [y, ir.Constant(_vf, None), cmask[v]]))
        st32 = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [_vf, _vf.as_pointer(), _i32, m16]),
            "llvm.masked.store.v16f32.p0",
        )
        st16 = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [vi16, vi16.as_pointer(), _i32, m16]),
            "llvm.masked.store.v16i16.p0",
        )
        f32blk = fn.append_basic_block("rows.f32")
        f16blk = fn.append_basic_block("rows.f16")
        done = fn.append_basic_block("rows.done")
        builder.cbranch(builder.icmp_signed("==", mode, zero), f32blk, f16blk)
        for blk, esz in ((f32blk, 4), (f16blk, 2)):
            builder.position_at_end(blk)
            for r in range(MR):
                orow = builder.add(out, builder.mul(ostr, ir.Constant(_i64, r)))
                for v in range(NV):
                    off = builder.mul(voff[v], ir.Constant(_i64, esz))
                    addr = builder.add(orow, off)
                    y = ys[r * NV + v]
                    if esz == 4:
                        args = [y, builder.inttoptr(addr, _vf.as_pointer())]
                        builder.call(st32, [*args, ir.Constant(_i32, 4), smask[v]])
                    else:
                        h = builder.bitcast(builder.fptrunc(y, _vh), vi16)
                        args = [h, builder.inttoptr(addr, vi16.as_pointer())]
                        builder.call(st16, [*args, ir.Constant(_i32, 2), smask[v]])
            builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    i = types.int64
    f = types.float32

    @intrinsic
    def _rows(typingctx, x, astep, w, ks, offs, ntaps, out, ostr, pos, bias, hb, lo,
              hi, mode):  # fmt: skip
        sig = types.void(i, i, i, i, i, i, i, i, i, i, i, f, f, i)
        return sig, codegen

    return _rows


_r1 = make_rows_kernel(1)
_r2 = make_rows_kernel(2)
_r3 = make_rows_kernel(3)
_r4 = make_rows_kernel(4)
_r5 = make_rows_kernel(5)
_r6 = make_rows_kernel(6)
_r6c3 = make_rows_kernel(6, 3)
_r4c3 = make_rows_kernel(4, 3)


@njit(inline="always")
def _rows_tile(mr, c3, x, astep, w, ks, offs, ntaps, out, ostr, pos, bias, hb, lo,
               hi, mode):  # fmt: skip
    if c3 and mr == 6:
        _r6c3(x, astep, w, ks, offs, ntaps, out, ostr, pos, bias, hb, lo, hi, mode)
    elif c3 and mr == 4:
        _r4c3(x, astep, w, ks, offs, ntaps, out, ostr, pos, bias, hb, lo, hi, mode)
    elif mr == 6:
        _r6(x, astep, w, ks, offs, ntaps, out, ostr, pos, bias, hb, lo, hi, mode)
    elif mr == 5:
        _r5(x, astep, w, ks, offs, ntaps, out, ostr, pos, bias, hb, lo, hi, mode)
    elif mr == 4:
        _r4(x, astep, w, ks, offs, ntaps, out, ostr, pos, bias, hb, lo, hi, mode)
    elif mr == 3:
        _r3(x, astep, w, ks, offs, ntaps, out, ostr, pos, bias, hb, lo, hi, mode)
    elif mr == 2:
        _r2(x, astep, w, ks, offs, ntaps, out, ostr, pos, bias, hb, lo, hi, mode)
    else:
        _r1(x, astep, w, ks, offs, ntaps, out, ostr, pos, bias, hb, lo, hi, mode)


@intrinsic
def _deint32(typingctx, src, even, odd):
    """32 float16 at src -> float32: lanes 0, 2, .. 30 to even, 1, 3, .. 31 to
    odd (16 each; two vcvtph2ps and two vpermt2ps): a row of a stride-2
    convolution's input split into its two column phases."""

    def codegen(context, builder, sig, args):
        src, even, odd = args
        vh32 = ir.VectorType(ir.HalfType(), 32)
        h = builder.load(builder.inttoptr(src, vh32.as_pointer()), align=2)
        f = builder.fpext(h, ir.VectorType(_f32, 32))
        for dst, first in ((even, 0), (odd, 1)):
            y = builder.shuffle_vector(
                f, ir.Constant(f.type, None),
                ir.Constant(ir.VectorType(_i32, 16), list(range(first, 32, 2))),
            )  # fmt: skip
            builder.store(y, builder.inttoptr(dst, _vf.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64), codegen


@njit(**PJIT)
def pad_phases(x, xp, pt, pl, sh, sw, Hq, Wq):
    # x (N, C, H, W) uint16 float16 bits, C-contiguous -> xp (N*C, >= sh*sw*Hq*Wq)
    # float32: the zero-padded image split into sh*sw phase planes of Hq x Wq,
    # phase (a, b) holding padded rows a, a+sh, ... and columns b, b+sw, ...;
    # a strided convolution is then sh*sw stride-1 ones (tap (i, j) reads
    # phase (i*dh % sh, j*dw % sw) at (i*dh // sh, j*dw // sw)). Stride 1: one
    # phase, the padded plane (rows converted 16 at a time)
    N, C, H, W = x.shape
    P = Hq * Wq
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        src = x[n, c]
        dst = xp[t]
        dst[:] = 0.0
        if sh == 1 and sw == 1:
            W16 = W - W % 16
            for h in range(H):
                s0 = src.ctypes.data + h * W * 2
                d0 = dst.ctypes.data + ((h + pt) * Wq + pl) * 4
                for u in range(0, W16, 16):
                    _cvt16(s0 + 2 * u, d0 + 4 * u)
                if W16 < W:
                    _cvt16n(s0 + 2 * W16, d0 + 4 * W16, W - W16)
        else:
            # stride 2 in width: 32 columns at a time to the two phases
            W32 = W - W % 32 if sw == 2 else 0
            for h in range(H):
                hp = h + pt
                a = hp % sh
                rb = (a * sw) * P + (hp // sh) * Wq
                s0 = src.ctypes.data + h * W * 2
                for u in range(0, W32, 32):
                    wp = u + pl
                    _deint32(
                        s0 + 2 * u,
                        dst.ctypes.data + 4 * (rb + (wp % 2) * P + wp // 2),
                        dst.ctypes.data + 4 * (rb + ((wp + 1) % 2) * P + (wp + 1) // 2),
                    )  # fmt: skip
                for u in range(W32, W):
                    wp = u + pl
                    dst[rb + (wp % sw) * P + wp // sw] = _f16_bits_to_f32(src[h, u])


@njit(nogil=True, cache=True)
def _rows_job(t, nq, nblk, c3, xp, wr, geo, Wg, offs, ps, bias, has_bias, lo, hi,
              mode, out32, out16):  # fmt: skip
    # job t = (n, group, channel block, position chunk), chunks fastest: the
    # grid's ntile 64-position tiles (Ho rows of Wg) in nq near-equal
    # contiguous chunks, the MT 6-channel tiles in nblk blocks (so a thread's
    # share differs from another's by at most one tile's work per job). Per
    # tile the 2*NV store masks/offsets (ps); then each channel tile runs over
    # the chunk's positions with its weights (K x 6 floats) in L1
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    qb = t % nq
    rest = t // nq
    blk = rest % nblk
    rest = rest // nblk
    g = rest % G
    n = rest // G
    tid = numba.get_thread_id()
    pv = ps[tid]
    Q = Ho * Wg
    HWo = Ho * Wo
    MT = wr.shape[1]
    K = wr.shape[2]
    plane = xp.shape[1]
    x0 = xp.ctypes.data + 4 * (n * C + g * Cg) * plane
    hb = 1 if has_bias else 0
    esz = 4 if mode == 0 else 2
    obase = out32.ctypes.data if mode == 0 else out16.ctypes.data
    ntile = (Q + NR - 1) // NR
    q_lo = (qb * ntile) // nq
    q_hi = ((qb + 1) * ntile) // nq
    for qt in range(q_lo, q_hi):
        q0 = qt * NR
        for v in range(NV):
            qv = q0 + 16 * v
            row = qv // Wg
            col = qv - row * Wg
            m = 0
            for lane in range(16):
                if qv + lane < Q and col < Wo:
                    m |= 1 << lane
                col += 1
                if col == Wg:
                    col = 0
            pv[(qt - q_lo) * 2 * NV + v] = m
            pv[(qt - q_lo) * 2 * NV + NV + v] = (qv // Wg) * Wo + min(qv % Wg, Wo)
    for mt in range((blk * MT) // nblk, ((blk + 1) * MT) // nblk):
        m0 = mt * WS
        mr = min(WS, Mg - m0)
        mg = g * Mg + m0
        wt = wr.ctypes.data + 4 * (g * MT + mt) * K * WS
        o0 = obase + esz * (n * M + mg) * HWo
        for qt in range(q_lo, q_hi):
            _rows_tile(
                mr, c3, x0 + 4 * qt * NR, 4 * plane, wt, Cg, offs.ctypes.data,
                kh * kw, o0, esz * HWo, pv.ctypes.data + 8 * (qt - q_lo) * 2 * NV,
                bias.ctypes.data + (4 * mg if has_bias else 0), hb, lo, hi, mode,
            )  # fmt: skip


@njit(**PJIT)
def conv_rows(nq, nblk, c3, x16, pt, pl, xp, wr, geo, Wg, offs, ps, bias, has_bias,
              lo, hi, mode, out32, out16):  # fmt: skip
    # x16 (N, C, H, W) float16 bits -> xp (N*C, plane) float32 phase planes
    # (pad_phases, first: one call from Python), wr (G, MT, K, WS)
    # float32 weights, offs (kh*kw) int64 tap byte offsets, ps (threads,
    # >= 2*NV*ceil(ntile/nq)) int64 scratch; out (N, M, Ho*Wo) float32 (mode
    # 0) / float16 bits (1)
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    pad_phases(x16, xp, pt, pl, sh, sw, (Hp + sh - 1) // sh, Wg)
    for t in prange(N * G * nblk * nq):
        _rows_job(
            t, nq, nblk, c3, xp, wr, geo, Wg, offs, ps, bias, has_bias, lo, hi,
            mode, out32, out16,
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


@intrinsic
def _cvt16n(typingctx, src, dst, n):
    """The first n (< 16) float16 at address src -> float32 at dst (masked
    vcvtph2ps): a row's tail without n scalar conversions."""

    def codegen(context, builder, sig, args):
        src, dst, n = args
        m16 = ir.VectorType(_i1, 16)
        vi16 = ir.VectorType(ir.IntType(16), 16)
        nv = _splat(builder, builder.trunc(n, _i32), _vi)
        mask = builder.icmp_signed("<", ir.Constant(_vi, list(range(16))), nv)
        fnty = ir.FunctionType(vi16, [vi16.as_pointer(), _i32, m16, vi16])
        ld = cgutils.get_or_insert_function(
            builder.module, fnty, "llvm.masked.load.v16i16.p0"
        )
        h = builder.call(
            ld, [builder.inttoptr(src, vi16.as_pointer()), ir.Constant(_i32, 2),
                 mask, ir.Constant(vi16, None)],
        )  # fmt: skip
        y = builder.fpext(builder.bitcast(h, _vh), _vf)
        fnty = ir.FunctionType(ir.VoidType(), [_vf, _vf.as_pointer(), _i32, m16])
        st = cgutils.get_or_insert_function(
            builder.module, fnty, "llvm.masked.store.v16f32.p0"
        )
        builder.call(
            st, [y, builder.inttoptr(dst, _vf.as_pointer()), ir.Constant(_i32, 4),
                 mask],
        )  # fmt: skip
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64), codegen


@intrinsic
def _cvt16_split(typingctx, src, da, db):
    """16 float16 at address src -> float32: the 8 at even positions to
    address da, the 8 at odd positions to db (vcvtph2ps, then shuffles)."""

    def codegen(context, builder, sig, args):
        src, da, db = args
        h = builder.load(builder.inttoptr(src, _vh.as_pointer()), align=2)
        y = builder.fpext(h, _vf)
        v8 = ir.VectorType(_f32, 8)
        for first, dst in ((0, da), (1, db)):
            idx = ir.Constant(ir.VectorType(_i32, 8), list(range(first, 16, 2)))
            half = builder.shuffle_vector(y, y, idx)
            builder.store(half, builder.inttoptr(dst, v8.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64), codegen


# ---------------------------------------------------------------------------
# depthwise row microkernel: one output row of one channel, 16 pixels a vector


def _make_dw_row(NVD, SW, ROW3=False, PHASED=False):
    """Intrinsic: output rows of a depthwise plane, NVD vectors per chunk.

    _dw_row(src, offs, w, ntaps, n, dst, mode, hb, b, lo, hi, rows, sstep, dstep)
      rows   output rows; row r reads from src + r*sstep and is stored at
             dst + r*dstep (bytes). One call per plane: choosing the variant
             per row (12 inlined kernels behind runtime branches) cost 15-30
             us of 160 for 144 56x56 planes (1 thread)
      src    address of the padded float32 plane's row 0, column 0
      offs   address of ntaps int64 byte offsets of the taps from src, in the
             sum order (i, j): 4*(i*dh*Wp + j*dw)
      w      address of ntaps float32 weights, same order
      n      output pixels (Wo); chunks of 16*NVD, the last one first,
             stored whole while its lanes past the row stay in the plane
             (rows - 1 rows follow), else masked
      dst    address of the output plane: float32 (mode 0) or float16 bits (1)
      hb     1: add b; then clamp to [lo, hi] (NaN passes), as _dw_finish

    SW (1 or 2) is the column stride. Stride 2 loads 32 consecutive values and
    keeps the even ones (one vpermt2ps).

    ROW3 (3 kernel columns, column dilation 1): the loop runs over the
    kernel rows i (ntaps = kh, offs = the row pitch in bytes, a multiple of
    64, src 64-byte aligned): SW*NVD + 1 aligned loads per kernel row and
    the three columns shifted out of them (stride 1: valignd; stride 2: the
    even and odd columns, and the evens shifted by one), not 3*NVD (stride
    2: 6*NVD) unaligned loads that each cross a cache line (measured, 144
    planes, 1 thread: 56x56 stride 1 145 vs 170-190 us; stride 2: layer
    total 0.135 vs 0.15-0.19 ms). The taps loop keeps the NVD sums in
    registers (phi nodes); every sum is fl32(acc + x*w) with an exact product,
    so the FMA gives the bits of the documented order. Loads past the row's
    end feed only lanes that are masked off or stored on later rows and
    overwritten there (the caller leaves slack after the plane).
    PHASED (ROW3, stride 2, row dilation 1; AVX2): the plane comes split into
    its even and odd columns (_dw_load_phases: row r's evens at src + r*offs,
    its odds offs/2 bytes after them), so that kernel columns 0, 1, 2 are the
    evens at ow, the odds at ow and the evens at ow + 1: three loads, no
    shuffles (AVX2 has no vpermt2ps: the even/odd/shift shuffles of 32
    values took ~15 ymm shuffles per 16 outputs and kernel row).
    ROW3 at column stride 1 with row stride == kernel row pitch (sh == dh): output
    rows in pairs over the kh + 1 input rows they span, each input row loaded
    and shifted once for both (chunk2; 144 planes of 56x56, 1 thread: 41 ->
    44-47 GFLOP/s, 2 threads 58-64 -> 70-71, alternating processes).
    """
    fl = _f32
    vf = _vf
    i64 = _i64
    m16 = ir.VectorType(_i1, 16)
    vi16 = ir.VectorType(ir.IntType(16), 16)
    even = ir.Constant(_vi, [2 * k for k in range(16)])

    def codegen(context, builder, sig, args):
        src0, offs, w, ntaps, n, dst0, mode, hb, b, lo, hi, rows, sstep, dstep = args
        fn = builder.function
        zero = ir.Constant(i64, 0)
        one = ir.Constant(i64, 1)
        fma = _fma(builder)
        src = dst = spill_a = spill_b = None

        def chunk(ow, _):
            # output columns ow .. ow + 16*NVD - 1 of the row (past n: masked,
            # or stored on the rows after it: store)
            masks = chunk_masks(ow)
            step = 4 if PHASED else 4 * SW
            base = builder.add(src, builder.mul(ow, ir.Constant(i64, step)))

            def tap(t, accs):
                if PHASED:
                    wvs = weights3(t)
                    p = builder.add(base, builder.mul(t, offs))
                    odd_at = builder.add(p, builder.lshr(offs, one))
                    new = []
                    for v in range(NVD):
                        xs = [
                            builder.load(builder.inttoptr(
                                builder.add(a, ir.Constant(i64, 64 * v + d)),
                                vf.as_pointer()), align=4)
                            for a, d in ((p, 0), (odd_at, 0), (p, 4))
                        ]  # fmt: skip
                        a = accs[v]
                        for xv, wj in zip(xs, wvs, strict=True):
                            a = builder.call(fma, [xv, wj, a])
                        new.append(a)
                elif ROW3:
                    wvs = weights3(t)
                    xs = row_loads(
                        builder.add(base, builder.mul(t, offs)), SW * NVD + 1
                    )
                    new = []
                    odd = ir.Constant(_vi, [2 * k + 1 for k in range(16)])
                    nxt = ir.Constant(_vi, [1 + k for k in range(16)])
                    for v in range(NVD if SW == 2 else 0):
                        # stride 2: the even and odd columns of 32 loaded values, and
                        # the evens shifted by one for j = 2
                        ev = builder.shuffle_vector(xs[2 * v], xs[2 * v + 1], even)
                        od = builder.shuffle_vector(xs[2 * v], xs[2 * v + 1], odd)
                        s2 = builder.shuffle_vector(ev, xs[2 * v + 2], nxt)
                        a = accs[v]
                        for xv, wj in ((ev, wvs[0]), (od, wvs[1]), (s2, wvs[2])):
                            a = builder.call(fma, [xv, wj, a])
                        new.append(a)
                    if SW == 1:
                        new = add_row(accs, shifts(xs), wvs)
                else:
                    to = builder.add(offs, builder.mul(t, ir.Constant(i64, 8)))
                    off = builder.load(builder.inttoptr(to, i64.as_pointer()), align=8)
                    tw = builder.add(w, builder.mul(t, ir.Constant(i64, 4)))
                    wt = builder.load(builder.inttoptr(tw, fl.as_pointer()), align=4)
                    wv = _splat(builder, wt, vf)
                    p0 = builder.add(base, off)
                    new = []
                    for v in range(NVD):
                        vp = vf.as_pointer()
                        if SW == 1:
                            a = builder.add(p0, ir.Constant(i64, 64 * v))
                            xv = builder.load(builder.inttoptr(a, vp), align=4)
                        else:
                            a = builder.add(p0, ir.Constant(i64, 128 * v))
                            lo_v = builder.load(builder.inttoptr(a, vp), align=4)
                            a2 = builder.add(a, ir.Constant(i64, 64))
                            hi_v = builder.load(builder.inttoptr(a2, vp), align=4)
                            xv = builder.shuffle_vector(lo_v, hi_v, even)
                        new.append(builder.call(fma, [xv, wv, accs[v]]))
                return new

            new = _ir_loop(builder, zero, ntaps, [ir.Constant(vf, None)] * NVD, tap,
                           guard=False, name="dw.taps")  # fmt: skip
            store(new, dst, ow, masks, spill_a)
            return []

        def chunk_masks(ow):
            rem = builder.trunc(builder.sub(n, ow), _i32)
            remv = _splat(builder, rem, _vi)
            return [
                builder.icmp_signed(
                    "<", ir.Constant(_vi, [16 * v + k for k in range(16)]), remv
                )
                for v in range(NVD)
            ]

        def store(accs, drow, ow, masks, spill):
            # bias, clamp (NaN passes), then float32 or float16 stores
            st32 = fn.append_basic_block("dw.st32")
            st16 = fn.append_basic_block("dw.st16")
            latch = fn.append_basic_block("dw.latch")
            use_b = builder.icmp_signed("!=", hb, zero)
            bv, lov, hiv = (_splat(builder, s, vf) for s in (b, lo, hi))
            ys = []
            for v in range(NVD):
                y = builder.select(use_b, builder.fadd(accs[v], bv), accs[v])
                y = builder.select(builder.fcmp_ordered("<", y, lov), lov, y)
                ys.append(builder.select(builder.fcmp_ordered(">", y, hiv), hiv, y))
            # plain stores for whole chunks, and for a row's last chunk when
            # the lanes past the row stay inside the plane (spill): they land
            # on the following rows, all stored later in this call (a row's
            # last chunk runs first: rows_of). AVX2's masked stores
            # (vmaskmovps; 16-bit ones scalarized) and loads were ~45 % of the
            # layer's time (144 x 56^2, 1 thread: 510-523 -> 392-396 us with
            # whole chunks stored plainly, -> 322-347 with _dw_load_plane's
            # whole-vector loads, -> 281-288 with last chunks stored whole;
            # stride 2: 253-269 -> 162-163)
            whole = builder.or_(
                builder.icmp_signed(
                    ">=", builder.sub(n, ow), ir.Constant(i64, 16 * NVD)
                ),
                spill,
            )
            builder.cbranch(builder.icmp_signed("==", mode, zero), st32, st16)

            for blk, size, conv in ((st32, 4, False), (st16, 2, True)):
                builder.position_at_end(blk)
                d0 = builder.add(drow, builder.mul(ow, ir.Constant(i64, size)))
                outs = []
                for v in range(NVD):
                    a = builder.add(d0, ir.Constant(i64, 16 * size * v))
                    y = ys[v]
                    if conv:  # vcvtps2ph, round to nearest even (MXCSR default)
                        y = builder.bitcast(builder.fptrunc(y, _vh), vi16)
                    outs.append((y, builder.inttoptr(a, y.type.as_pointer())))
                name = "v16i16" if conv else "v16f32"

                with builder.if_else(whole) as (then, otherwise):
                    with then:
                        for y, ptr in outs:
                            builder.store(y, ptr, align=size)
                    with otherwise:
                        for (y, ptr), mask in zip(outs, masks, strict=True):
                            fnty = ir.FunctionType(
                                ir.VoidType(), [y.type, y.type.as_pointer(), _i32, m16]
                            )
                            st = cgutils.get_or_insert_function(
                                builder.module, fnty, f"llvm.masked.store.{name}.p0"
                            )
                            builder.call(st, [y, ptr, ir.Constant(_i32, size), mask])
                builder.branch(latch)
            builder.position_at_end(latch)

        def weights3(wrow):
            # kernel row wrow's three weights, each broadcast to a vector
            w3 = builder.add(w, builder.mul(wrow, ir.Constant(i64, 12)))
            return [
                _splat(builder, builder.load(builder.inttoptr(
                    builder.add(w3, ir.Constant(i64, 4 * j)), fl.as_pointer()),
                    align=4), vf)
                for j in range(3)
            ]  # fmt: skip

        def row_loads(p0, count):
            # count aligned vectors of an input row from p0
            return [
                builder.load(builder.inttoptr(builder.add(p0, ir.Constant(i64, 64 * v)),
                             vf.as_pointer()), align=64)
                for v in range(count)
            ]  # fmt: skip

        def row_shifts(base, t):
            # input row t (aligned, at base + t*offs): its three column shifts
            # per vector (stride 1, ROW3)
            return shifts(row_loads(builder.add(base, builder.mul(t, offs)), NVD + 1))

        def shifts(xs):
            # columns j = 0, 1, 2 of each vector v of a loaded row (valignd)
            out = []
            for v in range(NVD):
                terms = [xs[v]]
                for j in (1, 2):
                    idx = ir.Constant(_vi, [j + k for k in range(16)])
                    terms.append(builder.shuffle_vector(xs[v], xs[v + 1], idx))
                out.append(terms)
            return out

        def add_row(accs, terms, wvs):
            new = []
            for v in range(NVD):
                a = accs[v]
                for j in range(3):
                    a = builder.call(fma, [terms[v][j], wvs[j], a])
                new.append(a)
            return new

        def chunk2(ow, _):
            # two output rows (A at src, B one input row lower) from the
            # kh + 1 input rows they span, each loaded and shifted once: row
            # t feeds A with kernel row t and B with kernel row t - 1 (each
            # sum still in the order i, then j)
            masks = chunk_masks(ow)
            base = builder.add(src, builder.mul(ow, ir.Constant(i64, 4)))
            z = [ir.Constant(vf, None)] * NVD
            acc_a = add_row(z, row_shifts(base, zero), weights3(zero))

            def mid(t, phis):
                terms = row_shifts(base, t)
                wb = weights3(builder.sub(t, one))  # B's kernel row t - 1
                return add_row(phis[:NVD], terms, weights3(t)) + add_row(
                    phis[NVD:], terms, wb
                )

            phis = _ir_loop(builder, one, ntaps, acc_a + z, mid,
                            name="dw.rows2")  # fmt: skip
            wb = weights3(builder.sub(ntaps, one))
            acc_b = add_row(phis[NVD:], row_shifts(base, ntaps), wb)
            store(phis[:NVD], dst, ow, masks, spill_a)
            store(acc_b, builder.add(dst, dstep), ow, masks, spill_b)
            return []

        def rows_of(body, name):
            # output row r (of a pair, with chunk2): its chunks along the row,
            # the last (partial) one first, so that its stores past the row
            # are overwritten by the next row's (store)
            width = ir.Constant(i64, 16 * NVD)
            nch = builder.sdiv(builder.add(n, builder.sub(width, one)), width)
            tail = builder.mul(builder.sub(nch, one), width)
            room = builder.sub(builder.mul(rows, n), width)

            def run(r, _):
                nonlocal src, dst, spill_a, spill_b
                src = builder.add(src0, builder.mul(r, sstep))
                dst = builder.add(dst0, builder.mul(r, dstep))
                # a whole chunk's store from the tail stays inside the plane
                # (pixels r*n + tail .. + width - 1 < rows*n); B: row r + 1
                end = builder.add(builder.mul(r, n), tail)
                spill_a = builder.icmp_signed("<=", end, room)
                spill_b = builder.icmp_signed("<=", builder.add(end, n), room)

                def step(i, vals):
                    first = builder.icmp_signed("==", i, zero)
                    ow = builder.mul(builder.sub(i, one), width)
                    return body(builder.select(first, tail, ow), vals)

                _ir_loop(builder, zero, nch, [], step, name=name)
                return []

            return run

        row, pair = rows_of(chunk, "dw"), rows_of(chunk2, "dw2")

        first = zero
        if ROW3 and SW == 1:
            # output rows in pairs where the next output row starts one input
            # row lower (stride equal to dilation: sstep == offs)
            two = ir.Constant(i64, 2)
            ok = builder.icmp_signed("==", sstep, offs)
            even_rows = builder.select(
                ok, builder.mul(builder.sdiv(rows, two), two), zero
            )
            _ir_loop(builder, zero, even_rows, [], pair, step=2, name="dw.pairs")
            first = even_rows
        _ir_loop(builder, first, rows, [], row, name="dw.rows")
        return context.get_dummy_value()

    i = types.int64
    f = types.float32

    @intrinsic
    def _dw_row(typingctx, src, offs, w, ntaps, n, dst, mode, hb, b, lo, hi, rows,
                sstep, dstep):  # fmt: skip
        return types.void(i, i, i, i, i, i, i, i, f, f, f, i, i, i), codegen

    return _dw_row


_dw1_1 = _make_dw_row(1, 1)
_dw1_2 = _make_dw_row(2, 1)
_dw1_4 = _make_dw_row(4, 1)
_dw2_1 = _make_dw_row(1, 2)
_dw2_2 = _make_dw_row(2, 2)
_dw2_4 = _make_dw_row(4, 2)
_dw3_1 = _make_dw_row(1, 1, True)
_dw3_2 = _make_dw_row(2, 1, True)
_dw3_4 = _make_dw_row(4, 1, True)
_dw4_1 = _make_dw_row(1, 2, True)
_dw4_2 = _make_dw_row(2, 2, True)
_dw4_4 = _make_dw_row(4, 2, True)
_dw5_1 = _make_dw_row(1, 2, True, True)
_dw5_2 = _make_dw_row(2, 2, True, True)
DW_SLACK = 256  # float32 after a plane: loads for lanes past a row stay inside


@intrinsic
def _dw_nv_max(typingctx):
    """The ROW3 kernels' widest row chunk (16-float vectors) for the compile
    target: 4 with AVX-512's 32 registers, 1 on AVX2. On AVX2 each vector is
    two ymm, and the stride-1 row pairs (chunk2) held 16 ymm sums at 4
    vectors: 82 stack moves per 48 FMAs in its loop (2 vectors: 18; 1
    vector: none). 144 x 56^2, 1 thread, Zen 3, best of 21 in alternating
    processes: stride 1 533-553 us at 1 vector, 701-831 at 4; stride 2
    285-314 vs 318-569. The tap-loop kernels (other kernel widths) keep 4:
    not measured here."""

    def codegen(context, builder, sig, args):
        return ir.Constant(ir.IntType(64), 4 if target_has(context, "avx512f") else 1)

    return types.int64(), codegen


@intrinsic
def _dw_phased(typingctx):
    """Whether stride-2 ROW3 planes run on column phases (kind 5): on AVX2
    targets (no vpermt2ps); AVX-512 keeps kind 4 (measured there, one
    vpermt2ps per 16 values)."""

    def codegen(context, builder, sig, args):
        return ir.Constant(ir.IntType(64), 0 if target_has(context, "avx512f") else 1)

    return types.int64(), codegen


@njit(inline="always")
def _dw_row(sw, nv, src, offs, w, ntaps, n, dst, mode, hb, b, lo, hi, rows, ss, ds):
    # sw: 1, 2 (tap loop) or 3, 4 (the ROW3 kernel: 3 columns, stride 1, 2),
    # 5 (ROW3 stride 2 on column phases: at most 2 vectors)
    if sw == 5:
        if nv == 1:
            _dw5_1(src, offs, w, ntaps, n, dst, mode, hb, b, lo, hi, rows, ss, ds)
        else:
            _dw5_2(src, offs, w, ntaps, n, dst, mode, hb, b, lo, hi, rows, ss, ds)
    elif sw == 4:
        if nv == 1:
            _dw4_1(src, offs, w, ntaps, n, dst, mode, hb, b, lo, hi, rows, ss, ds)
        elif nv == 2:
            _dw4_2(src, offs, w, ntaps, n, dst, mode, hb, b, lo, hi, rows, ss, ds)
        else:
            _dw4_4(src, offs, w, ntaps, n, dst, mode, hb, b, lo, hi, rows, ss, ds)
    elif sw == 3:
        if nv == 1:
            _dw3_1(src, offs, w, ntaps, n, dst, mode, hb, b, lo, hi, rows, ss, ds)
        elif nv == 2:
            _dw3_2(src, offs, w, ntaps, n, dst, mode, hb, b, lo, hi, rows, ss, ds)
        else:
            _dw3_4(src, offs, w, ntaps, n, dst, mode, hb, b, lo, hi, rows, ss, ds)
    elif sw == 1:
        if nv == 1:
            _dw1_1(src, offs, w, ntaps, n, dst, mode, hb, b, lo, hi, rows, ss, ds)
        elif nv == 2:
            _dw1_2(src, offs, w, ntaps, n, dst, mode, hb, b, lo, hi, rows, ss, ds)
        else:
            _dw1_4(src, offs, w, ntaps, n, dst, mode, hb, b, lo, hi, rows, ss, ds)
    elif nv == 1:
        _dw2_1(src, offs, w, ntaps, n, dst, mode, hb, b, lo, hi, rows, ss, ds)
    elif nv == 2:
        _dw2_2(src, offs, w, ntaps, n, dst, mode, hb, b, lo, hi, rows, ss, ds)
    else:
        _dw2_4(src, offs, w, ntaps, n, dst, mode, hb, b, lo, hi, rows, ss, ds)


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
    # dst starts zeroed (the caller's np.zeros) and every plane writes the
    # same data region, so the padding stays zero: nothing to clear here
    # (clearing it per plane cost ~ half of the conversion, measured)
    H, W = x.shape[2], x.shape[3]
    W16 = W - W % 16
    s0 = x.ctypes.data + 2 * (n * x.shape[1] + c) * H * W
    d0 = dst.ctypes.data
    for h in range(H):
        r = (h + pt) * pw
        sr = s0 + h * W * 2
        dr = d0 + (r + pl) * 4
        for w in range(0, W16, 16):
            _cvt16(sr + 2 * w, dr + 4 * w)
        if W16 < W and W >= 16:
            # the row's last 16 again, overlapping: AVX2 has no 16-bit masked
            # load (LLVM scalarizes _cvt16n's: ~1/3 of a 56x56 plane's load)
            _cvt16(sr + 2 * (W - 16), dr + 4 * (W - 16))
        elif W16 < W:
            _cvt16n(sr + 2 * W16, dr + 4 * W16, W - W16)


@njit(inline="always")
def _dw_uses_phases(kw, sw, dh, dw):
    # stride-2 3-column planes on AVX2 run on column phases (kind 5)
    return sw == 2 and kw == 3 and dw == 1 and dh == 1 and _dw_phased() == 1


@njit(inline="always")
def _dw_pitch(Wp, phased):
    # floats per padded row of a row kernel's plane (rows start 64-byte
    # aligned): Wp rounded up to 16, or each column phase rounded up to 16
    if phased:
        return 2 * (((Wp + 1) // 2 + 15) // 16 * 16)
    return (Wp + 15) // 16 * 16


@njit(inline="always")
def _dw_load_phases(x, n, c, pt, pl, pe, dst):
    # the zero-padded float32 plane (n, c) of x (float16 bits) split into its
    # column phases: padded row r's even columns at dst[r*2*pe :], its odd
    # ones pe floats later (pe >= ceil(Wp / 2)); 16 values a conversion, as
    # _dw_load_plane (the row's last 16 again, overlapping; rows of fewer
    # than 16 one value at a time). Padding stays zero as there.
    H, W = x.shape[2], x.shape[3]
    W16 = W - W % 16
    s0 = x.ctypes.data + 2 * (n * x.shape[1] + c) * H * W
    d0 = dst.ctypes.data
    xb = x[n, c]
    nblk = W16 // 16 + (1 if W16 < W and W >= 16 else 0)
    for h in range(H):
        e = d0 + 4 * (h + pt) * 2 * pe  # the row's evens; odds at e + 4*pe
        sr = s0 + h * W * 2
        for k in range(nblk):
            w = min(16 * k, W - 16)
            q = pl + w  # padded column of x[.., w]
            if q % 2 == 0:
                _cvt16_split(sr + 2 * w, e + 2 * q, e + 4 * pe + 2 * q)
            else:
                _cvt16_split(sr + 2 * w, e + 4 * pe + 2 * (q - 1), e + 2 * (q + 1))
        if W < 16:
            for w in range(W):
                q = pl + w
                at = (h + pt) * 2 * pe + (q % 2) * pe + q // 2
                dst[at] = _f16_bits_to_f32(xb[h, w])


@njit(nogil=True, cache=True)
def _dw_planes(t0, t1, fused, x, xp, wd, offs, geo, pt, pl, sc, acc, bias, has_bias, lo,
              hi, mode, out32, out16):  # fmt: skip
    # output planes t0 .. t1 - 1, (n, c) each (one call per thread: a call
    # per plane cost ~24 us of ~190 for 144 56x56 planes). fused (F16C):
    # the input plane is converted from float16 into the per-thread scratch
    # sc here, no padded copy of the whole input; strides 1 and 2 then run
    # the row microkernel (_dw_row),
    # other strides the loops below on sc. Not fused (portable): read from
    # xp (N, C, Hp, Wp) float32 with plain loops: 3x3 stride 1 as one flat
    # loop over u = oh*Wp + ow, 9 taps unrolled (LLVM's own vectorization
    # left it scalar here: ~5 us a 56x56 plane, 9x the row kernel);
    # otherwise one pass per tap over each output row. Sum order (i, j) on
    # every path.
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    for t in range(t0, t1):
        n = t // C
        c = t - n * C
        if fused and sw <= 2:
            # the row kernel: taps loop in registers, 16 pixels a vector.
            # Pitch P: Wp rounded up to 16 floats (sc is 64-byte aligned), so
            # that rows start aligned (the ROW3 kernel's aligned loads need it)
            phased = _dw_uses_phases(kw, sw, dh, dw)
            P = _dw_pitch(Wp, phased)
            if phased:
                _dw_load_phases(x, n, c, pt, pl, P // 2, sc)
            else:
                _dw_load_plane(x, n, c, pt, pl, P, Hp, sc)
            nt = kh * kw
            nv = 1 if Wo <= 16 else (2 if Wo <= 32 else 4)
            hb = 1 if has_bias else 0
            b = bias[c] if has_bias else np.float32(0.0)
            osz = 4 if mode == 0 else 2
            o0 = out32.ctypes.data if mode == 0 else out16.ctypes.data
            o0 += osz * (n * C + c) * Ho * Wo
            w0 = wd.ctypes.data + 4 * c * nt
            kind, oa, ntap = sw, offs.ctypes.data, nt
            if phased:  # kind 5: up to 2 vectors (no shuffles: 12 ymm live)
                nv = min(nv, 2)
                kind, oa, ntap = 5, 4 * P, kh
            elif kw == 3 and dw == 1:  # ROW3 (kind 3, stride 2: 4): per kernel row
                nv = min(nv, _dw_nv_max())
                kind, oa, ntap = sw + 2, 4 * P * dh, kh
            _dw_row(
                kind, nv, sc.ctypes.data, oa, w0, ntap, Wo, o0, mode, hb, b, lo, hi, Ho,
                4 * sh * P, osz * Wo,
            )  # fmt: skip
            continue
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
            continue
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
            continue
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
            _dw_finish(
                acc, 0, Wo, b, has_bias, lo, hi, mode, out32, out16, n, c, oh * Wo
            )


@njit(**PJIT)
def depthwise(threads, nj, fused, x, xp, wd, geo, pt, pl, bias, has_bias, lo, hi,
              mode, out32, out16):  # fmt: skip
    # x (N, C, H, W) float16 bits (fused) or xp (N, C, Hp, Wp) float32 padded;
    # wd (C, kh*kw) float32; out (N, C, Ho*Wo). One job per (image, channel)
    # plane. The scratch is made here (numpy calls in Python cost ~ 10 us a
    # call, a third of a 28x28 layer's time at 2 threads): per thread a
    # zeroed padded plane sc (rows of P floats, P = Wp rounded up to 16 for
    # the row kernel, 64-byte aligned, DW_SLACK zeros after it) and a row
    # buffer acc; offs: the taps' byte offsets in sc, in the sum order (i, j).
    # threads: numba.config.NUMBA_NUM_THREADS (get_thread_id's bound); nj:
    # the threads in use, one job (a run of planes) each
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    P = _dw_pitch(Wp, False) if (fused and sw <= 2) else Wp
    room = P  # the plane's pitch in sc (_dw_planes), offs's is P
    if fused and _dw_uses_phases(kw, sw, dh, dw):
        room = _dw_pitch(Wp, True)
    size = (Hp * room + DW_SLACK + 15) // 16 * 16
    raw = np.zeros(threads * size + 16, np.float32)
    off = ((-raw.ctypes.data) % 64) // 4
    sc = raw[off : off + threads * size].reshape(threads, size)
    acc = np.empty((threads, Ho * Wp), np.float32)
    offs = np.empty(kh * kw, np.int64)
    for i in range(kh):
        for j in range(kw):
            offs[i * kw + j] = 4 * (i * dh * P + j * dw)
    for job in prange(nj):
        tid = numba.get_thread_id()
        _dw_planes(
            (job * N * C) // nj, ((job + 1) * N * C) // nj, fused, x, xp, wd, offs,
            geo, pt, pl, sc[tid], acc[tid], bias, has_bias, lo, hi, mode, out32, out16,
        )  # fmt: skip


# ---------------------------------------------------------------------------
# avx2_f16c: the output as a GEMM of the weights (A: float32 rows of K in the
# order (i, j, c), 6 channels a tile) by the taps of 64 consecutive output
# pixels (B: K rows of 64 float16), on fp16_gemm's 16-column ymm strips. The
# float16 image is split into its sh*sw stride phases (pad_phases16, the rows
# path's layout without the conversion; a 1x1 stride-1 unpadded image is its
# own phase and is read in place), so a tap's run of one output row is one
# contiguous slice of a phase plane: B's row k = (i, j, c) for the job's 64
# pixels is copied from those runs (_pack_taps, a table of the K row offsets:
# tap_table) into a contiguous per-job panel that every 6-channel tile of the
# job then streams. Against reading the rows in place (the strips loading
# each row from the image through the table: 3x3 64->64 at 56^2, 1 thread,
# 71 -> 90 GFLOP/s with the epilogue's moves below; ORT's float Conv 93) and
# over the phase grid (Wq > Wo columns computed and dropped: 12.5 % of the
# 14^2 layer's work). Every output's sum runs over k in the contract's order
# (an FMA of two float16 values equals fl32(acc + x*w): exact products): the
# portable loops' bits.

AVX2_PIX = NR  # output pixels a job (the strips' 64 columns)
# weights (bytes of float32 A) above which a job takes a block of AVX2_MB
# channels instead of all of a group's: the block's rows then stay in L2
# across the segments (3x3 256->256 at 14^2 streamed 2.4 MB of weights per
# 14-pixel row when jobs were output rows). 256 KB before: 64 -> 128 channels
# at 7x7 (295 KB, 250 images, 1 thread, Zen 3) 37 -> 27.5 ms with all
# channels a job, its panel packed once instead of once a block
AVX2_W_BYTES = 512 << 10
AVX2_MB = 4 * MR_MAX
# channel blocks share their segment's panel: every panel packed once, before
# the tiles, while they all fit in this many bytes (14^2, 256 channels: 1.2
# MB); past it each job packs its own
AVX2_PRE_BYTES = 4 << 20


def make_tap_strips(MR):
    """_t(a, lda, b, ks, c, ldc, ncols) int64s: c[r, col] = sum over k < ks
    of a[r, k] * float(b16[k, col]) for the columns of every group of strips
    (SV strips of 16 columns, run together) that holds one of the ncols
    valid columns; the other groups are skipped and their part of c is not
    written. a: float32 rows lda bytes apart; b: a panel of rows of AVX2_PIX
    float16 (_pack_taps); c: float32 rows of ldc elements. As fp16_gemm's
    split tile, plus the skipped groups (a layer's last segment)."""
    SV = {1: 4, 2: 2}.get(MR, 1)

    def codegen(context, builder, sig, args):
        a, lda, b, ks, c, ldc, ncols = args
        c64 = lambda v: ir.Constant(_i64, v)  # noqa: E731
        i8p = ir.IntType(8).as_pointer()
        fma = _fma(builder)
        a_base = builder.inttoptr(a, i8p)
        b_base = builder.inttoptr(b, i8p)
        c_base = builder.inttoptr(c, i8p)
        a_rows = [builder.gep(a_base, [builder.mul(lda, c64(r))]) for r in range(MR)]
        ldc4 = builder.mul(ldc, c64(4))
        for v0 in range(0, NV, SV):

            def strip(kphi, phis, v0=v0):
                row = builder.gep(b_base, [builder.mul(kphi, c64(2 * AVX2_PIX))])
                bvs = []
                for v in range(v0, v0 + SV):
                    p = builder.gep(row, [c64(32 * v)])
                    h = builder.load(builder.bitcast(p, _vh.as_pointer()), align=2)
                    bvs.append(builder.fpext(h, _vf))
                new = []
                for r in range(MR):
                    q = builder.gep(a_rows[r], [builder.mul(kphi, c64(4))])
                    q = builder.bitcast(q, _f32.as_pointer())
                    av = _splat(builder, builder.load(q, align=4), _vf)
                    for j, bv in enumerate(bvs):
                        new.append(builder.call(fma, [av, bv, phis[r * SV + j]]))
                return new

            def run(vals, v0=v0):
                zero = [ir.Constant(_vf, None)] * (MR * SV)
                fin = _ir_loop(builder, c64(0), ks, zero, strip, name="tap")
                for r in range(MR):
                    crow = builder.gep(c_base, [builder.mul(ldc4, c64(r))])
                    for j in range(SV):
                        p = builder.gep(crow, [c64(64 * (v0 + j))])
                        p = builder.bitcast(p, _vf.as_pointer())
                        builder.store(fin[r * SV + j], p, align=4)
                return vals

            # strips that hold a valid column only
            _ir_if(builder, builder.icmp_signed("<", c64(16 * v0), ncols), [], run)
        return context.get_dummy_value()

    @intrinsic
    def _t(typingctx, a, lda, b, ks, c, ldc, ncols):
        return types.void(*([types.int64] * 7)), codegen

    return _t


_tap1, _tap2, _tap3, _tap4, _tap5, _tap6 = (make_tap_strips(m) for m in range(1, 7))
assert MR_MAX == 6


@njit(inline="always")
def _tap_tile(mr, a, lda, b, ks, c, ldc, ncols):
    if mr == 6:
        _tap6(a, lda, b, ks, c, ldc, ncols)
    elif mr == 5:
        _tap5(a, lda, b, ks, c, ldc, ncols)
    elif mr == 4:
        _tap4(a, lda, b, ks, c, ldc, ncols)
    elif mr == 3:
        _tap3(a, lda, b, ks, c, ldc, ncols)
    elif mr == 2:
        _tap2(a, lda, b, ks, c, ldc, ncols)
    else:
        _tap1(a, lda, b, ks, c, ldc, ncols)


@njit(**PJIT)
def pad_phases16(x, xq, pt, pl, sh, sw, Hq, Wq):
    # x (N, C, H, W) uint16 -> xq (N*C, sh*sw*Hq*Wq) uint16: pad_phases's
    # layout (phase (a, b) holds padded rows a, a+sh, ... and columns b, b+sw,
    # ...) of the float16 bits, zeros around
    N, C, H, W = x.shape
    P = Hq * Wq
    whole = sh * Hq == H and sw * Wq == W  # no padding: every element written
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        src = x[n, c]
        dst = xq[t]
        if not whole:
            dst[:] = 0
        for h in range(H):
            hp = h + pt
            rb = (hp % sh) * sw * P + (hp // sh) * Wq
            srow = src[h]
            if sw == 1 and W >= 4:  # inline moves (an indexed loop: 1 ns a value)
                copy_bytes(dst.ctypes.data + 2 * (rb + pl), srow.ctypes.data, 2 * W)
                continue
            for b in range(sw):
                w0 = (b - pl) % sw  # the first column of phase b
                d = rb + b * P + (w0 + pl) // sw
                if sw == 2:  # a constant stride: LLVM's interleaved loads
                    for u in range((W - w0 + 1) // 2):
                        dst[d + u] = srow[w0 + 2 * u]
                    continue
                for u in range((W - w0 + sw - 1) // sw):
                    dst[d + u] = srow[w0 + u * sw]


@njit(inline="always")
def _pack_taps(xf, e0, cstride, tab, K, Wq, HW, Wo, q0, npix, dst):
    # dst[k * 64 + col] = the float16 tap k of output pixel q0 + col (col <
    # npix) of the flat (image, pixel) index q = n * HW + oh * Wo + ow: xf is
    # the phase planes flat, e0 the channel group's first plane in image 0,
    # cstride the elements from one image to the next, tab[k] the tap's offset
    # from a group's first plane; each output row's run is one slice (a run
    # ends at its row, so never crosses images), K copies. Columns past npix
    # keep stale values (their outputs are dropped)
    x0 = xf.ctypes.data
    d0 = dst.ctypes.data
    q = q0
    while q < q0 + npix:
        n = q // HW
        p = q - n * HW
        oh = p // Wo
        ow = p - oh * Wo
        run = min(Wo - ow, q0 + npix - q)
        e = e0 + n * cstride + oh * Wq + ow
        c0 = q - q0
        if run >= 4:  # inline moves, >= 8 bytes
            for k in range(K):
                copy_bytes(d0 + 2 * (AVX2_PIX * k + c0), x0 + 2 * (e + tab[k]), 2 * run)
        else:
            for k in range(K):
                for u in range(run):
                    dst[AVX2_PIX * k + c0 + u] = xf[e + tab[k] + u]
        q += run


@njit(**PJIT)
def conv_avx2(xq, wa, geo, Wq, tab, mb, pre, pk, tiles, nxt, nt, bias, has_bias, lo,
              hi, mode, out32, out16):  # fmt: skip
    # xq (N*C, S*Hq*Wq) uint16 float16 bits (pad_phases16, or the image
    # itself); wa (G, Mg, K) float32, K order (i, j, c); tab (K,) int64: B row
    # k's element offset from a channel group's first plane; mb channels a job
    # (a multiple of MR_MAX, or Mg); pk: the panels, (G*nseg, K*64) uint16
    # when pre (packed first, shared by the channel blocks), else (threads,
    # K*64) (each job packs its own); tiles (threads, MR_MAX, 64) float32
    # scratch; nxt (2,) int64: the job counters (kernels/jobs.py), nt the
    # threads; out (N, M, Ho*Wo). Jobs: (group, channel block, segment of 64
    # output pixels), the segment fastest. Segments run over the images'
    # pixels one after another (a segment may end in one image and go on in
    # the next): per image, a 7x7 image's 49 pixels filled 49 of the 64
    # columns computed, a 14x14 one's last segment 4 of 16
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo
    K = kh * kw * Cg
    HW = Ho * Wo
    nseg = (N * HW + AVX2_PIX - 1) // AVX2_PIX
    nmb = (Mg + mb - 1) // mb
    lda = wa.strides[1]
    plane = xq.shape[1]
    cstride = C * plane
    xf = xq.reshape(-1)
    nxt[0] = 0
    nxt[1] = 0
    if pre:
        # (two loops: every panel is packed before any tile reads one. Kept
        # apart by this branch: numba may fuse adjacent pranges, and it
        # cannot see the dependence, which goes through addresses)
        for _ in prange(nt):
            u = fetch_add(nxt.ctypes.data, 1)
            while u < G * nseg:
                q0 = (u % nseg) * AVX2_PIX
                npix = min(AVX2_PIX, N * HW - q0)
                e0 = (u // nseg) * Cg * plane
                _pack_taps(xf, e0, cstride, tab, K, Wq, HW, Wo, q0, npix, pk[u])
                u = fetch_add(nxt.ctypes.data, 1)
    for _ in prange(nt):
        tile = tiles[numba.get_thread_id()]
        t = fetch_add(nxt.ctypes.data + 8, 1)
        while t < G * nmb * nseg:
            seg = t % nseg
            rest = t // nseg
            blk = rest % nmb
            g = rest // nmb
            q0 = seg * AVX2_PIX
            npix = min(AVX2_PIX, N * HW - q0)
            if pre:
                b0 = pk[g * nseg + seg].ctypes.data
            else:
                panel = pk[numba.get_thread_id()]
                _pack_taps(xf, g * Cg * plane, cstride, tab, K, Wq, HW, Wo, q0, npix,
                           panel)  # fmt: skip
                b0 = panel.ctypes.data
            m0 = blk * mb
            _tap_job(wa, g, m0, min(Mg, m0 + mb), lda, b0, K, tile, npix, q0, HW, Mg,
                     bias, has_bias, lo, hi, mode, out32, out16)  # fmt: skip
            t = fetch_add(nxt.ctypes.data + 8, 1)


@njit(inline="always")
def _tap_job(wa, g, m0, m1, lda, b0, K, tile, npix, q0, HW, Mg, bias, has_bias, lo,
             hi, mode, out32, out16):  # fmt: skip
    # channels m0 .. m1-1 of group g on the panel at b0, 6 at a time. (Blocks
    # of 128 K rows through all the tiles in turn, the panel's block kept in
    # L1, measured level: 3x3 256->256 14^2, 1 thread, 2792-2829 vs 2789-2881 us)
    for m in range(m0, m1, MR_MAX):
        mr = min(MR_MAX, m1 - m)
        a0 = wa.ctypes.data + g * wa.strides[0] + m * lda
        _tap_tile(mr, a0, lda, b0, K, tile.ctypes.data, AVX2_PIX, npix)
        _tap_epilogue(tile, mr, npix, q0, HW, g * Mg + m, bias, has_bias, lo, hi,
                      mode, out32, out16)  # fmt: skip


@njit(inline="always")
def _tap_epilogue(tile, mr, npix, q0, HW, m0, bias, has_bias, lo, hi, mode, out32,
                  out16):  # fmt: skip
    # fp16_gemm._epilogue's arithmetic on the tile's columns = output pixels
    # q0 .. q0+npix-1 (flat over the images) of channels m0 .. m0+mr-1; each
    # case one branch-free loop (vectorized by LLVM), the float32 rows stored
    # by 32-byte moves, one piece per image the columns touch (an indexed
    # loop's scalar tail: ~3.5 cycles a value, 750 of the RGB stem's 3600 us
    # on 1 thread)
    clamp = lo > -np.inf or hi < np.inf
    for r in range(mr):
        t = tile[r]
        if has_bias:
            b = bias[m0 + r]
            for jj in range(npix):
                t[jj] = np.float32(t[jj] + b)
        if clamp:
            for jj in range(npix):
                v = t[jj]
                v = lo if v < lo else v
                t[jj] = hi if v > hi else v
        c = 0
        while c < npix:
            n = (q0 + c) // HW
            p = q0 + c - n * HW
            cnt = min(npix - c, HW - p)
            if mode == 0 and cnt >= 2:
                o = out32[n, m0 + r]
                copy_bytes(o.ctypes.data + 4 * p, t.ctypes.data + 4 * c, 4 * cnt)
            elif mode == 0:
                out32[n, m0 + r, p] = t[c]
            else:
                f16_row_store(t[c:], out16[n, m0 + r, p:], cnt)
            c += cnt


def tap_table(geo, Hq, Wq):
    """(K,) int64: B row k = (i*kw + j)*Cg + c's element offset from a channel
    group's first phase plane (pad_phases16's layout): channel c, phase
    (i*dh % sh, j*dw % sw), row i*dh // sh, column j*dw // sw."""
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = (int(v) for v in geo)
    i, j, c = np.meshgrid(np.arange(kh), np.arange(kw), np.arange(Cg), indexing="ij")
    P = Hq * Wq
    phase = (i * dh % sh) * sw + j * dw % sw
    offs = c * (sh * sw * P) + phase * P + (i * dh // sh) * Wq + j * dw // sw
    return offs.reshape(-1).astype(np.int64)


def pool16_planes(h, w):
    """Planes a task of maxpool2x2_to16 for (h, w) outputs a plane: >= 256
    values a conversion. Its tmp rows: W + pool16_planes(h, w) * h * w."""
    return max(1, -(-256 // max(1, h * w)))


@njit(**PJIT)
def maxpool2x2_to16(x, out, tmp, chunk):
    # layout.maxpool2x2_nchw with the pooled planes stored as float16 bits
    # (out (P, H//2, W//2) uint16, rounded once: max commutes with the
    # rounding); tmp (threads, >= W + chunk*(H//2)*(W//2)) float32. Tasks of
    # `chunk` planes (pool16_planes), converted at once: rows of 14 would all
    # take f16_row_store's scalar tail, and a 3x3 plane a task took 2.8-3.0 ms
    # for 250 x 128 x 7^2 (the kernel alone, best of 7, Zen 3; in chunks 1.4
    # on 1 thread, 2.8 -> 1.0 on 2). F16C paths only. numpy's float32 ->
    # float16 astype took 5.0 ms for 250 x 32 x 14^2
    P = x.shape[0]
    h = out.shape[1]
    w = out.shape[2]
    hw = h * w
    of = out.reshape(-1)
    for c in prange((P + chunk - 1) // chunk):
        buf = tmp[numba.get_thread_id()]
        pooled = buf[x.shape[2] :]
        p0 = c * chunk
        p1 = min(P, p0 + chunk)
        for p in range(p0, p1):
            for i in range(h):
                pool_row2x2(x, p * h + i, h, w, buf, pooled[(p - p0) * hw + i * w :])
        f16_row_store(pooled, of[p0 * hw :], (p1 - p0) * hw)
