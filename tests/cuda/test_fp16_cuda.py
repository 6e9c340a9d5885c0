"""matmul_fp16_cuda / conv_fp16_cuda. The GEMM sums in lowprec.half's order, so
it must give the CPU matmul_fp16's bits (and lie within the float64 bound); the
convolution sums in the CPU conv_fp16's order (i, j, c), so it must give its
bits too, and lie within the float64 im2col reference's bound

    |y - exact| <= gamma_{K+1} * (sum_k |x w| + |bias|),  gamma_n = n u / (1 - n u)

with u = 2**-24 (K float32 additions of exact products, one bias add); its
float16 output must be the float32 output rounded once."""

import numpy as np
import pytest

import lowprec
from lowprec import cuda_ops

pytestmark = pytest.mark.cuda_exec
U = 2.0**-24


def _dev(x):
    from numba import cuda

    return cuda.to_device(x)


def _host(x):
    return x.copy_to_host() if hasattr(x, "copy_to_host") else x


def _gamma(n):
    return n * U / (1 - n * U)


@pytest.mark.parametrize("out_dtype", [np.float32, np.float16])
def test_matmul_fp16_bits_equal_cpu(small_tiles, out_dtype):
    rng = np.random.default_rng(4)
    a = rng.standard_normal((13, 11)).astype(np.float16)
    b = rng.standard_normal((11, 9)).astype(np.float16)
    bias = rng.standard_normal(9).astype(np.float32)
    kw = {"bias": bias, "activation": (-2.0, 3.0), "out_dtype": out_dtype}
    got = cuda_ops.matmul_fp16_cuda(_dev(a), _dev(b), **kw)
    assert not isinstance(got, np.ndarray)
    got = _host(got)
    assert got.dtype == out_dtype
    cpu = lowprec.matmul_fp16(a, b, **kw)
    bits = np.uint16 if out_dtype == np.float16 else np.uint32
    np.testing.assert_array_equal(got.view(bits), cpu.view(bits))
    # and the float64 bound, without clamp
    plain = _host(cuda_ops.matmul_fp16_cuda(_dev(a), _dev(b)))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    err = np.abs(plain - a64 @ b64)
    assert np.all(err <= _gamma(11) * (np.abs(a64) @ np.abs(b64)))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf/NaN in the simulator
def test_matmul_fp16_shapes_packed_specials(small_tiles):
    rng = np.random.default_rng(8)
    a = rng.standard_normal((2, 3, 7)).astype(np.float16)
    b = rng.standard_normal((7, 5)).astype(np.float16)
    a[0, 1, 2] = np.inf
    b[3, 4] = np.nan
    got = cuda_ops.matmul_fp16_cuda(a, b)  # host in -> host out, N-D a
    assert isinstance(got, np.ndarray)
    assert got.shape == (2, 3, 5)
    np.testing.assert_array_equal(got, lowprec.matmul_fp16(a, b))  # NaN == NaN here
    packed = lowprec.pack_weights_fp16(b)
    np.testing.assert_array_equal(
        cuda_ops.matmul_fp16_cuda(a[0, 0], packed, activation="relu"),
        lowprec.matmul_fp16(a[0, 0], packed, activation="relu"),
    )
    np.testing.assert_array_equal(
        cuda_ops.matmul_fp16_cuda(a[1], b[:, 0], out_dtype=np.float16),
        lowprec.matmul_fp16(a[1], b[:, 0], out_dtype=np.float16),
    )
    big = np.full((3, 4), 300.0, np.float16)  # 4 * 300^2 overflows float16
    got = cuda_ops.matmul_fp16_cuda(big, big.T.copy(), out_dtype=np.float16)
    assert np.all(np.isinf(got))
    # routing through the public function, strided device view
    d = _dev(rng.standard_normal((9, 14)).astype(np.float16))
    got = lowprec.matmul_fp16(d[:, ::2], _dev(b))
    np.testing.assert_array_equal(
        _host(got), lowprec.matmul_fp16(d.copy_to_host()[:, ::2], b)
    )
    with pytest.raises(TypeError, match="mixed host"):
        lowprec.matmul_fp16(_dev(a[0]), b)
    with pytest.raises(ValueError, match="batched b"):
        cuda_ops.matmul_fp16_cuda(a, np.stack([b, b]))
    with pytest.raises(TypeError, match="a must have dtype"):
        cuda_ops.matmul_fp16_cuda(_dev(a.astype(np.float32)), _dev(b))


