"""lowprec: hand-written numba kernels for low-precision inference.

NumPy arrays in, NumPy arrays out, with the numerics of the ONNX operator specs
(docs/quantization.md).
"""

from ._dispatch import available_isas, get_isa, set_isa
from .gemm import PackedWeights, matmul_integer, pack_weights, qlinear_matmul
from .quantize import dequantize_linear, dynamic_quantize_linear, quantize_linear

__version__ = "0.1.0"

__all__ = [
    "PackedWeights",
    "available_isas",
    "dequantize_linear",
    "dynamic_quantize_linear",
    "get_isa",
    "matmul_integer",
    "pack_weights",
    "qlinear_matmul",
    "quantize_linear",
    "set_isa",
]
