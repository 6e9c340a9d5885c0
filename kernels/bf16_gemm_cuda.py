"""BF16 GEMM with float32 accumulation on NVIDIA GPUs (numba-cuda).

    acc[m, n] = 0;  for j = 0, ..., ceil(K/2)-1  (a[m, K] = b[K, n] = 0):
                    acc = fl32(acc + a[m, 2j+1] * b[2j+1, n])
                    acc = fl32(acc + a[m, 2j]   * b[2j, n])
    y[m, n]   = clamp(fl32(acc + bias[n]), lo, hi)    (NaN passes the clamp)
    out       = y (float32) | bf16(y) (uint16 bits, round to nearest even,
                overflow -> inf, NaN kept and quieted)

lowprec.half's bfloat16 order: pairs of k, the odd term first (AVX512_BF16
``vdpbf16ps``). The loop is kernels/fp16_gemm_cuda.py's with the K index of a
stage run as kk ^ 1 (1, 0, 3, 2, ...): a stage starts at an even k, so that is
exactly the pair order, and the zero staged at k = K for odd K adds +0 first
(an accumulator that starts at +0 is never -0, so acc + 0 == acc). bfloat16 ->
float32 is the 16-bit pattern shifted up (exact), done once while a tile is
staged in shared memory. A product of two bfloat16 values (8-bit significands)
is exact in float32 unless it leaves float32's normal range, so NVVM's fma
contraction gives multiply-then-add's bits there: the CPU portable path's bits,
outside the subnormal / overflow products the half module's contract excludes.

The output conversion is kernels/fp16_gemm.py::f32_to_bf16_bits on the integer
bits, not ``cvt.rn.bf16.f32`` (which returns a canonical NaN), so NaN payloads
match the CPU. Tiling: kernels/config_cuda.py FP16_* (BK must be even).
"""

from . import fp16_gemm_cuda


def gemm_kernel(bm, bn, bk, tm, tn, pad):
    """The BF16 GEMM for one tile configuration: kernels/fp16_gemm_cuda.py's
    half GEMM compiled for bfloat16 bits (one loop for both formats)."""
    if bk % 2:
        msg = f"FP16_BLOCK_K={bk} must be even (bfloat16 pairs of k)"
        raise ValueError(msg)
    return fp16_gemm_cuda.gemm_kernel(bm, bn, bk, tm, tn, pad, bf16=True)
