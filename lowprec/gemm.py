"""INT8 matrix multiplication: ONNX MatMulInteger and QLinearMatMul, prepacked weights.

Every path shares one contract (docs/quantization.md):

    raw product   P = a' @ b'   a' = a (+128 if int8), b' = b (-128 if uint8)  (eq. 6)
    exact result  acc = P - ZA*colsum(b') - ZB*rowsum(a - a_zp) + bias        (eq. 8)
    output        int32 acc | sat(rint(acc*mult + y_zp)) | float32(acc*mult)  (11-13)

An instruction-set path (``_gemm_backends``) computes P for one register tile
and applies the shared epilogue (``kernels/requant.py``) while the tile is in L1.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np

from . import _dispatch
from . import _validate as v
from .kernels import config
from .kernels import int8_gemm as _kg
from .kernels import quantize as _kq
from .kernels import requant as _kr
from .quantize import _QUANT_BLOCK
from .quantize import dynamic_params as _dynamic_params
from .quantize import dynamic_quantize_linear as _dynamic_quantize
from .quantize import dynamic_range_params as _dynamic_range_params

# |a - a_zp| * |b - b_zp| <= 255 * 255: an exact result fits int32 for K up to
# this bound. Beyond it the K-chunked path accumulates in int64 and checks.
K_INT32_SAFE = (2**31 - 1) // (255 * 255)

# Below this many multiply-adds a call runs on the calling thread: launching
# numba's thread pool costs ~4 us here, more than the work itself.
SERIAL_MACS = 1 << 20

_MODE_INT32, _MODE_QUANT, _MODE_FLOAT = 0, 1, 2

# read-only constants handed to kernels that only read them
_ZERO1 = np.zeros(1, np.int64)
_ONE11 = np.ones((1, 1))  # the multiplier of int32 output: never read
# cached epilogues / ZA folds per PackedWeights (cleared when full)
_FOLDED_MAX = 64
for _c in (_ZERO1, _ONE11):
    _c.flags.writeable = False


def _a_offset(dtype) -> int:
    """a' = a + offset (eq. 5): int8 becomes uint8 by adding 128."""
    return 128 if dtype == np.int8 else 0


def _b_offset(dtype) -> int:
    """b' = b - offset (eq. 5): uint8 becomes int8 by subtracting 128."""
    return 128 if dtype == np.uint8 else 0


class PackedWeights:
    """Immutable prepacked INT8 weights for ``matmul_integer`` / ``qlinear_matmul``.

    Build with :func:`pack_weights`. Holds b' (docs eq. 5), its column sums, the
    zero point / scale given at pack time, and each instruction-set path's
    layout, built on first use and reused by every call.
    """

    __slots__ = (
        "shape",
        "dtype",
        "zero_point",
        "scale",
        "_b_s8",
        "_col_sum",
        "_p_max",
        "_zb_eff",
        "_need_rows",
        "_zeros_n",
        "_fzeros_n",
        "_layouts",
        "_mults",
        "_folded",
        "_zp_key",
        "_scale_key",
        "_last_call",
    )

    def __init__(self, b, zero_point=None, scale=None):
        K, N = b.shape
        b_s8 = np.empty((K, N), np.int8)
        col_sum = np.empty(N, np.int64)
        col_abs = np.empty(N, np.int64)
        flip = np.uint8(0x80 if b.dtype == np.uint8 else 0)
        _kg.prepare_b(b, flip, b_s8, col_sum, col_abs)
        zb = np.zeros(1, b.dtype) if zero_point is None else zero_point
        fields = {
            "shape": (K, N),
            "dtype": b.dtype,
            "zero_point": zero_point,
            "scale": scale,
            "_b_s8": b_s8,
            "_col_sum": col_sum,
            # |P| <= 255 * max_n sum_k |b'[k, n]| (a' <= 255): the VNNI tile's
            # float32 epilogue needs |P + bias| < 2**24 (narrow_epilogue)
            "_p_max": 255 * int(col_abs.max(initial=0)),
            "_zb_eff": _zb_eff(zb, b.dtype, N),
            "_need_rows": None,
            "_zeros_n": np.zeros(N, np.int64),
            # "no float bias" is -0.0: x + -0.0 is x for every x, -0.0 included
            # (+0.0 turned a -0.0 product, M = 0 after underflow, into +0.0)
            "_fzeros_n": np.full(N, -0.0, np.float32),
            "_layouts": {},
            "_mults": {},
            "_folded": {},
            # the per-tensor zero point / scale as _packed_match compares them
            # (None: per column or absent), computed once, not on every call
            "_zp_key": None
            if zero_point is None or zero_point.size != 1
            else _scalar_zero_point(zero_point, b.dtype),
            "_scale_key": None
            if scale is None or scale.size != 1
            else _scale_key(scale),
            # qlinear_matmul's last fast call: its argument objects and what
            # its checks derived from them (qlinear_matmul, _qlinear_fast)
            "_last_call": None,
        }
        fields["_need_rows"] = bool(fields["_zb_eff"].any())
        for name, value in fields.items():
            if isinstance(value, np.ndarray):
                value.flags.writeable = False
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        msg = "PackedWeights is immutable; pack new weights with lowprec.pack_weights"
        raise AttributeError(msg)

    def __repr__(self):
        K, N = self.shape
        zp = "none" if self.zero_point is None else f"{self.zero_point.shape}"
        sc = "none" if self.scale is None else f"{self.scale.shape}"
        return (
            f"PackedWeights(K={K}, N={N}, dtype={self.dtype}, zero_point={zp}, "
            f"scale={sc})"
        )

    @property
    def nbytes(self) -> int:
        """Bytes held: b', column sums and every layout built so far."""
        layouts = sum(x.nbytes for x in self._layouts.values() if x is not self._b_s8)
        return self._b_s8.nbytes + self._col_sum.nbytes + layouts

    def _fold_za(self, za: int, bias: np.ndarray) -> np.ndarray:
        """bias - za * colsum(b') (eq. 8 with a per-tensor ZA); cached per ZA
        when the bias is the pack's own zeros."""
        if bias is not self._zeros_n:
            return bias - za * self._col_sum
        folded = self._folded.get(za)
        if folded is None:
            folded = self._folded[za] = -za * self._col_sum
            folded.flags.writeable = False
        return folded

    def _layout(self, backend, k0: int = 0, k1: int | None = None):
        """The backend's layout of rows k0:k1 of b' (K chunks: config.K_CHUNK)."""
        k1 = self.shape[0] if k1 is None else k1
        key = (backend.name, k0, k1)
        layout = self._layouts.get(key)
        if layout is None:
            layout = backend.pack(self._b_s8[k0:k1])
            self._layouts[key] = layout
        return layout


