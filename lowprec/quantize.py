"""ONNX QuantizeLinear, DequantizeLinear and DynamicQuantizeLinear."""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import _validate as v
from .kernels import quantize as _k

# ONNX TensorProto codes accepted as output_dtype, so runtimes can pass the
# attribute through unchanged.
_ONNX_CODES = {2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16}
# elements per thread task of the per-tensor kernels; inputs of one block run on
# the calling thread (a parallel launch waits for the second core: measured
# 1.5-8 ms per call on a loaded 2-core machine, against 1-2 us of work)
_QUANT_BLOCK = 1 << 15
# the min/max pass runs ~0.05 ns per float: 2**18 of them (~12 us) on one
# thread beat a parallel launch (98304 floats: 9 us on 1 thread, 18 on 2)
_MINMAX_BLOCK = 1 << 18


def _as_3d(shape: tuple[int, ...], axis: int) -> tuple[int, int, int]:
    p = math.prod(shape[:axis])
    return p, shape[axis], math.prod(shape[axis + 1 :])


def _output_dtype(output_dtype):
    """quantize_linear's output_dtype -> numpy dtype, or None (not given / 0):
    a numpy dtype, or an ONNX TensorProto code (Python or numpy int)."""
    if output_dtype is None or (
        isinstance(output_dtype, numbers.Integral) and output_dtype == 0
    ):
        return None
    if isinstance(output_dtype, numbers.Integral) and not isinstance(
        output_dtype, bool
    ):  # an ONNX TensorProto code
        if int(output_dtype) not in _ONNX_CODES:
            codes = ", ".join(f"{c} ({np.dtype(t)})" for c, t in _ONNX_CODES.items())
            msg = (
                f"output_dtype={int(output_dtype)} is not a supported ONNX type "
                f"code; use one of {codes}, or a numpy dtype"
            )
            raise ValueError(msg)
        output_dtype = _ONNX_CODES[int(output_dtype)]
    return v.output_int_dtype(output_dtype)


