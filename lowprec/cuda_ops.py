"""The CUDA path of the public INT8 functions (numba-cuda kernels).

Same arguments and the same integer results, bit for bit, as
``lowprec.matmul_integer``, ``qlinear_matmul``, ``quantize_linear`` and
``dequantize_linear`` (docs/quantization.md); they return the kind of array they
were given: CuPy in -> CuPy out, numba device arrays (or other
``__cuda_array_interface__`` objects) in -> numba device array out, NumPy in ->
NumPy out (copied to the GPU and back: ``device="cuda"``).

Scales, zero points and bias are small host parameters (NumPy or Python
scalars; device arrays are copied to the host). Limits of this first version:
``b`` is 2-D (or 1-D, or PackedWeights, uploaded on every call); K <= 65536;
N-D ``a`` must be reshapeable to (rows, K) without a copy on numba arrays.
"""

from __future__ import annotations

import math

import numpy as np

from . import _cuda
from . import _validate as v
from . import gemm as _g
from . import quantize as _q

_FIX_A = "quantize it first with lowprec.quantize_linear"


def _modules():
    """numba.cuda (checked usable) and the kernel modules, imported lazily."""
    nb_cuda = _cuda.cuda()
    from .kernels import config_cuda
    from .kernels import int8_gemm_cuda as kg
    from .kernels import quantize_cuda as kq

    return nb_cuda, config_cuda, kg, kq


def _check_dev(x, name, dtypes, fix):
    if not _cuda.is_device_array(x):
        msg = (
            f"{name} must be a CUDA device array here, got {type(x).__name__}; "
            f"pass both inputs on the same side"
        )
        raise TypeError(msg)
    if np.dtype(x.dtype) not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        msg = f"{name} must have dtype {names}, got {x.dtype}; {fix}"
        raise TypeError(msg)


def _gemm_operands(a, b):
    """Device operands: (a2 (rows,K), b2 (K,N) or packed, shapes, host flag)."""
    host = isinstance(a, np.ndarray)
    packed = b if isinstance(b, _g.PackedWeights) else None
    if host:
        v.check_array(a, "a", v.INT8_TYPES, fix=_FIX_A)
        if packed is None:
            v.check_array(b, "b", v.INT8_TYPES, fix=_FIX_A)
    else:
        a = _cuda.as_kernel_array(a)
        _check_dev(a, "a", v.INT8_TYPES, _FIX_A)
        if packed is None:
            b = _cuda.as_kernel_array(b)
            _check_dev(b, "b", v.INT8_TYPES, _FIX_A)
    b_shape = packed.shape if packed is not None else tuple(b.shape)
    if a.ndim == 0 or len(b_shape) == 0:
        msg = "a and b must have at least 1 dimension (numpy matmul), got a 0-d array"
        raise ValueError(msg)
    if len(b_shape) > 2:
        msg = (
            f"the CUDA path takes a 2-D b (K, N) or PackedWeights, got shape "
            f"{b_shape}; batched b runs on the CPU (NumPy arrays) for now"
        )
        raise ValueError(msg)
    a_shape = (1, a.shape[0]) if a.ndim == 1 else tuple(a.shape)
    b2_shape = (b_shape[0], 1) if len(b_shape) == 1 else b_shape
    if a_shape[-1] != b2_shape[0]:
        msg = (
            f"inner dimensions differ: a.shape[-1]={a_shape[-1]}, "
            f"b.shape[-2]={b2_shape[0]} (a {tuple(a.shape)} @ b {b_shape})"
        )
        raise ValueError(msg)
    K = a_shape[-1]
    rows = math.prod(a_shape[:-1])
    if host:
        a2 = _cuda.to_device(a.reshape(rows, K))
        b2 = None if packed is not None else _cuda.to_device(b.reshape(b2_shape))
    else:
        try:
            a2 = a if a.ndim == 2 else a.reshape(rows, K)
            b2 = None if packed is not None else b
            if b2 is not None and b2.ndim == 1:
                b2 = b2.reshape(b2_shape)
        except Exception as e:
            msg = (
                f"a {tuple(a.shape)} / b {b_shape} cannot be viewed as 2-D without "
                f"a copy ({e}); pass C-contiguous device arrays"
            )
            raise ValueError(msg) from None
    if packed is not None:
        b2 = _cuda.to_device(packed._b_s8)  # b' (eq. 5), int8
    return a2, b2, packed, a_shape, b2_shape, host