def _zb_eff(zb: np.ndarray, dtype, N: int) -> np.ndarray:
    """ZB = b_zero_point - offset (eq. 5) as a contiguous (N,) int64 array."""
    out = np.empty(N, np.int64)
    out[:] = zb.reshape(-1).astype(np.int64) - _b_offset(dtype)
    return out


def pack_weights(b, b_zero_point=None, b_scale=None) -> PackedWeights:
    """Prepack INT8 weights once for many calls.

    Parameters
    ----------
    b : ndarray (K, N) of uint8 or int8
    b_zero_point : scalar or (N,) of b's dtype, optional
    b_scale : scalar or (N,) float32/float16, optional (needed by qlinear_matmul
        unless passed there)

    Returns
    -------
    PackedWeights, accepted as ``b`` by :func:`matmul_integer` and
    :func:`qlinear_matmul` with results identical to the unpacked call.
    """
    if isinstance(b, PackedWeights):
        msg = "b is already a PackedWeights object; pass it to matmul directly"
        raise TypeError(msg)
    v.check_array(b, "b", v.INT8_TYPES, fix="quantize it to int8/uint8 first")
    if b.ndim != 2:
        msg = f"b must be 2-D (K, N) to be packed, got shape {b.shape}"
        raise ValueError(msg)
    N = b.shape[1]
    zp = None
    if b_zero_point is not None:
        zp = v.zero_point_param(b_zero_point, "b_zero_point", b.dtype)
        zp = _col_param(zp, "b_zero_point", N)
    sc = None
    if b_scale is not None:
        sc = _col_param(v.scale_param(b_scale, "b_scale"), "b_scale", N)
    return PackedWeights(b, zp, sc)


def _col_param(arr: np.ndarray, name: str, N: int) -> np.ndarray:
    """Scalar or (N,) per-column parameter of 2-D weights -> shape (1,) or (N,)."""
    if arr.size == 1:
        return arr.reshape(1)
    if arr.ndim == 1 and arr.shape[0] == N:
        return arr
    msg = (
        f"{name} must be a scalar or have shape ({N},) (one per column), "
        f"got {arr.shape}"
    )
    raise ValueError(msg)


# --------------------------------------------------------------------------- #
# the 2-D drivers


def _gemm_2d(a, packed, zb, za_eff, bias, mult, zy, qlo, qhi, mode, out, fbias=None):
    """out (M,N) = epilogue(a @ b) for 2-D a and packed b (docs eqs. 5-13).

    zb (N,) int64 = ZB; za_eff (1|M,) int64 = ZA; bias (N,) int64;
    mult (1|M, N) float64; fbias (N,) float32 real bias (float output only).
    """
    M, K = a.shape
    N = packed.shape[1]
    if M == 0 or N == 0:
        return
    if K == 0 or K > K_INT32_SAFE:
        _gemm_2d_chunked(a, packed, zb, za_eff, bias, mult, zy, qlo, qhi, mode, out)
        if fbias is not None:  # float bias, then the clamp, as the fused epilogue
            np.clip(out + fbias, np.float32(qlo), np.float32(qhi), out=out)
        return
    backend = _dispatch.gemm_backend(M)
    need_rows = packed._need_rows if zb is packed._zb_eff else bool(zb.any())
    a_u8, row_sum = _prepare_a(a, backend.k_min, need_rows, backend.takes_int8)
    if row_sum is not None:
        row_sum -= K * za_eff  # rowsum(a - a_zp) = rowsum(a') - K * ZA (eq. 9)
    else:
        row_sum = _ZERO1
    if za_eff.shape[0] == 1 and za_eff[0] != 0:
        # per-tensor ZA: fold -ZA * colsum(b') into the bias once per call (per
        # pack when there is no bias), so the epilogue adds one vector (eq. 8)
        bias, za_eff = packed._fold_za(int(za_eff[0]), bias), _ZERO1
    backend.fused(
        _ro(a_u8),
        packed._layout(backend),
        None
        if backend.tile is None
        else np.empty((numba.config.NUMBA_NUM_THREADS, *backend.tile), np.int32),
        # the epilogue's parameters (eqs. 8-13) travel as one tuple
        (
            _ro(za_eff),
            _ro(row_sum),
            packed._col_sum,
            _ro(zb),
            _ro(bias),
            _ro(mult),
            zy,
            qlo,
            qhi,
            mode,
            _ro(packed._fzeros_n if fbias is None else fbias),
        ),
        out,
        serial=M * N * K < SERIAL_MACS or _dispatch.num_threads() == 1,
        pmax=packed._p_max,
    )


def _fused_cached(a, packed, za_eff, key, epi_of, out) -> bool:
    """The common engine call (C-contiguous a used in place, no row sums,
    per-tensor ZA) with the epilogue tuple and the layout kept on the pack per
    (path, ZA, key): what _gemm_2d builds on every call. epi_of(bias) makes the
    tuple from the bias with ZA folded in. False: not that case (the caller
    takes _gemm_2d). Measured on a 1x64x16 call, 1 thread: qlinear_matmul
    18.6 -> 11.8 us with this cache."""
    M, K = a.shape
    backend = _dispatch.gemm_backend(M)
    if (
        packed._need_rows
        or M == 0
        or out.shape[1] == 0
        or backend.tile is not None
        or not 0 < K <= K_INT32_SAFE
        or K < backend.k_min
        or not a.flags.c_contiguous
        or (a.dtype != np.uint8 and not backend.takes_int8)
    ):
        return False
    za = int(za_eff[0])
    full = ("epi", backend.name, za, *key)
    hit = packed._folded.get(full)
    if hit is None:
        if len(packed._folded) > _FOLDED_MAX:
            packed._folded.clear()
        bias = packed._fold_za(za, packed._zeros_n) if za else packed._zeros_n
        hit = packed._folded[full] = (packed._layout(backend), epi_of(_ro(bias)))
    layout, epi = hit
    N = out.shape[1]
    serial = M * N * K < SERIAL_MACS or _dispatch.num_threads() == 1
    backend.fused(_ro(a), layout, None, epi, out, serial=serial, pmax=packed._p_max)
    return True


