"""conv_integer_cuda / qlinear_conv_cuda against an int64 oracle (im2col with
zero-point padding into tests/reference.py's GEMM oracle) and, bit for bit,
against the CPU functions. Simulator-sized shapes (tests/cuda/conftest.py)."""

import numpy as np
import pytest

import lowprec
import reference as ref
from lowprec import cuda_ops

pytestmark = pytest.mark.cuda_exec


def _rand(rng, shape, dtype):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)


def _dev(x):
    from numba import cuda

    return cuda.to_device(x)


def _host(x):
    return x.copy_to_host() if hasattr(x, "copy_to_host") else x


def _im2col(x, zx, kshape, strides, dilations, pads):
    """(N*Ho*Wo, C*kh*kw) patches of NCHW x padded with the zero point (ONNX:
    padding is real 0, i.e. the zero point), columns in (c, i, j) order."""
    N, C, H, W = x.shape
    kh, kw = kshape
    (sh, sw), (dh, dw) = strides, dilations
    pt, pl, pb, pr = pads
    xp = np.full((N, C, H + pt + pb, W + pl + pr), zx, x.dtype)
    xp[:, :, pt : pt + H, pl : pl + W] = x
    Ho = (H + pt + pb - (kh - 1) * dh - 1) // sh + 1
    Wo = (W + pl + pr - (kw - 1) * dw - 1) // sw + 1
    cols = np.empty((N, Ho, Wo, C, kh, kw), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[..., i, j] = xp[
                :, :, i * dh : i * dh + (Ho - 1) * sh + 1 : sh,
                j * dw : j * dw + (Wo - 1) * sw + 1 : sw,
            ].transpose(0, 2, 3, 1)  # fmt: skip
    return cols.reshape(N * Ho * Wo, C * kh * kw), (N, Ho, Wo)


def _oracle(x, w, zx, zw, group, strides, dilations, pads, **qkw):
    """NCHW int32 (qkw empty) or requantized output from reference.py."""
    M, Cg, kh, kw = w.shape
    Mg = M // group
    outs = []
    for g in range(group):
        cols, (N, Ho, Wo) = _im2col(
            x[:, g * Cg : (g + 1) * Cg], zx, (kh, kw), strides, dilations, pads
        )
        wg = w[g * Mg : (g + 1) * Mg].reshape(Mg, -1).T
        zwg = zw if np.size(zw) == 1 else zw[g * Mg : (g + 1) * Mg]
        if not qkw:
            outs.append(ref.int_matmul(cols, wg, zx, zwg))
            continue
        q = dict(qkw)
        sw = q.pop("w_scale")
        swg = sw if np.size(sw) == 1 else sw[g * Mg : (g + 1) * Mg]
        bias = q.pop("bias", None)
        q["bias"] = None if bias is None else bias[g * Mg : (g + 1) * Mg]
        outs.append(
            ref.qlinear_matmul(
                cols,
                q.pop("x_scale"),
                zx,
                wg,
                swg,
                zwg,
                q.pop("y_scale"),
                q.pop("y_zero_point"),
                **q,
            )  # fmt: skip
        )
    y = np.concatenate(outs, axis=1).reshape(N, Ho, Wo, M)
    return np.ascontiguousarray(y.transpose(0, 3, 1, 2))


CASES = [
    # (N, C, H, W), (M, kh, kw), group, strides, dilations, pads
    ((2, 3, 5, 6), (5, 3, 3), 1, (1, 1), (1, 1), (1, 1, 1, 1)),
    ((1, 4, 6, 5), (6, 2, 3), 2, (2, 1), (1, 2), (0, 2, 1, 0)),
    ((1, 9, 3, 4), (3, 1, 1), 1, (1, 1), (1, 1), (0, 0, 0, 0)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize(("x_dt", "w_dt"), [(np.uint8, np.int8), (np.int8, np.uint8)])
def test_conv_integer_matches_oracle_and_cpu(small_tiles, case, x_dt, w_dt):
    xs, (M, kh, kw), group, strides, dilations, pads = CASES[case]
    rng = np.random.default_rng([case, x_dt == np.int8])
    x = _rand(rng, xs, x_dt)
    w = _rand(rng, (M, xs[1] // group, kh, kw), w_dt)
    zx = _rand(rng, (), x_dt)[()]
    zw = _rand(rng, (M,), w_dt)  # per output channel
    kw_ = {"group": group, "strides": strides, "dilations": dilations, "pads": pads}
    got = cuda_ops.conv_integer_cuda(_dev(x), _dev(w), zx, zw, **kw_)
    assert not isinstance(got, np.ndarray)
    got = _host(got)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, lowprec.conv_integer(x, w, zx, zw, **kw_))
    want = _oracle(x, w, zx, zw, group, strides, dilations, pads)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize(
    ("out_kind", "activation"),
    [("uint8", "relu"), ("int8", None), ("float32", "relu6")],
)
def test_qlinear_conv_bit_identical(small_tiles, layout, out_kind, activation):
    rng = np.random.default_rng([3, layout == "NHWC", len(out_kind)])
    x = _rand(rng, (2, 4, 5, 4), np.uint8)
    w = _rand(rng, (6, 2, 3, 2), np.int8)
    zw = np.zeros(6, np.int8)
    zw[1] = 3  # asymmetric per-channel weight zero point: row sums needed
    sw = rng.uniform(0.005, 0.05, 6).astype(np.float32)
    bias = rng.integers(-2000, 2000, 6).astype(np.int32)
    zy = {"uint8": np.uint8(90), "int8": np.int8(-7), "float32": None}[out_kind]
    kw = {"group": 2, "strides": (1, 2), "pads": (1, 0, 2, 1), "bias": bias,
          "activation": activation}  # fmt: skip
    if out_kind == "float32":
        kw["out_dtype"] = np.float32
    args = (np.float32(0.05), np.uint8(120))
    xin = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    got = _host(
        cuda_ops.qlinear_conv_cuda(
            _dev(xin), *args, w, sw, zw, np.float32(0.2), zy, layout=layout, **kw
        )
    )
    cpu = lowprec.qlinear_conv(
        xin, *args, w, sw, zw, np.float32(0.2), zy, layout=layout, **kw
    )
    assert got.dtype == cpu.dtype
    np.testing.assert_array_equal(got, cpu)
    want = _oracle(
        x, w, np.uint8(120), zw, 2, (1, 2), (1, 1), (1, 0, 2, 1), x_scale=args[0],
        w_scale=sw, y_scale=np.float32(0.2), y_zero_point=zy, bias=bias,
        activation=activation, out_dtype=kw.get("out_dtype"),
    )  # fmt: skip
    if layout == "NHWC":
        want = want.transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_depthwise_and_1d(small_tiles, layout):
    rng = np.random.default_rng(9)
    x = _rand(rng, (1, 5, 4, 5), np.int8)
    w = _rand(rng, (5, 1, 3, 3), np.int8)
    zw = _rand(rng, (5,), np.int8)
    sw = rng.uniform(0.01, 0.05, 5).astype(np.float32)
    args = (np.float32(0.03), np.int8(-4), w, sw, zw, np.float32(0.1), np.int8(3))
    kw = {"group": 5, "pads": (1, 1, 1, 1), "strides": (2, 1), "layout": layout}
    xin = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    got = cuda_ops.qlinear_conv_cuda(xin, *args, **kw)  # host in -> host out
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, lowprec.qlinear_conv(xin, *args, **kw))
    # the same depthwise conv as int32
    ci = cuda_ops.conv_integer_cuda(x, w, np.int8(-4), zw, group=5, pads=(1,) * 4)
    np.testing.assert_array_equal(
        ci, _oracle(x, w, np.int8(-4), zw, 5, (1, 1), (1, 1), (1, 1, 1, 1))
    )
    # 1-D convolution with SAME_UPPER padding and a packed weight
    x1 = _rand(rng, (2, 3, 7), np.uint8)
    w1 = _rand(rng, (4, 3, 3), np.uint8)
    packed = lowprec.pack_conv_weights(w1, np.uint8(128), np.float32(0.02))
    a1 = (np.float32(0.1), np.uint8(7), packed, None, None, np.float32(0.3),
          np.uint8(0))  # fmt: skip
    got = cuda_ops.qlinear_conv_cuda(_dev(x1), *a1, auto_pad="SAME_UPPER", strides=[2])
    np.testing.assert_array_equal(
        _host(got), lowprec.qlinear_conv(x1, *a1, auto_pad="SAME_UPPER", strides=[2])
    )


def test_conv_errors_and_routing(small_tiles):
    x = np.zeros((1, 2, 4, 4), np.uint8)
    w = np.zeros((3, 2, 3, 3), np.int8)
    with pytest.raises(ValueError, match="w expects"):
        cuda_ops.conv_integer_cuda(_dev(x), np.zeros((4, 2, 3, 3), np.int8), group=2)
    with pytest.raises(TypeError, match="x must have dtype"):
        cuda_ops.conv_integer_cuda(_dev(x.astype(np.int16)), w)
    with pytest.raises(ValueError, match="larger than the padded"):
        cuda_ops.conv_integer_cuda(_dev(x[:, :, :2, :2].copy()), w)
    rng = np.random.default_rng(2)
    x = _rand(rng, (1, 2, 4, 4), np.uint8)
    w = _rand(rng, (3, 2, 2, 2), np.int8)
    want = lowprec.conv_integer(x, w, np.uint8(5))
    got = lowprec.conv_integer(_dev(x), w, np.uint8(5))
    assert not isinstance(got, np.ndarray)
    np.testing.assert_array_equal(_host(got), want)
    got = lowprec.conv_integer(x, w, np.uint8(5), device="cuda")
    np.testing.assert_array_equal(got, want)
    args = (np.float32(0.1), np.uint8(5), w, np.float32(0.01), None,
            np.float32(0.2), np.uint8(3))  # fmt: skip
    np.testing.assert_array_equal(
        _host(lowprec.qlinear_conv(_dev(x), *args)), lowprec.qlinear_conv(x, *args)
    )
