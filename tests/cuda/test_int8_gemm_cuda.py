"""matmul_integer_cuda / qlinear_matmul_cuda against the int64 oracle and,
bit for bit, against the CPU functions. Runs in the CUDA simulator (shapes kept
tiny: one OS thread per CUDA thread) or on a GPU (tests/cuda/conftest.py)."""

import numpy as np
import pytest

import lowprec
import reference as ref
from lowprec import cuda_ops

pytestmark = pytest.mark.cuda_exec

INT8 = [np.uint8, np.int8]


def _rand(rng, shape, dtype):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)


def _dev(x):
    from numba import cuda

    return cuda.to_device(x)


def _host(x):
    return x.copy_to_host() if hasattr(x, "copy_to_host") else x


@pytest.mark.parametrize("a_dt", INT8)
@pytest.mark.parametrize("b_dt", INT8)
def test_matmul_integer_matches_oracle_and_cpu(small_tiles, a_dt, b_dt):
    rng = np.random.default_rng(7)
    a = _rand(rng, (13, 11), a_dt)
    b = _rand(rng, (11, 9), b_dt)
    za = _rand(rng, (13,), a_dt)  # per row
    zb = _rand(rng, (9,), b_dt)  # per column
    got = cuda_ops.matmul_integer_cuda(_dev(a), _dev(b), za, zb)
    assert not isinstance(got, np.ndarray)  # device in -> device out
    got = _host(got)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, ref.int_matmul(a, b, za, zb))
    np.testing.assert_array_equal(got, lowprec.matmul_integer(a, b, za, zb))


def test_extremes_and_no_zero_points(small_tiles):
    # largest products (-128 * 255 sums) and the path without row/col sums
    a = np.full((5, 13), 255, np.uint8)
    b = np.full((13, 3), -128, np.int8)
    got = cuda_ops.matmul_integer_cuda(a, b)
    np.testing.assert_array_equal(got, ref.int_matmul(a, b))
    a8 = np.full((4, 9), -128, np.int8)
    got = cuda_ops.matmul_integer_cuda(a8, b[:9], np.int8(127), np.int8(-128))
    np.testing.assert_array_equal(got, ref.int_matmul(a8, b[:9], 127, -128))


def test_host_arrays_shapes_and_strided_device_views(small_tiles):
    rng = np.random.default_rng(3)
    a = _rand(rng, (2, 3, 6), np.int8)  # batched a folds into rows
    b = _rand(rng, (6, 5), np.uint8)
    got = cuda_ops.matmul_integer_cuda(a, b, np.int8(-3), np.uint8(200))
    assert isinstance(got, np.ndarray)
    assert got.shape == (2, 3, 5)
    np.testing.assert_array_equal(got, lowprec.matmul_integer(a, b, -3, 200))
    v = rng.integers(0, 256, 6).astype(np.uint8)  # 1-D a and 1-D b
    np.testing.assert_array_equal(
        cuda_ops.matmul_integer_cuda(v, b), lowprec.matmul_integer(v, b)
    )
    np.testing.assert_array_equal(
        cuda_ops.matmul_integer_cuda(a[0], b[:, 1]),
        lowprec.matmul_integer(a[0], b[:, 1]),
    )
    big = _dev(_rand(rng, (9, 12), np.uint8))
    sub = big[:, ::2]  # strided device view, read in place
    got = _host(cuda_ops.matmul_integer_cuda(sub, _dev(b), np.uint8(1)))
    np.testing.assert_array_equal(
        got, lowprec.matmul_integer(big.copy_to_host()[:, ::2], b, np.uint8(1))
    )


@pytest.mark.parametrize(
    ("out_kind", "activation"),
    [("uint8", None), ("int8", "relu6"), ("uint8", (-0.5, 2.0)), ("float32", "relu")],
)
def test_qlinear_matmul_bit_identical_to_cpu(small_tiles, out_kind, activation):
    rng = np.random.default_rng(11)
    a = _rand(rng, (13, 10), np.uint8)
    b = _rand(rng, (10, 9), np.int8)
    sa = rng.uniform(0.01, 0.1, 13).astype(np.float32)  # per row
    sb = rng.uniform(0.005, 0.05, 9).astype(np.float32)  # per channel
    za = np.uint8(128)
    zb = np.zeros(9, np.int8)
    bias = rng.integers(-3000, 3000, 9).astype(np.int32)
    zy = {"uint8": np.uint8(100), "int8": np.int8(-5), "float32": None}[out_kind]
    kw = {"bias": bias, "activation": activation}
    if out_kind == "float32":
        kw["out_dtype"] = np.float32
    args = (sa, za, b, sb, zb, np.float32(0.25), zy)
    got = _host(
        cuda_ops.qlinear_matmul_cuda(_dev(a), *args[:2], _dev(b), *args[3:], **kw)
    )
    cpu = lowprec.qlinear_matmul(a, *args[:2], b, *args[3:], **kw)
    assert got.dtype == cpu.dtype
    np.testing.assert_array_equal(got, cpu)
    oracle = ref.qlinear_matmul(a, sa, za, b, sb, zb, np.float32(0.25), zy, **kw)
    np.testing.assert_array_equal(got, oracle)


