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
    mult (1|rows, 1|N) float64. za_eff and mult may be device arrays already
    (dynamic quantization computes them there). Returns the count of int32
    outputs out of range.
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
    on_dev = _cuda.is_device_array
    if on_dev(za_eff) or za_eff.any():  # colsum(b') multiplies ZA (eq. 8)
        if packed is not None:
            col_sum = nb_cuda.to_device(packed._col_sum)
        else:
            col_sum = nb_cuda.device_array(N, np.int64)
            kg.col_sums[_cuda.launch_1d(N, threads)](b2, b_off, col_sum)
    else:
        col_sum = zero1
    za_dev = (
        za_eff
        if on_dev(za_eff)
        else nb_cuda.to_device(np.ascontiguousarray(za_eff, np.int64))
    )
    if zb_eff.any():  # rowsum(a - a_zp) multiplies ZB (eqs. 8, 9)
        row_sum = nb_cuda.device_array(M, np.int64)
        kg.row_sums[_cuda.launch_1d(M, threads)](a2, a_off, za_dev, row_sum)
    else:
        row_sum = zero1
    mult_dev = (
        mult
        if on_dev(mult)
        else nb_cuda.to_device(np.ascontiguousarray(mult, np.float64))
    )
    bad = nb_cuda.to_device(np.zeros(1, np.int32))
    kernel = kg.gemm_kernel(
        cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_KW, cfg.THREADS_M, cfg.THREADS_N,
        cfg.SMEM_PAD,
    )  # fmt: skip
    grid = (-(-M // cfg.BLOCK_M), -(-N // cfg.BLOCK_N))  # rows on x (<= 2**31-1)
    kernel[grid, cfg.THREADS_M * cfg.THREADS_N](
        a2, b2, a_off, b_off, za_dev, row_sum, col_sum,
        nb_cuda.to_device(np.ascontiguousarray(zb_eff, np.int64)),
        nb_cuda.to_device(np.ascontiguousarray(bias, np.int64)),
        mult_dev,
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
        sy = v.output_scale(_cuda.to_host(y_scale))
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
    out_dt = _q._output_dtype(output_dtype)  # the CPU's rules
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


# --------------------------------------------------------------------------- #
# INT8 convolution (kernels/int8_conv_cuda.py)


def _device_input(x, name, dtypes, fix):
    """(kernel array or host array, host flag, NumPy stand-in of x's shape and
    dtype for the CPU validators, which take NumPy arrays only)."""
    if isinstance(x, np.ndarray):
        v.check_array(x, name, dtypes, fix=fix)
        return x, True, x
    xd = _cuda.as_kernel_array(x)
    _check_dev(xd, name, dtypes, fix)
    return xd, False, np.broadcast_to(np.zeros((), xd.dtype), tuple(xd.shape))


def _as_4d(x, host, shape4, name):
    """x as (N, C, H, W) / (N, H, W, C) on the device (1-D convs get H = 1)."""
    if host:
        return _cuda.to_device(x.reshape(shape4))
    if tuple(x.shape) == shape4:
        return x
    try:
        return x.reshape(shape4)
    except Exception as e:
        msg = (
            f"{name} {tuple(x.shape)} cannot be viewed as {shape4} without a copy "
            f"({e}); pass a C-contiguous device array"
        )
        raise ValueError(msg) from None


def _conv_geometry(proxy, packed, layout, attrs):
    """CPU conv.py's checks and geometry -> (geo dict, output shapes)."""
    from . import conv as _c

    C, spatial, k = _c._check_x(proxy, packed, layout, attrs["kernel_shape"])
    out_sp, pb, _, s, d = _c._geometry(
        spatial, k, attrs["auto_pad"], attrs["dilations"], attrs["pads"],
        attrs["strides"],
    )  # fmt: skip
    one_d = len(k) == 1
    lift = (lambda t: (1, t[0])) if one_d else tuple
    (H, W), (kh, kw), (Ho, Wo) = lift(spatial), lift(k), lift(out_sp)
    (sh, sw), (dh, dw) = lift(s), lift(d)
    pt, pl = (0, pb[0]) if one_d else pb
    N, M, G = proxy.shape[0], packed.shape[0], packed.group
    geo = np.array(
        [N, H, W, C, Ho, Wo, kh, kw, sh, sw, dh, dw, pt, pl, G, C // G, M // G],
        np.int64,
    )
    chw = layout == "NCHW"
    x4 = (N, C, H, W) if chw else (N, H, W, C)
    out3 = (N, M, Ho * Wo) if chw else (N, Ho * Wo, M)
    final = (N, M, *out_sp) if chw else (N, *out_sp, M)
    return geo, x4, out3, final


def _run_conv(x, proxy, host, packed, zb_eff, za, bias, mult, zy, qlo, qhi, mode,
              odt, layout, attrs, like=None):  # fmt: skip
    """lowprec/conv.py::_conv on the GPU; returns like the input (``like``: the
    caller's array before its conversion to a kernel array; CuPy in, CuPy out)."""
    from . import conv as _c

    nb_cuda, cfg, _, _ = _modules()
    from .kernels import int8_conv_cuda as kc

    geo, x4, out3, final = _conv_geometry(proxy, packed, layout, attrs)
    N, H, W, C, Ho, Wo, kh, kw = (int(t) for t in geo[:8])
    G, Cg, Mg = (int(t) for t in geo[14:])
    K = kh * kw * Cg
    _c._check_k(K)
    chw = layout == "NCHW"
    out_dev, out_ret = _out(x if like is None else like, host, out3, odt)
    rows = N * Ho * Wo
    if rows and G * Mg:
        xd = _as_4d(x, host, x4, "x")
        a_off = np.int32(_g._a_offset(np.dtype(x.dtype)))
        za_eff = np.int32(za + int(a_off))
        geo_d = nb_cuda.to_device(geo)
        mult_d = nb_cuda.to_device(np.ascontiguousarray(mult, np.float64))
        args = (np.float64(zy), np.float64(qlo), np.float64(qhi), np.int32(mode))
        if G == C and Mg == 1:  # depthwise: w' - ZB as (kH*kW, C) int32
            wd = nb_cuda.to_device(packed._depthwise(zb_eff))
            total = rows * C
            kc.depthwise[_cuda.launch_1d(total, cfg.THREADS_1D, cfg.MAX_BLOCKS_1D)](
                xd, chw, geo_d, a_off, za_eff, wd,
                nb_cuda.to_device(np.ascontiguousarray(bias, np.int64)), mult_d,
                *args, out_dev,
            )  # fmt: skip
        else:
            if zb_eff.any():  # rowsum(x' - ZA) per group multiplies ZB (eq. 8)
                row_sum = nb_cuda.device_array((G, rows), np.int64)
                kc.patch_row_sums[_cuda.launch_1d(G * rows, cfg.THREADS_1D)](
                    xd, chw, geo_d, a_off, za_eff, row_sum
                )
            else:
                row_sum = nb_cuda.to_device(np.zeros((1, 1), np.int64))
            kernel = kc.conv_kernel(
                cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_KW, cfg.THREADS_M,
                cfg.THREADS_N, cfg.SMEM_PAD,
            )  # fmt: skip
            grid = (-(-rows // cfg.BLOCK_M), -(-Mg // cfg.BLOCK_N), G)
            kernel[grid, cfg.THREADS_M * cfg.THREADS_N](
                xd, chw, geo_d, a_off, za_eff, nb_cuda.to_device(packed._wk),
                row_sum, nb_cuda.to_device(packed._col_sum),
                nb_cuda.to_device(np.ascontiguousarray(zb_eff, np.int64)),
                nb_cuda.to_device(np.ascontiguousarray(bias, np.int64)), mult_d,
                *args, out_dev,
            )  # fmt: skip
    if host:
        return out_dev.copy_to_host().reshape(final)
    return out_ret.reshape(final)


def conv_integer_cuda(
    x, w, x_zero_point=None, w_zero_point=None, *, auto_pad="NOTSET",
    dilations=None, group=1, kernel_shape=None, pads=None, strides=None,
):  # fmt: skip
    """``lowprec.conv_integer`` on the GPU (same arguments, same int32 result)."""
    from . import conv as _c

    x_in = x
    x, host, proxy = _device_input(x, "x", v.INT8_TYPES, _FIX_A)
    packed, zb_eff, _ = _c._weights(
        _cuda.to_host(w), _cuda.to_host(w_zero_point), None, group, need_scale=False
    )
    za = _c._x_zero_point(_cuda.to_host(x_zero_point), proxy.dtype)
    M = packed.shape[0]
    return _run_conv(
        x, proxy, host, packed, zb_eff, za, np.zeros(M, np.int64), np.ones((1, 1)),
        0.0, 0.0, 0.0, _c._MODE_INT32, np.int32, "NCHW",
        _c._attrs(auto_pad, dilations, kernel_shape, pads, strides), like=x_in,
    )  # fmt: skip


def qlinear_conv_cuda(
    x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point,
    bias=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None,
    pads=None, strides=None, activation=None, layout="NCHW", out_dtype=None,
):  # fmt: skip
    """``lowprec.qlinear_conv`` on the GPU (same arguments, same result bits)."""
    from . import conv as _c

    x_in = x
    x, host, proxy = _device_input(x, "x", v.INT8_TYPES, _FIX_A)
    h = _cuda.to_host
    packed, zb_eff, sw = _c._weights(
        h(w), h(w_zero_point), h(w_scale), group, need_scale=True
    )
    za = _c._x_zero_point(h(x_zero_point), proxy.dtype)
    sx = v.scale_param(h(x_scale), "x_scale")
    if sx.size != 1:
        msg = f"x_scale must be a scalar (per-tensor), got shape {sx.shape}"
        raise ValueError(msg)
    sx = sx.reshape(1)
    M = packed.shape[0]
    odt = _g._out_dtype(out_dtype)
    lo, hi = v.activation_bounds(activation)
    bias_arr = _g._bias(None if bias is None else h(bias), M)
    if bias_arr.shape != (M,):
        bias_arr = np.full(M, bias_arr[0], np.int64)
    attrs = _c._attrs(auto_pad, dilations, kernel_shape, pads, strides)
    run = (x, proxy, host, packed, zb_eff, za, bias_arr)
    if odt == np.float32:
        mult = _g._multiplier(sx, sw, None, M)
        return _run_conv(
            *run,
            mult,
            0.0,
            lo,
            hi,
            _c._MODE_FLOAT,
            np.float32,
            layout,
            attrs,
            like=x_in,
        )
    sy = v.output_scale(h(y_scale))
    zyp = _g._y_zero_point(h(y_zero_point), odt)
    odt = zyp.dtype
    zy = float(zyp.reshape(-1)[0])
    qlo, qhi = _g._quant_bounds(
        _g._hashable(activation), zy, float(sy.reshape(-1)[0]), odt
    )
    mult = _g._multiplier(sx, sw, sy.reshape(-1), M)
    return _run_conv(
        *run, mult, zy, qlo, qhi, _c._MODE_QUANT, odt, layout, attrs, like=x_in
    )


# --------------------------------------------------------------------------- #
# FP16 GEMM and convolution (kernels/fp16_gemm_cuda.py)

_FIX_F16 = "convert it with {0}.astype(np.float16)"
_F16 = (np.dtype(np.float16),)


def _half_epilogue(bias, activation, out_dtype, N):
    """lowprec.half's bias / clamp / output checks -> kernel arguments."""
    from . import half as _h

    bias_arr, has_bias = _h._bias(None if bias is None else _cuda.to_host(bias), N)
    lo, hi = v.activation_bounds(activation)
    odt = _h._fp16_out_dtype(out_dtype)
    return bias_arr, bool(has_bias), np.float32(lo), np.float32(hi), odt


def matmul_fp16_cuda(a, b, *, bias=None, activation=None, out_dtype=np.float32):
    """``lowprec.matmul_fp16`` on the GPU: same arguments and, for a 2-D (or
    1-D, or packed) ``b``, the same float32 summation order, hence the same
    bits as the CPU path (lowprec.half's accuracy contract)."""
    from . import half as _h

    nb_cuda, cfg, _, _ = _modules()
    from .kernels import fp16_gemm_cuda as kf

    a_in = a  # the output is allocated like this (CuPy in, CuPy out)
    a, host, a_proxy = _device_input(a, "a", _F16, _FIX_F16.format("a"))
    if isinstance(b, _h.PackedWeightsBF16):
        msg = "b is packed bfloat16 weights; use matmul_bf16, or pack_weights_fp16"
        raise TypeError(msg)
    packed = isinstance(b, _h.PackedWeightsFP16)
    if packed:
        b_shape = b.shape
        b_dev = _cuda.to_device(b._bits.view(np.float16))
    else:
        if host != isinstance(b, np.ndarray):
            _cuda.use_cuda(a, b)  # raises the mixed host/device TypeError
        b, _, b_proxy = _device_input(b, "b", _F16, _FIX_F16.format("b"))
        b_shape = tuple(b.shape)
    a_shape, b2, _ = _h._shapes(a_proxy, b_shape)
    if len(b2) > 2:
        msg = (
            f"the CUDA path takes a 2-D b (K, N) or PackedWeightsFP16, got shape "
            f"{b_shape}; batched b runs on the CPU (NumPy arrays) for now"
        )
        raise ValueError(msg)
    K, N = b2
    rows = math.prod(a_shape[:-1])
    bias_arr, has_bias, lo, hi, odt = _half_epilogue(bias, activation, out_dtype, N)
    if host:
        a2 = _cuda.to_device(a.reshape(rows, K))
    else:
        a2 = _as_4d(a, False, (rows, K), "a")
    if not packed:
        b_dev = _cuda.to_device(b.reshape(b2)) if host else _as_4d(b, False, b2, "b")
    out_dev, out_ret = _out(a_in, host, (rows, N), odt)
    if rows and N:
        kernel = kf.gemm_kernel(
            cfg.FP16_BLOCK_M, cfg.FP16_BLOCK_N, cfg.FP16_BLOCK_K,
            cfg.FP16_THREADS_M, cfg.FP16_THREADS_N, cfg.FP16_SMEM_PAD,
        )  # fmt: skip
        grid = (-(-rows // cfg.FP16_BLOCK_M), -(-N // cfg.FP16_BLOCK_N))
        kernel[grid, cfg.FP16_THREADS_M * cfg.FP16_THREADS_N](
            a2, b_dev, nb_cuda.to_device(bias_arr), has_bias, lo, hi, False, out_dev
        )
    shape = (*a_shape[:-1], N)
    if a_proxy.ndim == 1:
        shape = shape[1:]
    if len(b_shape) == 1:
        shape = shape[:-1]
    if host:
        return out_dev.copy_to_host().reshape(shape)
    return out_ret.reshape(shape)


def conv_fp16_cuda(
    x, w, bias=None, *, auto_pad="NOTSET", dilations=None, group=1,
    kernel_shape=None, pads=None, strides=None, activation=None,
    out_dtype=np.float32,
):  # fmt: skip
    """ONNX Conv (NCHW) on float16 x and w with float32 accumulation, on the GPU.

    x (N, C, [H,] W) float16, w (M, C/group, [kH,] kW) float16, bias (M,) or
    scalar float16/float32 (w also a PackedConvWeightsFP16, uploaded per
    call); activation and out_dtype as ``matmul_fp16``. Each output is one
    float32 sum over (i, j, c), the CPU conv_fp16's order, padded taps adding
    +0, so the bits are the CPU's (float16 products are exact in float32);
    returns the kind of array it was given.
    """
    from . import conv as _c

    nb_cuda, cfg, _, _ = _modules()
    from .kernels import fp16_gemm_cuda as kf

    x_in = x  # the output is allocated like this (CuPy in, CuPy out)
    x, host, proxy = _device_input(x, "x", _F16, _FIX_F16.format("x"))
    from .conv_half import PackedConvWeightsFP16

    if isinstance(w, PackedConvWeightsFP16):  # its float16 weights, and group
        if group != w.group:
            msg = (
                f"group={group} differs from the group={w.group} the weights were "
                f"packed with; pass group={w.group}"
            )
            raise ValueError(msg)
        w16 = w._bits.view(np.float16)
        w = w16 if host else nb_cuda.to_device(w16)
    if host != isinstance(w, np.ndarray):
        _cuda.use_cuda(x, w)  # raises the mixed host/device TypeError
    w, _, w_proxy = _device_input(w, "w", _F16, _FIX_F16.format("w"))
    G = _c._check_group(group)
    if w_proxy.ndim not in (3, 4) or 0 in w_proxy.shape:
        msg = (
            f"w must be 3-D (M, C/group, kW) or 4-D (M, C/group, kH, kW) with no "
            f"empty dimension, got shape {w_proxy.shape}"
        )
        raise ValueError(msg)
    if proxy.ndim != w_proxy.ndim:
        msg = (
            f"x has {proxy.ndim} dimensions and w {w_proxy.ndim}: a "
            f"{w_proxy.ndim - 2}-D convolution needs x of shape (N, C, *spatial)"
        )
        raise ValueError(msg)
    M, Cg = w_proxy.shape[:2]
    C = proxy.shape[1]
    if M % G or C != Cg * G:
        msg = (
            f"x has C={C} channels and w {w_proxy.shape} with group={G}: C must be "
            f"w.shape[1] * group = {Cg * G} and M={M} a multiple of group"
        )
        raise ValueError(msg)
    k = tuple(w_proxy.shape[2:])
    if kernel_shape is not None and _c._ints(kernel_shape, "kernel_shape", len(k), 1,
                                             1) != k:  # fmt: skip
        msg = f"kernel_shape={tuple(kernel_shape)} does not match w.shape[2:]={k}"
        raise ValueError(msg)
    attrs = _c._attrs(auto_pad, dilations, kernel_shape, pads, strides)
    out_sp, pb, _, s, d = _c._geometry(
        proxy.shape[2:], k, attrs["auto_pad"], attrs["dilations"], attrs["pads"],
        attrs["strides"],
    )  # fmt: skip
    bias_arr, has_bias, lo, hi, odt = _half_epilogue(bias, activation, out_dtype, M)
    one_d = len(k) == 1
    lift = (lambda t: (1, t[0])) if one_d else tuple
    (H, W), (kh, kw), (Ho, Wo) = lift(proxy.shape[2:]), lift(k), lift(out_sp)
    (sh, sw), (dh, dw) = lift(s), lift(d)
    pt, pl = (0, pb[0]) if one_d else pb
    N = proxy.shape[0]
    geo = np.array(
        [N, H, W, C, Ho, Wo, kh, kw, sh, sw, dh, dw, pt, pl, G, Cg, M // G],
        np.int64,
    )
    out_dev, out_ret = _out(x_in, host, (N, M, Ho * Wo), odt)
    rows = N * Ho * Wo
    if rows:
        xd = _as_4d(x, host, (N, C, H, W), "x")
        wd = _as_4d(w, host, (M, Cg * kh * kw), "w")
        kernel = kf.conv_kernel(
            cfg.FP16_BLOCK_M, cfg.FP16_BLOCK_N, cfg.FP16_BLOCK_K,
            cfg.FP16_THREADS_M, cfg.FP16_THREADS_N, cfg.FP16_SMEM_PAD,
        )  # fmt: skip
        grid = (-(-rows // cfg.FP16_BLOCK_M), -(-(M // G) // cfg.FP16_BLOCK_N), G)
        kernel[grid, cfg.FP16_THREADS_M * cfg.FP16_THREADS_N](
            xd, wd, nb_cuda.to_device(geo), nb_cuda.to_device(bias_arr), has_bias,
            lo, hi, out_dev,
        )  # fmt: skip
    final = (N, M, *out_sp)
    if host:
        return out_dev.copy_to_host().reshape(final)
    return out_ret.reshape(final)


# --------------------------------------------------------------------------- #
# sparse SpMM (kernels/sparse_gemm_cuda.py)


def _sparse_device(w):
    """W's expanded CSR (indptr int64, cols int32, values) on the device,
    uploaded once and cached with the (immutable) matrix."""
    got = w._cache.get("cuda_csr")
    if got is None:
        indptr, cols, vals = w._expanded()
        got = tuple(_cuda.to_device(t) for t in (indptr, cols, vals))
        w._cache["cuda_csr"] = got
    return got


def _sparse_x(w, x, dtypes, fix):
    from . import sparse as _s

    x, host, proxy = _device_input(x, "x", dtypes, fix)
    M, K = w.shape
    _s._check_x(proxy, K, dtypes, fix)
    N = 1 if proxy.ndim == 1 else proxy.shape[1]
    x2 = _cuda.to_device(x.reshape(K, N)) if host else _as_4d(x, False, (K, N), "x")
    shape = (M,) if proxy.ndim == 1 else (M, N)
    return x, x2, host, N, shape


def _spmm_launch(cfg, M, N):
    # threads: enough warps for the columns (small N leaves no warp idle), at
    # most SPMM_THREADS (the shared staging buffers' size)
    vn = cfg.SPMM_VN
    cols = -(-N // vn)  # columns per thread row
    warps = -(-cols // 32)
    threads = min(cfg.SPMM_THREADS, 32 * warps)
    grid = (-(-M // cfg.SPMM_ROWS), -(-N // (threads * vn)))
    return grid, threads


def _no_out(out):
    if out is not None:
        msg = (
            "out= is not supported on the CUDA path (the result is a new device "
            "array); drop out="
        )
        raise ValueError(msg)


def spmm_cuda(w, x, *, bias=None, activation=None, out=None):
    """``lowprec.spmm`` on the GPU (same arguments but ``out``; float32 result
    within the same summation-order bound, lowprec/sparse.py)."""
    from . import sparse as _s

    nb_cuda, cfg, _, _ = _modules()
    from .kernels import sparse_gemm_cuda as ks

    _s._check_w(w)
    if w.dtype == np.int8:
        msg = "w has int8 values; use lowprec.qlinear_spmm (or pack float values)"
        raise TypeError(msg)
    _no_out(out)
    x_in = x  # the output is allocated like this (CuPy in, CuPy out)
    x, x2, host, N, shape = _sparse_x(w, x, v.FLOAT_INPUT_TYPES,
                                      "use float32 activations")  # fmt: skip
    M = w.shape[0]
    lo, hi = v.activation_bounds(activation)
    if bias is None:
        b = np.zeros(1, np.float32)
    else:
        b = np.asarray(_cuda.to_host(bias), dtype=np.float32).reshape(-1)
        if b.size not in (1, M):
            msg = (
                f"bias must be a scalar or have shape ({M},) (one per row), "
                f"got {np.shape(bias)}"
            )
            raise ValueError(msg)
    out_dev, out_ret = _out(x_in, host, (M, N), np.float32)
    if M and N:
        indptr, cols, vals = _sparse_device(w)
        grid, threads = _spmm_launch(cfg, M, N)
        kernel = ks.spmm_float_kernel(cfg.SPMM_ROWS, cfg.SPMM_THREADS, cfg.SPMM_VN)
        kernel[grid, threads](
            indptr, cols, vals, x2, nb_cuda.to_device(b), np.float32(lo),
            np.float32(hi), out_dev,
        )  # fmt: skip
    if host:
        return out_dev.copy_to_host().reshape(shape)
    return out_ret.reshape(shape)


def qlinear_spmm_cuda(
    w, x, x_scale, x_zero_point, y_scale, y_zero_point, *, bias=None,
    activation=None, out_dtype=None, out=None,
):  # fmt: skip
    """``lowprec.qlinear_spmm`` on the GPU (same arguments but ``out``, same
    result bits)."""
    from . import sparse as _s

    nb_cuda, cfg, _, _ = _modules()
    from .kernels import sparse_gemm_cuda as ks

    _s._check_w(w)
    if w.dtype != np.int8:
        msg = "w has float values; use lowprec.spmm (or pack with dtype=np.int8)"
        raise TypeError(msg)
    _no_out(out)
    x_in = x  # the output is allocated like this (CuPy in, CuPy out)
    x, x2, host, N, shape = _sparse_x(
        w, x, v.INT8_TYPES, "quantize it with lowprec.quantize_linear"
    )
    M = w.shape[0]
    h = _cuda.to_host
    x_dtype = np.dtype(x.dtype)
    sx = v.scale_param(h(x_scale), "x_scale")
    if sx.size != 1:
        msg = f"x_scale must be a scalar (per-tensor activations), got shape {sx.shape}"
        raise ValueError(msg)
    x_zero_point = h(x_zero_point)
    zx = (
        0
        if x_zero_point is None
        else v.zero_point_param(x_zero_point, "x_zero_point", x_dtype)
    )
    if np.size(zx) != 1:
        msg = f"x_zero_point must be a scalar, got shape {np.shape(zx)}"
        raise ValueError(msg)
    zx = int(np.asarray(zx).reshape(-1)[0])
    odt = _g._out_dtype(out_dtype)
    bias = h(bias)
    if bias is None:
        bias64 = np.zeros(M, np.int64)
    else:
        v.check_array(
            bias, "bias", (np.dtype(np.int32),),
            fix="quantize it as rint(bias_real / (x_scale * w.scale))",
        )  # fmt: skip
        if bias.size != 1 and bias.shape != (M,):
            msg = (
                f"bias must be a scalar or have shape ({M},) (one per row), "
                f"got {bias.shape}"
            )
            raise ValueError(msg)
        bias64 = np.broadcast_to(bias.reshape(-1).astype(np.int64), (M,)).copy()
    if odt == np.float32:
        mult = _g._multiplier(sx.reshape(-1), w.scale, None, M)[0]
        zy = 0.0
        qlo, qhi = v.activation_bounds(activation)
        mode, odt_final = 2, np.dtype(np.float32)
    else:
        sy = v.output_scale(h(y_scale))
        zyp = _g._y_zero_point(h(y_zero_point), odt)
        odt_final = zyp.dtype
        zy = float(zyp.reshape(-1)[0])
        qlo, qhi = _g._quant_bounds(
            _g._hashable(activation), zy, float(sy.reshape(-1)[0]), odt_final
        )
        mult = _g._multiplier(sx.reshape(-1), w.scale, sy.reshape(-1), M)[0]
        mode = 1
    out_dev, out_ret = _out(x_in, host, (M, N), odt_final)
    if M and N:
        maxrow, _, rs = _s._row_stats(w)  # as lowprec.qlinear_spmm
        if maxrow > _s._INT32_SAFE_NNZ:
            msg = (
                f"a row of w stores more than {_s._INT32_SAFE_NNZ} entries: int32 "
                f"sums could overflow; split K"
            )
            raise ValueError(msg)
        indptr, cols, vals = _sparse_device(w)
        grid, threads = _spmm_launch(cfg, M, N)
        kernel = ks.spmm_s8_kernel(cfg.SPMM_ROWS, cfg.SPMM_THREADS, cfg.SPMM_VN)
        kernel[grid, threads](
            indptr, cols, vals, nb_cuda.to_device(np.ascontiguousarray(w.zero_point)),
            x2, np.int64(zx), nb_cuda.to_device(rs), nb_cuda.to_device(bias64),
            nb_cuda.to_device(np.ascontiguousarray(mult, np.float64)),
            np.float64(zy), np.float64(qlo), np.float64(qhi), np.int32(mode), out_dev,
        )  # fmt: skip
    if host:
        return out_dev.copy_to_host().reshape(shape)
    return out_ret.reshape(shape)


# --------------------------------------------------------------------------- #
# dynamic quantization (kernels/dynamic_quantize_cuda.py)


def _min_max_dev(xf):
    """(min, max) of a flat float32 device array, and whether all were finite
    (two launches of the shared-memory reduction, two floats back)."""
    nb_cuda, cfg, _, _ = _modules()
    from .kernels import dynamic_quantize_cuda as kd

    threads = cfg.THREADS_1D
    kernel = kd.min_max_kernel(threads)
    blocks, _ = _cuda.launch_1d(xf.shape[0], threads, cfg.MAX_BLOCKS_1D)
    lo_p = nb_cuda.device_array(blocks, np.float32)
    hi_p = nb_cuda.device_array(blocks, np.float32)
    ends = nb_cuda.device_array(2, np.float32)
    bad = nb_cuda.to_device(np.zeros(1, np.int32))
    kernel[blocks, threads](xf, xf, lo_p, hi_p, bad)
    kernel[1, threads](lo_p, hi_p, ends[0:1], ends[1:2], bad)
    lo, hi = ends.copy_to_host()
    return np.float32(lo), np.float32(hi), int(bad.copy_to_host()[0]) == 0


def _dynamic_quantize_flat(xf, n, out):
    """out (n,) uint8 = DynamicQuantizeLinear of flat float32 device xf;
    returns (y_scale float32, y_zero_point 0-d uint8), the CPU's values."""
    nb_cuda, cfg, _, kq = _modules()
    if n:
        lo, hi, finite = _min_max_dev(xf)
    else:
        lo, hi, finite = np.float32(0), np.float32(0), True
    y_scale, y_zp = _q.dynamic_params(lo, hi, finite)
    if n:  # eq. 1 with the kernel of quantize_linear_cuda, per tensor
        kq.quantize_linear[_cuda.launch_1d(n, cfg.THREADS_1D, cfg.MAX_BLOCKS_1D)](
            xf, 1, 1, nb_cuda.to_device(np.full((1, 1, 1), y_scale, np.float32)),
            nb_cuda.to_device(np.full((1, 1, 1), int(y_zp), np.int32)), 1, False,
            0.0, 255.0, out,
        )  # fmt: skip
    return y_scale, y_zp


def dynamic_quantize_linear_cuda(x):
    """``lowprec.dynamic_quantize_linear`` on the GPU: (y, y_scale, y_zero_point)
    with the CPU function's bits. y is the kind of array x was (CuPy, numba
    device array, or NumPy for a host x); y_scale (float32) and y_zero_point
    (uint8) are 0-d NumPy arrays: parameters are host values everywhere on the
    CUDA path (the reduction's two floats come back to check finiteness)."""
    xf, host = _flat_device(
        x, "x", (np.dtype(np.float32),),
        "ONNX DynamicQuantizeLinear takes float32; pass x.astype(np.float32)",
    )  # fmt: skip
    n = xf.shape[0]
    out_dev, out_ret = _elementwise_out(x, host, n, np.uint8)
    y_scale, y_zp = _dynamic_quantize_flat(xf, n, out_dev)
    shape = tuple(x.shape)
    y = out_dev.copy_to_host().reshape(shape) if host else out_ret.reshape(shape)
    return y, np.asarray(y_scale, np.float32), y_zp


def dynamic_quantize_matmul_cuda(
    a, b, b_scale=None, b_zero_point=None, *, bias=None, per_row=False
):
    """``lowprec.dynamic_quantize_matmul`` on the GPU (same arguments, same
    float32 bits, docs eq. 14): a is quantized to uint8 on the device (per
    tensor, or per row with ``per_row=True``), multiplied on the INT8 GEMM
    kernel with its float32 epilogue, and the float bias added in one more
    elementwise pass. ``b`` may be a host array, PackedWeights or a 2-D device
    array; returns the kind of array ``a`` was."""
    nb_cuda, cfg, _, _ = _modules()
    from .kernels import dynamic_quantize_cuda as kd

    a_in = a  # the output's kind follows the caller's array (CuPy stays CuPy)
    a, host, proxy = _device_input(
        a, "a", (np.dtype(np.float32),), "pass a.astype(np.float32)"
    )
    if proxy.ndim == 0:
        msg = "a must have at least 1 dimension, got a 0-d array"
        raise ValueError(msg)
    packed = b if isinstance(b, _g.PackedWeights) else None
    if packed is None:
        if host != isinstance(b, np.ndarray):
            _cuda.use_cuda(a, b)  # raises the mixed host/device TypeError
        b, _, b_proxy = _device_input(
            b, "b", v.INT8_TYPES, "quantize the weights to int8 first"
        )
        if b_proxy.ndim != 2:
            msg = f"b must be 2-D (K, N) weights or PackedWeights, got shape {b.shape}"
            raise ValueError(msg)
        K, N = b_proxy.shape
    else:
        K, N = packed.shape
    if proxy.shape[-1] != K:
        msg = f"inner dimensions differ: a.shape[-1]={proxy.shape[-1]}, b.shape[0]={K}"
        raise ValueError(msg)
    zb_eff = _zb_for(b, packed, b_zero_point, N)
    sb = _g._b_param(
        b_scale if b_scale is None else _cuda.to_host(b_scale),
        packed.scale if packed is not None else None,
        "b_scale",
        lambda s: _g._col_param(v.scale_param(s, "b_scale"), "b_scale", N),
        b,
    )
    if sb is None:
        msg = "b_scale is required (pass it here or to pack_weights)"
        raise ValueError(msg)
    sb = _g._col_param(sb.reshape(-1) if sb.size == 1 else sb, "b_scale", N)
    bias = _cuda.to_host(bias)
    if bias is not None:
        v.check_array(
            bias, "bias", (np.dtype(np.float32),), fix="pass bias.astype(np.float32)"
        )
        if bias.shape != (N,):
            msg = f"bias must have shape ({N},) (one per column), got {bias.shape}"
            raise ValueError(msg)
    rows = math.prod(proxy.shape[:-1])
    a2 = _as_4d(a, host, (rows, K), "a")
    out_dev, out_ret = _out(a_in, host, (rows, N), np.float32)
    shape = (*proxy.shape[:-1], N)
    if rows == 0 or N == 0:
        return out_dev.copy_to_host().reshape(shape) if host else out_ret.reshape(shape)
    qa = nb_cuda.device_array((rows, K), np.uint8)
    if per_row:
        threads = cfg.THREADS_1D
        sa_dev = nb_cuda.device_array(rows, np.float32)
        za_dev = nb_cuda.device_array(rows, np.int64)
        bad = nb_cuda.to_device(np.zeros(1, np.int32))
        kd.quantize_rows_kernel(threads)[rows, threads](a2, qa, sa_dev, za_dev, bad)
        if int(bad.copy_to_host()[0]):
            msg = (
                "a must be finite for dynamic quantization (found NaN or inf, or a "
                "row whose range overflows float32); clean it first"
            )
            raise ValueError(msg)
        # eq. 14's multiplier fl32(sa[m] * sb[n]), built on the device
        mult = nb_cuda.device_array((rows, N), np.float64)
        kd.row_col_mult[_cuda.launch_1d(rows * N, cfg.THREADS_1D, cfg.MAX_BLOCKS_1D)](
            sa_dev, _cuda.to_device(np.broadcast_to(sb.astype(np.float32), N)), mult
        )
        za_eff = za_dev  # uint8 a: no offset (eq. 5)
    else:
        if not _cuda.is_c_contiguous(a2):
            msg = (
                f"a must be C-contiguous on the CUDA path (per_row=False), got a "
                f"strided view of shape {tuple(proxy.shape)}; pass a contiguous copy"
            )
            raise ValueError(msg)
        s, z = _dynamic_quantize_flat(a2.reshape(rows * K), rows * K,
                                      qa.reshape(rows * K))  # fmt: skip
        mult = _g._multiplier(s.reshape(1), sb, None, N)
        za_eff = np.full(1, int(z), np.int64)
    if packed is not None:
        b2 = _cuda.to_device(packed._b_s8)  # b' (eq. 5), int8
    else:
        b2 = _cuda.to_device(b) if host else b
    _run_gemm(
        qa, b2, packed, np.dtype(np.uint8), za_eff, zb_eff, np.zeros(1, np.int64),
        mult, 0.0, -np.inf, np.inf, 2, out_dev,
    )  # fmt: skip
    # without bias no pass: the CPU adds nothing either (a -0.0 product, from
    # a multiplier that underflows to 0, stays -0.0)
    if bias is not None:
        kd.add_bias[_cuda.launch_1d(rows * N, cfg.THREADS_1D, cfg.MAX_BLOCKS_1D)](
            out_dev, nb_cuda.to_device(np.ascontiguousarray(bias))
        )
    if host:
        return out_dev.copy_to_host().reshape(shape)
    return out_ret.reshape(shape)


# --------------------------------------------------------------------------- #
# BF16 GEMM (kernels/bf16_gemm_cuda.py)

_U16 = np.dtype(np.uint16)


def _bf16_input(x, name):
    """bfloat16 bits on the device side: host ml_dtypes.bfloat16 / uint16 arrays
    are viewed as uint16; device arrays must be uint16 (CuPy and numba have no
    bfloat16 dtype)."""
    from . import half as _h

    if isinstance(x, np.ndarray):
        bits = _h._as_bf16_bits(x, name, _h._BF16_FIX)
        return bits, True, bits
    fix = "device bfloat16 is carried as uint16 bit patterns: pass x.view(uint16)"
    return _device_input(x, name, (_U16,), fix)


def matmul_bf16_cuda(a, b, *, bias=None, activation=None, out_dtype=np.float32):
    """``lowprec.matmul_bf16`` on the GPU: same arguments and, for a 2-D (or
    1-D, or packed) ``b``, lowprec.half's bfloat16 summation order (pairs of k,
    odd term first), hence the CPU portable path's bits outside the subnormal /
    overflow range of products. Device arrays carry bfloat16 as uint16 bits;
    ``out_dtype`` bfloat16 on device inputs returns uint16 bits, on host inputs
    the dtype asked for."""
    from . import half as _h

    nb_cuda, cfg, _, _ = _modules()
    from .kernels import bf16_gemm_cuda as kb

    a_in = a  # the output's kind follows the caller's array (CuPy stays CuPy)
    a, host, a_proxy = _bf16_input(a, "a")
    if isinstance(b, _h.PackedWeightsFP16):
        msg = "b is packed float16 weights; use matmul_fp16, or pack_weights_bf16"
        raise TypeError(msg)
    packed = isinstance(b, _h.PackedWeightsBF16)
    if packed:
        b_shape = b.shape
        b_dev = _cuda.to_device(b._bits)
    else:
        if host != isinstance(b, np.ndarray):
            _cuda.use_cuda(a, b)  # raises the mixed host/device TypeError
        b, _, b_proxy = _bf16_input(b, "b")
        b_shape = tuple(b_proxy.shape)
    try:
        odt = np.dtype(out_dtype)
    except TypeError:
        odt = None
    if odt != np.dtype(np.float32):
        odt = _h._bf16_out_dtype(out_dtype)
    bf16_out = odt != np.dtype(np.float32)
    a_shape, b2, _ = _h._shapes(a_proxy, b_shape)
    if len(b2) > 2:
        msg = (
            f"the CUDA path takes a 2-D b (K, N) or PackedWeightsBF16, got shape "
            f"{b_shape}; batched b runs on the CPU (NumPy arrays) for now"
        )
        raise ValueError(msg)
    K, N = b2
    rows = math.prod(a_shape[:-1])
    bias_h = None if bias is None else _cuda.to_host(bias)
    bias_arr, has_bias = _h._bias(bias_h, N)
    lo, hi = v.activation_bounds(activation)
    a2 = _as_4d(a, host, (rows, K), "a")
    if not packed:
        b_dev = _as_4d(b, host, b2, "b")
    kdt = _U16 if bf16_out else np.dtype(np.float32)
    out_dev, out_ret = _out(a_in, host, (rows, N), kdt)
    if rows and N:
        kernel = kb.gemm_kernel(
            cfg.FP16_BLOCK_M, cfg.FP16_BLOCK_N, cfg.FP16_BLOCK_K,
            cfg.FP16_THREADS_M, cfg.FP16_THREADS_N, cfg.FP16_SMEM_PAD,
        )  # fmt: skip
        grid = (-(-rows // cfg.FP16_BLOCK_M), -(-N // cfg.FP16_BLOCK_N))
        kernel[grid, cfg.FP16_THREADS_M * cfg.FP16_THREADS_N](
            a2, b_dev, nb_cuda.to_device(bias_arr), bool(has_bias), np.float32(lo),
            np.float32(hi), bf16_out, out_dev,
        )  # fmt: skip
    shape = (*a_shape[:-1], N)
    if a_proxy.ndim == 1:
        shape = shape[1:]
    if len(b_shape) == 1:
        shape = shape[:-1]
    if host:
        return out_dev.copy_to_host().reshape(shape).view(odt)
    return out_ret.reshape(shape)


# ---------------------------------------------------------------------------
# below 8 bits (lowprec/nbits.py, kernels/nbits_cuda.py)

NBITS_WARPS = 4  # warps per thread block: one warp per output element


def _nbits_device(pk, codebook: bool):
    """The weights in MatMulNBits' layout on the device, built once per packed
    object from its quad planes: (b3, sc, zp, float table, int table, bs)."""
    if pk._dev is not None:
        return pk._dev
    from . import nbits as _n

    d = _cuda.to_device
    codes = _n._codes_from_planes(pk._wq, pk.bits)[: pk.N]
    bs = _n.CODEBOOK_ACT_BLOCK if codebook else pk.block_size
    nblk = codes.shape[1] // bs
    b3 = _n.pack_codes(codes.reshape(pk.N, nblk, bs), pk.bits)

    def per_col(x):  # (ng, J, G) -> (N, J)
        return np.ascontiguousarray(
            x.transpose(0, 2, 1).reshape(-1, x.shape[1])[: pk.N]
        )

    sc, zp = per_col(pk._sc), per_col(pk._zp)
    if not codebook and zp.shape[1] != sc.shape[1]:
        zp = np.ascontiguousarray(np.broadcast_to(zp, sc.shape))
    if codebook:
        ftab = pk._lut.reshape(-1, pk._lut.shape[2])[: pk.N]
        itab = pk._qlut.reshape(-1, pk._qlut.shape[2])[: pk.N]
    else:
        ftab = np.zeros((1, 1), np.float32)
        itab = np.zeros((1, 1), np.int32)
    pk._dev = (d(b3), d(sc), d(zp), d(ftab), d(itab), bs)
    return pk._dev


def nbits_cuda(pk, a, level: int, bias, codebook: bool):
    """``matmul_nbits`` / ``matmul_codebook`` on the GPU: float32 (..., N); the
    int8 path (level 4) gives the CPU's bits, the float path its bound."""
    nb_cuda, _, _, _ = _modules()
    from .kernels import nbits_cuda as kn

    x, host, proxy = _device_input(a, "a", (np.dtype(np.float32),),
                                   "pass a.astype(np.float32)")  # fmt: skip
    if proxy.ndim < 1 or proxy.shape[-1] != pk.K:
        msg = f"a must have shape (..., K) with K={pk.K}, got {tuple(proxy.shape)}"
        raise ValueError(msg)
    lead = tuple(proxy.shape[:-1])
    M = int(np.prod(lead, dtype=np.int64)) if lead else 1
    a2 = _as_4d(x, host, (M, pk.K), "a")
    b3, sc, zp, ftab, itab, bs = _nbits_device(pk, codebook)
    bvec = np.zeros(pk.N, np.float32) if bias is None else bias
    out_dev, out_ret = _out(a, host, (M, pk.N), np.float32)
    if M:
        threads = 32 * NBITS_WARPS
        grid = -(-(M * pk.N) // NBITS_WARPS)
        bits = pk.bits
        if level == 4:
            nblk = b3.shape[1]
            qa = nb_cuda.device_array((M, nblk * bs), np.int8)
            sa = nb_cuda.device_array((M, nblk), np.float32)
            qs = nb_cuda.device_array((M, nblk), np.float32)
            qgrid = -(-(M * nblk) // 128)
            bad = nb_cuda.to_device(np.zeros(1, np.int32))
            kn.quantize_blocks[qgrid, 128](a2, bs, qa, sa, qs, bad)
            if bad.copy_to_host()[0]:
                from .nbits import _finite

                _finite(False)
            kern = kn.nbits_int8_kernel(bits, bs, codebook, NBITS_WARPS)
            kern[grid, threads](
                qa, sa, qs, b3, sc, zp, itab, _cuda.to_device(bvec), out_dev
            )
        else:
            kern = kn.nbits_float_kernel(bits, bs, codebook, NBITS_WARPS)
            kern[grid, threads](a2, b3, sc, zp, ftab, _cuda.to_device(bvec), out_dev)
    shape = (*lead, pk.N)
    if host:
        return out_dev.copy_to_host().reshape(shape)
    return out_ret.reshape(shape)
