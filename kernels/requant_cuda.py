"""The INT8 epilogue of kernels/int8_gemm_cuda.py as a device function, shared
by the CUDA convolution and SpMM kernels (docs/quantization.md eqs. 11-13):

    mode 1:  sat(rint(fl64(acc * mult) + zy))  clamped to [qlo, qhi]
    mode 2:  float32(fl64(acc * mult))         clamped to [qlo, qhi]

acc is the exact int64 accumulator of eq. 8. mul_rn keeps the multiply and the
add two roundings (NVVM would contract them into one fma.rn.f64). Mode 0
(int32 out) stores acc itself and does not call this.
"""

import numpy as np
from numba import cuda

from .cuda_intrinsics import mul_rn, rint


@cuda.jit(device=True, inline="always")
def requant(acc, mult, zy, qlo, qhi, mode):
    # acc int64, mult/zy/qlo/qhi float64 -> float64 value to store
    p = mul_rn(np.float64(acc), mult)
    if mode == 1:
        r = rint(p + zy)
    else:
        r = np.float64(np.float32(p))
    return min(max(r, qlo), qhi)
