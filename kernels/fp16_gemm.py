"""Half-precision GEMM: float16 / bfloat16 storage, float32 accumulation.

Computes, for every output (m, n), one float32 accumulator in a fixed order
that every path here shares (lowprec/half.py documents it as the accuracy
contract; the amx_bf16 path's bfloat16 GEMM, kernels/bf16_gemm_amx.py, sums
in the order of its tile instruction instead):

    float16   acc = 0;  for k = 0..K-1:          acc = fl32(acc + a[m,k]*b[k,n])
    bfloat16  acc = 0;  for each pair j = 0..ceil(K/2)-1 (b[K] = a[K] = 0):
                            acc = fl32(acc + a[m,2j+1]*b[2j+1,n])
                            acc = fl32(acc + a[m,2j]*b[2j,n])

Every product of two float16 values (11-bit significands, exponents far
inside float32's range) is exact in float32, so a fused multiply-add and a
multiply followed by an add give the same bits: the order above is the whole
story. A product of two bfloat16 values (8-bit significands) is exact only
inside float32's normal range (bfloat16 has float32's exponents: it can
overflow or be subnormal), so the bfloat16 kernels round each product before
the add, or fuse only where every product of the call is exact (the avx2
strips' FMA form, bf16_products_exact). The bfloat16
pair order (odd term first) is the one of AVX512_BF16 ``vdpbf16ps`` (Intel SDM)
and was checked on this Zen 4 (tests/test_half.py::test_bf16_pair_order).

Paths:
  f16c_fma      MR x 64 float32 register tiles; per k: 4 loads of 16 float16
                of B converted with vcvtph2ps (LLVM ``fpext <16 x half>``), MR
                broadcasts of A (float32), 4*MR ``vfmadd231ps zmm``.
                B packed panel-major [NP][K][64] float16 (half of float32's bytes).
  avx512_bf16   MR x 64 float32 tiles of ``vdpbf16ps zmm``; per pair of k: 4
                loads of 32 bfloat16 of B, MR broadcasts of an A pair (i32).
                B packed [NP][ceil(K/2)][64][2] bfloat16.
  avx2_f16c     the same tiles as 16-column ymm strips (make_tile_kernel's
                split); bfloat16 pairs widened by shift and mask, a multiply
                and an add per product, or FMAs where all are exact.
  portable      plain numba loops over float32 copies of the inputs, same order.

Each tile goes to a per-thread float32 scratch tile, then the shared epilogue
(bias, clamp, rounding to the output type) writes it out while it is in L1.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .config import JIT, PJIT
from .ir_util import loop as _ir_loop
from .ir_util import splat as _splat
from .ir_util import target_has

# ---------------------------------------------------------------------------
# tile shape (compile-time constants). 6 x 64: 24 zmm accumulators + 4 B + 1 A.
MR_MAX = 6
NV = 4
NR = 16 * NV
# portable path: TM rows x TN columns per thread tile
TM = 4
TN = 256

_i1 = ir.IntType(1)
_i16 = ir.IntType(16)
_i32 = ir.IntType(32)
_i64 = ir.IntType(64)
_f32 = ir.FloatType()
_f16 = ir.HalfType()
_vf = ir.VectorType(_f32, 16)
_vh = ir.VectorType(_f16, 16)
_vi = ir.VectorType(_i32, 16)


class _BFloat(ir.Type):
    """LLVM's ``bfloat`` (llvmlite's IR builder has no class for it)."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


_vbf = ir.VectorType(_BFloat(), 32)


def _fma(builder):
    fnty = ir.FunctionType(_vf, [_vf, _vf, _vf])
    return cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.v16f32")


def _dpbf16(context, builder):
    """dp(acc, a, b): vdpbf16ps zmm (acc + a_odd * b_odd + a_even * b_even per
    float32 lane). Where LLVM's target lacks AVX512_BF16 (the driver that holds
    this tile also holds the avx2_f16c strips, and is compiled on CPUs that run
    only those), a multiply and an add per half of the pairs widened by shift
    and mask stand in:
    LLVM aborts on an intrinsic its target cannot select, even in a branch
    that never runs (ir_util.target_has); the stand-in gives the same bits
    except for vdpbf16ps's flushing of subnormals."""
    if target_has(context, "avx512bf16"):
        fnty = ir.FunctionType(_vf, [_vf, _vbf, _vbf])
        fn = cgutils.get_or_insert_function(
            builder.module, fnty, "llvm.x86.avx512bf16.dpbf16ps.512"
        )
        return lambda acc, a, b: builder.call(fn, [acc, a, b])
    hi16 = ir.Constant(_vi, [-65536] * 16)
    sh16 = ir.Constant(_vi, [16] * 16)

    def dp(acc, a, b):
        a, b = builder.bitcast(a, _vi), builder.bitcast(b, _vi)
        for half in (lambda x: builder.and_(x, hi16), lambda x: builder.shl(x, sh16)):
            af, bf = (builder.bitcast(half(x), _vf) for x in (a, b))
            acc = builder.fadd(acc, builder.fmul(af, bf))
        return acc

    return dp


