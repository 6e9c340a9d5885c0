"""AVX-512 VNNI INT8 GEMM: ``vpdpbusd zmm`` through numba @intrinsic + llvmlite IR.

Computes lowprec's raw product (docs/quantization.md, eq. 6)

    P[m, n] = sum_k a'[m, k] * b'[k, n]      a' uint8, b' int8, P int32 (wrapping)

  a'  (M, K) uint8 with unit column stride (any row stride). K % 4 != 0 needs no
      copy when K >= 4: the last partial group of 4 bytes is loaded from
      [K-4, K) of the row (always in bounds) and shifted so that only the tail
      bytes remain; they meet zeros in the packed B.
  b'  packed by :func:`pack_b` panel-major: [NP][K4][NR][4] int8, NP = ceil(N/NR),
      K4 = ceil(K/4), packed[p, k4, j, i] = b'[4*k4 + i, NR*p + j], zero padded.
      One register tile streams one contiguous panel.
  out (M, N) int32, any row stride, fully overwritten.

Kernel: a register tile of MR x NR = 6 x 64 int32 (24 zmm accumulators). The
whole K loop of one tile is one LLVM loop built with llvmlite inside one
@intrinsic, so the accumulators stay in registers (phi nodes). Per step of 4 k:
MR 4-byte loads of A broadcast to zmm (vpbroadcastd), NV = 4 64-byte loads of
B, MR * NV vpdpbusd. M tail: kernels for MR = 1..5. N tail: vectors past the
valid columns are clamped to the last valid one and stores are masked.

Two intrinsics share that loop (_k_loop): the raw tile (make_tile_kernel: P
into int32, optionally accumulated; the K-chunked path) and the fused tile
(make_fused_kernel: eqs. 8-13 applied to the accumulators in registers and the
output written in its final type; gemm_fused and the convolution), which also
takes int8 A and flips it to a' as it loads.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .ir_util import if_then as _ir_if
from .ir_util import loop as _ir_loop
from .ir_util import splat

# ---------------------------------------------------------------------------
# Tile shape.  Compile-time constants (NOT env knobs: numba's cache would not
# see a change).  Sweep at KC=1024, 1 thread, GOP/s (peak 436-454):
#   6x64 : 1024^3 371, 2048^3 356, 128x3072x768 348, 16x1536x384 367, 3136x64x576 410
#   8x48 : 366 / 364 / 346 / 398 / 284 (N=64 -> 48+16 tail wastes 1/3)
#   12x32: 371 / 353 / 356 / 359 / 417      14x32: 364/353/337/320/407
#   4x96 : 356 / 311 / 324 / 353 / 269      5x80 : 365/294/339/354/341
# -> 6 x 64 (24 zmm accumulators + 4 B + 1 A broadcast = 29 zmm, no spills).
MR_MAX = 6  # rows per register tile (kernels for 1..MR_MAX are built)
NV = 4  # zmm vectors per row -> NR = 64 columns
NR = 16 * NV
# Software prefetch of B 4/8/16 k4-rows ahead gave no measurable gain (within
# the +-10% noise of this shared VM), so there is none.

_i1 = ir.IntType(1)
_i8 = ir.IntType(8)
_i32 = ir.IntType(32)
_i64 = ir.IntType(64)
_f32 = ir.FloatType()
_f64 = ir.DoubleType()
_v16 = ir.VectorType(_i32, 16)
_m16 = ir.VectorType(_i1, 16)


def _vpdpbusd(builder):
    fnty = ir.FunctionType(_v16, [_v16, _v16, _v16])
    return cgutils.get_or_insert_function(
        builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512"
    )


def _masked_load(builder, ptr, mask):
    # <16 x i32> @llvm.masked.load.v16i32.p0(ptr, i32 align, <16 x i1>, passthru)
    fnty = ir.FunctionType(_v16, [_v16.as_pointer(), _i32, _m16, _v16])
    fn = cgutils.get_or_insert_function(
        builder.module, fnty, "llvm.masked.load.v16i32.p0"
    )
    return builder.call(fn, [ptr, ir.Constant(_i32, 4), mask, ir.Constant(_v16, None)])


def _masked_store(builder, val, ptr, mask):
    fnty = ir.FunctionType(ir.VoidType(), [_v16, _v16.as_pointer(), _i32, _m16])
    fn = cgutils.get_or_insert_function(
        builder.module, fnty, "llvm.masked.store.v16i32.p0"
    )
    builder.call(fn, [val, ptr, ir.Constant(_i32, 4), mask])


def _gep8(builder, p, off):
    return builder.gep(p, [off])


def _load_i32(builder, p8):
    ptr = builder.bitcast(p8, _i32.as_pointer())
    ld = builder.load(ptr, align=1)
    return ld


def _load_v16(builder, p8):
    ptr = builder.bitcast(p8, _v16.as_pointer())
    return builder.load(ptr, align=1)


def _b_offsets(builder, NV_, nvalid, lanes=16):
    """Byte offsets of the tile's B vectors in a panel row (4 * lanes bytes per
    vector: lanes columns x 4 k-bytes), clamped: min(v, nvec-1) * 4 * lanes,
    nvec = ceil(nvalid/lanes) (columns past nvalid repeat the last valid
    vector, which the masked stores drop; no read past the panel)."""
    nvec = builder.udiv(
        builder.add(nvalid, ir.Constant(_i64, lanes - 1)), ir.Constant(_i64, lanes)
    )
    last = builder.sub(nvec, ir.Constant(_i64, 1))
    offs = []
    for v in range(NV_):
        cv = ir.Constant(_i64, v)
        vv = builder.select(builder.icmp_signed("<", cv, last), cv, last)
        offs.append(builder.mul(vv, ir.Constant(_i64, 4 * lanes)))
    return offs


def _vnni_step(builder, accs, MR, a_of, b_row, b_offs):
    """One k4 step of an MR x (16*NV_) tile: a_of(r) emits row r's 4 A bytes
    (i32) where its broadcast is used, b_row = the packed B row (NV_ vectors
    at b_offs); returns accs + MR * NV_ vpdpbusd (row-major). Emitting all MR
    A words first (a list) made the int8-A tile (load, xor 0x80, broadcast)
    30 % slower: 1024^3 s8s8 424 -> 281-319 GOP/s on 1 thread."""
    vpd = _vpdpbusd(builder)
    bvecs = [_load_v16(builder, _gep8(builder, b_row, o)) for o in b_offs]
    new = []
    for r in range(MR):
        av = splat(builder, a_of(r), _v16)
        for v, bv in enumerate(bvecs):
            # operand 2 = unsigned bytes (A), operand 3 = signed bytes (B)
            new.append(builder.call(vpd, [accs[r * len(bvecs) + v], av, bv]))
    return new


def _k_loop(builder, MR, NV_, a, lda, b, ldb, k4, kr, nvalid, flip=False):
    """Emit the K loop of one MR x (16*NV_) tile; returns its accumulators.

    The accumulators are MR*NV_ <16 x i32> SSA values (row-major), the raw P of
    eq. 6 for this tile; columns past nvalid hold copies of the last valid vector.
    flip: A holds int8; a' = a + 128 = a XOR 0x80 per byte (eq. 5) is formed on
    the four loaded bytes, so int8 activations need no converted copy.
    """

    def load_a(ptr):
        x = _load_i32(builder, ptr)
        return builder.xor(x, ir.Constant(_i32, 0x80808080)) if flip else x

    i8p = _i8.as_pointer()
    zero64 = ir.Constant(_i64, 0)

    a_base = builder.inttoptr(a, i8p)
    b_base = builder.inttoptr(b, i8p)
    # row pointers of A
    a_rows = [
        _gep8(builder, a_base, builder.mul(lda, ir.Constant(_i64, r)))
        for r in range(MR)
    ]
    b_offs = _b_offsets(builder, NV_, nvalid)

    zero_v = ir.Constant(_v16, None)

    def step(kphi, accs):
        k_bytes = builder.shl(kphi, ir.Constant(_i64, 2))
        b_row = _gep8(builder, b_base, builder.mul(kphi, ldb))
        return _vnni_step(
            builder, accs, MR, lambda r: load_a(_gep8(builder, a_rows[r], k_bytes)),
            b_row, b_offs,
        )  # fmt: skip

    # main K loop: accumulators as phi nodes -> stay in zmm registers
    accs = _ir_loop(builder, zero64, k4, [zero_v] * (MR * NV_), step, name="vnni")

    def tail(accs):
        # bytes [4*k4, 4*k4+kr) of each row: load the 4 bytes ending at the
        # tail end (always inside the row) and shift out the (4-kr) low bytes.
        k_bytes_t = builder.shl(k4, ir.Constant(_i64, 2))
        back = builder.sub(ir.Constant(_i64, 4), kr)
        shift = builder.trunc(builder.shl(back, ir.Constant(_i64, 3)), _i32)
        at = builder.sub(builder.add(k_bytes_t, kr), ir.Constant(_i64, 4))
        b_row = _gep8(builder, b_base, builder.mul(k4, ldb))
        return _vnni_step(
            builder, accs, MR,
            lambda r: builder.lshr(load_a(_gep8(builder, a_rows[r], at)), shift),
            b_row, b_offs,
        )  # fmt: skip

    return _ir_if(builder, builder.icmp_signed(">", kr, zero64), accs, tail,
                    name="vnni.tail")  # fmt: skip


def _k_loop_seg(builder, MR, NV_, a, seg_stride, b, ldb, k4, run4, nvalid):
    """_k_loop for a convolution's implicit GEMM, reading A in place: a is the
    address of MR int64 row start addresses (any spacing: a tile may span
    output rows and images), each row's K bytes being k4 / run4 runs of run4
    4-byte words (one kernel row of an NHWC input) seg_stride bytes apart.
    Two nested loops (runs, words), so the inner one is _k_loop's plain loop
    (a select-based run counter in one loop measured slower than the gather
    it replaces). No K tail (K = 4 * k4)."""
    i8p = _i8.as_pointer()
    zero64 = ir.Constant(_i64, 0)
    b_base = builder.inttoptr(b, i8p)
    starts = builder.inttoptr(a, _i64.as_pointer())
    a_rows = [
        builder.inttoptr(builder.load(builder.gep(starts, [ir.Constant(_i64, r)])), i8p)
        for r in range(MR)
    ]
    b_offs = _b_offsets(builder, NV_, nvalid)
    nseg = builder.sdiv(k4, run4)
    zero_v = ir.Constant(_v16, None)

    def run(s_, carried):
        # one kernel-row run (the accumulators carried by the outer loop),
        # then the plain K loop over the run's words
        aoff, kb, accs = carried[0], carried[1], carried[2:]
        run_rows = [_gep8(builder, a_rows[r], aoff) for r in range(MR)]
        b_run = _gep8(builder, b_base, builder.mul(kb, ldb))

        def word(j, accs):
            j_bytes = builder.shl(j, ir.Constant(_i64, 2))
            b_row = _gep8(builder, b_run, builder.mul(j, ldb))
            return _vnni_step(
                builder, accs, MR,
                lambda r: _load_i32(builder, _gep8(builder, run_rows[r], j_bytes)),
                b_row, b_offs,
            )  # fmt: skip

        accs = _ir_loop(builder, zero64, run4, accs, word, guard=False, name="seg.in")
        return [builder.add(aoff, seg_stride), builder.add(kb, run4)] + accs

    # aoff = s * seg_stride, kb = s * run4 (B row of the run's first word)
    init = [zero64, zero64] + [zero_v] * (MR * NV_)
    return _ir_loop(builder, zero64, nseg, init, run, name="seg")[2:]


def _col_masks(builder, NV_, nvalid, width=16):
    """<width x i1> per vector v: column width*v + lane < nvalid."""
    v64 = ir.VectorType(_i64, width)
    lanes = ir.Constant(v64, list(range(width)))
    nv_splat = splat(builder, nvalid, v64)
    return [
        builder.icmp_signed(
            "<", builder.add(lanes, ir.Constant(v64, [width * v] * width)), nv_splat
        )
        for v in range(NV_)
    ]


def make_tile_kernel(MR, NV_):
    """Build an intrinsic computing one MR x (16*NV_) raw tile over a K range.

    _tile(a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum)   all int64
      a      : address of A[m0, k0]             (uint8, row stride lda bytes)
      b      : address of packed[k0/4, n0, 0]   (int8, k4-row stride ldb bytes
               = 4*Npad); vectors v*64 bytes apart.
      k4     : number of full 4-byte K groups in this K block
      kr     : 0..3, remaining K bytes after the k4 groups (only for the last
               K block); needs >= 4 bytes of the A row before the tail end.
      c      : address of out[m0, n0] (int32, row stride ldc elements)
      nvalid : valid columns in this tile (1..16*NV_); rest masked off
      accum  : 0 -> C = tile, 1 -> C += tile
    """

    def codegen(context, builder, sig, args):
        a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum = args
        fin = _k_loop(builder, MR, NV_, a, lda, b, ldb, k4, kr, nvalid)
        masks = _col_masks(builder, NV_, nvalid)
        acc_flag = builder.icmp_signed("!=", accum, ir.Constant(_i64, 0))
        acc_mask_s = builder.insert_element(
            ir.Constant(_m16, ir.Undefined), acc_flag, ir.Constant(_i32, 0)
        )
        acc_mask = builder.shuffle_vector(
            acc_mask_s, acc_mask_s, ir.Constant(_v16, None)
        )
        c_base = builder.inttoptr(c, _i32.as_pointer())
        for r in range(MR):
            c_row = builder.gep(c_base, [builder.mul(ldc, ir.Constant(_i64, r))])
            for v in range(NV_):
                cp = builder.bitcast(
                    builder.gep(c_row, [ir.Constant(_i64, 16 * v)]), _v16.as_pointer()
                )
                old = _masked_load(builder, cp, builder.and_(masks[v], acc_mask))
                val = builder.add(fin[r * NV_ + v], old)
                _masked_store(builder, val, cp, masks[v])
        return context.get_dummy_value()

    @intrinsic
    def _tile(typingctx, a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum):
        sig = types.void(*([types.int64] * 10))
        return sig, codegen

    return _tile


# ---------------------------------------------------------------------------
# the fused tile: K loop and the epilogue of kernels/requant.py in registers


def _vec_load(builder, addr, elt, mask):
    """Masked load of 16 elements of type elt at the int64 address addr."""
    vt = ir.VectorType(elt, 16)
    ptr = builder.inttoptr(addr, vt.as_pointer())
    name = {_i64: "v16i64", _i32: "v16i32", _f32: "v16f32", _f64: "v16f64"}[elt]
    fnty = ir.FunctionType(vt, [vt.as_pointer(), _i32, _m16, vt])
    fn = cgutils.get_or_insert_function(
        builder.module, fnty, f"llvm.masked.load.{name}.p0"
    )
    return builder.call(fn, [ptr, ir.Constant(_i32, 1), mask, ir.Constant(vt, None)])


def _byte_masked_stores() -> bool:
    """Whether this CPU stores bytes under a mask (AVX-512 BW). Without it
    LLVM turns a masked store of 16 bytes into 16 tested scalar stores: on an
    AVX2 Zen 3 that was most of the 3x3 depthwise kernel's time (12 -> 8 ns a
    block of 16 uint8 outputs with the full-vector branch below). numba
    compiles for the host CPU (its cache is per CPU), so the host's features
    are the target's."""
    import llvmlite.binding as llvm

    return bool(llvm.get_host_cpu_features().get("avx512bw", False))


