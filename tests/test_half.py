"""matmul_fp16 / matmul_bf16: the accuracy contract of lowprec/half.py, every path.

The oracles below are written from the documented summation order, in numpy
float32 arithmetic: every product of two float16/bfloat16 values is exact in
float32, so ``acc + a * b`` in float32 rounds exactly once per step, as the
kernels' fused multiply-adds do.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowprec import half

try:
    import ml_dtypes
except ImportError:  # optional: bfloat16 also travels as uint16 bit patterns
    ml_dtypes = None
needs_ml_dtypes = pytest.mark.skipif(ml_dtypes is None, reason="needs ml_dtypes")
U = 2.0**-24


@pytest.fixture(params=half.available_half_isas())
def half_isa(request):
    """Run the test once per half-precision path this CPU supports (forced)."""
    before = half.get_half_isa()
    half.set_half_isa(request.param)
    yield request.param
    half.set_half_isa(before)


# --------------------------------------------------------------------------- #
# oracles


def ref_fp16(a, b):
    """float32 sum over k ascending, one rounding per step (2-D a, b)."""
    a32 = f32(a)
    b32 = f32(b)
    acc = np.zeros((a.shape[0], b.shape[1]), np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        for k in range(a.shape[1]):
            acc = acc + a32[:, k : k + 1] * b32[k : k + 1, :]
    return acc


def ref_bf16(a, b):
    """The documented bfloat16 order of the path in use (forced by half_isa)."""
    if half.get_half_isa() == "amx_bf16":
        return ref_bf16_blocks(a, b)
    return ref_bf16_pairs(a, b)


def ref_bf16_pairs(a, b):
    """float32 sum over pairs (2j+1 first, then 2j), one rounding per step."""
    a32 = f32(a)
    b32 = f32(b)
    K = a.shape[1]
    acc = np.zeros((a.shape[0], b.shape[1]), np.float32)
    order = []
    for j in range(K // 2):
        order += [2 * j + 1, 2 * j]
    if K % 2:
        order.append(K - 1)
    with np.errstate(invalid="ignore", over="ignore"):
        for k in order:
            acc = acc + a32[:, k : k + 1] * b32[k : k + 1, :]
    return acc


def _ftz(x):
    """float32 with subnormals flushed to zero (sign kept)."""
    x = np.asarray(x, np.float32)
    return np.where(np.abs(x) < np.float32(2.0**-126), x * np.float32(0), x)


def ref_bf16_blocks(a, b):
    """The amx_bf16 order: per block of 32 k (K zero-padded), an even and an
    odd float32 sum from +0 over the block's 16 pairs ascending, one rounding
    per step, then acc = fl32(acc + fl32(E + O)); subnormals flushed to zero.
    Each step rounds a * b + E once (float64 holds the product and the sum
    exactly for these tests' values: an FMA, like the SDM's pseudocode)."""
    M, K = a.shape
    N = b.shape[1]
    kp = -(-max(K, 1) // 32) * 32
    a64 = np.zeros((M, kp))
    b64 = np.zeros((kp, N))
    a64[:, :K] = _ftz(f32(a))
    b64[:K] = _ftz(f32(b))
    acc = np.zeros((M, N), np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        for k0 in range(0, kp, 32):
            sums = []
            for parity in (0, 1):
                s = np.zeros((M, N), np.float32)
                for k in range(k0 + parity, k0 + 32, 2):
                    step = s.astype(np.float64) + a64[:, k : k + 1] * b64[k : k + 1, :]
                    s = _ftz(step.astype(np.float32))
                sums.append(s)
            acc = _ftz(acc + _ftz(sums[0] + sums[1]))
    return acc


def epilogue(acc, bias=None, lo=-np.inf, hi=np.inf):
    y = acc if bias is None else (acc + bias.astype(np.float32)).astype(np.float32)
    y = y.copy()
    y[y < np.float32(lo)] = np.float32(lo)
    y[y > np.float32(hi)] = np.float32(hi)
    return y


def bf16(x):
    """float values -> bfloat16 bit patterns (uint16), round to nearest even."""
    return half.float32_to_bfloat16(np.asarray(x, np.float32))


def f32(x):
    """float16 values or bfloat16 bit patterns -> float32, exactly."""
    if x.dtype == np.uint16:
        return half.bfloat16_to_float32(x)
    return x.astype(np.float32)


def same_bits(x, y):
    """Equal values, signed zeros equal, NaN where NaN."""
    assert x.shape == y.shape
    assert x.dtype == y.dtype
    nan = np.isnan(f32(x))
    assert (nan == np.isnan(f32(y))).all()
    return bool(np.array_equal(x[~nan], y[~nan]))


def rand(rng, shape, dtype, scale=1.0):
    x = rng.standard_normal(shape) * scale
    return bf16(x) if dtype == "bf16" else x.astype(dtype)


shapes = st.tuples(
    st.integers(1, 14), st.integers(1, 40), st.integers(1, 140), st.integers(0, 2**32)
)


# --------------------------------------------------------------------------- #
# the accuracy contract


@given(shapes)
def test_fp16_equals_ordered_float32_sum(half_isa, shape):
    M, K, N, seed = shape
    rng = np.random.default_rng(seed)
    a, b = rand(rng, (M, K), np.float16), rand(rng, (K, N), np.float16)
    got = half.matmul_fp16(a, b)
    assert got.dtype == np.float32
    assert same_bits(got, ref_fp16(a, b))


@given(shapes)
def test_bf16_equals_ordered_float32_sum(half_isa, shape):
    M, K, N, seed = shape
    rng = np.random.default_rng(seed)
    a, b = rand(rng, (M, K), "bf16"), rand(rng, (K, N), "bf16")
    got = half.matmul_bf16(a, b)
    assert same_bits(got, ref_bf16(a, b))
    assert same_bits(half.matmul_bf16(a[-1:], b), got[-1:])  # whatever M is
    if ml_dtypes is not None:  # ml_dtypes arrays are the same input
        bf = ml_dtypes.bfloat16
        assert same_bits(half.matmul_bf16(a.view(bf), b.view(bf)), got)


def test_bf16_pair_order(half_isa):
    # 1 + 2**-30 rounds to 1: the result tells which term of the pair came
    # first, or (amx_bf16) that even and odd k are summed apart
    b = np.ones((4, 1), np.float32)
    odd_first = np.array([[1.0, 0.0, 2.0**-30, -1.0]], np.float32)
    even_first = np.array([[1.0, 0.0, -1.0, 2.0**-30]], np.float32)
    conv = half.float32_to_bfloat16
    got_even = half.matmul_bf16(conv(even_first), conv(b))[0, 0]
    got_odd = half.matmul_bf16(conv(odd_first), conv(b))[0, 0]
    if half_isa == "amx_bf16":
        # E = 1 + 2**-30 -> 1, O = -1: 0; E = 1 - 1 = 0, O = 2**-30
        assert (got_odd, got_even) == (0.0, 2.0**-30)
    else:
        assert (got_odd, got_even) == (2.0**-30, 0.0)


@pytest.mark.skipif(
    "amx_bf16" not in half.available_half_isas(), reason="needs AMX-BF16 (Linux)"
)
@pytest.mark.parametrize(
    ("where", "expect"),
    [
        # 1 + 0.75u + 0.75u: 1 if each 0.75u is added to 1 on its own
        # (rounds back to 1), 1 + 2u if the two are summed first (1.5u)
        ({0: 1.0, 1: 0.75 * U, 3: 0.75 * U}, 1 + 2 * U),  # O = 1.5u, then E + O
        ({0: 1.0, 2: 0.75 * U, 4: 0.75 * U}, 1.0),  # both in E, one at a time
        ({0: 1.0, 31: 0.75 * U, 33: 0.75 * U}, 1.0),  # odd k of two blocks
        ({0: 1.0, 33: 0.75 * U, 35: 0.75 * U}, 1 + 2 * U),  # one block's O
        ({40: 1.0, 33: 0.75 * U, 35: 0.75 * U}, 1 + 2 * U),
        ({0: 1.0, 2: -1.0, 3: 2.0**-30}, 2.0**-30),  # E = 0 exactly
        ({0: 1.0, 1: -1.0, 3: 2.0**-30}, 0.0),  # O = -1 + 2**-30 -> -1
        ({0: 1.0, 32: -1.0, 35: 2.0**-30}, 0.0),  # acc + fl(E + O) -> 0
    ],
)
def test_bf16_amx_block_order(where, expect):
    """The amx_bf16 order on values whose sum tells the grouping apart (u =
    2**-24): even / odd sums per block of 32 k, each block's E + O rounded
    before it meets the accumulator."""
    before = half.get_half_isa()
    half.set_half_isa("amx_bf16")
    try:
        a = np.zeros((1, 64), np.float32)
        for k, x in where.items():
            a[0, k] = x
        b = np.ones((64, 1), np.float32)
        a16, b16 = bf16(a), bf16(b)
        got = half.matmul_bf16(a16, b16)[0, 0]
        assert got == np.float32(expect)
        assert got == ref_bf16_blocks(a16, b16)[0, 0]
    finally:
        half.set_half_isa(before)


def test_bf16_products_outside_the_normal_range(half_isa):
    # bfloat16 has float32's exponent range: a product may overflow (inf) or
    # be subnormal (rounded), so only a product rounded before the add gives
    # the documented order's bits (an FMA's exact product would not: 2**126
    # and a subnormal tie rounded the other way, seen on the avx2 strips)
    # (amx_bf16 too: its oracle flushes subnormals as the hardware does)
    if half_isa == "avx512_bf16":
        pytest.skip(
            "vdpbf16ps flushes subnormals (documented); its overflow rounding "
            "was not checked on an AVX512_BF16 CPU"
        )
    conv = half.float32_to_bfloat16
    for a, b in (
        ([-1.5 * 2.0**63, 0, 2.0**64, 0], [2.0**64, 0, 2.0**64, 0]),
        ([2.0**-100, 0, 2.0**-75, 0], [2.0**-49, 0, 2.0**-75, 0]),
    ):
        a16 = conv(np.array([a], np.float32))
        b16 = conv(np.array(b, np.float32).reshape(4, 1))
        assert same_bits(half.matmul_bf16(a16, b16), ref_bf16(a16, b16))


def _products_exact(a16, b16):
    """Every a*b exact in float32, by float64 arithmetic (exact for two
    bfloat16 values): the float32 rounding of the product changes nothing."""
    a = half.bfloat16_to_float32(a16).astype(np.float64).reshape(-1, 1)
    b = half.bfloat16_to_float32(b16).astype(np.float64).reshape(1, -1)
    with np.errstate(over="ignore", invalid="ignore"):
        p = a * b
        return bool(np.all(p.astype(np.float32).astype(np.float64) == p))


T = 1 + 2.0**-7  # a bfloat16 with its last significand bit set


@pytest.mark.parametrize(
    ("a", "b", "expect", "exact"),
    [
        ([1.5, -3.0, 0.0], [2.0**-20, 1e4, 0.0], True, True),  # ordinary values
        ([0.0, 0.0], [2.0**100, 0.0], True, True),  # zeros only in a
        ([2.0**63], [2.0**63], True, True),  # 2**126: at the bound
        ([2.0**64], [2.0**64], False, False),  # 2**128 overflows
        ([1.0], [2.0**127], False, True),  # exact, past the bound: refused
        ([1.5 * 2.0**-100], [2.0**-35], True, True),  # 1.5 * 2**-135, subnormal
        ([1.5 * 2.0**-100], [2.0**-40], False, True),  # exact, refused
        ([T * 2.0**-126], [T * 2.0**-16], False, False),  # needs 2**-156
        ([np.inf], [1.0], False, True),  # refused: not finite
        ([np.nan], [1.0], False, False),
    ],
)
def test_bf16_exact_products_check(a, b, expect, exact):
    # the check that lets the avx2_f16c bfloat16 strips use FMAs: true only
    # where every product is exact (there an FMA's bits equal a rounded
    # product's); conservative near the range's ends
    from lowprec.kernels import fp16_gemm as fg

    a16 = half.float32_to_bfloat16(np.array([a], np.float32))
    b16 = half.float32_to_bfloat16(np.array([b], np.float32))
    ok = fg.bf16_products_exact(fg.bf16_exponents(a16), fg.bf16_exponents(b16))
    assert ok == expect
    assert _products_exact(a16, b16) == exact


def test_bf16_fma_strips_match_multiply_add(monkeypatch):
    # avx2_f16c, bfloat16: calls whose products are all exact run the FMA
    # strips (prepacked weights, >= 128 columns: the check's cost policy);
    # the multiply-add strips give the same bits; a subnormal in a, or raw
    # weights with few rows, run the multiply-add strips
    if "avx2_f16c" not in half.available_half_isas():
        pytest.skip("this CPU cannot run the avx2_f16c path")
    from lowprec.kernels import fp16_gemm as fg

    monkeypatch.setattr(half, "_selected", "avx2_f16c")
    seen = []
    for name in ("gemm_bf16", "gemm_bf16_serial"):
        real = getattr(fg, name)
        monkeypatch.setattr(
            fg, name, lambda *a, real=real: seen.append(a[-1]) or real(*a)
        )
    rng = np.random.default_rng(8)
    # M: tiles of 1, 2, 3, 5 and 6 rows (each strip width of both forms)
    for M, K, N in ((1, 9, 130), (2, 4, 128), (3, 8, 150), (5, 9, 140), (40, 300, 130)):
        a, b = rand(rng, (M, K), "bf16"), rand(rng, (K, N), "bf16")
        ref = ref_bf16(a, b)
        assert same_bits(half.matmul_bf16(a, half.pack_weights_bf16(b)), ref)
        assert seen[-1] == 2
        assert same_bits(half.matmul_bf16(a, b), ref)
        assert seen[-1] == 1  # raw weights, M < 128: not worth the scan
        a[M - 1, 2] = 1  # the smallest subnormal, 2**-133, times
        b[2, 5] = 0x0080  # the smallest normal, 2**-126: 0 after rounding
        got = half.matmul_bf16(a, half.pack_weights_bf16(b))
        assert seen[-1] == 1
        assert same_bits(got, ref_bf16(a, b))
    a, b = rand(rng, (130, 6), "bf16"), rand(rng, (6, 128), "bf16")
    assert same_bits(half.matmul_bf16(a, b), ref_bf16(a, b))
    assert seen[-1] == 2  # raw weights, 130 rows: checked


def test_bf16_tile_stand_in_is_exact(monkeypatch):
    """The vdpbf16ps tile as compiled where LLVM's target lacks AVX512_BF16
    (gemm_bf16 holds it next to the avx2_f16c strips, so AVX2 CPUs compile it
    without running it; the intrinsic would abort LLVM there): two FMAs on the
    widened pairs, the documented order's bits."""
    from numba import njit

    from lowprec.kernels import fp16_gemm as fg

    monkeypatch.setattr(fg, "target_has", lambda context, *features: False)
    tile = fg.make_tile_kernel(3, "bf16")

    @njit
    def one_tile(a, b, ks, c):
        tile(a.ctypes.data, a.strides[0], b.ctypes.data, ks, c.ctypes.data,
             c.shape[1], 0)  # fmt: skip

    rng = np.random.default_rng(3)
    for K in (2, 10, 64):  # even: the driver pads odd K with a zero pair
        a, b = rand(rng, (3, K), "bf16"), rand(rng, (K, 50), "bf16")
        c = np.zeros((3, fg.NR), np.float32)
        one_tile(a.view(np.uint32), fg.pack_b_bf16(b)[0], K // 2, c)
        assert same_bits(c[:, :50], ref_bf16_pairs(a, b))


@pytest.mark.parametrize("K", [1, 7, 64, 333, 2048])
@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_error_bound_vs_float64(half_isa, kind, K):
    rng = np.random.default_rng(K)
    dt = np.float16 if kind == "fp16" else "bf16"
    fn = half.matmul_fp16 if kind == "fp16" else half.matmul_bf16
    a, b = rand(rng, (5, K), dt), rand(rng, (K, 70), dt)
    got = fn(a, b).astype(np.float64)
    a64, b64 = f32(a).astype(np.float64), f32(b).astype(np.float64)
    exact = a64 @ b64  # the error of this float64 sum is far below the bound
    gamma = K * U / (1 - K * U)
    bound = gamma * (np.abs(a64) @ np.abs(b64))
    assert (np.abs(got - exact) <= bound).all()


@pytest.mark.parametrize("scale", [1.0, 150.0, 3e-3])
def test_fp16_output_is_float32_rounded_once(half_isa, scale):
    # scale 150: many sums exceed 65504 and must become +-inf; 3e-3: many
    # fall below float16's normal range (6.1e-5) and round to subnormals.
    # 77 columns: the SIMD paths convert 16 at a time, then a tail of 13
    rng = np.random.default_rng(3)
    a, b = rand(rng, (9, 50), np.float16, scale), rand(rng, (50, 77), np.float16, scale)
    a[4, 7] = np.nan  # a row of NaN through the conversion
    bias = rand(rng, (77,), np.float32) * np.float32(min(scale, 1.0))
    for act in (None, "relu", (-3.0, 1e6)):
        y32 = half.matmul_fp16(a, b, bias=bias, activation=act)
        y16 = half.matmul_fp16(a, b, bias=bias, activation=act, out_dtype=np.float16)
        assert y16.dtype == np.float16
        with np.errstate(over="ignore"):
            assert same_bits(y16, y32.astype(np.float16))
        assert np.isinf(y16).any() == (scale > 1)
        assert np.isnan(y16[4]).all()
        if scale < 1:  # float16 subnormals among the outputs
            mag = np.abs(y16[np.isfinite(y16)])
            assert ((mag > 0) & (mag < np.float16(6.1e-5))).any()


def test_bf16_output_is_float32_rounded_once(half_isa):
    rng = np.random.default_rng(4)
    a, b = rand(rng, (7, 33), "bf16"), rand(rng, (33, 65), "bf16")
    y32 = half.matmul_bf16(a, b, activation="relu6")
    y = half.matmul_bf16(a, b, activation="relu6", out_dtype=np.uint16)
    assert y.dtype == np.uint16
    assert same_bits(y, bf16(y32))
    if ml_dtypes is not None:
        bf = half.matmul_bf16(a, b, activation="relu6", out_dtype=ml_dtypes.bfloat16)
        assert bf.dtype == ml_dtypes.bfloat16
        assert np.array_equal(bf.view(np.uint16), y)
        assert np.array_equal(y32.astype(ml_dtypes.bfloat16).view(np.uint16), y)


@pytest.mark.parametrize("act", [None, "relu", "relu6", (-0.5, 0.7)])
def test_bias_and_activation(half_isa, act):
    rng = np.random.default_rng(5)
    a, b = rand(rng, (8, 19), np.float16), rand(rng, (19, 70), np.float16)
    bias = rand(rng, (70,), np.float32)
    lo, hi = {None: (-np.inf, np.inf), "relu": (0, np.inf), "relu6": (0, 6)}.get(
        act, act
    )
    got = half.matmul_fp16(a, b, bias=bias, activation=act)
    assert same_bits(got, epilogue(ref_fp16(a, b), bias, lo, hi))
    ab, bb = bf16(a), bf16(b)
    got = half.matmul_bf16(ab, bb, bias=np.float32(0.25), activation=act)
    assert same_bits(got, epilogue(ref_bf16(ab, bb), np.float32(0.25), lo, hi))


def test_nan_and_inf_propagate(half_isa):
    a = np.ones((3, 6), np.float16)
    b = np.ones((6, 20), np.float16)
    a[0, 2] = np.nan  # row 0 -> NaN
    a[1, 3] = np.inf  # row 1 -> +inf
    b[4, 5] = np.inf  # column 5: row 2 -> inf; row 1 -> inf; row 0 NaN
    b[5, 7] = 0  # nothing special
    a[2, 5] = 0
    b[5, 9] = np.inf  # a[2,5] = 0 times inf -> NaN at (2, 9)
    for fn, conv in ((half.matmul_fp16, np.asarray), (half.matmul_bf16, bf16)):
        got = fn(conv(a), conv(b), activation="relu")
        assert np.isnan(got[0]).all()
        assert np.isposinf(got[1, :9]).all()
        assert np.isposinf(got[1, 10:]).all()
        assert np.isposinf(got[2, 5])
        assert np.isnan(got[2, 9])
        assert got[2, 0] == 5  # a[2, 5] = 0


def test_large_k_and_parallel_path(half_isa):
    # > SERIAL_MACS multiply-adds: the threaded kernels
    rng = np.random.default_rng(6)
    a, b = rand(rng, (70, 130), np.float16), rand(rng, (130, 150), np.float16)
    assert 70 * 130 * 150 >= half.SERIAL_MACS
    assert same_bits(half.matmul_fp16(a, b), ref_fp16(a, b))
    ab, bb = bf16(a), bf16(b)
    assert same_bits(half.matmul_bf16(ab, bb), ref_bf16(ab, bb))


def _aligned_copy(x):
    """x (2-D) copied to a 64-byte aligned C-contiguous array."""
    raw = np.empty(x.size + 32, x.dtype)
    off = (-raw.ctypes.data % 64) // x.itemsize
    out = raw[off : off + x.size].reshape(x.shape)
    out[...] = x
    return out


@pytest.mark.skipif(
    "amx_bf16" not in half.available_half_isas(), reason="needs AMX-BF16 (Linux)"
)
@pytest.mark.parametrize(
    ("M", "K", "N"),
    [
        (16, 64, 64),  # one 16-row step, stored straight into out
        (64, 96, 128),  # whole 32-row steps
        (50, 64, 70),  # an 18-row last step (16 + 2 rows); a 6-column panel
        (300, 1024, 70),  # several row blocks (> A_BLOCK_BYTES of a)
        (5, 40, 33),  # K not a multiple of 32: zeros in the copy
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_amx_blocks(M, K, N, threads):
    """The amx_bf16 driver's cases (row blocks copied as tiles, partial
    steps, direct float32 stores or the epilogue, serial and threaded, a
    strided a) against the block order's oracle; rows independent of M."""
    import numba

    from lowprec import _dispatch

    before = half.get_half_isa(), _dispatch.num_threads()
    half.set_half_isa("amx_bf16")
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        rng = np.random.default_rng(M * K + N)
        a = _aligned_copy(rand(rng, (M, K), "bf16"))
        b = half.pack_weights_bf16(rand(rng, (K, N), "bf16"))
        ref = ref_bf16_blocks(a, b._bits)
        assert same_bits(half.matmul_bf16(a, b), ref)
        assert same_bits(half.matmul_bf16(a[1:], b), ref[1:])  # off alignment
        bias = rand(rng, (N,), np.float32)
        got = half.matmul_bf16(a, b, bias=bias, activation="relu", out_dtype=np.uint16)
        assert same_bits(got, bf16(epilogue(ref, bias, 0.0)))
    finally:
        half.set_half_isa(before[0])
        numba.set_num_threads(before[1])


def test_empty_dimensions(half_isa):
    a = np.ones((3, 0), np.float16)
    b = np.ones((0, 5), np.float16)
    got = half.matmul_fp16(a, b, bias=np.full(5, 2.0, np.float32))
    assert np.array_equal(got, np.full((3, 5), 2.0, np.float32))
    assert half.matmul_fp16(
        np.ones((0, 4), np.float16), np.ones((4, 5), np.float16)
    ).shape == (0, 5)
    assert half.matmul_bf16(bf16(np.ones((2, 4))), bf16(np.ones((4, 0)))).shape == (
        2,
        0,
    )


# --------------------------------------------------------------------------- #
# numpy matmul broadcasting, packing


@pytest.mark.parametrize(
    ("sa", "sb"),
    [
        ((2, 3, 5, 9), (9, 7)),
        ((4, 9), (2, 9, 7)),
        ((2, 1, 5, 9), (3, 9, 7)),
        ((9,), (9, 7)),
        ((5, 9), (9,)),
        ((9,), (9,)),
    ],
)
def test_broadcasting(half_isa, sa, sb):
    rng = np.random.default_rng(7)
    a, b = rand(rng, sa, np.float16), rand(rng, sb, np.float16)
    got = half.matmul_fp16(a, b)
    want_shape = np.matmul(a.astype(np.float32), b.astype(np.float32)).shape
    assert got.shape == want_shape
    a2 = a.reshape((1, -1)) if a.ndim == 1 else a
    b2 = b.reshape((-1, 1)) if b.ndim == 1 else b
    batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    a_b = np.broadcast_to(a2, (*batch, *a2.shape[-2:]))
    b_b = np.broadcast_to(b2, (*batch, *b2.shape[-2:]))
    ref = np.empty((*batch, a2.shape[-2], b2.shape[-1]), np.float32)
    for idx in np.ndindex(*batch):
        ref[idx] = ref_fp16(a_b[idx], b_b[idx])
    assert same_bits(got, ref.reshape(want_shape))
    got = half.matmul_bf16(bf16(a), bf16(b))
    assert got.shape == want_shape


def test_packed_weights(half_isa):
    rng = np.random.default_rng(8)
    a, b = rand(rng, (2, 6, 21), np.float16), rand(rng, (21, 90), np.float16)
    p = half.pack_weights_fp16(b)
    b_before = b.copy()
    assert same_bits(half.matmul_fp16(a, p), half.matmul_fp16(a, b))
    b[0, 0] = 100  # the pack holds its own copy
    assert same_bits(half.matmul_fp16(a, p), half.matmul_fp16(a, b_before))
    with pytest.raises(AttributeError, match="immutable"):
        p.shape = (1, 1)
    assert "K=21, N=90" in repr(p)
    assert p.nbytes > 0
    ab, bb = bf16(a), bf16(b_before)
    pb = half.pack_weights_bf16(bb)
    assert same_bits(half.matmul_bf16(ab, pb), half.matmul_bf16(ab, bb))
    with pytest.raises(TypeError, match="matmul_bf16"):
        half.matmul_fp16(a, pb)
    with pytest.raises(TypeError, match="already packed"):
        half.pack_weights_fp16(p)


def test_inputs_not_modified(half_isa):
    rng = np.random.default_rng(9)
    a, b = rand(rng, (5, 11), np.float16), rand(rng, (11, 6), np.float16)
    bias = rand(rng, (6,), np.float32)
    copies = [x.copy() for x in (a, b, bias)]
    half.matmul_fp16(a, b, bias=bias, activation="relu", out_dtype=np.float16)
    half.matmul_bf16(bf16(a), bf16(b), bias=bias)
    for x, c in zip((a, b, bias), copies, strict=True):
        assert np.array_equal(x, c)


def test_non_contiguous_inputs(half_isa):
    rng = np.random.default_rng(10)
    a = rand(rng, (9, 40), np.float16)[::2, ::3]
    b = rand(rng, (28, 26), np.float16)[::2, ::2]
    assert same_bits(half.matmul_fp16(a, b), ref_fp16(a, b))


# --------------------------------------------------------------------------- #
# conversions


@needs_ml_dtypes
def test_float32_to_bfloat16_round_to_nearest_even():
    bf = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(11)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    specials = np.array(
        [
            0,
            0x80000000,
            0x7F800000,
            0xFF800000,
            0x7F7FFFFF,
            0x3F808000,
            0x3F818000,
            0x00000001,
            0x807FFFFF,
            0x7FC00001,
            0xFF800001,
            0x7F800001,
        ],
        np.uint32,
    )
    x = np.concatenate([bits, specials]).view(np.float32)
    got = half.float32_to_bfloat16(x)
    assert got.dtype == np.uint16
    with np.errstate(invalid="ignore"):
        want = x.astype(bf).view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], want[~nan])
    back = half.bfloat16_to_float32(got)
    assert np.isnan(back[nan]).all()
    # sign kept, NaN quiet
    assert np.array_equal(got[nan] >> 15, x[nan].view(np.uint32) >> 31)
    assert (got[nan] & 0x40).all()
    assert (
        half.float32_to_bfloat16(np.float32([3.0e38, 3.4e38]))
        .view(bf)
        .astype(np.float32)[1]
        == np.inf
    )
    assert half.float32_to_bfloat16(x[:5], out_dtype=bf).dtype == bf


def test_bfloat16_to_float32_exact():
    bits = np.arange(2**16, dtype=np.uint16)
    got = half.bfloat16_to_float32(bits)
    assert np.array_equal(got.view(np.uint32), bits.astype(np.uint32) << 16)
    if ml_dtypes is not None:
        same = half.bfloat16_to_float32(bits.view(ml_dtypes.bfloat16))
        assert np.array_equal(same.view(np.uint32), got.view(np.uint32))
    one = half.bfloat16_to_float32(np.array(0x3FC0, np.uint16))  # 0-d: an array
    assert type(one) is np.ndarray
    assert one.shape == ()
    assert one == 1.5


# --------------------------------------------------------------------------- #
# errors


def test_errors():
    a16 = np.ones((2, 3), np.float16)
    b16 = np.ones((3, 4), np.float16)
    with pytest.raises(
        TypeError, match=r"a must have dtype float16.*a\.astype\(np\.float16\)"
    ):
        half.matmul_fp16(a16.astype(np.float32), b16)
    with pytest.raises(TypeError, match=r"b\.astype\(np\.float16\)"):
        half.matmul_fp16(a16, b16.astype(np.float32))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        half.matmul_fp16([[1.0]], b16)
    with pytest.raises(ValueError, match="inner dimensions differ"):
        half.matmul_fp16(a16, np.ones((4, 4), np.float16))
    with pytest.raises(ValueError, match="do not broadcast"):
        half.matmul_fp16(np.ones((2, 2, 3), np.float16), np.ones((3, 3, 4), np.float16))
    with pytest.raises(ValueError, match=r"bias must be a scalar or have shape \(4,\)"):
        half.matmul_fp16(a16, b16, bias=np.ones(3, np.float32))
    with pytest.raises(TypeError, match="bias"):
        half.matmul_fp16(a16, b16, bias=np.ones(4, np.float64))
    with pytest.raises(TypeError, match="out_dtype"):
        half.matmul_fp16(a16, b16, out_dtype=np.int8)
    with pytest.raises(ValueError, match="activation"):
        half.matmul_fp16(a16, b16, activation="gelu")
    with pytest.raises(TypeError, match="float32_to_bfloat16"):
        half.matmul_bf16(a16.astype(np.float32), bf16(b16))
    with pytest.raises(TypeError, match="out_dtype"):
        half.matmul_bf16(bf16(a16), bf16(b16), out_dtype=np.float16)
    with pytest.raises(ValueError, match="2-D"):
        half.pack_weights_fp16(np.ones(3, np.float16))
    with pytest.raises(ValueError, match="not a half-precision path"):
        half.set_half_isa("avx9000")
    with pytest.raises(TypeError, match=r"x\.astype\(np\.float32\)"):
        half.float32_to_bfloat16(np.ones(3))