def _param_layout(x_shape, scale, zero_point, axis, block_size, scale_name, zp_name):
    """Reshape scale / zero point to (Ps, Cs, Qs) and return them with the
    (P, C, Q) view of x and the block length along C (module doc of
    lowprec.kernels.quantize)."""
    ndim = len(x_shape)
    if zero_point is not None and zero_point.size != 1:
        if zero_point.shape != scale.shape:
            msg = (
                f"{zp_name} must have the same shape as {scale_name} "
                f"({scale.shape}) or be a scalar, got {zero_point.shape}"
            )
            raise ValueError(msg)
    if not isinstance(block_size, numbers.Integral) or isinstance(block_size, bool):
        msg = f"block_size must be an int, got {type(block_size).__name__}"
        raise TypeError(msg)
    block_size = int(block_size)
    if block_size < 0:
        msg = f"block_size must be >= 0 (0 means no blocking), got {block_size}"
        raise ValueError(msg)

    if scale.size == 1:  # per tensor (ONNX treats any one-element scale so)
        size = math.prod(x_shape)
        p, c, q = 1, size, 1
        scale3 = scale.reshape(1, 1, 1)
        zp3 = None if zero_point is None else zero_point.reshape(1, 1, 1)
        return (p, c, q), scale3, zp3, max(c, 1)

    if ndim == 0:
        msg = f"{scale_name} must be a scalar for a 0-d input, got shape {scale.shape}"
        raise ValueError(msg)
    axis = v.check_axis(axis, ndim)
    p, c, q = _as_3d(x_shape, axis)
    if block_size == 0:  # per axis
        if scale.ndim != 1 or scale.shape[0] != c:
            msg = (
                f"{scale_name} must be a scalar or 1-D of length x.shape[{axis}]={c} "
                f"for per-axis quantization, got shape {scale.shape}; for blocked "
                f"quantization pass block_size"
            )
            raise ValueError(msg)
        scale3 = scale.reshape(1, c, 1)
        zp3 = None
        if zero_point is not None:
            zp3 = zero_point.reshape(1, -1, 1) if zero_point.size > 1 else None
            if zp3 is None:
                zp3 = zero_point.reshape(1, 1, 1)
        return (p, c, q), scale3, zp3, 1

    cs = -(-c // block_size)
    expected = tuple(cs if i == axis else d for i, d in enumerate(x_shape))
    if scale.shape != expected:
        msg = (
            f"{scale_name} must have shape {expected} for blocked quantization of "
            f"x with shape {tuple(x_shape)} along axis {axis} with block_size="
            f"{block_size}, got {scale.shape}"
        )
        raise ValueError(msg)
    scale3 = scale.reshape(p, cs, q)
    zp3 = None
    if zero_point is not None:
        zp3 = (
            zero_point.reshape(p, cs, q)
            if zero_point.size > 1
            else zero_point.reshape(1, 1, 1)
        )
    return (p, c, q), scale3, zp3, block_size


def quantize_linear(
    x,
    y_scale,
    y_zero_point=None,
    *,
    axis=1,
    block_size=0,
    saturate=True,
    output_dtype=None,
    device=None,
):
    """ONNX QuantizeLinear (opset 21): ``y = saturate(rint(x / y_scale) + y_zp)``.

    Parameters
    ----------
    x : ndarray of float32 or float16
    y_scale : float32/float16 array or Python float
        One element (per tensor), 1-D of length ``x.shape[axis]`` (per axis), or
        the shape of x with ``ceil(x.shape[axis] / block_size)`` along ``axis``
        (blocked). Finite and > 0.
    y_zero_point : array of the output type, Python int, or None (zero)
        Same shape as ``y_scale`` or a scalar. Its dtype is the output type.
    axis, block_size : int
        As in ONNX. ``block_size=0`` means no blocking.
    saturate : bool
        ONNX's flag for float8 outputs; integer outputs always saturate.
    output_dtype : numpy dtype or ONNX type code, optional
        uint8 (default), int8, uint16 or int16. Must agree with y_zero_point.

    Returns
    -------
    ndarray of the output type, shape of x.

    Notes
    -----
    The quotient ``x / y_scale`` is a true division in the promoted float type of
    x and y_scale, rounded half to even (docs/quantization.md, eq. 1). ``+inf``
    and ``-inf`` saturate to the type's maximum and minimum; NaN quantizes to the
    zero point (the real value 0).

    Examples
    --------
    >>> import numpy as np, lowprec
    >>> x = np.array([-1.0, 0.25, 0.5, 200.0], np.float32)
    >>> lowprec.quantize_linear(x, 0.5, np.uint8(10))
    array([  8,  10,  11, 255], dtype=uint8)
    """
    if _on_gpu(device, x):
        from . import cuda_ops

        return cuda_ops.quantize_linear_cuda(
            x, y_scale, y_zero_point, axis=axis, block_size=block_size,
            saturate=saturate, output_dtype=output_dtype,
        )  # fmt: skip
    v.check_array(x, "x", v.FLOAT_INPUT_TYPES, fix="pass x.astype(np.float32)")
    scale = v.scale_param(y_scale, "y_scale")
    if not isinstance(saturate, bool | np.bool_ | int):
        msg = f"saturate must be a bool, got {type(saturate).__name__}"
        raise TypeError(msg)

    out_dt = _output_dtype(output_dtype)
    if y_zero_point is not None:
        zp_dt = (
            y_zero_point.dtype
            if isinstance(y_zero_point, np.ndarray | np.integer)
            else (out_dt or np.dtype(np.uint8))
        )
        zp_dt = v.output_int_dtype(zp_dt, "y_zero_point.dtype")
        if out_dt is not None and out_dt != zp_dt:
            msg = (
                f"output_dtype={out_dt} disagrees with y_zero_point's dtype {zp_dt}; "
                f"the zero point's type is the output type, so drop one of them"
            )
            raise TypeError(msg)
        out_dt = zp_dt
        zero_point = v.zero_point_param(y_zero_point, "y_zero_point", out_dt)
    else:
        zero_point = None
    out_dt = out_dt or np.dtype(np.uint8)

    (p, c, q), scale3, zp3, block = _param_layout(
        x.shape, scale, zero_point, axis, block_size, "y_scale", "y_zero_point"
    )
    x3 = x.reshape(p, c, q)
    if x.dtype == np.float16 and scale.dtype == np.float16:
        # ONNX divides in float16 here; numpy's float16 division is correctly
        # rounded, so divide there and give the kernel unit scales.
        with np.errstate(over="ignore"):  # overflow to +-inf saturates below
            x3 = x3 / np.repeat(scale3, block, axis=1)[:, :c, :]
        scale3 = np.ones(scale3.shape, np.float32)
    x3 = np.ascontiguousarray(x3, dtype=np.float32)
    scale3 = np.ascontiguousarray(scale3, dtype=np.float32)
    if zp3 is None:
        zp3 = np.zeros(scale3.shape, np.int32)
    elif zp3.size == 1 and scale3.size > 1:
        zp3 = np.broadcast_to(zp3, scale3.shape)
    zp3 = np.ascontiguousarray(zp3, dtype=np.int32)
    info = np.iinfo(out_dt)
    if scale3.size == 1 and zp3.size == 1:
        flat = np.empty(x3.size, dtype=out_dt)
        args = (scale3.reshape(-1)[0], float(zp3.reshape(-1)[0]))
        bounds = (float(info.min), float(info.max))
        if x3.size <= _QUANT_BLOCK:  # one block: no parallel launch
            _k.quantize_per_tensor_serial(x3.reshape(-1), *args, *bounds, flat)
        else:
            _k.quantize_per_tensor(x3.reshape(-1), *args, _QUANT_BLOCK, *bounds, flat)
        return flat.reshape(x.shape)
    out = np.empty((p, c, q), dtype=out_dt)
    _k.quantize_linear(x3, scale3, zp3, block, float(info.min), float(info.max), out)
    return out.reshape(x.shape)


def _on_gpu(device, x) -> bool:
    """Whether the call goes to the CUDA path (device arrays or device="cuda")."""
    if device is None and type(x) is np.ndarray:
        return False
    from . import _cuda

    return _cuda.use_cuda(x, device=device)


def dequantize_linear(
    x, x_scale, x_zero_point=None, *, axis=1, block_size=0, device=None
):
    """ONNX DequantizeLinear (opset 21): ``y = (x - x_zero_point) * x_scale``.

    Parameters
    ----------
    x : ndarray of uint8, int8, uint16, int16 or int32
    x_scale : float32/float16 array or Python float
        Per tensor, per axis or blocked, as in :func:`quantize_linear`.
    x_zero_point : array of x's dtype, Python int, or None
        int32 x takes no zero point (ONNX): one given must be all zeros.
    axis, block_size : int

    Returns
    -------
    ndarray of x_scale's dtype (float32 for a Python float), shape of x.
    """
    if _on_gpu(device, x):
        from . import cuda_ops

        return cuda_ops.dequantize_linear_cuda(
            x, x_scale, x_zero_point, axis=axis, block_size=block_size
        )
    v.check_array(
        x,
        "x",
        v.DEQUANT_TYPES,
        fix="DequantizeLinear takes the integer tensor produced by quantization",
    )
    scale = v.scale_param(x_scale, "x_scale")
    zero_point = None
    if x_zero_point is not None:
        zero_point = v.zero_point_param(x_zero_point, "x_zero_point", x.dtype)
        if x.dtype == np.int32 and np.any(zero_point != 0):
            msg = (
                "x_zero_point must be 0 (or None) for int32 x: ONNX int32 tensors "
                "have no zero point; subtract it before dequantizing"
            )
            raise ValueError(msg)
    (p, c, q), scale3, zp3, block = _param_layout(
        x.shape, scale, zero_point, axis, block_size, "x_scale", "x_zero_point"
    )
    x3 = np.ascontiguousarray(x.reshape(p, c, q))
    scale3 = np.ascontiguousarray(scale3, dtype=np.float32)  # exact for float16
    if zp3 is None:
        zp3 = np.zeros(scale3.shape, np.int32)
    elif zp3.size == 1 and scale3.size > 1:
        zp3 = np.broadcast_to(zp3, scale3.shape)
    zp3 = np.ascontiguousarray(zp3, dtype=np.int32)
    out = np.empty((p, c, q), np.float32)
    _k.dequantize_linear(x3, scale3, zp3, block, out)
    out = out.reshape(x.shape)
    with np.errstate(over="ignore"):  # beyond float16's range is +-inf, as in ONNX
        return out.astype(scale.dtype, copy=False)


def dynamic_quantize_linear(x, *, device=None):
    """ONNX DynamicQuantizeLinear: uint8 quantization with a scale and zero point
    chosen from the data so that the range [min(x, 0), max(x, 0)] maps onto [0, 255].

    device: None, "cpu" or "cuda"; None follows x (a CUDA array runs on the GPU;
    y comes back as the same kind, y_scale and y_zero_point on the host).

    Returns
    -------
    (y, y_scale, y_zero_point) : uint8 array, float32 0-d array, uint8 0-d array

    Raises
    ------
    ValueError
        If x holds NaN or +-inf (no scale can represent it).
    """
    if _on_gpu(device, x):
        from . import cuda_ops

        return cuda_ops.dynamic_quantize_linear_cuda(x)
    v.check_array(
        x,
        "x",
        (np.dtype(np.float32),),
        fix="ONNX DynamicQuantizeLinear takes float32; pass x.astype(np.float32)",
    )
    flat = np.ascontiguousarray(x).reshape(-1)
    if 0 < flat.size <= _QUANT_BLOCK:
        # one block: the whole operator in one call on this thread
        y = np.empty(flat.size, np.uint8)
        s, zp, lo, hi, status = _k.dynamic_quantize_serial(flat, y)
        if status:
            dynamic_params(lo, hi, status != 1)  # raises the matching error
        return y.reshape(x.shape), np.asarray(s, np.float32), np.asarray(zp, np.uint8)
    y_scale, y_zero_point = dynamic_range_params(flat)
    # the per-tensor kernel straight away (quantize_linear would validate again)
    y = np.empty(flat.size, np.uint8)
    args = (y_scale, float(y_zero_point), 0.0, 255.0)
    if flat.size <= _QUANT_BLOCK:  # one block: no parallel launch
        _k.quantize_per_tensor_serial(flat, *args, y)
    else:
        _k.quantize_per_tensor(flat, args[0], args[1], _QUANT_BLOCK, *args[2:], y)
    return y.reshape(x.shape), np.asarray(y_scale, np.float32), y_zero_point


def dynamic_range_params(flat):
    """dynamic_quantize_linear's (scale, zero point) of a flat float32 array
    without quantizing it (for kernels that quantize as they read: the AMX
    GEMM's row copies); the same errors for non-finite data."""
    if flat.size == 0:
        lo, hi, finite = np.float32(0), np.float32(0), True
    elif flat.size <= _MINMAX_BLOCK:  # one block: no parallel launch
        lo, hi, finite = _k.min_max_serial(flat)
    else:
        lo, hi, finite = _k.min_max(flat, _MINMAX_BLOCK)
    return dynamic_params(lo, hi, finite)


def dynamic_params(lo, hi, finite=True):
    """DynamicQuantizeLinear's (float32 scale, 0-d uint8 zero point) from the
    data's min and max (``finite``: no NaN / inf seen): scalar float32
    arithmetic, step by step as ONNX's reference does (kernels/quantize.py; also
    the CUDA path's, which reduces on the device)."""
    if not finite:
        msg = (
            "x must be finite for dynamic_quantize_linear (found NaN or inf); "
            "no uint8 scale can represent it. Clean x (np.nan_to_num) first"
        )
        raise ValueError(msg)
    y_scale, zp, ok = _k.dynamic_params(np.float32(lo), np.float32(hi))
    if not ok:
        maxx = max(np.float32(0), np.float32(hi))
        minx = min(np.float32(0), np.float32(lo))
        msg = (
            f"the range of x [{minx}, {maxx}] does not give a finite float32 scale; "
            f"rescale x first"
        )
        raise ValueError(msg)
    return np.float32(y_scale), np.asarray(zp, dtype=np.uint8)