_BYTE_MASKS = _byte_masked_stores()


def _masked_store_any(builder, val, ptr, mask):
    """llvm.masked.store of any vector (alignment 1); bytes without AVX-512 BW
    as a plain store when every lane is valid (_byte_masked_stores)."""
    vt = val.type
    el = "i8" if vt.element == _i8 else {_i32: "i32", _f32: "f32"}[vt.element]
    fnty = ir.FunctionType(ir.VoidType(), [vt, vt.as_pointer(), _i32, mask.type])
    fn = cgutils.get_or_insert_function(
        builder.module, fnty, f"llvm.masked.store.v{vt.count}{el}.p0"
    )
    if vt.element != _i8 or _BYTE_MASKS:
        builder.call(fn, [val, ptr, ir.Constant(_i32, 1), mask])
        return
    rty = ir.FunctionType(_i1, [mask.type])
    every = cgutils.get_or_insert_function(
        builder.module, rty, f"llvm.vector.reduce.and.v{vt.count}i1"
    )
    with builder.if_else(builder.call(every, [mask])) as (whole, part):
        with whole:
            builder.store(val, ptr, align=1)
        with part:
            builder.call(fn, [val, ptr, ir.Constant(_i32, 1), mask])


def _vec_store(builder, val, addr, mask):
    _masked_store_any(builder, val, builder.inttoptr(addr, val.type.as_pointer()), mask)