def fma_step(builder, accs, a_rows, a_off, b_row, kind="f32"):
    """One k step of an MR x 64 float32 tile: NV vectors of B at b_row (float32,
    or float16 converted with vcvtph2ps for kind "f16"), one float32 of A per
    row at a_rows[r] + a_off broadcast; returns accs + MR * NV FMAs."""
    fma = _fma(builder)
    bvecs = []
    for v in range(NV):
        if kind == "f32":
            p = builder.gep(b_row, [ir.Constant(_i64, 64 * v)])
            bvecs.append(builder.load(builder.bitcast(p, _vf.as_pointer()), align=4))
        else:
            p = builder.gep(b_row, [ir.Constant(_i64, 32 * v)])
            h = builder.load(builder.bitcast(p, _vh.as_pointer()), align=2)
            bvecs.append(builder.fpext(h, _vf))  # vcvtph2ps zmm, m256
    new = []
    for r, row in enumerate(a_rows):
        p = builder.bitcast(builder.gep(row, [a_off]), _f32.as_pointer())
        av = _splat(builder, builder.load(p, align=4), _vf)
        for v in range(NV):
            new.append(builder.call(fma, [av, bvecs[v], accs[r * NV + v]]))
    return new


def make_tile_kernel(MR, kind, split=False, fma=False):
    """One MR x NR float32 tile over a K range, as an intrinsic.

    split=True (the avx2_f16c path): the tile runs as NV strips of MR x 16
    columns one after another, each over the whole K range: 2 ymm
    accumulators a row (LLVM splits the 16-lane IR vectors), 15 of AVX2's 16
    registers at MR = 6 where the 64-wide tile would need 48. Every output's
    sum runs over k in the same order either way. Kind "bf16" split: A is
    float32 rows (not pairs), and each bfloat16 pair of B becomes two float32
    vectors by a shift and a mask (b[2i] = x << 16, b[2i+1] = x & 0xFFFF0000);
    per pair, the odd k first (vdpbf16ps's order, the portable kernel's), a
    multiply and an add (FMAs only with fma=True, below): bfloat16 has
    float32's exponent range,
    so a product can overflow or fall below the normal range, where the
    portable kernel's rounded product and an FMA's exact one differ (float16
    products never do: they stay inside float32's normal range). On Zen 3 the
    multiplies and adds fill its two multiply and two add pipes, and the
    widening and broadcasts come on top: ~70 % of the FMA peak, the same with
    the loop written as inline assembly without spills.

    _tile(a, lda, b, ks, c, ldc, accum)    all int64
      a     address of A[m0, k0]: float32 (f16, f32) or bfloat16 pairs (bf16),
            row stride lda bytes
      b     address of the panel at k0: rows of NR float16 (f16, 2*NR bytes),
            NR float32 (f32, 4*NR bytes) or NR bfloat16 pairs (bf16, 4*NR bytes)
      ks    steps: k values (f16, f32) or k pairs (bf16)
      c     address of a float32 MR x NR tile, row stride ldc elements
      accum 0: the tile starts from 0; 1: from c (continues the same sum order)

    fma=True (kind "bf16" split): FMAs instead of the multiply and add, for
    calls whose products are all exact in float32 (bf16_products_exact, from
    the exponent ranges of A, per call, and of the packed B): the same bits.
    1 / 2 threads, Zen 3, matmul_bf16: 128x768x3072 68 -> 90 / 132 -> 165
    GFLOP/s, 1024^3 66 -> 89 / 126 -> 162, 16x384x1536 64 -> 83 / 115 -> 141.
    """
    step_b = 2 * NR if kind == "f16" else 4 * NR

    def codegen(context, builder, sig, args):
        a, lda, b, ks, c, ldc, accum = args
        step_a = ir.Constant(_i64, 4)  # one float32 or one bfloat16 pair
        i8p = ir.IntType(8).as_pointer()
        zero64 = ir.Constant(_i64, 0)
        a_base = builder.inttoptr(a, i8p)
        b_base = builder.inttoptr(b, i8p)
        c_base = builder.inttoptr(c, i8p)
        a_rows = [
            builder.gep(a_base, [builder.mul(lda, ir.Constant(_i64, r))])
            for r in range(MR)
        ]
        ldc4 = builder.mul(ldc, ir.Constant(_i64, 4))
        c_ptrs = []
        for r in range(MR):
            c_row = builder.gep(c_base, [builder.mul(ldc4, ir.Constant(_i64, r))])
            for v in range(NV):
                p = builder.gep(c_row, [ir.Constant(_i64, 64 * v)])
                c_ptrs.append(builder.bitcast(p, _vf.as_pointer()))
        # initial accumulators: 0, or the tile in c (K blocking)
        use_c = builder.icmp_signed("!=", accum, zero64)
        init = [
            builder.select(use_c, builder.load(p, align=4), ir.Constant(_vf, None))
            for p in c_ptrs
        ]

        def kstep(kphi, phis):
            b_row = builder.gep(b_base, [builder.mul(kphi, ir.Constant(_i64, step_b))])
            a_off = builder.mul(kphi, step_a)
            if kind in ("f16", "f32"):
                return fma_step(builder, phis, a_rows, a_off, b_row, kind)
            dp = _dpbf16(context, builder)
            new = []
            bvecs = []
            for v in range(NV):
                p = builder.gep(b_row, [ir.Constant(_i64, 64 * v)])
                bvecs.append(
                    builder.load(builder.bitcast(p, _vbf.as_pointer()), align=4)
                )
            for r in range(MR):
                p = builder.bitcast(builder.gep(a_rows[r], [a_off]), _i32.as_pointer())
                av = builder.bitcast(
                    _splat(builder, builder.load(p, align=2), _vi), _vbf
                )
                for v in range(NV):
                    new.append(dp(phis[r * NV + v], av, bvecs[v]))
            return new

        if split:
            # strips of SV 16-column vectors: enough independent FMA chains
            # (>= 8 ymm) for 1 or 2 rows, at most 15 live registers for more
            SV = {1: 4, 2: 2}.get(MR, 1)
            hi16 = ir.Constant(_vi, [-65536] * 16)
            sh16 = ir.Constant(_vi, [16] * 16)

            def bf16_strip(kphi, phis, b_row, v0):
                # k pair kphi: B's 16 pairs a vector, A's two float32 per row.
                # The odd halves for every row, then the even halves from a
                # second load of the same pairs (an opaque address, so LLVM
                # does not keep the first): 12 sums + 4 widened vectors + a
                # broadcast + a product did not fit AVX2's 16 ymm and spilled
                # (1 thread, Zen 3: 128x768x3072 49 -> 71 GFLOP/s, 16x384x1536
                # 51 -> 70, 1024^3 68 -> 70; peak 103)
                a_off = builder.mul(kphi, ir.Constant(_i64, 8))
                new = list(phis)
                fmaf = _fma(builder)

                def widen(op, row):
                    out = []
                    for v in range(v0, v0 + SV):
                        p = builder.gep(row, [ir.Constant(_i64, 64 * v)])
                        x = builder.load(builder.bitcast(p, _vi.as_pointer()), align=4)
                        out.append(builder.bitcast(op(x), _vf))
                    return out

                for half, op in (
                    (4, lambda x: builder.and_(x, hi16)),
                    (0, lambda x: builder.shl(x, sh16)),
                ):
                    if half == 0:  # reload: an opaque copy of the address
                        fnty = ir.FunctionType(b_row.type, [b_row.type])
                        row = builder.asm(fnty, "", "=r,0", [b_row], False)
                    else:
                        row = b_row
                    bvs = widen(op, row)
                    for r in range(MR):
                        q = builder.gep(
                            a_rows[r], [builder.add(a_off, ir.Constant(_i64, half))]
                        )
                        q = builder.bitcast(q, _f32.as_pointer())
                        av = _splat(builder, builder.load(q, align=4), _vf)
                        for j, bv in enumerate(bvs):
                            i = r * SV + j
                            if fma:
                                new[i] = builder.call(fmaf, [av, bv, new[i]])
                            else:
                                new[i] = builder.fadd(new[i], builder.fmul(av, bv))
                return new

            for v0 in range(0, NV, SV):  # strip: columns 16 v0 .. 16 (v0 + SV)

                def strip(kphi, phis, v0=v0):
                    b_row = builder.gep(
                        b_base, [builder.mul(kphi, ir.Constant(_i64, step_b))]
                    )
                    if kind == "bf16":
                        return bf16_strip(kphi, phis, b_row, v0)
                    fma = _fma(builder)
                    bvs = []
                    for v in range(v0, v0 + SV):
                        p = builder.gep(b_row, [ir.Constant(_i64, 32 * v)])
                        h = builder.load(builder.bitcast(p, _vh.as_pointer()), align=2)
                        bvs.append(builder.fpext(h, _vf))
                    a_off = builder.mul(kphi, step_a)
                    new = []
                    for r in range(MR):
                        q = builder.gep(a_rows[r], [a_off])
                        q = builder.bitcast(q, _f32.as_pointer())
                        av = _splat(builder, builder.load(q, align=4), _vf)
                        for j, bv in enumerate(bvs):
                            new.append(builder.call(fma, [av, bv, phis[r * SV + j]]))
                    return new

                mine = [init[r * NV + v] for r in range(MR) for v in range(v0, v0 + SV)]
                fin = _ir_loop(builder, zero64, ks, mine, strip, name="half16")
                for r in range(MR):
                    for j in range(SV):
                        builder.store(fin[r * SV + j], c_ptrs[r * NV + v0 + j], align=4)
            return context.get_dummy_value()
        fin = _ir_loop(builder, zero64, ks, init, kstep, name="half")
        for p, ptr in zip(fin, c_ptrs, strict=True):
            builder.store(p, ptr, align=4)
        return context.get_dummy_value()

    i = types.int64

    @intrinsic
    def _tile(typingctx, a, lda, b, ks, c, ldc, accum):
        return types.void(i, i, i, i, i, i, i), codegen

    return _tile


