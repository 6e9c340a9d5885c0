"""Sub-byte weights on AVX2 without VNNI: ``vpmaddubsw`` on nibbles.

Layout and math: ``kernels/nbits.py`` (quad planes; the int8 path). A 64-byte
quad row is two ymm halves h (columns 8h .. 8h + 7 of each plane's 16, four k
each). vpmaddubsw multiplies unsigned by signed bytes and adds pairs into int16
*with saturation*, so every unsigned operand here is kept to a nibble:

    codes, 2 / 4 bits   the code                    (row >> bits*p) & mask
    codes, 8 bits       its two nibbles             S = S_lo + 16 S_hi
    shared codebooks    the table byte's nibbles    vpshufb(lo / hi table, code)
    (2 / 4 bits)

A pair then sums to at most 2 * 15 * 127 = 3810 in magnitude, and int16 sums
of 8 quads (30480) cannot saturate. Per chunk of 8 (or 4) quads

    acc16[r, part] += vpmaddubsw(operand, broadcast qa[r, 4q : 4q + 4])
    acc32[r, plane] += sum over parts of weight * vpmaddwd(acc16, 1)

(vpmaddwd with ones adds a column's two pairs: one int32 lane per column), and
per block j, in float32 and in the portable kernel's order, bit for bit:

    o[r, n] += (float(acc32) - zp[j, n] * qasum[r, j]) * (sc[j, n] * sa[r, j])

The intrinsics are AVX2's: this module is imported only where the ISA in use
is avx2 or avx_vnni (lowprec.nbits), never compiled for other CPUs.
"""

from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .config import JIT, PJIT
from .ir_util import loop, splat
from .nbits import quantize_rows
from .nbits_vnni import _fn, _ptr  # IR helpers only (no VNNI code compiles)

_i8 = ir.IntType(8)
_i16 = ir.IntType(16)
_i32 = ir.IntType(32)
_i64 = ir.IntType(64)
_f32 = ir.FloatType()
_v8 = ir.VectorType(_i32, 8)
_w16 = ir.VectorType(_i16, 16)
_b32 = ir.VectorType(_i8, 32)
_b16 = ir.VectorType(_i8, 16)
_vf8 = ir.VectorType(_f32, 8)


def _bytes(v):
    return ir.Constant(_v8, [int.from_bytes(bytes([v] * 4), "little")] * 8)


def parts(bits, lut):
    """The unsigned operands a quad row's half gives: [(plane, weight shift)],
    in the order make_tile builds them (module docstring)."""
    P = 8 // bits
    if lut:
        return [(p, s) for p in range(P) for s in (0, 4)]
    if bits == 8:
        return [(0, 0), (0, 4)]
    return [(p, 0) for p in range(P)]