def _clamp(builder, x, lo, hi):
    # min(max(x, lo), hi) as kernels/requant.py writes it (no NaN reaches here)
    x = builder.select(builder.fcmp_ordered("<", x, lo), lo, x)
    return builder.select(builder.fcmp_ordered(">", x, hi), hi, x)


def _by_general(builder, general, emit, narrow=False, single=False):
    """emit(0) when general == 0, emit(1) when 1 and, with ``narrow``,
    emit(2) when 2 (and, with ``single``, emit(3) when 3), each on its own
    branch. Each branch runs the whole epilogue one accumulator vector at a
    time: a phi that merged the corrected
    accumulators (24 of them, 48 zmm once widened to int64 lanes) kept them
    all live and spilled them to the stack (measured: the u8 / float epilogue
    cost 20-24 % of a K = 288 GEMM)."""
    fn = builder.function
    join = fn.append_basic_block("epi.join")
    cases = ((0, 1, 2, 3) if single else (0, 1, 2)) if narrow else (0, 1)
    blocks = [fn.append_basic_block(f"epi.{c}") for c in cases]
    sw = builder.switch(general, blocks[0])
    for c, blk in zip(cases[1:], blocks[1:], strict=True):
        sw.add_case(ir.Constant(_i64, c), blk)
    if narrow and not single:
        # case 3 where the output type has none (int32, float32): case 2
        sw.add_case(ir.Constant(_i64, 3), blocks[2])
    for c, blk in zip(cases, blocks, strict=True):
        builder.position_at_end(blk)
        emit(c)
        builder.branch(join)
    builder.position_at_end(join)


def _epilogue_lane(kind, case):
    """The lanes eq. 8 runs in, per epilogue case (make_fused_kernel): wrapping
    int32 for int32 output and for case 2, int64 with the zero-point row terms
    (case 1), else float64."""
    if kind == types.int32 or case >= 2:
        return _v16
    return ir.VectorType(_i64 if case == 1 else _f64, 16)


def _store_tile(builder, kind, acc_of, masks, MR, NV_, c, ldc, mult_of, zy, qlo,
                qhi, fbias_of, fma=False):  # fmt: skip
    """Eqs. 11-13 on the tile's acc lanes (int32, int64 or float64) and one
    masked store per vector of the output row c + r*ldc bytes.
    acc_of(r, v) -> the accumulator vector (emitted where it is used, so only
    the vector at hand is widened); mult_of(r, v) -> <16 x double> multipliers;
    fbias_of(v) -> <16 x float> (float output only). Column vector outer, row
    inner: each column's parameters are loaded once and the accumulators die
    in order. fma: the caller guarantees acc * mult exact in float64 (|acc| <
    2**29, mult a float32 value), so fl(fl(acc * mult) + zy) is one FMA."""
    vf64 = ir.VectorType(_f64, 16)
    vf32 = ir.VectorType(_f32, 16)
    if kind != types.int32:
        zyv = splat(builder, zy, vf64)
        lov = splat(builder, qlo, vf64)
        hiv = splat(builder, qhi, vf64)
        # float output clamps in float32: with the bounds rounded to float32 it
        # gives the float64 clamp's result rounded (no float32 lies strictly
        # between a bound and its rounding), in 2 instructions instead of 8
        lo32 = splat(builder, builder.fptrunc(qlo, _f32), vf32)
        hi32 = splat(builder, builder.fptrunc(qhi, _f32), vf32)
        # rint then convert as one vcvtpd2dq (round to nearest even); the
        # integer bounds commute with rint, so clamping first is the same
        lrint = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_v16, [vf64]), "llvm.lrint.v16i32.v16f64"
        )
        fmav = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vf64, [vf64] * 3), "llvm.fma.v16f64"
        )
    esize = {types.int32: 4, types.float32: 4, types.uint8: 1, types.int8: 1}[kind]
    for v in range(NV_):
        fb = fbias_of(v) if kind == types.float32 else None
        for r in range(MR):
            row = builder.add(c, builder.mul(ldc, ir.Constant(_i64, r)))
            x = acc_of(r, v)
            at = builder.add(row, ir.Constant(_i64, 16 * esize * v))
            if kind == types.int32:
                _vec_store(builder, x, at, masks[v])
                continue
            d = x if x.type == vf64 else builder.sitofp(x, vf64)
            if fma and kind != types.float32:
                # saturate(rint(acc * mult + zy)) (mode 1, eq. 11), one rounding
                d = builder.call(fmav, [d, mult_of(r, v), zyv])
                d = _clamp(builder, d, lov, hiv)
                q = builder.trunc(builder.call(lrint, [d]), ir.VectorType(_i8, 16))
                _vec_store(builder, q, at, masks[v])
                continue
            d = builder.fmul(d, mult_of(r, v))
            if kind == types.float32:
                # float32(acc * mult) + fbias in float32, clamp (mode 2)
                f = builder.fadd(builder.fptrunc(d, vf32), fb)
                _vec_store(builder, _clamp(builder, f, lo32, hi32), at, masks[v])
            else:
                # saturate(rint(acc * mult + zy)) (mode 1, eq. 11)
                d = _clamp(builder, builder.fadd(d, zyv), lov, hiv)
                q = builder.trunc(builder.call(lrint, [d]), ir.VectorType(_i8, 16))
                _vec_store(builder, q, at, masks[v])


# 1.5 * 2**23: a float32 in [2**23, 2**24) has ulp 1, so adding it rounds to an
# integer (ties to even, the constant being even) and leaves that integer in
# the low mantissa bits
_ROUND32 = 12582912.0