# module-level intrinsics (numba's cache refers to them by name)
_h1 = make_tile_kernel(1, "f16")
_h2 = make_tile_kernel(2, "f16")
_h3 = make_tile_kernel(3, "f16")
_h4 = make_tile_kernel(4, "f16")
_h5 = make_tile_kernel(5, "f16")
_h6 = make_tile_kernel(6, "f16")
# avx2_f16c: the same tiles as 16-column strips (make_tile_kernel's split)
_y1 = make_tile_kernel(1, "f16", split=True)
_y2 = make_tile_kernel(2, "f16", split=True)
_y3 = make_tile_kernel(3, "f16", split=True)
_y4 = make_tile_kernel(4, "f16", split=True)
_y5 = make_tile_kernel(5, "f16", split=True)
_y6 = make_tile_kernel(6, "f16", split=True)
# avx2_f16c, bfloat16: float32 A rows, B's pairs widened in registers
_z1 = make_tile_kernel(1, "bf16", split=True)
_z2 = make_tile_kernel(2, "bf16", split=True)
_z3 = make_tile_kernel(3, "bf16", split=True)
_z4 = make_tile_kernel(4, "bf16", split=True)
_z5 = make_tile_kernel(5, "bf16", split=True)
_z6 = make_tile_kernel(6, "bf16", split=True)
# the same with FMAs, for calls whose products are all exact
_e1 = make_tile_kernel(1, "bf16", split=True, fma=True)
_e2 = make_tile_kernel(2, "bf16", split=True, fma=True)
_e3 = make_tile_kernel(3, "bf16", split=True, fma=True)
_e4 = make_tile_kernel(4, "bf16", split=True, fma=True)
_e5 = make_tile_kernel(5, "bf16", split=True, fma=True)
_e6 = make_tile_kernel(6, "bf16", split=True, fma=True)
_b1 = make_tile_kernel(1, "bf16")
_b2 = make_tile_kernel(2, "bf16")
_b3 = make_tile_kernel(3, "bf16")
_b4 = make_tile_kernel(4, "bf16")
_b5 = make_tile_kernel(5, "bf16")
_b6 = make_tile_kernel(6, "bf16")
assert MR_MAX == 6


