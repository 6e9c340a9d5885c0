"""256-bit INT8 GEMM paths: AVX-VNNI (``vpdpbusd ymm``) and exact AVX2 (``vpmaddwd``).

The same raw product as every path (docs/quantization.md, eq. 6)

    P[m, n] = sum_k a'[m, k] * b'[k, n]      a' uint8, b' int8, P int32

for CPUs without AVX-512: 16 vector registers, so smaller register tiles than
the 6x64 zmm kernel of ``int8_gemm_vnni`` (whose helpers this module reuses).

  avx_vnni  6 x 16 tile: 12 ymm accumulators, one ``vpdpbusd ymm`` per 8 columns
            x 4 k. LLVM emits the VEX (AVX-VNNI) encoding on CPUs that have it
            and the EVEX one on AVX-512 VNNI CPUs, which is how it is tested here.
  avx2      4 x 8 tile, exact without VNNI: a' widened to 16 bits (zero
            extension), b' sign-extended to 16 bits, ``vpmaddwd`` multiplies in
            32 bits and adds pairs -- never the saturating ``vpmaddubsw`` that
            needs 7-bit data (``reduce_range``). Two partial accumulators per 8
            columns (k pairs 0-1 and 2-3) are added once, after the K loop.

B is packed panel-major [N/NR][K4][NR][4] int8 as in ``int8_gemm_vnni.pack_b``.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .int8_gemm_vnni import _b_offsets, _gep8, _load_i32
from .ir_util import if_then as _ir_if
from .ir_util import loop as _ir_loop
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
    """acc += vpdpbusd(a4 splat, b) on 8 int32 lanes."""

    parts = 1

    def __init__(self, builder):
        self.f = _fn(builder, "llvm.x86.avx512.vpdpbusd.256", _v8, [_v8, _v8, _v8])

    def step(self, builder, accs, a32, bvec):
        return [builder.call(self.f, [accs[0], _splat8(builder, a32), bvec])]

    def finish(self, builder, accs):
        return accs[0]


class _Avx2Dot:
    """Exact u8 x s8 dot of 4 bytes on 8 columns with vpmaddwd (16-bit inputs,
    32-bit products and pair sums): accs = [cols 0-3 partials, cols 4-7]."""

    parts = 2

    def __init__(self, builder):
        self.f = _fn(builder, "llvm.x86.avx2.pmadd.wd", _v8, [_v16w, _v16w])

    def step(self, builder, accs, a32, bvec):
        a4 = builder.bitcast(a32, ir.VectorType(_i8, 4))
        a4w = builder.zext(a4, ir.VectorType(_i16, 4))
        a16 = builder.shuffle_vector(
            a4w, ir.Constant(ir.VectorType(_i16, 4), None),
            ir.Constant(ir.VectorType(_i32, 16), [0, 1, 2, 3] * 4),
        )  # fmt: skip
        b32 = builder.bitcast(bvec, ir.VectorType(_i8, 32))
        out = []
        for half in range(2):
            idx = ir.Constant(
                ir.VectorType(_i32, 16), list(range(16 * half, 16 * half + 16))
            )
            b16 = builder.shuffle_vector(b32, b32, idx)
            bw = builder.sext(b16, _v16w)
            out.append(builder.add(accs[half], builder.call(self.f, [a16, bw])))
        return out

    def finish(self, builder, accs):
        # lanes (2c, 2c+1) hold the two partial sums of column c of each half
        lo, hi = accs
        even = ir.Constant(_v8, [0, 2, 4, 6, 8, 10, 12, 14])
        odd = ir.Constant(_v8, [1, 3, 5, 7, 9, 11, 13, 15])
        return builder.add(
            builder.shuffle_vector(lo, hi, even), builder.shuffle_vector(lo, hi, odd)
        )


def make_tile_kernel(MR, NV, dot_cls):
    """An intrinsic computing one MR x (8*NV) int32 tile over the whole K.

    _tile(a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum), all int64, with the
    meaning of ``int8_gemm_vnni.make_tile_kernel`` (8-lane vectors, 32 bytes of B
    per vector).
    """

    def codegen(context, builder, sig, args):
        a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum = args
        dot = dot_cls(builder)
        P = dot.parts
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
                    i = (r * NV + v) * P
                    new += dot.step(builder, accs[i : i + P], a32s[r], bvecs[v])
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
        accs = _ir_loop(builder, zero64, k4, [zero_v] * (MR * NV * P), kstep,
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
                i = (r * NV + v) * P
                val = dot.finish(builder, fin[i : i + P])
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

# avx2: 4 x 8 (8 accumulators + 2 widened B + 1 A)
AVX2_MR, AVX2_NR = 4, 8
_at1 = make_tile_kernel(1, 1, _Avx2Dot)
_at2 = make_tile_kernel(2, 1, _Avx2Dot)
_at3 = make_tile_kernel(3, 1, _Avx2Dot)
_at4 = make_tile_kernel(4, 1, _Avx2Dot)


@njit(inline="always")
def _run_tile(path, mr, a, lda, b, ldb, k4, kr, c, ldc, nvalid):
    # path 0: avx_vnni tiles, 1: avx2 tiles (a compile-time constant per driver)
    if path == 0:
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
    else:
        if mr == 4:
            _at4(a, lda, b, ldb, k4, kr, c, ldc, nvalid, 0)
        elif mr == 3:
            _at3(a, lda, b, ldb, k4, kr, c, ldc, nvalid, 0)
        elif mr == 2:
            _at2(a, lda, b, ldb, k4, kr, c, ldc, nvalid, 0)
        else:
            _at1(a, lda, b, ldb, k4, kr, c, ldc, nvalid, 0)


# Not inlined into the prange drivers on purpose: numba's parfor passes copy and
# rewrite the whole loop body, and with the tile kernels and the epilogue inlined
# there they took minutes per driver variant; as a call they take seconds.
@njit(nogil=True, cache=True)
def _tile_job(path, t, a, bp, scratch, epi, out):
    # one MR x NR tile of `path` over the whole K, then the fused epilogue
    za, rs, cs, zb, bias, mult, zy, qlo, qhi, mode, fbias = epi
    M, K = a.shape
    N = out.shape[1]
    MR, NR = scratch.shape[1], scratch.shape[2]
    mt = (M + MR - 1) // MR
    k4 = K // 4
    jn = t // mt
    m0 = (t - jn * mt) * MR
    n0 = jn * NR
    mr = min(MR, M - m0)
    nvalid = min(NR, N - n0)
    # one scratch row: the serial drivers get a 1-row scratch and never ask for a
    # thread id (numba.get_thread_id outside a parallel region can crash a
    # process whose threading layer is not started yet)
    tile = scratch[numba.get_thread_id() if scratch.shape[0] > 1 else 0]
    _run_tile(
        path, mr, a.ctypes.data + m0 * a.strides[0], a.strides[0],
        bp.ctypes.data + jn * bp.strides[0], NR * 4, k4, K - 4 * k4,
        tile.ctypes.data, NR, nvalid,
    )  # fmt: skip
    epilogue_tile(
        tile, mr, nvalid, m0, n0, za, rs, cs, zb, bias, mult, zy, qlo, qhi, mode,
        out, fbias,
    )  # fmt: skip


@njit(parallel=True, nogil=True, cache=True)
def gemm_fused(path, a, bp, scratch, epi, out):
    # a (M,K>=4) uint8, bp (NP,K4,NR,4) int8, scratch (threads,MR,NR) int32 with
    # the path's tile, out (M,N): eq. 6 then eqs. 8-13 per tile, N-major order
    mt = (a.shape[0] + scratch.shape[1] - 1) // scratch.shape[1]
    nt = (out.shape[1] + scratch.shape[2] - 1) // scratch.shape[2]
    for t in prange(mt * nt):
        _tile_job(path, t, a, bp, scratch, epi, out)


@njit(nogil=True, cache=True)
def gemm_fused_serial(path, a, bp, scratch, epi, out):
    # as gemm_fused, on the calling thread (tiny problems)
    mt = (a.shape[0] + scratch.shape[1] - 1) // scratch.shape[1]
    nt = (out.shape[1] + scratch.shape[2] - 1) // scratch.shape[2]
    for t in range(mt * nt):
        _tile_job(path, t, a, bp, scratch, epi, out)


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
