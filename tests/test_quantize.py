"""quantize_linear / dequantize_linear / dynamic_quantize_linear against the oracle."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lowprec
import reference as ref

QTYPES = [np.uint8, np.int8, np.uint16, np.int16]


@st.composite
def quant_case(draw):
    """x, scale, zero point and layout for one QuantizeLinear call."""
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x_dtype = draw(st.sampled_from([np.float32, np.float16]))
    s_dtype = draw(st.sampled_from([np.float32, np.float16]))
    q_dtype = draw(st.sampled_from(QTYPES))
    mode = draw(st.sampled_from(["tensor", "axis", "block"]))
    axis = draw(st.integers(-ndim, ndim - 1))
    ax = axis % ndim
    block = draw(st.integers(1, 4)) if mode == "block" else 0
    if mode == "tensor":
        s_shape = draw(st.sampled_from([(), (1,)]))
    elif mode == "axis":
        s_shape = (shape[ax],)
    else:
        s_shape = tuple(-(-d // block) if i == ax else d for i, d in enumerate(shape))
    # tiny and huge scales (within float16's normal range when that is the type)
    log_lo, log_hi = (-6, 3) if s_dtype == np.float16 else (-30, 30)
    scale = (10.0 ** rng.uniform(log_lo, log_hi, s_shape)).astype(s_dtype)
    info = np.iinfo(q_dtype)
    zp = rng.integers(info.min, info.max, s_shape, endpoint=True).astype(q_dtype)
    if draw(st.booleans()):  # zero points at the ends of their range
        zp = np.full(s_shape, draw(st.sampled_from([info.min, info.max])), q_dtype)
    # values around the representable range, plus exact ties k + 1/2 steps
    full_scale = ref.expand_param(scale, shape, ax, block).astype(np.float64)
    steps = rng.integers(-400, 400, shape) + rng.choice([0.0, 0.5, 0.25], shape)
    with np.errstate(over="ignore"):  # float16 overflow to inf is a valid input
        x = (steps * full_scale).astype(x_dtype)
    if draw(st.booleans()):
        x = rng.normal(0, 1e3, shape).astype(x_dtype)
    return x, scale, zp, ax if mode != "tensor" else axis, block, q_dtype


@given(quant_case())
def test_quantize_matches_oracle(case):
    x, scale, zp, axis, block, q_dtype = case
    x_before, s_before, z_before = x.copy(), scale.copy(), zp.copy()
    got = lowprec.quantize_linear(x, scale, zp, axis=axis, block_size=block)
    want = ref.quantize(x, scale, zp, q_dtype, axis % x.ndim, block)
    assert got.dtype == q_dtype
    np.testing.assert_array_equal(got, want)
    # inputs are never modified
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(scale, s_before)
    np.testing.assert_array_equal(zp, z_before)


@given(quant_case())
def test_dequantize_matches_oracle(case):
    x_f, scale, zp, axis, block, q_dtype = case
    rng = np.random.default_rng(0)
    info = np.iinfo(q_dtype)
    x = rng.integers(info.min, info.max, x_f.shape, endpoint=True).astype(q_dtype)
    got = lowprec.dequantize_linear(x, scale, zp, axis=axis, block_size=block)
    want = ref.dequantize(x, scale, zp, axis % x.ndim, block)
    assert got.dtype == scale.dtype
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def test_round_half_to_even_and_saturation():
    x = np.array(
        [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, -128.5, 1e9], np.float32
    )
    got = lowprec.quantize_linear(x, np.float32(1), np.int8(0))
    np.testing.assert_array_equal(got, [0, 2, 2, 0, -2, -2, 126, 127, -128, 127])


def _near_ties(s, kmax=300, ulps=3):
    """float32 x at and within `ulps` of (k + 1/2) * s: the quotients whose
    rounding to an integer a quotient one ulp off would change."""
    x0 = ((np.arange(-kmax, kmax) + 0.5) * np.float64(s)).astype(np.float32)
    xs, up, dn = [x0], x0, x0
    for _ in range(ulps):
        up = np.nextafter(up, np.float32(np.inf))
        dn = np.nextafter(dn, np.float32(-np.inf))
        xs += [up, dn]
    return np.concatenate(xs)


@pytest.mark.parametrize("q_dtype", QTYPES)
@pytest.mark.parametrize(
    "scale", [0.02, 1 / 255, 0.1, 3.0, 0.007, 1.7, 2.0**-110, 2.0**110]
)
def test_per_tensor_quotients_near_ties(scale, q_dtype):
    """The per-tensor kernel's vector loop (kernels/quantize._quantize_vec:
    no division between 2**-100 and 2**100) on quotients next to half-integers,
    with NaN, infinities, zeros, a subnormal and huge values inside its
    64-element steps and a scalar tail: the float32 division's bits. The set
    has teeth: x * fl32(1 / scale) rounds differently on some of them."""
    s = np.float32(scale)
    x = _near_ties(s)
    specials = np.array(
        [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, 3e38, -3e38], np.float32
    )
    x = np.concatenate([x[:1000], specials, x[1000:], specials[:5]])
    assert x.size % 64 != 0
    info = np.iinfo(q_dtype)
    zp = q_dtype(info.min + 3 if info.min < 0 else 3)
    got = lowprec.quantize_linear(x, s, zp)
    np.testing.assert_array_equal(got, ref.quantize(x, s, zp, q_dtype, 0))
    if 2.0**-100 <= scale <= 2.0**100 and scale != 1 / 255:
        with np.errstate(all="ignore"):
            naive = np.rint(x * (np.float32(1) / s))
            exact = np.rint(x / s)
        assert (naive != exact).any()


def test_nan_and_inf_are_defined():
    # +inf / -inf saturate; NaN maps to the zero point (docs/quantization.md)
    x = np.array([np.inf, -np.inf, np.nan, 1.0], np.float32)
    got = lowprec.quantize_linear(x, np.float32(0.5), np.uint8(7))
    np.testing.assert_array_equal(got, [255, 0, 7, 9])
    got16 = lowprec.quantize_linear(x.astype(np.float16), np.float16(0.5), np.int16(-3))
    np.testing.assert_array_equal(got16, [32767, -32768, -3, -1])


def test_python_scalars_and_default_type():
    got = lowprec.quantize_linear(np.array([1.0, -1.0], np.float32), 0.25)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, [4, 0])
    got = lowprec.quantize_linear(
        np.array([1.0], np.float32), 0.25, output_dtype=np.int8
    )
    assert got.dtype == np.int8


def test_dequantize_int32():
    x = np.array([2**31 - 1, -(2**31), 12345], np.int32)
    got = lowprec.dequantize_linear(x, np.float32(0.5))
    want = (x.astype(np.float32) * np.float32(0.5)).astype(np.float32)
    np.testing.assert_array_equal(got, want)


def _dynamic_oracle(x):
    # ONNX DynamicQuantizeLinear, eq. 3, in float32 scalars
    maxx = np.float32(max(0.0, float(x.max()))) if x.size else np.float32(0)
    minx = np.float32(min(0.0, float(x.min()))) if x.size else np.float32(0)
    rng = np.float32(1.0) if maxx == minx else np.float32(maxx - minx)
    scale = np.float32(rng / np.float32(255))
    zp = np.rint(np.clip(np.float32(0) - minx / scale, 0, 255))
    y = np.clip(np.rint(x / scale) + zp, 0, 255).astype(np.uint8)
    return y, scale, np.uint8(zp)


@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 300),
    st.sampled_from(["mixed", "positive", "negative", "zeros", "tiny"]),
)
def test_dynamic_quantize_matches_oracle(seed, n, kind):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 10, n).astype(np.float32)
    if kind == "positive":
        x = np.abs(x)
    elif kind == "negative":
        x = -np.abs(x)
    elif kind == "zeros":
        x = np.zeros(n, np.float32)
    elif kind == "tiny":
        x = x * np.float32(1e-30)
    y, s, z = lowprec.dynamic_quantize_linear(x)
    wy, ws, wz = _dynamic_oracle(x)
    np.testing.assert_array_equal(y, wy)
    assert (s.dtype, s.shape, s) == (np.float32, (), ws)
    assert (z.dtype, z.shape, z) == (np.uint8, (), wz)


@pytest.mark.parametrize("block", [7, 1 << 16])
def test_min_max_kernel_matches_numpy(block):
    # the kernel reduces order-preserving integer keys of the float bits
    from lowprec.kernels import quantize as kq

    rng = np.random.default_rng(5)
    f32 = np.finfo(np.float32)
    specials = [0.0, -0.0, f32.tiny / 4, -f32.tiny / 4, f32.max, -f32.max, 1.5, -2.5]
    for n in (1, 2, 15, 100):
        for _ in range(20):
            x = rng.choice(np.array(specials, np.float32), n)
            mask = rng.random(n) < 0.5
            x[mask] = rng.normal(0, 1e3, mask.sum()).astype(np.float32)
            for lo, hi, finite in (kq.min_max(x, block), kq.min_max_serial(x)):
                assert finite
                assert (lo, hi) == (x.min(), x.max())
            # the non-finite test reads the extreme keys: NaN of either sign
            x[rng.integers(n)] = rng.choice([np.nan, -np.nan, np.inf, -np.inf])
            assert not kq.min_max(x, block)[2]
            assert not kq.min_max_serial(x)[2]


# one call on this thread (<= 32768 elements), serial blocks, parallel
# quantization blocks, parallel min/max blocks (> 2**18)
SIZES = [3, 40_000, 70_000, 300_000]


@pytest.mark.parametrize("n", SIZES)
def test_dynamic_quantize_every_size_path(n):
    x = np.random.default_rng(n).normal(0, 3, n).astype(np.float32)
    y, s, z = lowprec.dynamic_quantize_linear(x)
    wy, ws, wz = _dynamic_oracle(x)
    np.testing.assert_array_equal(y, wy)
    assert (s, z) == (ws, wz)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_dynamic_quantize_rejects_non_finite(bad, n):
    x = np.ones(n, np.float32)
    x[n // 2] = bad
    with pytest.raises(ValueError, match="finite"):
        lowprec.dynamic_quantize_linear(x)


@pytest.mark.parametrize("n", SIZES)
def test_dynamic_quantize_rejects_unrepresentable_range(n):
    # max - min overflows float32: no finite scale
    x = np.zeros(n, np.float32)
    x[0], x[-1] = np.finfo(np.float32).max, -np.finfo(np.float32).max
    with pytest.raises(ValueError, match="finite float32 scale"):
        lowprec.dynamic_quantize_linear(x)


def test_views_and_negative_strides():
    # non-contiguous and reversed views quantize like their contiguous copies
    rng = np.random.default_rng(3)
    base = rng.normal(0, 4, (6, 10)).astype(np.float32)
    scale = np.linspace(0.1, 1.0, 5).astype(np.float32)
    zp = np.arange(5, dtype=np.int8)
    for view in (base[:, ::2], base[::-1, 1::2], base.T[::2, :5].T):
        got = lowprec.quantize_linear(view, scale, zp, axis=1)
        want = ref.quantize(np.ascontiguousarray(view), scale, zp, np.int8, 1, 0)
        np.testing.assert_array_equal(got, want)
        q = want[:, ::-1]
        np.testing.assert_array_equal(
            lowprec.dequantize_linear(q, scale[::-1], zp[::-1], axis=1),
            ref.dequantize(np.ascontiguousarray(q), scale[::-1], zp[::-1], 1, 0),
        )


def test_quantize_argument_forms():
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    # ONNX type codes, as Python or numpy ints; others named in the error
    want = lowprec.quantize_linear(x, np.float32(0.5), np.int8(0))
    for code in (3, np.int32(3), np.int64(3)):
        got = lowprec.quantize_linear(x, np.float32(0.5), output_dtype=code)
        assert got.dtype == np.int8
        np.testing.assert_array_equal(got, want)
    for code in (6, 21):
        with pytest.raises(ValueError, match=r"supported ONNX type code; use one of 2"):
            lowprec.quantize_linear(x, np.float32(0.5), output_dtype=code)
    # block_size as a numpy integer, as axis may be
    s = np.full((2, 2), 0.5, np.float32)
    np.testing.assert_array_equal(
        lowprec.quantize_linear(x, s, block_size=np.int64(2), axis=1),
        lowprec.quantize_linear(x, s, block_size=2, axis=1),
    )
    # a 0-d x with a per-axis scale: the message says so
    with pytest.raises(ValueError, match="must be a scalar for a 0-d input"):
        lowprec.quantize_linear(np.array(1.0, np.float32), np.ones(2, np.float32))
