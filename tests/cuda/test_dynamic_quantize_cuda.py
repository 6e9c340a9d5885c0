"""dynamic_quantize_linear_cuda / dynamic_quantize_matmul_cuda: bit-identical to
the CPU functions and the NumPy oracle of eqs. 3 and 14 (tests/reference.py),
in the simulator or on a GPU (tests/cuda/conftest.py). With the small tiles,
13 x 7 values span three reduction blocks of 8 threads (grid-stride) and the
one-block second pass; the matmul's GEMM spans 2 x 2 blocks and K stages."""

import numpy as np
import pytest

import lowprec
import reference as ref
from lowprec import cuda_ops

pytestmark = pytest.mark.cuda_exec


def _dev(x):
    from numba import cuda

    return cuda.to_device(x)


def _host(x):
    return x.copy_to_host() if hasattr(x, "copy_to_host") else x


def _check_dql(x, got):
    y, s, z = got
    cy, cs, cz = lowprec.dynamic_quantize_linear(x)
    np.testing.assert_array_equal(_host(y), cy)
    assert (s.dtype, s.shape, z.dtype, z.shape) == (np.float32, (), np.uint8, ())
    assert s.tobytes() == cs.tobytes()
    assert z == cz
    oy, os_, oz = ref.dynamic_quantize(x)
    np.testing.assert_array_equal(_host(y), oy)
    assert (s, int(z)) == (os_, oz)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_dynamic_quantize_linear_bits(small_tiles):
    rng = np.random.default_rng(5)
    cases = [
        (rng.normal(0.5, 3, (13, 7))).astype(np.float32),
        rng.uniform(0.5, 9, (5, 6)).astype(np.float32),  # all positive: zp 0
        -rng.uniform(0.5, 9, 23).astype(np.float32),  # all negative: zp 255
        np.zeros((3, 4), np.float32),  # max == min: range 1
        np.full(9, -0.0, np.float32),
        np.array([3.0e38, -3.0e38], np.float32),  # the range overflows float32
    ]
    for x in cases[:-1]:
        got = cuda_ops.dynamic_quantize_linear_cuda(_dev(x))
        assert not isinstance(got[0], np.ndarray)  # device in -> device out
        assert tuple(got[0].shape) == x.shape
        _check_dql(x, got)
    with pytest.raises(ValueError, match="finite float32 scale"):
        cuda_ops.dynamic_quantize_linear_cuda(_dev(cases[-1]))
    x = cases[0]
    got = cuda_ops.dynamic_quantize_linear_cuda(x)  # host in -> host out
    assert isinstance(got[0], np.ndarray)
    _check_dql(x, got)
    _check_dql(x, lowprec.dynamic_quantize_linear(_dev(x)))  # routing
    _check_dql(x, lowprec.dynamic_quantize_linear(x, device="cuda"))
    e = cuda_ops.dynamic_quantize_linear_cuda(np.zeros((0, 3), np.float32))
    assert e[0].shape == (0, 3)
    assert e[1] == lowprec.dynamic_quantize_linear(np.zeros((0, 3), np.float32))[1]


def test_dynamic_quantize_linear_odd_block_and_errors(small_tiles, monkeypatch):
    # 6 threads per block: the shared-memory tree with a non-power-of-two width
    monkeypatch.setattr(small_tiles, "THREADS_1D", 6)
    rng = np.random.default_rng(9)
    x = rng.normal(-1, 4, 47).astype(np.float32)
    _check_dql(x, cuda_ops.dynamic_quantize_linear_cuda(_dev(x)))
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[31] = bad
        with pytest.raises(ValueError, match="must be finite") as cpu:
            lowprec.dynamic_quantize_linear(y)
        with pytest.raises(ValueError, match="must be finite") as gpu:
            cuda_ops.dynamic_quantize_linear_cuda(_dev(y))
        assert str(gpu.value) == str(cpu.value)
    with pytest.raises(TypeError, match="x must have dtype float32"):
        cuda_ops.dynamic_quantize_linear_cuda(_dev(x.astype(np.float64)))


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("b_dt", [np.int8, np.uint8])
def test_dynamic_quantize_matmul_bits(small_tiles, per_row, b_dt):
    rng = np.random.default_rng(11 + per_row)
    a = (rng.normal(0, 3, (13, 11)) + rng.uniform(-2, 2)).astype(np.float32)
    a[2] = np.abs(a[2])  # a row with zero point 0 (per_row)
    info = np.iinfo(b_dt)
    b = rng.integers(info.min, info.max, (11, 9), endpoint=True).astype(b_dt)
    sb = (10.0 ** rng.uniform(-3, 0, 9)).astype(np.float32)
    zb = rng.integers(info.min, info.max, 9, endpoint=True).astype(b_dt)
    bias = rng.normal(0, 1, 9).astype(np.float32)
    kw = {"bias": bias, "per_row": per_row}
    got = cuda_ops.dynamic_quantize_matmul_cuda(_dev(a), _dev(b), sb, zb, **kw)
    assert not isinstance(got, np.ndarray)
    got = _host(got)
    assert got.dtype == np.float32
    cpu = lowprec.dynamic_quantize_matmul(a, b, sb, zb, **kw)
    np.testing.assert_array_equal(got.view(np.uint32), cpu.view(np.uint32))
    want = ref.dynamic_quantize_matmul(a, b, sb, zb, bias, per_row)
    np.testing.assert_array_equal(got, want)


