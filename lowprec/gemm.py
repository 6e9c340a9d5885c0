"""INT8 matrix multiplication: ONNX MatMulInteger and QLinearMatMul, prepacked weights.

All paths share one contract (docs/quantization.md):

    raw product   P = a' @ b'      a' = a (+128 if int8) uint8, b' = b (-128 if uint8) int8
    exact result  acc = P - ZA*colsum(b') - ZB*rowsum(a - a_zp) + bias     (int64)
    output        int32 acc | saturate(rint(acc*mult + y_zp)) | float32(acc*mult)

The instruction-set path only computes P; everything else is shared.
"""

from __future__ import annotations

import math

import numpy as np

from . import _dispatch
from . import _validate as v
from .kernels import config
from .kernels import int8_gemm as _kg
from .kernels import requant as _kr

# Exact |a - a_zp| * |b - b_zp| <= 255 * 255, so an int32 MatMulInteger result
# always fits for K up to this bound; beyond it lowprec checks every output.
K_INT32_SAFE = (2**31 - 1) // (255 * 255)


class PackedWeights:
    """Immutable prepacked INT8 weights for ``matmul_integer`` / ``qlinear_matmul``.

    Build with :func:`pack_weights`. Holds b' (docs eq. 5), its column sums, the
    zero point / scale given at pack time, and each instruction-set path's
    layout, built on first use and reused for every call.
    """

    __slots__ = (
        "shape",
        "dtype",
        "zero_point",
        "scale",
        "_b_s8",
        "_col_sum",
        "_layouts",
        "_frozen",
    )

    def __init__(self, b, zero_point, scale):
        K, N = b.shape
        set_ = object.__setattr__
        set_(self, "shape", (K, N))
        set_(self, "dtype", b.dtype)
        set_(self, "zero_point", zero_point)
        set_(self, "scale", scale)
        b_s8 = np.empty((K, N), np.int8)
        col_sum = np.empty(N, np.int64)
        _kg.prepare_b(b, np.uint8(_b_flip(b.dtype)), b_s8, col_sum)
        b_s8.flags.writeable = False
        col_sum.flags.writeable = False
        for arr in (zero_point, scale):
            if arr is not None:
                arr.flags.writeable = False
        set_(self, "_b_s8", b_s8)
        set_(self, "_col_sum", col_sum)
        set_(self, "_layouts", {})
        set_(self, "_frozen", True)

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
        extra = sum(
            a.nbytes
            for layout in self._layouts.values()
            for a in (layout if isinstance(layout, tuple) else (layout,))
            if isinstance(a, np.ndarray) and a is not self._b_s8
        )
        return self._b_s8.nbytes + self._col_sum.nbytes + extra

    def _chunk(self, backend, k0: int, k1: int):
        """The backend's layout of rows k0:k1 of b' (K chunks: see config.K_CHUNK)."""
        key = (backend.name, k0, k1)
        layout = self._layouts.get(key)
        if layout is None:
            layout = backend.pack(self._b_s8[k0:k1])
            self._layouts[key] = layout
        return layout

    def _col_sum_of(self, k0: int, k1: int) -> np.ndarray:
        if k0 == 0 and k1 == self.shape[0]:
            return self._col_sum
        return self._b_s8[k0:k1].sum(axis=0, dtype=np.int64)


def _a_flip(dtype) -> int:
    return 0x80 if dtype == np.int8 else 0


def _b_flip(dtype) -> int:
    return 0x80 if dtype == np.uint8 else 0


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
        zp = _col_param(
            v.zero_point_param(b_zero_point, "b_zero_point", b.dtype),
            "b_zero_point",
            N,
        )
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
    msg = f"{name} must be a scalar or have shape ({N},) (one per column), got {arr.shape}"
    raise ValueError(msg)


# --------------------------------------------------------------------------- #
# parameter shapes under numpy matmul broadcasting


def _row_param(arr, name, a_shape, batch):
    """Per-tensor / per-row parameter of a -> array of shape batch+(M,) or (1,)."""
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
    """Per-tensor / per-column parameter of b -> shape batch+(N,) or (1,)."""
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


def _at(param, idx):
    """The 1-D slice of a normalised row/column parameter for one batch index."""
    return param if param.ndim == 1 else param[idx]


# --------------------------------------------------------------------------- #
# the shared 2-D driver


