"""Input checks shared by every public function (and later by the CUDA path).

Each error names the argument, what was expected, what was found and the fix.
Nothing here modifies its inputs: conversions return new arrays.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

INT8_TYPES = (np.dtype(np.uint8), np.dtype(np.int8))
QUANT_TYPES = (
    np.dtype(np.uint8),
    np.dtype(np.int8),
    np.dtype(np.uint16),
    np.dtype(np.int16),
)
DEQUANT_TYPES = QUANT_TYPES + (np.dtype(np.int32),)
SCALE_TYPES = (np.dtype(np.float32), np.dtype(np.float16))
FLOAT_INPUT_TYPES = (np.dtype(np.float32), np.dtype(np.float16))


def _names(dtypes) -> str:
    return ", ".join(str(d) for d in dtypes)


def check_array(x, name: str, dtypes=None, *, fix: str = "") -> np.ndarray:
    """x must be a NumPy array, of one of ``dtypes`` when given."""
    if not isinstance(x, np.ndarray):
        msg = (
            f"{name} must be a numpy.ndarray, got {type(x).__name__}; "
            f"convert it with np.asarray({name}, dtype=...)"
        )
        raise TypeError(msg)
    if dtypes is not None and x.dtype not in dtypes:
        msg = f"{name} must have dtype {_names(dtypes)}, got {x.dtype}"
        if fix:
            msg += f"; {fix}"
        raise TypeError(msg)
    return x


def scale_param(value, name: str) -> np.ndarray:
    """A scale: float32/float16 array or a Python number (taken as float32).

    Must be finite and > 0 everywhere; returned as a new array.
    """
    if isinstance(value, np.ndarray | np.floating):
        arr = np.asarray(value)
        if arr.dtype not in SCALE_TYPES:
            msg = (
                f"{name} must be float32 or float16 (the ONNX scale types), got "
                f"{arr.dtype}; pass {name}.astype(np.float32)"
            )
            raise TypeError(msg)
    elif isinstance(value, numbers.Real) and not isinstance(value, np.generic | bool):
        arr = np.asarray(value, dtype=np.float32)
    else:
        msg = (
            f"{name} must be a float32/float16 numpy array or a Python float, "
            f"got {type(value).__name__}"
        )
        raise TypeError(msg)
    if arr.size == 0:
        msg = f"{name} must not be empty, got shape {arr.shape}"
        raise ValueError(msg)
    # one value (the usual per-tensor scale): a Python check, ~10x faster than
    # the array expression (which raises no warning for NaN, so no errstate)
    if arr.size == 1:
        f = float(arr.reshape(-1)[0])
        bad = None if math.isfinite(f) and f > 0 else f
    else:
        ok = np.isfinite(arr) & (arr > 0)
        bad = None if ok.all() else float(arr[~ok].ravel()[0])
    if bad is not None:
        msg = (
            f"{name} must be finite and > 0 everywhere, found {bad}; a scale "
            f"is the real step between two quantized values"
        )
        raise ValueError(msg)
    return arr.copy()


def output_scale(y_scale) -> np.ndarray:
    """y_scale of a requantized (integer) output: required, one value."""
    if y_scale is None:
        msg = "y_scale is required unless out_dtype=np.float32"
        raise ValueError(msg)
    sy = scale_param(y_scale, "y_scale")
    if sy.size != 1:
        msg = f"y_scale must be a scalar (per-tensor output), got shape {sy.shape}"
        raise ValueError(msg)
    return sy


def zero_point_param(value, name: str, dtype) -> np.ndarray:
    """A zero point of integer ``dtype``: a same-typed array or a Python int."""
    dtype = np.dtype(dtype)
    if isinstance(value, numbers.Integral) and not isinstance(value, np.generic | bool):
        info = np.iinfo(dtype)
        if not info.min <= value <= info.max:
            msg = (
                f"{name}={value} does not fit {dtype} "
                f"([{info.min}, {info.max}]); pick a zero point in that range"
            )
            raise ValueError(msg)
        return np.asarray(value, dtype=dtype)
    if isinstance(value, np.ndarray | np.integer):
        arr = np.asarray(value)
        if arr.dtype != dtype:
            msg = (
                f"{name} must have the same dtype as the tensor it belongs to "
                f"({dtype}), got {arr.dtype}; pass {name}.astype(np.{dtype})"
            )
            raise TypeError(msg)
        if arr.size == 0:
            msg = f"{name} must not be empty, got shape {arr.shape}"
            raise ValueError(msg)
        return arr.copy()
    msg = (
        f"{name} must be a numpy integer array/scalar or a Python int, "
        f"got {type(value).__name__}"
    )
    raise TypeError(msg)


def check_axis(axis, ndim: int, name: str = "axis") -> int:
    if not isinstance(axis, numbers.Integral) or isinstance(axis, bool):
        msg = f"{name} must be an int, got {type(axis).__name__}"
        raise TypeError(msg)
    if not -ndim <= axis < ndim:
        msg = (
            f"{name}={axis} is out of range for an input with {ndim} dimensions; "
            f"use a value in [{-ndim}, {ndim - 1}]"
        )
        raise ValueError(msg)
    return int(axis) % ndim


def output_int_dtype(out_dtype, name: str = "output_dtype", allowed=QUANT_TYPES):
    try:
        dt = np.dtype(out_dtype)
    except TypeError:
        msg = f"{name} must be a numpy dtype, got {out_dtype!r}"
        raise TypeError(msg) from None
    if dt not in allowed:
        msg = f"{name} must be one of {_names(allowed)}, got {dt}"
        raise TypeError(msg)
    return dt


def activation_bounds(activation) -> tuple[float, float]:
    """Real-valued clamp [lo, hi] for activation None/'relu'/'relu6'/(min, max)."""
    if activation is None:
        return -np.inf, np.inf
    if isinstance(activation, str):
        if activation == "relu":
            return 0.0, np.inf
        if activation == "relu6":
            return 0.0, 6.0
        msg = (
            f"activation must be None, 'relu', 'relu6' or a (min, max) tuple, "
            f"got {activation!r}"
        )
        raise ValueError(msg)
    if isinstance(activation, tuple | list) and len(activation) == 2:
        try:
            lo, hi = (float(v) for v in activation)
        except (TypeError, ValueError):
            msg = f"activation clamp (min, max) must be two numbers, got {activation!r}"
            raise TypeError(msg) from None
        if np.isnan(lo) or np.isnan(hi) or lo > hi:
            msg = (
                f"activation clamp (min, max) must satisfy min <= max with no NaN, "
                f"got {activation!r}"
            )
            raise ValueError(msg)
        return lo, hi
    msg = (
        f"activation must be None, 'relu', 'relu6' or a (min, max) tuple, "
        f"got {activation!r}"
    )
    raise TypeError(msg)
