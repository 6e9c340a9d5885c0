"""Sub-byte weights on AVX-512 VNNI: ``vpdpbusd`` straight on the packed codes.

Layout and math: ``kernels/nbits.py`` (quad planes; the int8 path). Per 64-byte
row of ``wq`` (P = 8 / bits planes of 16 columns x 4 k), per plane p:

    w_p = (row >> bits*p) & mask            unsigned codes, the u8 operand
    w_p = vpshufb(table, w_p)               codebooks only (4 bits, one table)
    acc[r, p] = vpdpbusd(acc[r, p], w_p, broadcast qa[r, 4q : 4q + 4])

and at the end of each block j, in float32 and in the portable kernel's order
(so the two agree bit for bit):

    o[r, p] += (float(acc[r, p]) - zp[j, p] * qasum[r, j]) * (sc[j, p] * sa[r, j])

Int accumulators live for one block, float accumulators for the whole K, all
in zmm registers (phi nodes): MR * P of each.
"""

import numpy as np
from llvmlite import ir
from numba import get_thread_id, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .config import JIT, PJIT
from .ir_util import loop, no_unroll, splat
from .nbits import quantize_rows

_i8 = ir.IntType(8)
_i32 = ir.IntType(32)
_i64 = ir.IntType(64)
_f32 = ir.FloatType()
_v16 = ir.VectorType(_i32, 16)
_vf = ir.VectorType(_f32, 16)
_b64 = ir.VectorType(_i8, 64)


def _fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ret, args), name
    )


def _ptr(builder, base, off, ty):
    p = builder.inttoptr(builder.add(base, off), ty.as_pointer())
    return p


def _table64(builder, table):
    """The 16-byte table at address table, repeated 4 times (<64 x i8>): a
    vpshufb table per 128-bit lane, and for vpermb the 16 entries whatever
    the index's bits 4 and 5 hold."""
    t16 = builder.load(
        _ptr(builder, table, ir.Constant(_i64, 0), ir.VectorType(_i8, 16)), align=1
    )
    rep = ir.Constant(ir.VectorType(_i32, 64), [i % 16 for i in range(64)])
    return builder.shuffle_vector(t16, t16, rep)


