"""Byte transposes between NCHW and NHWC (the INT8 convolution's layout changes).

    dst[n, h, b, a] = src[n, a, h, b] ^ flip        src (N, A, H, B), dst (N, H, B, A)

NCHW -> NHWC is A = C, B = W (dst: the interior of the padded input); NHWC ->
NCHW is A = pixels, H = 1, B = channels. Both arrays are uint8 views with unit
last stride. With 64 channels or more, 16 x 16 byte blocks are transposed four
at a time in the 128-bit lanes of 16 zmm registers (four rounds of byte
unpacks); the rest in 8 x 8 blocks held in eight uint64 registers (three rounds
of masked swaps: 16 memory operations instead of 128 byte moves). numpy's
strided copy ran at 1.1-2.3 GB/s here (0.35-0.4 ms for 256 x 56 x 56 on one
core; 0.22 ms with 8 x 8 blocks, 0.09 ms with the zmm blocks).
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .config import PJIT

_i64 = ir.IntType(64)


@intrinsic
def _load8(typingctx, addr):
    # 8 bytes at any (unaligned) address as one uint64
    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], _i64.as_pointer())
        return builder.load(ptr, align=1)

    return types.uint64(types.int64), codegen


@intrinsic
def _store8(typingctx, addr, val):
    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], _i64.as_pointer())
        builder.store(args[1], ptr, align=1)
        return context.get_dummy_value()

    return types.void(types.int64, types.uint64), codegen


_v32 = ir.VectorType(ir.IntType(8), 32)


@intrinsic
def _move32(typingctx, dst, src):
    # 32 bytes from src to dst (any alignment; one ymm load and store)
    def codegen(context, builder, sig, args):
        s = builder.inttoptr(args[1], _v32.as_pointer())
        d = builder.inttoptr(args[0], _v32.as_pointer())
        builder.store(builder.load(s, align=1), d, align=1)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64), codegen


@njit(inline="always")
def copy_bytes(dst, src, n):
    # n >= 8 bytes between int64 addresses, inline: 32- or 8-byte moves, the
    # last one overlapping the previous (no libc call for the short runs of an
    # im2col gather; non-overlapping buffers only)
    if n >= 32:
        i = 0
        while i + 32 <= n:
            _move32(dst + i, src + i)
            i += 32
        if i < n:
            _move32(dst + n - 32, src + n - 32)
        return
    i = 0
    while i + 8 <= n:
        _store8(dst + i, _load8(src + i))
        i += 8
    if i < n:
        _store8(dst + n - 8, _load8(src + n - 8))


_M32 = np.uint64(0x00000000FFFFFFFF)
_M16 = np.uint64(0x0000FFFF0000FFFF)
_M8 = np.uint64(0x00FF00FF00FF00FF)


@njit(inline="always")
def _swap(x, y, shift, mask):
    # exchange the high `shift`-bit halves of x's fields with the low ones of y's
    t = ((x >> shift) ^ y) & mask
    return x ^ (t << shift), y ^ t


@njit(inline="always")
def _block(s, ss, d, ds, f):
    # 8x8 bytes: row i of the source (8 bytes at s + i*ss) -> column i of the
    # destination (rows at d + j*ds); f = the flip byte repeated 8 times
    r0 = _load8(s) ^ f
    r1 = _load8(s + ss) ^ f
    r2 = _load8(s + 2 * ss) ^ f
    r3 = _load8(s + 3 * ss) ^ f
    r4 = _load8(s + 4 * ss) ^ f
    r5 = _load8(s + 5 * ss) ^ f
    r6 = _load8(s + 6 * ss) ^ f
    r7 = _load8(s + 7 * ss) ^ f
    r0, r4 = _swap(r0, r4, np.uint64(32), _M32)
    r1, r5 = _swap(r1, r5, np.uint64(32), _M32)
    r2, r6 = _swap(r2, r6, np.uint64(32), _M32)
    r3, r7 = _swap(r3, r7, np.uint64(32), _M32)
    r0, r2 = _swap(r0, r2, np.uint64(16), _M16)
    r1, r3 = _swap(r1, r3, np.uint64(16), _M16)
    r4, r6 = _swap(r4, r6, np.uint64(16), _M16)
    r5, r7 = _swap(r5, r7, np.uint64(16), _M16)
    r0, r1 = _swap(r0, r1, np.uint64(8), _M8)
    r2, r3 = _swap(r2, r3, np.uint64(8), _M8)
    r4, r5 = _swap(r4, r5, np.uint64(8), _M8)
    r6, r7 = _swap(r6, r7, np.uint64(8), _M8)
    _store8(d, r0)
    _store8(d + ds, r1)
    _store8(d + 2 * ds, r2)
    _store8(d + 3 * ds, r3)
    _store8(d + 4 * ds, r4)
    _store8(d + 5 * ds, r5)
    _store8(d + 6 * ds, r6)
    _store8(d + 7 * ds, r7)


_i8 = ir.IntType(8)
_i32 = ir.IntType(32)
_x16 = ir.VectorType(_i8, 16)
_z64 = ir.VectorType(_i8, 64)


def _unpack(builder, a, b, hi):
    # vpunpck{l,h}bw zmm: per 128-bit lane, bytes 0-7 (or 8-15) of a and b
    # interleaved
    idx = []
    for lane in range(4):
        base = 16 * lane + (8 if hi else 0)
        for k in range(8):
            idx += [base + k, 64 + base + k]
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_i32, 64), idx))


def _make_block16(tall, table=False):
    """Intrinsic transposing 16x16-byte blocks in the four 128-bit lanes of 16
    zmm registers: four rounds of byte unpacks of registers (m, m+8), 64
    vpunpck in all, against ~110 scalar operations per 8x8 block in _block.

    wide (tall=False): 16 source rows x 64 columns (one zmm load per row; each
        transposed 16-byte row stored on its own).
    tall (tall=True):  64 source rows x 16 columns (four 16-byte loads per
        register; each destination row one zmm store).
    block(s, ss, d, ds, f): source at s (row stride ss bytes), destination at d
    (row stride ds), every byte XORed with the byte f.
    table (tall only): d is the address of 16 int64 destination row addresses
    (ds unused): rows anywhere, e.g. the pixels of a padded image.
    """

    def codegen(context, builder, sig, args):
        s, ss, d, ds, f = args
        fv = builder.insert_element(
            ir.Constant(_z64, ir.Undefined), f, ir.Constant(_i32, 0)
        )
        fv = builder.shuffle_vector(fv, fv, ir.Constant(ir.VectorType(_i32, 64), None))

        def at(base, off):
            return builder.inttoptr(builder.add(base, off), _z64.as_pointer())

        def row(i):
            if not tall:  # row i, 64 columns
                return builder.load(
                    at(s, builder.mul(ss, ir.Constant(_i64, i))), align=1
                )
            parts = []
            for la in range(4):  # rows i, 16+i, 32+i, 48+i: 16 columns each
                off = builder.mul(ss, ir.Constant(_i64, 16 * la + i))
                ptr = builder.inttoptr(builder.add(s, off), _x16.as_pointer())
                parts.append(builder.load(ptr, align=1))
            m32 = ir.Constant(ir.VectorType(_i32, 32), list(range(32)))
            lo = builder.shuffle_vector(parts[0], parts[1], m32)
            hi = builder.shuffle_vector(parts[2], parts[3], m32)
            return builder.shuffle_vector(
                lo, hi, ir.Constant(ir.VectorType(_i32, 64), list(range(64)))
            )

        regs = [builder.xor(row(i), fv) for i in range(16)]
        for _ in range(4):
            nxt = [None] * 16
            for m in range(8):
                nxt[2 * m] = _unpack(builder, regs[m], regs[m + 8], False)
                nxt[2 * m + 1] = _unpack(builder, regs[m], regs[m + 8], True)
            regs = nxt
        # register j, lane L: the 16 bytes of destination row (column) j of
        # source block L (tall: lanes are consecutive 16-byte pieces of row j)
        for j in range(16):
            if tall and table:
                slot = builder.inttoptr(
                    builder.add(d, ir.Constant(_i64, 8 * j)), _i64.as_pointer()
                )
                row_at = builder.inttoptr(builder.load(slot), _z64.as_pointer())
                builder.store(regs[j], row_at, align=1)
                continue
            if tall:
                builder.store(
                    regs[j], at(d, builder.mul(ds, ir.Constant(_i64, j))), align=1
                )
                continue
            for lane in range(4):
                piece = builder.shuffle_vector(
                    regs[j],
                    regs[j],
                    ir.Constant(
                        ir.VectorType(_i32, 16), list(range(16 * lane, 16 * lane + 16))
                    ),
                )
                off = builder.mul(ds, ir.Constant(_i64, 16 * lane + j))
                ptr = builder.inttoptr(builder.add(d, off), _x16.as_pointer())
                builder.store(piece, ptr, align=1)
        return context.get_dummy_value()

    @intrinsic
    def block(typingctx, s, ss, d, ds, f):
        return types.void(
            types.int64, types.int64, types.int64, types.int64, types.uint8
        ), codegen

    return block


_wide16 = _make_block16(False)
_tall16 = _make_block16(True)
_tall16_rows = _make_block16(True, table=True)


@njit(inline="always")
def _rows8(src, dst, n, h, a, a1, b0, s0, sa, d0, db, f, flip):
    # rows [a, a1) from column b0 on: 8x8 blocks, then byte tails
    B = src.shape[3]
    while a + 8 <= a1:
        b = b0
        while b + 8 <= B:
            _block(s0 + a * sa + b, sa, d0 + b * db + a, db, f)
            b += 8
        for bb in range(b, B):  # column tail: bytes one by one
            for i in range(8):
                dst[n, h, bb, a + i] = src[n, a + i, h, bb] ^ flip
        a += 8
    for i in range(a, a1):  # row tail
        for bb in range(b0, B):
            dst[n, h, bb, i] = src[n, i, h, bb] ^ flip


# A-range handled by one thread task: 64 rows of the source
_TASK_A = 64


@njit(**PJIT)
def transpose(src, dst, flip):
    # src (N,A,H,B) uint8, dst (N,H,B,A) uint8 (unit last strides, any others);
    # flip uint8 is XORed into every byte (0x80: int8 x -> x' of eq. 5).
    # 64 x 16 blocks (NCHW -> NHWC, >= 64 channels) or 16 x 64 blocks (NHWC ->
    # NCHW, >= 64 channels) on the zmm byte unpacks where they fit, 8 x 8
    # blocks in uint64 registers for the rest. 256 x 56 x 56, 1 thread: 0.22 ms
    # with 8 x 8 blocks only, 0.09 ms with the zmm blocks; 3136 x 64 (the
    # output side) 0.06 -> 0.016 ms.
    N, A, H, B = src.shape
    sa = src.strides[1]
    db = dst.strides[2]
    f = np.uint64(flip) * np.uint64(0x0101010101010101)
    na = (A + _TASK_A - 1) // _TASK_A
    for t in prange(N * H * na):
        n = t // (H * na)
        rest = t - n * H * na
        h = rest // na
        a0 = (rest - h * na) * _TASK_A
        a1 = min(a0 + _TASK_A, A)
        s0 = src[n, :, h].ctypes.data
        d0 = dst[n, h].ctypes.data
        a = a0
        if a + 64 <= a1 and B >= 16:
            b = 0
            while b + 16 <= B:
                _tall16(s0 + a * sa + b, sa, d0 + b * db + a, db, flip)
                b += 16
            _rows8(src, dst, n, h, a, a + 64, b, s0, sa, d0, db, f, flip)
            a += 64
        while a + 16 <= a1 and B >= 64:
            b = 0
            while b + 64 <= B:
                _wide16(s0 + a * sa + b, sa, d0 + b * db + a, db, flip)
                b += 64
            _rows8(src, dst, n, h, a, a + 16, b, s0, sa, d0, db, f, flip)
            a += 16
        _rows8(src, dst, n, h, a, a1, 0, s0, sa, d0, db, f, flip)


# to_padded_nhwc tasks: runs of this many pixels of one 64-channel block
_TASK_PIXELS = 256


@njit(**PJIT)
def to_padded_nhwc(src, dst, W, pt, pl, flip):
    # src (N,A,P) uint8 (an NCHW image's channels as rows of P = H*W pixels,
    # unit last stride), dst (N,Hp,Wp,A) uint8 C-contiguous (a padded NHWC
    # image): dst[n, pt + p // W, pl + p % W, a] = src[n, a, p] ^ flip, the
    # border untouched. A >= 64 and P >= 16: 64 x 16 blocks over the pixels of
    # the whole image, each destination row (pixel) addressed on its own, so
    # image rows narrower than 16 pixels (14 x 14) and widths that are not a
    # multiple of 16 (56) need no byte tails; the last block of each axis
    # overlaps the one before (it writes the same bytes again). The padded
    # copy (conv.py, _pad_nhwc) against transpose() per image row, 1 thread:
    # 256 x 14^2 29 -> 10 us, 128 x 28^2 40 -> 12 us, 256 x 56^2 88 -> 49 us,
    # 64 x 56^2 25 -> 23 us.
    N, A, P = src.shape
    Wp = dst.shape[2]
    sa = src.strides[1]
    na = (A + 63) // 64
    npx = (P + _TASK_PIXELS - 1) // _TASK_PIXELS
    for t in prange(N * na * npx):
        n = t // (na * npx)
        rest = t - n * na * npx
        a0 = min((rest // npx) * 64, A - 64)
        p0 = (rest % npx) * _TASK_PIXELS
        p1 = min(p0 + _TASK_PIXELS, P)
        tbl = np.empty(16, np.int64)
        s0 = src[n].ctypes.data + a0 * sa
        d0 = dst[n].ctypes.data + a0
        p = p0
        while p < p1:
            q = min(p, P - 16)
            h = q // W
            w = q - h * W
            for j in range(16):
                tbl[j] = d0 + ((pt + h) * Wp + pl + w) * A
                w += 1
                if w == W:
                    w = 0
                    h += 1
            _tall16_rows(s0 + q, sa, tbl.ctypes.data, 0, flip)
            p += 16


@njit(**PJIT)
def maxpool2x2_nhwc(y, out):
    # y (N,H,W,C) C-contiguous, out (N,H//2,W//2,C): 2x2 stride 2 max pool,
    # one task per output row, vectorized over channels (flat arrays, unsigned
    # offsets). numpy's two strided np.maximum passes took 4.3 ms of the
    # demo's 24 ms per batch.
    N, H, W, C = y.shape
    h = H // 2
    w = W // 2
    yf = y.reshape(-1)
    of = out.reshape(-1)
    uc = np.uint64(C)
    for t in prange(N * h):
        n = t // h
        i = t - n * h
        r0 = np.uint64(((n * H + 2 * i) * W) * C)
        r1 = r0 + np.uint64(W * C)
        o = np.uint64(t * w * C)
        for j in range(w):
            a = r0 + np.uint64(2 * j) * uc
            b = r1 + np.uint64(2 * j) * uc
            d = o + np.uint64(j) * uc
            for c in range(uc):
                m0 = max(yf[a + c], yf[a + uc + c])
                m1 = max(yf[b + c], yf[b + uc + c])
                of[d + c] = max(m0, m1)


@njit(inline="always")
def _max32(a, b):
    # np.maximum's rule on float32: a where a > b or a is NaN, else b (NaN
    # propagates; of equal values such as -0 and +0 numpy keeps b, so the
    # runtime's pool gives MaxPool's bits)
    return a if a > b or a != a else b


@njit(inline="always")
def pool_row2x2(x, t, h, w, tmp, row):
    # output row i = t % h of plane t // h of a 2x2 stride 2 max pool of x (P,
    # H, W) float32 into row[:w], in MaxPool's order: the two input rows'
    # maxima (contiguous, vectorized) into tmp, then those of column pairs
    i = t % h
    p = t // h
    r0 = x[p, 2 * i]
    r1 = x[p, 2 * i + 1]
    for j in range(2 * w):
        tmp[j] = _max32(r0[j], r1[j])
    for j in range(w):
        row[j] = _max32(tmp[2 * j], tmp[2 * j + 1])


@njit(**PJIT)
def maxpool2x2_nchw(x, out, tmp):
    # x (P, H, W) float32 planes, out (P, H//2, W//2): 2x2 stride 2 max pool;
    # tmp (threads, >= W) float32 scratch. The runtime's NCHW pool after
    # conv_fp16: numpy's two strided np.maximum passes took 6.3 ms for 250 x
    # 32 x 28^2 on 1 thread (Zen 3), this 2.2
    h = out.shape[1]
    w = out.shape[2]
    for t in prange(x.shape[0] * h):
        pool_row2x2(x, t, h, w, tmp[numba.get_thread_id()], out[t // h, t % h])