def _int32_cached(a, packed, za_eff, out) -> bool:
    """matmul_integer's call through _fused_cached."""

    def epi_of(bias):
        return (
            _ro(_ZERO1), _ro(_ZERO1), packed._col_sum, _ro(packed._zb_eff), bias,
            _ro(_ONE11), 0.0, 0.0, 0.0, _MODE_INT32, _ro(packed._fzeros_n),
        )  # fmt: skip

    return _fused_cached(a, packed, za_eff, (), epi_of, out)


def _ro(x: np.ndarray) -> np.ndarray:
    """A read-only view. numba compiles a kernel again for every read-only /
    writable combination of its arguments (a different array type each); the
    inputs a kernel only reads are always passed read-only, so one variant
    serves every call (measured: CI compile time minutes -> seconds)."""
    if not x.flags.writeable:
        return x
    view = x.view()
    view.flags.writeable = False
    return view


def _prepare_a(a, k_min, need_rows, takes_int8=False):
    """a' (eq. 5) as C-contiguous uint8 with >= k_min columns, and its row sums
    when needed. A C-contiguous uint8 a is used in place, and so is an int8 one
    when the backend flips it itself (takes_int8) and no row sums are needed."""
    M, K = a.shape
    k_pad = max(K, k_min)
    if k_pad == K and a.flags.c_contiguous:
        if a.dtype == np.uint8:
            row_sum = None
            if need_rows:
                row_sum = np.empty(M, np.int64)
                _kg.row_sums_u8(_ro(a), row_sum)
            return a, row_sum
        if takes_int8 and not need_rows:
            return a, None
    a_u8 = np.empty((M, k_pad), np.uint8)
    row_sum = np.empty(M, np.int64)
    _kg.prepare_a(_ro(a), np.uint8(_a_offset(a.dtype)), k_pad, a_u8, row_sum)
    return a_u8, (row_sum if need_rows else None)


def _gemm_2d_chunked(a, packed, zb, za_eff, bias, mult, zy, qlo, qhi, mode, out):
    """Raw products over K chunks (config.K_CHUNK) combined in int64, then
    `requantize` with its int32 range check. Serves K == 0 and K > 33025."""
    M, K = a.shape
    N = packed.shape[1]
    backend = _dispatch.gemm_backend()
    need_rows = bool(zb.any())
    chunks = [(k0, min(k0 + config.K_CHUNK, K)) for k0 in range(0, K, config.K_CHUNK)]
    row_sum = np.zeros(M, np.int64)
    p = np.zeros((M, N), np.int32)
    total = np.zeros((M, N), np.int64) if len(chunks) > 1 else p
    for k0, k1 in chunks:
        a_u8, rs = _prepare_a(
            np.ascontiguousarray(a[:, k0:k1]), backend.k_min, need_rows
        )
        if rs is not None:
            row_sum += rs
        backend.gemm(_ro(a_u8), packed._layout(backend, k0, k1), p)
        if len(chunks) > 1:
            _kr.accumulate(total, p)
    row_sum -= K * za_eff
    bad = _kr.requantize(
        total, _ro(za_eff), packed._col_sum, _ro(zb), _ro(row_sum), _ro(bias),
        _ro(mult), zy, qlo, qhi, mode, out,
    )  # fmt: skip
    if bad:
        msg = (
            f"{bad} MatMulInteger outputs do not fit int32 (K={K} allows sums past "
            f"2**31); ONNX would wrap them silently, lowprec refuses. Use "
            f"qlinear_matmul (exact int64 accumulation) or split K"
        )
        raise OverflowError(msg)


# --------------------------------------------------------------------------- #
# numpy matmul broadcasting and parameter shapes


def _check_ab(a, b):
    """Validate a and b; return (a_shape, b_shape) as 2+-D and the batch shape."""
    v.check_array(
        a, "a", v.INT8_TYPES, fix="quantize it first with lowprec.quantize_linear"
    )
    if a.ndim == 0:
        msg = "a must have at least 1 dimension (numpy matmul), got a 0-d array"
        raise ValueError(msg)
    if isinstance(b, PackedWeights):
        b_shape = b.shape
    else:
        v.check_array(
            b, "b", v.INT8_TYPES, fix="quantize it first with lowprec.quantize_linear"
        )
        if b.ndim == 0:
            msg = "b must have at least 1 dimension (numpy matmul), got a 0-d array"
            raise ValueError(msg)
        b_shape = b.shape
    a_shape = (1, a.shape[0]) if a.ndim == 1 else a.shape
    b_shape = (b_shape[0], 1) if len(b_shape) == 1 else tuple(b_shape)
    if a_shape[-1] != b_shape[-2]:
        msg = (
            f"inner dimensions differ: a.shape[-1]={a_shape[-1]}, "
            f"b.shape[-2]={b_shape[-2]} (a {a.shape} @ b {b_shape})"
        )
        raise ValueError(msg)
    if len(a_shape) == 2 and len(b_shape) == 2:
        return a_shape, b_shape, ()
    try:
        batch = np.broadcast_shapes(a_shape[:-2], b_shape[:-2])
    except ValueError:
        msg = (
            f"batch dimensions of a {a.shape} and b {b_shape} do not "
            f"broadcast (numpy matmul rules)"
        )
        raise ValueError(msg) from None
    return a_shape, b_shape, batch


def _row_param(arr, name, a_shape, batch):
    """Per-tensor / per-row parameter of a -> (1,), (M,) or batch+(M,)."""
    M = a_shape[-2]
    if arr.size == 1:
        return arr.reshape(1)
    if arr.ndim == 1 and arr.shape[0] == M:
        return arr
    target = (*a_shape[:-2], M, 1)
    try:
        full = np.broadcast_to(arr, target)
    except ValueError:
        msg = (
            f"{name} must be a scalar, 1-D of length M={M} (per row), or "
            f"broadcastable to {target}, got shape {arr.shape}"
        )
        raise ValueError(msg) from None
    return np.broadcast_to(full[..., 0], (*batch, M))


