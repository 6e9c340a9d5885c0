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
rows balanced by nonzero count (the caller's ``chunks``).

Kernel (int8, 1x4 blocks): X packed as [ceil(K/4)][N][4] uint8 (x' = x + 128 for
int8 X), each 4-byte block of W broadcast and multiplied with vpdpbusd into
int32 accumulators; raw products land in a per-thread scratch tile and the
requantization epilogue (docs/quantization.md eqs. 8-13) runs while it is in L1.

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
from .ir_util import no_unroll as _no_unroll
from .ir_util import splat as _splat

NV = 4  # zmm vectors per output row of a register tile
NR = 16 * NV  # output columns per register tile
PF_DIST = 8  # blocks ahead for the X-row software prefetch (0: off)

_i1 = ir.IntType(1)
_i8 = ir.IntType(8)
_i16 = ir.IntType(16)
_i32 = ir.IntType(32)
_i64 = ir.IntType(64)
_f32 = ir.FloatType()
_f16 = ir.HalfType()
_vf = ir.VectorType(_f32, 16)
_vi = ir.VectorType(_i32, 16)
_m16 = ir.VectorType(_i1, 16)

# value kinds
F32, F16, S8 = 0, 1, 2
# index kinds (the 2:4 format has none: its positions sit in one byte per group)
U16, I32, NM = 0, 1, 2


def _fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ret, args), name
    )


