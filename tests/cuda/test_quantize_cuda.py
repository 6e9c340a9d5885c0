"""quantize_linear_cuda / dequantize_linear_cuda: bit-identical to the CPU
functions and the NumPy oracle (simulator or GPU, tests/cuda/conftest.py)."""

import numpy as np
import pytest

import lowprec
import reference as ref
from lowprec import cuda_ops

pytestmark = pytest.mark.cuda_exec


def _x(rng, shape, dtype=np.float32):
    x = (rng.normal(size=shape) * 60).astype(dtype)
    flat = x.reshape(-1)
    flat[:4] = [np.nan, np.inf, -np.inf, 2.5]  # NaN -> zp, saturation, a tie
    return x


@pytest.mark.parametrize("out_dt", [np.uint8, np.int8, np.uint16, np.int16])
def test_quantize_per_tensor_per_axis_blocked(small_tiles, out_dt):
    from numba import cuda

    rng = np.random.default_rng(2)
    x = _x(rng, (3, 6, 5))
    info = np.iinfo(out_dt)
    cases = [
        (np.float32(0.5), out_dt(info.min // 2 + 1), {}),
        (
            rng.uniform(0.1, 2, 6).astype(np.float32),
            rng.integers(info.min // 4, info.max // 4, 6).astype(out_dt),
            {"axis": 1},
        ),
        (
            rng.uniform(0.1, 2, (3, 2, 5)).astype(np.float32),
            None,
            {"axis": 1, "block_size": 4, "output_dtype": out_dt},
        ),
    ]
    for scale, zp, kw in cases:
        cpu = lowprec.quantize_linear(x, scale, zp, **kw)
        got = cuda.to_device(x)
        got = cuda_ops.quantize_linear_cuda(got, scale, zp, **kw).copy_to_host()
        assert got.dtype == cpu.dtype
        np.testing.assert_array_equal(got, cpu)
        axis = kw.get("axis", 1)
        oracle = ref.quantize(x, scale, zp, cpu.dtype, axis, kw.get("block_size", 0))
        np.testing.assert_array_equal(got, oracle)


def test_quantize_float16_divides_in_float16(small_tiles):
    rng = np.random.default_rng(4)
    x = _x(rng, (4, 7), np.float16)
    scale = rng.uniform(0.01, 1, 7).astype(np.float16)
    zp = rng.integers(-20, 20, 7).astype(np.int8)
    got = cuda_ops.quantize_linear_cuda(x, scale, zp)  # host in -> host out
    np.testing.assert_array_equal(got, lowprec.quantize_linear(x, scale, zp))
    np.testing.assert_array_equal(got, ref.quantize(x, scale, zp, np.int8))
    got32 = cuda_ops.quantize_linear_cuda(x, np.float32(0.37), np.uint8(9))
    np.testing.assert_array_equal(
        got32, lowprec.quantize_linear(x, np.float32(0.37), np.uint8(9))
    )


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("x_dt", [np.uint8, np.int8, np.int16, np.int32])
def test_dequantize(small_tiles, x_dt):
    rng = np.random.default_rng(6)
    info = np.iinfo(x_dt)
    x = rng.integers(info.min, info.max, (2, 5, 3), endpoint=True).astype(x_dt)
    for scale in (
        rng.uniform(0.001, 3, 5).astype(np.float32),
        rng.uniform(0.001, 3, 5).astype(np.float16),
    ):
        zp = None if x_dt == np.int32 else rng.integers(-3, 100, 5).astype(x_dt)
        cpu = lowprec.dequantize_linear(x, scale, zp)
        got = cuda_ops.dequantize_linear_cuda(x, scale, zp)
        assert got.dtype == cpu.dtype
        np.testing.assert_array_equal(got, cpu)
        np.testing.assert_array_equal(got, ref.dequantize(x, scale, zp))


def test_quantize_errors(small_tiles):
    from numba import cuda

    x = np.zeros((2, 3), np.float32)
    with pytest.raises(TypeError, match="x must have dtype"):
        cuda_ops.quantize_linear_cuda(cuda.to_device(x.astype(np.float64)), 0.1)
    with pytest.raises(ValueError, match="y_scale must be finite"):
        cuda_ops.quantize_linear_cuda(x, np.float32(0))
    with pytest.raises(ValueError, match="C-contiguous"):
        cuda_ops.quantize_linear_cuda(
            cuda.to_device(np.zeros((3, 4), np.float32))[:, ::2], 0.1
        )


def test_quantize_output_dtype_codes(small_tiles):
    # ONNX type codes as Python or numpy ints, as on the CPU
    x = np.array([1.0, 300.0, -5.0], np.float32)
    for code in (np.uint8(4), np.int8(2), np.int64(3), 5, 0):
        cpu = lowprec.quantize_linear(x, np.float32(1), output_dtype=code)
        got = lowprec.quantize_linear(x, np.float32(1), output_dtype=code,
                                      device="cuda")  # fmt: skip
        assert got.dtype == cpu.dtype
        np.testing.assert_array_equal(got, cpu)
    with pytest.raises(ValueError, match="not a supported ONNX type code"):
        lowprec.quantize_linear(x, np.float32(1), output_dtype=7, device="cuda")
