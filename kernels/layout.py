"""Byte transposes between NCHW and NHWC (the INT8 convolution's layout changes).

    dst[n, h, b, a] = src[n, a, h, b] ^ flip        src (N, A, H, B), dst (N, H, B, A)

NCHW -> NHWC is A = C, B = W (dst: the interior of the padded input); NHWC ->
NCHW is A = pixels, H = 1, B = channels. Both arrays are uint8 views with unit
last stride. Blocks of 8 x 8 bytes are transposed in eight uint64 registers
(three rounds of masked swaps), so a block costs 16 memory operations instead of
128 byte moves: numpy's strided copy ran at 1.1-2.3 GB/s here (0.35-0.4 ms for
256 x 56 x 56 on one core).
"""

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


# A-range handled by one thread task: 64 rows of the source
_TASK_A = 64


@njit(**PJIT)
def transpose(src, dst, flip):
    # src (N,A,H,B) uint8, dst (N,H,B,A) uint8 (unit last strides, any others);
    # flip uint8 is XORed into every byte (0x80: int8 x -> x' of eq. 5)
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
        while a + 8 <= a1:
            b = 0
            while b + 8 <= B:
                _block(s0 + a * sa + b, sa, d0 + b * db + a, db, f)
                b += 8
            for bb in range(b, B):  # column tail: bytes one by one
                for i in range(8):
                    dst[n, h, bb, a + i] = src[n, a + i, h, bb] ^ flip
            a += 8
        for i in range(a, a1):  # row tail
            for bb in range(B):
                dst[n, h, bb, i] = src[n, i, h, bb] ^ flip


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