def _finish(a, b, out_dev, out_ret, a_shape, b_shape, host):
    """Reshape to numpy matmul's output shape and return like the inputs."""
    batch = a_shape[:-2]
    shape = (*batch, a_shape[-2], b_shape[1])
    if a.ndim == 1:
        shape = (*shape[:-2], shape[-1])
    if not isinstance(b, _g.PackedWeights) and b.ndim == 1:
        shape = shape[:-1]
    if host:
        return out_dev.copy_to_host().reshape(shape)
    return out_ret.reshape(shape)


def _run_gemm(a2, b2, packed, a_dtype, za_eff, zb_eff, bias, mult, zy, qlo, qhi,
              mode, out):  # fmt: skip
    """out (rows, N) = epilogue(a' @ b') on the GPU (docs eqs. 5-13).

    za_eff (1|rows,) int64 = ZA; zb_eff (1|N,) int64 = ZB; bias (1|N,) int64;
    mult (1|rows, 1|N) float64. Returns the count of int32 outputs out of range.
    """
    nb_cuda, cfg, kg, _ = _modules()
    M, K = a2.shape
    N = b2.shape[1]
    if M == 0 or N == 0:
        return 0
    if K > cfg.K_MAX:
        msg = (
            f"K={K} exceeds the CUDA path's limit K <= {cfg.K_MAX} (exact int32 "
            f"dp4a accumulators); split K or run this call on the CPU"
        )
        raise ValueError(msg)
    a_off = np.int32(_g._a_offset(a_dtype))
    b_off = np.int32(0 if packed is not None else _g._b_offset(b2.dtype))
    zero1 = nb_cuda.to_device(np.zeros(1, np.int64))
    threads = cfg.THREADS_1D
    if za_eff.any():  # colsum(b') multiplies ZA (eq. 8)
        if packed is not None:
            col_sum = nb_cuda.to_device(packed._col_sum)
        else:
            col_sum = nb_cuda.device_array(N, np.int64)
            kg.col_sums[_cuda.launch_1d(N, threads)](b2, b_off, col_sum)
    else:
        col_sum = zero1
    za_dev = nb_cuda.to_device(np.ascontiguousarray(za_eff, np.int64))
    if zb_eff.any():  # rowsum(a - a_zp) multiplies ZB (eqs. 8, 9)
        row_sum = nb_cuda.device_array(M, np.int64)
        kg.row_sums[_cuda.launch_1d(M, threads)](a2, a_off, za_dev, row_sum)
    else:
        row_sum = zero1
    bad = nb_cuda.to_device(np.zeros(1, np.int32))
    kernel = kg.gemm_kernel(
        cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_KW, cfg.THREADS_M, cfg.THREADS_N,
        cfg.SMEM_PAD,
    )  # fmt: skip
    grid = (-(-N // cfg.BLOCK_N), -(-M // cfg.BLOCK_M))
    kernel[grid, cfg.THREADS_M * cfg.THREADS_N](
        a2, b2, a_off, b_off, za_dev, row_sum, col_sum,
        nb_cuda.to_device(np.ascontiguousarray(zb_eff, np.int64)),
        nb_cuda.to_device(np.ascontiguousarray(bias, np.int64)),
        nb_cuda.to_device(np.ascontiguousarray(mult, np.float64)),
        np.float64(zy), np.float64(qlo), np.float64(qhi), np.int32(mode), out, bad,
    )  # fmt: skip
    return int(bad.copy_to_host()[0]) if mode == 0 else 0


def _zb_for(b, packed, b_zero_point, N):
    """ZB (eq. 5) as (N,) int64 and the validated b zero point."""
    b_dtype = b.dtype if packed is None else packed.dtype
    zb = _g._b_param(
        b_zero_point if b_zero_point is None else _cuda.to_host(b_zero_point),
        packed.zero_point if packed is not None else None,
        "b_zero_point",
        lambda z: v.zero_point_param(z, "b_zero_point", b_dtype),
        packed if packed is not None else b,
    )
    if zb is None:
        zb = np.zeros(1, b_dtype)
    zb = _g._col_param(zb.reshape(-1) if zb.size == 1 else zb, "b_zero_point", N)
    return _g._zb_eff(zb, b_dtype, N)


def _za_for(a_zero_point, a_dtype, a_shape):
    za = _g._zero_point(_cuda.to_host(a_zero_point), "a_zero_point", a_dtype)
    batch = a_shape[:-2]
    za = _g._row_param(za, "a_zero_point", a_shape, batch)
    return _g._za_eff(_g._rows(za, None, math.prod(a_shape[:-1])), a_dtype)


def matmul_integer_cuda(a, b, a_zero_point=None, b_zero_point=None):
    """``lowprec.matmul_integer`` on the GPU (same arguments, same int32 result)."""
    a2, b2, packed, a_shape, b_shape, host = _gemm_operands(a, b)
    rows, N = a2.shape[0], b_shape[1]
    za_eff = _za_for(a_zero_point, np.dtype(a.dtype), a_shape)
    zb_eff = _zb_for(b, packed, b_zero_point, N)
    out_dev, out_ret = _out(a, host, (rows, N), np.int32)
    bad = _run_gemm(
        a2, b2, packed, np.dtype(a.dtype), za_eff, zb_eff, np.zeros(1, np.int64),
        np.ones((1, 1)), 0.0, 0.0, 0.0, 0, out_dev,
    )  # fmt: skip
    if bad:
        msg = (
            f"{bad} MatMulInteger outputs do not fit int32 (K={a_shape[-1]} allows "
            f"sums past 2**31); ONNX would wrap them silently, lowprec refuses. Use "
            f"qlinear_matmul (exact int64 accumulation) or split K"
        )
        raise OverflowError(msg)
    return _finish(a, b, out_dev, out_ret, a_shape, b_shape, host)


def _out(like, host, shape, dtype):
    if host:
        out = _cuda.cuda().device_array(shape, dtype)
        return out, None
    return _cuda.empty_like_kind(like, shape, dtype)


def qlinear_matmul_cuda(
    a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point,
    *, bias=None, activation=None, out_dtype=None,
):  # fmt: skip
    """``lowprec.qlinear_matmul`` on the GPU (same arguments, same result bits)."""
    a2, b2, packed, a_shape, b_shape, host = _gemm_operands(a, b)
    rows, N = a2.shape[0], b_shape[1]
    a_dtype = np.dtype(a.dtype)
    batch = a_shape[:-2]
    za_eff = _za_for(a_zero_point, a_dtype, a_shape)
    zb_eff = _zb_for(b, packed, b_zero_point, N)
    sa = v.scale_param(_cuda.to_host(a_scale), "a_scale")
    sb = _g._b_param(
        b_scale if b_scale is None else _cuda.to_host(b_scale),
        packed.scale if packed is not None else None,
        "b_scale",
        lambda s: v.scale_param(s, "b_scale"),
        packed if packed is not None else b,
    )
    if sb is None:
        msg = "b_scale is required (pass it here or to pack_weights)"
        raise ValueError(msg)
    sb = _g._col_param(sb.reshape(-1) if sb.size == 1 else sb, "b_scale", N)
    odt = _g._out_dtype(out_dtype)
    lo, hi = v.activation_bounds(activation)
    bias_arr = _g._bias(None if bias is None else _cuda.to_host(bias), N)
    sa_rows = _g._rows(_g._row_param(sa, "a_scale", a_shape, batch), None, rows)
    if odt == np.float32:
        mult = _g._multiplier(sa_rows, sb, None, N)
        zy, qlo, qhi, mode = 0.0, lo, hi, _g._MODE_FLOAT
    else:
        sy = (
            v.scale_param(_cuda.to_host(y_scale), "y_scale")
            if y_scale is not None
            else None
        )
        if sy is None:
            msg = "y_scale is required unless out_dtype=np.float32"
            raise ValueError(msg)
        if sy.size != 1:
            msg = f"y_scale must be a scalar (per-tensor output), got shape {sy.shape}"
            raise ValueError(msg)
        zyp = _g._y_zero_point(_cuda.to_host(y_zero_point), odt)
        odt = zyp.dtype
        zy = float(zyp.reshape(-1)[0])
        qlo, qhi = _g._quant_bounds(
            _g._hashable(activation), zy, float(sy.reshape(-1)[0]), odt
        )
        mult = _g._multiplier(sa_rows, sb, sy.reshape(-1), N)
        mode = _g._MODE_QUANT
    out_dev, out_ret = _out(a, host, (rows, N), odt)
    _run_gemm(
        a2, b2, packed, a_dtype, za_eff, zb_eff, bias_arr, mult, zy, qlo, qhi,
        mode, out_dev,
    )  # fmt: skip
    return _finish(a, b, out_dev, out_ret, a_shape, b_shape, host)


def _flat_device(x, name, dtypes, fix):
    """x as a flat C-contiguous device array, and whether x was on the host."""
    if isinstance(x, np.ndarray):
        v.check_array(x, name, dtypes, fix=fix)
        return _cuda.to_device(x.reshape(-1)), True
    x = _cuda.as_kernel_array(x)
    _check_dev(x, name, dtypes, fix)
    if not _cuda.is_c_contiguous(x):
        msg = (
            f"{name} must be C-contiguous on the CUDA path, got a strided view of "
            f"shape {tuple(x.shape)}; pass a contiguous copy"
        )
        raise ValueError(msg)
    return x.reshape(x.size), False


def _elementwise_out(like, host, n, dtype):
    if host:
        return _cuda.cuda().device_array(n, dtype), None
    return _cuda.empty_like_kind(like, (n,), dtype)


def quantize_linear_cuda(
    x, y_scale, y_zero_point=None, *, axis=1, block_size=0, saturate=True,
    output_dtype=None,
):  # fmt: skip
    """``lowprec.quantize_linear`` on the GPU (same arguments, same result bits)."""
    nb_cuda, cfg, _, kq = _modules()
    xf, host = _flat_device(x, "x", v.FLOAT_INPUT_TYPES, "pass x.astype(np.float32)")
    scale = v.scale_param(_cuda.to_host(y_scale), "y_scale")
    if not isinstance(saturate, bool | np.bool_ | int):
        msg = f"saturate must be a bool, got {type(saturate).__name__}"
        raise TypeError(msg)
    y_zero_point = _cuda.to_host(y_zero_point)
    out_dt = None
    if output_dtype is not None and output_dtype != 0:
        code = output_dtype if isinstance(output_dtype, int) else None
        out_dt = v.output_int_dtype(
            _q._ONNX_CODES.get(code, output_dtype) if code is not None else output_dtype
        )
    zero_point = None
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
    out_dt = out_dt or np.dtype(np.uint8)
    shape = tuple(x.shape)
    (p, c, q), scale3, zp3, block = _q._param_layout(
        shape, scale, zero_point, axis, block_size, "y_scale", "y_zero_point"
    )
    half_div = np.dtype(x.dtype) == np.float16 and scale.dtype == np.float16
    scale3 = np.ascontiguousarray(scale3, dtype=np.float32)  # exact for float16
    zp3 = _zp3(zp3, scale3)
    info = np.iinfo(out_dt)
    n = p * c * q
    out_dev, out_ret = _elementwise_out(x, host, n, out_dt)
    if n:
        kq.quantize_linear[_cuda.launch_1d(n, cfg.THREADS_1D, cfg.MAX_BLOCKS_1D)](
            xf, c, q, nb_cuda.to_device(scale3), nb_cuda.to_device(zp3), block,
            half_div, float(info.min), float(info.max), out_dev,
        )  # fmt: skip
    if host:
        return out_dev.copy_to_host().reshape(shape)
    return out_ret.reshape(shape)


def _zp3(zp3, scale3):
    if zp3 is None:
        return np.zeros(scale3.shape, np.int32)
    if zp3.size == 1 and scale3.size > 1:
        zp3 = np.broadcast_to(zp3, scale3.shape)
    return np.ascontiguousarray(zp3, dtype=np.int32)


def dequantize_linear_cuda(x, x_scale, x_zero_point=None, *, axis=1, block_size=0):
    """``lowprec.dequantize_linear`` on the GPU (same arguments, same result bits)."""
    nb_cuda, cfg, _, kq = _modules()
    xf, host = _flat_device(
        x, "x", v.DEQUANT_TYPES,
        "DequantizeLinear takes the integer tensor produced by quantization",
    )  # fmt: skip
    x_dtype = np.dtype(x.dtype)
    scale = v.scale_param(_cuda.to_host(x_scale), "x_scale")
    zero_point = None
    if x_zero_point is not None:
        zero_point = v.zero_point_param(
            _cuda.to_host(x_zero_point), "x_zero_point", x_dtype
        )
        if x_dtype == np.int32 and np.any(zero_point != 0):
            msg = (
                "x_zero_point must be 0 (or None) for int32 x: ONNX int32 tensors "
                "have no zero point; subtract it before dequantizing"
            )
            raise ValueError(msg)
    shape = tuple(x.shape)
    (p, c, q), scale3, zp3, block = _q._param_layout(
        shape, scale, zero_point, axis, block_size, "x_scale", "x_zero_point"
    )
    scale3 = np.ascontiguousarray(scale3, dtype=np.float32)
    zp3 = _zp3(zp3, scale3)
    n = p * c * q
    out_dev, out_ret = _elementwise_out(x, host, n, scale.dtype)
    if n:
        kq.dequantize_linear[_cuda.launch_1d(n, cfg.THREADS_1D, cfg.MAX_BLOCKS_1D)](
            xf, c, q, nb_cuda.to_device(scale3), nb_cuda.to_device(zp3), block,
            out_dev,
        )  # fmt: skip
    if host:
        return out_dev.copy_to_host().reshape(shape)
    return out_ret.reshape(shape)
