"""AVX-512 VNNI INT8 GEMM: ``vpdpbusd zmm`` through numba @intrinsic + llvmlite IR.

Computes lowprec's raw product (docs/quantization.md, eq. 6)

    P[m, n] = sum_k a'[m, k] * b'[k, n]      a' uint8, b' int8, P int32 (wrapping)

  a'  (M, K) uint8 with unit column stride (any row stride). K % 4 != 0 needs no
      copy when K >= 4: the last partial group of 4 bytes is loaded from
      [K-4, K) of the row (always in bounds) and shifted so that only the tail
      bytes remain; they meet zeros in the packed B.
  b'  packed by :func:`pack_b` panel-major: [NP][K4][NR][4] int8, NP = ceil(N/NR),
      K4 = ceil(K/4), packed[p, k4, j, i] = b'[4*k4 + i, NR*p + j], zero padded.
      One register tile streams one contiguous panel.
  out (M, N) int32, any row stride, fully overwritten.

Kernel: a register tile of MR x NR = 6 x 64 int32 (24 zmm accumulators). The
whole K loop of one tile is one LLVM loop built with llvmlite inside one
@intrinsic, so the accumulators stay in registers (phi nodes). Per step of 4 k:
MR 4-byte loads of A broadcast to zmm (vpbroadcastd), NV = 4 64-byte loads of
B, MR * NV vpdpbusd. M tail: kernels for MR = 1..5. N tail: vectors past the
valid columns are clamped to the last valid one and stores are masked.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .requant import epilogue_tile

# ---------------------------------------------------------------------------
# Tile shape.  Compile-time constants (NOT env knobs: numba's cache would not
# see a change).  Sweep at KC=1024, 1 thread, GOP/s (peak 436-454):
#   6x64 : 1024^3 371, 2048^3 356, 128x3072x768 348, 16x1536x384 367, 3136x64x576 410
#   8x48 : 366 / 364 / 346 / 398 / 284 (N=64 -> 48+16 tail wastes 1/3)
#   12x32: 371 / 353 / 356 / 359 / 417      14x32: 364/353/337/320/407
#   4x96 : 356 / 311 / 324 / 353 / 269      5x80 : 365/294/339/354/341
# -> 6 x 64 (24 zmm accumulators + 4 B + 1 A broadcast = 29 zmm, no spills).
MR_MAX = 6  # rows per register tile (kernels for 1..MR_MAX are built)
NV = 4  # zmm vectors per row -> NR = 64 columns
NR = 16 * NV
# Software prefetch of B PF_DIST k4-rows ahead: 4/8/16 gave no measurable gain
# (within the +-10% noise of this shared VM), so off.
PF_DIST = 0

_i1 = ir.IntType(1)
_i8 = ir.IntType(8)
_i32 = ir.IntType(32)
_i64 = ir.IntType(64)
_v16 = ir.VectorType(_i32, 16)
_m16 = ir.VectorType(_i1, 16)


def _vpdpbusd(builder):
    fnty = ir.FunctionType(_v16, [_v16, _v16, _v16])
    return cgutils.get_or_insert_function(
        builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512"
    )


def _masked_load(builder, ptr, mask):
    # <16 x i32> @llvm.masked.load.v16i32.p0(ptr, i32 align, <16 x i1>, passthru)
    fnty = ir.FunctionType(_v16, [_v16.as_pointer(), _i32, _m16, _v16])
    fn = cgutils.get_or_insert_function(
        builder.module, fnty, "llvm.masked.load.v16i32.p0"
    )
    return builder.call(fn, [ptr, ir.Constant(_i32, 4), mask, ir.Constant(_v16, None)])


def _masked_store(builder, val, ptr, mask):
    fnty = ir.FunctionType(ir.VoidType(), [_v16, _v16.as_pointer(), _i32, _m16])
    fn = cgutils.get_or_insert_function(
        builder.module, fnty, "llvm.masked.store.v16i32.p0"
    )
    builder.call(fn, [val, ptr, ir.Constant(_i32, 4), mask])


_loop_counter = [0]


def _no_unroll(builder, br):
    """Attach !llvm.loop !{self, !{"llvm.loop.unroll.disable"}} to the latch.

    Why: without it LLVM unrolls the 6x4 loop by 2, needs 2 sets of B/A
    registers and spills accumulators to the stack (measured ~2x slower).
    llvmlite has no 'distinct' MDValue, so we build a self-referential node by
    patching .operands (unique string keeps it out of the metadata cache).
    """
    mod = builder.module
    _loop_counter[0] += 1
    dis = mod.add_metadata([ir.MetaDataString(mod, "llvm.loop.unroll.disable")])
    tag = ir.MetaDataString(mod, f"vnni.loop.{_loop_counter[0]}")
    loop_id = mod.add_metadata([tag, dis])
    loop_id.operands = (loop_id, dis)
    br.set_metadata("llvm.loop", loop_id)


def _splat(builder, x32):
    """i32 scalar -> <16 x i32> broadcast (becomes vpbroadcastd zmm, m32)."""
    undef = ir.Constant(_v16, ir.Undefined)
    v = builder.insert_element(undef, x32, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, undef, ir.Constant(_v16, None))


def _gep8(builder, p, off):
    return builder.gep(p, [off])


def _load_i32(builder, p8):
    ptr = builder.bitcast(p8, _i32.as_pointer())
    ld = builder.load(ptr, align=1)
    return ld


def _load_v16(builder, p8):
    ptr = builder.bitcast(p8, _v16.as_pointer())
    return builder.load(ptr, align=1)


def make_tile_kernel(MR, NV_):
    """Build an intrinsic computing one MR x (16*NV_) tile over a K range.

    _tile(a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum)   all int64
      a      : address of A[m0, k0]             (uint8, row stride lda bytes)
      b      : address of packed[k0/4, n0, 0]   (int8, k4-row stride ldb bytes
               = 4*Npad); vectors v*64 bytes apart.
      k4     : number of full 4-byte K groups in this K block
      kr     : 0..3, remaining K bytes after the k4 groups (only for the last
               K block); needs >= 4 bytes of the A row before the tail end.
      c      : address of out[m0, n0] (int32, row stride ldc elements)
      nvalid : valid columns in this tile (1..16*NV_); rest masked off
      accum  : 0 -> C = tile, 1 -> C += tile
    """
    NRB = 64  # bytes of one B vector (16 columns x 4 k-bytes)

    def codegen(context, builder, sig, args):
        a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum = args
        vpd = _vpdpbusd(builder)
        i8p = _i8.as_pointer()
        zero64 = ir.Constant(_i64, 0)
        one64 = ir.Constant(_i64, 1)

        a_base = builder.inttoptr(a, i8p)
        b_base = builder.inttoptr(b, i8p)
        # row pointers of A
        a_rows = [
            _gep8(builder, a_base, builder.mul(lda, ir.Constant(_i64, r)))
            for r in range(MR)
        ]
        # clamped B vector byte offsets: min(v, nvec-1) * 64, nvec = ceil(nvalid/16)
        nvec = builder.udiv(
            builder.add(nvalid, ir.Constant(_i64, 15)), ir.Constant(_i64, 16)
        )
        last = builder.sub(nvec, one64)
        b_offs = []
        for v in range(NV_):
            cv = ir.Constant(_i64, v)
            vv = builder.select(builder.icmp_signed("<", cv, last), cv, last)
            b_offs.append(builder.mul(vv, ir.Constant(_i64, NRB)))

        zero_v = ir.Constant(_v16, None)
        fn = builder.function
        pre = builder.block
        loop = fn.append_basic_block("vnni.loop")
        after = fn.append_basic_block("vnni.after")
        builder.cbranch(builder.icmp_signed(">", k4, zero64), loop, after)

        # ---- main K loop: accumulators as phi nodes -> stay in zmm registers
        builder.position_at_end(loop)
        kphi = builder.phi(_i64, "k")
        kphi.add_incoming(zero64, pre)
        acc_phis = []
        for _ in range(MR * NV_):
            p = builder.phi(_v16)
            p.add_incoming(zero_v, pre)
            acc_phis.append(p)
        k_bytes = builder.shl(kphi, ir.Constant(_i64, 2))
        b_row = _gep8(builder, b_base, builder.mul(kphi, ldb))
        bvecs = [
            _load_v16(builder, _gep8(builder, b_row, b_offs[v])) for v in range(NV_)
        ]
        if PF_DIST > 0:
            # software prefetch of the B row PF_DIST k4-steps ahead
            pf = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32]),
                "llvm.prefetch.p0",
            )
            b_pf = _gep8(builder, b_row, builder.mul(ldb, ir.Constant(_i64, PF_DIST)))
            for v in range(NV_):
                builder.call(
                    pf,
                    [
                        _gep8(builder, b_pf, ir.Constant(_i64, 64 * v)),
                        ir.Constant(_i32, 0),
                        ir.Constant(_i32, 3),
                        ir.Constant(_i32, 1),
                    ],
                )
        new_accs = []
        for r in range(MR):
            av = _splat(builder, _load_i32(builder, _gep8(builder, a_rows[r], k_bytes)))
            for v in range(NV_):
                # operand 2 = unsigned bytes (A), operand 3 = signed bytes (B)
                new_accs.append(
                    builder.call(vpd, [acc_phis[r * NV_ + v], av, bvecs[v]])
                )
        knext = builder.add(kphi, one64)
        loop_end = builder.block
        kphi.add_incoming(knext, loop_end)
        for p, nv in zip(acc_phis, new_accs, strict=True):
            p.add_incoming(nv, loop_end)
        br = builder.cbranch(builder.icmp_signed("<", knext, k4), loop, after)
        _no_unroll(builder, br)

        # ---- after loop: merge, then optional K tail (kr bytes)
        builder.position_at_end(after)
        accs = []
        for i in range(MR * NV_):
            p = builder.phi(_v16)
            p.add_incoming(zero_v, pre)
            p.add_incoming(new_accs[i], loop_end)
            accs.append(p)
        tail = fn.append_basic_block("vnni.tail")
        store = fn.append_basic_block("vnni.store")
        after_end = builder.block
        builder.cbranch(builder.icmp_signed(">", kr, zero64), tail, store)

        builder.position_at_end(tail)
        # bytes [4*k4, 4*k4+kr) of each row: load the 4 bytes ending at the
        # tail end (always inside the row) and shift out the (4-kr) low bytes.
        k_bytes_t = builder.shl(k4, ir.Constant(_i64, 2))
        back = builder.sub(ir.Constant(_i64, 4), kr)
        shift = builder.trunc(builder.shl(back, ir.Constant(_i64, 3)), _i32)
        b_row = _gep8(builder, b_base, builder.mul(k4, ldb))
        bvecs = [
            _load_v16(builder, _gep8(builder, b_row, b_offs[v])) for v in range(NV_)
        ]
        tail_accs = []
        for r in range(MR):
            p = _gep8(
                builder,
                a_rows[r],
                builder.sub(builder.add(k_bytes_t, kr), ir.Constant(_i64, 4)),
            )
            x = builder.lshr(_load_i32(builder, p), shift)
            av = _splat(builder, x)
            for v in range(NV_):
                tail_accs.append(builder.call(vpd, [accs[r * NV_ + v], av, bvecs[v]]))
        tail_end = builder.block
        builder.branch(store)

        # ---- store the tile (masked on columns), optionally accumulating
        builder.position_at_end(store)
        fin = []
        for i in range(MR * NV_):
            p = builder.phi(_v16)
            p.add_incoming(accs[i], after_end)
            p.add_incoming(tail_accs[i], tail_end)
            fin.append(p)
        lanes = ir.Constant(ir.VectorType(_i64, 16), list(range(16)))
        nv_splat = builder.insert_element(
            ir.Constant(ir.VectorType(_i64, 16), ir.Undefined),
            nvalid,
            ir.Constant(_i32, 0),
        )
        nv_splat = builder.shuffle_vector(nv_splat, nv_splat, ir.Constant(_v16, None))
        acc_flag = builder.icmp_signed("!=", accum, zero64)
        acc_mask_s = builder.insert_element(
            ir.Constant(_m16, ir.Undefined), acc_flag, ir.Constant(_i32, 0)
        )
        acc_mask = builder.shuffle_vector(
            acc_mask_s, acc_mask_s, ir.Constant(_v16, None)
        )
        masks = []
        for v in range(NV_):
            col = builder.add(
                lanes, ir.Constant(ir.VectorType(_i64, 16), [16 * v] * 16)
            )
            masks.append(builder.icmp_signed("<", col, nv_splat))
        c_base = builder.inttoptr(c, _i32.as_pointer())
        for r in range(MR):
            c_row = builder.gep(c_base, [builder.mul(ldc, ir.Constant(_i64, r))])
            for v in range(NV_):
                cp = builder.bitcast(
                    builder.gep(c_row, [ir.Constant(_i64, 16 * v)]), _v16.as_pointer()
                )
                old = _masked_load(builder, cp, builder.and_(masks[v], acc_mask))
                val = builder.add(fin[r * NV_ + v], old)
                _masked_store(builder, val, cp, masks[v])
        return context.get_dummy_value()

    @intrinsic
    def _tile(typingctx, a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum):
        sig = types.void(
            types.int64,
            types.int64,
            types.int64,
            types.int64,
            types.int64,
            types.int64,
            types.int64,
            types.int64,
            types.int64,
            types.int64,
        )
        return sig, codegen

    return _tile


# One module-level intrinsic per row count (module globals, so numba's cache
# can refer to them by name) and an inlined dispatcher on the row count.
_tile1 = make_tile_kernel(1, NV)
_tile2 = make_tile_kernel(2, NV)
_tile3 = make_tile_kernel(3, NV)
_tile4 = make_tile_kernel(4, NV)
_tile5 = make_tile_kernel(5, NV)
_tile6 = make_tile_kernel(6, NV)
assert MR_MAX == 6


@njit(inline="always")
def _run_tile(mr, a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum):
    if mr == 6:
        _tile6(a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum)
    elif mr == 5:
        _tile5(a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum)
    elif mr == 4:
        _tile4(a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum)
    elif mr == 3:
        _tile3(a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum)
    elif mr == 2:
        _tile2(a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum)
    else:
        _tile1(a, lda, b, ldb, k4, kr, c, ldc, nvalid, accum)


# ---------------------------------------------------------------------------
# packing and the driver


def pack_b(b):
    """b' (K, N) int8 -> panel-major [NP][K4][NR][4] int8, 64-byte aligned."""
    K, N = b.shape
    K4 = (K + 3) // 4
    NP = (N + NR - 1) // NR
    raw = np.zeros(NP * K4 * NR * 4 + 64, dtype=np.int8)
    off = (-raw.ctypes.data) % 64
    packed = raw[off : off + NP * K4 * NR * 4].reshape(NP, K4, NR, 4)
    padded = np.zeros((K4 * 4, NP * NR), dtype=np.int8)
    padded[:K, :N] = b
    # [K4, 4, NP, NR] -> [NP, K4, NR, 4]
    packed[...] = padded.reshape(K4, 4, NP, NR).transpose(2, 0, 3, 1)
    packed.flags.writeable = False
    return packed


