"""Bad input: each public function raises TypeError/ValueError naming the
argument, what was expected, what was found and the fix; inputs stay untouched."""

import numpy as np
import pytest

import lowprec

F32 = np.ones((2, 3), np.float32)
U8 = np.ones((2, 3), np.uint8)
S8 = np.ones((3, 4), np.int8)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        # quantize_linear
        (lambda: lowprec.quantize_linear(F32.astype(np.float64), 0.1), TypeError,
         r"x must have dtype float32, float16, got float64; pass x.astype"),
        (lambda: lowprec.quantize_linear([1.0, 2.0], 0.1), TypeError,
         r"x must be a numpy.ndarray, got list"),
        (lambda: lowprec.quantize_linear(F32, 0.0), ValueError,
         r"y_scale must be finite and > 0 everywhere, found 0"),
        (lambda: lowprec.quantize_linear(F32, -1.0), ValueError, r"y_scale .* > 0"),
        (lambda: lowprec.quantize_linear(F32, np.float32(np.nan)), ValueError,
         r"y_scale .* found nan"),
        (lambda: lowprec.quantize_linear(F32, np.float32(np.inf)), ValueError,
         r"y_scale must be finite"),
        (lambda: lowprec.quantize_linear(F32, np.array([0.1], np.float64)), TypeError,
         r"y_scale must be float32 or float16 .* got float64"),
        (lambda: lowprec.quantize_linear(F32, 0.1, np.int32(3)), TypeError,
         r"y_zero_point.dtype must be one of uint8, int8, uint16, int16, got int32"),
        (lambda: lowprec.quantize_linear(F32, 0.1, 300), ValueError,
         r"y_zero_point=300 does not fit uint8"),
        (lambda: lowprec.quantize_linear(F32, 0.1, np.uint8(1), output_dtype=np.int8),
         TypeError, r"output_dtype=int8 disagrees with y_zero_point's dtype uint8"),
        (lambda: lowprec.quantize_linear(F32, np.ones(4, np.float32)), ValueError,
         r"y_scale must be a scalar or 1-D of length x.shape\[1\]=3"),
        (lambda: lowprec.quantize_linear(F32, np.ones(3, np.float32), np.zeros(2, np.uint8)),
         ValueError, r"y_zero_point must have the same shape as y_scale"),
        (lambda: lowprec.quantize_linear(F32, np.ones(3, np.float32), axis=5), ValueError,
         r"axis=5 is out of range"),
        (lambda: lowprec.quantize_linear(F32, np.ones((2, 3), np.float32), block_size=2),
         ValueError, r"y_scale must have shape \(2, 2\) for blocked quantization"),
        (lambda: lowprec.quantize_linear(F32, 0.1, block_size=-1), ValueError,
         r"block_size must be >= 0"),
        # dequantize_linear
        (lambda: lowprec.dequantize_linear(F32, 0.1), TypeError, r"x must have dtype"),
        (lambda: lowprec.dequantize_linear(U8, 0.1, np.int8(0)), TypeError,
         r"x_zero_point must have the same dtype as the tensor .* \(uint8\), got int8"),
        (lambda: lowprec.dequantize_linear(np.ones(3, np.int32), 0.1, np.int32(2)),
         ValueError, r"x_zero_point must be 0 .* for int32 x"),
        # dynamic_quantize_linear
        (lambda: lowprec.dynamic_quantize_linear(F32.astype(np.float16)), TypeError,
         r"x must have dtype float32, got float16"),
        # matmul_integer
        (lambda: lowprec.matmul_integer(U8.astype(np.int16), S8), TypeError,
         r"a must have dtype uint8, int8, got int16; quantize it first"),
        (lambda: lowprec.matmul_integer(U8, S8.astype(np.float32)), TypeError,
         r"b must have dtype uint8, int8, got float32"),
        (lambda: lowprec.matmul_integer(U8, np.ones((4, 4), np.int8)), ValueError,
         r"inner dimensions differ: a.shape\[-1\]=3, b.shape\[-2\]=4"),
        (lambda: lowprec.matmul_integer(np.ones((2, 2, 3), np.uint8),
                                        np.ones((3, 3, 4), np.int8)), ValueError,
         r"batch dimensions of a \(2, 2, 3\) and b \(3, 3, 4\) do not broadcast"),
        (lambda: lowprec.matmul_integer(U8, S8, np.int8(1)), TypeError,
         r"a_zero_point must have the same dtype as the tensor it belongs to \(uint8\)"),
        (lambda: lowprec.matmul_integer(U8, S8, np.ones(5, np.uint8)), ValueError,
         r"a_zero_point must be a scalar, 1-D of length M=2 \(per row\)"),
        (lambda: lowprec.matmul_integer(U8, S8, None, np.ones(3, np.int8)), ValueError,
         r"b_zero_point must be a scalar, 1-D of length N=4 \(per column\)"),
        (lambda: lowprec.matmul_integer(U8, S8, 256), ValueError,
         r"a_zero_point=256 does not fit uint8"),
        (lambda: lowprec.matmul_integer(U8, S8, device="tpu"), ValueError,
         r"device must be None, 'cpu' or 'cuda'"),
        # qlinear_matmul
        (lambda: lowprec.qlinear_matmul(U8, 0.1, np.uint8(0), S8, 0.1, np.int8(0), 0.1, 0),
         TypeError, r"y_zero_point decides the output type"),
        (lambda: lowprec.qlinear_matmul(U8, 0.1, np.uint8(0), S8, 0.1, np.int8(0), 0.0,
                                        np.uint8(0)), ValueError,
         r"y_scale must be finite and > 0"),
        (lambda: lowprec.qlinear_matmul(U8, 0.1, np.uint8(0), S8, np.ones(3, np.float32),
                                        np.int8(0), 0.1, np.uint8(0)), ValueError,
         r"b_scale must be a scalar, 1-D of length N=4"),
        (lambda: lowprec.qlinear_matmul(U8, 0.1, np.uint8(0), S8, 0.1, np.int8(0), 0.1,
                                        np.uint8(0), bias=np.ones(4, np.int64)),
         TypeError, r"bias must have dtype int32, got int64; bias is int32"),
        (lambda: lowprec.qlinear_matmul(U8, 0.1, np.uint8(0), S8, 0.1, np.int8(0), 0.1,
                                        np.uint8(0), bias=np.ones(3, np.int32)),
         ValueError, r"bias must be a scalar or have shape \(4,\)"),
        (lambda: lowprec.qlinear_matmul(U8, 0.1, np.uint8(0), S8, 0.1, np.int8(0), 0.1,
                                        np.uint8(0), activation="gelu"), ValueError,
         r"activation must be None, 'relu', 'relu6' or a \(min, max\) tuple"),
        (lambda: lowprec.qlinear_matmul(U8, 0.1, np.uint8(0), S8, 0.1, np.int8(0), 0.1,
                                        np.uint8(0), activation=(3.0, 1.0)), ValueError,
         r"min <= max"),
        (lambda: lowprec.qlinear_matmul(U8, 0.1, np.uint8(0), S8, 0.1, np.int8(0), 0.1,
                                        np.uint8(0), activation=(0, None)), TypeError,
         r"activation clamp \(min, max\) must be two numbers"),
        (lambda: lowprec.qlinear_matmul(U8, 0.1, np.uint8(0), S8, 0.1, np.int8(0), 0.1,
                                        np.uint8(0), out_dtype=np.int32), TypeError,
         r"out_dtype must be np.uint8, np.int8 or np.float32"),
        (lambda: lowprec.qlinear_matmul(U8, 0.1, np.uint8(0), S8, 0.1, np.int8(0), 0.1,
                                        np.uint8(0), out_dtype=np.int8), TypeError,
         r"out_dtype=int8 disagrees with y_zero_point's dtype uint8"),
        (lambda: lowprec.qlinear_matmul(U8, 0.1, np.uint8(0), S8, None, np.int8(0), 0.1,
                                        np.uint8(0)), ValueError, r"b_scale is required"),
        (lambda: lowprec.qlinear_matmul(U8, 0.1, np.uint8(0),
                                        lowprec.pack_weights(S8, np.int8(1), 0.5), None,
                                        np.int8(2), 0.1, np.uint8(0)), ValueError,
         r"b_zero_point was given both to pack_weights and to this call"),
        (lambda: lowprec.qlinear_matmul(U8, np.float16(256), np.uint8(0), S8,
                                        np.float16(256), np.int8(0), np.float16(1),
                                        np.uint8(0)), ValueError,
         r"multiplier \(input scale \* weight scale / y_scale\) overflows float16"),
        (lambda: lowprec.qlinear_conv(np.ones((1, 1, 3, 3), np.uint8), 1e30,
                                      np.uint8(0), np.ones((1, 1, 1, 1), np.int8),
                                      1e30, np.int8(0), None, None,
                                      out_dtype=np.float32), ValueError,
         r"multiplier \(input scale \* weight scale\) overflows float32"),
        # pack_weights / dynamic_quantize_matmul
        (lambda: lowprec.pack_weights(np.ones((2, 3, 4), np.int8)), ValueError,
         r"b must be 2-D \(K, N\) to be packed, got shape \(2, 3, 4\)"),
        (lambda: lowprec.pack_weights(lowprec.pack_weights(S8)), TypeError,
         r"already a PackedWeights"),
        (lambda: lowprec.dynamic_quantize_matmul(U8, S8, 0.1), TypeError,
         r"a must have dtype float32, got uint8"),
        (lambda: lowprec.dynamic_quantize_matmul(F32, S8, 0.1,
                                                 bias=np.ones(4, np.float64)),
         TypeError, r"bias must have dtype float32"),
        (lambda: lowprec.set_isa("sse9"), ValueError, r"isa='sse9' is not an"),
    ],
)  # fmt: skip
def test_bad_input_names_argument_and_fix(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_inputs_are_never_modified():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (4, 5)).astype(np.float32)
    a = rng.integers(0, 256, (4, 5)).astype(np.uint8)
    b = rng.integers(-128, 128, (5, 3)).astype(np.int8)
    za, zb = np.array([3, 4, 5, 6], np.uint8), np.array([1, -1, 0], np.int8)
    sa, sb = np.full(4, 0.1, np.float32), np.full(3, 0.2, np.float32)
    bias = np.arange(3, dtype=np.int32)
    keep = [arr.copy() for arr in (x, a, b, za, zb, sa, sb, bias)]
    lowprec.quantize_linear(x, sa[:1], za[:1])
    lowprec.dequantize_linear(a, sa, za, axis=0)
    lowprec.dynamic_quantize_linear(x)
    lowprec.matmul_integer(a, b, za, zb)
    lowprec.qlinear_matmul(a, sa, za, b, sb, zb, 0.5, np.uint8(1), bias=bias)
    lowprec.dynamic_quantize_matmul(x, b, sb, zb, per_row=True)
    for before, after in zip(keep, (x, a, b, za, zb, sa, sb, bias), strict=True):
        np.testing.assert_array_equal(before, after)