def make_tile(MR, bits, lut):
    """Intrinsic: an MR x G tile (G = 16 * 8 / bits columns) over all blocks.

    _t(qa, lda, wq, nblk, qpb, sc, sstep, zp, zstep, sa, qs, lds, table, out, ldo)
    all int64; addresses: qa (int8 rows, lda bytes apart), wq (group's quad
    rows), sc / zp (float32 x G per block, sstep / zstep bytes apart: 0 repeats
    block 0), sa / qs (float32 per block, rows lds bytes apart), table (16
    bytes), out (float32 rows, ldo bytes apart; G columns written).
    """
    P = 8 // bits
    # independent vpdpbusd chains per accumulator: its latency (~5 cycles) with
    # only MR*P chains bounded the GEMV (measured 0.102 ms at 4096x4096, 4 bits,
    # 1 row: 2 chains); block sizes >= 16 give >= 4 quads per block
    NCH = 4 if MR == 1 else (2 if MR == 2 else 1)

    def codegen(context, builder, sig, args):
        qa, lda, wq, nblk, qpb, sc, sstep, zp, zstep, sa, qs, lds, table, out, ldo = (
            args
        )
        c64 = lambda x: ir.Constant(_i64, x)  # noqa: E731
        vpd = _fn(builder, "llvm.x86.avx512.vpdpbusd.512", _v16, [_v16, _v16, _v16])
        shuf = _fn(builder, "llvm.x86.avx512.pshuf.b.512", _b64, [_b64, _b64])
        m32 = int.from_bytes(bytes([(1 << bits) - 1] * 4), "little")
        mask = ir.Constant(_v16, [m32] * 16)
        if lut:
            tab = _table64(builder, table)
        fn = builder.function
        pre = builder.block
        zero_f = ir.Constant(_vf, None)
        zero_i = ir.Constant(_v16, None)
        # ---- block loop (float accumulators)
        jloop = fn.append_basic_block("nb.j")
        builder.branch(jloop)
        builder.position_at_end(jloop)
        j = builder.phi(_i64, "j")
        j.add_incoming(c64(0), pre)
        fo = []
        for _ in range(MR * P):
            ph = builder.phi(_vf)
            ph.add_incoming(zero_f, pre)
            fo.append(ph)
        qbase = builder.mul(j, qpb)
        # ---- quad loop (int accumulators)
        jhead = builder.block
        qloop = fn.append_basic_block("nb.q")
        builder.branch(qloop)
        builder.position_at_end(qloop)
        q = builder.phi(_i64, "q")
        q.add_incoming(c64(0), jhead)
        ia = []
        for _ in range(MR * P * NCH):
            ph = builder.phi(_v16)
            ph.add_incoming(zero_i, jhead)
            ia.append(ph)
        new = list(ia)
        for ch in range(NCH):
            qq = builder.add(qbase, builder.add(q, c64(ch)))
            row = builder.load(
                _ptr(builder, wq, builder.mul(qq, c64(64)), _v16), align=1
            )
            planes = []
            for p in range(P):
                if bits == 8:
                    x = row
                elif lut or p == 0:
                    x = builder.and_(
                        builder.lshr(row, ir.Constant(_v16, [bits * p] * 16)), mask
                    )
                else:
                    # the plane in place, = 2**(bits*p) x code: one AND, no shift;
                    # the block sum is divided back exactly (ashr) below
                    x = builder.and_(row, ir.Constant(_v16, [m32 << (bits * p)] * 16))
                if lut:
                    x = builder.bitcast(
                        builder.call(shuf, [tab, builder.bitcast(x, _b64)]), _v16
                    )
                planes.append(x)
            koff = builder.mul(qq, c64(4))
            for r in range(MR):
                a4 = builder.load(
                    _ptr(
                        builder, qa, builder.add(builder.mul(lda, c64(r)), koff), _i32
                    ),
                    align=1,
                )
                av = splat(builder, a4, _v16)
                for p in range(P):
                    i = (r * P + p) * NCH + ch
                    new[i] = builder.call(vpd, [ia[i], planes[p], av])
        qn = builder.add(q, c64(NCH))
        qend = builder.block
        q.add_incoming(qn, qend)
        for ph, x in zip(ia, new, strict=True):
            ph.add_incoming(x, qend)
        qexit = fn.append_basic_block("nb.qx")
        builder.cbranch(builder.icmp_signed("<", qn, qpb), qloop, qexit)
        # the chains' sums (exact integers)
        builder.position_at_end(qexit)
        tot = []
        for i in range(MR * P):
            x = new[i * NCH]
            for ch in range(1, NCH):
                x = builder.add(x, new[i * NCH + ch])
            p = i % P
            if p and not lut and bits != 8:
                x = builder.ashr(x, ir.Constant(_v16, [bits * p] * 16))
            tot.append(x)
        # ---- block epilogue
        soff = builder.mul(j, sstep)
        zoff = builder.mul(j, zstep)
        j4 = builder.mul(j, c64(4))
        nfo = []
        for r in range(MR):
            roff = builder.add(builder.mul(lds, c64(r)), j4)
            sa_r = splat(builder, builder.load(_ptr(builder, sa, roff, _f32)), _vf)
            qs_r = splat(builder, builder.load(_ptr(builder, qs, roff, _f32)), _vf)
            for p in range(P):
                scv = builder.load(
                    _ptr(builder, sc, builder.add(soff, c64(64 * p)), _vf), align=4
                )
                zpv = builder.load(
                    _ptr(builder, zp, builder.add(zoff, c64(64 * p)), _vf), align=4
                )
                t = builder.fsub(
                    builder.sitofp(tot[r * P + p], _vf), builder.fmul(zpv, qs_r)
                )
                s = builder.fmul(scv, sa_r)
                nfo.append(builder.fadd(fo[r * P + p], builder.fmul(t, s)))
        jn = builder.add(j, c64(1))
        jend = builder.block
        j.add_incoming(jn, jend)
        for ph, x in zip(fo, nfo, strict=True):
            ph.add_incoming(x, jend)
        done = fn.append_basic_block("nb.done")
        br = builder.cbranch(builder.icmp_signed("<", jn, nblk), jloop, done)
        no_unroll(builder, br)
        builder.position_at_end(done)
        for r in range(MR):
            for p in range(P):
                off = builder.add(builder.mul(ldo, c64(r)), c64(64 * p))
                builder.store(nfo[r * P + p], _ptr(builder, out, off, _vf), align=4)
        return context.get_dummy_value()

    @intrinsic
    def _t(typingctx, qa, lda, wq, nblk, qpb, sc, sstep, zp, zstep, sa, qs, lds, table,
           out, ldo):  # fmt: skip
        return types.void(*([types.int64] * 15)), codegen

    return _t


# Rows per tile: 2 * MR * P zmm accumulators (int + float) stay under the 32
# registers with room for the P planes and the broadcast.
_t4_1, _t4_2, _t4_3, _t4_4 = (make_tile(m, 4, False) for m in (1, 2, 3, 4))
_l4_1, _l4_2, _l4_3, _l4_4 = (make_tile(m, 4, True) for m in (1, 2, 3, 4))
_t8_1, _t8_2, _t8_3, _t8_4 = (make_tile(m, 8, False) for m in (1, 2, 3, 4))
_t2_1, _t2_2 = (make_tile(m, 2, False) for m in (1, 2))


@njit(cache=True, nogil=True)
def _tile(bits, lut, mr, *a):
    if bits == 4 and lut:
        if mr == 4:
            _l4_4(*a)
        elif mr == 3:
            _l4_3(*a)
        elif mr == 2:
            _l4_2(*a)
        else:
            _l4_1(*a)
    elif bits == 4:
        if mr == 4:
            _t4_4(*a)
        elif mr == 3:
            _t4_3(*a)
        elif mr == 2:
            _t4_2(*a)
        else:
            _t4_1(*a)
    elif bits == 8:
        if mr == 4:
            _t8_4(*a)
        elif mr == 3:
            _t8_3(*a)
        elif mr == 2:
            _t8_2(*a)
        else:
            _t8_1(*a)
    elif mr == 2:
        _t2_2(*a)
    else:
        _t2_1(*a)


