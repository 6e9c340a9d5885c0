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

  a   (M, K) bfloat16 bits, any strides, copied a row block at a time into
      per-thread scratch as contiguous 1 KB tiles ([16-row group][step of 32
      k][16 rows][32 k], zeros past K). Against tile loads from a's own
      rows (2 KB apart at K = 1024), copies included, 1 thread, one process
      taking turns: 1024^3 767 -> 881 GFLOP/s, 2048^3 712 -> 872, 16 x 384 x
      1536 769 -> 901, but 256 x 2048 x 1024 1100 -> 988.
  b   :func:`pack_b`: [NP][Kp/32][4][16][16][2], K zero-padded to Kp: per
      panel of 64 columns and step of 32 k, four contiguous 1 KB tiles (16
      pairs of k x 16 columns). Tiles read 256 bytes a row out of
      pack_b_bf16's panel rows ran 1.6-1.7x slower from memory (a block loop
      over 32 x 4096 x 4096: 359-408 -> 572-710 GFLOP/s) and 3-10 % slower
      in the GEMMs (1 thread, same process: 1024^3 713 -> 767).
  out (M, N) float32, or bfloat16 / float16 bits, through fp16_gemm's epilogue.

Block: 32 x 64 float32 outputs as two 32-column halves, each on four 16 x 16
accumulator tiles (tmm0-3) fed by two 16-row A tiles (tmm4-5) and two B tiles
(tmm6-7): per 32 k, four tile loads and four tdpbf16ps (int8_gemm_amx._half
with this instruction, A and B as contiguous tiles). Each block covers all of
K, so every output sums in the order above whatever the blocking; rows past
the last whole 32-row step run on a 16-row tile of the copy, so a row's bits
never depend on M.
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
    """_blk(a, b, k32, c, ldc, nvalid): the MR x 64 float32 sums (MR 16 or 32)
    of the 16-row group(s) of A tiles at a (_copy_tiles' layout, k32 tiles a
    group) against the panel at b over k32 steps of 32 k, stored at c (row
    stride ldc bytes); the second 32-column half only when nvalid > 32."""
    halves = MR // 16

    def codegen(context, builder, sig, args):
        a, b, k32, c, ldc, nvalid = args
        tile = ir.Constant(_i64, 1024)
        a16 = builder.add(a, builder.mul(k32, tile))
        zero = _amx._fn(builder, "llvm.x86.tilezero", _i8)
        st = _amx._fn(builder, "llvm.x86.tilestored64", _i8, _amx._p8, _i64)

        def run(h):
            def store(t):
                at = builder.add(c, builder.mul(ldc, ir.Constant(_i64, 16 * (t // 2))))
                at = builder.add(at, ir.Constant(_i64, 64 * (t % 2) + 128 * h))
                at = builder.inttoptr(at, _amx._p8)
                builder.call(st, [ir.Constant(_i8, t), at, ldc])

            row = ir.Constant(_i64, 64)
            _amx._half(builder, halves, a, row, b, row, k32, h,
                       lambda t: builder.call(zero, [ir.Constant(_i8, t)]), store,
                       op=_OP, tile_off=1024, a_step=1024, a16=a16)  # fmt: skip

        run(0)
        with builder.if_then(builder.icmp_signed(">", nvalid, ir.Constant(_i64, 32))):
            run(1)
        return context.get_dummy_value()

    @intrinsic
    def _blk(typingctx, a, b, k32, c, ldc, nvalid):
        return types.void(*([types.int64] * 6)), codegen

    return _blk


# module globals, so numba's cache can name them
_blk32 = make_block_kernel(32)
_blk16 = make_block_kernel(16)


def pack_b(b16):
    """b (K, N) bfloat16 bits -> (NP, Kp/32, 4, 16, 32) uint16, 64-byte
    aligned: [panel][step][tile][pair of k][column, k parity]."""
    b16 = _amx.pad_k(b16, KB)
    kp = b16.shape[0]
    rows = _h.pack_b_bf16(b16)  # (NP, kp/2, 128): pair rows of 64 columns
    NP = rows.shape[0]
    shape = (NP, kp // KB, 4, 16, 32)
    out = _h._aligned(shape)
    out[...] = rows.reshape(NP, kp // KB, 16, 4, 32).transpose(0, 1, 3, 2, 4)
    out.flags.writeable = False
    return out


@njit(inline="always")
def _copy_tiles(a, buf, m0, m1):
    # rows m0..m1-1 of a -> buf (rows, Kp) as 1 KB tiles: row r = m - m0 at
    # [r // 16][kb][r % 16][32 k] for each step kb, zeros past K (rows past
    # m1 in the last 16-row group are left as they are: their sums are never
    # stored)
    K = a.shape[1]
    k32 = buf.shape[1] // KB
    base = buf.ctypes.data
    fast = a.strides[1] == 2 and K >= 4
    for m in range(m0, m1):
        r = m - m0
        src = a.ctypes.data + m * a.strides[0]
        dst = base + ((r // 16) * k32 * 16 + r % 16) * 64
        for kb in range(k32):
            k0 = kb * KB
            n = min(KB, K - k0)
            d = dst + kb * 1024
            if fast and n == KB:
                copy_bytes(d, src + 2 * k0, 2 * KB)
                continue
            row = buf.reshape(-1)
            i0 = (d - base) // 2
            for k in range(max(n, 0)):
                row[i0 + k] = a[m, k0 + k]
            for k in range(max(n, 0), KB):
                row[i0 + k] = 0


@njit(inline="always")
def _block_span(blk, nblk, M):
    mt = (M + BM - 1) // BM
    return blk * mt // nblk * BM, min(M, (blk + 1) * mt // nblk * BM)


@njit(nogil=True, cache=True)
def _jobs(t0, t1, nblk, a, buf, bp, tile, bias, has_bias, lo, hi, mode, out32, out16):
    # jobs t0..t1-1 (row block t // nt, panel t % nt) on this thread, inside
    # one tile configuration; each row block copied into buf as tiles
    # (_copy_tiles) when the thread reaches it
    M = a.shape[0]
    N = out32.shape[1] if mode == 0 else out16.shape[1]
    nt = (N + NR - 1) // NR
    k32 = bp.shape[1]
    direct = mode == 0 and not has_bias and lo == -np.inf and hi == np.inf
    direct = direct and out32.strides[1] == 4  # (the tiles store whole rows)
    cur = -1
    _amx.amx_begin()
    for t in range(t0, t1):
        blk = t // nt
        jn = t - blk * nt
        n0 = jn * NR
        nc = min(NR, N - n0)
        b = bp.ctypes.data + jn * bp.strides[0]
        m_lo, m_end = _block_span(blk, nblk, M)
        if blk != cur:
            _copy_tiles(a, buf, m_lo, m_end)
            cur = blk
        for m0 in range(m_lo, m_end, BM):
            mr = min(BM, m_end - m0)
            src = buf.ctypes.data + (m0 - m_lo) // 16 * k32 * 1024
            if direct and nc == NR and mr % 16 == 0:
                # plain float32 output: the tiles store into out
                c = out32.ctypes.data + m0 * out32.strides[0] + 4 * n0
                if mr == BM:
                    _blk32(src, b, k32, c, out32.strides[0], nc)
                else:
                    _blk16(src, b, k32, c, out32.strides[0], nc)
                continue
            if mr > 16:
                _blk32(src, b, k32, tile.ctypes.data, 4 * NR, nc)
            else:
                _blk16(src, b, k32, tile.ctypes.data, 4 * NR, nc)
            _h._epilogue_simd(tile, mr, nc, m0, n0, bias, has_bias, lo, hi, mode,
                              out32, out16)  # fmt: skip
    _amx.amx_end()


@njit(cache=True)
def block_rows(M, Kp, threads):
    """Rows of the largest row block, whole 32-row steps (buf's rows)."""
    mt = (M + BM - 1) // BM
    nblk = _amx._row_blocks(M, 2 * Kp, threads)
    return (mt + nblk - 1) // nblk * BM


# a: (M, K) uint16 bfloat16 bits, any strides; bp: pack_b's array (Kp = 32 *
# bp.shape[1]); buf (threads, block_rows, Kp) uint16 scratch; tile (threads,
# BM, NR) float32 scratch; out32 (M, N) float32 when mode == 0, else out16
# (M, N) uint16 bits (fp16_gemm's epilogue modes)


@njit(**PJIT)
def gemm(a, bp, buf, tile, bias, has_bias, lo, hi, mode, out32, out16, threads):
    # one run of jobs per thread, row blocks of at most A_BLOCK_BYTES of a
    # (int8_gemm_amx._row_blocks), each streamed against the panels
    Kp = buf.shape[2]
    N = out32.shape[1] if mode == 0 else out16.shape[1]
    nt = (N + NR - 1) // NR
    nblk = _amx._row_blocks(a.shape[0], 2 * Kp, threads)
    jobs = nblk * nt
    for i in prange(threads):
        _jobs(i * jobs // threads, (i + 1) * jobs // threads, nblk, a, buf[i], bp,
              tile[i], bias, has_bias, lo, hi, mode, out32, out16)  # fmt: skip


@njit(**JIT)
def gemm_serial(a, bp, buf, tile, bias, has_bias, lo, hi, mode, out32, out16):
    # gemm on the calling thread (scratch index 0)
    Kp = buf.shape[2]
    N = out32.shape[1] if mode == 0 else out16.shape[1]
    nt = (N + NR - 1) // NR
    nblk = _amx._row_blocks(a.shape[0], 2 * Kp, 1)
    _jobs(0, nblk * nt, nblk, a, buf[0], bp, tile[0], bias, has_bias, lo, hi, mode,
          out32, out16)  # fmt: skip


# ---------------------------------------------------------------------------
# the machine's peak, for "% of peak" in benchmarks

_NACC = 12
_peak = None


def measure_peak(threads: int, iters: int = 200_000, repeat: int = 7) -> float:
    """GFLOP/s of a register-only loop of ``tdpbf16ps`` (16 x 16 x 32
    multiply-adds, 16384 flops each) on ``threads`` threads, best of
    ``repeat``. Only where the amx_bf16 path runs (the tile state granted)."""
    from .int8_gemm_vnni import _peak_runner, best_rate

    global _peak
    if _peak is None:
        _peak = _peak_runner(_amx.make_peak_loop(_NACC, op=_OP))
    return best_rate(_peak, threads, iters, repeat, _NACC * 16384)
