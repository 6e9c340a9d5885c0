"""QuantizeLinear / DequantizeLinear on NVIDIA GPUs (numba-cuda).

The layout is kernels/quantize.py's: x is viewed as (P, C, Q) with C the
quantization axis, parameters as (Ps, Cs, Qs); element (p, c, q) uses parameter
(p or 0, c // block, q or 0). One thread per element, grid-stride loop over the
flat C-contiguous index (coalesced loads and stores).
"""

import numpy as np
from numba import cuda

from .cuda_intrinsics import rint


@cuda.jit
def quantize_linear(x, C, Q, scale, zero_point, block, half_div, qmin, qmax, out):
    # x (P*C*Q,) float32|float16, scale (Ps,Cs,Qs) float32, zero_point
    # (Ps,Cs,Qs) int32, out (P*C*Q,) uint8|int8|uint16|int16.
    # y = saturate(rint(x / scale) + zero_point) (docs eq. 1); half_div: x and
    # scale were both float16, so the quotient is rounded to float16 as ONNX
    # computes it (a float32 quotient rounded to float16 is the correctly
    # rounded float16 quotient: 24 >= 2 * 11 + 2 bits). NaN -> zero_point.
    Ps, Cs, Qs = scale.shape
    n = x.shape[0]
    start, step = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, n, step):
        p = i // (C * Q)
        c = (i // Q) % C
        q = i % Q
        ps = p if Ps > 1 else 0
        qs = q if Qs > 1 else 0
        cs = c // block
        v = np.float32(x[i]) / scale[ps, cs, qs]
        if half_div:
            v = np.float32(np.float16(v))
        zp = np.float64(zero_point[ps, cs, qs])
        if v != v:
            r = zp
        else:
            r = rint(np.float64(v)) + zp
            r = min(max(r, qmin), qmax)
        out[i] = r


@cuda.jit
def dequantize_linear(x, C, Q, scale, zero_point, block, out):
    # x (P*C*Q,) integer, scale (Ps,Cs,Qs) float32, zero_point (Ps,Cs,Qs) int32,
    # out (P*C*Q,) float32|float16: (float32(x) - zp) * scale in float64, rounded
    # once to float32 (docs eq. 2), then to float16 for a float16 scale (as the
    # CPU path's astype).
    Ps, Cs, Qs = scale.shape
    n = x.shape[0]
    start, step = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, n, step):
        p = i // (C * Q)
        c = (i // Q) % C
        q = i % Q
        ps = p if Ps > 1 else 0
        qs = q if Qs > 1 else 0
        cs = c // block
        d = np.float64(np.float32(x[i])) - np.float64(zero_point[ps, cs, qs])
        out[i] = np.float32(d * np.float64(scale[ps, cs, qs]))