# K block (bytes of K) for M >= SMALL_M. 1 thread, GOP/s for 1024^3 / 2048^3 /
# 128x3072x768 (row-major B layout, before the panel-major change):
#   KC=128: 250/197/295   256: 308/261/339   1024: 387/375/373   no blocking:
#   378/377/348. Small KC loses to per-tile overhead (prologue, masked C
# load/store per block); 1024 keeps a tile's B panel (KC*64 = 64 KiB) in L2.
KC = 1024
# Below this many rows every tile runs the whole K at once: nothing is reused
# across tiles anyway and reloading C per K block only costs bandwidth.
SMALL_M = 4 * MR_MAX


@njit(parallel=True, nogil=True, cache=True)
def gemm_u8s8(a, bp, out, kc):
    # a (M,K) uint8, bp (NP,K4,NR,4) int8, out (M,N) int32 = a @ b' (eq. 6)
    M, K = a.shape
    N = out.shape[1]
    k4full = K // 4
    kr = K - 4 * k4full
    lda = a.strides[0]
    ldb = NR * 4
    panel = bp.strides[0]
    ldc = out.strides[0] // 4
    a0 = a.ctypes.data
    b0 = bp.ctypes.data
    c0 = out.ctypes.data
    mt = (M + MR_MAX - 1) // MR_MAX
    nt = (N + NR - 1) // NR
    kc4 = max(kc // 4, 1)
    nkb = max(1, (k4full + kc4 - 1) // kc4)
    for kb in range(nkb):
        k40 = kb * kc4
        k4n = min(kc4, k4full - k40)
        krb = kr if kb == nkb - 1 else 0
        accum = 1 if kb > 0 else 0
        # N-major tile order: prange hands each thread a contiguous range, so a
        # thread streams its own B panels once and reuses each across M tiles
        for t in prange(mt * nt):
            jn = t // mt
            im = t - jn * mt
            m0 = im * MR_MAX
            n0 = jn * NR
            mr = min(MR_MAX, M - m0)
            nvalid = min(NR, N - n0)
            _run_tile(
                mr,
                a0 + m0 * lda + 4 * k40,
                lda,
                b0 + jn * panel + k40 * ldb,
                ldb,
                k4n,
                krb,
                c0 + (m0 * ldc + n0) * 4,
                ldc,
                nvalid,
                accum,
            )


# Not inlined into the prange drivers on purpose: numba's parfor passes copy and
# rewrite the whole loop body, and with the tile kernels and the epilogue inlined
# there they took minutes per driver variant; as a call they take seconds.
@njit(nogil=True, cache=True)
def _tile_job(t, mt, a, bp, scratch, epi, out):
    # one MR x NR output tile over the whole K, then the fused epilogue (eq. 8-13)
    za, rs, cs, zb, bias, mult, zy, qlo, qhi, mode, fbias = epi
    M, K = a.shape
    N = out.shape[1]
    k4 = K // 4
    jn = t // mt
    m0 = (t - jn * mt) * MR_MAX
    n0 = jn * NR
    mr = min(MR_MAX, M - m0)
    nvalid = min(NR, N - n0)
    # one scratch row: the serial drivers get a 1-row scratch and never ask for a
    # thread id (numba.get_thread_id outside a parallel region can crash a
    # process whose threading layer is not started yet)
    tile = scratch[numba.get_thread_id() if scratch.shape[0] > 1 else 0]
    _run_tile(
        mr,
        a.ctypes.data + m0 * a.strides[0],
        a.strides[0],
        bp.ctypes.data + jn * bp.strides[0],
        NR * 4,
        k4,
        K - 4 * k4,
        tile.ctypes.data,
        NR,
        nvalid,
        0,
    )
    epilogue_tile(
        tile,
        mr,
        nvalid,
        m0,
        n0,
        za,
        rs,
        cs,
        zb,
        bias,
        mult,
        zy,
        qlo,
        qhi,
        mode,
        out,
        fbias,
    )


@njit(parallel=True, nogil=True, cache=True)
def gemm_fused(a, bp, scratch, epi, out):
    # a (M,K>=4) uint8, bp (NP,K4,NR,4) int8, scratch (threads,MR,NR) int32,
    # out (M,N) int32|uint8|int8|float32. N-major tile order: prange gives each
    # thread a contiguous range, so a thread streams its own B panels once.
    mt = (a.shape[0] + MR_MAX - 1) // MR_MAX
    nt = (out.shape[1] + NR - 1) // NR
    for t in prange(mt * nt):
        _tile_job(t, mt, a, bp, scratch, epi, out)


@njit(nogil=True, cache=True)
def gemm_fused_serial(a, bp, scratch, epi, out):
    # as gemm_fused on the calling thread: tiny problems skip the ~4 us pool launch
    mt = (a.shape[0] + MR_MAX - 1) // MR_MAX
    nt = (out.shape[1] + NR - 1) // NR
    for t in range(mt * nt):
        _tile_job(t, mt, a, bp, scratch, epi, out)


def gemm(a_u8, packed, out):
    """Raw P = a' @ b' into int32 out (the K-chunked path for very large K)."""
    M, K = a_u8.shape
    if M == 0 or out.shape[1] == 0:
        return
    if K == 0:
        out[...] = 0
        return
    if K < 4:  # the tail trick needs 4 bytes of row; pad the (tiny) A instead
        padded = np.zeros((M, 4), np.uint8)
        padded[:, :K] = a_u8
        a_u8 = padded
    kc = K + 4 if M < SMALL_M else KC
    gemm_u8s8(a_u8, packed, out, kc)


# ---------------------------------------------------------------------------
# the machine's peak, for "% of peak" in benchmarks

_NACC = 12  # independent accumulators: >= latency x throughput of vpdpbusd


@intrinsic
def _peak_loop(typingctx, iters, seed):
    """iters x 12 register-only vpdpbusd zmm; returns a checksum (keeps it live)."""
    sig = types.int32(types.int64, types.int64)

    def codegen(context, builder, sig, args):
        iters, seed = args
        vpd = _vpdpbusd(builder)
        s32 = builder.trunc(seed, _i32)
        a = _splat(builder, s32)
        b = _splat(builder, builder.add(s32, ir.Constant(_i32, 0x01010101)))
        pre = builder.block
        loop = builder.function.append_basic_block("pk.loop")
        done = builder.function.append_basic_block("pk.done")
        builder.branch(loop)
        builder.position_at_end(loop)
        k = builder.phi(_i64)
        k.add_incoming(ir.Constant(_i64, 0), pre)
        accs = []
        for j in range(_NACC):
            p = builder.phi(_v16)
            p.add_incoming(ir.Constant(_v16, [j] * 16), pre)
            accs.append(p)
        new = [builder.call(vpd, [p, a, b]) for p in accs]
        kn = builder.add(k, ir.Constant(_i64, 1))
        k.add_incoming(kn, loop)
        for p, n in zip(accs, new, strict=True):
            p.add_incoming(n, loop)
        br = builder.cbranch(builder.icmp_signed("<", kn, iters), loop, done)
        _no_unroll(builder, br)
        builder.position_at_end(done)
        s = new[0]
        for n in new[1:]:
            s = builder.xor(s, n)
        return builder.extract_element(s, ir.Constant(_i32, 0))

    return sig, codegen


@njit(parallel=True, cache=True)
def _peak(iters, nthreads):
    out = np.zeros(nthreads, np.int32)
    for t in prange(nthreads):
        out[t] = _peak_loop(iters, t + 3)
    return out


def measure_peak(threads: int, iters: int = 2_000_000, repeat: int = 7) -> float:
    """vpdpbusd zmm GOP/s of this machine on `threads` threads (best of `repeat`).

    The best, not the median: the peak is a property of the hardware, and on a
    shared VM any slower sample measures the neighbours.
    """
    import time

    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        _peak(1000, threads)
        best = 0.0
        for _ in range(repeat):
            t0 = time.perf_counter()
            _peak(iters, threads)
            dt = time.perf_counter() - t0
            best = max(best, threads * iters * _NACC * 16 * 4 * 2 / dt / 1e9)
        return best
    finally:
        numba.set_num_threads(before)