def _store_tile_f32(builder, acc_of, mult_of, masks, MR, NV_, c, ldc, zy, qlo, qhi):
    """Eq. 11 in float32 lanes: the tiles' case 3, where the caller found
    |acc| < 2**24 for the whole call (narrow_epilogue). acc_of(r, v): acc as
    int32 lanes; mult_of(r, v): <16 x float> multipliers (float32 values).

    Exact, not approximate: acc is then a float32, and fl32(acc * M + (z_y +
    1.5 * 2**23)), one FMA, is 1.5 * 2**23 + rint(s) for s = acc * M + z_y
    while |s| < 2**22 (ulp 1 there, ties to even). The reference's
    fl64(fl64(acc * M) + z_y) is s itself wherever the clamp does not decide
    alone (|s| < 256: acc * M has at most 48 significant bits, none below
    2**-45 when |M| >= 2**-22; narrow_epilogue checks M and z_y), and rounding
    is monotone, so saturated lanes agree too. The clamp runs on the biased
    floats (bounds 1.5 * 2**23 + q_lo/q_hi, exact), and each output byte is
    the low byte of its float's bit pattern (0x4B400000 + q), a row's 64 bytes
    gathered into one store: ~7 instructions a vector instead of case 2's 14
    (float64 lanes are 8 wide).
    """
    vf32 = ir.VectorType(_f32, 16)
    bias_c = ir.Constant(_f64, _ROUND32)
    zc = splat(builder, builder.fptrunc(builder.fadd(zy, bias_c), _f32), vf32)
    lo = splat(builder, builder.fptrunc(builder.fadd(qlo, bias_c), _f32), vf32)
    hi = splat(builder, builder.fptrunc(builder.fadd(qhi, bias_c), _f32), vf32)
    fma = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vf32, [vf32] * 3), "llvm.fma.v16f32"
    )
    mask = _concat(builder, masks)
    low_bytes = ir.Constant(
        ir.VectorType(_i32, 32),
        [4 * j for j in range(16)] + [64 + 4 * j for j in range(16)],
    )
    for r in range(MR):
        row = builder.add(c, builder.mul(ldc, ir.Constant(_i64, r)))
        parts = []
        for v in range(NV_):
            y = builder.call(
                fma, [builder.sitofp(acc_of(r, v), vf32), mult_of(r, v), zc]
            )
            bits = builder.bitcast(_clamp(builder, y, lo, hi), _v16)
            parts.append(builder.bitcast(bits, ir.VectorType(_i8, 64)))
        if NV_ == 1:  # one vector: its 16 low bytes
            idx = ir.Constant(ir.VectorType(_i32, 16), [4 * j for j in range(16)])
            q = builder.shuffle_vector(parts[0], parts[0], idx)
        else:
            pairs = [
                builder.shuffle_vector(parts[i], parts[i + 1], low_bytes)
                for i in range(0, NV_, 2)
            ]
            q = _concat(builder, pairs)
        _masked_store_any(builder, q, builder.inttoptr(row, q.type.as_pointer()), mask)


def _store_tile_f32_real(builder, acc_of, mult_of, fbias_of, masks, MR, NV_, c, ldc,
                         qlo, qhi):  # fmt: skip
    """Eq. 13 (float32 output) in float32 lanes: the fused tile's case 3 for
    real output, where |acc| < 2**24 (narrow_epilogue). acc is then a float32
    and acc * M (M a float32 value) has at most 48 significant bits, so
    fl32(acc * M), one vmulps, is the reference's fl32(fl64(acc) * M); + fbias
    and the clamp run in float32 as in _store_tile. mult_of(r, v) and
    fbias_of(v): <16 x float>."""
    vf32 = ir.VectorType(_f32, 16)
    lo = splat(builder, builder.fptrunc(qlo, _f32), vf32)
    hi = splat(builder, builder.fptrunc(qhi, _f32), vf32)
    for v in range(NV_):
        fb = fbias_of(v)
        for r in range(MR):
            row = builder.add(c, builder.mul(ldc, ir.Constant(_i64, r)))
            at = builder.add(row, ir.Constant(_i64, 64 * v))
            y = builder.fmul(builder.sitofp(acc_of(r, v), vf32), mult_of(r, v))
            y = _clamp(builder, builder.fadd(y, fb), lo, hi)
            _vec_store(builder, y, at, masks[v])


def _concat(builder, vecs):
    """The vectors (of one type, a power-of-two count) end to end."""
    while len(vecs) > 1:
        n = vecs[0].type.count
        idx = ir.Constant(ir.VectorType(_i32, 2 * n), list(range(2 * n)))
        vecs = [
            builder.shuffle_vector(vecs[i], vecs[i + 1], idx)
            for i in range(0, len(vecs), 2)
        ]
    return vecs[0]