def make_block_kernel(R, C, vkind, ikind):
    """An intrinsic computing one R x NR output tile of one block row.

    _tile(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid)   all int64
      x      address of X[0, n0] (float32, row stride ldx bytes), or for int8 of
             Xp[0, n0, 0] (uint8 [K4][N][4], k4-row stride ldx bytes)
      idx    address of the block index array (uint16 / int32), or for 2:4 of
             the position bytes (one per group)
      val    address of the values (float32 / float16 / int8)
      p0, p1 block range of this block row (for 2:4: group range)
      out    address of out[m0, n0] (float32 or int32), row stride ldo bytes
      rvalid rows of the tile inside M (1..R); nvalid columns inside N (1..NR)
    """
    is_int = vkind == S8
    vty = _vi if is_int else _vf
    vsize = {F32: 4, F16: 2, S8: 1}[vkind]
    isize = {U16: 2, I32: 4, NM: 1}[ikind]
    vals_per_block = 2 if ikind == NM else R * C
    cols = 2 if ikind == NM else C  # X rows touched per block

    def codegen(context, builder, sig, args):
        x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid = args
        i8p = _i8.as_pointer()
        x8 = builder.inttoptr(x, i8p)
        idx8 = builder.inttoptr(idx, i8p)
        val8 = builder.inttoptr(val, i8p)
        # column masks of the NV vectors of a row
        lanes = ir.Constant(ir.VectorType(_i64, 16), list(range(16)))
        nv = _splat(builder, nvalid, ir.VectorType(_i64, 16))
        masks = []
        for v in range(NV):
            col = builder.add(
                lanes, ir.Constant(ir.VectorType(_i64, 16), [16 * v] * 16)
            )
            masks.append(builder.icmp_signed("<", col, nv))
        mload = _fn(
            builder,
            "llvm.masked.load.v16f32.p0"
            if not is_int
            else "llvm.masked.load.v16i32.p0",
            vty,
            [vty.as_pointer(), _i32, _m16, vty],
        )
        mstore = _fn(
            builder,
            "llvm.masked.store.v16f32.p0"
            if not is_int
            else "llvm.masked.store.v16i32.p0",
            ir.VoidType(),
            [vty, vty.as_pointer(), _i32, _m16],
        )
        if is_int:
            dot = _fn(builder, "llvm.x86.avx512.vpdpbusd.512", _vi, [_vi, _vi, _vi])
        else:
            dot = _fn(builder, "llvm.fma.v16f32", _vf, [_vf, _vf, _vf])
        zero_v = ir.Constant(vty, None)

        fn = builder.function
        pre = builder.block
        loop = fn.append_basic_block("sp.loop")
        after = fn.append_basic_block("sp.after")
        builder.cbranch(builder.icmp_signed("<", p0, p1), loop, after)

        builder.position_at_end(loop)
        p = builder.phi(_i64)
        p.add_incoming(p0, pre)
        accs = []
        for _ in range(R * NV):
            a = builder.phi(vty)
            a.add_incoming(zero_v, pre)
            accs.append(a)
        # the X rows of this block
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
            xrows.append(builder.gep(x8, [builder.mul(b_idx, ldx)]))
        else:
            k0 = builder.mul(b_idx, ir.Constant(_i64, C))
            for c in range(C):
                k = builder.add(k0, ir.Constant(_i64, c))
                xrows.append(builder.gep(x8, [builder.mul(k, ldx)]))
        if PF_DIST > 0 and ikind in (U16, I32) and not is_int and C == 1:
            # software prefetch of the X row PF_DIST blocks ahead (clamped to
            # this row's last block so the index read stays in bounds)
            pa = builder.add(p, ir.Constant(_i64, PF_DIST))
            last = builder.sub(p1, ir.Constant(_i64, 1))
            pa = builder.select(builder.icmp_signed("<", pa, p1), pa, last)
            ipa = builder.gep(idx8, [builder.mul(pa, ir.Constant(_i64, isize))])
            ity = _i16 if ikind == U16 else _i32
            ld = builder.load(builder.bitcast(ipa, ity.as_pointer()))
            ka = builder.zext(ld, _i64) if ikind == U16 else builder.sext(ld, _i64)
            xa = builder.gep(x8, [builder.mul(ka, ldx)])
            pf = _fn(
                builder, "llvm.prefetch.p0", ir.VoidType(), [i8p, _i32, _i32, _i32]
            )
            for v in range(NV):
                builder.call(
                    pf,
                    [
                        builder.gep(xa, [ir.Constant(_i64, 64 * v)]),
                        ir.Constant(_i32, 0),
                        ir.Constant(_i32, 3),
                        ir.Constant(_i32, 1),
                    ],
                )
        xv = []
        for xr in xrows:
            row = []
            for v in range(NV):
                ptr = builder.bitcast(
                    builder.gep(xr, [ir.Constant(_i64, 64 * v)]), vty.as_pointer()
                )
                row.append(
                    builder.call(mload, [ptr, ir.Constant(_i32, 4), masks[v], zero_v])
                )
            xv.append(row)
        vbase = builder.gep(
            val8, [builder.mul(p, ir.Constant(_i64, vals_per_block * vsize))]
        )
        new = list(accs)
        if is_int:
            w = builder.load(builder.bitcast(vbase, _i32.as_pointer()), align=1)
            ws = _splat(builder, w, _vi)
            for v in range(NV):
                # operand 2 unsigned bytes (X'), operand 3 signed bytes (W)
                new[v] = builder.call(dot, [new[v], xv[0][v], ws])
        else:
            for r in range(R):
                for c in range(cols):
                    off = ir.Constant(_i64, (r * cols + c) * vsize)
                    wp = builder.gep(vbase, [off])
                    if vkind == F32:
                        w = builder.load(
                            builder.bitcast(wp, _f32.as_pointer()), align=1
                        )
                    else:
                        w = builder.fpext(
                            builder.load(
                                builder.bitcast(wp, _f16.as_pointer()), align=1
                            ),
                            _f32,
                        )
                    ws = _splat(builder, w, _vf)
                    for v in range(NV):
                        new[r * NV + v] = builder.call(
                            dot, [ws, xv[c][v], new[r * NV + v]]
                        )
        pn = builder.add(p, ir.Constant(_i64, 1))
        end = builder.block
        p.add_incoming(pn, end)
        for a, n in zip(accs, new, strict=True):
            a.add_incoming(n, end)
        br = builder.cbranch(builder.icmp_signed("<", pn, p1), loop, after)
        _no_unroll(builder, br)

        builder.position_at_end(after)
        fin = []
        for i in range(R * NV):
            f = builder.phi(vty)
            f.add_incoming(zero_v, pre)
            f.add_incoming(new[i], end)
            fin.append(f)
        o8 = builder.inttoptr(out, i8p)
        for r in range(R):
            inside = builder.icmp_signed("<", ir.Constant(_i64, r), rvalid)
            rmask = _splat(builder, inside, _m16)
            orow = builder.gep(o8, [builder.mul(ldo, ir.Constant(_i64, r))])
            for v in range(NV):
                ptr = builder.bitcast(
                    builder.gep(orow, [ir.Constant(_i64, 64 * v)]), vty.as_pointer()
                )
                builder.call(
                    mstore,
                    [
                        fin[r * NV + v],
                        ptr,
                        ir.Constant(_i32, 4),
                        builder.and_(masks[v], rmask),
                    ],
                )
        return context.get_dummy_value()

    @intrinsic
    def _tile(typingctx, x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid):
        return types.void(*([types.int64] * 10)), codegen

    return _tile