def make_gemv4(NG, NCH, QPB, kind):
    """Intrinsic: one row of activations x NG groups of 4-bit codes with one
    integer zero point z for the whole matrix (the symmetric default's 8, the
    codebook's 128; run_quantizing sends fractional ones to make_tile), block
    size 4 * QPB (0: any, a runtime loop). kind: CODES, or a
    codebook looked up with LUT_PSHUFB or LUT_VPERMB.

    _g(qa, zi, wq, gw, nblk, qpb, sc, gs, ss, sa, table, out) all int64: qa
    (int8 row), zi (int32 pairs per block: the planes' starting values, see
    gemv4), wq (group 0's quad rows, groups gw bytes apart), sc (group 0's
    float32 x 32 per block, groups gs and blocks ss bytes apart), sa (float32
    per block), table (16 bytes, lut only), out (float32 x 32 per group,
    groups contiguous).

    Fewer instructions per 64-byte row than make_tile's (measured there: ~4
    cycles a row, the same in L2 as from L3, so the GEMV was bound by its
    instruction count, not by memory):

    * codes: the raw row is the low plane's operand, sum a * row = S_lo +
      16 S_hi, so the low plane needs no AND (one AND a row, for the high
      plane); S_lo = raw - hi16 and S_hi = hi16 >> 4 at the block's end, exact;
    * the zero point enters as the chains' starting value (-z qsum, times 17
      and 16 for raw and hi16): S - z * qsum is the integer that the portable
      kernel's float(S) - z * qs equals exactly while it stays below 2**24 in
      magnitude (2 * 255 * 127 * bs < 2**24 for bs <= 256, and with 4-bit
      codes 2 * 15 * 127 * bs for bs <= 4096: the caller's conditions), and
      the float epilogue loses a multiply and a subtract;
    * codebooks: vpermb (AVX-512 VBMI) indexes 64 bytes with the low 6 bits,
      so with the 16-entry table repeated 4 times neither nibble needs an AND
      (the high one after a 4-bit shift of 32-bit lanes): 2 fewer operations a
      row, a 1-row 4096 x 4096 call 176 -> 149 us on 1 thread. vpshufb needs
      bit 7 clear and the nibble alone, an AND each. A host without VBMI gets
      vpshufb even for LUT_VPERMB (the codegen checks what LLVM targets), so
      every variant compiles everywhere and the caller picks.
    * NG groups share each activation broadcast, and NCH chains per plane hide
      the vpdpbusd latency with NG * 2 * NCH independent accumulators.
    """
    lut = kind != CODES

    def codegen(context, builder, sig, args):
        qa, zi, wq, gw, nblk, qpb, sc, gs, ss, sa, table, out = args
        c64 = lambda x: ir.Constant(_i64, x)  # noqa: E731
        vpd = _fn(builder, "llvm.x86.avx512.vpdpbusd.512", _v16, [_v16, _v16, _v16])
        himask = ir.Constant(_v16, [0xF0F0F0F0] * 16)
        lomask = ir.Constant(_v16, [0x0F0F0F0F] * 16)
        if lut:
            tab = _table64(builder, table)
            if kind == LUT_VPERMB and has_vbmi(context):
                perm = _fn(
                    builder, "llvm.x86.avx512.permvar.qi.512", _b64, [_b64, _b64]
                )

                def look(x):
                    x = builder.call(perm, [tab, builder.bitcast(x, _b64)])
                    return builder.bitcast(x, _v16)
            else:
                shuf = _fn(builder, "llvm.x86.avx512.pshuf.b.512", _b64, [_b64, _b64])

                def look(x):
                    x = builder.bitcast(builder.and_(x, lomask), _b64)
                    return builder.bitcast(builder.call(shuf, [tab, x]), _v16)

        zero_i = ir.Constant(_v16, None)
        if QPB:
            qpb = c64(QPB)

        def block(j, fo):
            z2 = builder.add(zi, builder.mul(j, c64(8)))
            zraw = splat(builder, builder.load(_ptr(builder, z2, c64(0), _i32)), _v16)
            zhi = splat(builder, builder.load(_ptr(builder, z2, c64(4), _i32)), _v16)
            init = []
            for _g in range(NG):
                for start in (zraw, zhi):
                    init += [start] + [zero_i] * (NCH - 1)
            qbase = builder.mul(j, qpb)

            def rows(q, ia):
                new = list(ia)
                for ch in range(NCH):
                    qq = builder.add(qbase, builder.add(q, c64(ch)))
                    a4 = builder.load(
                        _ptr(builder, qa, builder.mul(qq, c64(4)), _i32), align=1
                    )
                    av = splat(builder, a4, _v16)
                    roff = builder.mul(qq, c64(64))
                    for g in range(NG):
                        base = builder.add(wq, builder.mul(gw, c64(g)))
                        row = builder.load(_ptr(builder, base, roff, _v16), align=1)
                        if lut:
                            four = ir.Constant(_v16, [4] * 16)
                            planes = (look(row), look(builder.lshr(row, four)))
                        else:
                            planes = (row, builder.and_(row, himask))
                        for p, x in enumerate(planes):
                            i = (2 * g + p) * NCH + ch
                            new[i] = builder.call(vpd, [new[i], x, av])
                return new

            if QPB:
                acc = init
                for q in range(0, QPB, NCH):
                    acc = rows(c64(q), acc)
            else:
                acc = loop(builder, c64(0), qpb, init, rows, step=NCH, guard=False)
            # codes: sc[j] x sa[j] per column; codebooks: one scale for the
            # matrix, so sa holds the products already (gemv4)
            sav = splat(
                builder,
                builder.load(_ptr(builder, sa, builder.mul(j, c64(4)), _f32)),
                _vf,
            )
            soff = builder.mul(j, ss)
            nfo = []
            for g in range(NG):
                sums = [
                    _sum(builder, acc[(2 * g + p) * NCH : (2 * g + p + 1) * NCH])
                    for p in range(2)
                ]
                if lut:
                    planes = sums
                else:
                    raw, hi16 = sums
                    planes = (
                        builder.sub(raw, hi16),
                        builder.ashr(hi16, ir.Constant(_v16, [4] * 16)),
                    )
                sbase = builder.add(sc, builder.add(builder.mul(gs, c64(g)), soff))
                for p, x in enumerate(planes):
                    s = sav
                    if not lut:
                        ptr = _ptr(builder, sbase, c64(64 * p), _vf)
                        s = builder.fmul(builder.load(ptr, align=4), sav)
                    t = builder.sitofp(x, _vf)
                    nfo.append(builder.fadd(fo[2 * g + p], builder.fmul(t, s)))
            return nfo

        fo = loop(builder, c64(0), nblk, [ir.Constant(_vf, None)] * (2 * NG), block)
        for i, x in enumerate(fo):
            builder.store(x, _ptr(builder, out, c64(64 * i), _vf), align=4)
        return context.get_dummy_value()

    @intrinsic
    def _g(typingctx, qa, zi, wq, gw, nblk, qpb, sc, gs, ss, sa, table, out):
        return types.void(*([types.int64] * 12)), codegen

    return _g


