"""256-bit INT8 GEMM paths: AVX-VNNI (``vpdpbusd ymm``) and exact AVX2 (``vpmaddwd``).

The same raw product as every path (docs/quantization.md, eq. 6)

    P[m, n] = sum_k a'[m, k] * b'[k, n]      a' uint8, b' int8, P int32

for CPUs without AVX-512: 16 vector registers, so smaller register tiles than
the 6x64 zmm kernel of ``int8_gemm_vnni`` (whose helpers this module reuses).

  avx_vnni  6 x 16 tile: 12 ymm accumulators, one ``vpdpbusd ymm`` per 8 columns
            x 4 k. LLVM emits the VEX (AVX-VNNI) encoding on CPUs that have it
            and the EVEX one on AVX-512 VNNI CPUs, which is how it is tested here.
  avx2      6 x 16 tile, exact without VNNI: ``vpmaddwd`` on 16-bit data
            multiplies in 32 bits and adds pairs, then ``vpaddd`` -- never the
            saturating ``vpmaddubsw`` that needs 7-bit data (``reduce_range``).
            b' is sign-extended to 16 bits once, at pack time
            ([N/NR][K2][NR][2] int16, ``pack_b16``), a' zero-extended once per
            call (``pack_a16``: blocks of 6 rows, 16 k of each row a step, one
            ``vpbroadcastd`` per row and k pair), so the K loop is loads,
            ``vpmaddwd`` and ``vpaddd`` only; the epilogue is the zmm kernel's,
            in registers (``make_fused_kernel`` with ``_k_loop_avx2``). The
            INT8 convolution widens each tile's im2col rows into the same
            layout (``widen_rows``, kernels/int8_conv.py ``conv_avx2``).
  avx2 GEMV  at most 2 rows (``gemv_nibble``): int8 weights in avx_vnni's
            layout, ``vpmaddubsw`` on a's nibbles (never saturating) summed
            in int16 lanes for 8 k4 steps, then widened with ``vpmaddwd``.

avx_vnni packs B panel-major [N/NR][K4][NR][4] int8 as ``int8_gemm_vnni.pack_b``
and runs its epilogue on an int32 scratch tile (kernels/requant.py).
"""

import functools

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .int8_gemm_vnni import (
    _b_offsets,
    _fused_args,
    _gep8,
    _load_i32,
    _row_blocks,
    make_fused_kernel,
    narrow_epilogue,
)
from .ir_util import if_then as _ir_if
from .ir_util import loop as _ir_loop
from .ir_util import target_has
from .requant import epilogue_tile

_i1 = ir.IntType(1)
_i8 = ir.IntType(8)
_i16 = ir.IntType(16)
_i32 = ir.IntType(32)
_i64 = ir.IntType(64)
_v8 = ir.VectorType(_i32, 8)
_m8 = ir.VectorType(_i1, 8)
_v16w = ir.VectorType(_i16, 16)


def _fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ret, args), name
    )


def _splat8(builder, x32):
    undef = ir.Constant(_v8, ir.Undefined)
    v = builder.insert_element(undef, x32, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, undef, ir.Constant(_v8, None))


class _VnniDot:
    """acc += vpdpbusd(a4 splat, b) on 8 int32 lanes.

    The avx_vnni path runs only where LLVM's target has a 256-bit vpdpbusd
    (AVX-VNNI, or AVX-512 VNNI with VL); a target without it
    (NUMBA_CPU_NAME=generic) gets plain IR: bytes widened to 32 bits, 4
    products a lane."""

    def __init__(self, context, builder):
        self.native = target_has(context, "avxvnni") or target_has(
            context, "avx512vnni", "avx512vl"
        )
        if self.native:
            self.f = _fn(builder, "llvm.x86.avx512.vpdpbusd.256", _v8, [_v8, _v8, _v8])

    def step(self, builder, acc, a32, bvec):
        a = _splat8(builder, a32)
        if self.native:
            return builder.call(self.f, [acc, a, bvec])
        v32b, v32 = ir.VectorType(_i8, 32), ir.VectorType(_i32, 32)
        prod = builder.mul(
            builder.zext(builder.bitcast(a, v32b), v32),
            builder.sext(builder.bitcast(bvec, v32b), v32),
        )
        for j in range(4):  # lane c += products 4c + j
            pick = ir.Constant(_v8, [4 * c + j for c in range(8)])
            acc = builder.add(acc, builder.shuffle_vector(prod, prod, pick))
        return acc


