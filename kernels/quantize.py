"""Quantize / dequantize kernels (ONNX QuantizeLinear / DequantizeLinear).

The public layer reshapes x to (P, C, Q) with C the quantization axis, and the
scale and zero point to (Ps, Cs, Qs) with Ps in {1, P}, Qs in {1, Q} and
Cs = ceil(C / block) (block = C for per-tensor, 1 for per-axis). Element
(p, c, q) then uses parameter (p or 0, c // block, q or 0).
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .config import JIT, PJIT
from .ir_util import loop as _ir_loop
from .ir_util import splat as _splat
from .ir_util import target_has

_f32 = ir.FloatType()
_i32 = ir.IntType(32)
_i64 = ir.IntType(64)
_LANES = 16
_UNROLL = 4
_vf = ir.VectorType(_f32, _LANES)


@njit(**PJIT)
def quantize_linear(x, scale, zero_point, block, qmin, qmax, out):
    # x (P,C,Q) float32, scale (Ps,Cs,Qs) float32, zero_point (Ps,Cs,Qs) int32,
    # out (P,C,Q) uint8|int8|uint16|int16
    # y = saturate(rint(x / scale) + zero_point), quotient in float32 as ONNX's
    # reference computes it; NaN -> zero_point, +-inf saturate (docs/quantization.md).
    P, C, Q = x.shape
    Ps, Cs, Qs = scale.shape
    for pcu in prange(P * C):
        pc = np.int64(pcu)  # prange indices may be unsigned; keep index math signed
        p = pc // C
        c = pc % C
        ps = p if Ps > 1 else 0
        cs = c // block
        for q in range(Q):
            qs = q if Qs > 1 else 0
            v = x[p, c, q] / scale[ps, cs, qs]
            zp = np.float64(zero_point[ps, cs, qs])
            if v != v:
                r = zp
            else:
                r = np.rint(np.float64(v)) + zp
                r = min(max(r, qmin), qmax)
            out[p, c, q] = r


@njit(**PJIT)
def dequantize_linear(x, scale, zero_point, block, out):
    # x (P,C,Q) integer, scale (Ps,Cs,Qs) float32|float16, zero_point (Ps,Cs,Qs)
    # int32, out (P,C,Q) float32
    # y = (float32(x) - zero_point) * scale, evaluated in float64 and rounded
    # once to float32: identical to ONNX's float32 arithmetic for 8/16-bit x
    # (every intermediate is exact) and to its float64 promotion for int32 x.
    P, C, Q = x.shape
    Ps, Cs, Qs = scale.shape
    for pcu in prange(P * C):
        pc = np.int64(pcu)  # prange indices may be unsigned; keep index math signed
        p = pc // C
        c = pc % C
        ps = p if Ps > 1 else 0
        cs = c // block
        for q in range(Q):
            qs = q if Qs > 1 else 0
            xv = np.float64(np.float32(x[p, c, q]))
            d = xv - np.float64(zero_point[ps, cs, qs])
            out[p, c, q] = np.float32(d * np.float64(scale[ps, cs, qs]))


@njit(inline="always")
def _key(u):
    # float32 bits (as int32) -> an int32 that orders like the float: integer
    # min/max reductions vectorize; float ones do not (NaN rules), measured
    # 1.45 -> 0.1 ns per element
    return u ^ ((u >> 31) & 0x7FFFFFFF)


# Keys of +inf and -inf: a NaN's key lies beyond the infinity of its sign, and
# every finite float's strictly between the two.
_KEY_POS_INF = np.int32(0x7F800000)
_KEY_NEG_INF = np.int32(0x7F800000 - 0x80000000) ^ np.int32(0x7FFFFFFF)


@njit(inline="always")
def _min_max_keys(xs):
    # xs (n,) int32 float bits -> (min key, max key, any non-finite). The
    # non-finite test reads the two extreme keys, not every element: the loop
    # is a key transform, a min and a max (measured 1.8M floats, 1 thread:
    # 171 -> 83 us)
    mn = np.int32(0x7FFFFFFF)
    mx = np.int32(-0x80000000)
    for i in range(xs.shape[0]):
        k = np.int32(_key(xs[i]))
        mn = min(mn, k)
        mx = max(mx, k)
    nonfinite = np.int32(mx >= _KEY_POS_INF or mn <= _KEY_NEG_INF)
    return mn, mx, nonfinite


@njit(inline="always")
def _floats(kmin, kmax):
    ends = np.empty(2, np.int32)
    ends[0] = _key(kmin)  # the map is its own inverse
    ends[1] = _key(kmax)
    f = ends.view(np.float32)
    return f[0], f[1]


@njit(**PJIT)
def min_max(x, block):
    # x (n,) float32 -> (min, max, all finite) in one pass over memory
    n = x.shape[0]
    nb = (n + block - 1) // block
    lo = np.empty(nb, np.int32)
    hi = np.empty(nb, np.int32)
    bad = np.zeros(nb, np.int32)
    bits = x.view(np.int32)
    for b in prange(nb):
        lo[b], hi[b], bad[b] = _min_max_keys(
            bits[b * block : min(b * block + block, n)]
        )
    f0, f1 = _floats(lo.min(), hi.max())
    return f0, f1, bad.max() == 0


@njit(**JIT)
def min_max_serial(x):
    # min_max on the calling thread: one block of work is not worth a parallel
    # launch, which waits for a second core (milliseconds on a loaded machine)
    kmin, kmax, bad = _min_max_keys(x.view(np.int32))
    f0, f1 = _floats(kmin, kmax)
    return f0, f1, bad == 0


@njit(**JIT)
def dynamic_params(lo, hi):
    # ONNX DynamicQuantizeLinear's scale and zero point from the data's float32
    # min and max, step by step in float32 as the reference does (numba's
    # float32 arithmetic: numpy scalar operations cost ~1 us each, and a small
    # dynamic matmul made a dozen of them). -> (scale, zero point float32, ok)
    maxx = max(np.float32(0), hi)
    minx = min(np.float32(0), lo)
    rng = np.float32(1.0) if maxx == minx else np.float32(maxx - minx)
    s = np.float32(rng / np.float32(255))
    ok = s > np.float32(0) and s < np.float32(np.inf)
    if not ok:
        s = np.float32(1)
    zp = np.float32(np.float32(0) - minx / s)
    zp = np.rint(min(max(zp, np.float32(0)), np.float32(255)))
    return s, zp, ok


@njit(**JIT)
def dynamic_quantize_serial(x, out):
    # DynamicQuantizeLinear of a small flat float32 x into uint8 out in one call
    # on the calling thread: min/max, scale / zero point, quantize (the three
    # separate calls cost ~9 us of a 16 x 384 dynamic matmul's ~60).
    # -> (scale, zero point float32, min, max, status): 0 ok, 1 not finite,
    # 2 no float32 scale represents the range
    kmin, kmax, bad = _min_max_keys(x.view(np.int32))
    lo, hi = _floats(kmin, kmax)
    if bad != 0:
        return np.float32(1), np.float32(0), lo, hi, 1
    s, zp, ok = dynamic_params(lo, hi)
    if not ok:
        return s, zp, lo, hi, 2
    _quantize_block(x, s, zp, 0.0, 255.0, out)
    return s, zp, lo, hi, 0


@njit(**PJIT)
def dynamic_quantize_rows(x, out, scale, zero_point):
    # x (M,K) float32 -> out (M,K) uint8, scale (M,) float32, zero_point (M,) int64:
    # ONNX DynamicQuantizeLinear (docs eq. 3) applied to each row on its own, in
    # the same float32 steps as the per-tensor version. False if a row is not finite.
    M, K = x.shape
    ok = np.ones(M, np.bool_)
    for m in prange(M):
        lo = np.float32(0)
        hi = np.float32(0)
        for k in range(K):
            v = x[m, k]
            if v - v != 0:
                ok[m] = False
            lo = min(lo, v)
            hi = max(hi, v)
        rng = np.float32(1) if hi == lo else np.float32(hi - lo)
        s = np.float32(rng / np.float32(255))
        if not (s > 0 and s < np.inf):
            ok[m] = False
            s = np.float32(1)
        zp = np.rint(min(max(np.float32(np.float32(0) - lo / s), np.float32(0)), 255))
        scale[m] = s
        zero_point[m] = np.int64(zp)
        for k in range(K):
            r = np.rint(np.float64(x[m, k] / s)) + zp
            out[m, k] = min(max(r, 0.0), 255.0)
    return ok.all()


def _vf_fn(builder, name, nargs):
    fnty = ir.FunctionType(_vf, [_vf] * nargs)
    return cgutils.get_or_insert_function(builder.module, fnty, name)


@intrinsic
def _quantize_vec(typingctx, xs, os, scale, zf, lof, hif):
    """The 8/16-bit loop of _quantize_block on 16-lane vectors, 64 floats a
    step: os[i] = clamp(roundeven(x[i] / scale) + zf, lof, hif), zf where the
    quotient is NaN. Returns how many leading elements it did (a multiple of
    64; 0 where the target lacks AVX2+FMA or the arrays are not contiguous:
    the caller's scalar loop does the rest).

    The quotient without vdivps for 2**-100 <= scale <= 2**100: with r =
    fl32(1 / scale), q0 = x * r is within an ulp of x / scale, e = x - q0 *
    scale is exact (an FMA) and fl32(q0 + e * r) is the correctly rounded
    quotient (Markstein's theorem; every float32 x with |x / scale| in [1/8,
    512] gave the division's bits for 27 scales, 2.7e9 quotients, and
    tests/test_quantize.py checks near-ties where x * r alone rounds the
    other way). An infinite x makes e NaN: q0 (the quotient's inf) is kept
    then. 1.8M floats to uint8, 1 thread, a Sapphire-Rapids-class Xeon: 420
    us (numba's ymm loop with vdivps) -> 320-340 us, about the min/max pass
    over the same x (250 us) plus the stores; this loop dividing: 405 us."""
    ok = (
        isinstance(xs, types.Array)
        and isinstance(os, types.Array)
        and xs.ndim == os.ndim == 1
        and xs.layout == os.layout == "C"
    )
    f32 = types.float32
    sig = types.int64(xs, os, f32, f32, f32, f32)

    def codegen(context, builder, sig, args):
        if not ok or not target_has(context, "avx2", "fma"):
            return ir.Constant(_i64, 0)
        x_arr, o_arr, scale, zf, lof, hif = args
        xa = cgutils.create_struct_proxy(sig.args[0])(context, builder, value=x_arr)
        oa = cgutils.create_struct_proxy(sig.args[1])(context, builder, value=o_arr)
        n = builder.extract_value(xa.shape, 0)
        out_t = context.get_data_type(sig.args[1].dtype)
        vo = ir.VectorType(out_t, _LANES)
        step = _LANES * _UNROLL
        steps = builder.sdiv(n, ir.Constant(_i64, step))
        one = ir.Constant(_f32, 1.0)
        r = builder.fdiv(one, scale)
        # Markstein's quotient where the scale keeps every step in range
        lo_s = builder.fcmp_ordered(">=", scale, ir.Constant(_f32, 2.0**-100))
        hi_s = builder.fcmp_ordered("<=", scale, ir.Constant(_f32, 2.0**100))
        fast = builder.and_(lo_s, hi_s)
        sv, rv = _splat(builder, scale, _vf), _splat(builder, r, _vf)
        zv, lov, hiv = (_splat(builder, v, _vf) for v in (zf, lof, hif))
        fma = _vf_fn(builder, f"llvm.fma.v{_LANES}f32", 3)
        rnd = _vf_fn(builder, f"llvm.roundeven.v{_LANES}f32", 1)

        def quotient(x, divide):
            if divide:
                return builder.fdiv(x, sv)
            q0 = builder.fmul(x, rv)
            e = builder.call(fma, [builder.fneg(q0), sv, x])
            q1 = builder.call(fma, [e, rv, q0])
            return builder.select(builder.fcmp_unordered("uno", q1, q1), q0, q1)

        def run(divide):
            def body(i, carried):
                for u in range(_UNROLL):
                    off = builder.mul(i, ir.Constant(_i64, step))
                    off = builder.add(off, ir.Constant(_i64, _LANES * u))
                    px = builder.bitcast(builder.gep(xa.data, [off]), _vf.as_pointer())
                    v = quotient(builder.load(px, align=4), divide)
                    y = builder.fadd(builder.call(rnd, [v]), zv)
                    # (compare and select: one vmaxps / vminps each, where
                    # minnum / maxnum add NaN fix-ups: a NaN v is zf below)
                    y = builder.select(builder.fcmp_ordered("<", y, lov), lov, y)
                    y = builder.select(builder.fcmp_ordered(">", y, hiv), hiv, y)
                    y = builder.select(builder.fcmp_unordered("uno", v, v), zv, y)
                    o = builder.fptosi(y, ir.VectorType(_i32, _LANES))
                    o = builder.trunc(o, vo)
                    po = builder.bitcast(builder.gep(oa.data, [off]), vo.as_pointer())
                    builder.store(o, po, align=1)
                return []

            _ir_loop(builder, ir.Constant(_i64, 0), steps, [], body, name="qv")

        with builder.if_else(fast) as (then, otherwise):
            with then:
                run(False)
            with otherwise:
                run(True)
        return builder.mul(steps, ir.Constant(_i64, step))

    return sig, codegen


@njit(inline="always")
def _quantize_block(xs, scale, zero_point, qmin, qmax, os):
    # 8/16-bit outputs round and clamp in float32 (vectorizes twice as wide):
    # rint(v) + zp is exact below 2**24 and saturates either way above it.
    # _quantize_vec does the leading multiple of 64 where it can (zmm-wide,
    # no division), the scalar loop the rest. (A scalar x * (1/scale) with a
    # check and a division where it failed measured 264 vs 214 us for 1.8M
    # floats on Zen 4, where vdivps zmm is ~0.44 cycles per float.)
    if qmax - qmin < 131072.0:
        zf = np.float32(zero_point)
        lof = np.float32(qmin)
        hif = np.float32(qmax)
        zi = np.int32(zero_point)
        done = _quantize_vec(xs, os, scale, zf, lof, hif)
        for i in range(done, xs.shape[0]):
            v = xs[i] / scale
            r = np.rint(v) + zf
            r = lof if r < lof else r
            r = hif if r > hif else r
            os[i] = np.int32(r) if v == v else zi
    else:
        for i in range(xs.shape[0]):
            v = xs[i] / scale
            r = min(max(np.rint(np.float64(v)) + zero_point, qmin), qmax)
            os[i] = r if v == v else zero_point


@njit(**JIT)
def dynamic_quantize_scaled(x, out, sb, mult):
    # dynamic_quantize_serial, and with its scale s the multiplier of eq. 14,
    # mult[n] = fl32(s * sb[n or 0]) as float64 (sb (1|N,) float32): one call
    # where the two cost ~5 us of a 1 x 384 x 16 dynamic matmul
    s, zp, lo, hi, status = dynamic_quantize_serial(x, out)
    scaled_multiplier(s, sb, mult)
    return s, zp, lo, hi, status


@njit(**JIT)
def scaled_multiplier(s, sb, mult):
    # mult (N,) float64 = fl32(s * sb[n]), sb (1|N,) float32 broadcast over N
    one = sb.shape[0] == 1
    for n in range(mult.shape[0]):
        mult[n] = np.float64(np.float32(s * sb[0 if one else n]))


@njit(**PJIT)
def quantize_per_tensor(x, scale, zero_point, block, qmin, qmax, out):
    # x (n,) float32, scale float32, zero_point float64, out (n,) integer:
    # eq. 1 with one scale; blocks of `block` elements per thread task, each a
    # 0-based loop over slices so LLVM vectorizes it (the (P,C,Q) kernel runs a
    # one-element inner loop here: measured ~20x slower than numpy)
    n = x.shape[0]
    for b in prange((n + block - 1) // block):
        s = b * block
        e = min(s + block, n)
        _quantize_block(x[s:e], scale, zero_point, qmin, qmax, out[s:e])


@njit(**JIT)
def quantize_per_tensor_serial(x, scale, zero_point, qmin, qmax, out):
    # quantize_per_tensor on the calling thread (one block: see min_max_serial)
    _quantize_block(x, scale, zero_point, qmin, qmax, out)