@njit(inline="always")
def _run_tile_h(mr, a, lda, b, ks, c, ldc, accum, split):
    if split:  # avx2_f16c
        _run_tile_y(mr, a, lda, b, ks, c, ldc, accum)
    elif mr == 6:
        _h6(a, lda, b, ks, c, ldc, accum)
    elif mr == 5:
        _h5(a, lda, b, ks, c, ldc, accum)
    elif mr == 4:
        _h4(a, lda, b, ks, c, ldc, accum)
    elif mr == 3:
        _h3(a, lda, b, ks, c, ldc, accum)
    elif mr == 2:
        _h2(a, lda, b, ks, c, ldc, accum)
    else:
        _h1(a, lda, b, ks, c, ldc, accum)


@njit(inline="always")
def _run_tile_y(mr, a, lda, b, ks, c, ldc, accum):
    if mr == 6:
        _y6(a, lda, b, ks, c, ldc, accum)
    elif mr == 5:
        _y5(a, lda, b, ks, c, ldc, accum)
    elif mr == 4:
        _y4(a, lda, b, ks, c, ldc, accum)
    elif mr == 3:
        _y3(a, lda, b, ks, c, ldc, accum)
    elif mr == 2:
        _y2(a, lda, b, ks, c, ldc, accum)
    else:
        _y1(a, lda, b, ks, c, ldc, accum)


@njit(inline="always")
def _run_tile_z(mr, a, lda, b, ks, c, ldc, accum):
    if mr == 6:
        _z6(a, lda, b, ks, c, ldc, accum)
    elif mr == 5:
        _z5(a, lda, b, ks, c, ldc, accum)
    elif mr == 4:
        _z4(a, lda, b, ks, c, ldc, accum)
    elif mr == 3:
        _z3(a, lda, b, ks, c, ldc, accum)
    elif mr == 2:
        _z2(a, lda, b, ks, c, ldc, accum)
    else:
        _z1(a, lda, b, ks, c, ldc, accum)


@njit(inline="always")
def _run_tile_e(mr, a, lda, b, ks, c, ldc, accum):
    if mr == 6:
        _e6(a, lda, b, ks, c, ldc, accum)
    elif mr == 5:
        _e5(a, lda, b, ks, c, ldc, accum)
    elif mr == 4:
        _e4(a, lda, b, ks, c, ldc, accum)
    elif mr == 3:
        _e3(a, lda, b, ks, c, ldc, accum)
    elif mr == 2:
        _e2(a, lda, b, ks, c, ldc, accum)
    else:
        _e1(a, lda, b, ks, c, ldc, accum)


@njit(inline="always")
def _run_tile_b(mr, a, lda, b, ks, c, ldc, accum, split):
    # split 0: the zmm tiles (vdpbf16ps or its stand-in); 1: the avx2_f16c
    # strips, a multiply and an add per product; 2: the same with FMAs
    if split == 2:
        _run_tile_e(mr, a, lda, b, ks, c, ldc, accum)
    elif split:
        _run_tile_z(mr, a, lda, b, ks, c, ldc, accum)
    elif mr == 6:
        _b6(a, lda, b, ks, c, ldc, accum)
    elif mr == 5:
        _b5(a, lda, b, ks, c, ldc, accum)
    elif mr == 4:
        _b4(a, lda, b, ks, c, ldc, accum)
    elif mr == 3:
        _b3(a, lda, b, ks, c, ldc, accum)
    elif mr == 2:
        _b2(a, lda, b, ks, c, ldc, accum)
    else:
        _b1(a, lda, b, ks, c, ldc, accum)


@njit(**JIT)
def _exponent_span(flat):
    # (lowest, highest) biased exponent over the nonzero values of flat
    # (subnormals count as 1; 0xFF: inf or NaN); (256, 0) if all are zero.
    # ~0.3 ns a value on Zen 3 (a branch a value: 0.6)
    lo, hi = np.int32(256), np.int32(0)
    one, big, zero = np.int32(1), np.int32(256), np.int32(0)
    for i in range(np.uint64(flat.shape[0])):  # unsigned: no wraparound test
        x = np.int32(flat[i])
        e = (x >> np.int32(7)) & np.int32(0xFF)
        nz = (x & np.int32(0x7FFF)) != zero
        lo = min(lo, max(e, one) if nz else big)
        hi = max(hi, e if nz else zero)
    return lo, hi