def make_fused_kernel(MR, NV_, seg=False, k_loop=None):
    """Build an intrinsic: one MR x (16*NV_) tile over the whole K, then the
    epilogue (eqs. 8-13, kernels/requant.py) on the accumulators in registers
    and one masked store per vector: no int32 scratch round trip.

    _ftile(a, lda, b, ldb, k4, kr, c, ldc, nvalid, bias, cs, zb, za, za_step,
           rs, rs_step, general, mult, mult_step, zy, qlo, qhi, fbias, a_arr, out)
      a..nvalid : as make_tile_kernel (ldc in bytes here; c = &out[m0, n0])
      bias, cs, zb : addresses of bias[n0], colsum[n0], ZB[n0] (int64 arrays)
      za, rs    : addresses of ZA[m0], rowsum[m0] (int64); *_step bytes per row
                  (0 for one value shared by every row)
      general   : 0 -> acc = P + bias (ZA folded into bias, no row term);
                  1 -> acc = P + bias - ZA*colsum - ZB*rowsum          (eq. 8)
      mult      : address of mult[m0 | 0, n0] (float64), mult_step bytes per row
      zy, qlo, qhi : float64; fbias: address of the float32 real bias at n0
      a_arr     : the A array itself, only for its dtype: int8 A is flipped to
                  a' in the K loop (see _k_loop)
      out       : the output array itself, only for its dtype, which picks
                  the epilogue: int32 -> mode 0, uint8/int8 -> mode 1,
                  float32 -> mode 2.
    seg=True: a convolution's implicit GEMM read in place (_k_loop_seg): a is
    the address of the tile's MR int64 row start addresses, lda the bytes from
    one kernel-row run to the next, kr the 4-byte words per run.
    k_loop: another K loop with _k_loop's arguments and result (MR * NV_
    16-lane int32 sums), e.g. int8_gemm_ymm's exact AVX2 loop: the epilogue
    uses generic LLVM intrinsics only, so on an AVX2 target its 16-lane vectors
    become pairs of ymm operations.
    The caller guarantees K <= K_INT32_SAFE, so the raw int32 P is exact
    (docs/quantization.md, eq. 7); eq. 8 then runs exactly: P + bias in
    float64 lanes, or int64 lanes with the ZA / ZB terms (wrapping int32 for
    int32 output, which keeps the same low 32 bits).
    """

    def codegen(context, builder, sig, args):
        a, lda, b, ldb, k4, kr, c, ldc, nvalid = args[:9]
        bias, cs, zb, za, za_step, rs, rs_step, general = args[9:17]
        mult, mult_step, zy, qlo, qhi, fbias = args[17:23]
        kind = sig.args[-1].dtype
        flip = sig.args[-2].dtype == types.int8
        if flip and k_loop is not None:
            # only _k_loop flips int8 A as it loads; another K loop would take
            # int8 bytes for a'
            msg = f"{k_loop.__name__} reads uint8 a' only"
            raise TypeError(msg)
        if k_loop is not None:
            fin = k_loop(builder, MR, NV_, a, lda, b, ldb, k4, kr, nvalid)
        elif seg:
            fin = _k_loop_seg(builder, MR, NV_, a, lda, b, ldb, k4, kr, nvalid)
        else:
            fin = _k_loop(builder, MR, NV_, a, lda, b, ldb, k4, kr, nvalid, flip)
        masks = _col_masks(builder, NV_, nvalid)

        def col(addr, v, elt, size):
            at = builder.add(addr, ir.Constant(_i64, 16 * size * v))
            return _vec_load(builder, at, elt, masks[v])

        # eq. 8: + bias always; the ZA / ZB terms only when `general`.
        # int32 output: wrapping int32 arithmetic (the same low 32 bits as the
        # int64 sum the reference stores). Requantized / float output needs acc
        # exact: without the ZA / ZB terms, P (exact int32) and the int64 bias
        # are added in float64 (both exact there: 2 instructions, not the 7 of
        # int64 lanes); with them, int64 lanes. Case 2 (narrow_epilogue):
        # int32 lanes. Measured, u8 over int32 output, 1 thread: 12250 x 288 x
        # 64 +18-20 % before this layout, 49000 x 288 x 64 +10 % after it and
        # +7 % with case 2; float output at 16 x 384 x 1536 +21 % -> +9 %.
        vf64 = ir.VectorType(_f64, 16)
        vf32 = ir.VectorType(_f32, 16)

        def col32(addr, v):
            return builder.trunc(col(addr, v, _i64, 8), _v16)

        def row32(addr, step, r):
            at = builder.add(addr, builder.mul(step, ir.Constant(_i64, r)))
            x = builder.load(builder.inttoptr(at, _i64.as_pointer()))
            return splat(builder, builder.trunc(x, _i32), _v16)

        def mult_of(r, v):
            mrow = builder.add(mult, builder.mul(mult_step, ir.Constant(_i64, r)))
            return col(mrow, v, _f64, 8)

        def emit(case):
            if case == 3:
                # float32 lanes (narrow_epilogue: |acc| < 2**24, one row of
                # multipliers; u8/i8 output: |M| >= 2**-22, integer z_y):
                # acc = P + bias in int32 lanes as in case 2
                bv = [builder.trunc(col(bias, v, _i64, 8), _v16) for v in range(NV_)]
                # one row of multipliers, each a float32 value (exact)
                ms = [builder.fptrunc(mult_of(0, v), vf32) for v in range(NV_)]
                acc32 = lambda r, v: builder.add(fin[r * NV_ + v], bv[v])  # noqa: E731
                if kind == types.float32:
                    _store_tile_f32_real(builder, acc32, lambda r, v: ms[v],
                                         lambda v: col(fbias, v, _f32, 4), masks,
                                         MR, NV_, c, ldc, qlo, qhi)  # fmt: skip
                    return
                _store_tile_f32(builder, acc32, lambda r, v: ms[v], masks, MR, NV_,
                                c, ldc, zy, qlo, qhi)  # fmt: skip
                return
            # per column vector: bias (and colsum, ZB); per row: ZA, rowsum.
            # Each product fits int32 (|ZA*colsum|, |ZB*rowsum| <= 255*255*K):
            # 32-bit multiplies, widened before the subtraction (vpmullq is
            # slow on Zen 4). case 2 (narrow): the caller found |P + bias| <
            # 2**29, so int32 lanes are exact and the requantization one FMA.
            general = case == 1
            cols = {}
            lane = _epilogue_lane(kind, case)

            def acc_of(r, v):
                if r == 0:
                    bv = col(bias, v, _i64, 8)
                    if lane == _v16:
                        bv = builder.trunc(bv, _v16)
                    elif lane == vf64:
                        bv = builder.sitofp(bv, vf64)
                    cols[v] = (
                        bv,
                        col32(cs, v) if general else None,
                        col32(zb, v) if general else None,
                    )
                bv, csv, zbv = cols[v]
                p = fin[r * NV_ + v]
                if lane == vf64:
                    return builder.fadd(builder.sitofp(p, vf64), bv)
                x = builder.add(p if lane == _v16 else builder.sext(p, lane), bv)
                if general:
                    zas = row32(za, za_step, r)
                    rss = row32(rs, rs_step, r)
                    for t in (builder.mul(zas, csv), builder.mul(zbv, rss)):
                        x = builder.sub(x, t if lane == _v16 else builder.sext(t, lane))
                return x

            _store_tile(builder, kind, acc_of, masks, MR, NV_, c, ldc, mult_of,
                        zy, qlo, qhi, lambda v: col(fbias, v, _f32, 4),
                        fma=case == 2)  # fmt: skip

        _by_general(builder, general, emit, narrow=True,
                    single=kind != types.int32)  # fmt: skip
        return context.get_dummy_value()

    @intrinsic
    def _ftile(typingctx, a, lda, b, ldb, k4, kr, c, ldc, nvalid, bias, cs, zb,
               za, za_step, rs, rs_step, general, mult, mult_step, zy, qlo, qhi,
               fbias, a_arr, out):  # fmt: skip
        if not isinstance(out, types.Array) or out.dtype not in (
            types.int32,
            types.uint8,
            types.int8,
            types.float32,
        ):
            return None
        if not isinstance(a_arr, types.Array) or a_arr.dtype not in (
            types.uint8,
            types.int8,
        ):
            return None
        f8 = types.float64
        sig = types.void(*([types.int64] * 19), f8, f8, f8, types.int64, a_arr, out)
        return sig, codegen

    return _ftile


def make_channel_kernel(MR, NV_):
    """Build an intrinsic for the channels-as-rows GEMM of the NCHW convolution
    (kernels/int8_conv.py, conv_nchw4): rows are output channels, columns output
    pixels, so every epilogue term that the fused tile takes per column is per
    row here. One MR x (16*NV_) tile over the whole (padded) K, then

        acc = P + rbias[m] - ZW[m] * colsum[n]          (eq. 8, rows <-> columns)

    and eqs. 11-13 with the multiplier of row m, stored as out's dtype.

    _ctile(a, lda, b, ldb, k4, c, ldc, nvalid, rbias, cs, zw, general, mult, zy,
           qlo, qhi, out)
      a, lda    : address of A[m0, 0] (uint8 weights, lda bytes per row)
      b, ldb    : address of the packed pixel panel (int8, ldb bytes per k4 row)
      k4        : K / 4 (K padded to a multiple of 4: no tail)
      c, ldc    : address of out[m0, n0], ldc bytes per row; nvalid columns
      rbias, zw : addresses of int64 rbias[m0], ZW[m0] (8 bytes per row)
      cs        : address of the panel's int32 column sums
      general   : 0 -> skip the ZW * colsum term; 2 -> int32 lanes (narrow);
                  3 -> int32 lanes and float32 requantization (|acc| < 2**24,
                  _store_tile_f32)
      mult      : address of float64 mult[m0] (8 bytes per row)
    The products fit int32 (|ZW| <= 255, |colsum| <= 128 K); the sum runs as
    in make_fused_kernel (float64 P + rbias without the ZW term, int64 lanes
    with it, wrapping int32 for int32 output).
    """

    def codegen(context, builder, sig, args):
        a, lda, b, ldb, k4, c, ldc, nvalid = args[:8]
        rbias, cs, zw, general, mult, zy, qlo, qhi = args[8:16]
        kind = sig.args[-1].dtype
        zero = ir.Constant(_i64, 0)
        fin = _k_loop(builder, MR, NV_, a, lda, b, ldb, k4, zero, nvalid)
        masks = _col_masks(builder, NV_, nvalid)
        vf64 = ir.VectorType(_f64, 16)
        i64v = ir.VectorType(_i64, 16)

        def row(addr, r, elt):
            at = builder.add(addr, ir.Constant(_i64, 8 * r))
            return builder.load(builder.inttoptr(at, elt.as_pointer()))

        # conv has no float bias (its bias is the integer one in rbias); + -0.0f
        # keeps mode 2 the same float operations as the fused tile's (-0.0:
        # x + -0.0 is x for every x, a -0.0 product included)
        fb0 = ir.Constant(ir.VectorType(_f32, 16), [-0.0] * 16)

        def emit(case):
            # lanes as in make_fused_kernel: wrapping int32 for int32 output,
            # else float64 P + rbias (exact) or int64 lanes with the ZW term;
            # case 2 (the caller found |P| + |rbias| + |ZW * colsum| < 2**29):
            # int32 lanes with the ZW term and the requantization one FMA
            # (the 3-channel stem's epilogue: int64 lanes took ~15 % of it)
            general = case != 0
            csv = {}
            lane = _epilogue_lane(kind, case)

            def acc_of(r, v):
                rb = row(rbias, r, _i64)
                p = fin[r * NV_ + v]
                if lane == vf64:
                    rb = splat(builder, builder.sitofp(rb, _f64), vf64)
                    return builder.fadd(builder.sitofp(p, vf64), rb)
                rb = rb if lane == i64v else builder.trunc(rb, _i32)
                rb = splat(builder, rb, lane)
                x = builder.add(p if lane == _v16 else builder.sext(p, lane), rb)
                if general:
                    if r == 0:
                        at = builder.add(cs, ir.Constant(_i64, 64 * v))
                        csv[v] = _vec_load(builder, at, _i32, masks[v])
                    zws = splat(builder, builder.trunc(row(zw, r, _i64), _i32), _v16)
                    t = builder.mul(zws, csv[v])
                    x = builder.sub(x, t if lane == _v16 else builder.sext(t, lane))
                return x

            if case == 3:
                # float32 lanes: the caller found |acc| < 2**24 and the
                # multipliers, z_y and bounds as narrow_epilogue's case 3
                ms = {}

                def mult32(r, v):
                    if r not in ms:
                        m = builder.fptrunc(row(mult, r, _f64), _f32)  # exact
                        ms[r] = splat(builder, m, ir.VectorType(_f32, 16))
                    return ms[r]

                _store_tile_f32(builder, acc_of, mult32, masks, MR, NV_, c, ldc,
                                zy, qlo, qhi)  # fmt: skip
                return
            _store_tile(builder, kind, acc_of, masks, MR, NV_, c, ldc,
                        lambda r, v: splat(builder, row(mult, r, _f64), vf64), zy,
                        qlo, qhi, lambda v: fb0, fma=case == 2)  # fmt: skip

        _by_general(builder, general, emit, narrow=True,
                    single=kind in (types.uint8, types.int8))  # fmt: skip
        return context.get_dummy_value()

    @intrinsic
    def _ctile(typingctx, a, lda, b, ldb, k4, c, ldc, nvalid, rbias, cs, zw,
               general, mult, zy, qlo, qhi, out):  # fmt: skip
        if not isinstance(out, types.Array) or out.dtype not in (
            types.int32,
            types.uint8,
            types.int8,
            types.float32,
        ):
            return None
        f8 = types.float64
        sig = types.void(*([types.int64] * 13), f8, f8, f8, out)
        return sig, codegen

    return _ctile