def nibble_dot4(builder, acc, a, b):
    """acc + per int32 lane the 4 products of a's unsigned and b's signed
    bytes (vpdpbusd's result) from AVX2 instructions (the sparse one-column
    tile, kernels/sparse_gemm.py), exact: a's bytes split
    into nibbles (each at most 15, so vpmaddubsw's int16 pair sums, at most
    2 * 15 * 128, never saturate), vpmaddwd with ones for the 4-product sums,
    then lo + 16 hi. acc, a, b: <8 x i32>."""
    v32b, w16 = ir.VectorType(_i8, 32), ir.VectorType(ir.IntType(16), 16)
    maddubs = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", w16, [v32b, v32b])
    maddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _v8, [w16, w16])
    nib = ir.Constant(_v8, [0x0F0F0F0F] * 8)
    lo = builder.and_(a, nib)
    hi = builder.and_(builder.lshr(a, ir.Constant(_v8, [4] * 8)), nib)
    b = builder.bitcast(b, v32b)
    ones = ir.Constant(w16, [1] * 16)
    s = []
    for x in (lo, hi):
        pairs = builder.call(maddubs, [builder.bitcast(x, v32b), b])
        s.append(builder.call(maddwd, [pairs, ones]))
    return builder.add(
        acc, builder.add(s[0], builder.shl(s[1], ir.Constant(_v8, [4] * 8)))
    )


def make_tile_kernel(MR, NV, dot_cls):
    """An intrinsic computing one MR x (8*NV) int32 tile over the whole K.

    _tile(a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum), all int64, with the
    meaning of ``int8_gemm_vnni.make_tile_kernel`` (8-lane vectors, 32 bytes of
    B per vector).
    """

    def codegen(context, builder, sig, args):
        a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum = args
        dot = dot_cls(context, builder)
        zero64 = ir.Constant(_i64, 0)
        a_base = builder.inttoptr(a, _i8.as_pointer())
        b_base = builder.inttoptr(b, _i8.as_pointer())
        a_rows = [
            _gep8(builder, a_base, builder.mul(lda, ir.Constant(_i64, r)))
            for r in range(MR)
        ]
        # vectors past the valid columns re-read the last valid one (no reads
        # beyond the packed panel); their lanes are masked off at the store
        b_offs = _b_offsets(builder, NV, nvalid, lanes=8)

        def load_b(row):
            return [
                builder.load(
                    builder.bitcast(_gep8(builder, row, b_offs[v]), _v8.as_pointer()),
                    align=1,
                )
                for v in range(NV)
            ]

        def step(accs, a32s, bvecs):
            new = []
            for r in range(MR):
                for v in range(NV):
                    new.append(dot.step(builder, accs[r * NV + v], a32s[r], bvecs[v]))
            return new

        zero_v = ir.Constant(_v8, None)

        def kstep(kphi, accs):
            k_bytes = builder.shl(kphi, ir.Constant(_i64, 2))
            bvecs = load_b(_gep8(builder, b_base, builder.mul(kphi, ldb)))
            a32s = [
                _load_i32(builder, _gep8(builder, a_rows[r], k_bytes))
                for r in range(MR)
            ]
            return step(accs, a32s, bvecs)

        # main K loop, accumulators as phi nodes (they stay in registers)
        accs = _ir_loop(builder, zero64, k4, [zero_v] * (MR * NV), kstep,
                     name="ymm")  # fmt: skip

        def tail(accs):
            # K tail: the 4 bytes ending at the row's end, shifted so that only
            # the kr tail bytes remain (they meet zero padding in B)
            k_end = builder.add(builder.shl(k4, ir.Constant(_i64, 2)), kr)
            shift = builder.trunc(
                builder.shl(
                    builder.sub(ir.Constant(_i64, 4), kr), ir.Constant(_i64, 3)
                ),
                _i32,
            )
            bvecs = load_b(_gep8(builder, b_base, builder.mul(k4, ldb)))
            at = builder.sub(k_end, ir.Constant(_i64, 4))
            a32s = [
                builder.lshr(_load_i32(builder, _gep8(builder, a_rows[r], at)), shift)
                for r in range(MR)
            ]
            return step(accs, a32s, bvecs)

        fin = _ir_if(builder, builder.icmp_signed(">", kr, zero64), accs, tail,
                       name="ymm.tail")  # fmt: skip
        lanes = ir.Constant(ir.VectorType(_i64, 8), list(range(8)))
        nv_s = builder.insert_element(
            ir.Constant(ir.VectorType(_i64, 8), ir.Undefined),
            nvalid,
            ir.Constant(_i32, 0),
        )
        nv_s = builder.shuffle_vector(nv_s, nv_s, ir.Constant(_v8, None))
        acc_flag = builder.icmp_signed("!=", accum, zero64)
        acc_m = builder.insert_element(
            ir.Constant(_m8, ir.Undefined), acc_flag, ir.Constant(_i32, 0)
        )
        acc_m = builder.shuffle_vector(acc_m, acc_m, ir.Constant(_v8, None))
        load = _fn(
            builder,
            "llvm.masked.load.v8i32.p0",
            _v8,
            [_v8.as_pointer(), _i32, _m8, _v8],
        )
        save = _fn(
            builder,
            "llvm.masked.store.v8i32.p0",
            ir.VoidType(),
            [_v8, _v8.as_pointer(), _i32, _m8],
        )
        c_base = builder.inttoptr(c, _i32.as_pointer())
        four = ir.Constant(_i32, 4)
        for r in range(MR):
            c_row = builder.gep(c_base, [builder.mul(ldc, ir.Constant(_i64, r))])
            for v in range(NV):
                col = builder.add(
                    lanes, ir.Constant(ir.VectorType(_i64, 8), [8 * v] * 8)
                )
                mask = builder.icmp_signed("<", col, nv_s)
                cp = builder.bitcast(
                    builder.gep(c_row, [ir.Constant(_i64, 8 * v)]), _v8.as_pointer()
                )
                val = fin[r * NV + v]
                old = builder.call(load, [cp, four, builder.and_(mask, acc_m), zero_v])
                builder.call(save, [builder.add(val, old), cp, four, mask])
        return context.get_dummy_value()

    @intrinsic
    def _tile(typingctx, a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum):
        return types.void(*([types.int64] * 10)), codegen

    return _tile


