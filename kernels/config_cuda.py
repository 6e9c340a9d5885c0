"""Launch tunables of the CUDA kernels. Tests patch them small (tests/cuda) so
tiny inputs span several blocks, K tiles and edge tiles in the simulator.

Kernels are built per tunable set (``int8_gemm_cuda.gemm_kernel(...)`` is
memoized on them): a tile size is a compile-time constant, which lets NVVM keep
the per-thread accumulator tile in registers, so it is read at launch time.
"""

# INT8 GEMM: a block computes a BLOCK_M x BLOCK_N output tile with
# THREADS_M x THREADS_N threads, each owning a (BLOCK_M / THREADS_M) x
# (BLOCK_N / THREADS_N) register tile (8 x 8 by default: 64 dp4a per 16
# shared-memory words read). K advances BLOCK_KW 4-byte words (32 bytes of K)
# per shared-memory stage.
BLOCK_M = 128
BLOCK_N = 128
BLOCK_KW = 8
THREADS_M = 16
THREADS_N = 16
# Shared-memory row padding in words. The A tile is stored k-word major
# (As[kw, m]); a warp stores 8 k-words x 4 rows per step, and a row stride of
# BLOCK_M + 4 words puts those 32 stores in 32 different banks.
SMEM_PAD = 4

# K is limited so that the raw u8 x s8 dot products (docs eq. 6) stay exact in
# the int32 dp4a accumulator: |P| <= K * 255 * 128 < 2**31.
K_MAX = 65536

# Row / column sums (eq. 9) and the elementwise kernels: threads per block.
THREADS_1D = 256

# Elementwise kernels: at most this many blocks; each thread strides over the
# rest (grid-stride loop).
MAX_BLOCKS_1D = 4096

# INT8 convolution (kernels/int8_conv_cuda.py) runs the implicit GEMM with the
# GEMM's BLOCK_* / THREADS_* tiles above (rows = output pixels, columns = output
# channels of one group); depthwise and the patch row sums use THREADS_1D.

# FP16 GEMM / conv (kernels/fp16_gemm_cuda.py): float32 shared tiles, a
# FP16_BLOCK_M x FP16_BLOCK_N output tile per block of FP16_THREADS_M x
# FP16_THREADS_N threads (8 x 8 float32 accumulators each), FP16_BLOCK_K values
# of K per shared-memory stage.
FP16_BLOCK_M = 128
FP16_BLOCK_N = 128
FP16_BLOCK_K = 8
FP16_THREADS_M = 16
FP16_THREADS_N = 16
FP16_SMEM_PAD = 4

# Sparse SpMM (kernels/sparse_gemm_cuda.py): a block owns SPMM_ROWS consecutive
# rows of W (one after the other) and SPMM_THREADS * SPMM_VN columns of X and Y;
# each thread accumulates SPMM_VN columns (strided by the block width, so a warp
# reads 32 consecutive floats of an X row). The row's (column, value) pairs are
# staged in shared memory SPMM_THREADS at a time (one load per thread).
SPMM_ROWS = 4
SPMM_THREADS = 128
SPMM_VN = 4
