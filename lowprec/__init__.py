"""lowprec: hand-written numba kernels for low-precision inference.

NumPy arrays in, NumPy arrays out, with the numerics of the ONNX operator specs
(docs/quantization.md).
"""

import os as _os

# In a source checkout `kernels/` sits beside this folder (it is installed as
# lowprec.kernels). When Python picks this folder up from the checkout itself
# (`python -m pytest` from the repository root puts it on sys.path ahead of the
# installed package), let the subpackage resolve to that sibling folder.
_src_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isfile(
    _os.path.join(_src_root, "kernels", "__init__.py")
):
    __path__.append(_src_root)  # noqa: F821 (package __path__)

from . import nbits, prune, sparse
from ._dispatch import available_isas, get_isa, set_isa
from .conv import PackedConvWeights, conv_integer, pack_conv_weights, qlinear_conv
from .conv_half import PackedConvWeightsFP16, conv_fp16, pack_conv_weights_fp16
from .gemm import (
    PackedWeights,
    dynamic_quantize_matmul,
    matmul_integer,
    pack_weights,
    qlinear_matmul,
)
from .half import (
    PackedWeightsBF16,
    PackedWeightsFP16,
    available_half_isas,
    bfloat16_to_float32,
    float32_to_bfloat16,
    get_half_isa,
    matmul_bf16,
    matmul_fp16,
    pack_weights_bf16,
    pack_weights_fp16,
    set_half_isa,
)
from .nbits import (
    PackedCodebook,
    PackedNBits,
    dequantize_blockwise,
    dequantize_codebook,
    kmeans_quantize,
    log2_quantize,
    matmul_codebook,
    matmul_nbits,
    pack_codebook,
    pack_nbits,
    quantize_blockwise,
)
from .quantize import dequantize_linear, dynamic_quantize_linear, quantize_linear
from .sparse import qlinear_spmm, spmm

__version__ = "0.1.0"

__all__ = [
    "PackedCodebook",
    "PackedConvWeights",
    "PackedConvWeightsFP16",
    "PackedNBits",
    "PackedWeights",
    "PackedWeightsBF16",
    "PackedWeightsFP16",
    "available_half_isas",
    "available_isas",
    "bfloat16_to_float32",
    "conv_fp16",
    "conv_integer",
    "dequantize_blockwise",
    "dequantize_codebook",
    "dequantize_linear",
    "dynamic_quantize_linear",
    "dynamic_quantize_matmul",
    "float32_to_bfloat16",
    "get_half_isa",
    "get_isa",
    "kmeans_quantize",
    "log2_quantize",
    "matmul_bf16",
    "matmul_codebook",
    "matmul_fp16",
    "matmul_integer",
    "matmul_nbits",
    "nbits",
    "pack_codebook",
    "pack_conv_weights",
    "pack_conv_weights_fp16",
    "pack_nbits",
    "pack_weights",
    "pack_weights_bf16",
    "pack_weights_fp16",
    "prune",
    "qlinear_conv",
    "qlinear_matmul",
    "qlinear_spmm",
    "quantize_blockwise",
    "quantize_linear",
    "set_half_isa",
    "set_isa",
    "sparse",
    "spmm",
]
