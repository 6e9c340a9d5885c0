"""matmul_bf16_cuda. The kernel sums in lowprec.half's bfloat16 order (pairs of
k, the odd term first), so it must give the CPU matmul_bf16's bits (on a path
with that order: not amx_bf16) and those of
an ordered float32 oracle written here from the contract (values in the normal
range: the contract's subnormal exclusion does not arise). bfloat16 output is
the float32 result rounded once to nearest even (lowprec.float32_to_bfloat16)."""

import numpy as np
import pytest

import lowprec
from lowprec import cuda_ops, half

pytestmark = pytest.mark.cuda_exec


@pytest.fixture(autouse=True)
def pair_order_cpu():
    """Every CPU path but amx_bf16 sums in the kernel's pair order (amx_bf16
    in tdpbf16ps's block order, lowprec/half.py): compare with one of them."""
    before = half.get_half_isa()
    if before == "amx_bf16":
        half.set_half_isa(half.available_half_isas()[1])
    yield
    half.set_half_isa(before)


def _dev(x):
    from numba import cuda

    return cuda.to_device(x)


def _host(x):
    return x.copy_to_host() if hasattr(x, "copy_to_host") else x


def _bf16(x):
    return lowprec.float32_to_bfloat16(np.asarray(x, np.float32))


def _f32(bits):
    return lowprec.bfloat16_to_float32(bits)


def _oracle(a, b, bias=None, lo=-np.inf, hi=np.inf):
    """float32 sums over k = 1, 0, 3, 2, ... (K-1 last for odd K), one rounding
    per step, then bias in float32 and the clamp."""
    a32, b32 = _f32(a), _f32(b)
    K = a.shape[1]
    order = [k for j in range(K // 2) for k in (2 * j + 1, 2 * j)]
    order += [K - 1] if K % 2 else []
    acc = np.zeros((a.shape[0], b.shape[1]), np.float32)
    for k in order:
        acc = acc + a32[:, k : k + 1] * b32[k : k + 1, :]
    if bias is not None:
        acc = acc + bias
    return np.clip(acc, np.float32(lo), np.float32(hi))


@pytest.mark.parametrize("out_dtype", [np.float32, np.uint16])
def test_matmul_bf16_bits_equal_cpu_and_oracle(small_tiles, out_dtype):
    rng = np.random.default_rng(21)
    a = _bf16(rng.standard_normal((13, 11)))  # odd K: a padded pair
    b = _bf16(rng.standard_normal((11, 9)))
    bias = rng.standard_normal(9).astype(np.float32)
    kw = {"bias": bias, "activation": (-2.0, 3.0), "out_dtype": out_dtype}
    got = cuda_ops.matmul_bf16_cuda(_dev(a), _dev(b), **kw)
    assert not isinstance(got, np.ndarray)  # device in -> device out
    got = _host(got)
    assert got.dtype == out_dtype
    cpu = lowprec.matmul_bf16(a, b, **kw)
    np.testing.assert_array_equal(got.view(cpu.dtype), cpu)
    want = _oracle(a, b, bias, -2.0, 3.0)
    want = want if out_dtype == np.float32 else _bf16(want)
    np.testing.assert_array_equal(got.view(want.dtype), want)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf/NaN in the simulator
def test_matmul_bf16_pair_order_shapes_specials(small_tiles):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf = ml_dtypes.bfloat16
    # 1 + 2**-30 rounds to 1: the result tells which term of a pair came first
    b1 = _bf16(np.ones((4, 1)))
    odd_first = _bf16([[1.0, 0.0, 2.0**-30, -1.0]])
    assert cuda_ops.matmul_bf16_cuda(odd_first, b1)[0, 0] == 2.0**-30
    rng = np.random.default_rng(22)
    a = _bf16(rng.standard_normal((2, 3, 8)))
    b = _bf16(rng.standard_normal((8, 5)))
    a[0, 1, 2] = _bf16(np.inf)
    b[3, 4] = 0x7FC1  # a NaN with a payload: kept, quiet, on both paths
    with np.errstate(invalid="ignore"):
        want = lowprec.matmul_bf16(a.view(bf), b.view(bf), out_dtype=bf)
    got = cuda_ops.matmul_bf16_cuda(a.view(bf), b.view(bf), out_dtype=bf)
    assert isinstance(got, np.ndarray)  # host in -> host out, dtype as asked
    assert got.dtype == bf
    assert got.shape == (2, 3, 5)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    packed = lowprec.pack_weights_bf16(b)
    with np.errstate(invalid="ignore"):
        for aa, bb in ((a[1, 0], packed), (a[1], b[:, 0])):  # 1-D a, 1-D b
            got = cuda_ops.matmul_bf16_cuda(aa, bb, activation="relu")
            want = lowprec.matmul_bf16(aa, bb, activation="relu")
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    big = _bf16(np.full((2, 4), 2.0**64))  # 4 * 2**128 overflows float32
    assert np.all(np.isinf(cuda_ops.matmul_bf16_cuda(big, big.T.copy())))
    # routing through the public function, strided device view
    d = _dev(_bf16(rng.standard_normal((9, 16))))
    got = lowprec.matmul_bf16(d[:, ::2], _dev(b))
    np.testing.assert_array_equal(
        _host(got), lowprec.matmul_bf16(d.copy_to_host()[:, ::2], b)
    )
    got = lowprec.matmul_bf16(a[0], b, device="cuda", out_dtype=np.uint16)
    assert got.dtype == np.uint16
    with pytest.raises(TypeError, match="mixed host"):
        lowprec.matmul_bf16(_dev(a[0]), b)
    with pytest.raises(ValueError, match="batched b"):
        cuda_ops.matmul_bf16_cuda(a, np.stack([b, b]))
    with pytest.raises(TypeError, match="a must have dtype uint16"):
        cuda_ops.matmul_bf16_cuda(_dev(_f32(a)), _dev(b))
    with pytest.raises(TypeError, match="packed float16"):
        cuda_ops.matmul_bf16_cuda(a, lowprec.pack_weights_fp16(_f32(b).astype("f2")))