@njit(inline="always")
def narrow_epilogue(epi, K, pmax):
    # The fused tile's epilogue case for this call (make_fused_kernel), from
    # a bound on |P|: 255 * 128 * K, or pmax (>= 0: the caller's bound, 255 *
    # max_n sum_k |b'[k, n]|, from the packed weights) where smaller.
    #   0/1: float64 or int64 lanes (the tile picks 1 with row terms);
    #   2: no ZA / ZB row terms (eq. 8) and |P + bias| < 2**29, so acc is
    #      exact in int32 lanes and acc * mult (mult a float32 value, eq. 10)
    #      exact in float64: rint(acc * mult + zy) is then one FMA with the
    #      same rounding as the product and sum of eq. 11;
    #   3: |P + bias| < 2**24 and one row of multipliers: float32 lanes; for
    #      integer output (_store_tile_f32) every |mult| in [2**-22, 2**64],
    #      z_y and the bounds integers far inside float32's exact range; for
    #      float32 output (_store_tile_f32_real) nothing more.
    # One pass over the bias (and the multipliers) per call. Measured, u8
    # output over int32 output (1 thread): K = 18 (98000 x 18 x 64) +55 % ->
    # +28 % (case 2), K = 288 (49000 x 288 x 64) +10 % -> +7 % (case 2);
    # 3136 x 576 x 64 +12 % (case 2) -> +8 % (case 3), 128 x 768 x 3072 +7 %
    # -> +4.5 %.
    za, rs, cs, zb, bias, mult, zy, qlo, qhi, mode, fbias = epi
    if za.shape[0] > 1 or rs.shape[0] > 1 or za[0] != 0 or rs[0] != 0:
        return 0
    m = np.int64(0)
    for n in range(bias.shape[0]):
        m = max(m, abs(bias[n]))
    bound = np.int64(K) * 32640
    if pmax >= 0:
        bound = min(bound, np.int64(pmax))
    if bound + m >= 2**29:
        return 0
    if mode == 2:
        return 3 if bound + m < 2**24 and mult.shape[0] == 1 else 2
    if mode == 1 and float32_requant_ok(bound + m, mult, zy, qlo, qhi):
        return 3
    return 2


@njit(cache=True, nogil=True, inline="always")
def float32_requant_ok(acc_max, mult, zy, qlo, qhi):
    # Whether integer output may take the float32 lanes (_store_tile_f32;
    # exact, docs/quantization.md after eq. 13): |acc| <= acc_max < 2**24, one
    # row of multipliers (the tile takes one row; mult (1, n) float64), each
    # |M| in [2**-22, 2**64], z_y and the bounds integers of at most 2**20.
    # narrow_epilogue's case 3, and the convolution's other VNNI kernels
    # (lowprec/conv.py: channels as rows, 3x3 depthwise) with their own bounds.
    if acc_max >= 2**24 or mult.shape[0] != 1 or zy != np.rint(zy):
        return False
    if max(abs(zy), abs(qlo), abs(qhi)) > 2**20:
        return False
    for j in range(mult.shape[1]):
        if not 2.0**-22 <= abs(mult[0, j]) <= 2.0**64:
            return False
    return True


# One module-level intrinsic per row count (module globals, so numba's cache
# can refer to them by name) and an inlined dispatcher on the row count.
_tile1 = make_tile_kernel(1, NV)
_tile2 = make_tile_kernel(2, NV)
_tile3 = make_tile_kernel(3, NV)
_tile4 = make_tile_kernel(4, NV)
_tile5 = make_tile_kernel(5, NV)
_tile6 = make_tile_kernel(6, NV)
assert MR_MAX == 6


@njit(inline="always")
def _run_tile(mr, a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum):
    if mr == 6:
        _tile6(a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum)
    elif mr == 5:
        _tile5(a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum)
    elif mr == 4:
        _tile4(a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum)
    elif mr == 3:
        _tile3(a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum)
    elif mr == 2:
        _tile2(a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum)
    else:
        _tile1(a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum)


@njit(inline="always")
def panel_colsum(ones, b, ldb, k4, cs, nvalid):
    # cs (address, int32) <- column sums of the packed panel at b: one tile row
    # of all-one bytes (ones: address of >= 4*k4 bytes of 1)
    _tile1(ones, 0, b, ldb, k4, 0, cs, 0, nvalid, 0)


# ---------------------------------------------------------------------------
# packing and the driver


def pack_b(b):
    """b' (K, N) int8 -> panel-major [NP][K4][NR][4] int8, 64-byte aligned."""
    K, N = b.shape
    K4 = (K + 3) // 4
    NP = (N + NR - 1) // NR
    raw = np.zeros(NP * K4 * NR * 4 + 64, dtype=np.int8)
    off = (-raw.ctypes.data) % 64
    packed = raw[off : off + NP * K4 * NR * 4].reshape(NP, K4, NR, 4)
    padded = np.zeros((K4 * 4, NP * NR), dtype=np.int8)
    padded[:K, :N] = b
    # [K4, 4, NP, NR] -> [NP, K4, NR, 4]
    packed[...] = padded.reshape(K4, 4, NP, NR).transpose(2, 0, 3, 1)
    packed.flags.writeable = False
    return packed


# K block (bytes of K) for M >= SMALL_M. 1 thread, GOP/s for 1024^3 / 2048^3 /
# 128x3072x768 (row-major B layout, before the panel-major change):
#   KC=128: 250/197/295   256: 308/261/339   1024: 387/375/373   no blocking:
#   378/377/348. Small KC loses to per-tile overhead (prologue, masked C
# load/store per block); 1024 keeps a tile's B panel (KC*64 = 64 KiB) in L2.
KC = 1024
# Below this many rows every tile runs the whole K at once: nothing is reused
# across tiles anyway and reloading C per K block only costs bandwidth.
SMALL_M = 4 * MR_MAX


