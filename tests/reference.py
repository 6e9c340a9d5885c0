"""Plain-NumPy oracle, written from docs/quantization.md, never from the kernels.

Integers are accumulated in int64 (or Python ints); the float steps are the
ones the equations name, each in the float type the equation names.
"""

from __future__ import annotations

import numpy as np


def expand_param(value, x_shape, axis, block_size):
    """Scale / zero point broadcast to x's shape (per tensor, per axis, blocked)."""
    value = np.asarray(value)
    if value.size == 1:
        return np.broadcast_to(value.reshape(()), x_shape)
    if block_size == 0:
        shape = [1] * len(x_shape)
        shape[axis] = value.size
        return np.broadcast_to(value.reshape(shape), x_shape)
    rep = np.repeat(value, block_size, axis=axis)
    idx = [slice(None)] * len(x_shape)
    idx[axis] = slice(0, x_shape[axis])
    return rep[tuple(idx)]


def quantize(x, scale, zero_point, dtype, axis=1, block_size=0):
    """eq. 1: y = clip(rint(x / s) + z) with NaN -> z."""
    info = np.iinfo(dtype)
    s = expand_param(scale, x.shape, axis, block_size)
    z = expand_param(
        np.zeros(1, np.int64) if zero_point is None else zero_point,
        x.shape,
        axis,
        block_size,
    ).astype(np.int64)
    with np.errstate(all="ignore"):
        q = x / s  # numpy's promoted type: float16 / float16 stays float16
        r = np.rint(q.astype(np.float64))
    out = np.empty(x.shape, np.int64)
    nan = np.isnan(r)
    finite = ~nan
    big = np.clip(r[finite], -(2.0**40), 2.0**40).astype(np.int64)
    out[finite] = np.clip(big + z[finite], info.min, info.max)
    out[nan] = z[nan]
    return out.astype(dtype)


def dequantize(x, scale, zero_point, axis=1, block_size=0):
    """eq. 2: y = (float32(x) - z) * s, rounded once to the scale's type."""
    s = expand_param(scale, x.shape, axis, block_size)
    z = expand_param(
        np.zeros(1, np.int64) if zero_point is None else zero_point,
        x.shape,
        axis,
        block_size,
    )
    d = x.astype(np.float32).astype(np.float64) - z.astype(np.float64)
    y = (d * s.astype(np.float64)).astype(np.float32)
    with np.errstate(over="ignore"):
        return y.astype(np.asarray(scale).dtype)


def row_col(param, rows_shape):
    """Per-tensor or per-row/column parameter broadcast against rows_shape."""
    p = np.asarray(param)
    return np.broadcast_to(p.reshape(-1) if p.size > 1 else p.reshape(()), rows_shape)


def int_matmul(a, b, a_zero_point=None, b_zero_point=None):
    """eq. 4: (a - a_zp) @ (b - b_zp), exact in int64, numpy matmul broadcasting."""
    a64 = a.astype(np.int64)
    b64 = b.astype(np.int64)
    a2 = a64[None, :] if a.ndim == 1 else a64
    b2 = b64[:, None] if b.ndim == 1 else b64
    if a_zero_point is not None:
        za = np.asarray(a_zero_point).astype(np.int64)
        if za.size > 1 and za.ndim == 1:
            za = za[:, None]  # per row
        a2 = a2 - za
    if b_zero_point is not None:
        zb = np.asarray(b_zero_point).astype(np.int64)
        b2 = b2 - zb  # scalar or (N,) per column broadcasts over the last axis
    y = a2 @ b2
    if a.ndim == 1:
        y = y[..., 0, :]
    if b.ndim == 1:
        y = y[..., 0]
    return y


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
    """eqs. 8-12 on 2-D inputs: acc in int64, multiplier in the scales' type,
    product and rounding in float64, clamp, saturate."""
    acc = int_matmul(a, b, a_zero_point, b_zero_point)
    if bias is not None:
        acc = acc + np.asarray(bias).astype(np.int64)
    sa = np.asarray(a_scale)
    sb = np.asarray(b_scale)
    sa_col = sa.reshape(-1, 1) if sa.size > 1 else sa.reshape(())
    sb_row = sb.reshape(-1) if sb.size > 1 else sb.reshape(())
    lo, hi = {
        None: (-np.inf, np.inf),
        "relu": (0.0, np.inf),
        "relu6": (0.0, 6.0),
    }.get(activation if isinstance(activation, str | None) else "x", (None, None))
    if lo is None:
        lo, hi = (float(t) for t in activation)
    if out_dtype == np.float32:
        mult = (sa_col * sb_row).astype(np.float64)
        y = (acc.astype(np.float64) * mult).astype(np.float32)
        return np.clip(y, np.float32(lo), np.float32(hi)).astype(np.float32)
    sy = np.asarray(y_scale)
    dtype = np.asarray(y_zero_point).dtype if out_dtype is None else np.dtype(out_dtype)
    zy = int(np.asarray(y_zero_point).reshape(-1)[0])
    info = np.iinfo(dtype)
    mult = ((sa_col * sb_row) / sy.reshape(())).astype(np.float64)
    v = np.rint(acc.astype(np.float64) * mult + zy)
    qlo = info.min if lo == -np.inf else zy + np.rint(lo / float(sy.reshape(-1)[0]))
    qhi = info.max if hi == np.inf else zy + np.rint(hi / float(sy.reshape(-1)[0]))
    v = np.clip(v, max(qlo, info.min), min(qhi, info.max))
    return v.astype(dtype)


def dynamic_quantize(x):
    """eq. 3 in float32 scalars: (y uint8, scale float32, zero point int)."""
    maxx = np.float32(max(0.0, float(x.max()))) if x.size else np.float32(0)
    minx = np.float32(min(0.0, float(x.min()))) if x.size else np.float32(0)
    rng = np.float32(1.0) if maxx == minx else np.float32(maxx - minx)
    scale = np.float32(rng / np.float32(255))
    zp = np.rint(np.clip(np.float32(0) - minx / scale, 0, 255))
    y = np.clip(np.rint(x / scale) + zp, 0, 255).astype(np.uint8)
    return y, scale, int(zp)


def dynamic_quantize_matmul(a, b, b_scale, b_zero_point=None, bias=None, per_row=False):
    """eq. 14: dynamic uint8 quantization of a (per tensor or per row), exact
    integer product, fl32(fl32(acc * fl32(sa * sb)) + bias)."""
    a2 = a.reshape(-1, a.shape[-1])
    rows = [a2[i : i + 1] for i in range(a2.shape[0])] if per_row else [a2]
    out = []
    for r in rows:
        q, s, z = dynamic_quantize(r)
        acc = int_matmul(q, b, np.uint8(z), b_zero_point)
        mult = (np.float32(s) * np.asarray(b_scale, np.float32)).astype(np.float64)
        y = (acc.astype(np.float64) * mult).astype(np.float32)
        if bias is not None:
            y = y + bias
        out.append(y)
    return np.concatenate(out).reshape(*a.shape[:-1], b.shape[1])
