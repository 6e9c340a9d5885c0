"""AMX INT8 GEMM: ``tdpbusd`` tiles through numba @intrinsic + llvmlite IR.

Computes lowprec's raw product (docs/quantization.md, eq. 6) and the fused
epilogue of the AVX-512 VNNI path (eqs. 8-13), on CPUs with AMX-INT8
(Intel Sapphire Rapids and later):

    P[m, n] = sum_k a'[m, k] * b'[k, n]      a' uint8, b' int8, P int32

  a'  (M, K) uint8, any strides (or int8 a, flipped as it is copied), read
      as rows of Kp bytes, Kp = K padded to a multiple of 64 (the padding
      bytes meet zeros in the packed B).
  b'  :func:`pack_b`: the VNNI panel layout [NP][K4][NR][4] of
      int8_gemm_vnni.pack_b with K zero-padded to a multiple of 64, so a B
      tile (16 rows of K4 x 64 bytes = 16 columns x 4 k) is 16 rows 256 bytes
      apart inside one panel, and the zmm tiles read the same array.
  out (M, N), any row stride, unit column stride; int32, uint8, int8 or float32.

Block: 32 x 64 int32 outputs, run as two 32-column halves, each in four 16 x 16
accumulator tiles (tmm0-3) fed by two 16-row x 64-byte A tiles (tmm4-5) and
two 16 x 64-byte B tiles (tmm6-7): per 64 bytes of K, four tile loads and four
tdpbusd (16 x 16 x 64 multiply-adds each). Each half's accumulators are stored
to an 8 KB stack buffer as it ends; the VNNI path's epilogue
(int8_gemm_vnni.make_fused_kernel) then reads them back one zmm vector at a
time, where each is used. For int32 output with no row terms (make_raw_kernel)
the accumulators start from the bias and are stored straight into the output.
Rows past the last full 16-row tile run on the zmm tiles of int8_gemm_vnni
(same packed array). a' not readable in place (K not a multiple of 64, rows
off 64-byte boundaries, int8 a) is copied a row block at a time into
per-thread scratch.

The tile configuration (palette 1, every tile 16 rows x 64 bytes) is loaded
once per thread and call (amx_begin) and released at the end (amx_end). The
process must first have asked Linux for the AMX tile state (lowprec._dispatch
does, through arch_prctl(ARCH_REQ_XCOMP_PERM)); without it the first tile
instruction faults (SIGILL), so nothing here runs unless that request
succeeded.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import int8_gemm_vnni as _z
from .ir_util import loop as _ir_loop
from .layout import copy_bytes
from .quantize import _quantize_block

_i8 = ir.IntType(8)
_i32 = ir.IntType(32)
_i64 = ir.IntType(64)
_v16 = ir.VectorType(_i32, 16)
_void = ir.VoidType()
_p8 = _i8.as_pointer()

AMX_MR = 32  # rows of one AMX block (two 16-row A tiles)
AMX_NC = 32  # columns of one AMX block (two 16-column B tiles); NR = 2 blocks
KB = 64  # bytes of K per tdpbusd (one A tile row)
assert _z.NR == 2 * AMX_NC


def _fn(builder, name, *args):
    fnty = ir.FunctionType(_void, list(args))
    return cgutils.get_or_insert_function(builder.module, fnty, name)


def _tile_load(builder, t, addr, stride):
    f = _fn(builder, "llvm.x86.tileloadd64", _i8, _p8, _i64)
    builder.call(f, [ir.Constant(_i8, t), builder.inttoptr(addr, _p8), stride])


def _tile_store(builder, t, ptr, stride):
    f = _fn(builder, "llvm.x86.tilestored64", _i8, _p8, _i64)
    builder.call(f, [ir.Constant(_i8, t), ptr, ir.Constant(_i64, stride)])


def _tdpbusd(builder, c, a, b, op="llvm.x86.tdpbusd"):
    # c += a (unsigned bytes) . b (signed bytes), 4-byte dot products (op
    # "llvm.x86.tdpbf16ps": bfloat16 pairs into float32, bf16_gemm_amx.py)
    f = _fn(builder, op, _i8, _i8, _i8)
    builder.call(f, [ir.Constant(_i8, c), ir.Constant(_i8, a), ir.Constant(_i8, b)])


def _alloca(builder, ty):
    """A 64-byte aligned stack slot in the entry block, left uninitialised
    (cgutils.alloca_once zero-fills: a 4-8 KB memset on every call)."""
    with builder.goto_entry_block():
        slot = builder.alloca(ty)
    slot.align = 64
    return slot


def _config_bytes():
    # palette 1; tile t: 64 bytes a row (colsb, uint16 at 16 + 2t), 16 rows
    # (uint8 at 48 + t); bytes 1-15 (start row, reserved) zero
    cfg = [0] * 64
    cfg[0] = 1
    for t in range(8):
        cfg[16 + 2 * t] = 64
        cfg[48 + t] = 16
    return cfg


@intrinsic
def amx_begin(typingctx):
    """ldtilecfg: every tile 16 x 64 bytes (before a thread's run of jobs)."""

    def codegen(context, builder, sig, args):
        aty = ir.ArrayType(_i8, 64)
        cfg = _alloca(builder, aty)
        builder.store(ir.Constant(aty, _config_bytes()), cfg)
        ldcfg = _fn(builder, "llvm.x86.ldtilecfg", _p8)
        builder.call(ldcfg, [builder.bitcast(cfg, _p8)])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def amx_end(typingctx):
    """tilerelease: the tile state back to its initial (unused) state."""

    def codegen(context, builder, sig, args):
        builder.call(_fn(builder, "llvm.x86.tilerelease"), [])
        return context.get_dummy_value()

    return types.void(), codegen


class _StoredTile:
    """The accumulators as make_fused_kernel indexes them (fin[r * NV_ + v]),
    each <16 x i32> loaded from the stack buffer where the epilogue uses it:
    loading all of them up front kept them live and spilled them."""

    def __init__(self, builder, buf):
        self.builder = builder
        self.buf = builder.bitcast(buf, _v16.as_pointer())

    def __getitem__(self, i):
        b = self.builder
        return b.load(b.gep(self.buf, [ir.Constant(_i64, i)]), align=64)


def _half(builder, halves, a, lda, b, ldb, k64, h, init, store, op="llvm.x86.tdpbusd",
          tile_off=64, a_step=KB, a16=None):  # fmt: skip
    """One MR x 32 half (columns 32h..32h+31 of the panel) on tmm0-3: init(t)
    sets accumulator tile t, the K loop runs k64 steps of 64 bytes (op on
    each pair of tiles), store(t) writes tile t. B tiles: rows ldb bytes
    apart, the panel's four 16-column tiles of a step tile_off bytes apart
    (64: the VNNI panel rows; 1024 with ldb 64: contiguous 1 KB tiles,
    bf16_gemm_amx.pack_b), a step 4096 bytes. A tiles: rows lda bytes apart,
    a step a_step bytes (64: rows of a'; 1024 with lda 64: contiguous tiles),
    the second 16-row tile at a16 (default a + 16 lda)."""
    bh = builder.add(b, ir.Constant(_i64, 2 * tile_off * h))
    if a16 is None:
        a16 = builder.add(a, builder.mul(lda, ir.Constant(_i64, 16)))
    b_step = ir.Constant(_i64, 4096)  # 16 k4 rows x 256 bytes = 64 bytes of K
    for t in range(2 * halves):
        init(t)

    def step(kb, carried):
        ka = builder.mul(kb, ir.Constant(_i64, a_step))
        b0 = builder.add(bh, builder.mul(kb, b_step))
        _tile_load(builder, 4, builder.add(a, ka), lda)
        _tile_load(builder, 6, b0, ldb)
        _tile_load(builder, 7, builder.add(b0, ir.Constant(_i64, tile_off)), ldb)
        _tdpbusd(builder, 0, 4, 6, op)
        _tdpbusd(builder, 1, 4, 7, op)
        if halves == 2:
            _tile_load(builder, 5, builder.add(a16, ka), lda)
            _tdpbusd(builder, 2, 5, 6, op)
            _tdpbusd(builder, 3, 5, 7, op)
        return []

    _ir_loop(builder, ir.Constant(_i64, 0), k64, [], step, name=f"amx{h}")
    for t in range(2 * halves):
        store(t)


def _amx_k_loop(builder, MR, NV_, a, lda, b, ldb, k4, kr, nvalid):
    """make_fused_kernel's k_loop for an MR x 64 block (MR 16 or 32) on AMX:
    a = &a'[m0, 0] (row stride lda), b = the packed panel (k4-row stride ldb
    = 256 bytes), k4 a multiple of 16, kr 0. The two 32-column halves run
    one after the other on tmm0-3 (the second only when nvalid > 32), each
    stored to the buffer as it ends, so the second half's tiles overlap the
    first half's stores and the epilogue (over all 64 columns, as the zmm
    tile's) follows once: 1 thread, 1024^3 1213 -> 1381 GOP/s against one
    32 x 32 half a call."""
    assert NV_ == 4
    assert MR in (16, 32)
    halves = MR // 16
    row = 4 * 16 * NV_  # bytes of one buffer row (64 int32)
    buf = _alloca(builder, ir.ArrayType(_i32, MR * 16 * NV_))
    base = builder.bitcast(buf, _p8)
    zero = _fn(builder, "llvm.x86.tilezero", _i8)
    k64 = builder.ashr(k4, ir.Constant(_i64, 4))

    def run(h):
        def store(t):
            off = (t // 2) * 16 * row + (t % 2) * 64 + 4 * AMX_NC * h
            _tile_store(builder, t, builder.gep(base, [ir.Constant(_i64, off)]), row)

        _half(builder, halves, a, lda, b, ldb, k64, h,
              lambda t: builder.call(zero, [ir.Constant(_i8, t)]), store)  # fmt: skip

    run(0)
    with builder.if_then(builder.icmp_signed(">", nvalid, ir.Constant(_i64, AMX_NC))):
        run(1)
    return _StoredTile(builder, buf)


def make_raw_kernel(MR):
    """An intrinsic for the epilogue that is only "+ bias" into int32 (eq. 8
    without row terms, mode 0): a whole MR x 64 block written by the tiles
    themselves, the accumulators starting from the bias (a tile load of
    stride 0 repeats its row), no stack buffer and no vector pass.
    _rtile(a, lda, b, ldb, k4, c, ldc, bias32): bias32 the address of the
    block's 64 int32 biases, c of out[m0, n0], ldc in bytes."""
    halves = MR // 16

    def codegen(context, builder, sig, args):
        a, lda, b, ldb, k4, c, ldc, bias32 = args
        k64 = builder.ashr(k4, ir.Constant(_i64, 4))
        zero64 = ir.Constant(_i64, 0)
        for h in range(2):

            def init(t, h=h):
                at = builder.add(bias32, ir.Constant(_i64, 64 * (t % 2) + 128 * h))
                _tile_load(builder, t, at, zero64)

            def store(t, h=h):
                at = builder.add(c, builder.mul(ldc, ir.Constant(_i64, 16 * (t // 2))))
                at = builder.add(at, ir.Constant(_i64, 64 * (t % 2) + 128 * h))
                f = _fn(builder, "llvm.x86.tilestored64", _i8, _p8, _i64)
                builder.call(f, [ir.Constant(_i8, t), builder.inttoptr(at, _p8), ldc])

            _half(builder, halves, a, lda, b, ldb, k64, h, init, store)
        return context.get_dummy_value()

    @intrinsic
    def _rtile(typingctx, a, lda, b, ldb, k4, c, ldc, bias32):
        return types.void(*([types.int64] * 8)), codegen

    return _rtile


# module globals, so numba's cache can name them
_atile32 = _z.make_fused_kernel(32, 4, k_loop=_amx_k_loop)
_atile16 = _z.make_fused_kernel(16, 4, k_loop=_amx_k_loop)
_rtile32 = make_raw_kernel(32)
_rtile16 = make_raw_kernel(16)


def pad_k(b, multiple):
    """b (K, N) with zero rows appended up to a multiple of `multiple` (at
    least one step: K = 0 packs one zero step)."""
    K, N = b.shape
    kp = -(-max(K, 1) // multiple) * multiple
    if kp == K:
        return b
    padded = np.zeros((kp, N), b.dtype)
    padded[:K] = b
    return padded


def pack_b(b):
    """b' (K, N) int8 -> the VNNI panel layout with K padded to a multiple of 64."""
    return _z.pack_b(pad_k(b, KB))


@njit(inline="always")
def _amx_job(t, nblk, a0, lda, Kp, a, bp, epi, narrow, bias32, out):
    # job t = (row block, N panel): the block's 32-row AMX tiles against the
    # panel, then (last block) rows past the last full 16-row tile on zmm
    # tiles; every tile over the whole K with the fused epilogue (eqs. 6-13),
    # or, where bias32 has N entries (int32 output, no row terms), a whole
    # 64-column block stored by the tiles (make_raw_kernel). Row m of a' is
    # read at a0 + m * lda (Kp bytes); a only gives M and dtype
    M = a.shape[0]
    N = out.shape[1]
    nt = (N + _z.NR - 1) // _z.NR
    mt = (M + AMX_MR - 1) // AMX_MR
    blk = t // nt
    jn = t - blk * nt
    n0 = jn * _z.NR
    b = bp.ctypes.data + jn * bp.strides[0]
    k4 = Kp // 4
    m_lo = blk * mt // nblk * AMX_MR
    m_end = min(M, (blk + 1) * mt // nblk * AMX_MR)
    m_amx = m_lo + (m_end - m_lo) // 16 * 16  # rows in whole 16-row tiles
    if m_amx > m_lo:
        nv = min(_z.NR, N - n0)
        raw = bias32.shape[0] == N and nv == _z.NR
        for m0 in range(m_lo, m_amx, AMX_MR):
            full = m0 + AMX_MR <= m_amx
            ap = a0 + m0 * lda
            if raw:
                c = out.ctypes.data + m0 * out.strides[0] + 4 * n0
                bb = bias32.ctypes.data + 4 * n0
                if full:
                    _rtile32(ap, lda, b, 4 * _z.NR, k4, c, out.strides[0], bb)
                else:
                    _rtile16(ap, lda, b, 4 * _z.NR, k4, c, out.strides[0], bb)
                continue
            args = _z._fused_args(ap, lda, b, 4 * _z.NR, k4, 0, m0, n0, nv, epi,
                                  narrow, a, out)  # fmt: skip
            if full:
                _atile32(*args)
            else:
                _atile16(*args)
    m0 = m_amx
    while m0 < m_end:
        mr = min(_z.MR_MAX, m_end - m0)
        _z.run_fused_tile(mr, a0 + m0 * lda, lda, b, k4, 0, m0, n0,
                          min(_z.NR, N - n0), epi, narrow, a, out)  # fmt: skip
        m0 += mr


# A row block's bytes (rows x Kp) kept in L2 while the job's panels stream
# past it: 1 thread, 1024^3 1104 -> 1213 GOP/s with blocks (one block of all
# 1024 rows before), 2048^3 925 -> 1414
A_BLOCK_BYTES = 1 << 19


@njit(inline="always")
def _row_blocks(M, Kp, threads):
    # row blocks per call: each at most A_BLOCK_BYTES of A (whole 32-row
    # tiles), their count a multiple of the thread count when there are
    # enough tiles (else one block: the threads split the N panels)
    mt = (M + AMX_MR - 1) // AMX_MR
    per = max(1, A_BLOCK_BYTES // (AMX_MR * Kp))
    nblk = (mt + per - 1) // per
    if mt < 2 * threads or nblk == 1:
        return 1
    return threads * ((nblk + threads - 1) // threads)


@njit(inline="always")
def _bias32(epi):
    # the raw tiles' int32 bias (make_raw_kernel), or an empty array where the
    # epilogue is more than "+ bias" into int32: row terms (eq. 8) or another
    # output type. Wrapping to int32 keeps the low 32 bits the int32 output
    # stores (the fused tile's int32 lanes do the same)
    za, rs, cs, zb, bias, mult, zy, qlo, qhi, mode, fbias = epi
    if mode != 0 or za.shape[0] > 1 or rs.shape[0] > 1:  # mode 0: int32 out
        return np.empty(0, np.int32)
    if za[0] != 0 or rs[0] != 0:
        return np.empty(0, np.int32)
    return bias.astype(np.int32)


@njit(inline="always")
def _in_place(a, Kp):
    # whether the tiles read a' itself: rows of whole 64-byte runs of K on
    # 64-byte boundaries. Tile loads from unaligned rows are slower (a tile
    # loop from L1 ran at 5.0 TOPS aligned, 3.9 with A 16 bytes off, 1.9 with
    # A and B off), so other inputs are copied, a row block at a time into
    # per-thread scratch (_amx_jobs). 3136 x 576 x 64 int32, a' 16 bytes off,
    # 1 thread: 306 us with one copy of all of a' first, 281 reading it in
    # place unaligned, 150 aligned in place (the call streams a' once)
    K = a.shape[1]
    return K == Kp and a.strides[1] == 1 and (a.ctypes.data | a.strides[0]) % 64 == 0


@njit(inline="always")
def _copy_rows(a, flip, buf, m0, m1, af, qp):
    # buf[m - m0] = a[m] ^ flip for m0 <= m < m1 (flip 0x80: int8 a, its
    # bytes as uint8, to a' = a + 128, eq. 5), K padded to Kp = buf.shape[1]
    # (any bytes would do past K: they meet zeros in the packed B; zeros are
    # written), by 32-byte moves where rows are contiguous. af with rows:
    # float32 a quantized here instead (eq. 1, scale qp[0], zero point
    # qp[1]: DynamicQuantizeLinear's, from the whole a), the uint8 a never
    # written out (dynamic_quantize_matmul, 1 thread, one process: 3136 x 576
    # x 64 232 -> 254 GOP/s, 128 x 768 x 3072 1046 -> 1172)
    K = a.shape[1]
    Kp = buf.shape[1]
    if af.shape[0] != 0:
        s = np.float32(qp[0])
        for m in range(m0, m1):
            r = m - m0
            _quantize_block(af[m], s, qp[1], 0.0, 255.0, buf[r])
            for k in range(K, Kp):
                buf[r, k] = 0
        return
    for m in range(m0, m1):
        r = m - m0
        if K >= 8 and a.strides[1] == 1:
            copy_bytes(buf.ctypes.data + r * Kp, a.ctypes.data + m * a.strides[0], K)
            if flip:
                for k in range(K):
                    buf[r, k] ^= flip
        else:
            for k in range(K):
                buf[r, k] = a[m, k] ^ flip
        for k in range(K, Kp):
            buf[r, k] = 0


@njit(nogil=True, cache=True)
def _amx_jobs(t0, t1, nblk, copy, flip, buf, Kp, a, bp, epi, narrow, bias32, out, af,
              qp):  # fmt: skip
    # jobs t0..t1-1 on this thread, inside one tile configuration: ldtilecfg
    # costs ~55 ns (with tilerelease) and waits for the tile instructions
    # before it: one per thread instead of one per job took a 32 x 384 x 1536
    # int32 kernel call (1 thread) from 32.9 to 19.6 us; inlining _amx_job
    # (no call, no 11 array reference counts per job) to 18.2 us, and a
    # 64-column job at 16 x 64 x 2048 from 620 to 366 ns. copy: a' is read
    # from buf (this thread's (rows, Kp) scratch), each row block copied in
    # as the thread reaches it (_in_place), its bytes XOR flip
    M = a.shape[0]
    nt = (out.shape[1] + _z.NR - 1) // _z.NR
    mt = (M + AMX_MR - 1) // AMX_MR
    a0 = a.ctypes.data
    lda = a.strides[0]
    cur = -1
    amx_begin()
    for t in range(t0, t1):
        blk = t // nt
        if copy and blk != cur:
            m_lo = blk * mt // nblk * AMX_MR
            _copy_rows(a, flip, buf, m_lo, min(M, (blk + 1) * mt // nblk * AMX_MR), af,
                       qp)  # fmt: skip
            a0 = buf.ctypes.data - m_lo * Kp
            lda = Kp
            cur = blk
        _amx_job(t, nblk, a0, lda, Kp, a, bp, epi, narrow, bias32, out)
    amx_end()


@njit(cache=True)
def block_rows(M, Kp, threads):
    """Rows of the largest row block (the per-thread scratch of a' copies)."""
    mt = (M + AMX_MR - 1) // AMX_MR
    nblk = _row_blocks(M, Kp, threads)
    return min(M, (mt + nblk - 1) // nblk * AMX_MR)


@njit(parallel=True, nogil=True, cache=True)
def gemm_fused(a, flip, pad, bp, epi, out, threads, pmax, af, qp):
    # a (M, K) uint8 (any strides): a' (flip 0), or int8 a's bytes (flip
    # 0x80: always copied, flipped as it is); pad (threads, block_rows, Kp) uint8
    # scratch, Kp = 4 * bp.shape[1]; bp: pack_b's array; out (M, N) with unit
    # column stride; threads, pmax: as int8_gemm_vnni.gemm_fused; af (M, K)
    # C-contiguous float32 and qp (scale, zero point) float64: a' is af
    # quantized as the row blocks are copied (a: any (M, K) uint8, unread),
    # else af is (0, 0). One run of jobs per thread, split as prange would
    # split them
    Kp = pad.shape[2]
    copy = flip != 0 or not _in_place(a, Kp) or af.shape[0] != 0
    nt = (out.shape[1] + _z.NR - 1) // _z.NR
    nblk = _row_blocks(a.shape[0], Kp, threads)
    narrow = _z.narrow_epilogue(epi, Kp, pmax)
    bias32 = _bias32(epi)
    jobs = nblk * nt
    for i in prange(threads):
        _amx_jobs(i * jobs // threads, (i + 1) * jobs // threads, nblk, copy, flip,
                  pad[i], Kp, a, bp, epi, narrow, bias32, out, af, qp)  # fmt: skip


@njit(nogil=True, cache=True)
def gemm_fused_serial(a, flip, pad, bp, epi, out, pmax, af, qp):
    # gemm_fused on the calling thread (pad (1, block_rows, Kp))
    Kp = pad.shape[2]
    nt = (out.shape[1] + _z.NR - 1) // _z.NR
    nblk = _row_blocks(a.shape[0], Kp, 1)
    narrow = _z.narrow_epilogue(epi, Kp, pmax)
    copy = flip != 0 or not _in_place(a, Kp) or af.shape[0] != 0
    _amx_jobs(0, nblk * nt, nblk, copy, flip, pad[0], Kp, a, bp, epi, narrow,
              _bias32(epi), out, af, qp)  # fmt: skip


def make_peak_loop(nacc, op="llvm.x86.tdpbusd"):
    """The peak probe's intrinsic (int8_gemm_vnni.measure_peak): iters x nacc
    tdpbusd (or op: bf16_gemm_amx's tdpbf16ps) on the four accumulator tiles
    in turn, tiles only (no memory in the loop); returns 0 (the tile results
    are never read)."""

    def codegen(context, builder, sig, args):
        iters, seed = args
        aty = ir.ArrayType(_i8, 64)
        cfg = _alloca(builder, aty)
        builder.store(ir.Constant(aty, _config_bytes()), cfg)
        ldcfg = _fn(builder, "llvm.x86.ldtilecfg", _p8)
        builder.call(ldcfg, [builder.bitcast(cfg, _p8)])
        zero = _fn(builder, "llvm.x86.tilezero", _i8)
        for t in range(8):
            builder.call(zero, [ir.Constant(_i8, t)])

        def step(k, carried):
            for j in range(nacc):
                _tdpbusd(builder, j % 4, 4 + (j // 2) % 2, 6 + j % 2, op)
            return []

        _ir_loop(builder, ir.Constant(_i64, 0), iters, [], step, guard=False, name="pk")
        builder.call(_fn(builder, "llvm.x86.tilerelease"), [])
        return ir.Constant(_i32, 0)

    @intrinsic
    def _loop(typingctx, iters, seed):
        return types.int32(types.int64, types.int64), codegen

    return _loop