@njit(parallel=True, nogil=True, cache=True)
def gemm_u8s8(a, bp, out, kc):
    # a (M,K) uint8, bp (NP,K4,NR,4) int8, out (M,N) int32 = a @ b' (eq. 6)
    M, K = a.shape
    N = out.shape[1]
    k4full = K // 4
    kr = K - 4 * k4full
    lda = a.strides[0]
    ldb = NR * 4
    panel = bp.strides[0]
    ldc = out.strides[0] // 4
    a0 = a.ctypes.data
    b0 = bp.ctypes.data
    c0 = out.ctypes.data
    mt = (M + MR_MAX - 1) // MR_MAX
    nt = (N + NR - 1) // NR
    kc4 = max(kc // 4, 1)
    nkb = max(1, (k4full + kc4 - 1) // kc4)
    for kb in range(nkb):
        k40 = kb * kc4
        k4n = min(kc4, k4full - k40)
        krb = kr if kb == nkb - 1 else 0
        accum = 1 if kb > 0 else 0
        # N-major tile order: prange hands each thread a contiguous range, so a
        # thread streams its own B panels once and reuses each across M tiles
        for t in prange(mt * nt):
            jn = t // mt
            im = t - jn * mt
            m0 = im * MR_MAX
            n0 = jn * NR
            mr = min(MR_MAX, M - m0)
            nvalid = min(NR, N - n0)
            _run_tile(
                mr,
                a0 + m0 * lda + 4 * k40,
                lda,
                b0 + jn * panel + k40 * ldb,
                ldb,
                k4n,
                krb,
                c0 + (m0 * ldc + n0) * 4,
                ldc,
                nvalid,
                accum,
            )


_ftile1 = make_fused_kernel(1, NV)
_ftile2 = make_fused_kernel(2, NV)
_ftile3 = make_fused_kernel(3, NV)
_ftile4 = make_fused_kernel(4, NV)
_ftile5 = make_fused_kernel(5, NV)
_ftile6 = make_fused_kernel(6, NV)


_stile1 = make_fused_kernel(1, NV, seg=True)
_stile2 = make_fused_kernel(2, NV, seg=True)
_stile3 = make_fused_kernel(3, NV, seg=True)
_stile4 = make_fused_kernel(4, NV, seg=True)
_stile5 = make_fused_kernel(5, NV, seg=True)
_stile6 = make_fused_kernel(6, NV, seg=True)


@njit(inline="always")
def run_fused_tile(mr, a, lda, b, k4, kr, m0, n0, nvalid, epi, narrow, a_arr, out):
    # one fused tile: rows m0..m0+mr of A (address a, row stride lda bytes;
    # a_arr's dtype says uint8 a' or int8 a), the packed panel at address b,
    # output columns n0..n0+nvalid (eqs. 6-13); narrow: narrow_epilogue(...)
    args = _fused_args(a, lda, b, NR * 4, k4, kr, m0, n0, nvalid, epi, narrow,
                       a_arr, out)  # fmt: skip
    if mr == 6:
        _ftile6(*args)
    elif mr == 5:
        _ftile5(*args)
    elif mr == 4:
        _ftile4(*args)
    elif mr == 3:
        _ftile3(*args)
    elif mr == 2:
        _ftile2(*args)
    else:
        _ftile1(*args)


@njit(inline="always")
def run_seg_tile(mr, starts, stride, b, k4, run4, m0, n0, nvalid, epi, narrow, a_arr,
                 out):  # fmt: skip
    # run_fused_tile for a convolution's implicit GEMM read in place: the mr
    # rows start at the int64 addresses at `starts`, each K row being runs of
    # run4 4-byte words `stride` bytes apart (make_fused_kernel's seg)
    args = _fused_args(starts, stride, b, NR * 4, k4, run4, m0, n0, nvalid, epi,
                       narrow, a_arr, out)  # fmt: skip
    if mr == 6:
        _stile6(*args)
    elif mr == 5:
        _stile5(*args)
    elif mr == 4:
        _stile4(*args)
    elif mr == 3:
        _stile3(*args)
    elif mr == 2:
        _stile2(*args)
    else:
        _stile1(*args)


@njit(inline="always")
def _fused_args(a, lda, b, ldb, k4, kr, m0, n0, nvalid, epi, narrow, a_arr, out):
    # the fused tile's arguments (make_fused_kernel) from the epilogue tuple
    za, rs, cs, zb, bias, mult, zy, qlo, qhi, mode, fbias = epi
    za_step = 8 if za.shape[0] > 1 else 0
    rs_step = 8 if rs.shape[0] > 1 else 0
    mult_step = mult.strides[0] if mult.shape[0] > 1 else 0
    if za_step or rs_step or za[0] != 0 or rs[0] != 0:
        general = 1
    else:
        general = narrow
    args = (
        a,
        lda,
        b,
        ldb,
        k4,
        kr,
        out.ctypes.data + m0 * out.strides[0] + n0 * out.itemsize,
        out.strides[0],
        nvalid,
        bias.ctypes.data + 8 * n0,
        cs.ctypes.data + 8 * n0,
        zb.ctypes.data + 8 * n0,
        za.ctypes.data + m0 * za_step,
        za_step,
        rs.ctypes.data + m0 * rs_step,
        rs_step,
        general,
        mult.ctypes.data + m0 * mult_step + 8 * n0,
        mult_step,
        zy,
        qlo,
        qhi,
        fbias.ctypes.data + 4 * n0,
        a_arr,
        out,
    )
    return args


_ctile1 = make_channel_kernel(1, NV)
_ctile2 = make_channel_kernel(2, NV)
_ctile3 = make_channel_kernel(3, NV)
_ctile4 = make_channel_kernel(4, NV)
_ctile5 = make_channel_kernel(5, NV)
_ctile6 = make_channel_kernel(6, NV)


@njit(inline="always")
def run_channel_tile(mr, a, lda, b, ldb, k4, c, ldc, nvalid, rbias, cs, zw, general,
                     mult, zy, qlo, qhi, out):  # fmt: skip
    # one channels-as-rows tile (make_channel_kernel); every argument an address
    # or a scalar, out only for its dtype
    args = (a, lda, b, ldb, k4, c, ldc, nvalid, rbias, cs, zw, general, mult, zy,
            qlo, qhi, out)  # fmt: skip
    if mr == 6:
        _ctile6(*args)
    elif mr == 5:
        _ctile5(*args)
    elif mr == 4:
        _ctile4(*args)
    elif mr == 3:
        _ctile3(*args)
    elif mr == 2:
        _ctile2(*args)
    else:
        _ctile1(*args)


# Not inlined into the prange drivers on purpose: numba's parfor passes copy and
# rewrite the whole loop body, and with the tile kernels inlined there they took
# minutes per driver variant; as a call they take seconds.
# Tile order: blocks of about MB_TILES row tiles (96 rows of A, 96*K bytes, stay
# in L2), each block running over every N panel. 1 thread, GOP/s (fused, K whole):
#   rows per block   24    48    96   192   all
#   1024^3          376   380   379   380   390
#   2048^3          411   406   400   404   371
#   128x768x3072    366   381   386   386   374
MB_TILES = 16


@njit(inline="always")
def _row_blocks(mt, threads):
    # row blocks per call: a multiple of the thread count (prange hands each
    # thread a contiguous run of blocks, all of equal size to +-1 tile), or a
    # single block when there are too few row tiles: then the threads split the
    # N panels instead (M = 128 on 2 threads: 96 + 32-row blocks left one
    # thread idle a third of the time, 504 vs 746 GOP/s)
    if mt < MB_TILES * threads:
        return 1
    return threads * ((mt + MB_TILES * threads - 1) // (MB_TILES * threads))


@njit(nogil=True, cache=True)
def _block_job(t, nblk, a, bp, epi, narrow, out):
    # job t = (row block, N panel): the block's row tiles against one panel,
    # each over the whole K with the fused epilogue (eqs. 6-13). One call per
    # job, not per tile: the call and its argument setup measured 55-125 ns
    # per tile (12-20% of a K = 384 tile)
    M, K = a.shape
    N = out.shape[1]
    mt = (M + MR_MAX - 1) // MR_MAX
    nt = (N + NR - 1) // NR
    k4 = K // 4
    blk = t // nt
    jn = t - blk * nt
    n0 = jn * NR
    nvalid = min(NR, N - n0)
    b = bp.ctypes.data + jn * bp.strides[0]
    for im in range(blk * mt // nblk, (blk + 1) * mt // nblk):
        m0 = im * MR_MAX
        run_fused_tile(
            min(MR_MAX, M - m0),
            a.ctypes.data + m0 * a.strides[0],
            a.strides[0],
            b,
            k4,
            K - 4 * k4,
            m0,
            n0,
            nvalid,
            epi,
            narrow,
            a,
            out,
        )


@njit(parallel=True, nogil=True, cache=True)
def gemm_fused(a, bp, epi, out, threads, pmax):
    # a (M,K>=4) uint8 a' or int8 a (flipped in the tile), bp (NP,K4,NR,4) int8,
    # out (M,N) int32|uint8|int8|float32 with unit column stride; threads = the
    # caller's numba.get_num_threads() (reading it in here would keep numba
    # from caching the function); pmax: a bound on |P| or -1 (narrow_epilogue)
    mt = (a.shape[0] + MR_MAX - 1) // MR_MAX
    nt = (out.shape[1] + NR - 1) // NR
    nblk = _row_blocks(mt, threads)
    narrow = narrow_epilogue(epi, a.shape[1], pmax)
    for t in prange(nblk * nt):
        _block_job(t, nblk, a, bp, epi, narrow, out)


@njit(nogil=True, cache=True)
def gemm_fused_serial(a, bp, epi, out, pmax):
    # as gemm_fused on the calling thread: tiny problems skip the ~4 us pool launch
    mt = (a.shape[0] + MR_MAX - 1) // MR_MAX
    nt = (out.shape[1] + NR - 1) // NR
    nblk = _row_blocks(mt, 1)
    narrow = narrow_epilogue(epi, a.shape[1], pmax)
    for t in range(nblk * nt):
        _block_job(t, nblk, a, bp, epi, narrow, out)


def gemm(a_u8, packed, out):
    """Raw P = a' @ b' into int32 out (the K-chunked path for very large K)."""
    M, K = a_u8.shape
    if M == 0 or out.shape[1] == 0:
        return
    if K == 0:
        out[...] = 0
        return
    if K < 4:  # the tail trick needs 4 bytes of row; pad the (tiny) A instead
        padded = np.zeros((M, 4), np.uint8)
        padded[:, :K] = a_u8
        a_u8 = padded
    kc = K + 4 if M < SMALL_M else KC
    gemm_u8s8(a_u8, packed, out, kc)


# ---------------------------------------------------------------------------
# the machine's peak, for "% of peak" in benchmarks

_NACC = 12  # independent accumulators: >= latency x throughput of vpdpbusd

# The inner instruction of each path, as the probe runs it: (name, lanes,
# operations per instruction = lanes x multiply-adds x 2). avx2's exact
# vpmaddwd (2 products a lane) is followed by a vpaddd into the accumulator.
PEAK_INSTRUCTIONS = {
    # one tdpbusd: 16 x 16 int32 outputs x 16 four-byte dot products
    "amx": ("tdpbusd", 256, 32768),
    "avx512_vnni": ("vpdpbusd zmm", 16, 128),
    "avx_vnni": ("vpdpbusd ymm", 8, 64),
    "avx2": ("vpmaddwd+vpaddd ymm", 8, 32),
}


def _make_peak_loop(isa):
    """An intrinsic: iters x 12 register-only multiply-adds of ``isa``'s inner
    instruction; returns a checksum (keeps them live). One per path, compiled
    only when probed: an instruction the CPU lacks aborts LLVM at compile time."""
    if isa == "amx":
        from .int8_gemm_amx import make_peak_loop

        return _peak_runner(make_peak_loop(_NACC))
    _, lanes, _ = PEAK_INSTRUCTIONS[isa]
    vty = ir.VectorType(_i32, lanes)
    wty = ir.VectorType(ir.IntType(16), 2 * lanes)

    def codegen(context, builder, sig, args):
        iters, seed = args
        s32 = builder.trunc(seed, _i32)
        a = splat(builder, s32, vty)
        b = splat(builder, builder.add(s32, ir.Constant(_i32, 0x01010101)), vty)
        if isa == "avx2":
            pmadd = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vty, [wty, wty]),
                "llvm.x86.avx2.pmadd.wd",
            )  # fmt: skip
            bw = builder.bitcast(b, wty)

            def step(k, accs):  # the accumulator feeds the product: not hoisted
                return [
                    builder.add(p, builder.call(pmadd, [builder.bitcast(p, wty), bw]))
                    for p in accs
                ]
        else:
            name = "llvm.x86.avx512.vpdpbusd." + ("512" if lanes == 16 else "256")
            vpd = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vty, [vty, vty, vty]), name
            )

            def step(k, accs):
                return [builder.call(vpd, [p, a, b]) for p in accs]

        init = [ir.Constant(vty, [j] * lanes) for j in range(_NACC)]
        new = _ir_loop(builder, ir.Constant(_i64, 0), iters, init, step,
                       guard=False, name="pk")  # fmt: skip
        s = new[0]
        for n in new[1:]:
            s = builder.xor(s, n)
        return builder.extract_element(s, ir.Constant(_i32, 0))

    @intrinsic
    def _loop(typingctx, iters, seed):
        return types.int32(types.int64, types.int64), codegen

    return _peak_runner(_loop)


