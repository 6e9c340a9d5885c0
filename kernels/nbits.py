"""Sub-byte weights (MatMulNBits blocks, codebooks): portable numba kernels.

One packed layout serves every kernel here and in ``nbits_vnni.py`` ("quad
planes", built once by ``lowprec.nbits``):

    bits b in {2, 4, 8}, P = 8 // b planes per byte, G = 16 * P columns per group
    wq[g, q, 4*L + r]   uint8 (ngroups, Kp/4, 64); bits [b*p, b*p + b) hold the
                        code of weight (k = 4q + r, n = G*g + 16p + L)

so one 64-byte row gives, after a shift and a mask, P vectors of 16 columns x
4 consecutive k: the operand layout of ``vpdpbusd``. K is padded to whole
blocks (Kp) with code 0; the activations' padding is 0, so padding adds 0.

Per block j of ``bs`` k (scale s[n, j], zero point z[n, j], codes c[k, n]):

    float path   y[m, n] = sum_j s[n, j] * sum_{k in j} a[m, k] * (c[k, n] - z[n, j])
    int8 path    a[m, k] ~ qa[m, k] * sa[m, j], qa = rint(a / sa) in [-127, 127],
                 sa = max|a[m, j-block]| / 127 (MLAS's accuracy level 4), then
                 y[m, n] += (float(sum qa*c) - z * sum qa) * (s[n, j] * sa[m, j])
                 block by block in float32 (the integer part is exact).
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .config import JIT, PJIT
from .ir_util import loop, splat

_i8 = ir.IntType(8)
_i32 = ir.IntType(32)
_i64 = ir.IntType(64)
_f32 = ir.FloatType()
_vi = ir.VectorType(_i32, 16)
_vf = ir.VectorType(_f32, 16)


@intrinsic
def _quantize_blocks(typingctx, src, nb, bs, dst, sa, qs):
    """Blocks 0 .. nb-1 of bs floats (bs % 16 == 0) at src: per block
    sa = max|a| / 127, dst = clamp(rint(a * (1 / sa)), +-127) as int8 (0 where
    sa = 0, and for a = 0 where 1 / sa overflows), qs = float(sum dst): the
    scalar loop's arithmetic, 16 lanes a step (the scalar loop took 7 us for
    4096 floats, most of a GEMV's fixed cost). All int64 addresses; returns
    the largest |a| bit pattern (>= 0x7F800000 when a NaN or infinity was
    seen)."""

    def codegen(context, builder, sig, args):
        src, nb, bs, dst, sa, qs = args
        c64 = lambda x: ir.Constant(_i64, x)  # noqa: E731
        mod = builder.module
        fn = lambda name, ret, a: mod.declare_intrinsic(  # noqa: E731
            name, fnty=ir.FunctionType(ret, a)
        )
        smax = fn("llvm.smax.v16i32", _vi, [_vi, _vi])
        rmax = fn("llvm.vector.reduce.smax.v16i32", _i32, [_vi])
        radd = fn("llvm.vector.reduce.add.v16i32", _i32, [_vi])
        rint = fn("llvm.rint.v16f32", _vf, [_vf])
        nv = builder.sdiv(bs, c64(16))
        absmask = splat(builder, ir.Constant(_i32, 0x7FFFFFFF), _vi)
        hi = splat(builder, ir.Constant(_f32, 127.0), _vf)
        lo = splat(builder, ir.Constant(_f32, -127.0), _vf)

        def vec(base, i, ty, step):
            off = builder.add(base, builder.mul(i, c64(step)))
            return builder.inttoptr(off, ty.as_pointer())

        def block(j, vals):
            (seen,) = vals
            a0 = builder.add(src, builder.mul(j, builder.mul(bs, c64(4))))
            q0 = builder.add(dst, builder.mul(j, bs))

            def amax(i, m):
                v = builder.load(vec(a0, i, _vi, 64), align=4)
                return [builder.call(smax, [m[0], builder.and_(v, absmask)])]

            (mv,) = loop(
                builder, c64(0), nv, [ir.Constant(_vi, None)], amax, guard=False
            )
            mx = builder.call(rmax, [mv])
            s = builder.fdiv(builder.bitcast(mx, _f32), ir.Constant(_f32, 127.0))
            pos = builder.fcmp_ordered(">", s, ir.Constant(_f32, 0.0))
            inv = builder.select(
                pos, builder.fdiv(ir.Constant(_f32, 1.0), s), ir.Constant(_f32, 0.0)
            )
            invv = splat(builder, inv, _vf)

            def quant(i, t):
                x = builder.fmul(builder.load(vec(a0, i, _vf, 64), align=4), invv)
                x = builder.call(rint, [x])
                # 0 * inf = NaN where the scale is subnormal (1 / s = inf):
                # 0, as the scalar loop and the CUDA kernel
                nan = builder.fcmp_unordered("uno", x, x)
                x = builder.select(nan, ir.Constant(_vf, None), x)
                # numba's min(max(x, -127), 127) for a number x
                x = builder.select(builder.fcmp_ordered("<", x, lo), lo, x)
                x = builder.select(builder.fcmp_ordered(">", x, hi), hi, x)
                q = builder.fptosi(x, _vi)
                builder.store(
                    builder.trunc(q, ir.VectorType(_i8, 16)),
                    vec(q0, i, ir.VectorType(_i8, 16), 16),
                    align=1,
                )
                return [builder.add(t[0], q)]

            (tv,) = loop(
                builder, c64(0), nv, [ir.Constant(_vi, None)], quant, guard=False
            )
            so = builder.mul(j, c64(4))
            builder.store(s, builder.inttoptr(builder.add(sa, so), _f32.as_pointer()))
            builder.store(
                builder.sitofp(builder.call(radd, [tv]), _f32),
                builder.inttoptr(builder.add(qs, so), _f32.as_pointer()),
            )
            return [builder.call(fn("llvm.smax.i32", _i32, [_i32, _i32]), [seen, mx])]

        (seen,) = loop(builder, c64(0), nb, [ir.Constant(_i32, 0)], block)
        return builder.sext(seen, _i64)

    return types.int64(*([types.int64] * 6)), codegen


@njit(**JIT)
def quantize_rows_blockwise(a, bs, qa, ascale, qasum):
    # a (M, K) float32 -> qa (M, Kp) int8 (zero past K), ascale (M, nblk) f32,
    # qasum (M, nblk) f32 (as float: the kernels' epilogue operand).
    # Returns False if a holds NaN or +-inf (x * 0 is NaN exactly then).
    M, K = a.shape
    Kp = qa.shape[1]
    probe = np.float32(0.0)
    # whole blocks of a contiguous row: 16 lanes a step (_quantize_blocks)
    unit = (
        a.strides[1] == 4 and qa.strides[1] == 1
        and ascale.strides[1] == 4 and qasum.strides[1] == 4
    )  # fmt: skip
    nfast = K // bs if unit and bs % 16 == 0 else 0
    for m in range(M):
        if nfast:
            seen = _quantize_blocks(
                a.ctypes.data + m * a.strides[0], nfast, bs,
                qa.ctypes.data + m * qa.strides[0],
                ascale.ctypes.data + m * ascale.strides[0],
                qasum.ctypes.data + m * qasum.strides[0],
            )  # fmt: skip
            if seen >= 0x7F800000:
                probe = np.float32(np.nan)
        for j in range(nfast, Kp // bs):
            k1 = min((j + 1) * bs, K)
            amax = np.float32(0.0)
            for k in range(j * bs, k1):
                amax = max(amax, abs(a[m, k]))
                probe += a[m, k] * np.float32(0.0)
            s = amax / np.float32(127.0)
            inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
            total = 0
            for k in range(j * bs, k1):
                f = np.rint(a[m, k] * inv)
                # NaN: 0 * inf with a subnormal scale (1 / s = inf): 0
                q = np.float32(0.0)
                if f == f:
                    q = min(max(f, np.float32(-127.0)), np.float32(127.0))
                qa[m, k] = np.int8(q)
                total += np.int32(q)
            for k in range(max(k1, j * bs), (j + 1) * bs):
                qa[m, k] = 0
            ascale[m, j] = s
            qasum[m, j] = np.float32(total)
    return probe == 0


@njit(**JIT)
def quantize_rows(a, Kp, bs):
    # quantize_rows_blockwise into new arrays: (qa (M, Kp) int8, ascale,
    # qasum (M, Kp // bs) f32, False where a holds NaN or +-inf)
    M = a.shape[0]
    qa = np.empty((M, Kp), np.int8)
    ascale = np.empty((M, Kp // bs), np.float32)
    qasum = np.empty((M, Kp // bs), np.float32)
    ok = quantize_rows_blockwise(a, bs, qa, ascale, qasum)
    return qa, ascale, qasum, ok


@njit(**JIT)
def repeat_quads(a, arep):
    # arep[m, q, i] = a[m, 4q + (i & 3)]: the activations in the lanes of a
    # quad row, so the float kernel's inner loop is contiguous (it did not
    # vectorize with the (i & 3) index: 2.7 ms -> see nbits_f32)
    M, nq, _ = arep.shape
    for m in range(M):
        for q in range(nq):
            for i in range(64):
                arep[m, q, i] = a[m, 4 * q + (i & 3)]


@njit(**PJIT)
def nbits_f32(arep, wq, sc, zp, zstride, bits, bs, out):
    # arep (M, Kp/4, 64) f32 (repeat_quads), wq (ng, Kp/4, 64) u8,
    # sc (ng, nblk, G) f32, zp (ng, nz, G) f32 (block j at row j*zstride),
    # out (M, ng*G) f32
    M = arep.shape[0]
    ng, nq, _ = wq.shape
    G = sc.shape[2]
    P = G // 16
    mask = (1 << bits) - 1
    qpb = bs // 4
    for g in prange(ng):
        acc = np.empty((P, 64), np.float32)
        zx = np.empty((P, 64), np.float32)
        for m in range(M):
            o = np.zeros(G, np.float32)
            for j in range(nq // qpb):
                for p in range(P):
                    for i in range(64):
                        zx[p, i] = zp[g, j * zstride, 16 * p + (i >> 2)]
                acc[:] = 0
                for q in range(j * qpb, (j + 1) * qpb):
                    w = wq[g, q]
                    ar = arep[m, q]
                    for p in range(P):
                        sh = bits * p
                        ap = acc[p]
                        zp_ = zx[p]
                        for i in range(64):
                            ap[i] += ar[i] * (np.float32((w[i] >> sh) & mask) - zp_[i])
                for p in range(P):
                    for L in range(16):
                        i = 4 * L
                        s = acc[p, i] + acc[p, i + 1] + acc[p, i + 2] + acc[p, i + 3]
                        o[16 * p + L] += s * sc[g, j, 16 * p + L]
            for n in range(G):
                out[m, g * G + n] = o[n]


@njit(**PJIT)
def nbits_i8(
    qa, ascale, qasum, wq, sc, sstride, zp, zstride, bits, bs, lut, use_lut, out
):
    # qa (M, Kp) int8, ascale/qasum (M, nblk) f32; sc/zp block j at row
    # j*sstride / j*zstride; lut (ng, G, 2**bits) int32
    # (weight byte of code c in column n; only read when use_lut) -> out (M, ng*G)
    M = qa.shape[0]
    ng, nq, _ = wq.shape
    G = sc.shape[2]
    P = G // 16
    mask = (1 << bits) - 1
    qpb = bs // 4
    for g in prange(ng):
        acc = np.empty((P, 64), np.int32)
        for m in range(M):
            o = np.zeros(G, np.float32)
            for j in range(nq // qpb):
                acc[:] = 0
                for q in range(j * qpb, (j + 1) * qpb):
                    for p in range(P):
                        sh = bits * p
                        if use_lut:
                            for i in range(64):
                                c = lut[
                                    g, 16 * p + (i >> 2), (wq[g, q, i] >> sh) & mask
                                ]
                                acc[p, i] += np.int32(qa[m, 4 * q + (i & 3)]) * c
                        else:
                            for i in range(64):
                                c = np.int32((wq[g, q, i] >> sh) & mask)
                                acc[p, i] += np.int32(qa[m, 4 * q + (i & 3)]) * c
                sa = ascale[m, j]
                for p in range(P):
                    for L in range(16):
                        n = 16 * p + L
                        i = 4 * L
                        t = np.float32(
                            acc[p, i] + acc[p, i + 1] + acc[p, i + 2] + acc[p, i + 3]
                        )
                        t = t - zp[g, j * zstride, n] * qasum[m, j]
                        o[n] = o[n] + t * (sc[g, j * sstride, n] * sa)
            for n in range(G):
                out[m, g * G + n] = o[n]


@njit(**PJIT)
def codebook_f32(a, wq, lut, bits, out):
    # float activations x codebook weights: lut (ng, G, 2**bits) f32 holds each
    # column's codebook; y[m, n] = sum_k a[m, k] * lut[n, c[k, n]]
    M = a.shape[0]
    ng, nq, _ = wq.shape
    G = lut.shape[1]
    P = G // 16
    mask = (1 << bits) - 1
    for g in prange(ng):
        acc = np.empty((P, 64), np.float32)
        for m in range(M):
            acc[:] = 0
            for q in range(nq):
                for p in range(P):
                    sh = bits * p
                    for i in range(64):
                        c = (wq[g, q, i] >> sh) & mask
                        acc[p, i] += (
                            a[m, 4 * q + (i & 3)] * lut[g, 16 * p + (i >> 2), c]
                        )
            for p in range(P):
                for L in range(16):
                    i = 4 * L
                    s = acc[p, i] + acc[p, i + 1] + acc[p, i + 2] + acc[p, i + 3]
                    out[m, g * G + 16 * p + L] = s