# avx_vnni: 6 x 16 (12 accumulators + 2 B + 1 A of the 16 ymm registers)
VNNI_MR, VNNI_NR = 6, 16
_vt1 = make_tile_kernel(1, 2, _VnniDot)
_vt2 = make_tile_kernel(2, 2, _VnniDot)
_vt3 = make_tile_kernel(3, 2, _VnniDot)
_vt4 = make_tile_kernel(4, 2, _VnniDot)
_vt5 = make_tile_kernel(5, 2, _VnniDot)
_vt6 = make_tile_kernel(6, 2, _VnniDot)


@njit(inline="always")
def _run_tile(mr, a, lda, b, ldb, k4, kr, c, ldc, nvalid):
    if mr == 6:
        _vt6(a, lda, b, ldb, k4, kr, c, ldc, nvalid, 0)
    elif mr == 5:
        _vt5(a, lda, b, ldb, k4, kr, c, ldc, nvalid, 0)
    elif mr == 4:
        _vt4(a, lda, b, ldb, k4, kr, c, ldc, nvalid, 0)
    elif mr == 3:
        _vt3(a, lda, b, ldb, k4, kr, c, ldc, nvalid, 0)
    elif mr == 2:
        _vt2(a, lda, b, ldb, k4, kr, c, ldc, nvalid, 0)
    else:
        _vt1(a, lda, b, ldb, k4, kr, c, ldc, nvalid, 0)


