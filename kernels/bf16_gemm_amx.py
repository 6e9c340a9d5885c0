"""AMX BF16 GEMM: ``tdpbf16ps`` tiles through numba @intrinsic + llvmlite IR.

Computes matmul_bf16's float32 sums (lowprec/half.py) on CPUs with AMX-BF16
(Intel Sapphire Rapids and later), in the order this instruction sums them:

    acc = +0;  for each block i of 32 k (K zero-padded to a multiple of 32):
        E = fl32 sum of a[m, 32i+2j]   * b[32i+2j, n],   j = 0..15 ascending
        O = fl32 sum of a[m, 32i+2j+1] * b[32i+2j+1, n], j = 0..15 ascending
        acc = fl32(acc + fl32(E + O))

  E and O start at +0 and round once per step: a fused multiply-add (a
  product of two bfloat16 values is exact in float32 unless it leaves
  float32's range; one that overflows is not rounded to inf before the add,
  tests/test_half.py checks 2**128 - 1.5 * 2**127); subnormal inputs,
  products, sums and results are zero (DAZ/FTZ). The Intel SDM's pseudocode
  for TDPBF16PS keeps even and odd sums apart over the instruction's 16 pairs
  of k and adds them into the accumulator at its end; that model gave the
  hardware's bits on every one of 2304 random outputs (exponents spread over
  2**-24..2**24, 1-4 instructions) on a Sapphire-Rapids-class Xeon, where
  sequential pair orders and a rounded 32-term sum each missed 10-80 % of them.

  a   (M, K) bfloat16 bits, rows read as Kp = K padded to a multiple of 32
      (in place where K == Kp and the rows are 64-byte aligned, else copied a
      row block at a time into per-thread scratch, zeros past K).
  b   :func:`pack_b`: fp16_gemm.pack_b_bf16's [NP][Kp/2][64][2] layout with
      K zero-padded to Kp: a B tile (16 pairs of k x 16 columns) is 16 rows
      256 bytes apart inside one panel, as the int8 tiles' VNNI panels.
  out (M, N) float32, or bfloat16 / float16 bits, through fp16_gemm's epilogue.

Block: 32 x 64 float32 outputs as two 32-column halves, each on four 16 x 16
accumulator tiles (tmm0-3) fed by two 16-row A tiles (tmm4-5) and two B tiles
(tmm6-7): per 32 k, four tile loads and four tdpbf16ps (int8_gemm_amx._half
with this instruction). Each block covers all of K, so every output sums in
the order above whatever the blocking; rows past the last whole 32-row step
run from a zero-padded copy, so a row's bits never depend on M.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import fp16_gemm as _h
from . import int8_gemm_amx as _amx
from .config import JIT, PJIT
from .layout import copy_bytes

_i8 = ir.IntType(8)
_i64 = ir.IntType(64)

BM = 32  # rows of a block (two 16-row A tiles)
NR = _h.NR  # columns of a block (one packed panel: four 16-column B tiles)
KB = 32  # bfloat16 k per tile row (64 bytes)
_OP = "llvm.x86.tdpbf16ps"
assert NR == 64


def make_block_kernel(MR):
    """_blk(a, lda, b, k32, c, ldc, nvalid): the MR x 64 float32 sums (MR 16
    or 32) of rows at a (row stride lda bytes) against the panel at b over
    k32 blocks of 32 k, stored at c (row stride ldc bytes); the second
    32-column half only when nvalid > 32."""
    halves = MR // 16

    def codegen(context, builder, sig, args):
        a, lda, b, k32, c, ldc, nvalid = args
        zero = _amx._fn(builder, "llvm.x86.tilezero", _i8)
        st = _amx._fn(builder, "llvm.x86.tilestored64", _i8, _amx._p8, _i64)

        def run(h):
            def store(t):
                at = builder.add(c, builder.mul(ldc, ir.Constant(_i64, 16 * (t // 2))))
                at = builder.add(at, ir.Constant(_i64, 64 * (t % 2) + 128 * h))
                at = builder.inttoptr(at, _amx._p8)
                builder.call(st, [ir.Constant(_i8, t), at, ldc])

            _amx._half(builder, halves, a, lda, b, ir.Constant(_i64, 4 * NR), k32, h,
                       lambda t: builder.call(zero, [ir.Constant(_i8, t)]), store,
                       op=_OP)  # fmt: skip

        run(0)
        with builder.if_then(builder.icmp_signed(">", nvalid, ir.Constant(_i64, 32))):
            run(1)
        return context.get_dummy_value()

    @intrinsic
    def _blk(typingctx, a, lda, b, k32, c, ldc, nvalid):
        return types.void(*([types.int64] * 7)), codegen

    return _blk


# module globals, so numba's cache can name them
_blk32 = make_block_kernel(32)
_blk16 = make_block_kernel(16)


def pack_b(b16):
    """b (K, N) bfloat16 bits -> pack_b_bf16's layout with K padded to 32."""
    K, N = b16.shape
    kp = -(-max(K, 1) // KB) * KB
    if kp != K:
        padded = np.zeros((kp, N), np.uint16)
        padded[:K] = b16
        b16 = padded
    return _h.pack_b_bf16(b16)


@njit(inline="always")
def _copy_rows(a, buf, m0, m1):
    # buf[m - m0, :K] = a[m], zeros to Kp (buf's width), for m0 <= m < m1
    K = a.shape[1]
    Kp = buf.shape[1]
    for m in range(m0, m1):
        r = m - m0
        if K >= 4 and a.strides[1] == 2:
            copy_bytes(buf.ctypes.data + 2 * r * Kp, a.ctypes.data + m * a.strides[0],
                       2 * K)  # fmt: skip
        else:
            for k in range(K):
                buf[r, k] = a[m, k]
        for k in range(K, Kp):
            buf[r, k] = 0


@njit(inline="always")
def _in_place(a, Kp):
    # rows of whole 64-byte runs of K on 64-byte boundaries (int8_gemm_amx:
    # unaligned tile loads ran 1.3-2.6x slower)
    K = a.shape[1]
    return K == Kp and a.strides[1] == 2 and (a.ctypes.data | a.strides[0]) % 64 == 0


@njit(inline="always")
def _block_span(blk, nblk, M):
    mt = (M + BM - 1) // BM
    return blk * mt // nblk * BM, min(M, (blk + 1) * mt // nblk * BM)


@njit(nogil=True, cache=True)
def _jobs(t0, t1, nblk, copy, a, buf, tail, bp, tile, bias, has_bias, lo, hi, mode,
          out32, out16):  # fmt: skip
    # jobs t0..t1-1 (row block t // nt, panel t % nt) on this thread, inside
    # one tile configuration. copy: a is read from buf (this row block's
    # rows, copied as the thread reaches the block); else in place, but for
    # a block's last rows when they are not a whole 32-row step: those are
    # copied into tail (zero-padded to 32 rows) once per block
    M = a.shape[0]
    N = out32.shape[1] if mode == 0 else out16.shape[1]
    nt = (N + NR - 1) // NR
    Kp = buf.shape[1]
    k32 = Kp // KB
    direct = mode == 0 and not has_bias and lo == -np.inf and hi == np.inf
    cur = -1
    cur_tail = -1
    _amx.amx_begin()
    for t in range(t0, t1):
        blk = t // nt
        jn = t - blk * nt
        n0 = jn * NR
        nc = min(NR, N - n0)
        b = bp.ctypes.data + jn * bp.strides[0]
        m_lo, m_end = _block_span(blk, nblk, M)
        if copy and blk != cur:
            _copy_rows(a, buf, m_lo, m_end)
            cur = blk
        for m0 in range(m_lo, m_end, BM):
            mr = min(BM, m_end - m0)
            if copy:
                src, lda = buf.ctypes.data + 2 * Kp * (m0 - m_lo), 2 * Kp
            elif mr == BM:
                src, lda = a.ctypes.data + m0 * a.strides[0], a.strides[0]
            else:
                if cur_tail != blk:
                    _copy_rows(a, tail, m0, m_end)
                    cur_tail = blk
                src, lda = tail.ctypes.data, 2 * Kp
            if direct and nc == NR and mr % 16 == 0:
                # plain float32 output: the tiles store into out
                c = out32.ctypes.data + m0 * out32.strides[0] + 4 * n0
                if mr == BM:
                    _blk32(src, lda, b, k32, c, out32.strides[0], nc)
                else:
                    _blk16(src, lda, b, k32, c, out32.strides[0], nc)
                continue
            if mr > 16:
                _blk32(src, lda, b, k32, tile.ctypes.data, 4 * NR, nc)
            else:
                _blk16(src, lda, b, k32, tile.ctypes.data, 4 * NR, nc)
            _h._epilogue_simd(tile, mr, nc, m0, n0, bias, has_bias, lo, hi, mode,
                              out32, out16)  # fmt: skip
    _amx.amx_end()


@njit(cache=True)
def block_rows(M, Kp, threads):
    """Rows of the largest row block, whole 32-row steps (buf's rows)."""
    mt = (M + BM - 1) // BM
    nblk = _amx._row_blocks(M, 2 * Kp, threads)
    return (mt + nblk - 1) // nblk * BM


# a: (M, K) uint16 bfloat16 bits, any strides; bp: pack_b's array; buf
# (threads, block_rows, Kp) and tail (threads, BM, Kp) uint16 scratch; tile
# (threads, BM, NR) float32 scratch; out32 (M, N) float32 when mode == 0,
# else out16 (M, N) uint16 bits (fp16_gemm's epilogue modes)


@njit(**PJIT)
def gemm(a, bp, buf, tail, tile, bias, has_bias, lo, hi, mode, out32, out16, threads):
    # one run of jobs per thread, row blocks of at most A_BLOCK_BYTES of a
    # (int8_gemm_amx._row_blocks), each streamed against the panels
    Kp = buf.shape[2]
    N = out32.shape[1] if mode == 0 else out16.shape[1]
    nt = (N + NR - 1) // NR
    nblk = _amx._row_blocks(a.shape[0], 2 * Kp, threads)
    copy = not _in_place(a, Kp)
    jobs = nblk * nt
    for i in prange(threads):
        _jobs(i * jobs // threads, (i + 1) * jobs // threads, nblk, copy, a, buf[i],
              tail[i], bp, tile[i], bias, has_bias, lo, hi, mode, out32,
              out16)  # fmt: skip


@njit(**JIT)
def gemm_serial(a, bp, buf, tail, tile, bias, has_bias, lo, hi, mode, out32, out16):
    # gemm on the calling thread (scratch index 0)
    Kp = buf.shape[2]
    N = out32.shape[1] if mode == 0 else out16.shape[1]
    nt = (N + NR - 1) // NR
    nblk = _amx._row_blocks(a.shape[0], 2 * Kp, 1)
    copy = not _in_place(a, Kp)
    _jobs(0, nblk * nt, nblk, copy, a, buf[0], tail[0], bp, tile[0], bias, has_bias,
          lo, hi, mode, out32, out16)  # fmt: skip


# ---------------------------------------------------------------------------
# the machine's peak, for "% of peak" in benchmarks

_NACC = 12
_peak = None


def measure_peak(threads: int, iters: int = 200_000, repeat: int = 7) -> float:
    """GFLOP/s of a register-only loop of ``tdpbf16ps`` (16 x 16 x 32
    multiply-adds, 16384 flops each) on ``threads`` threads, best of
    ``repeat``. Only where the amx_bf16 path runs (the tile state granted)."""
    import time

    import numba

    from .int8_gemm_vnni import _peak_runner

    global _peak
    if _peak is None:
        _peak = _peak_runner(_amx.make_peak_loop(_NACC, op=_OP))
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        _peak(100, threads)
        best = 0.0
        for _ in range(repeat):
            t0 = time.perf_counter()
            _peak(iters, threads)
            dt = time.perf_counter() - t0
            best = max(best, threads * iters * _NACC * 16384 / dt / 1e9)
        return best
    finally:
        numba.set_num_threads(before)