def bf16_exponents(bits):
    """(lsb, top, finite) over the nonzero bfloat16 values of bits (uint16):
    each such value = integer * 2**e with e >= lsb (lsb is at most 0), and
    |value| < 2**(top + 1); finite: no inf or NaN. (0, -127, True) when every
    value is zero."""
    lo, hi = _exponent_span(np.ascontiguousarray(bits).reshape(-1))
    if lo == 256:  # every value zero
        return 0, -127, True
    return min(0, int(lo) - 134), int(hi) - 127, hi != 0xFF


def bf16_products_exact(ea, eb) -> bool:
    """Whether every product of a bfloat16 value of A and one of B is exact in
    float32, from their bf16_exponents: at most 16 significant bits, so exact
    when its last bit is at or above 2**-149 (float32's subnormal step) and
    |a*b| < 2**(top_a + top_b + 2) <= 2**128 (below FLT_MAX: 16 bits).
    Then fl32(acc + fl32(a*b)) == fma(a, b, acc) for every acc."""
    (la, ta, fa), (lb, tb, fb) = ea, eb
    return fa and fb and la + lb >= -149 and ta + tb <= 126


# ---------------------------------------------------------------------------
# scalar conversions (round to nearest even; NaN stays NaN, quieted)


@njit(inline="always")
def f32_to_f16_bits(x):
    # float32 -> IEEE binary16 bits; overflow -> inf, underflow -> subnormal/0
    u = np.int64(_bits32(np.float32(x)))
    sign = (u >> 16) & 0x8000
    e = np.int64((u >> 23) & 0xFF)
    m = np.int64(u & 0x7FFFFF)
    if e == 0xFF:
        if m == 0:
            return np.uint16(sign | 0x7C00)
        return np.uint16(sign | 0x7E00 | (m >> 13))
    E = e - 112  # e - 127 + 15
    if E >= 31:
        return np.uint16(sign | 0x7C00)
    if E <= 0:
        if E < -10:
            return np.uint16(sign)
        m = m | 0x800000
        shift = 14 - E
        h = m >> shift
        rem = m & ((np.int64(1) << shift) - 1)
        half = np.int64(1) << (shift - 1)
        if rem > half or (rem == half and (h & 1) == 1):
            h += 1
        return np.uint16(sign | h)
    h = (E << 10) | (m >> 13)
    rem = m & 0x1FFF
    if rem > 0x1000 or (rem == 0x1000 and (h & 1) == 1):
        h += 1  # a carry into the exponent is right, up to inf
    return np.uint16(sign | h)