def _col_param_nd(arr, name, b_shape, batch):
    """Per-tensor / per-column parameter of b -> (1,), (N,) or batch+(N,)."""
    N = b_shape[-1]
    if arr.size == 1:
        return arr.reshape(1)
    if arr.ndim == 1 and arr.shape[0] == N:
        return arr
    target = (*b_shape[:-2], 1, N)
    try:
        full = np.broadcast_to(arr, target)
    except ValueError:
        msg = (
            f"{name} must be a scalar, 1-D of length N={N} (per column), or "
            f"broadcastable to {target}, got shape {arr.shape}"
        )
        raise ValueError(msg) from None
    return np.broadcast_to(full[..., 0, :], (*batch, N))


def _rows(param, idx, rows):
    """A row parameter for one 2-D GEMM: (1,) or (rows,); idx None means the
    batch was flattened into the rows."""
    if param.ndim == 1 and param.shape[0] == 1:
        return param
    if idx is not None:
        return param if param.ndim == 1 else param[idx]
    if param.ndim == 1:
        return np.tile(param, rows // param.shape[0])
    return np.ascontiguousarray(param).reshape(rows)


def _cols(param, idx):
    return param if param.ndim == 1 else param[idx]


def _b_param(value, packed_value, name, make, b):
    """A b-side parameter from the call or from the PackedWeights. Given in both
    places, the values must agree."""
    if not isinstance(b, PackedWeights) or packed_value is None:
        return None if value is None else make(value)
    if value is None:
        return packed_value
    got = make(value).reshape(-1)
    if not (
        got.dtype == packed_value.dtype
        and got.size in (1, packed_value.size)
        and bool(np.all(packed_value == got))
    ):
        msg = (
            f"{name} was given both to pack_weights and to this call with "
            f"different values; pass it in one place only"
        )
        raise ValueError(msg)
    return packed_value


def _run(a, b, za, zb, bias, mult_fn, zy, qlo, qhi, mode, out_dtype):
    """numpy-matmul broadcasting around _gemm_2d.

    za, zb: validated zero points (any allowed shape); bias (1|N,) int64;
    mult_fn(idx, rows) -> (1|rows, N) float64 for one 2-D GEMM.
    """
    a_shape, b_shape, batch = _check_ab(a, b)
    M, K = a_shape[-2:]
    N = b_shape[-1]
    za = _row_param(za, "a_zero_point", a_shape, batch)
    from_pack = isinstance(b, PackedWeights) and (
        zb is b.zero_point or (b.zero_point is None and not zb.any())
    )
    zb = _col_param_nd(zb, "b_zero_point", b_shape, batch)
    packed_b = isinstance(b, PackedWeights)
    if packed_b and bias is _ZERO1:
        bias = b._zeros_n
    elif bias.shape != (N,):
        bias = np.full(N, bias[0], np.int64)
    out = np.empty((*batch, M, N), out_dtype)
    if len(b_shape) == 2 and zb.ndim == 1:
        # one GEMM: a's batch dimensions are folded into its rows
        if packed_b:
            packed = b
            zb_eff = b._zb_eff if from_pack else _zb_eff(zb, b.dtype, N)
        else:
            packed = PackedWeights(b.reshape(b_shape), zb)
            zb_eff = packed._zb_eff
        rows = math.prod(batch) * M
        a2 = a.reshape(rows if not batch else math.prod(a.shape[:-1]), K)
        _gemm_2d(
            a2,
            packed,
            zb_eff,
            _za_eff(_rows(za, None, rows), a.dtype),
            bias,
            mult_fn(None, rows),
            zy,
            qlo,
            qhi,
            mode,
            out.reshape(rows, N),
        )
    else:
        a_b = np.broadcast_to(a.reshape(a_shape), (*batch, M, K))
        b_b = np.broadcast_to(b.reshape(b_shape), (*batch, K, N))
        for idx in np.ndindex(*batch):
            packed = PackedWeights(b_b[idx], _cols(zb, idx))
            _gemm_2d(
                a_b[idx],
                packed,
                packed._zb_eff,
                _za_eff(_rows(za, idx, M), a.dtype),
                bias,
                mult_fn(idx, M),
                zy,
                qlo,
                qhi,
                mode,
                out[idx],
            )
    if a.ndim == 1:
        out = out[..., 0, :]
    if not packed_b and b.ndim == 1:
        out = out[..., 0]
    return out


def _za_eff(za, dtype):
    """ZA = a_zero_point + offset (eq. 5) as int64."""
    return za.astype(np.int64) + _a_offset(dtype)


def _scalar_zero_point(value, dtype):
    """A per-tensor zero point as a Python int, or None where the general path
    must look at it (arrays of other shapes, wrong types: it raises there).
    Exact type tests first: this runs on every engine call (0.6 -> 0.2 us)."""
    if value is None:
        return 0
    t = type(value)
    if t is int:
        lo, hi = _int_range(dtype)
        return value if lo <= value <= hi else None
    if t is dtype.type:
        return int(value)
    if isinstance(value, np.ndarray | np.integer) and value.dtype == dtype:
        return value.item() if value.size == 1 else None
    return None


@functools.cache
def _int_range(dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)  # ~0.7 us a call: once per dtype
    return int(info.min), int(info.max)


def _fast_2d(a, b, a_zero_point):
    """(M, K, N, ZA) when `a` is a 2-D int8/uint8 array, `b` PackedWeights and
    the a zero point a scalar: the common call of an engine, validated in a few
    comparisons. None sends the call down the general (validating) path."""
    if not (
        type(a) is np.ndarray
        and type(b) is PackedWeights
        and a.ndim == 2
        and a.dtype in v.INT8_TYPES
        and a.shape[1] == b.shape[0]
    ):
        return None
    za = _scalar_zero_point(a_zero_point, a.dtype)
    if za is None:
        return None
    return a.shape[0], a.shape[1], b.shape[1], _const_za(za + _a_offset(a.dtype))


@functools.cache
def _const_za(value: int) -> np.ndarray:
    """ZA as a read-only one-element int64 array, made once per value."""
    arr = np.full(1, value, np.int64)
    arr.flags.writeable = False
    return arr


def _packed_match(value, packed_value, packed_key, key) -> bool:
    """Whether a b-side argument of a call with PackedWeights adds nothing to
    the pack: None, the packed array itself, or a scalar equal to the packed
    per-tensor one (what an engine passing every ONNX input sends).
    packed_key: the pack's key of packed_value (PackedWeights._zp_key /
    _scale_key); key(x) -> a hashable scalar value or None."""
    if value is None or value is packed_value:
        return True
    if packed_key is None:
        return False
    got = key(value)
    return got is not None and got == packed_key


def _call_multiplier(packed, sa, sy):
    """eq. 10 for per-tensor a_scale / y_scale keys (_scale_key) against the
    packed b_scale, (1, N) float64, kept on the pack: an engine calling one
    layer with fixed scales computes it once."""
    mult = packed._mults.get((sa, sy))
    if mult is None:
        if len(packed._mults) > _FOLDED_MAX:
            packed._mults.clear()
        sa_arr = np.full(1, sa[1], np.dtype(sa[0]))
        sy_arr = np.full(1, sy[1], np.dtype(sy[0]))
        mult = _multiplier(sa_arr, packed.scale, sy_arr, packed.shape[1])
        mult.flags.writeable = False
        packed._mults[(sa, sy)] = mult
    return mult


# numpy scalar scale types and their dtype characters (_scale_key)
_SCALE_SCALARS = {np.float32: "f", np.float16: "e"}


def _scale_key(value):
    """A per-tensor scale as (dtype char, float value), or None where the general
    path must look at it (and raise if it is invalid). Exact type tests first:
    this runs on every engine call (0.77 -> 0.25 us)."""
    t = type(value)
    char = _SCALE_SCALARS.get(t)
    if char is not None:
        key = (char, float(value))
    elif t is float:
        key = ("f", float(np.float32(value)))
    elif isinstance(value, np.ndarray | np.floating) and value.dtype in v.SCALE_TYPES:
        if value.size != 1:
            return None
        key = (value.dtype.char, value.item())
    else:
        return None
    return key if 0.0 < key[1] < math.inf else None


# Argument types whose objects cannot change: a call passing the very objects
# of the pack's last fast call (PackedWeights._last_call) skips their checks.
# Arrays (0-d ones included) are mutable and never remembered.
_IMMUTABLE = frozenset(
    {type(None), int, float, str, np.float16, np.float32, np.uint8, np.int8}
)
# out_dtype given as a class: only these (np.dtype reads any other class's
# `dtype` attribute, which can change)
_OUT_CLASSES = (np.uint8, np.int8, np.float32)


def _immutable(args) -> bool:
    return all(
        type(x) in _IMMUTABLE
        or (type(x) is tuple and all(type(y) in _IMMUTABLE for y in x))
        or isinstance(x, np.dtype)
        or any(x is c for c in _OUT_CLASSES)
        for x in args
    )


def _qlinear_fast(a, b, za_eff, sa, sy, zyf, act, odt):
    """qlinear_matmul's engine call once its per-tensor arguments are checked:
    2-D a (its K checked), packed b with its own b scale / zero point, scale
    keys sa, sy (_scale_key), the output zero point zyf, the activation act
    and the output dtype odt. Measured, 1 x 64 x 64 on the avx2 path, 1
    thread: 12.3 -> 8.5 us a call when the arguments repeat (_last_call)."""
    M, N = a.shape[0], b.shape[1]
    out = np.empty((M, N), odt)

    def epi_of(bias):
        qlo, qhi = _quant_bounds(act, zyf, sy[1], odt)
        mult = _ro(_call_multiplier(b, sa, sy))
        return (
            _ro(_ZERO1), _ro(_ZERO1), b._col_sum, _ro(b._zb_eff), bias,
            mult, zyf, qlo, qhi, _MODE_QUANT, _ro(b._fzeros_n),
        )  # fmt: skip

    if not _fused_cached(a, b, za_eff, (sa, sy, odt.char, zyf, act), epi_of, out):
        qlo, qhi = _quant_bounds(act, zyf, sy[1], odt)
        mult = _call_multiplier(b, sa, sy)
        _gemm_2d(
            a, b, b._zb_eff, za_eff, b._zeros_n, mult, zyf, qlo, qhi, _MODE_QUANT,
            out,
        )  # fmt: skip
    return out


def _zero_point(value, name, dtype):
    if value is None:
        return np.zeros(1, dtype)
    return v.zero_point_param(value, name, dtype)


# --------------------------------------------------------------------------- #
# public functions


def _on_gpu(device, a, b) -> bool:
    """Whether the call goes to the CUDA path: device arrays given, or
    device="cuda" (lowprec._cuda loads numba.cuda only then)."""
    if device is None and type(a) is np.ndarray:
        return False
    from . import _cuda

    arrays = (a,) if isinstance(b, PackedWeights) else (a, b)
    return _cuda.use_cuda(*arrays, device=device)


def matmul_integer(a, b, a_zero_point=None, b_zero_point=None, *, device=None):
    """ONNX MatMulInteger: ``(a - a_zero_point) @ (b - b_zero_point)`` in int32.

    Parameters
    ----------
    a : ndarray (..., M, K) or (K,) of uint8 or int8
    b : ndarray (..., K, N) or (K,) of uint8 or int8, or :class:`PackedWeights`
    a_zero_point : scalar, (M,) per row, or broadcastable to a.shape[:-1]+(1,);
        a's dtype; default 0
    b_zero_point : scalar, (N,) per column, or broadcastable to
        b.shape[:-2]+(1, N); b's dtype; default 0 (or the packed one)
    device : None, "cpu" or "cuda"
        None follows the arrays: CUDA device arrays (CuPy, numba) run on the GPU
        and come back as the same kind (docs/cuda.md).

    Returns
    -------
    int32 ndarray with numpy matmul's output shape.

    Raises
    ------
    OverflowError
        When an exact result does not fit int32 (possible only for
        K > 33025); ONNX allows wrapping, lowprec does not.

    Examples
    --------
    >>> import numpy as np, lowprec
    >>> a = np.array([[11, 7, 3], [10, 6, 2]], np.uint8)
    >>> b = np.array([[1, 4], [2, 5], [3, 6]], np.uint8)
    >>> lowprec.matmul_integer(a, b, np.uint8(12), np.uint8(0))
    array([[-38, -83],
           [-44, -98]], dtype=int32)
    """
    if _on_gpu(device, a, b):
        from . import cuda_ops

        return cuda_ops.matmul_integer_cuda(a, b, a_zero_point, b_zero_point)
    fast = _fast_2d(a, b, a_zero_point) if b_zero_point is None else None
    if fast is not None:
        M, _, N, za_eff = fast
        out = np.empty((M, N), np.int32)
        if not _int32_cached(a, b, za_eff, out):
            _gemm_2d(a, b, b._zb_eff, za_eff, b._zeros_n, _ONE11, 0.0, 0.0, 0.0, 0, out)
        return out
    _check_ab(a, b)
    za = _zero_point(a_zero_point, "a_zero_point", a.dtype)
    b_dtype = b.dtype
    zb = _b_param(
        b_zero_point,
        b.zero_point if isinstance(b, PackedWeights) else None,
        "b_zero_point",
        lambda z: v.zero_point_param(z, "b_zero_point", b_dtype),
        b,
    )
    if zb is None:
        zb = np.zeros(1, b_dtype)
    return _run(
        a, b, za, zb, _ZERO1, lambda idx, rows: _ONE11,
        0.0, 0.0, 0.0, _MODE_INT32, np.int32,
    )  # fmt: skip


def qlinear_matmul(
    a,
    a_scale,
    a_zero_point,
    b,
    b_scale,
    b_zero_point,
    y_scale,
    y_zero_point,
    *,
    bias=None,
    activation=None,
    out_dtype=None,
    device=None,
):
    """ONNX QLinearMatMul (opset 21) with fused bias, activation and float output.

    ``y = saturate(rint((a - a_zp) @ (b - b_zp) + bias) * M + y_zp))`` with the
    multiplier ``M = a_scale * b_scale / y_scale`` computed in the scales' float
    type, the product and rounding (half to even) as ONNX's reference does
    (docs/quantization.md, eqs. 10-13).

    Parameters
    ----------
    a : ndarray (..., M, K) or (K,) of uint8/int8
    a_scale, a_zero_point : scalar or per row (M,); float32/float16 and a's dtype
    b : ndarray (..., K, N) or (K,) of uint8/int8, or :class:`PackedWeights`
    b_scale, b_zero_point : scalar or per column (N,); may be None when packed
    y_scale, y_zero_point : scalars; y_zero_point's dtype (uint8/int8) is the
        output type. Both may be None with ``out_dtype=np.float32``.
    bias : int32 (N,) or scalar, optional
        Added to the accumulator, in its scale ``a_scale * b_scale`` (as
        QLinearConv's B).
    activation : None, "relu", "relu6" or (min, max)
        Clamp in real units, applied before the final saturation (eq. 12).
    out_dtype : np.uint8, np.int8 or np.float32, optional
        float32 returns the real result ``acc * a_scale * b_scale`` (clamped by
        the activation) instead of requantizing (eq. 13).
    device : None, "cpu" or "cuda"
        As in :func:`matmul_integer`.

    Examples
    --------
    >>> import numpy as np, lowprec
    >>> a = np.array([[208, 236, 0, 238], [3, 214, 255, 29]], np.uint8)
    >>> b = np.array([[152, 51, 244], [60, 26, 255], [0, 127, 246], [127, 254, 247]],
    ...              np.uint8)
    >>> lowprec.qlinear_matmul(a, np.float32(0.0066), np.uint8(113), b,
    ...                        np.float32(0.00705), np.uint8(114),
    ...                        np.float32(0.0107), np.uint8(118))
    array([[168, 115, 255],
           [  1,  66, 151]], dtype=uint8)
    """
    if _on_gpu(device, a, b):
        from . import cuda_ops

        return cuda_ops.qlinear_matmul_cuda(
            a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale,
            y_zero_point, bias=bias, activation=activation, out_dtype=out_dtype,
        )  # fmt: skip
    if bias is None and type(b) is PackedWeights:
        last = b._last_call
        # the same objects (identity: equal values of other types can differ
        # in meaning, np.float16 against np.float32 scales)
        if (
            last is not None
            and a_scale is last[0]
            and a_zero_point is last[1]
            and b_scale is last[2]
            and b_zero_point is last[3]
            and y_scale is last[4]
            and y_zero_point is last[5]
            and activation is last[6]
            and out_dtype is last[7]
            and type(a) is np.ndarray
            and a.ndim == 2
            and a.shape[1] == b.shape[0]
            and a.dtype == last[8]
        ):
            return _qlinear_fast(a, b, *last[9:])
    fast = None
    if (
        bias is None
        and y_scale is not None
        and type(b) is PackedWeights
        and b.scale is not None
        and _packed_match(
            b_zero_point,
            b.zero_point,
            b._zp_key,
            lambda z: _scalar_zero_point(z, b.dtype),
        )
        and _packed_match(b_scale, b.scale, b._scale_key, _scale_key)
    ):
        fast = _fast_2d(a, b, a_zero_point)
    if fast is not None:
        sa, sy = _scale_key(a_scale), _scale_key(y_scale)
        zy = None
        if isinstance(y_zero_point, np.ndarray | np.integer) and y_zero_point.size == 1:
            if y_zero_point.dtype in v.INT8_TYPES and out_dtype in (
                None,
                y_zero_point.dtype,
            ):
                zy = y_zero_point
        if sa is not None and sy is not None and zy is not None:
            za_eff = fast[3]
            zyf = float(zy.item())
            act = _hashable(activation)
            derived = (za_eff, sa, sy, zyf, act, zy.dtype)
            args = (a_scale, a_zero_point, b_scale, b_zero_point, y_scale,
                    y_zero_point, activation, out_dtype)  # fmt: skip
            if _immutable(args):
                object.__setattr__(b, "_last_call", (*args, a.dtype, *derived))
            return _qlinear_fast(a, b, *derived)

    a_shape, b_shape, batch = _check_ab(a, b)
    N = b_shape[-1]
    za = _zero_point(a_zero_point, "a_zero_point", a.dtype)
    sa = v.scale_param(a_scale, "a_scale")
    packed = b if isinstance(b, PackedWeights) else None
    b_dtype = b.dtype
    zb = _b_param(
        b_zero_point,
        packed.zero_point if packed else None,
        "b_zero_point",
        lambda z: v.zero_point_param(z, "b_zero_point", b_dtype),
        b,
    )
    if zb is None:
        zb = np.zeros(1, b_dtype)
    sb = _b_param(
        b_scale,
        packed.scale if packed else None,
        "b_scale",
        lambda s: v.scale_param(s, "b_scale"),
        b,
    )
    if sb is None:
        msg = "b_scale is required (pass it here or to pack_weights)"
        raise ValueError(msg)
    odt = _out_dtype(out_dtype)
    lo, hi = v.activation_bounds(activation)
    bias_arr = _bias(bias, N)
    sa_n = _row_param(sa, "a_scale", a_shape, batch)
    sb_n = _col_param_nd(sb, "b_scale", b_shape, batch)

    if odt == np.float32:
        # y_scale / y_zero_point are accepted and unused: a real result needs none

        def mult_fn(idx, rows):
            return _multiplier(_rows(sa_n, idx, rows), _cols(sb_n, idx), None, N)

        return _run(
            a, b, za, zb, bias_arr, mult_fn, 0.0, lo, hi, _MODE_FLOAT, np.float32
        )

    sy = v.output_scale(y_scale)
    zyp = _y_zero_point(y_zero_point, odt)
    odt = zyp.dtype
    zy = float(zyp.reshape(-1)[0])
    qlo, qhi = _quant_bounds(_hashable(activation), zy, float(sy.reshape(-1)[0]), odt)
    sy1 = sy.reshape(-1)

    def mult_fn(idx, rows):
        return _multiplier(_rows(sa_n, idx, rows), _cols(sb_n, idx), sy1, N)

    return _run(a, b, za, zb, bias_arr, mult_fn, zy, qlo, qhi, _MODE_QUANT, odt)


def _hashable(activation):
    """activation as a cache key: None and names as they are, a clamp as its
    (lo, hi) floats (a list, or numpy scalars / 0-d arrays as an ONNX Clip's
    bounds come, would not hash)."""
    if activation is None or isinstance(activation, str):
        return activation
    return v.activation_bounds(activation)


@functools.lru_cache(maxsize=256)
def _quant_bounds(activation, zy, sy, dtype):
    """eq. 12: the real clamp [lo, hi] as quantized bounds within the type."""
    lo, hi = v.activation_bounds(activation)
    tmin, tmax = _int_range(dtype)  # (np.iinfo: ~0.7 us a cache miss)
    # round() is half-to-even like rint; the quotients are bounded first so that
    # a huge clamp over a tiny scale cannot overflow
    qlo = tmin if lo == -np.inf else zy + round(min(max(lo / sy, -1e15), 1e15))
    qhi = tmax if hi == np.inf else zy + round(min(max(hi / sy, -1e15), 1e15))
    return (
        float(min(max(qlo, tmin), tmax)),
        float(min(max(qhi, tmin), tmax)),
    )


def _multiplier(sa, sb, sy, N):
    """eq. 10: fl(fl(sa * sb) / sy) in the scales' type -> (1|rows, N) float64."""
    m = sa.reshape(-1, 1) * sb.reshape(1, -1)
    if sy is not None:
        m = m / sy
    if not np.isfinite(m).all():
        # (0 * inf = NaN would then be cast to an integer)
        what = "input scale * weight scale" + (" / y_scale" if sy is not None else "")
        msg = (
            f"the requantization multiplier ({what}) overflows {m.dtype} (got "
            f"{m.reshape(-1)[~np.isfinite(m.reshape(-1))][0]}); pass the scales as "
            f"float32, or scales whose product fits"
        )
        raise ValueError(msg)
    out = np.empty((m.shape[0], N), np.float64)
    out[:] = m
    return out


def _out_dtype(out_dtype):
    if out_dtype is None:
        return None
    try:
        odt = np.dtype(out_dtype)
    except TypeError:
        odt = None
    if odt not in (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.float32)):
        msg = f"out_dtype must be np.uint8, np.int8 or np.float32, got {out_dtype!r}"
        raise TypeError(msg)
    return odt