def _gemm_2d(a, packed, za, zb, bias, mult, zy, qlo, qhi, mode, out):
    """out (M,N) = epilogue(a @ b) for 2-D a and packed b (docs eqs. 6-12)."""
    M, K = a.shape
    N = packed.shape[1]
    if M == 0 or N == 0:
        return
    backend = _dispatch.gemm_backend()
    fa = _a_flip(a.dtype)
    ZA = za.astype(np.int64) + (128 if fa else 0)
    ZB = zb.astype(np.int64) - (128 if packed.dtype == np.uint8 else 0)
    need_rows = bool(np.any(ZB != 0))

    chunks = [(k0, min(k0 + config.K_CHUNK, K)) for k0 in range(0, K, config.K_CHUNK)]
    ra = np.zeros(M, np.int64)
    p = np.zeros((M, N), np.int32)
    total = None if len(chunks) <= 1 else np.zeros((M, N), np.int64)
    col_sum = packed._col_sum
    for k0, k1 in chunks:
        kc = k1 - k0
        k_pad = -(-kc // backend.k_align) * backend.k_align
        a_c = a[:, k0:k1]
        if fa == 0 and k_pad == kc and a_c.flags.c_contiguous:
            a_u8 = a_c
            if need_rows:
                r = np.empty(M, np.int64)
                _kg.row_sums_u8(a_u8, r)
                ra += r
        else:
            a_u8 = np.empty((M, k_pad), np.uint8)
            r = np.empty(M, np.int64)
            _kg.prepare_a(a_c, np.uint8(fa), k_pad, a_u8, r)
            ra += r
        backend.gemm(a_u8, packed._chunk(backend, k0, k1), p)
        if total is not None:
            _kr.accumulate(total, p)
    # rowsum(a - a_zp) = rowsum(a') - K * ZA   (eq. 9)
    row_sum = ra - K * ZA if need_rows else np.zeros(M, np.int64)
    bad = _kr.requantize(
        p if total is None else total,
        ZA,
        col_sum,
        ZB,
        row_sum,
        bias,
        mult,
        zy,
        qlo,
        qhi,
        mode,
        out,
    )
    if bad:
        msg = (
            f"{bad} MatMulInteger outputs do not fit int32 (K={K} allows sums past "
            f"2**31); ONNX would wrap them silently, lowprec refuses. Use "
            f"qlinear_matmul (exact int64 accumulation) or split K"
        )
        raise OverflowError(msg)


def _check_ab(a, b):
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
    b_shape2 = (b_shape[0], 1) if len(b_shape) == 1 else b_shape
    if a_shape[-1] != b_shape2[-2]:
        msg = (
            f"inner dimensions differ: a.shape[-1]={a_shape[-1]}, "
            f"b.shape[-2]={b_shape2[-2]} (a {a.shape} @ b {tuple(b_shape)})"
        )
        raise ValueError(msg)
    try:
        batch = np.broadcast_shapes(a_shape[:-2], b_shape2[:-2])
    except ValueError:
        msg = (
            f"batch dimensions of a {a.shape} and b {tuple(b_shape)} do not "
            f"broadcast (numpy matmul rules)"
        )
        raise ValueError(msg) from None
    return a_shape, b_shape2, batch


def _b_param(value, packed_value, name, make, b):
    """A b-side parameter: from the call, or from the PackedWeights (not both)."""
    if not isinstance(b, PackedWeights):
        return None if value is None else make(value)
    if value is None:
        return packed_value
    got = make(value).reshape(-1)
    same = (
        packed_value is not None
        and got.dtype == packed_value.dtype
        and (got.size in (1, packed_value.size))
        and bool(np.all(packed_value == got))
    )
    if not same:
        msg = (
            f"{name} was given both to pack_weights and to this call with "
            f"different values; pass it in one place only"
        )
        raise ValueError(msg)
    return packed_value


def _run(a, b, za_p, zb_p, bias, mult_fn, zy, qlo, qhi, mode, out_dtype, names):
    """numpy-matmul broadcasting around _gemm_2d. mult_fn(idx) -> (1|M, 1|N) float64."""
    a_shape, b_shape, batch = _check_ab(a, b)
    M, K = a_shape[-2:]
    N = b_shape[-1]
    za = _row_param(za_p, names[0], a_shape, batch)
    zb = _col_param_nd(zb_p, names[1], b_shape, batch)
    a_nd = a.reshape(a_shape)
    out = np.empty((*batch, M, N), out_dtype)
    b_is_2d = len(b_shape) == 2
    if b_is_2d and zb.ndim == 1:
        packed = (
            b
            if isinstance(b, PackedWeights)
            else PackedWeights(b.reshape(b_shape), None, None)
        )
        rows = math.prod(batch) * M
        a2 = np.broadcast_to(a_nd, (*batch, M, K)).reshape(rows, K)
        za2 = _flat_rows(za, None, rows)
        mult = mult_fn(None, rows)
        _gemm_2d(
            a2, packed, za2, zb, bias, mult, zy, qlo, qhi, mode, out.reshape(rows, N)
        )
    else:
        a_b = np.broadcast_to(a_nd, (*batch, M, K))
        b_b = np.broadcast_to(b.reshape(b_shape), (*batch, K, N))
        for idx in np.ndindex(*batch):
            packed = PackedWeights(b_b[idx], None, None)
            mult = mult_fn(idx, M)
            _gemm_2d(
                a_b[idx],
                packed,
                _at(za, idx),
                _at(zb, idx),
                bias,
                mult,
                zy,
                qlo,
                qhi,
                mode,
                out[idx],
            )
    if a.ndim == 1:
        out = out[..., 0, :]
    if len(b_shape) == 2 and not isinstance(b, PackedWeights) and b.ndim == 1:
        out = out[..., 0]
    return out


def matmul_integer(a, b, a_zero_point=None, b_zero_point=None):
    """ONNX MatMulInteger: ``(a - a_zero_point) @ (b - b_zero_point)`` in int32.

    Parameters
    ----------
    a : ndarray (..., M, K) or (K,) of uint8 or int8
    b : ndarray (..., K, N) or (K,) of uint8 or int8, or :class:`PackedWeights`
    a_zero_point : scalar, (M,) per row, or broadcastable to a.shape[:-1]+(1,);
        a's dtype; default 0
    b_zero_point : scalar, (N,) per column, or broadcastable to
        b.shape[:-2]+(1, N); b's dtype; default 0 (or the packed one)

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
    _check_ab(a, b)
    za = (
        np.zeros(1, a.dtype)
        if a_zero_point is None
        else v.zero_point_param(a_zero_point, "a_zero_point", a.dtype)
    )
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
    one = np.ones((1, 1))
    return _run(
        a,
        b,
        za,
        zb,
        np.zeros(1, np.int64),
        lambda idx, rows: one,
        0.0,
        0.0,
        0.0,
        0,
        np.int32,
        ("a_zero_point", "b_zero_point"),
    )


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
):
    """ONNX QLinearMatMul (opset 21) with fused bias, activation and float output.

    ``y = saturate(rint(((a - a_zp) @ (b - b_zp) + bias) * (a_scale * b_scale / y_scale)
    + y_zp))``, the multiplier computed in the scales' float type, the product
    and rounding (half to even) as ONNX's reference does (docs/quantization.md).

    Parameters
    ----------
    a : ndarray (..., M, K) or (K,) of uint8/int8
    a_scale, a_zero_point : scalar or per row (M,), float32/float16 and a's dtype
    b : ndarray (..., K, N) or (K,) of uint8/int8, or :class:`PackedWeights`
    b_scale, b_zero_point : scalar or per column (N,); may be None when packed
    y_scale, y_zero_point : scalars; y_zero_point's dtype (uint8/int8) is the
        output type. Both may be None with ``out_dtype=np.float32``.
    bias : int32 (N,) or scalar, optional
        Added to the accumulator, in its scale ``a_scale * b_scale`` (as
        QLinearConv's B).
    activation : None, "relu", "relu6" or (min, max)
        Clamp in real units, applied before the final saturation.
    out_dtype : np.uint8, np.int8 or np.float32, optional
        float32 returns the real result ``acc * a_scale * b_scale`` (clamped by
        the activation) instead of requantizing.
    """
    a_shape, b_shape, batch = _check_ab(a, b)
    M = a_shape[-2]
    N = b_shape[-1]
    za = (
        v.zero_point_param(a_zero_point, "a_zero_point", a.dtype)
        if a_zero_point is not None
        else np.zeros(1, a.dtype)
    )
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

    # output type
    if out_dtype is not None:
        try:
            odt = np.dtype(out_dtype)
        except TypeError:
            msg = (
                f"out_dtype must be np.uint8, np.int8 or np.float32, got {out_dtype!r}"
            )
            raise TypeError(msg) from None
        if odt not in (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.float32)):
            msg = f"out_dtype must be np.uint8, np.int8 or np.float32, got {odt}"
            raise TypeError(msg)
    else:
        odt = None
    float_out = odt == np.dtype(np.float32)
    lo, hi = v.activation_bounds(activation)

    if bias is None:
        bias_arr = np.zeros(1, np.int64)
    else:
        v.check_array(
            bias,
            "bias",
            (np.dtype(np.int32),),
            fix="bias is int32 in the accumulator's scale a_scale*b_scale; quantize it as round(bias_real / (a_scale*b_scale))",
        )
        if bias.size != 1 and bias.shape != (N,):
            msg = f"bias must be a scalar or have shape ({N},) (one per column), got {bias.shape}"
            raise ValueError(msg)
        bias_arr = bias.reshape(-1).astype(np.int64)

    sa_n = _row_param(sa, "a_scale", a_shape, batch)
    sb_n = _col_param_nd(sb, "b_scale", b_shape, batch)
    if float_out:
        if y_scale is not None or y_zero_point is not None:
            pass  # accepted and unused: the real result needs no output qparams
        zy = 0.0
        qlo, qhi = lo, hi

        def mult_fn(idx, rows):
            sa_i = _flat_rows(sa_n, idx, rows)
            sb_i = _at(sb_n, idx)
            return (sa_i[:, None] * sb_i[None, :]).astype(np.float64)
    else:
        if y_scale is None:
            msg = "y_scale is required unless out_dtype=np.float32"
            raise ValueError(msg)
        sy = v.scale_param(y_scale, "y_scale")
        if sy.size != 1:
            msg = f"y_scale must be a scalar (per-tensor output), got shape {sy.shape}"
            raise ValueError(msg)
        if y_zero_point is None:
            if odt is None:
                msg = "y_zero_point decides the output type; pass np.uint8(z)/np.int8(z) or out_dtype="
                raise TypeError(msg)
            zyp = np.zeros((), odt)
        else:
            if isinstance(y_zero_point, np.ndarray | np.integer):
                zdt = v.output_int_dtype(
                    y_zero_point.dtype, "y_zero_point.dtype", v.INT8_TYPES
                )
            elif odt is not None:
                zdt = odt
            else:
                msg = (
                    "y_zero_point decides the output type; pass a typed value "
                    "(np.uint8(z) or np.int8(z)) or out_dtype="
                )
                raise TypeError(msg)
            if odt is not None and odt != zdt:
                msg = f"out_dtype={odt} disagrees with y_zero_point's dtype {zdt}; drop one of them"
                raise TypeError(msg)
            zyp = v.zero_point_param(y_zero_point, "y_zero_point", zdt)
            if zyp.size != 1:
                msg = f"y_zero_point must be a scalar, got shape {zyp.shape}"
                raise ValueError(msg)
            odt = zdt
        zy = float(zyp.reshape(-1)[0])
        syv = sy.reshape(-1)
        info = np.iinfo(odt)
        qlo = (
            float(info.min)
            if lo == -np.inf
            else float(np.clip(zy + np.rint(lo / float(syv[0])), info.min, info.max))
        )
        qhi = (
            float(info.max)
            if hi == np.inf
            else float(np.clip(zy + np.rint(hi / float(syv[0])), info.min, info.max))
        )

        def mult_fn(idx, rows):
            sa_i = _flat_rows(sa_n, idx, rows)
            sb_i = _at(sb_n, idx)
            # a_scale * b_scale / y_scale in the scales' own float type (ONNX)
            return ((sa_i[:, None] * sb_i[None, :]) / syv).astype(np.float64)

    mode = 2 if float_out else 1
    return _run(
        a,
        b,
        za,
        zb,
        bias_arr,
        mult_fn,
        zy,
        qlo,
        qhi,
        mode,
        odt,
        ("a_zero_point", "b_zero_point"),
    )


def _flat_rows(param, idx, rows):
    """Row parameter of one 2-D GEMM: (1,) or (rows,); idx None = batch flattened."""
    if param.shape[0] == 1 and param.ndim == 1:
        return param
    if idx is not None:
        return param if param.ndim == 1 else param[idx]
    if param.ndim == 1:
        return np.tile(param, rows // param.shape[0])
    return np.ascontiguousarray(param).reshape(rows)