# Not inlined into the prange drivers on purpose: numba's parfor passes copy and
# rewrite the whole loop body, and with the tile kernels and the epilogue inlined
# there they took minutes per driver variant; as a call they take seconds.
# A job is a block of row tiles against one N panel (int8_gemm_vnni's order and
# block size): one call per tile cost ~half the time of a K = 256 tile (AVX2
# Zen 3, 1 thread, 1024 x 256 x 256: 47 % of the vpmaddwd peak with a call per
# tile).
@njit(nogil=True, cache=True)
def _block_job(t, nblk, a, bp, scratch, epi, out):
    # avx_vnni job t = (row block, N panel): each MR x NR tile over the whole
    # K into the scratch tile, then the epilogue (kernels/requant.py)
    za, rs, cs, zb, bias, mult, zy, qlo, qhi, mode, fbias = epi
    M, K = a.shape
    N = out.shape[1]
    MR, NR = scratch.shape[1], scratch.shape[2]
    mt = (M + MR - 1) // MR
    nt = (N + NR - 1) // NR
    k4 = K // 4
    blk = t // nt
    jn = t - blk * nt
    n0 = jn * NR
    nvalid = min(NR, N - n0)
    b = bp.ctypes.data + jn * bp.strides[0]
    # one scratch row: the serial drivers get a 1-row scratch and never ask for a
    # thread id (numba.get_thread_id outside a parallel region can crash a
    # process whose threading layer is not started yet)
    tile = scratch[numba.get_thread_id() if scratch.shape[0] > 1 else 0]
    for im in range(blk * mt // nblk, (blk + 1) * mt // nblk):
        m0 = im * MR
        mr = min(MR, M - m0)
        _run_tile(
            mr, a.ctypes.data + m0 * a.strides[0], a.strides[0], b, NR * 4, k4,
            K - 4 * k4, tile.ctypes.data, NR, nvalid,
        )  # fmt: skip
        epilogue_tile(
            tile, mr, nvalid, m0, n0, za, rs, cs, zb, bias, mult, zy, qlo, qhi,
            mode, out, fbias,
        )  # fmt: skip


@njit(parallel=True, nogil=True, cache=True)
def gemm_fused(a, bp, scratch, epi, out, threads):
    # a (M,K>=4) uint8, bp (NP,K4,NR,4) int8, scratch (threads,MR,NR) int32,
    # out (M,N): eq. 6 then eqs. 8-13 per tile; threads = the caller's numba
    # thread count
    mt = (a.shape[0] + scratch.shape[1] - 1) // scratch.shape[1]
    nt = (out.shape[1] + scratch.shape[2] - 1) // scratch.shape[2]
    nblk = _row_blocks(mt, threads)
    for t in prange(nblk * nt):
        _block_job(t, nblk, a, bp, scratch, epi, out)


@njit(nogil=True, cache=True)
def gemm_fused_serial(a, bp, scratch, epi, out):
    # as gemm_fused, on the calling thread (tiny problems)
    mt = (a.shape[0] + scratch.shape[1] - 1) // scratch.shape[1]
    nt = (out.shape[1] + scratch.shape[2] - 1) // scratch.shape[2]
    nblk = _row_blocks(mt, 1)
    for t in range(nblk * nt):
        _block_job(t, nblk, a, bp, scratch, epi, out)


# ---------------------------------------------------------------------------
# avx2: exact vpmaddwd tiles with the zmm path's fused epilogue
#
# 6 x 16 tiles: 12 ymm accumulators + 2 B + 1 A pair + 1 product of the 16
# registers. B is widened to int16 at pack time (pack_b16), A once per call
# (pack_a16: a block's rows one after another in each 16-k step), so a pair of
# k is 2 loads, 6 vpbroadcastd, 12 vpmaddwd and 12 vpaddd: the tile alone runs
# at the vpmaddwd + vpaddd probe's rate (AVX2 Zen 3, 1 thread, K = 1024: 158 vs 154
# GOP/s). The epilogue is int8_gemm_vnni's (make_fused_kernel), on 16-lane
# vectors that LLVM splits into ymm pairs. Measured against the previous 4 x 8
# tile (B and A widened inside the K loop, int32 scratch epilogue in numba), 1
# thread, u8s8->i32: 1024^3 77 -> 132 GOP/s, 16 x 384 x 1536 62 -> 108 (vpmaddwd
# + vpaddd probe 150-160 in the same runs).
AVX2_MR, AVX2_NR = 6, 16
# pairs of k per step of pack_a16's layout (16 k: one 16-byte run of a row
# widened), and the bytes of one row's pairs in a step
KB = 8
ROW_BYTES = 4 * KB


def _k_loop_avx2(builder, MR, NV_, a, lda, b, ldb, k2, akstep, nvalid):
    """make_fused_kernel's K loop for the avx2 layout: MR rows x 16 columns,
    k2 pairs of k, one a step; a = the block's pack_a16 address, lda =
    ROW_BYTES (one row's pairs in a 16-k step), akstep = bytes per 16-k step
    (the `kr` slot). Pair k of row r is at (k // KB) * akstep + r * lda +
    4 (k % KB): one address a pair, constant offsets for the rows. Returns MR
    16-lane sums."""
    assert NV_ == 1
    pmadd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _v8, [_v16w, _v16w])
    a_base = builder.inttoptr(a, _i8.as_pointer())
    b_base = builder.inttoptr(b, _i8.as_pointer())
    b_offs = _b_offsets(builder, 2, nvalid, lanes=8)
    c64 = lambda v: ir.Constant(_i64, v)  # noqa: E731

    def kstep(k, accs):
        brow = _gep8(builder, b_base, builder.mul(k, ldb))
        bv = [
            builder.bitcast(
                builder.load(
                    builder.bitcast(_gep8(builder, brow, b_offs[v]), _v8.as_pointer()),
                    align=1,
                ),
                _v16w,
            )
            for v in range(2)
        ]
        at = builder.add(
            builder.mul(builder.udiv(k, c64(KB)), akstep),
            builder.mul(builder.urem(k, c64(KB)), c64(4)),
        )
        arow = _gep8(builder, a_base, at)
        new = []
        for r in range(MR):
            a32 = _load_i32(builder, _gep8(builder, arow, builder.mul(lda, c64(r))))
            pr = builder.bitcast(_splat8(builder, a32), _v16w)
            for v in range(2):
                prod = builder.call(pmadd, [pr, bv[v]])
                new.append(builder.add(accs[2 * r + v], prod))
        return new

    zero = ir.Constant(_v8, None)
    accs = _ir_loop(builder, c64(0), k2, [zero] * (2 * MR), kstep, name="avx2")
    join = ir.Constant(ir.VectorType(_i32, 16), list(range(16)))
    return [
        builder.shuffle_vector(accs[2 * r], accs[2 * r + 1], join) for r in range(MR)
    ]


