"""Host-side drivers for the INT8 GEMM paths (see ``_dispatch`` for the interface)."""

from __future__ import annotations

import numpy as np

from .kernels import config
from .kernels import int8_gemm as _portable


class PortableGemm:
    """Plain numba loops; exact on every CPU. ~20-50 GOP/s per core."""

    name = "portable"
    k_align = 1

    @staticmethod
    def pack(b_s8: np.ndarray) -> np.ndarray:
        # b' (K,N) int8 row-major is already this path's layout
        return b_s8

    @staticmethod
    def gemm(a_u8: np.ndarray, packed: np.ndarray, out: np.ndarray) -> None:
        _portable.gemm_u8s8(a_u8, packed, out, config.TILE_M, config.TILE_N)


BACKENDS = {"portable": PortableGemm}