def test_packed_weights_and_float16_scales(small_tiles):
    rng = np.random.default_rng(5)
    a = _rand(rng, (6, 7), np.int8)
    b = _rand(rng, (7, 10), np.uint8)
    sb = rng.uniform(0.01, 0.05, 10).astype(np.float16)
    packed = lowprec.pack_weights(b, np.uint8(131), sb)
    args = (
        np.float16(0.03),
        np.int8(2),
        packed,
        None,
        None,
        np.float16(0.2),
        np.int8(0),
    )
    got = cuda_ops.qlinear_matmul_cuda(a, *args)
    np.testing.assert_array_equal(got, lowprec.qlinear_matmul(a, *args))
    np.testing.assert_array_equal(
        cuda_ops.matmul_integer_cuda(a, packed, np.int8(2)),
        lowprec.matmul_integer(a, packed, np.int8(2)),
    )


def test_errors_name_the_argument(small_tiles):
    a = np.zeros((2, 3), np.uint8)
    with pytest.raises(TypeError, match="mixed host"):
        lowprec._cuda.use_cuda(a, _dev(a))
    with pytest.raises(TypeError, match="b must have dtype"):
        cuda_ops.matmul_integer_cuda(_dev(a), _dev(np.zeros((3, 2), np.int16)))
    with pytest.raises(ValueError, match="inner dimensions"):
        cuda_ops.matmul_integer_cuda(_dev(a), _dev(np.zeros((4, 2), np.int8)))
    with pytest.raises(ValueError, match="K=65537 exceeds"):
        cuda_ops.matmul_integer_cuda(
            np.zeros((1, 65537), np.uint8), np.zeros((65537, 1), np.int8)
        )
    with pytest.raises(ValueError, match="y_scale is required"):
        cuda_ops.qlinear_matmul_cuda(
            a, 0.1, None, np.zeros((3, 2), np.int8), 0.1, None, None, np.uint8(0)
        )


@pytest.mark.skipif(
    __import__("os").environ.get("NUMBA_ENABLE_CUDASIM") == "1",
    reason="default tiles on a real GPU only (too slow in the simulator)",
)
def test_default_tiles_on_gpu():
    rng = np.random.default_rng(1)
    a = _rand(rng, (300, 517), np.uint8)
    b = _rand(rng, (517, 259), np.int8)
    args = (np.float32(0.02), np.uint8(3), b, np.float32(0.01), np.int8(1),
            np.float32(0.5), np.uint8(128))  # fmt: skip
    np.testing.assert_array_equal(
        cuda_ops.qlinear_matmul_cuda(a, *args), lowprec.qlinear_matmul(a, *args)
    )
    np.testing.assert_array_equal(
        cuda_ops.matmul_integer_cuda(a, b, np.uint8(3), np.int8(1)),
        ref.int_matmul(a, b, 3, 1),
    )


def test_public_functions_route_device_arrays(small_tiles):
    # the public API sends device arrays (and device="cuda") to the CUDA path
    rng = np.random.default_rng(11)
    a = _rand(rng, (13, 11), np.int8)
    b = _rand(rng, (11, 9), np.uint8)
    want = ref.int_matmul(a, b, np.int8(3), np.uint8(7))
    got = lowprec.matmul_integer(_dev(a), _dev(b), np.int8(3), np.uint8(7))
    assert not isinstance(got, np.ndarray)
    np.testing.assert_array_equal(_host(got), want)
    got = lowprec.matmul_integer(a, b, np.int8(3), np.uint8(7), device="cuda")
    np.testing.assert_array_equal(_host(got), want)
    packed = lowprec.pack_weights(b, np.uint8(7), np.float32(0.01))
    args = (np.float32(0.02), np.int8(3), packed, None, None, np.float32(0.4))
    got = lowprec.qlinear_matmul(_dev(a), *args, np.uint8(9), activation="relu")
    cpu = lowprec.qlinear_matmul(a, *args, np.uint8(9), activation="relu")
    np.testing.assert_array_equal(_host(got), cpu)
    x = rng.normal(0, 3, (4, 6)).astype(np.float32)
    q = lowprec.quantize_linear(_dev(x), np.float32(0.1), np.int8(2))
    np.testing.assert_array_equal(
        _host(q), lowprec.quantize_linear(x, np.float32(0.1), np.int8(2))
    )
    r = lowprec.dequantize_linear(q, np.float32(0.1), np.int8(2))
    np.testing.assert_array_equal(
        _host(r), lowprec.dequantize_linear(_host(q), np.float32(0.1), np.int8(2))
    )
    with pytest.raises(TypeError, match="mixed host"):
        lowprec.matmul_integer(_dev(a), b)