def _conv_ref(x, w, bias, group, strides, dilations, pads):
    """float64 ONNX Conv (NCHW) by im2col, and sum |x w| + |bias| per output."""
    N, C, H, W = x.shape
    M, Cg, kh, kw = w.shape
    (sh, sw), (dh, dw) = strides, dilations
    pt, pl, pb, pr = pads
    xp = np.zeros((N, C, H + pt + pb, W + pl + pr))
    xp[:, :, pt : pt + H, pl : pl + W] = x
    Ho = (xp.shape[2] - (kh - 1) * dh - 1) // sh + 1
    Wo = (xp.shape[3] - (kw - 1) * dw - 1) // sw + 1
    Mg = M // group
    y = np.zeros((N, M, Ho, Wo))
    mag = np.zeros((N, M, Ho, Wo))
    for g in range(group):
        cols = np.empty((N, Ho, Wo, Cg, kh, kw))
        for i in range(kh):
            for j in range(kw):
                cols[..., i, j] = xp[
                    :, g * Cg : (g + 1) * Cg,
                    i * dh : i * dh + (Ho - 1) * sh + 1 : sh,
                    j * dw : j * dw + (Wo - 1) * sw + 1 : sw,
                ].transpose(0, 2, 3, 1)  # fmt: skip
        cols = cols.reshape(N * Ho * Wo, -1)
        wg = w[g * Mg : (g + 1) * Mg].reshape(Mg, -1).astype(np.float64).T
        part = (cols @ wg).reshape(N, Ho, Wo, Mg).transpose(0, 3, 1, 2)
        y[:, g * Mg : (g + 1) * Mg] = part
        mag[:, g * Mg : (g + 1) * Mg] = (
            (np.abs(cols) @ np.abs(wg)).reshape(N, Ho, Wo, Mg).transpose(0, 3, 1, 2)
        )
    if bias is not None:
        y += bias.astype(np.float64).reshape(1, M, 1, 1)
        mag += np.abs(bias.astype(np.float64)).reshape(1, M, 1, 1)
    return y, mag


@pytest.mark.parametrize(
    ("xs", "ws", "group", "strides", "dilations", "pads"),
    [
        ((2, 3, 5, 6), (5, 3, 3, 3), 1, (1, 1), (1, 1), (1, 1, 1, 1)),
        ((1, 4, 6, 5), (6, 2, 2, 3), 2, (2, 1), (1, 2), (0, 2, 1, 0)),
        ((1, 3, 4, 4), (3, 1, 3, 3), 3, (1, 1), (1, 1), (1, 1, 1, 1)),  # depthwise
    ],
)
def test_conv_fp16_within_bound(small_tiles, xs, ws, group, strides, dilations, pads):
    rng = np.random.default_rng(len(xs) + group)
    x = rng.standard_normal(xs).astype(np.float16)
    w = rng.standard_normal(ws).astype(np.float16)
    bias = rng.standard_normal(ws[0]).astype(np.float16)
    kw = {"group": group, "strides": strides, "dilations": dilations, "pads": pads}
    got = cuda_ops.conv_fp16_cuda(_dev(x), _dev(w), bias, **kw)
    assert not isinstance(got, np.ndarray)
    got = _host(got)
    want, mag = _conv_ref(x, w, bias, group, strides, dilations, pads)
    assert got.dtype == np.float32
    assert got.shape == want.shape
    K = ws[1] * ws[2] * ws[3]
    assert np.all(np.abs(got - want) <= _gamma(K + 1) * mag)
    np.testing.assert_array_equal(got, lowprec.conv_fp16(x, w, bias, **kw))
    g16 = cuda_ops.conv_fp16_cuda(x, w, bias, out_dtype=np.float16, **kw)
    np.testing.assert_array_equal(g16, got.astype(np.float16))
    # prepacked weights, through the public function
    pk = lowprec.pack_conv_weights_fp16(w, group=group)
    np.testing.assert_array_equal(
        _host(lowprec.conv_fp16(_dev(x), pk, bias, **kw)), got
    )
    np.testing.assert_array_equal(lowprec.conv_fp16(x, pk, bias, device="cuda", **kw),
                                  got)  # fmt: skip


def test_conv_fp16_order_is_the_cpus(small_tiles):
    # 4096 * 4096 - 4096 * 4096 + 1 + 1: (i, j, c) order gives 1 (the CPU's),
    # (c, i, j) order 2
    x = np.array([[[[4096.0, 4096.0]], [[1.0, 1.0]]]], np.float16)
    w = np.array([[[[4096.0, -4096.0]], [[1.0, 1.0]]]], np.float16)
    want = lowprec.conv_fp16(x, w)
    assert want.ravel()[0] == 1.0
    np.testing.assert_array_equal(lowprec.conv_fp16(x, w, device="cuda"), want)


def test_conv_fp16_1d_auto_pad_activation_errors(small_tiles):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 3, 9)).astype(np.float16)
    w = rng.standard_normal((4, 3, 3)).astype(np.float16)
    got = cuda_ops.conv_fp16_cuda(x, w, auto_pad="SAME_LOWER", strides=[2],
                                  activation="relu")  # fmt: skip
    # SAME_LOWER, 9 -> 5 outputs, total pad 2*4+3-9 = 2: one each side
    want, mag = _conv_ref(x[:, :, None], w[:, :, None], None, 1, (1, 2), (1, 1),
                          (0, 1, 0, 1))  # fmt: skip
    want, mag = want[:, :, 0], mag[:, :, 0]
    assert got.shape == (2, 4, 5)
    assert np.all(np.abs(got - np.maximum(want, 0)) <= _gamma(10) * mag)
    with pytest.raises(ValueError, match="C must be"):
        cuda_ops.conv_fp16_cuda(x, w, group=3)
    with pytest.raises(TypeError, match="w must have dtype"):
        cuda_ops.conv_fp16_cuda(x, w.astype(np.float32))
    with pytest.raises(ValueError, match="larger than the padded"):
        cuda_ops.conv_fp16_cuda(x[:, :, :2], w)
