"""Sparse-weight x dense-activation GEMM (SpMM): Y (M,N) = W (M,K) sparse @ X (K,N).

All formats are seen by the kernels as a block-sparse row structure:

    block row b (rows R*b .. R*b+R-1) owns blocks ptr[b] .. ptr[b+1]-1;
    block p covers columns C*idx[p] .. C*idx[p]+C-1; its values are
    val[p*R*C : (p+1)*R*C] laid out [R][C].

    CSR      R=1, C=1   idx uint16 (K <= 65535) or int32
    BSR r*1  R=4, C=1   (four output rows share one column index)
    BSR 1*4  R=1, C=4   (four consecutive k share one index; int8 -> vpdpbusd)
    2:4      one byte of two 2-bit positions per group of 4 k, two values

Kernel (float): output-stationary register tile of R rows x NR = 64 columns
(4 zmm per row) over the dense N dimension, X row-major (N contiguous). Per
block each value is broadcast once and each of the C rows of X is loaded once
per 16 columns; the tile's accumulators stay in registers (phi nodes of one
llvmlite loop inside a numba @intrinsic, the approach of int8_gemm_vnni.py).
Columns past N are masked on loads and stores. Threads take contiguous block
rows balanced by nonzero count (the caller's ``chunks``). On AVX2 (no AVX-512)
the same loop runs on ymm vectors of 8 columns, tiles of 8 / 4 / 2 / 1 vectors
(BSR 4x1: 2 / 1) chosen per tile, X read in whole vectors from a copy padded
to a multiple of 8 columns (no masks inside the loop), the same sums in the
same order as the zmm tiles.

Kernel (int8, 1x4 blocks): X packed as [ceil(K/4)][Np][4] uint8 (x' = x + 128
for int8 X; Np = N rounded up to 16; 64-byte aligned), each 4-byte block of W
broadcast and multiplied with vpdpbusd into int32 accumulators of a 1 x 16/32/64
tile (the narrowest that covers the tile's columns), two accumulator sets
taking alternate blocks, and the requantization epilogue (docs/quantization.md
eqs. 8-13, the dense tile's _store_tile) run on the accumulators in registers.
On AVX2: X' in k pairs of uint16 and int16 values, two vpmaddwd per block and
8 columns (exact), the same epilogue on ymm pairs; one column (N = 1) on
8-row tiles with the X words gathered (_gather_tile).

One column of floats (N = 1): a row-dot over the CSR arrays, 8 stored entries
a vector with the x values gathered by scalar loads (_row_dot8), on every x86
path; the portable path's scalar row-dot (spmv_float) elsewhere.

Portable fallbacks (any CPU, any format through its expanded CSR view): plain
numba loops, float32 accumulation in column-index order, exact int32 for int8.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .config import JIT, PJIT
from .int8_gemm_vnni import (
    _b_offsets,
    _col_masks,
    _store_tile,
    _store_tile_f32,
    _vec_store,
)
from .int8_gemm_ymm import nibble_dot4
from .ir_util import by_case as _ir_case
from .ir_util import if_then as _ir_if
from .ir_util import loop as _ir_loop
from .ir_util import splat as _splat
from .ir_util import target_has

NV = 4  # zmm vectors per output row of a register tile
NR = 16 * NV  # output columns per register tile
NR8 = 64  # output columns of the widest int8 tile (4 zmm)
PF_DIST = 8  # blocks ahead for the X-row software prefetch (0: off)

_i1 = ir.IntType(1)
_i8 = ir.IntType(8)
_i16 = ir.IntType(16)
_i32 = ir.IntType(32)
_i64 = ir.IntType(64)
_f32 = ir.FloatType()
_f16 = ir.HalfType()
_f64 = ir.DoubleType()
_vf = ir.VectorType(_f32, 16)
_vi = ir.VectorType(_i32, 16)

# value kinds
F32, F16, S8 = 0, 1, 2
# index kinds (the 2:4 format has none: its positions sit in one byte per group)
U16, I32, NM = 0, 1, 2
# nm24 position byte: p0 | p1 << 2, and flags for a slot that holds no weight
# (lowprec.sparse._nm_flags); the float kernel zeroes such a slot's X
NM_FREE0, NM_FREE1 = 16, 32


def _fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ret, args), name
    )


def _block_loop(builder, R, C, vkind, ikind, NV_, args, load_x, sets=1, init=None,
                width=16):  # fmt: skip
    """The block loop of one tile: R * NV_ accumulator vectors of `width`
    lanes (phis of one llvmlite loop), returned as their values after the loop
    (zero when the block row is empty). args = (x, ldx, idx, val, p0, p1) as in
    make_block_kernel; load_x(row_i8ptr, v) loads vector v of an X row;
    init: the first set's starting values (default zero).

    sets=2 (int8 only: integer sums are exact in any order): blocks p0, p0+2,
    ... go to one set of accumulators and p0+1, p0+3, ... to a second, added at
    the end. Why: with one set each accumulator takes one vpdpbusd per block,
    a dependency chain that held the 1 x 64 tile to 4 vpdpbusd per 7.6 cycles
    with X in L1 (Zen 4); two sets double the independent chains.

    int8 with width 8 (AVX2, exact vpmaddwd): X' packed in k pairs (two
    uint16 per 4-byte column word, pack_x_u16), the values as int16 (8 bytes
    a block); a block adds two vpmaddwd per vector, one per k pair."""
    x, ldx, idx, val, p0, p1 = args
    is_int = vkind == S8
    vf = ir.VectorType(_f32, width)
    vi = ir.VectorType(_i32, width)
    vw = ir.VectorType(_i16, 2 * width)
    vty = vi if is_int else vf
    vsize = {F32: 4, F16: 2, S8: 1 if width == 16 else 2}[vkind]
    isize = {U16: 2, I32: 4, NM: 1}[ikind]
    vals_per_block = 2 if ikind == NM else R * C
    cols = 2 if ikind == NM else C  # X rows touched per block
    i8p = _i8.as_pointer()
    x8 = builder.inttoptr(x, i8p)
    idx8 = builder.inttoptr(idx, i8p)
    val8 = builder.inttoptr(val, i8p)
    if is_int and width == 8:
        pmadd = _fn(builder, "llvm.x86.avx2.pmadd.wd", vi, [vw, vw])
    elif is_int:
        dot = _fn(builder, "llvm.x86.avx512.vpdpbusd.512", _vi, [_vi, _vi, _vi])
    else:
        dot = _fn(builder, f"llvm.fma.v{width}f32", vf, [vf, vf, vf])
    zero_v = ir.Constant(vty, None)
    one = ir.Constant(_i64, 1)

    def block(p, accs):
        # accs + the products of block p
        ip = builder.gep(idx8, [builder.mul(p, ir.Constant(_i64, isize))])
        if ikind == U16:
            b_idx = builder.zext(
                builder.load(builder.bitcast(ip, _i16.as_pointer())), _i64
            )
        elif ikind == I32:
            b_idx = builder.sext(
                builder.load(builder.bitcast(ip, _i32.as_pointer())), _i64
            )
        else:
            meta = builder.zext(builder.load(ip), _i64)
        xrows = []
        if ikind == NM:
            g4 = builder.shl(builder.sub(p, p0), ir.Constant(_i64, 2))
            for j in range(2):
                pos = builder.and_(
                    builder.lshr(meta, ir.Constant(_i64, 2 * j)), ir.Constant(_i64, 3)
                )
                k = builder.add(g4, pos)
                xrows.append(builder.gep(x8, [builder.mul(k, ldx)]))
        elif is_int:
            k = b_idx if width == 16 else builder.shl(b_idx, one)  # k4 / k pair
            xrows.append(builder.gep(x8, [builder.mul(k, ldx)]))
            if width == 8:
                xrows.append(builder.gep(xrows[0], [ldx]))
        else:
            k0 = builder.mul(b_idx, ir.Constant(_i64, C))
            for c in range(C):
                k = builder.add(k0, ir.Constant(_i64, c))
                xrows.append(builder.gep(x8, [builder.mul(k, ldx)]))
        if PF_DIST > 0 and ikind in (U16, I32) and not is_int and C == 1:
            # software prefetch of the X row PF_DIST blocks ahead (clamped to
            # this row's last block so the index read stays in bounds)
            pa = builder.add(p, ir.Constant(_i64, PF_DIST))
            last = builder.sub(p1, one)
            pa = builder.select(builder.icmp_signed("<", pa, p1), pa, last)
            ipa = builder.gep(idx8, [builder.mul(pa, ir.Constant(_i64, isize))])
            ity = _i16 if ikind == U16 else _i32
            ld = builder.load(builder.bitcast(ipa, ity.as_pointer()))
            ka = builder.zext(ld, _i64) if ikind == U16 else builder.sext(ld, _i64)
            xa = builder.gep(x8, [builder.mul(ka, ldx)])
            pf = _fn(
                builder, "llvm.prefetch.p0", ir.VoidType(), [i8p, _i32, _i32, _i32]
            )
            for line in range(max(1, NV_ * width * 4 // 64)):
                builder.call(
                    pf,
                    [
                        builder.gep(xa, [ir.Constant(_i64, 64 * line)]),
                        ir.Constant(_i32, 0),
                        ir.Constant(_i32, 3),
                        ir.Constant(_i32, 1),
                    ],
                )
        xv = [[load_x(xr, v) for v in range(NV_)] for xr in xrows]
        if ikind == NM and not is_int:
            # a free slot's product is skipped (X taken as 0): its weight
            # was pruned, and 0 * inf would be NaN
            for j, flag in enumerate((NM_FREE0, NM_FREE1)):
                bit = builder.and_(meta, ir.Constant(_i64, flag))
                free = builder.icmp_unsigned("!=", bit, ir.Constant(_i64, 0))
                xv[j] = [builder.select(free, zero_v, x_) for x_ in xv[j]]
        vbase = builder.gep(
            val8, [builder.mul(p, ir.Constant(_i64, vals_per_block * vsize))]
        )
        new = list(accs)
        if is_int and width == 8:
            for j in range(2):  # k pairs (w0, w1) and (w2, w3)
                wp = builder.gep(vbase, [ir.Constant(_i64, 4 * j)])
                w = builder.load(builder.bitcast(wp, _i32.as_pointer()), align=1)
                ws = builder.bitcast(_splat(builder, w, vi), vw)
                for v in range(NV_):
                    xw = builder.bitcast(xv[j][v], vw)
                    new[v] = builder.add(new[v], builder.call(pmadd, [xw, ws]))
            return new
        if is_int:
            w = builder.load(builder.bitcast(vbase, _i32.as_pointer()), align=1)
            ws = _splat(builder, w, _vi)
            for v in range(NV_):
                # operand 2 unsigned bytes (X'), operand 3 signed bytes (W)
                new[v] = builder.call(dot, [new[v], xv[0][v], ws])
            return new
        for r in range(R):
            for c in range(cols):
                off = ir.Constant(_i64, (r * cols + c) * vsize)
                wp = builder.gep(vbase, [off])
                if vkind == F32:
                    w = builder.load(builder.bitcast(wp, _f32.as_pointer()), align=1)
                    ws = _splat(builder, w, vf)
                else:
                    # splat the half, then one vcvtph2ps of the vector: a
                    # scalar fpext was a vpinsrw into an accumulator's register
                    # (a false dependency on the previous block's FMA)
                    h = builder.load(builder.bitcast(wp, _f16.as_pointer()), align=1)
                    hv = _splat(builder, h, ir.VectorType(_f16, width))
                    ws = builder.fpext(hv, vf)
                for v in range(NV_):
                    new[r * NV_ + v] = builder.call(
                        dot, [ws, xv[c][v], new[r * NV_ + v]]
                    )
        return new

    n_acc = R * NV_
    # the loop runs over groups of `sets` blocks; a last odd block follows it
    pend = p1
    if sets == 2:
        pend = builder.add(p0, builder.and_(builder.sub(p1, p0), ir.Constant(_i64, -2)))

    def group(p, accs):
        new = []
        for s_ in range(sets):
            q = builder.add(p, ir.Constant(_i64, s_)) if s_ else p
            new += block(q, accs[s_ * n_acc : (s_ + 1) * n_acc])
        return new

    start = (init or [zero_v] * n_acc) + [zero_v] * ((sets - 1) * n_acc)
    fin = _ir_loop(builder, p0, pend, start, group, step=sets,
                name="sp")  # fmt: skip
    if sets == 1:
        return fin
    # the odd block (into the first set), then the sets added
    first = _ir_if(builder, builder.icmp_signed("<", pend, p1), fin[:n_acc],
                     lambda accs: block(pend, accs), name="sp.odd")  # fmt: skip
    return [builder.add(f, g) for f, g in zip(first, fin[n_acc:], strict=True)]


def make_block_kernel(R, C, vkind, ikind, NV_=NV, width=16):
    """An intrinsic computing one R x width*NV_ output tile of one block row
    (float values; int8 values: make_s8_kernel).

    _tile(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, resume)  int64
    (width 8: _tile(..., resume, nv), NV_ the tuple of vector counts nv may
    take, one loop each behind a switch)
      x      address of X[0, n0] (float32, row stride ldx bytes)
      idx    address of the block index array (uint16 / int32), or for 2:4 of
             the position bytes (one per group)
      val    address of the values (float32 / float16)
      p0, p1 block range of this block row (for 2:4: group range); one K
             chunk of it when the caller splits K
      out    address of out[m0, n0] (float32), row stride ldo bytes
      rvalid rows of the tile inside M (1..R); nvalid columns inside N
             (1..width*NV_)
      resume 1: start from the sums already in out (the previous K chunk's),
             else from zero. float32 partial sums are stored and reloaded
             exactly, so the chunked sum is the unchunked one bit for bit.

    width 16 (zmm): X loads masked to nvalid (an AVX-512 mask register each).
    width 8 (ymm, AVX2): X loads unmasked, whole vectors: the caller pads X
    to a multiple of 8 columns and picks NV_ so the tile ends inside it. A
    <8 x i1> mask per vector in the loop was rebuilt from packed bits and
    spilled every block (vpackssdw / vpslld / stack reloads around each
    vmaskmovps, measured no faster than the portable loop)."""
    vf = ir.VectorType(_f32, width)
    vm = ir.VectorType(_i1, width)
    row_bytes = 4 * width

    def emit(builder, args, NV_):
        x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, resume = args[:11]
        masks = _col_masks(builder, NV_, nvalid, width)
        mload = _fn(
            builder,
            f"llvm.masked.load.v{width}f32.p0",
            vf,
            [vf.as_pointer(), _i32, vm, vf],
        )
        zero_v = ir.Constant(vf, None)

        def load_x(xr, v):
            ptr = builder.bitcast(
                builder.gep(xr, [ir.Constant(_i64, row_bytes * v)]), vf.as_pointer()
            )
            if width == 8:
                return builder.load(ptr, align=4)
            return builder.call(mload, [ptr, ir.Constant(_i32, 4), masks[v], zero_v])

        # the out tile's addresses and masks (rows past rvalid, columns past
        # nvalid: neither loaded nor stored)
        o8 = builder.inttoptr(out, _i8.as_pointer())
        slots = []
        for r in range(R):
            inside = builder.icmp_signed("<", ir.Constant(_i64, r), rvalid)
            rmask = _splat(builder, inside, vm)
            orow = builder.gep(o8, [builder.mul(ldo, ir.Constant(_i64, r))])
            for v in range(NV_):
                at = builder.gep(orow, [ir.Constant(_i64, row_bytes * v)])
                slots.append((at, builder.and_(masks[v], rmask)))
        on = _splat(builder, builder.icmp_signed("!=", resume, ir.Constant(_i64, 0)),
                    vm)  # fmt: skip
        init = [
            builder.call(
                mload,
                [
                    builder.bitcast(at, vf.as_pointer()),
                    ir.Constant(_i32, 4),
                    builder.and_(m, on),
                    zero_v,
                ],
            )  # fmt: skip
            for at, m in slots
        ]
        fin = _block_loop(
            builder,
            R,
            C,
            vkind,
            ikind,
            NV_,
            (x, ldx, idx, val, p0, p1),
            load_x,
            init=init,
            width=width,
        )
        for f, (at, m) in zip(fin, slots, strict=True):
            _vec_store(builder, f, builder.ptrtoint(at, _i64), m)

    def codegen(context, builder, sig, args):
        if width == 16:
            emit(builder, args, NV_)
        else:
            _ir_case(builder, args[11], NV_, lambda nv: emit(builder, args, nv),
                     name="nv")  # fmt: skip
        return context.get_dummy_value()

    if width == 16:

        @intrinsic
        def _tile(typingctx, x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid,
                  resume):  # fmt: skip
            return types.void(*([types.int64] * 11)), codegen

        return _tile

    @intrinsic
    def _tile_nv(typingctx, x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid,
                 resume, nv):  # fmt: skip
        return types.void(*([types.int64] * 12)), codegen

    return _tile_nv


def make_s8_kernel(ikind, NV_, width=16):
    """An intrinsic computing one 1 x 16*NV_ output tile of one row of int8 1x4
    blocks with the requantization epilogue fused (docs/quantization.md eqs.
    8-13, the dense tile's _store_tile): the products never leave registers.

    _s8tile(x, ldx, idx, val, p0, p1, out, nvalid, c, mult, zy, qlo, qhi, f32, y)
      x      address of Xp[0, n0, 0] (uint8 [K4][Np][4], Np a multiple of 16
             so whole vectors load; k4-row stride ldx bytes); width 8 (AVX2):
             [2 K4][Np] words of two uint16, one k pair each (pack_x_u16),
             k-pair-row stride ldx
      idx    address of the block index array (uint16 / int32)
      val    address of the int8 values (4 per block); width 8: int16 values
      p0, p1 block range of this row
      out    address of y[m, n0]; nvalid columns inside N (1..16*NV_)
      c      int64 row term -ZX' * rowsum(W) + bias[m] (eq. 8; exact in float64,
             as is P + c: |P + c| < 2**53)
      mult   float64 multiplier of row m; zy, qlo, qhi as in requant.py
      f32    1: uint8 / int8 output requantized in float32 lanes (the caller
             checked them exact, see codegen)
      y      the output array (its dtype selects the epilogue: uint8 / int8 /
             float32)
    """

    def codegen(context, builder, sig, args):
        x, ldx, idx, val, p0, p1, out, nvalid, c, mult, zy, qlo, qhi, f32 = args[:14]
        kind = sig.args[-1].dtype
        if width == 16 and not target_has(context, "avx512vnni"):
            # the zmm tile on a CPU without AVX-512 VNNI: vpdpbusd.512 would
            # abort LLVM's instruction selection. The driver holding both
            # tiles is compiled there, but lowprec.sparse only takes the zmm
            # tiles on the avx512_vnni path, which set_isa refuses on such a
            # CPU: a trap, not a plain-IR stand-in (whose 64-lane products took
            # 110 s to compile into the parallel driver on an AVX2 host)
            trap = _fn(builder, "llvm.trap", ir.VoidType(), [])
            builder.call(trap, [])
            return context.get_dummy_value()
        ny = NV_ * 16 // width  # vectors of `width` lanes
        vi = ir.VectorType(_i32, width)
        offs = _b_offsets(builder, ny, nvalid, lanes=width)

        def load_x(xr, v):
            ptr = builder.bitcast(builder.gep(xr, [offs[v]]), vi.as_pointer())
            return builder.load(ptr, align=4)

        # zmm: two accumulator sets (see _block_loop); ymm: one, its 2 x NV_
        # vectors already independent chains, and 16 registers
        fin = _block_loop(builder, 1, 4, S8, ikind, ny, (x, ldx, idx, val, p0, p1),
                          load_x, 2 if width == 16 else 1, width=width)  # fmt: skip
        if width == 8:  # ymm pairs -> the 16-lane epilogue (legalized on AVX2)
            join = ir.Constant(ir.VectorType(_i32, 16), list(range(16)))
            fin = [
                builder.shuffle_vector(fin[2 * v], fin[2 * v + 1], join)
                for v in range(NV_)
            ]
        masks = _col_masks(builder, NV_, nvalid)
        vf64 = ir.VectorType(_f64, 16)
        cv = _splat(builder, builder.sitofp(c, _f64), vf64)
        multv = _splat(builder, mult, vf64)
        fb0 = ir.Constant(_vf, [-0.0] * 16)  # no float bias: + -0.0f as conv's

        def acc_of(r, v):
            return builder.fadd(builder.sitofp(fin[v], vf64), cv)

        zero = ir.Constant(_i64, 0)

        def general():
            _store_tile(builder, kind, acc_of, masks, 1, NV_, out, zero,
                        lambda r, v: multv, zy, qlo, qhi, lambda v: fb0)  # fmt: skip

        if kind not in (types.uint8, types.int8):
            general()
            return context.get_dummy_value()
        # f32: the caller found the float32 lanes exact for this call (|acc| <
        # 2**24 and int8_gemm_vnni.float32_requant_ok): acc = P + c in int32,
        # ~7 instead of ~14 instructions a vector (float64 lanes are half as
        # wide, a quarter on AVX2). 1024 x 1024, 2 threads, Zen 3, N = 128,
        # best of 15 alternating in one process: 90 % 266 -> 247 us, 95 %
        # 170 -> 152 us (N = 16: no change); the
        # 16-column tile on one column (before _gather_tile) 70 -> 37 us.
        with builder.if_else(builder.icmp_signed("!=", f32, zero)) as (fast, slow):
            with fast:
                c32 = _splat(builder, builder.trunc(c, _i32), _vi)
                m32 = _splat(builder, builder.fptrunc(mult, _f32), _vf)
                _store_tile_f32(builder, lambda r, v: builder.add(fin[v], c32),
                                lambda r, v: m32, masks, 1, NV_, out, zero, zy, qlo,
                                qhi)  # fmt: skip
            with slow:
                general()
        return context.get_dummy_value()

    @intrinsic
    def _s8tile(typingctx, x, ldx, idx, val, p0, p1, out, nvalid, c, mult, zy,
                qlo, qhi, f32, y):  # fmt: skip
        if not isinstance(y, types.Array) or y.dtype not in (
            types.uint8,
            types.int8,
            types.float32,
        ):
            return None
        f8, i8 = types.float64, types.int64
        return types.void(*([i8] * 9), f8, f8, f8, f8, i8, y), codegen

    return _s8tile


# One module-level intrinsic per (block shape, value type, index type): module
# globals, so numba's cache can refer to them by name.
_csr_f32_u16 = make_block_kernel(1, 1, F32, U16)
_csr_f32_i32 = make_block_kernel(1, 1, F32, I32)
_csr_f16_u16 = make_block_kernel(1, 1, F16, U16)
_csr_f16_i32 = make_block_kernel(1, 1, F16, I32)
# CSR tiles of 32 columns, for N <= 32 and the last tile of N: a 64-column
# tile there spent half its loads and FMAs on masked-off columns
_csr_f32_u16_2 = make_block_kernel(1, 1, F32, U16, 2)
_csr_f32_i32_2 = make_block_kernel(1, 1, F32, I32, 2)
_csr_f16_u16_2 = make_block_kernel(1, 1, F16, U16, 2)
_csr_f16_i32_2 = make_block_kernel(1, 1, F16, I32, 2)
_r4_f32_u16 = make_block_kernel(4, 1, F32, U16)
_r4_f32_i32 = make_block_kernel(4, 1, F32, I32)
_r4_f16_u16 = make_block_kernel(4, 1, F16, U16)
_r4_f16_i32 = make_block_kernel(4, 1, F16, I32)
_c4_f32_u16 = make_block_kernel(1, 4, F32, U16)
_c4_f32_i32 = make_block_kernel(1, 4, F32, I32)
_c4_f16_u16 = make_block_kernel(1, 4, F16, U16)
_c4_f16_i32 = make_block_kernel(1, 4, F16, I32)
_nm_f32 = make_block_kernel(1, 4, F32, NM)
_nm_f16 = make_block_kernel(1, 4, F16, NM)
# int8: one kernel per tile width (1, 2, 4 vectors), so that N <= 32 and the
# last tile of N compute no columns past N (a 4-vector tile on N = 32 did
# twice the work)
_c4_s8_u16_1 = make_s8_kernel(U16, 1)
_c4_s8_u16_2 = make_s8_kernel(U16, 2)
_c4_s8_u16_4 = make_s8_kernel(U16, 4)
_c4_s8_i32_1 = make_s8_kernel(I32, 1)
_c4_s8_i32_2 = make_s8_kernel(I32, 2)
_c4_s8_i32_4 = make_s8_kernel(I32, 4)
# AVX2 (ymm, 8 columns a vector): tiles of 8 / 4 / 2 / 1 vectors in one
# intrinsic each (4 x 2 for BSR 4x1), the widest that fits the columns left:
# R * NV <= 8 accumulators leave room for the broadcasts and the X vectors
# among AVX2's 16 registers
_YW = (8, 4, 2, 1)
_y_csr_f32_u16 = make_block_kernel(1, 1, F32, U16, _YW, 8)
_y_csr_f32_i32 = make_block_kernel(1, 1, F32, I32, _YW, 8)
_y_csr_f16_u16 = make_block_kernel(1, 1, F16, U16, _YW, 8)
_y_csr_f16_i32 = make_block_kernel(1, 1, F16, I32, _YW, 8)
_y_r4_f32_u16 = make_block_kernel(4, 1, F32, U16, (2, 1), 8)
_y_r4_f32_i32 = make_block_kernel(4, 1, F32, I32, (2, 1), 8)
_y_r4_f16_u16 = make_block_kernel(4, 1, F16, U16, (2, 1), 8)
_y_r4_f16_i32 = make_block_kernel(4, 1, F16, I32, (2, 1), 8)
_y_c4_f32_u16 = make_block_kernel(1, 4, F32, U16, _YW, 8)
_y_c4_f32_i32 = make_block_kernel(1, 4, F32, I32, _YW, 8)
_y_c4_f16_u16 = make_block_kernel(1, 4, F16, U16, _YW, 8)
_y_c4_f16_i32 = make_block_kernel(1, 4, F16, I32, _YW, 8)
_y_nm_f32 = make_block_kernel(1, 4, F32, NM, _YW, 8)
_y_nm_f16 = make_block_kernel(1, 4, F16, NM, _YW, 8)
# int8 on AVX2: 16 / 32 / 64-column tiles of exact vpmaddwd (X' in k pairs)
_y_s8_u16_1 = make_s8_kernel(U16, 1, 8)
_y_s8_u16_2 = make_s8_kernel(U16, 2, 8)
_y_s8_u16_4 = make_s8_kernel(U16, 4, 8)
_y_s8_i32_1 = make_s8_kernel(I32, 1, 8)
_y_s8_i32_2 = make_s8_kernel(I32, 2, 8)
_y_s8_i32_4 = make_s8_kernel(I32, 4, 8)

# kernel ids handed to the drivers: 4 * shape + 2 * (value is f16) + (index i32)
CSR, R4, C4, NM24 = 0, 1, 2, 3


@njit(inline="always")
def _float_tile(kid, x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs):
    if kid < 4 and nvalid <= 32:
        if kid == 0:
            _csr_f32_u16_2(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs)
        elif kid == 1:
            _csr_f32_i32_2(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs)
        elif kid == 2:
            _csr_f16_u16_2(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs)
        else:
            _csr_f16_i32_2(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs)
    elif kid == 0:
        _csr_f32_u16(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs)
    elif kid == 1:
        _csr_f32_i32(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs)
    elif kid == 2:
        _csr_f16_u16(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs)
    elif kid == 3:
        _csr_f16_i32(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs)
    elif kid == 4:
        _r4_f32_u16(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs)
    elif kid == 5:
        _r4_f32_i32(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs)
    elif kid == 6:
        _r4_f16_u16(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs)
    elif kid == 7:
        _r4_f16_i32(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs)
    elif kid == 8:
        _c4_f32_u16(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs)
    elif kid == 9:
        _c4_f32_i32(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs)
    elif kid == 10:
        _c4_f16_u16(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs)
    elif kid == 11:
        _c4_f16_i32(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs)
    elif kid == 12 or kid == 13:
        _nm_f32(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs)
    else:
        _nm_f16(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs)


@njit(inline="always")
def _float_tile_ymm(kid, x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs, nv):
    if kid == 0:
        _y_csr_f32_u16(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs, nv)
    elif kid == 1:
        _y_csr_f32_i32(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs, nv)
    elif kid == 2:
        _y_csr_f16_u16(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs, nv)
    elif kid == 3:
        _y_csr_f16_i32(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs, nv)
    elif kid == 4:
        _y_r4_f32_u16(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs, nv)
    elif kid == 5:
        _y_r4_f32_i32(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs, nv)
    elif kid == 6:
        _y_r4_f16_u16(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs, nv)
    elif kid == 7:
        _y_r4_f16_i32(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs, nv)
    elif kid == 8:
        _y_c4_f32_u16(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs, nv)
    elif kid == 9:
        _y_c4_f32_i32(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs, nv)
    elif kid == 10:
        _y_c4_f16_u16(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs, nv)
    elif kid == 11:
        _y_c4_f16_i32(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs, nv)
    elif kid == 12 or kid == 13:
        _y_nm_f32(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs, nv)
    else:
        _y_nm_f16(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid, rs, nv)


@njit(inline="always")
def _ymm_vectors(R, left):
    # vectors of the next ymm tile: the widest of 8 / 4 / 2 / 1 (BSR 4x1: 2 /
    # 1) within the `left` vectors of columns still to do
    if R == 4:
        return 2 if left >= 2 else 1
    if left >= 8:
        return 8
    if left >= 4:
        return 4
    return 2 if left >= 2 else 1


@njit(inline="always")
def _float_rows(kid, R, c0, c1, xa, ldx, idx, val, kptr, out, oa, bias, lo, hi, epi,
                ymm):  # fmt: skip
    # block rows c0..c1-1 of one thread: per N tile and K chunk kc (block row
    # b's blocks kptr[b, kc] .. kptr[b, kc+1]-1), every block row's tile, the
    # partial sums kept in out between chunks; then bias / clamp. Why chunks
    # (only for long K, see lowprec.sparse.SPMM_K_CHUNK): a tile's X slab is
    # K x NR x 4 bytes, 1 MB at K = 4096, which with the values streaming
    # past does not stay in L2; a chunk's slab does. ymm: AVX2 tiles of
    # 8-column vectors that read whole vectors of X (the caller pads X's
    # rows to a multiple of 8 columns).
    M, N = out.shape
    ldo = np.int64(out.strides[0])
    nkc = kptr.shape[1] - 1
    n0 = 0
    while n0 < N:
        nv = _ymm_vectors(R, (N - n0 + 7) // 8) if ymm else NV
        nr = 8 * nv if ymm else NR
        nvalid = min(nr, N - n0)
        xt = xa + 4 * n0
        for kc in range(nkc):
            rs = 1 if kc > 0 else 0
            for b in range(c0, c1):
                p0, p1 = kptr[b, kc], kptr[b, kc + 1]
                if kc > 0 and p0 == p1:
                    continue  # nothing to add to this tile's sums
                m0 = b * R
                ot, rv = oa + m0 * ldo + 4 * n0, min(R, M - m0)
                if ymm:
                    _float_tile_ymm(kid, xt, ldx, idx, val, p0, p1, ot, ldo, rv,
                                    nvalid, rs, nv)  # fmt: skip
                else:
                    _float_tile(kid, xt, ldx, idx, val, p0, p1, ot, ldo, rv,
                                nvalid, rs)  # fmt: skip
        if epi:
            for b in range(c0, c1):
                m0 = b * R
                for r in range(min(R, M - m0)):
                    m = m0 + r
                    bm = bias[m] if bias.shape[0] > 1 else bias[0]
                    orow = out[m]
                    for jj in range(nvalid):
                        j = np.uint64(n0 + jj)
                        orow[j] = min(max(orow[j] + bm, lo), hi)
        n0 += nr


@njit(**PJIT)
def spmm_float(kid, R, xa, ldx, idx, val, kptr, chunks, out, oa, bias, lo, hi, epi,
               ymm):  # fmt: skip
    # out (M,N) float32 = W @ X (+bias, clamp to [lo, hi] when epi);
    # xa, idx, val, oa: addresses of X (float32, row stride ldx bytes), the block
    # indices, the values and out; kptr (Mb, nkc+1) int64 block pointers of
    # each block row's K chunks (column ranges in order);
    # chunks (T+1,) int64 block-row bounds of the T threads (balanced by nnz);
    # ymm: the AVX2 tiles (X rows padded to a multiple of 8 columns)
    for c in prange(chunks.shape[0] - 1):
        _float_rows(kid, R, chunks[c], chunks[c + 1], xa, ldx, idx, val, kptr, out,
                    oa, bias, lo, hi, epi, ymm)  # fmt: skip


@njit(**JIT)
def spmm_float_serial(
    kid, R, xa, ldx, idx, val, kptr, chunks, out, oa, bias, lo, hi, epi, ymm
):
    # as spmm_float on the calling thread (small problems: no pool launch)
    _float_rows(kid, R, 0, kptr.shape[0], xa, ldx, idx, val, kptr, out, oa, bias,
                lo, hi, epi, ymm)  # fmt: skip


# --------------------------------------------------------------------------- #
# int8


@njit(**JIT)
def pack_x_u8(x, flip, out):
    # x (K,N) int8|uint8 -> out (K4,Np,4) uint8 = x ^ flip (x' = x + 128 for int8),
    # rows past K and columns past N zero. Each output word of a full group of
    # four k rows is assembled from them (1024x256: 8 us; byte stores at
    # stride 4 took 115 us); the last, partial group byte by byte. On the
    # calling thread: a second parallel region per call costs more.
    K, N = x.shape
    K4, Np = out.shape[0], out.shape[1]
    o32 = out.view(np.uint32)  # (K4, Np, 1)
    f = np.uint32(flip) * np.uint32(0x01010101)
    for g in range(K // 4):
        x0, x1, x2, x3 = x[4 * g], x[4 * g + 1], x[4 * g + 2], x[4 * g + 3]
        o = o32[g]
        for n in range(N):
            o[n, 0] = (
                np.uint32(np.uint8(x0[n]))
                | (np.uint32(np.uint8(x1[n])) << 8)
                | (np.uint32(np.uint8(x2[n])) << 16)
                | (np.uint32(np.uint8(x3[n])) << 24)
            ) ^ f
    for g in range(K // 4, K4):
        for n in range(N):
            for i in range(4):
                k = 4 * g + i
                out[g, n, i] = np.uint8(x[k, n]) ^ flip if k < K else 0
    for g in range(K4):
        for n in range(N, Np):
            o32[g, n, 0] = 0


@njit(**JIT)
def pack_x_u16(x, flip, out):
    # x (K,N) int8|uint8 -> out (K2,Np,4) uint8 read as words of two uint16:
    # word (j, n) = x'[2j, n] | x'[2j+1, n] << 16, x' = x ^ flip (x + 128 for
    # int8 x), rows past K and columns past N zero: the k pairs that AVX2's
    # vpmaddwd multiplies with a block's int16 weight pairs
    K, N = x.shape
    K2, Np = out.shape[0], out.shape[1]
    o32 = out.view(np.uint32)  # (K2, Np, 1)
    f = np.uint32(flip) * np.uint32(0x00010001)
    for j in range(K // 2):
        x0, x1 = x[2 * j], x[2 * j + 1]
        o = o32[j]
        for n in range(N):
            lo, hi = np.uint32(np.uint8(x0[n])), np.uint32(np.uint8(x1[n]))
            o[n, 0] = (lo | (hi << 16)) ^ f
    for j in range(K // 2, K2):
        for n in range(N):
            lo = np.uint32(np.uint8(x[2 * j, n]) ^ flip) if 2 * j < K else np.uint32(0)
            o32[j, n, 0] = lo
    for j in range(K2):
        for n in range(N, Np):
            o32[j, n, 0] = 0


@njit(inline="always")
def _pack_x(x, flip, out, ymm):
    if ymm:
        pack_x_u16(x, flip, out)
    else:
        pack_x_u8(x, flip, out)


@njit(inline="always")
def _requant_row(p, m, n0, nc, zx, rs, bias, mult, zy, qlo, qhi, mode, out):
    # eqs. 8-13 for out[m, n0:n0+nc]: acc = P - ZX*rowsum(W') + bias[m]
    acc0 = -zx * rs[m] + bias[m]
    mm = mult[m]
    orow = out[m]
    c0 = np.uint64(n0)
    if mode == 1:
        for jj in range(nc):
            j = np.uint64(jj)
            v = np.rint(np.float64(np.int64(p[j]) + acc0) * mm + zy)
            orow[c0 + j] = min(max(v, qlo), qhi)
    else:
        for jj in range(nc):
            j = np.uint64(jj)
            v = np.float64(np.int64(p[j]) + acc0) * mm
            orow[c0 + j] = min(max(np.float32(v), qlo), qhi)


@njit(inline="always")
def _s8_tile(ymm, i32, x, ldx, idx, val, p0, p1, o, nvalid, c, mult, zy, qlo, qhi,
             f32, out):  # fmt: skip
    # the narrowest kernel that covers nvalid columns; ymm: the AVX2 tiles
    a = (x, ldx, idx, val, p0, p1, o, nvalid, c, mult, zy, qlo, qhi, f32, out)
    if ymm:
        if i32:
            if nvalid > 32:
                _y_s8_i32_4(*a)
            elif nvalid > 16:
                _y_s8_i32_2(*a)
            else:
                _y_s8_i32_1(*a)
        elif nvalid > 32:
            _y_s8_u16_4(*a)
        elif nvalid > 16:
            _y_s8_u16_2(*a)
        else:
            _y_s8_u16_1(*a)
    elif i32:
        if nvalid > 32:
            _c4_s8_i32_4(*a)
        elif nvalid > 16:
            _c4_s8_i32_2(*a)
        else:
            _c4_s8_i32_1(*a)
    elif nvalid > 32:
        _c4_s8_u16_4(*a)
    elif nvalid > 16:
        _c4_s8_u16_2(*a)
    else:
        _c4_s8_u16_1(*a)


@njit(inline="always")
def _s8_rows(c0, c1, xp, ia, i32, va, ptr, zx, rs, bias, mult, zy, qlo, qhi, f32,
             out, ymm):  # fmt: skip
    # rows c0..c1-1 of out, one 1 x NR8 tile at a time, N tiles outer (the
    # tile's X slab, K4 x NR8 x 4 bytes, twice that for ymm, stays in L2
    # across the rows)
    M, N = out.shape
    ldo = np.int64(out.strides[0])
    esize = out.itemsize
    oa = out.ctypes.data
    xa, ldx = xp.ctypes.data, np.int64(xp.strides[0])
    for t in range((N + NR8 - 1) // NR8):
        n0 = t * NR8
        nvalid = min(NR8, N - n0)
        for m in range(c0, c1):
            c = -zx * rs[m] + bias[m]
            o = oa + m * ldo + esize * n0
            _s8_tile(ymm, i32, xa + 4 * n0, ldx, ia, va, ptr[m],
                     ptr[m + 1], o, nvalid, c, mult[m], zy, qlo, qhi, f32,
                     out)  # fmt: skip


@njit(**PJIT)
def spmm_s8_vnni(
    x, flip, xps, packed, ia, i32, va, ptr, chunks, zx, rs, bias, mult, zy, qlo,
    qhi, f32, out, ymm
):  # fmt: skip
    # out (M,N) = requant(W @ X): W 1x4 blocks of int8 (zero point 0; ia the
    # address of the block columns, int32 if i32 else uint16, va of the values,
    # 4 per block, ptr (M+1,) block pointers); out's dtype (uint8 / int8 /
    # float32) selects the epilogue. x (K,N) the activations' bytes (uint8
    # view) packed as xp (K4,Np,4) = x ^ flip (pack_x_u8); ymm (AVX2 tiles):
    # values int16, xp (2 K4,Np,4) in k pairs (pack_x_u16). Addresses and a
    # uint8 view, not typed arrays: each array type was one more compiled
    # specialization (12 of ~5 s each on an AVX2 host). With
    # xps (threads, ...) each thread packs its own copy before its first part
    # (packed (threads,) zeros on entry); with xps (1, ...) the caller packed
    # the one copy (packed all ones). Why private copies: a copy packed on the
    # calling thread and read by both cores is shared in the other core's
    # cache, and writing it again on the next call waits for the
    # invalidations (measured, 1024x32: 16.5 us to pack after a parallel call,
    # 8 us after a serial one). zx = x zero point (+ 128 for int8 x); rs (M,)
    # int64 = rowsum(W); bias (M,) int64; mult (M,) float64; f32: uint8 / int8
    # output requantized in float32 lanes (checked exact by the caller);
    # chunks (parts+1,) row bounds balanced by nnz
    for c in prange(chunks.shape[0] - 1):
        tid = numba.get_thread_id()
        slot = tid if xps.shape[0] > 1 else 0
        if packed[tid] == 0:
            _pack_x(x, flip, xps[slot], ymm)
            packed[tid] = 1
        _s8_rows(chunks[c], chunks[c + 1], xps[slot], ia, i32, va, ptr, zx, rs,
                 bias, mult, zy, qlo, qhi, f32, out, ymm)  # fmt: skip


@njit(**JIT)
def spmm_s8_vnni_serial(
    x, flip, xps, packed, ia, i32, va, ptr, chunks, zx, rs, bias, mult, zy, qlo,
    qhi, f32, out, ymm
):  # fmt: skip
    # as spmm_s8_vnni on the calling thread (no parallel region): packs into
    # xps[0] itself; packed and chunks (the parallel call's) are not used
    _pack_x(x, flip, xps[0], ymm)
    _s8_rows(0, ptr.shape[0] - 1, xps[0], ia, i32, va, ptr, zx, rs, bias, mult,
             zy, qlo, qhi, f32, out, ymm)  # fmt: skip


# One column, banked (N = 1): the 16 rows of a tile are the 16 lanes, and the
# X words come from registers instead of a gather. X's words are cut into
# banks of 32 (two zmm registers); per (tile, bank) the rows' blocks whose
# word lies in the bank are laid out in slots: slot s holds, for each lane, one
# block's 4 weight bytes (bv, an int32; 0 pads shorter rows) and the word's
# index within the bank (bi, a byte). One vpermi2d of the bank's registers
# gives the 16 X words of a slot, one vpdpbusd adds the 16 dot4s:
#
#     acc[lane] += dot4(bv[s, lane], X'[32 b + bi[s, lane]])
#
# (a kernel that gathered 16 X words per vpdpbusd took ~40 cycles per 16
# blocks in vpgatherdd: 1024 x 1024 at 70 %, 1 thread, 57 -> 18 us a call).
# BANK_CHAINS independent accumulators hide vpdpbusd's latency. Layout built
# by lowprec.sparse._gemv_banks.
BANK_WORDS = 32
BANK_CHAINS = 4


@intrinsic
def _bank_tile(typingctx, x, bv, bi, tb, nb, acc):
    """acc[0:16] (int32) = one row tile's sums over its banks: x (X' words,
    uint32, nb * 32 of them, zero past K), bv / bi (the tile's slots), tb
    (int64 slot offsets, nb + 1 of them, relative to bv / bi); all addresses
    int64."""

    def codegen(context, builder, sig, args):
        x, bv, bi, tb, nb, acc = args
        c64 = lambda v: ir.Constant(_i64, v)  # noqa: E731
        perm = _fn(builder, "llvm.x86.avx512.vpermi2var.d.512", _vi, [_vi, _vi, _vi])
        dot = _fn(builder, "llvm.x86.avx512.vpdpbusd.512", _vi, [_vi, _vi, _vi])
        vb = ir.VectorType(_i8, 16)

        def ptr(base, off, ty):
            return builder.inttoptr(builder.add(base, off), ty.as_pointer())

        def bank(b, accs):
            s0 = builder.load(ptr(tb, builder.mul(b, c64(8)), _i64))
            s1 = builder.load(
                ptr(tb, builder.mul(builder.add(b, c64(1)), c64(8)), _i64)
            )
            xo = builder.mul(b, c64(4 * BANK_WORDS))
            x0 = builder.load(ptr(x, xo, _vi), align=4)
            x1 = builder.load(ptr(x, builder.add(xo, c64(64)), _vi), align=4)

            def one(sc, acc):
                iv = builder.zext(
                    builder.load(ptr(bi, builder.mul(sc, c64(16)), vb), align=1), _vi
                )
                xv = builder.call(perm, [x0, iv, x1])
                wv = builder.load(ptr(bv, builder.mul(sc, c64(64)), _vi), align=4)
                # operand 2 unsigned bytes (X'), operand 3 signed bytes (W)
                return builder.call(dot, [acc, xv, wv])

            def slots(s, accs):
                return [one(builder.add(s, c64(c)), accs[c]) for c in range(len(accs))]

            # whole sets of BANK_CHAINS slots, then the last 0-3 on chain 0
            # (slot counts padded to the chains multiplied the layout by up
            # to 4 at high sparsity, where most counts are 1)
            n = builder.sub(s1, s0)
            s4 = builder.add(s0, builder.and_(n, c64(-BANK_CHAINS)))
            accs = _ir_loop(builder, s0, s4, accs, slots, step=BANK_CHAINS, name="slot")
            head = _ir_loop(builder, s4, s1, accs[:1], slots, name="slot1")
            return head + accs[1:]

        zero = ir.Constant(_vi, None)
        accs = _ir_loop(builder, c64(0), nb, [zero] * BANK_CHAINS, bank, name="bank")
        total = accs[0]
        for a in accs[1:]:
            total = builder.add(total, a)
        builder.store(total, ptr(acc, c64(0), _vi), align=4)
        return context.get_dummy_value()

    return types.void(*([types.int64] * 6)), codegen


@njit(inline="always")
def _requant_column(acc, m0, m1, zx, rs, bias, mult, zy, qlo, qhi, mode, out):
    # out[m] (1-D) for rows m0..m1-1 from their sums acc[m - m0]: eqs. 8-13 in
    # _requant_row's arithmetic, one loop over the rows (it vectorizes: per
    # row through _requant_row it took as long as the bank tiles, 7 us for
    # 1024 rows)
    if mode == 1:
        for m in range(m0, m1):
            v = np.rint(np.float64(np.int64(acc[m - m0]) - zx * rs[m] + bias[m])
                        * mult[m] + zy)  # fmt: skip
            out[m] = min(max(v, qlo), qhi)
    else:
        for m in range(m0, m1):
            v = np.float64(np.int64(acc[m - m0]) - zx * rs[m] + bias[m]) * mult[m]
            out[m] = min(max(np.float32(v), qlo), qhi)


@njit(inline="always")
def _s8_bank_rows(t0, t1, xp, bv, bi, tb, zx, rs, bias, mult, zy, qlo, qhi, mode,
                  out):  # fmt: skip
    # out[m] (1-D) for the rows of tiles t0..t1-1: the tiles' sums, then
    # _requant_column
    nb = tb.shape[1] - 1
    acc = np.empty(16 * (t1 - t0), np.int32)
    for t in range(t0, t1):
        _bank_tile(xp.ctypes.data, bv.ctypes.data, bi.ctypes.data,
                   tb.ctypes.data + t * tb.strides[0], nb,
                   acc.ctypes.data + 64 * (t - t0))  # fmt: skip
    _requant_column(acc, 16 * t0, min(16 * t1, out.shape[0]), zx, rs, bias, mult,
                    zy, qlo, qhi, mode, out)  # fmt: skip


@njit(**PJIT)
def spmm_s8_banks(x, flip, bv, bi, tb, chunks, zx, rs, bias, mult, zy, qlo, qhi,
                  mode, out):  # fmt: skip
    # out (M,) = requant(W @ x) for W's banked slots (see BANK_WORDS) and x
    # (K, 1) uint8 / int8, packed here (flip: 0x80 for int8) as nb*32 uint32
    # words, zero past K; chunks (parts+1,) tile bounds. Packing inside the
    # call: one dispatch and no scratch lookup (~2 us of a ~15 us call)
    xp = np.empty((BANK_WORDS * (tb.shape[1] - 1), 1, 4), np.uint8)
    pack_x_u8(x, flip, xp)
    for c in prange(chunks.shape[0] - 1):
        _s8_bank_rows(chunks[c], chunks[c + 1], xp, bv, bi, tb, zx, rs, bias, mult,
                      zy, qlo, qhi, mode, out)  # fmt: skip


@njit(**JIT)
def spmm_s8_banks_serial(x, flip, bv, bi, tb, chunks, zx, rs, bias, mult, zy, qlo,
                         qhi, mode, out):  # fmt: skip
    # as spmm_s8_banks on the calling thread (chunks unused: one signature)
    xp = np.empty((BANK_WORDS * (tb.shape[1] - 1), 1, 4), np.uint8)
    pack_x_u8(x, flip, xp)
    _s8_bank_rows(0, tb.shape[0], xp, bv, bi, tb, zx, rs, bias, mult, zy, qlo, qhi,
                  mode, out)  # fmt: skip


# One column on AVX2 (no vpermi2d): 8 rows a tile are the 8 lanes, and the X
# words come from one vpgatherdd per slot. Slot s of a tile holds, per lane,
# one block's 4 weight bytes (bv, 0 pads shorter rows) and its word index
# (bi, int32); the dot4 of 8 gathered words with 8 weight words is exact
# without vpdpbusd (int8_gemm_ymm.nibble_dot4: X' split into nibbles):
#
#     acc[lane] += dot4(bv[s, lane], X'[bi[s, lane]])
#
# Layout built by lowprec.sparse._gemv_gather8. ~11 cycles a slot on Zen 3
# (estimated: a 90 % call's 31 us less ~15 us of Python, over 4166 slots;
# the gather dominates). The 16-column tile it replaces used 1 of 16 lanes: 1024 x
# 1024, N = 1, a qlinear_spmm call on 1 thread, 70 % 141 -> 61 us, 90 % 77 ->
# 31 us (float32-lane epilogue in both).


@intrinsic
def _gather_tile(typingctx, xp, bv, bi, s0, s1, acc):
    # acc (8 int32 at address acc) = the slots s0..s1-1 of one 8-row tile; xp
    # the address of X' words, bv / bi the addresses of the (slots, 8) arrays
    def codegen(context, builder, sig, args):
        xp, bv, bi, s0, s1, acc = args
        v8 = ir.VectorType(_i32, 8)
        gather = _fn(builder, "llvm.x86.avx2.gather.d.d.256", v8,
                     [v8, _i8.as_pointer(), v8, v8, _i8])  # fmt: skip
        x8 = builder.inttoptr(xp, _i8.as_pointer())
        every = ir.Constant(v8, [-1] * 8)

        def vec(base, s):
            at = builder.add(base, builder.mul(s, ir.Constant(_i64, 32)))
            return builder.load(builder.inttoptr(at, v8.as_pointer()), align=4)

        def slot(s, accs):
            xw = builder.call(gather, [ir.Constant(v8, None), x8, vec(bi, s), every,
                                       ir.Constant(_i8, 4)])  # fmt: skip
            return [nibble_dot4(builder, accs[0], xw, vec(bv, s))]

        (fin,) = _ir_loop(builder, s0, s1, [ir.Constant(v8, None)], slot, name="g8")
        builder.store(fin, builder.inttoptr(acc, v8.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(*([types.int64] * 6)), codegen


@njit(inline="always")
def _s8_gather_rows(t0, t1, xp, bv, bi, slot_ptr, zx, rs, bias, mult, zy, qlo,
                    qhi, mode, out):  # fmt: skip
    # out[m] (1-D) for the rows of 8-row tiles t0..t1-1: the tiles' sums, then
    # _requant_column
    acc = np.empty(8 * (t1 - t0), np.int32)
    for t in range(t0, t1):
        _gather_tile(xp.ctypes.data, bv.ctypes.data, bi.ctypes.data, slot_ptr[t],
                     slot_ptr[t + 1], acc.ctypes.data + 32 * (t - t0))  # fmt: skip
    _requant_column(acc, 8 * t0, min(8 * t1, out.shape[0]), zx, rs, bias, mult, zy,
                    qlo, qhi, mode, out)  # fmt: skip


@njit(**PJIT)
def spmm_s8_gather(x, flip, bv, bi, slot_ptr, chunks, zx, rs, bias, mult, zy, qlo,
                   qhi, mode, out):  # fmt: skip
    # out (M,) = requant(W @ x) for W's gather slots (see _gather_tile) and x
    # (K, 1) uint8 bytes (flip: 0x80 for int8), packed here as K4 words
    K4 = (x.shape[0] + 3) // 4
    xp = np.empty((K4, 1, 4), np.uint8)
    pack_x_u8(x, flip, xp)
    for c in prange(chunks.shape[0] - 1):
        _s8_gather_rows(chunks[c], chunks[c + 1], xp, bv, bi, slot_ptr, zx, rs,
                        bias, mult, zy, qlo, qhi, mode, out)  # fmt: skip


@njit(**JIT)
def spmm_s8_gather_serial(x, flip, bv, bi, slot_ptr, chunks, zx, rs, bias, mult, zy,
                          qlo, qhi, mode, out):  # fmt: skip
    # as spmm_s8_gather on the calling thread (chunks unused: one signature)
    K4 = (x.shape[0] + 3) // 4
    xp = np.empty((K4, 1, 4), np.uint8)
    pack_x_u8(x, flip, xp)
    _s8_gather_rows(0, slot_ptr.shape[0] - 1, xp, bv, bi, slot_ptr, zx, rs, bias,
                    mult, zy, qlo, qhi, mode, out)  # fmt: skip


@njit(**PJIT)
def spmm_s8_portable(
    indptr, cols, vals, zw, x, chunks, zx, rs, bias, mult, zy, qlo, qhi, mode, out
):
    # expanded CSR of any int8 format: out = requant(sum_k (w - zw[m]) x[k, n])
    # with exact int32 sums (|w - zw| <= 255, |x| <= 255, row nnz <= 33025);
    # rs (M,) int64 = rowsum(W - zw) over the nonzeros
    M, N = out.shape
    for c in prange(chunks.shape[0] - 1):
        acc = np.empty(NR, np.int32)
        for t in range((N + NR - 1) // NR):
            n0 = t * NR
            nc = min(NR, N - n0)
            for m in range(chunks[c], chunks[c + 1]):
                acc[:] = 0
                zm = np.int32(zw[m])
                for p in range(indptr[m], indptr[m + 1]):
                    w = np.int32(vals[p]) - zm
                    xr = x[np.uint64(cols[p])]
                    for jj in range(nc):
                        j = np.uint64(jj)
                        acc[j] += w * np.int32(xr[np.uint64(n0) + j])
                _requant_row(
                    acc, m, n0, nc, zx, rs, bias, mult, zy, qlo, qhi, mode, out
                )


@njit(**PJIT)
def spmm_float_portable(indptr, cols, vals, x, chunks, bias, lo, hi, out):
    # expanded CSR of any float format: out = clamp(W @ X + bias), float32
    # accumulation in column order (one rounding per product and per sum)
    M, N = out.shape
    for c in prange(chunks.shape[0] - 1):
        acc = np.empty(NR, np.float32)
        for t in range((N + NR - 1) // NR):
            n0 = t * NR
            nc = min(NR, N - n0)
            for m in range(chunks[c], chunks[c + 1]):
                acc[:] = 0
                for p in range(indptr[m], indptr[m + 1]):
                    w = np.float32(vals[p])
                    xr = x[np.uint64(cols[p])]
                    for jj in range(nc):
                        j = np.uint64(jj)
                        acc[j] += w * xr[np.uint64(n0) + j]
                bm = bias[m] if bias.shape[0] > 1 else bias[0]
                orow = out[m]
                for jj in range(nc):
                    j = np.uint64(jj)
                    orow[np.uint64(n0) + j] = min(max(acc[j] + bm, lo), hi)


# One column of floats on x86 with AVX2 and FMA, row by row from CSR arrays:
#
#     y[m] = sum_p vals[p] * x[cols[p]]     p in indptr[m] .. indptr[m+1]-1
#
# 8 entries at a time: x[cols[p..p+7]] gathered by 8 scalar loads into one
# ymm vector (vgatherdps measured ~15 cycles per 8 values on Zen 3, 5 ns a
# slot of 8), vals loaded as a vector (float16 bits widened by vcvtph2ps), 2
# vector sums taking alternate groups; the row's last < 8 entries in one more
# group whose lanes past the row read the row's last entry and are zeroed
# before the FMA. Only stored entries are read (an inf in an unstored column of
# x stays out of the row, as in spmv_float). 1024 x 1024, 1 thread, the
# harness's spmm call (the scalar spmv_float, forced by the portable path ->
# this), ms: 90 % 0.105 -> 0.056, 50 % 0.395 -> 0.224; ~1 cycle a stored value
# in scratch timings, 17 loads per 8 values. Each lane sums its
# entries in order, the lanes and the two sums are added in a tree at the end:
# at most n - 1 additions on any path (the bound of spmv_float).


@intrinsic
def _row_dot8(typingctx, x, cols, vals, p0, p1):
    # float32 sum of vals[p] * x[cols[p]] for p in p0..p1-1; cols uint16 or
    # int32, vals float32 or uint16 (float16 bits)
    if cols.dtype not in (types.uint16, types.int32):
        return None
    if vals.dtype not in (types.float32, types.uint16):
        return None
    if any(a.ndim != 1 or a.layout != "C" for a in (x, cols, vals)):
        return None  # read with unit stride from .data
    half = vals.dtype == types.uint16

    def codegen(context, builder, sig, args):
        xa, ca, va = (
            context.make_array(t)(context, builder, a)
            for t, a in zip(sig.args[:3], args[:3], strict=True)
        )
        p0, p1 = args[3], args[4]
        xp, cp, vp = xa.data, ca.data, va.data
        v8 = ir.VectorType(_f32, 8)
        fma = _fn(builder, "llvm.fma.v8f32", v8, [v8, v8, v8])
        zero = ir.Constant(v8, None)
        c8 = ir.Constant(_i64, 8)
        hv = ir.VectorType(_f16, 8)

        def gather(q_of_lane):
            v = ir.Constant(v8, ir.Undefined)
            for lane in range(8):
                q = q_of_lane(lane)
                c = builder.load(builder.gep(cp, [q]))
                xv = builder.load(builder.gep(xp, [builder.zext(c, _i64)]))
                v = builder.insert_element(v, xv, ir.Constant(_i32, lane))
            return v

        def weights(p):
            if half:
                at = builder.bitcast(builder.gep(vp, [p]), hv.as_pointer())
                return builder.fpext(builder.load(at, align=2), v8)
            at = builder.bitcast(builder.gep(vp, [p]), v8.as_pointer())
            return builder.load(at, align=4)

        def group(g, accs):
            p = builder.add(p0, builder.mul(g, c8))
            xv = gather(lambda lane: builder.add(p, ir.Constant(_i64, lane)))
            return [accs[1], builder.call(fma, [weights(p), xv, accs[0]])]

        n = builder.sub(p1, p0)
        ng = builder.sdiv(n, c8)
        a0, a1 = _ir_loop(builder, ir.Constant(_i64, 0), ng, [zero, zero], group,
                          name="rowdot")  # fmt: skip
        pt = builder.add(p0, builder.mul(ng, c8))
        r = builder.sub(p1, pt)

        def tail(vals_):
            # lanes >= r read the row's last entry (index in range), then 0
            last = builder.sub(r, ir.Constant(_i64, 1))
            lanes = ir.Constant(ir.VectorType(_i64, 8), list(range(8)))
            rv = _splat(builder, r, ir.VectorType(_i64, 8))
            keep = builder.icmp_signed("<", lanes, rv)

            def q(lane):
                k = ir.Constant(_i64, lane)
                inside = builder.icmp_signed("<", k, r)
                return builder.add(pt, builder.select(inside, k, last))

            xv = builder.select(keep, gather(q), zero)
            wv = ir.Constant(v8, ir.Undefined)
            for lane in range(8):
                at = builder.gep(vp, [q(lane)])
                e = builder.load(at)
                e = builder.fpext(builder.bitcast(e, _f16), _f32) if half else e
                wv = builder.insert_element(wv, e, ir.Constant(_i32, lane))
            wv = builder.select(keep, wv, zero)
            return [builder.call(fma, [wv, xv, vals_[0]])]

        (a0,) = _ir_if(builder, builder.icmp_signed(">", r, ir.Constant(_i64, 0)),
                       [a0], tail, name="rowtail")  # fmt: skip
        v = builder.fadd(a0, a1)

        def half_of(vec, idx):
            ty = ir.VectorType(_i32, len(idx))
            return builder.shuffle_vector(vec, vec, ir.Constant(ty, idx))

        v = builder.fadd(half_of(v, [0, 1, 2, 3]), half_of(v, [4, 5, 6, 7]))
        v = builder.fadd(half_of(v, [0, 1]), half_of(v, [2, 3]))
        v0 = builder.extract_element(v, ir.Constant(_i32, 0))
        return builder.fadd(v0, builder.extract_element(v, ir.Constant(_i32, 1)))

    return types.float32(x, cols, vals, types.int64, types.int64), codegen


@njit(inline="always")
def _spmv_rows(m0, m1, indptr, cols, vals, x, bias, lo, hi, out):
    nb = bias.shape[0]
    for m in range(m0, m1):
        s = _row_dot8(x, cols, vals, indptr[m], indptr[m + 1])
        out[m] = min(max(s + bias[m if nb > 1 else 0], lo), hi)


@njit(**PJIT)
def spmv_float8(indptr, cols, vals, x, chunks, bias, lo, hi, out):
    # out (M,) float32 = clamp(W @ x + bias) for one column x (K,) float32,
    # from CSR arrays (indptr int64, cols uint16 / int32, vals float32 /
    # float16 bits as uint16); the rows of chunks[c] .. chunks[c+1]-1 per part
    for c in prange(chunks.shape[0] - 1):
        _spmv_rows(chunks[c], chunks[c + 1], indptr, cols, vals, x, bias, lo, hi, out)


@njit(**JIT)
def spmv_float8_serial(indptr, cols, vals, x, chunks, bias, lo, hi, out):
    # as spmv_float8 on the calling thread (chunks unused: one signature)
    _spmv_rows(0, out.shape[0], indptr, cols, vals, x, bias, lo, hi, out)


@njit(cache=True, nogil=True, parallel=True, fastmath={"contract"})
def spmv_float(indptr, cols, vals, x, chunks, bias, lo, hi, out):
    # out (M,) float32 = clamp(W @ x + bias) for one column x (K,) float32, from
    # the expanded CSR view; 4 partial sums per row (every product one FMA
    # rounding, n - 1 additions: the documented bound holds). The (K, 1) tile
    # kernel would use 1 of 16 lanes; vgatherdps (fastmath) measured 2.5x
    # slower than this on Zen 4 (1024x1024 at 50%: 880 vs 353 us, 1 thread).
    # Unsigned indices: with int64 ones every access carried numba's
    # negative-index fix-up (sar / and / cmov, 45 instructions per 4 values,
    # 3.5 cycles a value on Zen 3: 1024 x 1024, 1 thread, 50 % 438 -> 264 us,
    # 90 % 121 -> 86 us; now 3 loads a value, the bound).
    nb = bias.shape[0]
    u1, u2, u3, u4 = np.uint64(1), np.uint64(2), np.uint64(3), np.uint64(4)
    for c in prange(chunks.shape[0] - 1):
        for m in range(chunks[c], chunks[c + 1]):
            s0 = s1 = s2 = s3 = np.float32(0)
            p = np.uint64(indptr[m])
            p1 = np.uint64(indptr[m + 1])
            while p + u4 <= p1:
                s0 += vals[p] * x[np.uint64(cols[p])]
                s1 += vals[p + u1] * x[np.uint64(cols[p + u1])]
                s2 += vals[p + u2] * x[np.uint64(cols[p + u2])]
                s3 += vals[p + u3] * x[np.uint64(cols[p + u3])]
                p += u4
            while p < p1:
                s0 += vals[p] * x[np.uint64(cols[p])]
                p += u1
            s = (s0 + s1) + (s2 + s3) + bias[m if nb > 1 else 0]
            out[m] = min(max(s, lo), hi)
