"""Sub-byte weights on NVIDIA GPUs (numba-cuda), on MatMulNBits' own layout.

    b3 (N, nblk, blob) uint8: codes low bits first along K (lowprec/nbits.py)

A warp owns one output (m, n) and lane l takes blocks j = l, l + 32, ...: the
lanes read consecutive blocks of column n (contiguous bytes). Lanes combine
through shared memory (the CUDA simulator has no warp shuffles), so every
thread of a block reaches every syncthreads: no early return.

    float path  y = sum_j s[n, j] * sum_{k in j} a[m, k] * (c - z[n, j]),
                per-lane float32 sums, then lane 0 adds the 32 lane sums
                (the float path's bound in lowprec/nbits.py holds for any order)
    int8 path   per block t * s with t = float(sum qa * c) - z * qsum (exact)
                and s = sc * sa, then added in block order by lane 0, with
                mul.rn.f32 so NVVM cannot fuse the add: bit for bit
                the CPU kernels' result
    codebook    the same, with c -> table[n, c] (float) or the int8 table + 128
                and z = 128 (int8 path)
"""

import functools

import numpy as np
from numba import cuda

from .cuda_intrinsics import mul_rn32, rint

WARP = 32


@functools.cache
def nbits_float_kernel(bits, bs, lut, warps):
    """Float path for `bits`-bit codes in blocks of bs (lut: codebook tables),
    `warps` warps per thread block."""
    per = 8 // bits
    mask = (1 << bits) - 1
    blob = bs * bits // 8
    nred = warps * WARP  # shared array sizes must be closure constants

    @cuda.jit
    def nbits_f32(a, b3, sc, zp, table, bias, out):
        # a (M, K) f32, b3 (N, nblk, blob) u8, sc/zp (N, nblk) f32,
        # table (N, 2**bits) f32 (read when lut), bias (N,) f32, out (M, N) f32
        # grid: one warp per (m, n); blockDim.x = 32 * warps
        red = cuda.shared.array(nred, np.float32)
        M, K = a.shape
        N, nblk, _ = b3.shape
        wi = cuda.threadIdx.x // WARP
        w = cuda.blockIdx.x * warps + wi
        lane = cuda.threadIdx.x % WARP
        valid = w < M * N
        m = w // N if valid else 0
        n = w % N if valid else 0
        total = np.float32(0)
        for j in range(lane, nblk if valid else 0, WARP):
            acc = np.float32(0)
            for byte in range(blob):
                x = b3[n, j, byte]
                for i in range(per):
                    k = j * bs + byte * per + i
                    if k < K:
                        c = (x >> (bits * i)) & mask
                        if lut:
                            acc += a[m, k] * table[n, c]
                        else:
                            acc += a[m, k] * (np.float32(c) - zp[n, j])
            total += acc if lut else acc * sc[n, j]
        red[cuda.threadIdx.x] = total
        cuda.syncthreads()
        if lane == 0 and valid:
            total = np.float32(0)
            for i in range(WARP):
                total += red[wi * WARP + i]
            out[m, n] = total + bias[n]

    return nbits_f32


@functools.cache
def nbits_int8_kernel(bits, bs, lut, warps):
    """Int8 path: activations quantized per block (quantize_blocks)."""
    per = 8 // bits
    mask = (1 << bits) - 1
    blob = bs * bits // 8
    nred = warps * WARP  # shared array sizes must be closure constants

    @cuda.jit
    def nbits_i8(qa, sa, qs, b3, sc, zp, table, bias, out):
        # qa (M, Kp) int8, sa/qs (M, nblk) f32, b3 (N, nblk, blob) u8,
        # sc/zp (N, nblk or 1) f32 (a single column repeats), table (N, 2**bits)
        # int32 (read when lut), bias (N,) f32, out (M, N) f32
        red = cuda.shared.array(nred, np.float32)
        M = qa.shape[0]
        N, nblk, _ = b3.shape
        wi = cuda.threadIdx.x // WARP
        w = cuda.blockIdx.x * warps + wi
        lane = cuda.threadIdx.x % WARP
        valid = w < M * N
        m = w // N if valid else 0
        n = w % N if valid else 0
        js = sc.shape[1] > 1
        o = np.float32(0)
        for j0 in range(0, nblk, WARP):
            j = j0 + lane
            v = np.float32(0)
            if j < nblk and valid:
                acc = 0
                for byte in range(blob):
                    x = b3[n, j, byte]
                    for i in range(per):
                        c = (x >> (bits * i)) & mask
                        wv = table[n, c] if lut else np.int32(c)
                        acc += np.int32(qa[m, j * bs + byte * per + i]) * wv
                jj = j if js else 0
                t = np.float32(acc) - mul_rn32(zp[n, jj], qs[m, j])
                v = mul_rn32(t, mul_rn32(sc[n, jj], sa[m, j]))
            # block order: lane 0 adds the lanes' terms one by one
            red[cuda.threadIdx.x] = v
            cuda.syncthreads()
            if lane == 0:
                for i in range(min(WARP, nblk - j0)):
                    o = o + red[wi * WARP + i]
            cuda.syncthreads()
        if lane == 0 and valid:
            out[m, n] = o + bias[n]

    return nbits_i8


@cuda.jit
def quantize_blocks(a, bs, qa, sa, qs, bad):
    # a (M, K) f32 -> qa (M, Kp) int8 (0 past K), sa/qs (M, nblk) f32; one
    # thread per (m, block), as kernels/nbits.py quantize_rows_blockwise;
    # bad[0] = 1 where a block holds NaN or +-inf (every writer writes 1)
    M, K = a.shape
    nblk = sa.shape[1]
    t = cuda.grid(1)
    if t >= M * nblk:
        return
    m = t // nblk
    j = t % nblk
    k1 = min((j + 1) * bs, K)
    amax = np.float32(0)
    probe = np.float32(0)
    for k in range(j * bs, k1):
        amax = max(amax, abs(a[m, k]))
        probe += a[m, k] * np.float32(0)
    if probe != 0 or probe != probe:
        bad[0] = 1
    s = amax / np.float32(127.0)
    inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
    total = 0
    for k in range(j * bs, (j + 1) * bs):
        q = 0
        if k < K:
            f = rint(mul_rn32(a[m, k], inv))
            if f == f:  # NaN (bad[0] is set) stays 0: int(NaN) is undefined
                q = int(min(max(f, -127.0), 127.0))
        qa[m, k] = q
        total += q
    sa[m, j] = s
    qs[m, j] = np.float32(total)