def make_tile(MR, bits, lut, CH):
    """Intrinsic: an MR x G tile (G = 16 * 8 / bits columns) over all blocks,
    chunks of CH quads (8, or 4 for blocks of 16).

    _t(qa, lda, wq, nblk, qpb, sc, sstep, zp, zstep, sa, qs, lds, table, out, ldo)
    all int64, as kernels/nbits_vnni.make_tile: qa (int8 rows, lda bytes
    apart), wq (the group's quad rows), sc / zp (float32 x G per block, sstep /
    zstep bytes apart: 0 repeats block 0), sa / qs (float32 per block, rows
    lds bytes apart), table (16 bytes, lut only), out (float32 rows, ldo bytes
    apart; G columns written).
    """
    P = 8 // bits
    pts = parts(bits, lut)
    NP = len(pts)
    mask = (1 << bits) - 1 if bits < 8 else 0x0F

    def codegen(context, builder, sig, args):
        qa, lda, wq, nblk, qpb, sc, sstep, zp, zstep, sa, qs, lds, table, out, ldo = (
            args
        )
        c64 = lambda x: ir.Constant(_i64, x)  # noqa: E731
        maddubs = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _w16, [_b32, _b32])
        maddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _v8, [_w16, _w16])
        ones = ir.Constant(_w16, [1] * 16)
        if lut:
            shuf = _fn(builder, "llvm.x86.avx2.pshuf.b", _b32, [_b32, _b32])
            t16 = builder.load(_ptr(builder, table, c64(0), _b16), align=1)
            rep = ir.Constant(ir.VectorType(_i32, 32), [i % 16 for i in range(32)])
            t32 = builder.bitcast(builder.shuffle_vector(t16, t16, rep), _v8)
            tabs = (
                builder.bitcast(builder.and_(t32, _bytes(0x0F)), _b32),
                builder.bitcast(
                    builder.and_(builder.lshr(t32, ir.Constant(_v8, [4] * 8)),
                                 _bytes(0x0F)),
                    _b32,
                ),
            )  # fmt: skip

        def operands(row):
            """The NP unsigned byte vectors of one half row (parts order)."""
            ops = []
            for p, s in pts:
                sh = bits * p + (s if not lut else 0)
                x = row if sh == 0 else builder.lshr(row, ir.Constant(_v8, [sh] * 8))
                x = builder.bitcast(builder.and_(x, _bytes(mask)), _b32)
                if lut:
                    x = builder.call(shuf, [tabs[s // 4], x])
                ops.append(x)
            return ops

        def chunk(c, acc32, qbase):
            acc16 = [ir.Constant(_w16, None)] * (MR * 2 * NP)
            for u in range(CH):
                qq = builder.add(qbase, builder.add(builder.mul(c, c64(CH)), c64(u)))
                roff = builder.mul(qq, c64(64))
                ops = []
                for h in range(2):
                    half = _ptr(builder, wq, builder.add(roff, c64(32 * h)), _v8)
                    ops.append(operands(builder.load(half, align=1)))
                koff = builder.mul(qq, c64(4))
                for r in range(MR):
                    aoff = builder.add(builder.mul(lda, c64(r)), koff)
                    a4 = builder.load(_ptr(builder, qa, aoff, _i32), align=1)
                    av = builder.bitcast(splat(builder, a4, _v8), _b32)
                    for h in range(2):
                        for i in range(NP):
                            k = (r * 2 + h) * NP + i
                            prod = builder.call(maddubs, [ops[h][i], av])
                            acc16[k] = builder.add(acc16[k], prod)
            new = list(acc32)
            for r in range(MR):
                for h in range(2):
                    for i, (p, s) in enumerate(pts):
                        x = builder.call(maddwd, [acc16[(r * 2 + h) * NP + i], ones])
                        if s:
                            x = builder.shl(x, ir.Constant(_v8, [s] * 8))
                        k = (r * 2 + h) * P + p
                        new[k] = builder.add(new[k], x)
            return new

        def block(j, fo):
            qbase = builder.mul(j, qpb)
            zero = [ir.Constant(_v8, None)] * (MR * 2 * P)
            nch = builder.udiv(qpb, c64(CH))
            acc = loop(
                builder, c64(0), nch, zero,
                lambda c, a: chunk(c, a, qbase), guard=False, name="ch",
            )  # fmt: skip
            soff = builder.mul(j, sstep)
            zoff = builder.mul(j, zstep)
            j4 = builder.mul(j, c64(4))
            nfo = list(fo)
            for r in range(MR):
                roff = builder.add(builder.mul(lds, c64(r)), j4)
                sa_r = splat(builder, builder.load(_ptr(builder, sa, roff, _f32)), _vf8)
                qs_r = splat(builder, builder.load(_ptr(builder, qs, roff, _f32)), _vf8)
                for h in range(2):
                    for p in range(P):
                        col = c64(64 * p + 32 * h)
                        scv = builder.load(
                            _ptr(builder, sc, builder.add(soff, col), _vf8), align=4
                        )
                        zpv = builder.load(
                            _ptr(builder, zp, builder.add(zoff, col), _vf8), align=4
                        )
                        k = (r * 2 + h) * P + p
                        t = builder.fsub(
                            builder.sitofp(acc[k], _vf8), builder.fmul(zpv, qs_r)
                        )
                        s = builder.fmul(scv, sa_r)
                        nfo[k] = builder.fadd(fo[k], builder.fmul(t, s))
            return nfo

        fo = loop(
            builder, c64(0), nblk, [ir.Constant(_vf8, None)] * (MR * 2 * P), block,
            name="blk",
        )  # fmt: skip
        for r in range(MR):
            for h in range(2):
                for p in range(P):
                    off = builder.add(builder.mul(ldo, c64(r)), c64(64 * p + 32 * h))
                    builder.store(
                        fo[(r * 2 + h) * P + p], _ptr(builder, out, off, _vf8), align=4
                    )
        return context.get_dummy_value()

    @intrinsic
    def _t(typingctx, qa, lda, wq, nblk, qpb, sc, sstep, zp, zstep, sa, qs, lds, table,
           out, ldo):  # fmt: skip
        return types.void(*([types.int64] * 15)), codegen

    return _t


# (bits, lut) -> tiles of 1 .. _rows rows, for chunks of 8 and of 4 quads
_t4_8_1, _t4_8_2 = (make_tile(m, 4, False, 8) for m in (1, 2))
_t4_4_1, _t4_4_2 = (make_tile(m, 4, False, 4) for m in (1, 2))
_t8_8_1, _t8_8_2 = (make_tile(m, 8, False, 8) for m in (1, 2))
_t8_4_1, _t8_4_2 = (make_tile(m, 8, False, 4) for m in (1, 2))
_T2_8, _T2_4 = make_tile(1, 2, False, 8), make_tile(1, 2, False, 4)
_L4_8, _L4_4 = make_tile(1, 4, True, 8), make_tile(1, 4, True, 4)
_L2_8, _L2_4 = make_tile(1, 2, True, 8), make_tile(1, 2, True, 4)


@njit(cache=True, nogil=True)
def _tile(bits, lut, mr, ch8, *a):
    if lut:
        if bits == 4:
            _L4_8(*a) if ch8 else _L4_4(*a)
        else:
            _L2_8(*a) if ch8 else _L2_4(*a)
    elif bits == 4:
        if mr == 2:
            _t4_8_2(*a) if ch8 else _t4_4_2(*a)
        else:
            _t4_8_1(*a) if ch8 else _t4_4_1(*a)
    elif bits == 8:
        if mr == 2:
            _t8_8_2(*a) if ch8 else _t8_4_2(*a)
        else:
            _t8_8_1(*a) if ch8 else _t8_4_1(*a)
    else:
        _T2_8(*a) if ch8 else _T2_4(*a)


@njit(cache=True, nogil=True)
def _rows(bits, lut):
    # rows per tile: 2 halves x len(parts) int16 accumulators a row, two rows
    # where that is at most 8 of the 16 ymm registers (the rest hold the row,
    # its operands and the broadcasts); the 2-bit codebooks' one row has 16
    # (and spills some: a rare format, left so)
    return 2 if (not lut and bits in (4, 8)) else 1


@njit(**PJIT)
def run(qa, ascale, qasum, wq, sc, sstride, zp, zstride, bits, bs, table, lut, out):
    # qa (M, Kp) int8, ascale/qasum (M, nblk) f32, wq (ng, Kp/4, 64) u8,
    # sc/zp (ng, *, G) f32, table (16,) u8 (read when lut) -> out (M, ng*G)
    M = qa.shape[0]
    ng, nq, _ = wq.shape
    G = sc.shape[2]
    qpb = bs // 4
    nblk = nq // qpb
    mr_max = _rows(bits, lut)
    ch8 = qpb % 8 == 0
    for g in prange(ng):
        m0 = 0
        while m0 < M:
            mr = min(mr_max, M - m0)
            _tile(
                bits, lut, mr, ch8,
                qa.ctypes.data + m0 * qa.strides[0], qa.strides[0],
                wq.ctypes.data + g * wq.strides[0], nblk, qpb,
                sc.ctypes.data + g * sc.strides[0], sstride * sc.strides[1],
                zp.ctypes.data + g * zp.strides[0], zstride * zp.strides[1],
                ascale.ctypes.data + m0 * ascale.strides[0],
                qasum.ctypes.data + m0 * qasum.strides[0], ascale.strides[0],
                table.ctypes.data,
                out.ctypes.data + m0 * out.strides[0] + g * G * 4, out.strides[0],
            )  # fmt: skip
            m0 += mr


@njit(**JIT)
def run_quantizing(a, wq, sc, sstride, zp, zstride, bits, bs, table, lut, out):
    # a (M, K) float32: quantized per block here (kernels/nbits.py), then run()
    # (one dispatch and no scratch per call, as nbits_vnni.run_quantizing)
    qa, ascale, qasum, ok = quantize_rows(a, wq.shape[1] * 4, bs)
    if not ok:
        return False  # non-finite activations: the caller raises
    run(qa, ascale, qasum, wq, sc, sstride, zp, zstride, bits, bs, table, lut, out)
    return True