_ft1 = make_fused_kernel(1, 1, k_loop=_k_loop_avx2)
_ft2 = make_fused_kernel(2, 1, k_loop=_k_loop_avx2)
_ft3 = make_fused_kernel(3, 1, k_loop=_k_loop_avx2)
_ft4 = make_fused_kernel(4, 1, k_loop=_k_loop_avx2)
_ft5 = make_fused_kernel(5, 1, k_loop=_k_loop_avx2)
_ft6 = make_fused_kernel(6, 1, k_loop=_k_loop_avx2)


@njit(inline="always")
def run_avx2_tile(mr, a, akstep, b, k2, m0, n0, nvalid, epi, narrow, a_arr, out):
    # one fused avx2 tile: rows m0..m0+mr from the pack_a16 block at address a
    # (akstep bytes per step of KB pairs), the pack_b16 panel at address b, k2
    # pairs of k, output columns n0..n0+nvalid (eqs. 6-13); narrow:
    # narrow_epilogue(...)
    args = _fused_args(a, ROW_BYTES, b, AVX2_NR * 4, k2, akstep, m0, n0, nvalid,
                       epi, narrow, a_arr, out)  # fmt: skip
    if mr == 6:
        _ft6(*args)
    elif mr == 5:
        _ft5(*args)
    elif mr == 4:
        _ft4(*args)
    elif mr == 3:
        _ft3(*args)
    elif mr == 2:
        _ft2(*args)
    else:
        _ft1(*args)