def _sum(builder, xs):
    """Pairwise integer sum of a list of vectors."""
    while len(xs) > 1:
        xs = [builder.add(xs[i], xs[i + 1]) for i in range(0, len(xs) - 1, 2)] + (
            [xs[-1]] if len(xs) % 2 else []
        )
    return xs[0]


CODES, LUT_PSHUFB, LUT_VPERMB = 0, 1, 2


def has_vbmi(context) -> bool:
    """Whether LLVM compiles for a CPU with AVX-512 VBMI (vpermb)."""
    return "+avx512vbmi" in context.codegen()._tm_features


# GEMV variants per kind: (groups per call, chains per plane, fixed rows per
# block), the wide kernel for whole sets of groups, the lone one for the rest.
# Codes: 2 groups x 2 chains; codebooks: 4 groups x 1 chain, no chain sums
# (1 row, 4096 x 4096, 1 thread, cycles a 64-byte row: codes 3.54 with 2 x 2,
# 3.58 with 4 x 1; codebooks 3.83 with 2 x 2, 3.74 with 4 x 1)
GEMV_GROUPS = (2, 4, 4)  # by kind
(
    (_gc2, _gc1, _gc2_32, _gc1_32),
    (_gs4, _gs1, _gs4_32, _gs1_32),
    (_gv4, _gv1, _gv4_32, _gv1_32),
) = (
    [
        make_gemv4(ng, nch, qpb, kind)
        for ng, nch, qpb in (
            (wide, 4 // wide, 0),
            (1, 4, 0),
            (wide, 4 // wide, 8),
            (1, 4, 8),
        )
    ]
    for kind, wide in zip((CODES, LUT_PSHUFB, LUT_VPERMB), GEMV_GROUPS, strict=True)
)


@njit(cache=True, nogil=True)
def _gemv(kind, wide, qpb, *a):
    if kind == LUT_VPERMB:
        if wide:
            _gv4_32(*a) if qpb == 8 else _gv4(*a)
        else:
            _gv1_32(*a) if qpb == 8 else _gv1(*a)
    elif kind == LUT_PSHUFB:
        if wide:
            _gs4_32(*a) if qpb == 8 else _gs4(*a)
        else:
            _gs1_32(*a) if qpb == 8 else _gs1(*a)
    elif wide:
        _gc2_32(*a) if qpb == 8 else _gc2(*a)
    else:
        _gc1_32(*a) if qpb == 8 else _gc1(*a)


@njit(cache=True, nogil=True)
def gemv_exact(bs, kind):
    """Whether make_gemv4's integer zero-point term is exact for blocks of bs."""
    return bs <= (4096 if kind == CODES else 256)


@njit(**PJIT)
def gemv4(qa, qasum, ascale, wq, sc, sstride, z, bs, table, kind, out):
    # qa (1, Kp) int8, qasum / ascale (1, nblk) f32, wq (ng, Kp/4, 64) u8,
    # sc (ng, *, 32) f32 (block j at row j * sstride), z the one zero point,
    # table (16,) u8 (read by the LUT kinds) -> out (1, ng*32). The LUT kinds
    # serve shared codebooks: one table and one scale sc[0, 0, 0] for all.
    lut = kind != CODES
    ng, nq, _ = wq.shape
    nblk = qasum.shape[1]
    zi = np.empty((nblk, 2), np.int32)
    for j in range(nblk):
        zq = np.int32(z) * np.int32(qasum[0, j])
        # the planes' starting values: -z qsum each; codes: raw and hi16 hold
        # S_lo + 16 S_hi and 16 S_hi (make_gemv4)
        zi[j, 0] = -zq if lut else -17 * zq
        zi[j, 1] = -zq if lut else -16 * zq
    sa = ascale
    if lut:  # the block's scale products, as the portable kernel rounds them
        sa = sc[0, 0, 0] * ascale
    qpb = bs // 4
    wide = GEMV_GROUPS[kind]
    nwide = ng // wide
    for t in prange(nwide + ng % wide):
        g = t * wide if t < nwide else nwide * wide + t - nwide
        args = (
            qa.ctypes.data, zi.ctypes.data,
            wq.ctypes.data + g * wq.strides[0], wq.strides[0], nblk, qpb,
            sc.ctypes.data + g * sc.strides[0], sc.strides[0],
            sstride * sc.strides[1], sa.ctypes.data, table.ctypes.data,
            out.ctypes.data + g * 128,
        )  # fmt: skip
        _gemv(kind, t < nwide, qpb, *args)


@njit(**PJIT)
def run(qa, ascale, qasum, wq, sc, sstride, zp, zstride, bits, bs, table, lut, out):
    # qa (M, Kp) int8, ascale/qasum (M, nblk) f32, wq (ng, Kp/4, 64) u8,
    # sc/zp (ng, *, G) f32, table (16,) u8 (read when lut) -> out (M, ng*G)
    M = qa.shape[0]
    ng, nq, _ = wq.shape
    G = sc.shape[2]
    qpb = bs // 4
    nblk = nq // qpb
    mr_max = 2 if bits == 2 else 4
    for g in prange(ng):
        m0 = 0
        while m0 < M:
            mr = min(mr_max, M - m0)
            _tile(
                bits, lut, mr,
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


# the codebook GEMV's table lookup, passed by lowprec.nbits (tests force each)
LUT_KIND = LUT_VPERMB


@njit(**JIT)
def run_quantizing(a, wq, sc, sstride, zp, zstride, bits, bs, table, lut, out, lutk):
    # a (M, K) float32: quantized per block here (kernels/nbits.py), then run():
    # one dispatch and no scratch per call (measured at 4096x4096, 1 row, 1
    # thread: 162 -> 146 us per call)
    qa, ascale, qasum, ok = quantize_rows(a, wq.shape[1] * 4, bs)
    if not ok:
        return False  # non-finite activations: the caller raises
    M = qa.shape[0]
    kind = lutk if lut else CODES
    # the GEMV's zero point is an integer code (a float one takes the tile)
    z = zp[0, 0, 0]
    zcode = z == np.floor(z) and 0 <= z <= (255 if lut else 15)
    if M == 1 and bits == 4 and zstride == 0 and zcode and gemv_exact(bs, kind):
        gemv4(qa, qasum, ascale, wq, sc, sstride, z, bs, table, kind, out)
    else:
        run(qa, ascale, qasum, wq, sc, sstride, zp, zstride, bits, bs, table, lut, out)
    return True


# ---------------------------------------------------------------------------
# float activations (accuracy level 0): the same quad rows, converted to float.
# Lane i = 4L + r of the c-th 16-byte quarter of a plane holds weight
# (k = 4q + r, n = 16p + 4c + L): the activation vector is a[4q : 4q+4] four
# times, and the 4 r-lanes of each column are summed at the very end. Per block
# acc[r, p, c] = sum a * (code - zp) with FMA; then o += acc * scale, o kept
# lane-expanded in the caller's buffer (L1) so only acc needs registers.

_vf4 = ir.VectorType(_f32, 4)


def _lane_params(builder, sc, zp, j, sstep, zstep, P):
    """Block j's scales and zero points, lane-expanded per plane p and quarter
    c (lane i of quarter c holds column 16p + 4c + i // 4): lists of 4 * P
    <16 x float> (index 4p + c)."""
    c64 = lambda x: ir.Constant(_i64, x)  # noqa: E731
    zoff = builder.mul(j, zstep)
    soff = builder.mul(j, sstep)
    zx, sx = [], []
    for p in range(P):
        zv = builder.load(
            _ptr(builder, zp, builder.add(zoff, c64(64 * p)), _vf), align=4
        )
        sv = builder.load(
            _ptr(builder, sc, builder.add(soff, c64(64 * p)), _vf), align=4
        )
        for c in range(4):
            sel = ir.Constant(_v16, [4 * c + i // 4 for i in range(16)])
            zx.append(builder.shuffle_vector(zv, zv, sel))
            sx.append(builder.shuffle_vector(sv, sv, sel))
    return zx, sx


def _plane_floats(builder, row, bits, p):
    """Plane p of a 64-byte quad row as 4 <16 x float> codes (quarter c = bytes
    16c .. 16c + 15: lane 4L + r is (k = 4q + r, column 16p + 4c + L))."""
    if bits == 8:
        x = row
    else:
        m32 = int.from_bytes(bytes([(1 << bits) - 1] * 4), "little")
        shifted = builder.lshr(row, ir.Constant(_v16, [bits * p] * 16))
        x = builder.and_(shifted, ir.Constant(_v16, [m32] * 16))
    xb = builder.bitcast(x, _b64)
    out = []
    for c in range(4):
        part = builder.shuffle_vector(
            xb, xb, ir.Constant(_v16, list(range(16 * c, 16 * c + 16)))
        )
        out.append(builder.uitofp(part, _vf))
    return out


def make_ftile(MR, bits):
    """_f(a, lda, wq, nblk, qpb, sc, zp, zstep, o, ldo) all int64: a (float32
    rows, lda bytes apart), sc / zp (float32 x G per block; zp zstep bytes
    apart), o (float32 4*G lane-expanded per row, ldo bytes apart, += )."""
    P = 8 // bits

    def codegen(context, builder, sig, args):
        a, lda, wq, nblk, qpb, sc, zp, zstep, o, ldo = args
        c64 = lambda x: ir.Constant(_i64, x)  # noqa: E731
        fma = _fn(builder, "llvm.fma.v16f32", _vf, [_vf, _vf, _vf])
        rep4 = ir.Constant(_v16, [i % 4 for i in range(16)])
        fn = builder.function
        pre = builder.block
        zero_f = ir.Constant(_vf, None)
        jloop = fn.append_basic_block("nf.j")
        builder.branch(jloop)
        builder.position_at_end(jloop)
        j = builder.phi(_i64, "j")
        j.add_incoming(c64(0), pre)
        zx, sx = _lane_params(builder, sc, zp, j, c64(64 * P), zstep, P)
        qbase = builder.mul(j, qpb)
        jhead = builder.block
        qloop = fn.append_basic_block("nf.q")
        builder.branch(qloop)
        builder.position_at_end(qloop)
        q = builder.phi(_i64, "q")
        q.add_incoming(c64(0), jhead)
        acc = []
        for _ in range(MR * P * 4):
            ph = builder.phi(_vf)
            ph.add_incoming(zero_f, jhead)
            acc.append(ph)
        qq = builder.add(qbase, q)
        row = builder.load(_ptr(builder, wq, builder.mul(qq, c64(64)), _v16), align=1)
        ws = []
        for p in range(P):
            for c, f in enumerate(_plane_floats(builder, row, bits, p)):
                ws.append(builder.fsub(f, zx[4 * p + c]))
        new = []
        koff = builder.mul(qq, c64(16))
        for r in range(MR):
            a4 = builder.load(
                _ptr(builder, a, builder.add(builder.mul(lda, c64(r)), koff), _vf4),
                align=4,
            )
            av = builder.shuffle_vector(a4, a4, rep4)
            for i in range(P * 4):
                new.append(builder.call(fma, [av, ws[i], acc[r * P * 4 + i]]))
        qn = builder.add(q, c64(1))
        qend = builder.block
        q.add_incoming(qn, qend)
        for ph, x in zip(acc, new, strict=True):
            ph.add_incoming(x, qend)
        qexit = fn.append_basic_block("nf.qx")
        builder.cbranch(builder.icmp_signed("<", qn, qpb), qloop, qexit)
        builder.position_at_end(qexit)
        for r in range(MR):
            for i in range(P * 4):
                off = builder.add(builder.mul(ldo, c64(r)), c64(64 * i))
                ptr = _ptr(builder, o, off, _vf)
                old = builder.load(ptr, align=4)
                builder.store(
                    builder.call(fma, [new[r * P * 4 + i], sx[i], old]), ptr, align=4
                )
        jn = builder.add(j, c64(1))
        jend = builder.block
        j.add_incoming(jn, jend)
        done = fn.append_basic_block("nf.done")
        br = builder.cbranch(builder.icmp_signed("<", jn, nblk), jloop, done)
        no_unroll(builder, br)
        builder.position_at_end(done)
        return context.get_dummy_value()

    @intrinsic
    def _f(typingctx, a, lda, wq, nblk, qpb, sc, zp, zstep, o, ldo):
        return types.void(*([types.int64] * 10)), codegen

    return _f


_f4_1, _f4_2 = make_ftile(1, 4), make_ftile(2, 4)
_f8_1, _f8_2, _f8_3, _f8_4 = (make_ftile(m, 8) for m in (1, 2, 3, 4))
_f2_1 = make_ftile(1, 2)


@njit(cache=True, nogil=True)
def _ftile(bits, mr, *a):
    if bits == 4:
        if mr == 2:
            _f4_2(*a)
        else:
            _f4_1(*a)
    elif bits == 8:
        if mr == 4:
            _f8_4(*a)
        elif mr == 3:
            _f8_3(*a)
        elif mr == 2:
            _f8_2(*a)
        else:
            _f8_1(*a)
    else:
        _f2_1(*a)


@njit(**PJIT)
def run_f32(a, wq, sc, zp, zstride, bits, bs, obuf, out, wide):
    # a (M, Kp) f32, wq (ng, Kp/4, 64) u8, sc (ng, nblk, G) / zp (ng, *, G) f32,
    # obuf (M, ng, 4*G) f32 scratch -> out (M, ng*G) f32; wide: 32 vector
    # registers (AVX-512), else 16 (AVX2 runs these 16-lane kernels too, as
    # ymm pairs: half the rows, or the accumulators spill; 1 x 4096 x 4096,
    # 4 bits, Zen 3, 2 threads: 30 GOP/s, 4 rows 21 -> 30)
    M = a.shape[0]
    ng, nq, _ = wq.shape
    G = sc.shape[2]
    qpb = bs // 4
    mr_max = 4 if bits == 8 else (2 if bits == 4 else 1)
    if not wide:
        mr_max = max(1, mr_max // 2)
    for g in prange(ng):
        m0 = 0
        while m0 < M:
            mr = min(mr_max, M - m0)
            for r in range(m0, m0 + mr):
                obuf[r, g, :] = 0
            _ftile(
                bits, mr,
                a.ctypes.data + m0 * a.strides[0], a.strides[0],
                wq.ctypes.data + g * wq.strides[0], nq // qpb, qpb,
                sc.ctypes.data + g * sc.strides[0],
                zp.ctypes.data + g * zp.strides[0], zstride * zp.strides[1],
                obuf.ctypes.data + m0 * obuf.strides[0] + g * obuf.strides[1],
                obuf.strides[0],
            )  # fmt: skip
            for r in range(m0, m0 + mr):
                for n in range(G):
                    # obuf lane 4L + r' of quarter c, plane p <- column 16p + 4c + L
                    b = 64 * (n // 16) + 16 * ((n % 16) // 4) + 4 * (n % 4)
                    ob = obuf[r, g]
                    out[r, g * G + n] = ob[b] + ob[b + 1] + ob[b + 2] + ob[b + 3]
            m0 += mr


# ---------------------------------------------------------------------------
# float activations, several rows (M >= PANEL_MIN_ROWS): each group's weights
# are dequantized once per call into a k-major float32 panel (Kp x G, in L2),
# w[k, n] = (code - zp) * scale rounded once (dequantize_blockwise's values),
# then an MR x G FMA tile runs over it per row tile, sums in k order. The
# one-row kernel above unpacks per pair of rows instead: measured 104 GOP/s at
# 16x4096x4096 on 2 threads against ORT MatMulNBits' 130.

# measured at 4096x4096, 4 bits, 2 threads: the panel's dequantization costs
# 0.8 ms per call and its FMA tile runs at the FMA peak (~227 GOP/s); at M = 4
# the one-row kernel is still faster (1.25 vs ~1.4 ms), at M = 16 the panel
# wins 3.2 vs 5.8 ms
PANEL_MIN_ROWS = 8
PANEL_MR = 6


def make_dequant(bits):
    """_d(wq, nblk, qpb, sc, zp, zstep, panel) int64s: the group's codes ->
    panel[k, n] float32 (row k at panel + 4*G*k)."""
    P = 8 // bits
    G = 16 * P

    def codegen(context, builder, sig, args):
        wq, nblk, qpb, sc, zp, zstep, panel = args
        c64 = lambda x: ir.Constant(_i64, x)  # noqa: E731
        fn = builder.function
        pre = builder.block
        jloop = fn.append_basic_block("dq.j")
        builder.branch(jloop)
        builder.position_at_end(jloop)
        j = builder.phi(_i64, "j")
        j.add_incoming(c64(0), pre)
        zx, sx = _lane_params(builder, sc, zp, j, c64(4 * G), zstep, P)
        qbase = builder.mul(j, qpb)
        jhead = builder.block
        qloop = fn.append_basic_block("dq.q")
        builder.branch(qloop)
        builder.position_at_end(qloop)
        q = builder.phi(_i64, "q")
        q.add_incoming(c64(0), jhead)
        qq = builder.add(qbase, q)
        row = builder.load(_ptr(builder, wq, builder.mul(qq, c64(64)), _v16), align=1)
        for p in range(P):
            v = [
                builder.fmul(builder.fsub(f, zx[4 * p + c]), sx[4 * p + c])
                for c, f in enumerate(_plane_floats(builder, row, bits, p))
            ]

            # v[c] lane 4L + r holds w[4q + r, 16p + 4c + L]; transpose to
            # u[r] lane 4c + L (two stages of two-input shuffles)
            def st1(a_, b_, r0):
                # lanes (r - r0) * 8 + h * 4 + L <- (a_ if h == 0 else b_)[4L + r]
                idx = [(16 if h else 0) + 4 * L + r0 + rr for rr in range(2)
                       for h in range(2) for L in range(4)]  # fmt: skip
                return builder.shuffle_vector(a_, b_, ir.Constant(_v16, idx))

            x01 = [st1(v[0], v[1], 0), st1(v[0], v[1], 2)]
            x23 = [st1(v[2], v[3], 0), st1(v[2], v[3], 2)]
            for r in range(4):
                lo, rr = divmod(r, 2)
                idx = [(16 if c >= 2 else 0) + rr * 8 + (c % 2) * 4 + L
                       for c in range(4) for L in range(4)]  # fmt: skip
                u = builder.shuffle_vector(x01[lo], x23[lo], ir.Constant(_v16, idx))
                krow = builder.add(builder.mul(qq, c64(4)), c64(r))
                off = builder.add(builder.mul(krow, c64(4 * G)), c64(64 * p))
                builder.store(u, _ptr(builder, panel, off, _vf), align=4)
        qn = builder.add(q, c64(1))
        qend = builder.block
        q.add_incoming(qn, qend)
        qexit = fn.append_basic_block("dq.qx")
        builder.cbranch(builder.icmp_signed("<", qn, qpb), qloop, qexit)
        builder.position_at_end(qexit)
        jn = builder.add(j, c64(1))
        j.add_incoming(jn, qexit)
        done = fn.append_basic_block("dq.done")
        br = builder.cbranch(builder.icmp_signed("<", jn, nblk), jloop, done)
        no_unroll(builder, br)
        builder.position_at_end(done)
        return context.get_dummy_value()

    @intrinsic
    def _d(typingctx, wq, nblk, qpb, sc, zp, zstep, panel):
        return types.void(*([types.int64] * 7)), codegen

    return _d


def make_fgemm(MR, P):
    """_g(a, lda, panel, kp, out, ldo) int64s: out[r, 0:G] = sum_k a[r, k] *
    panel[k, 0:G] for MR rows (FMA, k in order), G = 16 * P."""
    G = 16 * P

    def codegen(context, builder, sig, args):
        a, lda, panel, kp, out, ldo = args
        c64 = lambda x: ir.Constant(_i64, x)  # noqa: E731
        fma = _fn(builder, "llvm.fma.v16f32", _vf, [_vf, _vf, _vf])
        fn = builder.function
        pre = builder.block
        loop = fn.append_basic_block("fg.k")
        builder.branch(loop)
        builder.position_at_end(loop)
        k = builder.phi(_i64, "k")
        k.add_incoming(c64(0), pre)
        acc = []
        for _ in range(MR * P):
            ph = builder.phi(_vf)
            ph.add_incoming(ir.Constant(_vf, None), pre)
            acc.append(ph)
        prow = builder.mul(k, c64(4 * G))
        w = [
            builder.load(
                _ptr(builder, panel, builder.add(prow, c64(64 * p)), _vf), align=4
            )
            for p in range(P)
        ]
        k4 = builder.mul(k, c64(4))
        new = []
        for r in range(MR):
            x = builder.load(
                _ptr(builder, a, builder.add(builder.mul(lda, c64(r)), k4), _f32)
            )
            xv = splat(builder, x, _vf)
            for p in range(P):
                new.append(builder.call(fma, [xv, w[p], acc[r * P + p]]))
        kn = builder.add(k, c64(1))
        kend = builder.block
        k.add_incoming(kn, kend)
        for ph, x in zip(acc, new, strict=True):
            ph.add_incoming(x, kend)
        done = fn.append_basic_block("fg.done")
        br = builder.cbranch(builder.icmp_signed("<", kn, kp), loop, done)
        no_unroll(builder, br)
        builder.position_at_end(done)
        for r in range(MR):
            for p in range(P):
                off = builder.add(builder.mul(ldo, c64(r)), c64(64 * p))
                builder.store(new[r * P + p], _ptr(builder, out, off, _vf), align=4)
        return context.get_dummy_value()

    @intrinsic
    def _g(typingctx, a, lda, panel, kp, out, ldo):
        return types.void(*([types.int64] * 6)), codegen

    return _g


_dq2, _dq4, _dq8 = make_dequant(2), make_dequant(4), make_dequant(8)
_g1_1, _g1_2, _g1_3, _g1_4, _g1_5, _g1_6 = (make_fgemm(m, 1) for m in range(1, 7))
_g2_1, _g2_2, _g2_3, _g2_4, _g2_5, _g2_6 = (make_fgemm(m, 2) for m in range(1, 7))
_g4_1, _g4_2, _g4_3, _g4_4, _g4_5, _g4_6 = (make_fgemm(m, 4) for m in range(1, 7))
assert PANEL_MR == 6


@njit(cache=True, nogil=True)
def _dequant(bits, *a):
    if bits == 4:
        _dq4(*a)
    elif bits == 8:
        _dq8(*a)
    else:
        _dq2(*a)


@njit(cache=True, nogil=True)
def _fgemm(P, mr, *a):
    if P == 2:
        if mr == 6:
            _g2_6(*a)
        elif mr == 5:
            _g2_5(*a)
        elif mr == 4:
            _g2_4(*a)
        elif mr == 3:
            _g2_3(*a)
        elif mr == 2:
            _g2_2(*a)
        else:
            _g2_1(*a)
    elif P == 1:
        if mr == 6:
            _g1_6(*a)
        elif mr == 5:
            _g1_5(*a)
        elif mr == 4:
            _g1_4(*a)
        elif mr == 3:
            _g1_3(*a)
        elif mr == 2:
            _g1_2(*a)
        else:
            _g1_1(*a)
    elif mr == 6:
        _g4_6(*a)
    elif mr == 5:
        _g4_5(*a)
    elif mr == 4:
        _g4_4(*a)
    elif mr == 3:
        _g4_3(*a)
    elif mr == 2:
        _g4_2(*a)
    else:
        _g4_1(*a)


@njit(**PJIT)
def run_f32_panel(a, wq, sc, zp, zstride, bits, bs, panels, out):
    # a (M, Kp) f32 (zero-padded), wq (ng, Kp/4, 64) u8, sc (ng, nblk, G) /
    # zp (ng, *, G) f32, panels (threads, Kp * G) f32 scratch -> out (M, ng*G)
    M, Kp = a.shape
    ng, nq, _ = wq.shape
    G = sc.shape[2]
    P = G // 16
    qpb = bs // 4
    for g in prange(ng):
        pan = panels[get_thread_id()]
        _dequant(
            bits, wq.ctypes.data + g * wq.strides[0], nq // qpb, qpb,
            sc.ctypes.data + g * sc.strides[0], zp.ctypes.data + g * zp.strides[0],
            zstride * zp.strides[1], pan.ctypes.data,
        )  # fmt: skip
        m0 = 0
        while m0 < M:
            mr = min(PANEL_MR, M - m0)
            _fgemm(
                P, mr, a.ctypes.data + m0 * a.strides[0], a.strides[0], pan.ctypes.data,
                Kp, out.ctypes.data + m0 * out.strides[0] + g * G * 4, out.strides[0],
            )  # fmt: skip
            m0 += mr