def _y_zero_point(y_zero_point, odt):
    """y_zero_point as a one-element array of the output type."""
    if y_zero_point is None:
        if odt is None:
            msg = (
                "y_zero_point decides the output type; pass np.uint8(z) or "
                "np.int8(z), or out_dtype="
            )
            raise TypeError(msg)
        return np.zeros(1, odt)
    if isinstance(y_zero_point, np.ndarray | np.integer):
        zdt = v.output_int_dtype(y_zero_point.dtype, "y_zero_point.dtype", v.INT8_TYPES)
    elif odt is not None:
        zdt = odt
    else:
        msg = (
            "y_zero_point decides the output type; pass a typed value "
            "(np.uint8(z) or np.int8(z)) or out_dtype="
        )
        raise TypeError(msg)
    if odt is not None and odt != zdt:
        msg = (
            f"out_dtype={odt} disagrees with y_zero_point's dtype {zdt}; "
            f"drop one of them"
        )
        raise TypeError(msg)
    zyp = v.zero_point_param(y_zero_point, "y_zero_point", zdt)
    if zyp.size != 1:
        msg = f"y_zero_point must be a scalar, got shape {zyp.shape}"
        raise ValueError(msg)
    return zyp


def _bias(bias, N):
    if bias is None:
        return _ZERO1
    v.check_array(
        bias,
        "bias",
        (np.dtype(np.int32),),
        fix="bias is int32 in the accumulator's scale a_scale*b_scale; "
        "quantize it as rint(bias_real / (a_scale * b_scale))",
    )
    if bias.size != 1 and bias.shape != (N,):
        msg = (
            f"bias must be a scalar or have shape ({N},) (one per column), "
            f"got {bias.shape}"
        )
        raise ValueError(msg)
    return bias.reshape(-1).astype(np.int64)


