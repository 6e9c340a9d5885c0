"""Tunables shared by the CPU kernels. Tests patch some of them small."""

# Every @njit in lowprec.kernels takes these flags: no fastmath anywhere, since
# the integer and requantization paths must be bit-exact (fastmath would let LLVM
# contract `x * m + zp` into an FMA and change rounding).
JIT = {"cache": True, "nogil": True}
PJIT = {"cache": True, "nogil": True, "parallel": True}

# Portable GEMM: output tiles of TILE_M rows x TILE_N columns are handed to
# threads; inside a tile a row of int32 accumulators spans TILE_N columns so the
# inner loop vectorizes over n.
TILE_M = 16
TILE_N = 256

# K is processed in chunks whose raw u8 x s8 dot products cannot overflow int32:
# |sum| <= K * 255 * 128 < 2**31 for K <= 65793. A multiple of 64 keeps every
# packed layout's K alignment.
K_CHUNK = 65536

# Elementwise kernels split their work into blocks of this many elements.
ELEMWISE_BLOCK = 1 << 16
