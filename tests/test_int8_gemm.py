"""matmul_integer / qlinear_matmul / pack_weights against the int64 oracle,
on every instruction-set path this CPU supports: the `isa` fixture for example
tests, a drawn path per example (conftest.ISAS) for the property tests, so their
>= 200 examples per op are spread over all paths instead of repeated per path."""

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lowprec
import reference as ref
from lowprec import gemm
from lowprec.kernels import config

INT8 = [np.uint8, np.int8]

# drawn per example by the property tests: every path this CPU supports, each in
# about 1/n of the examples (the `use_isa` fixture forces it and restores)
ISAS = st.sampled_from(lowprec.available_isas())


def _rand(rng, shape, dtype, extreme=False):
    info = np.iinfo(dtype)
    if extreme:  # only the ends of the range: largest products, sign flips
        return rng.choice(np.array([info.min, info.max], dtype), shape)
    return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)


def _view(rng, x, kind):
    """The same values as x, laid out as a non-contiguous or reversed view."""
    if kind == "transposed":
        return np.ascontiguousarray(x.swapaxes(-1, -2)).swapaxes(-1, -2)
    if kind == "reversed":
        return np.ascontiguousarray(x[..., ::-1])[..., ::-1]
    if kind == "strided":
        big = np.zeros((*x.shape[:-1], 2 * x.shape[-1]), x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    return x


@st.composite
def gemm_case(draw):
    # sizes straddle every tile edge: 1, primes, and just past powers of two
    dims = st.sampled_from([1, 2, 3, 4, 5, 7, 13, 16, 17, 31, 33, 64, 65, 100])
    M, K, N = draw(dims), draw(dims), draw(dims)
    a_dt, b_dt = draw(st.sampled_from(INT8)), draw(st.sampled_from(INT8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    extreme = draw(st.booleans())
    a = _rand(rng, (M, K), a_dt, extreme)
    b = _rand(rng, (K, N), b_dt, extreme)
    za_kind = draw(st.sampled_from(["none", "scalar", "row", "min", "max"]))
    zb_kind = draw(st.sampled_from(["none", "scalar", "col", "min", "max"]))

    def zp(kind, dtype, n):
        info = np.iinfo(dtype)
        return {
            "none": None,
            "scalar": _rand(rng, (), dtype),
            "row": _rand(rng, (n,), dtype),
            "col": _rand(rng, (n,), dtype),
            "min": dtype(info.min),
            "max": dtype(info.max),
        }[kind]

    za = zp(za_kind, a_dt, M)
    zb = zp(zb_kind, b_dt, N)
    a = _view(rng, a, draw(st.sampled_from(["c", "transposed", "reversed", "strided"])))
    b = _view(rng, b, draw(st.sampled_from(["c", "transposed", "reversed", "strided"])))
    return a, b, za, zb, rng


@pytest.fixture
def serial_or_parallel(monkeypatch):
    """Lets a test pick the single-threaded or the prange driver for any size."""

    def choose(parallel):
        monkeypatch.setattr(gemm, "SERIAL_MACS", 0 if parallel else 1 << 62)

    return choose


@given(gemm_case(), st.booleans(), ISAS)
def test_matmul_integer_matches_oracle(
    use_isa, serial_or_parallel, case, parallel, isa
):
    a, b, za, zb, _ = case
    use_isa(isa)
    serial_or_parallel(parallel)
    before = (a.copy(), b.copy())
    got = lowprec.matmul_integer(a, b, za, zb)
    want = ref.int_matmul(a, b, za, zb)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(a, before[0])
    np.testing.assert_array_equal(b, before[1])
    packed = lowprec.pack_weights(b, zb)
    np.testing.assert_array_equal(lowprec.matmul_integer(a, packed, za), want)


@given(
    gemm_case(),
    st.sampled_from([None, np.uint8, np.int8, np.float32]),
    st.sampled_from([None, "relu", "relu6", (-1.5, 2.0), (-0.3, 0.7)]),
    st.booleans(),
    st.booleans(),
    st.sampled_from([np.float32, np.float16]),
    st.booleans(),
    ISAS,
)
def test_qlinear_matmul_matches_oracle(
    use_isa, serial_or_parallel, case, out, act, per_row, per_col, s_dt, parallel, isa
):
    a, b, za, zb, rng = case
    use_isa(isa)
    serial_or_parallel(parallel)
    M, N = a.shape[0], b.shape[1]
    if za is None:
        za = a.dtype.type(0)
    if zb is None:
        zb = b.dtype.type(0)
    lo, hi = (-4, 1) if s_dt == np.float16 else (-8, 3)
    sa = (10.0 ** rng.uniform(lo, hi, (M,) if per_row else ())).astype(s_dt)
    sb = (10.0 ** rng.uniform(lo, hi, (N,) if per_col else ())).astype(s_dt)
    if np.ndim(za) == 1 and not per_row:
        za = za[0]
    if np.ndim(zb) == 1 and not per_col:
        zb = zb[0]
    if per_row and np.ndim(za) == 0:
        za = np.full(M, za, a.dtype)
    if per_col and np.ndim(zb) == 0:
        zb = np.full(N, zb, b.dtype)
    # a y_scale near the typical accumulator magnitude keeps outputs unsaturated
    typical = float(np.sqrt(a.shape[1])) * 64 * float(np.max(sa)) * float(np.max(sb))
    # (no smaller than float16's least normal: a y_scale that rounds to 0 is
    # rejected, as it should be)
    sy = np.asarray(max(typical / 64 * rng.uniform(0.5, 2), 2.0**-14), s_dt)
    y_dt = np.int8 if out is None and rng.random() < 0.5 else np.uint8
    zy = y_dt(rng.integers(np.iinfo(y_dt).min, np.iinfo(y_dt).max, endpoint=True))
    bias = (
        rng.integers(-(2**20), 2**20, N).astype(np.int32)
        if rng.random() < 0.5
        else None
    )
    kwargs = dict(bias=bias, activation=act, out_dtype=out)
    if out is not None and out != np.float32:
        zy = np.asarray(zy).astype(out)
    got = lowprec.qlinear_matmul(a, sa, za, b, sb, zb, sy, zy, **kwargs)
    want = ref.qlinear_matmul(a, sa, za, b, sb, zb, sy, zy, **kwargs)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    packed = lowprec.pack_weights(b, zb, sb)
    got_p = lowprec.qlinear_matmul(a, sa, za, packed, None, None, sy, zy, **kwargs)
    np.testing.assert_array_equal(got_p, want)


@pytest.mark.parametrize("out", [np.uint8, np.float32])
@pytest.mark.parametrize("big", [False, True])
def test_qlinear_matmul_bias_beyond_the_narrow_epilogue(isa, out, big):
    # the VNNI tile takes int32 lanes and one FMA only while |P + bias| < 2**29
    # (kernels/int8_gemm_vnni.py::narrow_epilogue); a bias near the int32
    # limits takes the float64 lanes: both exact
    rng = np.random.default_rng(7)
    M, K, N = 13, 70, 40
    a = _rand(rng, (M, K), np.uint8)
    b = _rand(rng, (K, N), np.int8)
    lim = 2**31 - 1 if big else 2**20
    bias = rng.integers(-lim, lim, N, endpoint=True).astype(np.int32)
    bias[:2] = [np.iinfo(np.int32).max, np.iinfo(np.int32).min]
    sa, sb = np.float32(0.02), np.float32(0.01)
    # y_scale so that the biased accumulators land inside the uint8 range
    sy = np.float32(sa * sb * (2.0**32 if big else 2.0**22) / 200)
    yz = None if out == np.float32 else np.uint8(128)
    kw = dict(bias=bias, out_dtype=np.float32 if out == np.float32 else None)
    args = (a, sa, np.uint8(3), b, sb, np.int8(0), None if yz is None else sy, yz)
    got = lowprec.qlinear_matmul(*args, **kw)
    want = ref.qlinear_matmul(*args, **kw)
    np.testing.assert_array_equal(got, want)
    if out == np.uint8:
        assert len(np.unique(got)) > 10
        assert got.min() < 128 < got.max()


def _epilogue_level(b, bias, sa, sb, sy, zy, mode=1):
    # the VNNI tile's epilogue case for a per-tensor call without row terms
    # (kernels/int8_gemm_vnni.py::narrow_epilogue), from the packed weights
    from lowprec.kernels import int8_gemm_vnni as kv

    packed = lowprec.pack_weights(b)
    N = b.shape[1]
    mult = np.full((1, N), np.float32(np.float32(sa * sb) / sy), np.float64)
    z1 = np.zeros(1, np.int64)
    epi = (z1, z1, packed._col_sum, np.zeros(N, np.int64), bias.astype(np.int64),
           mult, float(zy), 0.0, 255.0, mode, np.zeros(N, np.float32))  # fmt: skip
    return kv.narrow_epilogue(epi, b.shape[0], packed._p_max)


@pytest.mark.parametrize("y_dt", [np.uint8, np.int8])
def test_qlinear_matmul_float32_epilogue(isa, y_dt):
    # The VNNI tile requantizes in float32 lanes (case 3 of narrow_epilogue)
    # when |acc| < 2**24 and |M| >= 2**-22, one FMA with the rounding constant
    # 1.5 * 2**23: exact ties (M = 1/2, 1/4, 3/8 with small integers), the M
    # and |acc| boundaries on both sides, saturation both ways, M and N tails.
    rng = np.random.default_rng(11)
    lo_zy = np.iinfo(y_dt).min
    cases = []
    # ties: acc * M + zy lands on k + 1/2 for a quarter to a half of the outputs
    for sb in (0.5, 0.25, 0.375):
        a = rng.integers(0, 4, (13, 20), dtype=np.uint8)
        b = rng.integers(-3, 4, (20, 70), dtype=np.int8)
        bias = rng.integers(-40, 40, 70)
        cases.append((a, b, bias, 1.0, sb, 1.0, 3, 3))
    # large M: every output saturates at one end or the other (or is z_y)
    a = rng.integers(0, 256, (7, 36), dtype=np.uint8)
    b = rng.integers(-128, 128, (36, 64), dtype=np.int8)
    cases.append((a, b, rng.integers(-99, 99, 64), 4.0, 250.0, 1.0, 3, 3))
    # M = 2**-22 exactly (case 3) and 2**-23 (case 2), with |acc| near 2**23
    a = np.full((6, 1024), 255, np.uint8)
    a[1::2, ::3] = 0
    b = rng.choice(np.array([-32, 32], np.int8), (1024, 64))
    for sy, level in ((1.0, 3), (2.0, 2)):
        cases.append((a, b, np.zeros(64, np.int64), 2.0**-11, 2.0**-11, sy, 0, level))
    # the |acc| bound: 255 * sum|b| = 255 * 65536 plus the bias, below and
    # above 2**24 (= 255 * 65536 + 65,296)
    b = rng.choice(np.array([-64, 64], np.int8), (1024, 64))
    for bmax, level in ((65_000, 3), (70_000, 2)):
        bias = rng.integers(-bmax, bmax, 64)
        bias[0] = bmax
        cases.append((a, b, bias, 2.0**-10, 2.0**-10, 1.0, 0, level))
    for a, b, bias, sa, sb, sy, zy_off, level in cases:
        zy = y_dt(lo_zy + 100 + zy_off)
        sa, sb, sy = np.float32(sa), np.float32(sb), np.float32(sy)
        if isa == "avx512_vnni":
            assert _epilogue_level(b, bias, sa, sb, sy, zy) == level
        for act in (None, (-2.0, 3.0)):
            args = (a, sa, np.uint8(0), b, sb, np.int8(0), sy, zy)
            kw = dict(bias=bias.astype(np.int32), activation=act)
            got = lowprec.qlinear_matmul(*args, **kw)
            want = ref.qlinear_matmul(*args, **kw)
            np.testing.assert_array_equal(got, want)
    # the ties are there: outputs odd and even from exact halves
    a, b, bias = cases[0][:3]
    acc = a.astype(np.int64) @ b + bias
    assert np.count_nonzero(acc % 2) > acc.size // 4


def test_real_output_float32_epilogue(isa):
    # float32 output takes float32 lanes too where |acc| < 2**24 (narrow_epilogue
    # case 3: fl32(acc * M) is one vmulps, exact as the reference's rounding of
    # the float64 product), for qlinear_matmul's real output and for
    # dynamic_quantize_matmul; multipliers whose products are subnormal or
    # overflow to inf, activation clamps, the bound on both sides
    rng = np.random.default_rng(13)
    a = rng.integers(0, 256, (13, 40), dtype=np.uint8)
    b = rng.integers(-128, 128, (40, 70), dtype=np.int8)
    bias = rng.integers(-1000, 1000, 70)
    big_b = rng.choice(np.array([-64, 64], np.int8), (1024, 64))
    big_a = np.full((6, 1024), 255, np.uint8)
    cases = [(a, b, bias, 3), (big_a, big_b, np.full(64, 70_000), 2)]
    b0 = b
    for a, b, bias, level in cases:
        for sa, sb in ((0.02, 0.01), (1e-20, 1e-20), (1e19, 1e19), (0.5, 0.25)):
            sa, sb = np.float32(sa), np.float32(sb)
            if isa == "avx512_vnni":
                lv = _epilogue_level(b, bias, sa, sb, np.float32(1), 0, mode=2)
                assert lv == level
            for act in (None, "relu", (-1.5, 2.0)):
                args = (a, sa, np.uint8(3), b, sb, np.int8(0), None, None)
                kw = dict(bias=bias.astype(np.int32), activation=act,
                          out_dtype=np.float32)  # fmt: skip
                with np.errstate(over="ignore", under="ignore", invalid="ignore"):
                    got = lowprec.qlinear_matmul(*args, **kw)
                    want = ref.qlinear_matmul(*args, **kw)
                np.testing.assert_array_equal(got, want)
    # dynamic quantization: activations of a few magnitudes, per-column scales
    x = rng.standard_normal((9, 40)).astype(np.float32)
    sb = (10.0 ** rng.uniform(-3, 0, 70)).astype(np.float32)
    fb = rng.standard_normal(70).astype(np.float32)
    for scale in (1.0, 1e-3, 1e3):
        got = lowprec.dynamic_quantize_matmul(x * np.float32(scale), b0, sb, bias=fb)
        want = ref.dynamic_quantize_matmul(x * np.float32(scale), b0, sb, bias=fb)
        np.testing.assert_array_equal(got, want)


def test_real_output_keeps_the_sign_of_zero(isa):
    # M = fl32(s_a * s_b) underflows to 0: acc * 0 is -0.0 for negative acc,
    # and the "no float bias" every kernel adds must keep it (x + -0.0 = x;
    # + 0.0 turned it into +0.0): matmul and convolution, every path
    rng = np.random.default_rng(14)
    s = np.float32(1e-30)
    a = _rand(rng, (7, 30), np.uint8)
    b = _rand(rng, (30, 70), np.int8)
    args = (a, s, np.uint8(128), b, s, np.int8(0), None, None)
    got = lowprec.qlinear_matmul(*args, out_dtype=np.float32)
    want = ref.qlinear_matmul(*args, out_dtype=np.float32)
    assert (want == 0).all()
    assert 0 < np.signbit(want).sum() < want.size
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    x = rng.integers(0, 256, (1, 64, 6, 6), dtype=np.uint8)
    w = rng.integers(-128, 128, (70, 64, 3, 3), dtype=np.int8)
    sw = np.full(70, s, np.float32)
    acc = lowprec.conv_integer(x, w, np.uint8(128), pads=[1, 1, 1, 1])
    for layout in ("NCHW", "NHWC"):
        xin = x if layout == "NCHW" else x.transpose(0, 2, 3, 1).copy()
        y = lowprec.qlinear_conv(xin, s, np.uint8(128), w, sw, np.int8(0), None, None,
                                 pads=[1, 1, 1, 1], layout=layout,
                                 out_dtype=np.float32)  # fmt: skip
        y = y if layout == "NCHW" else y.transpose(0, 3, 1, 2)
        assert (y == 0).all()
        assert 0 < np.signbit(y).sum() < y.size
        np.testing.assert_array_equal(np.signbit(y), acc < 0)


@pytest.mark.parametrize("a_dt", INT8)
@pytest.mark.parametrize("b_dt", INT8)
def test_numpy_broadcasting(isa, a_dt, b_dt):
    rng = np.random.default_rng(1)
    cases = [
        ((2, 3, 5, 7), (7, 4)),  # batched a, shared 2-D b (flattened into one GEMM)
        ((5, 7), (3, 7, 4)),  # shared a, batched b
        ((2, 1, 5, 7), (3, 7, 4)),  # broadcast batch dims
        ((7,), (7, 4)),  # 1-D a
        ((5, 7), (7,)),  # 1-D b
        ((7,), (7,)),  # dot product -> 0-d
        ((3, 7), (2, 7, 1)),
    ]
    for sa, sb in cases:
        a, b = _rand(rng, sa, a_dt), _rand(rng, sb, b_dt)
        za, zb = _rand(rng, (), a_dt), _rand(rng, (), b_dt)
        got = lowprec.matmul_integer(a, b, za, zb)
        want = (a.astype(np.int64) - za) @ (b.astype(np.int64) - zb)
        assert got.shape == want.shape, (sa, sb)
        np.testing.assert_array_equal(got, want)


def test_nd_per_row_and_per_column_zero_points(isa):
    rng = np.random.default_rng(2)
    a = _rand(rng, (2, 5, 7), np.uint8)
    b = _rand(rng, (2, 7, 3), np.int8)
    za = _rand(rng, (2, 5, 1), np.uint8)  # ONNX N-D per-row form [D, M, 1]
    zb = _rand(rng, (2, 1, 3), np.int8)  # per batch, per column
    got = lowprec.matmul_integer(a, b, za, zb)
    want = (a.astype(np.int64) - za) @ (b.astype(np.int64) - zb)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("a_dt", [np.uint8, np.int8])
def test_row_blocks_and_panels(isa, a_dt):
    """M across several 96-row blocks of the VNNI tile order (and a partial
    one), N across panels with a tail, every output kind, against the oracle."""
    rng = np.random.default_rng(8)
    a = _rand(rng, (203, 37), a_dt)
    b = _rand(rng, (37, 150), np.int8)
    za = a_dt(rng.integers(0, 100))
    packed = lowprec.pack_weights(b, np.int8(0), np.float32(0.01))
    np.testing.assert_array_equal(
        lowprec.matmul_integer(a, packed, za), ref.int_matmul(a, b, za, 0)
    )
    for yz in (np.uint8(128), np.int8(-3)):
        got = lowprec.qlinear_matmul(
            a, np.float32(0.02), za, packed, None, None, np.float32(2.0), yz
        )
        want = ref.qlinear_matmul(
            a, np.float32(0.02), za, b, np.float32(0.01), np.int8(0),
            np.float32(2.0), yz,
        )  # fmt: skip
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_results_independent_of_thread_count(isa, threads, n_threads):
    rng = np.random.default_rng(3)
    a = _rand(rng, (67, 129), np.int8)
    b = _rand(rng, (129, 300), np.uint8)
    za, zb = _rand(rng, (67,), np.int8), _rand(rng, (300,), np.uint8)
    numba.set_num_threads(min(n_threads, threads))
    got = lowprec.matmul_integer(a, b, za, zb)
    np.testing.assert_array_equal(got, ref.int_matmul(a, b, za, zb))


def test_num_threads_follows_set_num_threads(threads):
    # lowprec's cheap getter reads the same per-thread count as numba's
    from lowprec import _dispatch

    before = numba.get_num_threads()
    try:
        for n in range(1, threads + 1):
            numba.set_num_threads(n)
            assert _dispatch.num_threads() == numba.get_num_threads() == n
    finally:
        numba.set_num_threads(before)


def test_k_chunks_combine_exactly(isa, monkeypatch):
    # the K-chunked int64 path (K > 33025 in real use) with tiny chunks
    monkeypatch.setattr(config, "K_CHUNK", 8)
    monkeypatch.setattr(gemm, "K_INT32_SAFE", 4)
    rng = np.random.default_rng(4)
    for a_dt in INT8:
        for b_dt in INT8:
            a, b = _rand(rng, (9, 37), a_dt, True), _rand(rng, (37, 11), b_dt, True)
            za, zb = _rand(rng, (9,), a_dt), _rand(rng, (11,), b_dt)
            got = lowprec.matmul_integer(a, b, za, zb)
            np.testing.assert_array_equal(got, ref.int_matmul(a, b, za, zb))
            args = (a, np.float32(0.02), za, b, np.float32(0.03), zb)
            y = (np.float32(0.5), np.uint8(100))
            bias = rng.integers(-1000, 1000, 11).astype(np.int32)
            got = lowprec.qlinear_matmul(*args, *y, bias=bias, activation="relu")
            want = ref.qlinear_matmul(*args, *y, bias=bias, activation="relu")
            np.testing.assert_array_equal(got, want)


def test_int32_overflow_raises_and_qlinear_stays_exact(isa):
    # K = 40000 products of 255 * 255 exceed int32: refuse rather than wrap
    K = 40000
    a = np.full((1, K), 255, np.uint8)
    b = np.zeros((K, 2), np.uint8)
    with pytest.raises(OverflowError, match="int32"):
        lowprec.matmul_integer(a, b, np.uint8(0), np.uint8(255))
    # qlinear accumulates exactly past int32 and requantizes the exact value
    got = lowprec.qlinear_matmul(
        a, 1.0, np.uint8(0), b, 1.0, np.uint8(255), np.float32(2**26), np.int8(0)
    )
    exact = -(255 * 255 * K)  # -2_601_000_000
    np.testing.assert_array_equal(got, np.rint(exact / 2**26).astype(np.int8))


def test_empty_dimensions():
    a = np.zeros((0, 4), np.uint8)
    b = np.zeros((4, 3), np.int8)
    assert lowprec.matmul_integer(a, b).shape == (0, 3)
    a = np.zeros((2, 0), np.uint8)
    b = np.zeros((0, 3), np.int8)
    np.testing.assert_array_equal(lowprec.matmul_integer(a, b), np.zeros((2, 3)))
    # K = 0 under batch dimensions (numpy cannot infer -1 rows of 0 values)
    a = np.zeros((2, 3, 0), np.uint8)
    for w in (b, lowprec.pack_weights(b, b_scale=np.float32(0.5))):
        np.testing.assert_array_equal(lowprec.matmul_integer(a, w), np.zeros((2, 3, 3)))
        y = lowprec.qlinear_matmul(
            a, np.float32(1), np.uint8(0), w, np.float32(0.5), np.int8(0),
            np.float32(1), np.uint8(7),
        )  # fmt: skip
        np.testing.assert_array_equal(y, np.full((2, 3, 3), 7, np.uint8))
        f = np.zeros((2, 3, 0), np.float32)
        y = lowprec.dynamic_quantize_matmul(f, w, np.float32(0.5))
        np.testing.assert_array_equal(y, np.zeros((2, 3, 3), np.float32))


def test_packed_weights_are_immutable():
    b = np.arange(12, dtype=np.int8).reshape(3, 4)
    p = lowprec.pack_weights(b, np.int8(1), np.float32(0.5))
    with pytest.raises(AttributeError, match="immutable"):
        p.shape = (1, 1)
    assert not p.zero_point.flags.writeable
    b[:] = 0  # packing copied the data
    a = np.ones((1, 3), np.uint8)
    np.testing.assert_array_equal(
        lowprec.matmul_integer(a, p),
        ref.int_matmul(a, np.arange(12).reshape(3, 4), 0, 1),
    )


def _tile_asm(path):
    """Compile one register tile of `path` here (numba's cache keeps no asm text)
    and return (its int32 result for all-ones inputs, its assembly)."""
    from numba import njit

    from lowprec.kernels import int8_gemm_vnni as z
    from lowprec.kernels import int8_gemm_ymm as y

    if path == "avx2":  # the fused tile: K = 16 as one step of 8 widened pairs
        z1, zn = np.zeros(1, np.int64), np.zeros(16, np.int64)
        epi = (z1, z1, zn, zn, zn, np.ones((1, 1)), 0.0, 0.0, 0.0, 0,
               np.zeros(16, np.float32))  # fmt: skip

        @njit
        def one_fused(a, b, c):
            y.run_avx2_tile(6, a.ctypes.data, 6 * y.ROW_BYTES, b.ctypes.data, 8, 0,
                            0, 16, epi, 0, a, c)  # fmt: skip

        a16 = np.zeros(y.a16_shape(6, 16), np.uint16)
        y.pack_a16(np.ones((6, 16), np.uint8), a16)
        c = np.zeros((6, 16), np.int32)
        one_fused(a16.view(np.uint8), y.pack_b16(np.full((16, 16), -1, np.int8), 16), c)
        return c, one_fused.inspect_asm(one_fused.signatures[0])
    tile, nr, pack = {
        "avx512_vnni": (z._tile6, 64, z.pack_b),
        "avx_vnni": (y._vt6, 16, lambda b: y.pack_b(b, 16)),
    }[path]

    @njit
    def one_tile(a, b, c):
        tile(a.ctypes.data, 8, b.ctypes.data, nr * 4, 2, 0, c.ctypes.data, nr, nr, 0)

    a = np.ones((6, 8), np.uint8)
    c = np.zeros((6, nr), np.int32)
    one_tile(a, pack(np.full((8, nr), -1, np.int8)), c)
    return c, one_tile.inspect_asm(one_tile.signatures[0])


@pytest.mark.parametrize(
    ("path", "must", "never"),
    [
        ("avx512_vnni", r"vpdpbusd\s+%zmm", "vpmaddubsw"),
        ("avx_vnni", r"vpdpbusd\s+%ymm", "vpmaddubsw"),
        # exact 16-bit multiply-add; with AVX-512 VNNI present LLVM fuses
        # vpmaddwd + vpaddd into vpdpwssd (also exact, no saturation)
        ("avx2", r"vpmaddwd|vpdpwssd", "vpmaddubsw"),
    ],
)
def test_tile_kernels_compile_to_the_instruction(path, must, never):
    import re

    if path not in lowprec.available_isas():
        pytest.skip(f"this CPU cannot run the {path} path (llvmlite's features)")
    c, asm = _tile_asm(path)
    k = 16 if path == "avx2" else 8  # all-ones a' times all -1 b'
    np.testing.assert_array_equal(c, np.full((6, c.shape[1]), -k))
    assert re.search(must, asm), f"{path}: no {must} in the tile's assembly"
    assert never not in asm  # the saturating 16-bit path is never used


_AMX = "amx" in lowprec.available_isas()
amx_only = pytest.mark.skipif(
    not _AMX, reason="no AMX-INT8 here (or Linux refused the tile state)"
)


@amx_only
@pytest.mark.parametrize("a_dt", INT8)
def test_amx_blocks_and_edges(a_dt):
    """The amx path's 32- and 16-row tile blocks, 64-column panels with
    tails, the raw int32 tiles (no weight zero point) and the fused epilogue
    (every output kind), rows past the last 16-row tile on zmm tiles, K
    padded to 64, and A aligned, offset and strided, against the oracle."""
    rng = np.random.default_rng(21)
    shapes = [(16, 64, 64), (32, 64, 64), (47, 1, 33), (63, 65, 130), (80, 130, 64),
              (100, 4, 200), (33, 256, 31), (16, 3, 1), (96, 640, 129)]  # fmt: skip
    before = lowprec.get_isa()
    lowprec.set_isa("amx")
    try:
        for M, K, N in shapes:
            a = _rand(rng, (M, K), a_dt)
            b = _rand(rng, (K, N), np.int8)
            za = a_dt(rng.integers(0, 100))
            zb = _rand(rng, (N,), np.int8)
            sb = rng.uniform(0.001, 0.01, N).astype(np.float32)
            bias = rng.integers(-5000, 5000, N).astype(np.int32)
            packed = lowprec.pack_weights(b)
            offset = np.empty(M * K + 1, a_dt)[1:].reshape(M, K)
            offset[...] = a
            for x in (a, offset, _view(rng, a, "strided")):
                got = lowprec.matmul_integer(x, packed, za)
                np.testing.assert_array_equal(got, ref.int_matmul(a, b, za, 0))
                got = lowprec.matmul_integer(x, b, za, zb)
                np.testing.assert_array_equal(got, ref.int_matmul(a, b, za, zb))
                for yz, out in ((np.uint8(128), None), (np.int8(-3), None),
                                (None, np.float32)):  # fmt: skip
                    args = (x, np.float32(0.02), za, b, sb, zb, np.float32(0.5), yz)
                    kw = dict(bias=bias, activation="relu", out_dtype=out)
                    got = lowprec.qlinear_matmul(*args, **kw)
                    want = ref.qlinear_matmul(a, *args[1:], **kw)
                    np.testing.assert_array_equal(got, want)
    finally:
        lowprec.set_isa(before)


@amx_only
def test_amx_dispatch_and_tile_instructions():
    """Few rows go to the zmm tiles; the AMX kernels are tdpbusd tiles."""
    import re

    from numba import njit

    from lowprec import _dispatch
    from lowprec.kernels import int8_gemm_amx as x

    before = lowprec.get_isa()
    lowprec.set_isa("amx")
    try:
        assert _dispatch.gemm_backend(_dispatch.AMX_MIN_ROWS - 1).name == "avx512_vnni"
        assert _dispatch.gemm_backend(_dispatch.AMX_MIN_ROWS).name == "amx"
    finally:
        lowprec.set_isa(before)

    @njit
    def raw_block(a, b, c, bias):
        x.amx_begin()
        x._rtile32(a.ctypes.data, 64, b.ctypes.data, 256, 16, c.ctypes.data, 256,
                   bias.ctypes.data)  # fmt: skip
        x.amx_end()

    a = np.ones((32, 64), np.uint8)
    c = np.zeros((32, 64), np.int32)
    bias = np.arange(64, dtype=np.int32)
    raw_block(a, x.pack_b(np.full((64, 64), -1, np.int8)), c, bias)
    np.testing.assert_array_equal(c, np.broadcast_to(bias - 64, (32, 64)))
    asm = raw_block.inspect_asm(raw_block.signatures[0])
    for ins in ("ldtilecfg", "tileloadd", "tdpbusd", "tilestored", "tilerelease"):
        assert re.search(rf"\b{ins}\b", asm), ins


def test_vnni_tile_stand_in_is_exact():
    """The avx_vnni tile as compiled where LLVM's target has no 256-bit
    vpdpbusd (an intrinsic the target lacks aborts the process in LLVM):
    plain IR, the same sums."""
    from lowprec.kernels import int8_gemm_ymm as y

    class StandIn(y._VnniDot):
        def __init__(self, context, builder):
            super().__init__(context, builder)
            self.native = False

    _check_stand_in(y, StandIn)


def _check_stand_in(y, cls):
    from numba import njit

    tile = y.make_tile_kernel(3, 2, cls)

    @njit
    def one_tile(a, b, k4, kr, c):
        tile(a.ctypes.data, a.strides[0], b.ctypes.data, 64, k4, kr,
             c.ctypes.data, 16, 13, 0)  # fmt: skip

    rng = np.random.default_rng(7)
    for K in (4, 11, 64):
        a = rng.integers(0, 256, (3, K), dtype=np.uint8)
        b = rng.integers(-128, 128, (K, 13), dtype=np.int8)
        c = np.full((3, 16), 99, np.int32)
        one_tile(a, y.pack_b(b, 16)[0], K // 4, K % 4, c)
        np.testing.assert_array_equal(c[:, :13], a.astype(np.int64) @ b)
        assert (c[:, 13:] == 99).all()  # masked columns untouched


@pytest.mark.parametrize("K", [1, 2, 3, 5])
def test_avx2_reads_stay_inside_the_packed_weights(K):
    """The avx2 tile's K loop runs over B's k pairs (A may carry padding): the
    packed panel ends right before a page no access may touch."""
    from memguard import guarded

    from lowprec._gemm_backends import Avx2Gemm

    if "avx2" not in lowprec.available_isas():
        pytest.skip("this CPU cannot run the avx2 path")
    rng = np.random.default_rng(K)
    a = rng.integers(0, 256, (7, K), dtype=np.uint8)
    b = rng.integers(-128, 128, (K, 20), dtype=np.int8)
    packed, keep = Avx2Gemm.pack(b), []
    fenced = guarded(packed.size, packed.dtype, keep).reshape(packed.shape)
    fenced[...] = packed
    for a_in in (a, np.pad(a, ((0, 0), (0, 4)))[:, :K]):  # also a padded copy
        out = np.empty((7, 20), np.int32)
        Avx2Gemm.gemm(a_in, fenced, out)
        np.testing.assert_array_equal(out, a.astype(np.int64) @ b)


def test_backend_tiles_match_kernels():
    from lowprec._gemm_backends import BACKENDS

    # the zmm path's epilogue runs on the accumulators: it asks for no scratch
    assert BACKENDS["avx512_vnni"].tile is None
    if "avx2" in lowprec.available_isas():
        from lowprec.kernels import int8_gemm_ymm as y

        assert BACKENDS["avx_vnni"].tile == (y.VNNI_MR, y.VNNI_NR)
        assert BACKENDS["avx2"].tile is None  # fused epilogue, as the zmm path
    assert BACKENDS["portable"].tile == (config.TILE_M, config.TILE_N)


def test_tiny_call_path_matches_general_path(isa):
    # the few-comparison path for 2-D a, packed b and scalar parameters
    rng = np.random.default_rng(5)
    a = _rand(rng, (3, 10), np.int8)
    b = _rand(rng, (10, 4), np.uint8)
    packed = lowprec.pack_weights(b, np.uint8(7), np.float32(0.01))
    for za in (None, 3, np.int8(-128), np.array([5], np.int8)):
        want = ref.int_matmul(a, b, za, np.uint8(7))
        np.testing.assert_array_equal(lowprec.matmul_integer(a, packed, za), want)
        z = np.int8(0) if za is None else za
        args = (a, 0.05, z, packed, None, None, np.float32(0.3), np.int8(-2))
        got = lowprec.qlinear_matmul(*args)
        want = ref.qlinear_matmul(
            a, np.float32(0.05), z, b, np.float32(0.01), np.uint8(7),
            np.float32(0.3), np.int8(-2),
        )  # fmt: skip
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("b_dt", [np.int8, np.uint8])
def test_engine_call_with_every_onnx_input(isa, b_dt):
    # qlinear_matmul with the packed b_scale / b_zero_point passed again (an
    # engine mapping QLinearMatMul's eight inputs): the cached epilogue of the
    # pack (int8 b, ZB = 0) or the general tile (uint8 b: row sums); each call's
    # own scales, zero points and activation must reach the result
    rng = np.random.default_rng(6)
    a = _rand(rng, (5, 40), np.uint8)
    b = _rand(rng, (40, 24), b_dt)
    zb = b_dt(0 if b_dt == np.int8 else 131)
    sb = np.float32(0.004)
    packed = lowprec.pack_weights(b, zb, sb)
    calls = [
        (np.uint8(120), np.float32(0.02), np.float32(0.3), np.uint8(128), None),
        (np.uint8(120), np.float32(0.02), np.float32(0.3), np.uint8(128), "relu"),
        (np.uint8(9), np.float32(0.02), np.float32(0.3), np.uint8(128), None),
        (np.uint8(9), np.float32(0.03), np.float32(0.2), np.int8(-5), (-1.0, 2.5)),
    ]
    for b_args in ((None, None), (sb, zb), (packed.scale, packed.zero_point),
                   (0.004, int(zb))):  # fmt: skip
        for za, sa, sy, zy, act in calls:
            got = lowprec.qlinear_matmul(
                a, sa, za, packed, *b_args, sy, zy, activation=act
            )
            want = ref.qlinear_matmul(a, sa, za, b, sb, zb, sy, zy, activation=act)
            np.testing.assert_array_equal(got, want)
            assert got.dtype == zy.dtype
    with pytest.raises(ValueError, match="b_scale was given both"):
        lowprec.qlinear_matmul(
            a, np.float32(0.02), np.uint8(1), packed, np.float32(0.005), zb,
            np.float32(0.3), np.uint8(128),
        )  # fmt: skip


@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([1, 3, 7, 20]),
    st.sampled_from([1, 5, 33, 70]),
    st.sampled_from([1, 4, 65]),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    ISAS,
)
def test_dynamic_quantize_matmul_matches_oracle(
    use_isa, seed, M, K, N, per_row, with_zp, packed, isa
):
    use_isa(isa)
    rng = np.random.default_rng(seed)
    a = (rng.normal(0, 3, (M, K)) + rng.uniform(-2, 2)).astype(np.float32)
    b = _rand(rng, (K, N), np.int8)
    sb = (10.0 ** rng.uniform(-3, 0, N)).astype(np.float32)
    zb = _rand(rng, (N,), np.int8) if with_zp else None
    bias = rng.normal(0, 1, N).astype(np.float32)
    w = lowprec.pack_weights(b, zb, sb) if packed else b
    args = (None, None) if packed else (sb, zb)
    got = lowprec.dynamic_quantize_matmul(a, w, *args, bias=bias, per_row=per_row)
    want = ref.dynamic_quantize_matmul(a, b, sb, zb, bias, per_row)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(1, 3, 70), (300, 130)])  # 39000 > _QUANT_BLOCK
@pytest.mark.parametrize("sb_kind", ["scalar", "float16"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dynamic_quantize_matmul_per_tensor_variants(isa, shape, sb_kind, with_bias):
    # the per-tensor fast path: small a (quantization and multiplier in one
    # call) and large a, scalar and float16 scales, with and without bias, N-D a
    rng = np.random.default_rng(sum(shape))
    a = (rng.normal(0, 2, shape) + 0.5).astype(np.float32)
    K, N = shape[-1], 37
    b = _rand(rng, (K, N), np.int8)
    if sb_kind == "scalar":
        sb = np.float32(0.02)
    else:
        sb = (10.0 ** rng.uniform(-3, 0, N)).astype(np.float16)
    bias = rng.normal(0, 1, N).astype(np.float32) if with_bias else None
    want = ref.dynamic_quantize_matmul(a, b, sb, None, bias)
    for w in (b, lowprec.pack_weights(b, None, sb)):
        got = lowprec.dynamic_quantize_matmul(
            a, w, None if w is not b else sb, bias=bias
        )
        assert got.shape == shape[:-1] + (N,)
        np.testing.assert_array_equal(got, want)


def test_activation_clamp_as_numpy_values(isa):
    # an ONNX Clip's bounds arrive as 0-d arrays / numpy scalars: the same
    # result as plain floats (a tuple of arrays did not hash in the cache)
    rng = np.random.default_rng(13)
    a = _rand(rng, (4, 30), np.uint8)
    b = _rand(rng, (30, 8), np.int8)
    args = (a, np.float32(0.05), np.uint8(128), b, np.float32(0.02), np.int8(0),
            np.float32(0.01), np.uint8(10))  # fmt: skip
    want = lowprec.qlinear_matmul(*args, activation=(0.0, 1.5))
    for act in ((np.array(0.0), np.array(1.5)), [np.float32(0), np.float64(1.5)]):
        got = lowprec.qlinear_matmul(*args, activation=act)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("nthreads", [1, 2])
def test_dynamic_quantize_fused_into_amx_row_copies(monkeypatch, threads, nthreads):
    """amx: a large float a is quantized as the kernel copies its row blocks
    (no uint8 a written): the oracle's bits, serial and on two threads with
    several row blocks, K off the 64-byte steps, a ReLU-like a (zero point 0)
    and a shifted one; the fused call is the one that ran."""
    if "amx" not in lowprec.available_isas():
        pytest.skip("this CPU cannot run the amx path")
    from lowprec import _gemm_backends

    fused = _gemm_backends.AmxGemm.fused
    seen = []

    def spy(*args, **kw):
        seen.append(kw.get("af") is not None)
        return fused(*args, **kw)

    monkeypatch.setattr(_gemm_backends.AmxGemm, "fused", staticmethod(spy))
    before = lowprec.get_isa()
    lowprec.set_isa("amx")
    numba.set_num_threads(min(nthreads, threads))
    try:
        rng = np.random.default_rng(nthreads)
        for M, K, N, shift in ((2100, 300, 20, 0.7), (1500, 400, 70, None)):
            a = rng.normal(0, 2, (M, K)).astype(np.float32)
            a = a + np.float32(shift) if shift is not None else np.maximum(a, 0)
            b = _rand(rng, (K, N), np.int8)
            sb = (10.0 ** rng.uniform(-3, 0, N)).astype(np.float32)
            bias = rng.normal(0, 1, N).astype(np.float32)
            w = lowprec.pack_weights(b, None, sb)
            seen.clear()
            got = lowprec.dynamic_quantize_matmul(a, w, bias=bias)
            assert seen == [True]
            np.testing.assert_array_equal(
                got, ref.dynamic_quantize_matmul(a, b, sb, None, bias)
            )
    finally:
        lowprec.set_isa(before)


def test_dynamic_quantize_matmul_zero_point_passed_at_call(isa):
    # weights packed without a zero point, one passed with the call (scalar or
    # per column): the per-tensor fast path uses the pack's zero points, so
    # the call takes the general path (it returned the zero-point-free result)
    rng = np.random.default_rng(12)
    a = rng.normal(0, 2, (3, 40)).astype(np.float32)
    b = _rand(rng, (40, 9), np.int8)
    packed = lowprec.pack_weights(b)
    for zb in (np.int8(5), rng.integers(-9, 9, 9).astype(np.int8)):
        got = lowprec.dynamic_quantize_matmul(a, packed, np.float32(0.02), zb)
        want = ref.dynamic_quantize_matmul(a, b, np.float32(0.02), zb, None)
        np.testing.assert_array_equal(got, want)


def test_dynamic_quantize_matmul_rejects_non_finite():
    a = np.array([[1.0, np.nan]], np.float32)
    b = np.ones((2, 3), np.int8)
    for per_row in (False, True):
        with pytest.raises(ValueError, match="finite"):
            lowprec.dynamic_quantize_matmul(a, b, 0.1, per_row=per_row)
        big = np.ones((300, 130), np.float32)  # the multi-block quantization
        big[299, 129] = np.inf
        with pytest.raises(ValueError, match="finite"):
            lowprec.dynamic_quantize_matmul(big, np.ones((130, 3), np.int8), 0.1)


@pytest.mark.parametrize("M", [1, 2])
def test_avx2_gemv_nibble_kernel(M):
    """avx2 GEMMs of at most 2 rows run gemv_nibble (int8 weights, vpmaddubsw
    on a's nibbles summed in int16 for 8 k4 steps): against the int64 oracle
    for uint8 and int8 a, K with and without whole 8-step blocks and a rest,
    N past whole 16-column panels, every output kind, packed and not; and at
    the int16 sums' bound (a' = 255, b' = -128 or 127 everywhere)."""
    if "avx2" not in lowprec.available_isas():
        pytest.skip("this CPU cannot run the avx2 path")
    from lowprec import _dispatch

    before = lowprec.get_isa()
    lowprec.set_isa("avx2")
    try:
        assert _dispatch.gemm_backend(M).name == "avx2_gemv"
        assert _dispatch.gemm_backend(_dispatch.AVX2_GEMV_ROWS + 1).name == "avx2"
        rng = np.random.default_rng(M)
        for K, N in ((3, 5), (64, 16), (70, 33), (259, 100)):
            for dt in (np.uint8, np.int8):
                info = np.iinfo(dt)
                a = rng.integers(info.min, info.max + 1, (M, K), dtype=dt)
                b = rng.integers(-128, 128, (K, N), dtype=np.int8)
                za, zb = dt(7), np.int8(-3)
                for w in (b, lowprec.pack_weights(b, zb)):
                    got = lowprec.matmul_integer(a, w, za, None if w is not b else zb)
                    np.testing.assert_array_equal(got, ref.int_matmul(a, b, za, zb))
                sa, sb, sy = np.float32(0.02), np.float32(0.01), np.float32(0.3)
                for zy in (np.uint8(128), np.int8(-5)):
                    got = lowprec.qlinear_matmul(a, sa, za, b, sb, zb, sy, zy)
                    want = ref.qlinear_matmul(a, sa, za, b, sb, zb, sy, zy)
                    np.testing.assert_array_equal(got, want)
                sbn = rng.uniform(0.001, 0.02, N).astype(np.float32)
                bias = rng.integers(-5000, 5000, N, dtype=np.int32)
                got = lowprec.qlinear_matmul(
                    a, sa, za, lowprec.pack_weights(b, zb, sbn), None, None, None,
                    None, bias=bias, out_dtype=np.float32,
                )  # fmt: skip
                want = ref.qlinear_matmul(
                    a, sa, za, b, sbn, zb, None, None, bias=bias, out_dtype=np.float32
                )
                np.testing.assert_array_equal(got, want)
                # symmetric weights: int8 a flipped inside the kernel
                p = lowprec.pack_weights(b)
                got = lowprec.matmul_integer(a, p, za)
                np.testing.assert_array_equal(got, ref.int_matmul(a, b, za))
        # every int16 lane at its largest |sum|: 8 steps of 2 * 15 * 128
        K = 8 * 4 * 3 + 4
        for a in (np.full((M, K), 255, np.uint8), np.full((M, K), 127, np.int8)):
            for fill in (-128, 127):
                b = np.full((K, 40), fill, np.int8)
                got = lowprec.matmul_integer(a, lowprec.pack_weights(b))
                np.testing.assert_array_equal(got, ref.int_matmul(a, b))
    finally:
        lowprec.set_isa(before)


@pytest.mark.parametrize("M", [1, 2, 3, 5])
def test_avx2_gemv_drivers(M):
    """gemv_nibble's serial and parallel drivers called directly (the public
    calls of a GEMV stay serial below gemm.SERIAL_MACS), int8 bytes flipped
    inside, and rows past the 2-row tile: every row computed."""
    if "avx2" not in lowprec.available_isas():
        pytest.skip("this CPU cannot run the avx2 path")
    from lowprec.kernels import int8_gemm_ymm as y

    rng = np.random.default_rng(M)
    K, N = 75, 37
    a = rng.integers(-128, 128, (M, K), dtype=np.int8)
    b = rng.integers(-128, 128, (K, N), dtype=np.int8)
    bp = y.pack_b(b, y.GEMV_NR)
    want = (a.astype(np.int64) + 128) @ b
    z1, zn = np.zeros(1, np.int64), np.zeros(N, np.int64)
    epi = (z1, z1, zn, zn, zn, np.ones((1, 1)), 0.0, 0.0, 0.0, 0,
           np.zeros(N, np.float32))  # fmt: skip
    for driver in (y.gemv_nibble_serial, y.gemv_nibble):
        out = np.full((M, N), 7, np.int32)
        nib = np.full((M, 2, 4 * bp.shape[1]), 9, np.uint8)
        driver(a.view(np.uint8), 0x80, nib, bp, epi, out, -1, K)
        np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_packed_weights_with_zero_rows(isa):
    """M = 0 with packed weights returns an empty result on every route (it
    ran the GEMV kernel on the empty output, or recursed on its 0 strides)."""
    if isa not in lowprec.available_isas():
        pytest.skip(f"this CPU cannot run the {isa} path")
    before = lowprec.get_isa()
    lowprec.set_isa(isa)
    try:
        for N in (1, 3):
            p = lowprec.pack_weights(np.ones((5, N), np.int8), None, np.float32(0.1))
            a = np.zeros((0, 5), np.uint8)
            assert lowprec.matmul_integer(a, p).shape == (0, N)
            got = lowprec.qlinear_matmul(
                a, np.float32(0.1), np.uint8(0), p, None, None, np.float32(0.2),
                np.uint8(3),
            )  # fmt: skip
            assert got.shape == (0, N)
            assert got.dtype == np.uint8
    finally:
        lowprec.set_isa(before)


def test_qlinear_matmul_repeated_arguments(monkeypatch):
    """A call passing the very argument objects of the pack's last fast call
    skips their checks (PackedWeights._last_call). Checked: a repeat really
    skips them; every argument changed alone (the memo primed before each
    call), equal values of other types included (a float32 a_scale equal to
    the float16 one gives another multiplier against float16 b / y scales);
    array arguments changed in place (never remembered); bias, activation,
    out_dtype, batched a; and arguments the checks reject still raise."""
    rng = np.random.default_rng(11)
    a = rng.integers(0, 256, (3, 40), dtype=np.uint8)
    b = rng.integers(-128, 128, (40, 20), dtype=np.int8)
    sb, zb = np.float16(0.01), np.int8(0)
    p = lowprec.pack_weights(b, zb, sb)
    sa, za, sy, zy = np.float16(0.01), np.uint8(7), np.float16(0.3), np.uint8(128)
    base = (sa, za, p, None, None, sy, zy)
    prime = [base]

    def check(a, sa=sa, za=za, sy=sy, zy=zy, **kw):
        lowprec.qlinear_matmul(a0, *prime[0])  # the memo holds these objects
        got = lowprec.qlinear_matmul(a, sa, za, p, None, None, sy, zy, **kw)
        want = ref.qlinear_matmul(a, sa, za, b, sb, zb, sy, zy, **kw)
        assert got.dtype == want.dtype
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)

    a0 = a
    lowprec.qlinear_matmul(a, *base)
    calls = []
    fast_2d = gemm._fast_2d
    monkeypatch.setattr(gemm, "_fast_2d", lambda *x: calls.append(1) or fast_2d(*x))
    check(a)
    check(a[:1])
    check(np.asfortranarray(a))
    assert calls == [], "repeated arguments went through the checks"
    monkeypatch.undo()
    check(a, sa=np.float32(sa))  # equal value, float32 multiplier (differs)
    check(a, za=np.uint8(9))
    check(a, zy=np.uint8(100))
    prime[0] = (sa, za, p, None, None, sy, np.uint8(100))
    check(a, zy=np.int8(100))  # equal value, int8 output
    sy_arr = np.array(0.3, np.float16)
    prime[0] = (sa, za, p, None, None, sy_arr, zy)
    check(a, sy=sy_arr)
    sy_arr[...] = 0.05
    check(a, sy=sy_arr)
    prime[0] = base
    check(a, bias=np.arange(20, dtype=np.int32) * 40)
    check(a, activation="relu")
    check(a, out_dtype=np.float32)
    check(rng.integers(0, 256, (2, 40, 40), dtype=np.uint8))  # K in shape[1]
    prime[0] = (sa, None, p, None, None, sy, zy)
    check(a.view(np.int8), za=None)  # the same None, int8 a: another offset
    prime[0] = base
    names = ("a", "a_scale", "a_zero_point", "b", "b_scale", "b_zero_point",
             "y_scale", "y_zero_point")  # fmt: skip
    for bad in (
        {"a_scale": np.float64(sa)},
        {"a_zero_point": np.int8(7)},
        {"b_scale": np.float16(0.02)},
        {"b_zero_point": np.int8(1)},
        {"a": a[:, :39]},
    ):
        kw = dict(zip(names, (a, *base), strict=True)) | bad
        lowprec.qlinear_matmul(a, *base)
        with pytest.raises((TypeError, ValueError)):
            lowprec.qlinear_matmul(*(kw[k] for k in names))