@njit(nogil=True, cache=True)
def _avx2_job(t, nblk, a16, bp, K, epi, narrow, a, out):
    # job t = (row block, N panel) as int8_gemm_vnni._block_job; a16: pack_a16's
    # blocks of a; a passed for its dtype only; K the real depth
    M, N = out.shape
    mt = (M + AVX2_MR - 1) // AVX2_MR
    nt = (N + AVX2_NR - 1) // AVX2_NR
    k2 = (K + 1) // 2  # the pairs of B; A carries zero ones up to whole 16-k steps
    R = a16.shape[2]  # rows a block: 6, or M when M < 6 (a single block)
    akstep = ROW_BYTES * R
    blk = t // nt
    jn = t - blk * nt
    n0 = jn * AVX2_NR
    nvalid = min(AVX2_NR, N - n0)
    b = bp.ctypes.data + jn * bp.strides[0]
    for im in range(blk * mt // nblk, (blk + 1) * mt // nblk):
        m0 = im * AVX2_MR
        run_avx2_tile(
            min(AVX2_MR, M - m0), a16.ctypes.data + (m0 // R) * a16.strides[0],
            akstep, b, k2, m0, n0, nvalid, epi, narrow, a, out,
        )  # fmt: skip


@njit(parallel=True, nogil=True, cache=True)
def gemm_avx2(a, a16, bp, epi, out, threads, pmax):
    # a (M, K) uint8 a' with unit column stride, a16 a16_shape(M, K) uint16
    # scratch (a widened here: pack_a16, row blocks across the threads), bp
    # (NP,K2,16,2) int16, out (M,N) int32|uint8|int8|float32 with unit column
    # stride; threads, pmax: as int8_gemm_vnni.gemm_fused. One call from
    # Python for the widening and the GEMM: ~1.5 us less a call than two.
    K = a.shape[1]
    R = a16.shape[2]
    if a16.shape[0] < 2 * threads:
        # a few row blocks: a parallel region of its own costs more (~3 us on
        # 2 threads, Zen 3) than widening them here
        pack_a16(a, a16)
    else:
        for blk in prange(a16.shape[0]):
            widen_rows(a, blk * R, R, blk, a16)
    mt = (out.shape[0] + AVX2_MR - 1) // AVX2_MR
    nt = (out.shape[1] + AVX2_NR - 1) // AVX2_NR
    nblk = _row_blocks(mt, threads)
    narrow = narrow_epilogue(epi, K, pmax)
    for t in prange(nblk * nt):
        _avx2_job(t, nblk, a16, bp, K, epi, narrow, a, out)


@njit(nogil=True, cache=True)
def gemm_avx2_serial(a, a16, bp, epi, out, pmax):
    # as gemm_avx2 on the calling thread
    K = a.shape[1]
    pack_a16(a, a16)
    mt = (out.shape[0] + AVX2_MR - 1) // AVX2_MR
    nt = (out.shape[1] + AVX2_NR - 1) // AVX2_NR
    nblk = _row_blocks(mt, 1)
    narrow = narrow_epilogue(epi, K, pmax)
    for t in range(nblk * nt):
        _avx2_job(t, nblk, a16, bp, K, epi, narrow, a, out)


def pack_b(b, nr):
    """b' (K, N) int8 -> panel-major [NP][K4][nr][4] int8."""
    K, N = b.shape
    K4 = (K + 3) // 4
    NP = (N + nr - 1) // nr
    padded = np.zeros((K4 * 4, NP * nr), dtype=np.int8)
    padded[:K, :N] = b
    packed = np.ascontiguousarray(padded.reshape(K4, 4, NP, nr).transpose(2, 0, 3, 1))
    packed.flags.writeable = False
    return packed


def pack_b16(b, nr):
    """b' (K, N) int8 -> the avx2 layout [NP][K2][nr][2] int16 (sign-extended
    once here; a zero row pads K to even, zero columns N to a panel)."""
    K, N = b.shape
    K2 = (K + 1) // 2
    NP = (N + nr - 1) // nr
    padded = np.zeros((K2 * 2, NP * nr), dtype=np.int16)
    padded[:K, :N] = b
    packed = np.ascontiguousarray(padded.reshape(K2, 2, NP, nr).transpose(2, 0, 3, 1))
    packed.flags.writeable = False
    return packed


@functools.lru_cache(maxsize=64)
def a16_shape(M, K):
    """pack_a16's output shape for an (M, K) a': blocks of R = min(6, M) rows,
    steps of 2 * KB k, R rows of KB zero-extended pairs a step."""
    R = min(AVX2_MR, M)
    return (-(-M // R), -(-K // (2 * KB)), R, 2 * KB)


@intrinsic
def _widen16(typingctx, dst, src):
    # 16 bytes at address src zero-extended to 16 uint16 at address dst (one
    # vpmovzxbw; numba's indexed byte loop did not vectorize: 0.26 ns a byte)
    def codegen(context, builder, sig, args):
        v16b = ir.VectorType(_i8, 16)
        p = builder.inttoptr(args[1], v16b.as_pointer())
        w = builder.zext(builder.load(p, align=1), _v16w)
        builder.store(w, builder.inttoptr(args[0], _v16w.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.none(types.intp, types.intp), codegen


@njit(inline="always")
def widen_rows(a, m0, R, blk, out):
    # out[blk, q, r, i] = a[m0 + r, 16 q + i] as uint16 (pack_a16's layout),
    # zeros past K and for r >= the rows of a; a's rows need unit stride
    M, K = a.shape
    Q = out.shape[1]
    full = K // (2 * KB)
    for r in range(R):
        m = m0 + r
        if m >= M:
            for q in range(Q):
                out[blk, q, r, :] = 0
            continue
        src = a.ctypes.data + m * a.strides[0]
        for q in range(full):
            _widen16(out[blk, q, r].ctypes.data, src + q * 2 * KB)
        for q in range(full, Q):
            for i in range(2 * KB):
                k = q * 2 * KB + i
                out[blk, q, r, i] = a[m, k] if k < K else 0


@njit(nogil=True, cache=True)
def pack_a16(a, out):
    # a (M, K) uint8 a' -> out a16_shape(M, K) uint16: row blocks of R rows, and
    # in each step of 16 k the block's rows one after another, 16 zero-extended
    # bytes (8 pairs) each, so the avx2 tile broadcasts row r's pair s of step
    # q from block + q * 32R + 32r + 4s: constant offsets from one pointer in
    # the K loop (per-row addresses: ~70 % of the vpmaddwd + vpaddd probe, 1
    # thread, K = 1024; five leaq a k step), and a row's 16 bytes widen with
    # one vpmovzxbw (pairs interleaved across rows took a scalar pass: 0.6 ms
    # of a 3x3 64-channel 56^2 layer's 2.5 ms)
    R = out.shape[2]
    for blk in range(out.shape[0]):
        widen_rows(a, blk * R, R, blk, out)


# ---------------------------------------------------------------------------
# avx2 GEMV: int8 weights, vpmaddubsw on the activations' nibbles, int16 sums
#
# A GEMV (a few rows) streams every weight once, so its speed is the weights'
# bytes: the int16 tile above reads twice those of int8. Here B stays int8 in
# avx_vnni's layout ([N/16][K4][16][4], pack_b) and a' is split once per call
# into nibbles (split_nibbles: a' = 16 hi + lo, each in [0, 15]), so vpmaddubsw
# never saturates: a pair sum is at most 2 * 15 * 128 = 3840 in magnitude, and
# NIB_STEPS = 8 k4 steps of them add up to at most 30720 < 2**15 in int16
# lanes. Every 8 steps the int16 sums widen with vpmaddwd against 1 (lo) and
# 16 (hi) into the int32 accumulators. Per 32 weight bytes: 2 vpmaddubsw + 2
# vpaddw, against 2 vpmaddubsw + 2 vpmaddwd + a shift + 2 vpaddd for the same
# nibble sum widened every step (int8_gemm_ymm.nibble_dot4).
NIB_STEPS = 8
GEMV_NR = 16


def _k_loop_nibble(builder, MR, NV_, a, lda, b, ldb, k4, kr, nvalid):
    """make_fused_kernel's K loop for the GEMV: MR rows x 16 columns. a: the
    split_nibbles bytes of row m0 (lda bytes a row: the lo nibbles of k at 4k4
    + j, the hi ones kr bytes further), b: the 16-column panel (ldb = 64 bytes
    a k4 step), k4 steps (zero padded on both sides past K). Returns MR 16-lane
    sums."""
    assert NV_ == 1
    v32b = ir.VectorType(_i8, 32)
    maddubs = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _v16w, [v32b, v32b])
    maddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _v8, [_v16w, _v16w])
    a_base = builder.inttoptr(a, _i8.as_pointer())
    b_base = builder.inttoptr(b, _i8.as_pointer())
    b_offs = _b_offsets(builder, 2, nvalid, lanes=8)
    c64 = lambda v: ir.Constant(_i64, v)  # noqa: E731
    weight = (ir.Constant(_v16w, [1] * 16), ir.Constant(_v16w, [16] * 16))
    a_rows = [_gep8(builder, a_base, builder.mul(lda, c64(r))) for r in range(MR)]

    def step(k, sums):
        # sums[(r * 2 + v) * 2 + h]: row r, column vector v, nibble h (lo, hi)
        brow = _gep8(builder, b_base, builder.mul(k, ldb))
        bv = [
            builder.load(
                builder.bitcast(_gep8(builder, brow, o), v32b.as_pointer()), align=1
            )
            for o in b_offs
        ]
        k_bytes = builder.mul(k, c64(4))
        new = []
        for r in range(MR):
            lo_at = _gep8(builder, a_rows[r], k_bytes)
            nibs = [
                builder.bitcast(_splat8(builder, _load_i32(builder, at)), v32b)
                for at in (lo_at, _gep8(builder, lo_at, kr))
            ]
            for v in range(2):
                for h in range(2):
                    i = (r * 2 + v) * 2 + h
                    pairs = builder.call(maddubs, [nibs[h], bv[v]])
                    new.append(builder.add(sums[i], pairs))
        return new

    zero16 = [ir.Constant(_v16w, None)] * (4 * MR)

    def widen(accs, sums):
        return [
            builder.add(
                accs[i],
                builder.add(
                    builder.call(maddwd, [sums[2 * i], weight[0]]),
                    builder.call(maddwd, [sums[2 * i + 1], weight[1]]),
                ),
            )
            for i in range(2 * MR)
        ]

    def block(kb, accs):
        # NIB_STEPS steps emitted in line: the int16 sums never leave registers
        sums = zero16
        k0 = builder.mul(kb, c64(NIB_STEPS))
        for j in range(NIB_STEPS):
            sums = step(builder.add(k0, c64(j)), sums)
        return widen(accs, sums)

    nblk = builder.udiv(k4, c64(NIB_STEPS))
    accs = _ir_loop(builder, c64(0), nblk, [ir.Constant(_v8, None)] * (2 * MR),
                    block, name="nib")  # fmt: skip
    rest = _ir_loop(builder, builder.mul(nblk, c64(NIB_STEPS)), k4, zero16, step,
                    name="nib.rest")  # fmt: skip
    accs = widen(accs, rest)
    join = ir.Constant(ir.VectorType(_i32, 16), list(range(16)))
    return [
        builder.shuffle_vector(accs[2 * r], accs[2 * r + 1], join) for r in range(MR)
    ]


GEMV_MR = 2
_nt1 = make_fused_kernel(1, 1, k_loop=_k_loop_nibble)
_nt2 = make_fused_kernel(2, 1, k_loop=_k_loop_nibble)


@njit(nogil=True, cache=True)
def split_nibbles(a, flip, out):
    # a (M, K) uint8 (int8 bytes with flip = 0x80: a' = a + 128) -> out (M, 2,
    # K4p) uint8: the lo and hi nibbles of a', zeros past K (the GEMV's A)
    M, K = a.shape
    for m in range(M):
        for k in range(K):
            x = np.uint8(a[m, k]) ^ np.uint8(flip)
            out[m, 0, k] = x & 15
            out[m, 1, k] = x >> 4
        out[m, :, K:] = 0


@njit(nogil=True)
def _gemv_job(jn, nib, bp, K, epi, narrow, a_arr, out):
    # the GEMV's 16-column panel jn, for every row of out in tiles of
    # GEMV_MR rows
    M, N = out.shape
    n0 = jn * GEMV_NR
    for m0 in range(0, M, GEMV_MR):
        args = _fused_args(
            nib.ctypes.data + m0 * nib.strides[0], nib.strides[0],
            bp.ctypes.data + jn * bp.strides[0], GEMV_NR * 4, bp.shape[1],
            nib.strides[1], m0, n0, min(GEMV_NR, N - n0), epi, narrow, a_arr, out,
        )  # fmt: skip
        if M - m0 >= 2:
            _nt2(*args)
        else:
            _nt1(*args)


@njit(parallel=True, nogil=True, cache=True)
def gemv_nibble(a, flip, nib, bp, epi, out, pmax, K):
    # a (M <= GEMV_MR, K) uint8 bytes (flip: see split_nibbles), nib (M, 2,
    # K4p) scratch, bp (NP, K4, 16, 4) int8, out (M, N) int32|uint8|int8|
    # float32 with unit column stride: eq. 6 then eqs. 8-13 per panel
    split_nibbles(a, flip, nib)
    narrow = narrow_epilogue(epi, K, pmax)
    for jn in prange(bp.shape[0]):
        _gemv_job(jn, nib, bp, K, epi, narrow, a, out)


@njit(nogil=True, cache=True)
def gemv_nibble_serial(a, flip, nib, bp, epi, out, pmax, K):
    # as gemv_nibble on the calling thread
    split_nibbles(a, flip, nib)
    narrow = narrow_epilogue(epi, K, pmax)
    for jn in range(bp.shape[0]):
        _gemv_job(jn, nib, bp, K, epi, narrow, a, out)