def _dynamic_per_tensor(a2, packed, sb, fbias):
    """dynamic_quantize_matmul's per-tensor call on the fused VNNI path with the
    Python work of _gemm_2d cut down: quantization and the multiplier in one
    numba call (small a), the ZA fold cached on the pack, the epilogue tuple
    built here (1 x 384 x 16, 1 thread: 19 -> 8.6 us). None: not that case."""
    M, K = a2.shape
    N = packed.shape[1]
    backend = _dispatch.gemm_backend(M)
    if (
        backend.tile is not None
        or packed._need_rows
        or not backend.k_min <= K <= K_INT32_SAFE
        or M == 0
        or N == 0
    ):
        return None
    sb32 = _ro(sb if sb.dtype == np.float32 else sb.astype(np.float32))
    mult = np.empty((1, N))
    serial = M * N * K < SERIAL_MACS or _dispatch.num_threads() == 1
    layout = packed._layout(backend)
    fuse = (
        a2.size > _QUANT_BLOCK
        and hasattr(backend, "quantizes_a")
        and backend.quantizes_a(M, layout, serial)
    )
    if fuse:
        # the min/max pass here; the quantization as the kernel copies a's
        # row blocks (no uint8 a written and read back)
        s, zp = _dynamic_range_params(a2.reshape(-1))
        _kq.scaled_multiplier(np.float32(s), sb32, mult[0])
        qa = np.empty((M, K), np.uint8)  # (its shape and type only: unread)
    elif a2.size <= _QUANT_BLOCK:
        qa = np.empty((M, K), np.uint8)
        s, zp, lo, hi, status = _kq.dynamic_quantize_scaled(
            _ro(a2).reshape(-1), qa.reshape(-1), sb32, mult[0]
        )
        if status:
            _dynamic_params(lo, hi, status != 1)  # raises the matching error
    else:
        qa, s, zp = _dynamic_quantize(a2)
        _kq.scaled_multiplier(np.float32(s), sb32, mult[0])
    za = int(zp)
    bias = packed._fold_za(za, packed._zeros_n) if za else packed._zeros_n
    epi = (
        _ZERO1, _ZERO1, packed._col_sum, _ro(packed._zb_eff), _ro(bias), _ro(mult),
        0.0, -np.inf, np.inf, _MODE_FLOAT, _ro(fbias),
    )  # fmt: skip
    out = np.empty((M, N), np.float32)
    kw = {"af": _ro(a2), "qp": _ro(np.array([s, zp], np.float64))} if fuse else {}
    backend.fused(
        _ro(qa), layout, None, epi, out, serial=serial, pmax=packed._p_max, **kw
    )
    return out