def test_dynamic_quantize_matmul_shapes_packed_routing(small_tiles):
    rng = np.random.default_rng(13)
    a = rng.normal(0, 2, (2, 3, 10)).astype(np.float32)
    b = rng.integers(-128, 128, (10, 5)).astype(np.int8)
    sb = np.float16(0.02)  # float16 scale: float32 products, as the CPU
    packed = lowprec.pack_weights(b, np.int8(3), sb)
    for per_row in (False, True):
        for w, args in ((b, (sb, np.int8(3))), (packed, ())):
            got = cuda_ops.dynamic_quantize_matmul_cuda(a, w, *args, per_row=per_row)
            assert isinstance(got, np.ndarray)  # host in -> host out
            assert got.shape == (2, 3, 5)
            cpu = lowprec.dynamic_quantize_matmul(a, w, *args, per_row=per_row)
            np.testing.assert_array_equal(got.view(np.uint32), cpu.view(np.uint32))
    got = lowprec.dynamic_quantize_matmul(_dev(a[0, 0]), packed)  # 1-D a, routed
    assert tuple(got.shape) == (5,)
    np.testing.assert_array_equal(
        _host(got), lowprec.dynamic_quantize_matmul(a[0, 0], packed)
    )
    got = lowprec.dynamic_quantize_matmul(a, b, 0.5, device="cuda", per_row=True)
    want = lowprec.dynamic_quantize_matmul(a, b, 0.5, per_row=True)
    np.testing.assert_array_equal(got, want)
    bad = a.copy()
    bad[1, 2, 4] = np.inf
    for per_row in (False, True):
        with pytest.raises(ValueError, match="finite"):
            cuda_ops.dynamic_quantize_matmul_cuda(bad, b, 0.1, per_row=per_row)
    with pytest.raises(TypeError, match="mixed host"):
        lowprec.dynamic_quantize_matmul(_dev(a), b, 0.1)
    with pytest.raises(ValueError, match="inner dimensions"):
        cuda_ops.dynamic_quantize_matmul_cuda(a, b[:9], 0.1)
    with pytest.raises(ValueError, match="b_scale is required"):
        cuda_ops.dynamic_quantize_matmul_cuda(a, b)
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        cuda_ops.dynamic_quantize_matmul_cuda(a, b, 0.1, bias=np.zeros(4, np.float32))


@pytest.mark.parametrize("per_row", [False, True])
def test_dynamic_quantize_matmul_keeps_negative_zero(small_tiles, per_row):
    # a multiplier that underflows to 0 gives -0.0 for negative sums; without
    # bias neither path adds anything, so the CPU's -0.0 stays on the GPU
    b = np.array([[1, -1], [2, -3], [0, 5], [-4, 1], [3, 3]], np.int8)
    a = np.full((2, 5), 1e-30, np.float32)
    a[1] *= -1
    cpu = lowprec.dynamic_quantize_matmul(a, b, np.float32(1e-20), per_row=per_row)
    assert np.signbit(cpu).any()
    got = lowprec.dynamic_quantize_matmul(a, b, np.float32(1e-20), per_row=per_row,
                                          device="cuda")  # fmt: skip
    np.testing.assert_array_equal(got.view(np.uint32), cpu.view(np.uint32))