# One module-level intrinsic per (block shape, value type, index type): module
# globals, so numba's cache can refer to them by name.
_csr_f32_u16 = make_block_kernel(1, 1, F32, U16)
_csr_f32_i32 = make_block_kernel(1, 1, F32, I32)
_csr_f16_u16 = make_block_kernel(1, 1, F16, U16)
_csr_f16_i32 = make_block_kernel(1, 1, F16, I32)
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
_c4_s8_u16 = make_block_kernel(1, 4, S8, U16)
_c4_s8_i32 = make_block_kernel(1, 4, S8, I32)

# kernel ids handed to the drivers: 4 * shape + 2 * (value is f16) + (index i32)
CSR, R4, C4, NM24 = 0, 1, 2, 3


@njit(inline="always")
def _float_tile(kid, x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid):
    if kid == 0:
        _csr_f32_u16(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid)
    elif kid == 1:
        _csr_f32_i32(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid)
    elif kid == 2:
        _csr_f16_u16(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid)
    elif kid == 3:
        _csr_f16_i32(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid)
    elif kid == 4:
        _r4_f32_u16(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid)
    elif kid == 5:
        _r4_f32_i32(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid)
    elif kid == 6:
        _r4_f16_u16(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid)
    elif kid == 7:
        _r4_f16_i32(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid)
    elif kid == 8:
        _c4_f32_u16(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid)
    elif kid == 9:
        _c4_f32_i32(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid)
    elif kid == 10:
        _c4_f16_u16(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid)
    elif kid == 11:
        _c4_f16_i32(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid)
    elif kid == 12 or kid == 13:
        _nm_f32(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid)
    else:
        _nm_f16(x, ldx, idx, val, p0, p1, out, ldo, rvalid, nvalid)


@njit(inline="always")
def _float_rows(kid, R, c0, c1, xa, ldx, idx, val, ptr, out, oa, bias, lo, hi, epi):
    # block rows c0..c1-1 of one thread, every N tile, then bias / clamp
    M, N = out.shape
    ldo = np.int64(out.strides[0])
    nt = (N + NR - 1) // NR
    for t in range(nt):
        n0 = t * NR
        nvalid = min(NR, N - n0)
        for b in range(c0, c1):
            m0 = b * R
            rvalid = min(R, M - m0)
            _float_tile(
                kid,
                xa + 4 * n0,
                ldx,
                idx,
                val,
                ptr[b],
                ptr[b + 1],
                oa + m0 * ldo + 4 * n0,
                ldo,
                rvalid,
                nvalid,
            )
            if epi:
                for r in range(rvalid):
                    m = m0 + r
                    bm = bias[m] if bias.shape[0] > 1 else bias[0]
                    orow = out[m]
                    for jj in range(nvalid):
                        j = np.uint64(n0 + jj)
                        orow[j] = min(max(orow[j] + bm, lo), hi)


@njit(**PJIT)
def spmm_float(kid, R, xa, ldx, idx, val, ptr, chunks, out, oa, bias, lo, hi, epi):
    # out (M,N) float32 = W @ X (+bias, clamp to [lo, hi] when epi);
    # xa, idx, val, oa: addresses of X (float32, row stride ldx bytes), the block
    # indices, the values and out; ptr (Mb+1,) int64 block pointers;
    # chunks (T+1,) int64 block-row bounds of the T threads (balanced by nnz)
    for c in prange(chunks.shape[0] - 1):
        _float_rows(
            kid,
            R,
            chunks[c],
            chunks[c + 1],
            xa,
            ldx,
            idx,
            val,
            ptr,
            out,
            oa,
            bias,
            lo,
            hi,
            epi,
        )


@njit(**JIT)
def spmm_float_serial(
    kid, R, xa, ldx, idx, val, ptr, chunks, out, oa, bias, lo, hi, epi
):
    # as spmm_float on the calling thread (small problems: no pool launch)
    _float_rows(
        kid, R, 0, ptr.shape[0] - 1, xa, ldx, idx, val, ptr, out, oa, bias, lo, hi, epi
    )