@intrinsic
def _bits32(typingctx, x):
    """float32 -> its uint32 bit pattern (a register bitcast)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _i32)

    return types.uint32(types.float32), codegen


@njit(inline="always")
def f32_to_bf16_bits(x):
    u = np.int64(_bits32(np.float32(x)))
    if (u & 0x7F800000) == 0x7F800000 and (u & 0x7FFFFF) != 0:
        return np.uint16((u >> 16) | 0x40)  # NaN: keep sign/payload, quiet
    return np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)


@njit(**PJIT)
def f32_to_bf16_array(x, out):
    # x (n,) float32 -> out (n,) uint16 bfloat16 bits
    n = x.shape[0]
    for i in prange(n):
        out[i] = f32_to_bf16_bits(x[i])


@intrinsic
def _cvt16(typingctx, src, dst):
    """16 float16 at address src -> 16 float32 at address dst (vcvtph2ps)."""
    sig = types.void(types.int64, types.int64)

    def codegen(context, builder, sig, args):
        src, dst = args
        h = builder.load(builder.inttoptr(src, _vh.as_pointer()), align=2)
        builder.store(
            builder.fpext(h, _vf), builder.inttoptr(dst, _vf.as_pointer()), align=4
        )
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _f16_bits_to_f32(typingctx, h):
    """One float16 (uint16 bits) -> float32, exactly (fpext half)."""
    if h != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], _f16), _f32)

    return types.float32(types.uint16), codegen


@njit(inline="always")
def _f16_row(a, out, m):
    K = a.shape[1]
    K16 = K - K % 16
    src = a.ctypes.data + m * a.strides[0]
    dst = out.ctypes.data + m * out.strides[0]
    for k in range(0, K16, 16):
        _cvt16(src + 2 * k, dst + 4 * k)
    for k in range(K16, K):
        out[m, k] = _f16_bits_to_f32(a[m, k])


@njit(**PJIT)
def f16_to_f32_rows(a, out):
    # a (M, K) uint16 float16 bits, unit column stride -> out (M, K) float32.
    # numpy's astype does this at ~0.25 G values/s here (4 ms for 1024^2, 15%
    # of a 1024^3 GEMM); 16-wide vcvtph2ps streams it (0.07 ms, 1 thread).
    for m in prange(a.shape[0]):
        _f16_row(a, out, m)


@njit(**JIT)
def f16_to_f32_rows_serial(a, out):
    # as f16_to_f32_rows on the calling thread
    for m in range(a.shape[0]):
        _f16_row(a, out, m)


# ---------------------------------------------------------------------------
# epilogue: bias, clamp, output type


@njit(inline="always")
def _epilogue(tile, mr, nc, m0, n0, bias, has_bias, lo, hi, mode, out32, out16):
    # tile (>=mr, >=nc) float32 sums; mode 0: out32 float32, 1: out16 float16
    # bits, 2: out16 bfloat16 bits. v = clamp(fl32(acc + bias)); NaN passes.
    # Two passes: bias and clamp in place on the tile (branch-free selects,
    # vectorized by LLVM), then the store/conversion loop of one mode.
    for r in range(mr):
        t = tile[r]
        for j in range(nc):
            v = t[j]
            if has_bias:
                v = np.float32(v + bias[n0 + j])
            v = lo if v < lo else v
            t[j] = hi if v > hi else v
    if mode == 3:  # bias and clamp only (_epilogue_simd stores)
        return
    if mode == 0:
        for r in range(mr):
            o = out32[m0 + r]
            for j in range(nc):
                o[n0 + j] = tile[r, j]
    elif mode == 1:
        for r in range(mr):
            o = out16[m0 + r]
            for j in range(nc):
                o[n0 + j] = f32_to_f16_bits(tile[r, j])
    else:
        for r in range(mr):
            o = out16[m0 + r]
            for j in range(nc):
                o[n0 + j] = f32_to_bf16_bits(tile[r, j])


@intrinsic
def _f16_from_f32_16(typingctx, src, dst):
    """16 float32 at address src -> 16 float16 at address dst (vcvtps2ph,
    round to nearest even: MXCSR's default; NaN quieted with its payload's top
    bits, as f32_to_f16_bits). F16C paths only: without F16C LLVM would call a
    conversion routine."""

    def codegen(context, builder, sig, args):
        src, dst = args
        x = builder.load(builder.inttoptr(src, _vf.as_pointer()), align=4)
        builder.store(
            builder.fptrunc(x, _vh), builder.inttoptr(dst, _vh.as_pointer()), align=2
        )
        return context.get_dummy_value()

    return types.void(types.int64, types.int64), codegen


@njit(inline="always")
def f16_row_store(src, dst, n):
    # src[:n] float32 -> dst[:n] float16 bits (1-D, unit stride): 16 at a time
    # (vcvtps2ph), the rest one by one (f32_to_f16_bits); F16C paths only.
    # The scalar conversion cost ~2.8 ns a value: 128x768x3072 with float16
    # output took 7.8 ms against 6.7 for float32, on 1 thread (Zen 3)
    j = 0
    while j + 16 <= n:
        _f16_from_f32_16(src.ctypes.data + 4 * j, dst.ctypes.data + 2 * j)
        j += 16
    for i in range(j, n):
        dst[i] = f32_to_f16_bits(src[i])


@njit(inline="always")
def _epilogue_simd(tile, mr, nc, m0, n0, bias, has_bias, lo, hi, mode, out32, out16):
    # _epilogue with float16 output converted 16 values at a time
    if mode != 1:
        _epilogue(tile, mr, nc, m0, n0, bias, has_bias, lo, hi, mode, out32, out16)
        return
    _epilogue(tile, mr, nc, m0, n0, bias, has_bias, lo, hi, 3, out32, out16)
    for r in range(mr):
        f16_row_store(tile[r], out16[m0 + r, n0:], nc)


# ---------------------------------------------------------------------------
# SIMD drivers


@njit(inline="always")
def _coords(t, mt, M, N, mr_max, nr):
    # tile t of an N-major order -> (m0, n0, rows, cols, panel)
    jn = t // mt
    m0 = (t - jn * mt) * mr_max
    n0 = jn * nr
    return m0, n0, min(mr_max, M - m0), min(nr, N - n0), jn


@njit(inline="always")
def _job_h(t, mt, a, bp, tile, bias, has_bias, lo, hi, mode, out32, out16, split):
    # one MR_MAX x NR tile of the float16 path over all of K, then the epilogue
    # (split: the avx2_f16c strips)
    N = out32.shape[1] if mode == 0 else out16.shape[1]
    m0, n0, mr, nc, jn = _coords(t, mt, a.shape[0], N, MR_MAX, NR)
    direct = mode == 0 and not has_bias and lo == -np.inf and hi == np.inf
    lda = a.strides[0]
    a0 = a.ctypes.data + m0 * lda
    b0 = bp.ctypes.data + jn * bp.strides[0]
    if direct and nc == NR:
        # plain float32 output: the tile goes straight to out, no epilogue
        c0 = out32.ctypes.data + (m0 * out32.shape[1] + n0) * 4
        _run_tile_h(mr, a0, lda, b0, bp.shape[1], c0, out32.shape[1], 0, split)
        return
    _run_tile_h(mr, a0, lda, b0, bp.shape[1], tile.ctypes.data, NR, 0, split)
    _epilogue_simd(tile, mr, nc, m0, n0, bias, has_bias, lo, hi, mode, out32, out16)


@njit(inline="always")
def _job_b(t, mt, a, bp, tile, bias, has_bias, lo, hi, mode, out32, out16, split):
    # as _job_h for the bfloat16 path (a holds pairs of k as uint32; split:
    # the avx2_f16c strips, a float32 with an even number of columns)
    N = out32.shape[1] if mode == 0 else out16.shape[1]
    m0, n0, mr, nc, jn = _coords(t, mt, a.shape[0], N, MR_MAX, NR)
    direct = mode == 0 and not has_bias and lo == -np.inf and hi == np.inf
    lda = a.strides[0]
    a0 = a.ctypes.data + m0 * lda
    b0 = bp.ctypes.data + jn * bp.strides[0]
    if direct and nc == NR:
        # plain float32 output: the tile goes straight to out, no epilogue
        c0 = out32.ctypes.data + (m0 * out32.shape[1] + n0) * 4
        _run_tile_b(mr, a0, lda, b0, bp.shape[1], c0, out32.shape[1], 0, split)
        return
    _run_tile_b(mr, a0, lda, b0, bp.shape[1], tile.ctypes.data, NR, 0, split)
    _epilogue_simd(tile, mr, nc, m0, n0, bias, has_bias, lo, hi, mode, out32, out16)


# Drivers (the serial ones use scratch[0]: numba.get_thread_id() in a cached
# non-parallel function segfaults when no parallel region has run in the
# process yet: the threading layer that defines it is not loaded).
# a: (M, K) float32 (float16 path) or (M, ceil(K/2)) uint32 bfloat16
# pairs, unit column stride; bp: packed B (pack_b_f16 / pack_b_bf16); scratch
# (threads, MR_MAX, NR) float32; out32 (M, N) float32 when mode == 0, else
# out16 (M, N) uint16 bits (the other one is a dummy). N-major tile order: each
# thread streams its own B panels once and reuses them across the M tiles.


@njit(**PJIT)
def gemm_f16(a, bp, scratch, bias, has_bias, lo, hi, mode, out32, out16, split):
    # split: the avx2_f16c strips (make_tile_kernel), else the zmm tiles
    N = out32.shape[1] if mode == 0 else out16.shape[1]
    mt = (a.shape[0] + MR_MAX - 1) // MR_MAX
    for t in prange(mt * ((N + NR - 1) // NR)):
        tile = scratch[numba.get_thread_id()]
        _job_h(
            t, mt, a, bp, tile, bias, has_bias, lo, hi, mode, out32, out16, split
        )  # fmt: skip


@njit(**JIT)
def gemm_f16_serial(a, bp, scratch, bias, has_bias, lo, hi, mode, out32, out16, split):
    # on the calling thread: tiny problems skip the ~4 us pool launch
    N = out32.shape[1] if mode == 0 else out16.shape[1]
    mt = (a.shape[0] + MR_MAX - 1) // MR_MAX
    for t in range(mt * ((N + NR - 1) // NR)):
        _job_h(
            t, mt, a, bp, scratch[0], bias, has_bias, lo, hi, mode, out32, out16,
            split,
        )  # fmt: skip


@njit(**PJIT)
def gemm_bf16(a, bp, scratch, bias, has_bias, lo, hi, mode, out32, out16, split):
    N = out32.shape[1] if mode == 0 else out16.shape[1]
    mt = (a.shape[0] + MR_MAX - 1) // MR_MAX
    for t in prange(mt * ((N + NR - 1) // NR)):
        tile = scratch[numba.get_thread_id()]
        _job_b(
            t, mt, a, bp, tile, bias, has_bias, lo, hi, mode, out32, out16, split
        )  # fmt: skip


@njit(**JIT)
def gemm_bf16_serial(a, bp, scratch, bias, has_bias, lo, hi, mode, out32, out16, split):
    N = out32.shape[1] if mode == 0 else out16.shape[1]
    mt = (a.shape[0] + MR_MAX - 1) // MR_MAX
    for t in range(mt * ((N + NR - 1) // NR)):
        _job_b(
            t, mt, a, bp, scratch[0], bias, has_bias, lo, hi, mode, out32, out16,
            split,
        )  # fmt: skip


def pack_b_f16(b16):
    """b (K, N) uint16 float16 bits -> [NP][K][NR] uint16, 64-byte aligned."""
    K, N = b16.shape
    NP = (N + NR - 1) // NR
    packed = _aligned((NP, K, NR))
    padded = np.zeros((K, NP * NR), np.uint16)
    padded[:, :N] = b16
    packed[...] = padded.reshape(K, NP, NR).transpose(1, 0, 2)
    packed.flags.writeable = False
    return packed


def pack_b_bf16(b16):
    """b (K, N) uint16 bfloat16 bits -> [NP][K2][NR][2] uint16 (pairs of k)."""
    K, N = b16.shape
    K2 = (K + 1) // 2
    NP = (N + NR - 1) // NR
    packed = _aligned((NP, K2, NR * 2))
    padded = np.zeros((K2 * 2, NP * NR), np.uint16)
    padded[:K, :N] = b16
    # [K2, 2, NP, NR] -> [NP, K2, NR, 2]
    packed[...] = (
        padded.reshape(K2, 2, NP, NR).transpose(2, 0, 3, 1).reshape(NP, K2, NR * 2)
    )
    packed.flags.writeable = False
    return packed


def _aligned(shape):
    n = int(np.prod(shape))
    raw = np.zeros(n + 32, np.uint16)
    off = ((-raw.ctypes.data) % 64) // 2
    return raw[off : off + n].reshape(shape)


# ---------------------------------------------------------------------------
# portable drivers: float32 copies of the inputs, the same order per output


@njit(inline="always")
def _portable_job(t, mt, bf, a, b, tile, bias, has_bias, lo, hi, mode, out32, out16):
    M, K = a.shape
    m0, n0, mr, nc, _ = _coords(t, mt, M, b.shape[1], TM, TN)
    for r in range(mr):
        acc = tile[r]
        for j in range(nc):
            acc[j] = np.float32(0.0)
        am = a[m0 + r]
        if bf:
            # pairs (2i, 2i+1): the odd term first, as vdpbf16ps
            for i in range(K // 2):
                a1 = am[2 * i + 1]
                a0 = am[2 * i]
                b1 = b[2 * i + 1]
                b0 = b[2 * i]
                for j in range(nc):
                    s = np.float32(acc[j] + np.float32(a1 * b1[n0 + j]))
                    acc[j] = np.float32(s + np.float32(a0 * b0[n0 + j]))
            if K % 2 == 1:
                a0 = am[K - 1]
                b0 = b[K - 1]
                for j in range(nc):
                    acc[j] = np.float32(acc[j] + np.float32(a0 * b0[n0 + j]))
        else:
            for k in range(K):
                ak = am[k]
                bk = b[k]
                for j in range(nc):
                    acc[j] = np.float32(acc[j] + np.float32(ak * bk[n0 + j]))
    _epilogue(tile, mr, nc, m0, n0, bias, has_bias, lo, hi, mode, out32, out16)


@njit(**PJIT)
def gemm_portable(bf, a, b, scratch, bias, has_bias, lo, hi, mode, out32, out16):
    # a (M,K) float32, b (K,N) float32 (exact copies of the half inputs),
    # scratch (threads, TM, TN) float32; outputs as gemm_simd
    M = a.shape[0]
    N = b.shape[1]
    mt = (M + TM - 1) // TM
    nt = (N + TN - 1) // TN
    for t in prange(mt * nt):
        _portable_job(
            t,
            mt,
            bf,
            a,
            b,
            scratch[numba.get_thread_id()],
            bias,
            has_bias,
            lo,
            hi,
            mode,
            out32,
            out16,
        )


@njit(**JIT)
def gemm_portable_serial(bf, a, b, scratch, bias, has_bias, lo, hi, mode, out32, out16):
    M = a.shape[0]
    N = b.shape[1]
    mt = (M + TM - 1) // TM
    nt = (N + TN - 1) // TN
    for t in range(mt * nt):
        _portable_job(
            t, mt, bf, a, b, scratch[0], bias, has_bias, lo, hi, mode, out32, out16
        )


# ---------------------------------------------------------------------------
# the machine's peaks, for "% of peak" in benchmarks

_NACC = 12  # independent accumulators: >= latency x throughput of both


def _make_peak_loop(kind):
    # kind: "f16" (vfmadd231ps zmm), "f16y" (ymm: the avx2_f16c path) or "bf16"
    vf = ir.VectorType(_f32, 8) if kind == "f16y" else _vf

    def codegen(context, builder, sig, args):
        iters, seed = args
        x = builder.sitofp(seed, _f32)
        if kind in ("f16", "f16y"):
            op = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vf, [vf] * 3),
                f"llvm.fma.v{vf.count}f32",
            )  # fmt: skip
            b = _splat(builder, x, vf)
            a = _splat(builder, builder.fadd(x, ir.Constant(_f32, 1.0)), vf)
        else:
            op = _dpbf16(context, builder)
            bits = builder.bitcast(x, _i32)
            b = builder.bitcast(_splat(builder, bits, _vi), _vbf)
            a = b

        def step(k, accs):
            if kind in ("f16", "f16y"):
                return [builder.call(op, [a, b, p]) for p in accs]
            return [op(p, a, b) for p in accs]

        init = [ir.Constant(vf, [float(j)] * vf.count) for j in range(_NACC)]
        new = _ir_loop(builder, ir.Constant(_i64, 0), iters, init, step, guard=False,
                       name="pk")  # fmt: skip
        s = new[0]
        for n in new[1:]:
            s = builder.fadd(s, n)
        return builder.extract_element(s, ir.Constant(_i32, 0))

    @intrinsic
    def _loop(typingctx, iters, seed):
        return types.float32(types.int64, types.int64), codegen

    return _loop


_peak_fma = _make_peak_loop("f16")
_peak_fma_y = _make_peak_loop("f16y")
_peak_dp = _make_peak_loop("bf16")


@njit(**PJIT)
def _peak(iters, nthreads, bf):
    out = np.zeros(nthreads, np.float32)
    for t in prange(nthreads):
        out[t] = _peak_dp(iters, t + 3) if bf else _peak_fma(iters, t + 3)
    return out


@njit(parallel=True, nogil=True)  # not cached: only the bench runs it
def _peak_y(iters, nthreads):
    out = np.zeros(nthreads, np.float32)
    for t in prange(nthreads):
        out[t] = _peak_fma_y(iters, t + 3)
    return out


def measure_peak(
    threads: int, bf16: bool, iters: int = 2_000_000, repeat: int = 7, ymm=False
):
    """GFLOP/s of register-only ``vfmadd231ps zmm`` (32 flops each; ymm=True:
    ``vfmadd231ps ymm``, 16, for the avx2_f16c path) or ``vdpbf16ps zmm`` (64
    flops) on ``threads`` threads, best of ``repeat`` (a peak is the
    hardware's: slower samples measure the neighbours)."""
    import time

    if ymm and not bf16:
        peak = _peak_y
    else:
        peak = lambda iters, threads: _peak(iters, threads, bf16)  # noqa: E731
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        peak(1000, threads)
        best = 0.0
        flops = 64 if bf16 else (16 if ymm else 32)
        for _ in range(repeat):
            t0 = time.perf_counter()
            peak(iters, threads)
            dt = time.perf_counter() - t0
            best = max(best, threads * iters * _NACC * flops / dt / 1e9)
        return best
    finally:
        numba.set_num_threads(before)