def dynamic_quantize_matmul(
    a, b, b_scale=None, b_zero_point=None, *, bias=None, per_row=False, device=None
):
    """Float activations times INT8 weights, the activations quantized on the fly.

    ``a`` is quantized to uint8 with ONNX DynamicQuantizeLinear (per tensor, or
    each row on its own with ``per_row=True``), multiplied with the int8/uint8
    weights exactly (eqs. 5-9), and the result returned in float32:

        y = fl32(fl32(acc * fl32(a_scale * b_scale)) + bias)               (eq. 14)

    the semantics of ONNX Runtime's com.microsoft DynamicQuantizeMatMul and of
    torch's dynamic quantized Linear (without its 7-bit ``reduce_range``).

    Parameters
    ----------
    a : float32 ndarray (..., M, K) or (K,); must be finite
    b : ndarray (K, N) of int8/uint8, or :class:`PackedWeights` (prepack once)
    b_scale : scalar or (N,) float32/float16; may be None when packed with one
    b_zero_point : scalar or (N,) of b's dtype, optional
    bias : float32 (N,), optional
    per_row : bool
        Quantize each row of ``a`` with its own scale and zero point.
    device : None, "cpu" or "cuda"; None follows the arrays (docs/cuda.md)

    Returns
    -------
    float32 ndarray (..., M, N) (or (N,) for 1-D a).
    """
    if _on_gpu(device, a, b):
        from . import cuda_ops

        return cuda_ops.dynamic_quantize_matmul_cuda(
            a, b, b_scale, b_zero_point, bias=bias, per_row=per_row
        )
    v.check_array(a, "a", (np.dtype(np.float32),), fix="pass a.astype(np.float32)")
    if a.ndim == 0:
        msg = "a must have at least 1 dimension, got a 0-d array"
        raise ValueError(msg)
    if not isinstance(b, PackedWeights):
        v.check_array(b, "b", v.INT8_TYPES, fix="quantize the weights to int8 first")
        if b.ndim != 2:
            msg = f"b must be 2-D (K, N) weights or PackedWeights, got shape {b.shape}"
            raise ValueError(msg)
    K, N = b.shape
    if a.shape[-1] != K:
        msg = f"inner dimensions differ: a.shape[-1]={a.shape[-1]}, b.shape[0]={K}"
        raise ValueError(msg)
    packed = b if isinstance(b, PackedWeights) else None
    zb = _b_param(
        b_zero_point,
        packed.zero_point if packed else None,
        "b_zero_point",
        lambda z: _col_param(
            v.zero_point_param(z, "b_zero_point", b.dtype), "b_zero_point", N
        ),
        b,
    )
    sb = _b_param(
        b_scale,
        packed.scale if packed else None,
        "b_scale",
        lambda s: _col_param(v.scale_param(s, "b_scale"), "b_scale", N),
        b,
    )
    if sb is None:
        msg = "b_scale is required (pass it here or to pack_weights)"
        raise ValueError(msg)
    if packed is None:
        packed = PackedWeights(b, zb)
    zb_eff = packed._zb_eff if zb is packed.zero_point else _zb_eff(zb, packed.dtype, N)
    if bias is None:
        fbias = packed._fzeros_n
    else:
        v.check_array(
            bias, "bias", (np.dtype(np.float32),), fix="pass bias.astype(np.float32)"
        )
        if bias.shape != (N,):
            msg = f"bias must have shape ({N},) (one per column), got {bias.shape}"
            raise ValueError(msg)
        fbias = np.ascontiguousarray(bias)

    a2 = np.ascontiguousarray(a.reshape(math.prod(a.shape[:-1]), K))
    if not per_row and zb_eff is packed._zb_eff:
        # (the fast path's epilogue uses the pack's zero points: a b_zero_point
        # passed here instead takes the general path below)
        out = _dynamic_per_tensor(a2, packed, sb, fbias)
        if out is not None:
            return out.reshape(*a.shape[:-1], N)
    if per_row:
        qa = np.empty(a2.shape, np.uint8)
        sa = np.empty(a2.shape[0], np.float32)
        za = np.empty(a2.shape[0], np.int64)
        if not _kq.dynamic_quantize_rows(a2, qa, sa, za):
            msg = (
                "a must be finite for dynamic quantization (found NaN or inf, or a "
                "row whose range overflows float32); clean it first"
            )
            raise ValueError(msg)
    else:
        qa, s, z = _dynamic_quantize(a2)
        sa = s.reshape(1)
        za = z.reshape(1).astype(np.int64)
    out = np.empty((a2.shape[0], N), np.float32)
    _gemm_2d(
        qa, packed, zb_eff, za, packed._zeros_n, _multiplier(sa, sb, None, N),
        0.0, -np.inf, np.inf, _MODE_FLOAT, out, fbias,
    )  # fmt: skip
    return out.reshape(*a.shape[:-1], N)