# --------------------------------------------------------------------------- #
# int8


@njit(**JIT)
def pack_x_u8(x, flip, out):
    # x (K,N) int8|uint8 -> out (K4,N,4) uint8 = x ^ flip (x' = x + 128 for int8),
    # rows past K zero. On the calling thread: a second parallel region per
    # call cost more than the copy (~0.1 ms for 1024x256) on a busy 2-core box.
    K, N = x.shape
    K4 = out.shape[0]
    for g in range(K4):
        for i in range(4):
            k = 4 * g + i
            if k < K:
                for n in range(N):
                    out[g, n, i] = np.uint8(x[k, n]) ^ flip
            else:
                for n in range(N):
                    out[g, n, i] = 0


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
def _s8_rows(
    use_i32,
    c0,
    c1,
    xa,
    ldx,
    idx,
    val,
    ptr,
    scratch,
    zx,
    rs,
    bias,
    mult,
    zy,
    qlo,
    qhi,
    mode,
    out,
):
    M, N = out.shape
    tile = scratch[numba.get_thread_id()]
    ta = tile.ctypes.data
    nt = (N + NR - 1) // NR
    for t in range(nt):
        n0 = t * NR
        nvalid = min(NR, N - n0)
        for m in range(c0, c1):
            if use_i32:
                _c4_s8_i32(
                    xa + 4 * n0, ldx, idx, val, ptr[m], ptr[m + 1], ta, 0, 1, nvalid
                )
            else:
                _c4_s8_u16(
                    xa + 4 * n0, ldx, idx, val, ptr[m], ptr[m + 1], ta, 0, 1, nvalid
                )
            _requant_row(
                tile, m, n0, nvalid, zx, rs, bias, mult, zy, qlo, qhi, mode, out
            )


@njit(**PJIT)
def spmm_s8_vnni(
    use_i32,
    xa,
    ldx,
    idx,
    val,
    ptr,
    chunks,
    scratch,
    zx,
    rs,
    bias,
    mult,
    zy,
    qlo,
    qhi,
    mode,
    out,
):
    # W 1x4 blocks int8 (zero point 0) @ Xp (K4,N,4) uint8 -> requantized out;
    # scratch (threads, NR) int32; zx = x zero point + 128 for int8 x;
    # rs (M,) int64 = rowsum(W); bias (M,) int64; mult (M,) float64
    for c in prange(chunks.shape[0] - 1):
        _s8_rows(
            use_i32,
            chunks[c],
            chunks[c + 1],
            xa,
            ldx,
            idx,
            val,
            ptr,
            scratch,
            zx,
            rs,
            bias,
            mult,
            zy,
            qlo,
            qhi,
            mode,
            out,
        )


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


@njit(cache=True, nogil=True, parallel=True, fastmath={"contract"})
def spmv_float(indptr, cols, vals, x, chunks, bias, lo, hi, out):
    # out (M,) float32 = clamp(W @ x + bias) for one column x (K,) float32, from
    # the expanded CSR view; 4 partial sums per row (every product one FMA
    # rounding, n - 1 additions: the documented bound holds). The (K, 1) tile
    # kernel would use 1 of 16 lanes; vgatherdps (fastmath) measured 2.5x
    # slower than this on Zen 4 (1024x1024 at 50%: 880 vs 353 us, 1 thread).
    nb = bias.shape[0]
    for c in prange(chunks.shape[0] - 1):
        for m in range(chunks[c], chunks[c + 1]):
            s0 = s1 = s2 = s3 = np.float32(0)
            p = indptr[m]
            p1 = indptr[m + 1]
            while p + 4 <= p1:
                s0 += vals[p] * x[np.uint64(cols[p])]
                s1 += vals[p + 1] * x[np.uint64(cols[p + 1])]
                s2 += vals[p + 2] * x[np.uint64(cols[p + 2])]
                s3 += vals[p + 3] * x[np.uint64(cols[p + 3])]
                p += 4
            while p < p1:
                s0 += vals[p] * x[np.uint64(cols[p])]
                p += 1
            s = (s0 + s1) + (s2 + s3) + bias[m if nb > 1 else 0]
            out[m] = min(max(s, lo), hi)