def _peak_runner(loop):
    """The probe loop on every thread: peak(iters, nthreads)."""

    @njit(parallel=True)  # a closure per path: not cached (the bench's ~1 s)
    def _peak(iters, nthreads):
        out = np.zeros(nthreads, np.int32)
        for t in prange(nthreads):
            out[t] = loop(iters, t + 3)
        return out

    return _peak


_PEAKS = {}


def measure_peak(threads: int, iters: int = 2_000_000, repeat: int = 7, isa=None):
    """GOP/s of the inner instruction of ``isa`` (default: the path in use; see
    PEAK_INSTRUCTIONS) on `threads` threads, best of `repeat`. ValueError for
    the portable path, which has no single instruction to measure.

    The best, not the median: the peak is a property of the hardware, and on a
    shared VM any slower sample measures the neighbours.
    """

    from .. import _dispatch

    isa = isa or _dispatch.get_isa()
    if isa not in PEAK_INSTRUCTIONS:
        msg = f"no peak probe for the {isa!r} path (plain numba loops)"
        raise ValueError(msg)
    if isa not in _dispatch.available_isas():
        msg = f"this CPU cannot run the {isa!r} path"
        raise ValueError(msg)
    peak = _PEAKS.get(isa)
    if peak is None:
        peak = _PEAKS[isa] = _make_peak_loop(isa)
    return best_rate(peak, threads, iters, repeat, _NACC * PEAK_INSTRUCTIONS[isa][2])


def best_rate(peak, threads, iters, repeat, ops_per_iter):
    """G(FL)OP/s of peak(iters, threads) (a _peak_runner) on `threads`
    threads, best of `repeat` timed calls after a warm-up one."""
    import time

    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        peak(max(1, iters // 1000), threads)
        best = 0.0
        for _ in range(repeat):
            t0 = time.perf_counter()
            peak(iters, threads)
            dt = time.perf_counter() - t0
            best = max(best, threads * iters * ops_per_iter / dt / 1e9)
        return best
    finally:
        numba.set_num_threads(before)
