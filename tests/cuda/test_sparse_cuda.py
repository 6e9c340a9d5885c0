"""spmm_cuda / qlinear_spmm_cuda for every SparseMatrix format: int8 bit for bit
against lowprec.qlinear_spmm and tests/reference.py's qlinear_matmul on the
densified weights; float within lowprec/sparse.py's summation-order bound
|y - exact| <= g(n) * (sum_k |w x| + |bias|), g(n) = n u / (1 - n u),
u = 2**-24, n = the row's stored count + 1 (the bias add)."""

import numpy as np
import pytest

import lowprec
import reference as ref
from lowprec import cuda_ops
from lowprec import sparse as sp

pytestmark = pytest.mark.cuda_exec
U = 2.0**-24


def _dev(x):
    from numba import cuda

    return cuda.to_device(x)


def _host(x):
    return x.copy_to_host() if hasattr(x, "copy_to_host") else x


def _mask(rng, fmt, M, K):
    mask = rng.random((M, K)) < 0.3
    if fmt == "nm24":  # at most 2 of every 4 along K
        for g in range(0, K, 4):
            keep = np.cumsum(mask[:, g : g + 4], axis=1) <= 2
            mask[:, g : g + 4] &= keep
    mask[1] = False  # an empty row
    return mask


@pytest.mark.parametrize("fmt", sp.FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_spmm_within_bound(small_tiles, fmt, dtype):
    rng = np.random.default_rng([sp.FORMATS.index(fmt), dtype == np.float16])
    M, K, N = 7, 10, 11  # 3 row groups, 2 column tiles of 8 (4 threads x 2)
    w = rng.standard_normal((M, K)).astype(np.float32)
    W = sp.from_dense(w, _mask(rng, fmt, M, K), format=fmt, dtype=dtype)
    x = rng.standard_normal((K, N)).astype(np.float32)
    bias = rng.standard_normal(M).astype(np.float32)
    got = cuda_ops.spmm_cuda(W, _dev(x), bias=bias)
    assert not isinstance(got, np.ndarray)
    got = _host(got)
    wd = W.to_dense().astype(np.float64)
    exact = wd @ x + bias[:, None]
    n = int(np.diff(W._expanded()[0]).max(initial=0)) + 1
    bound = n * U / (1 - n * U) * (np.abs(wd) @ np.abs(x) + np.abs(bias)[:, None])
    assert np.all(np.abs(got - exact) <= bound + 1e-30)
    cpu = sp.spmm(W, x, bias=bias)
    assert np.all(np.abs(got - cpu) <= 2 * bound + 1e-30)
    # 1-D x, host arrays, activation
    got1 = cuda_ops.spmm_cuda(W, x[:, 3], activation="relu")
    assert got1.shape == (M,)
    assert np.all(np.abs(got1 - np.maximum(wd @ x[:, 3], 0)) <= bound[:, 3] + 1e-30)


@pytest.mark.parametrize("fmt", sp.FORMATS)
@pytest.mark.parametrize("x_dtype", [np.uint8, np.int8])
def test_qlinear_spmm_bit_exact(small_tiles, fmt, x_dtype):
    rng = np.random.default_rng([7, sp.FORMATS.index(fmt), x_dtype == np.int8])
    M, K, N = 7, 10, 11
    w = rng.integers(-128, 128, (M, K)).astype(np.int8)
    zw = rng.integers(-3, 4, M).astype(np.int8)
    sw = rng.uniform(0.01, 0.05, M).astype(np.float32)
    W = sp.from_dense(w, _mask(rng, fmt, M, K), format=fmt, scale=sw, zero_point=zw)
    info = np.iinfo(x_dtype)
    x = rng.integers(info.min, info.max, (K, N), endpoint=True).astype(x_dtype)
    zx = x_dtype(5)
    bias = rng.integers(-500, 500, M).astype(np.int32)
    args = (np.float32(0.05), zx, np.float32(0.4), np.uint8(100))
    kw = {"bias": bias, "activation": "relu6"}
    got = _host(cuda_ops.qlinear_spmm_cuda(W, _dev(x), *args, **kw))
    cpu = sp.qlinear_spmm(W, x, *args, **kw)
    assert got.dtype == cpu.dtype == np.uint8
    np.testing.assert_array_equal(got, cpu)
    oracle = ref.qlinear_matmul(
        x.T, args[0], zx, W.to_dense().T, W.scale, W.zero_point, args[2], args[3],
        **kw,
    ).T  # fmt: skip
    np.testing.assert_array_equal(got, oracle)
    fkw = {"out_dtype": np.float32}
    got = cuda_ops.qlinear_spmm_cuda(W, x[:, 0], args[0], zx, None, None, **fkw)
    np.testing.assert_array_equal(
        got, sp.qlinear_spmm(W, x[:, 0], args[0], zx, None, None, **fkw)
    )


def test_sparse_routing_and_errors(small_tiles):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 6)).astype(np.float32)
    W = sp.from_dense(w, rng.random((5, 6)) < 0.5)
    x = rng.standard_normal((6, 3)).astype(np.float32)
    got = sp.spmm(W, _dev(x))
    assert not isinstance(got, np.ndarray)
    got = sp.spmm(W, x, device="cuda")
    assert isinstance(got, np.ndarray)
    assert got.shape == (5, 3)
    Wq = sp.from_dense(w, dtype=np.int8)
    xq = rng.integers(0, 256, (6, 3)).astype(np.uint8)
    args = (np.float32(0.1), np.uint8(3), np.float32(0.2), np.int8(0))
    np.testing.assert_array_equal(
        _host(lowprec.sparse.qlinear_spmm(Wq, _dev(xq), *args)),
        sp.qlinear_spmm(Wq, xq, *args),
    )
    with pytest.raises(TypeError, match="qlinear_spmm"):
        cuda_ops.spmm_cuda(Wq, x)
    with pytest.raises(ValueError, match="x.shape"):
        cuda_ops.spmm_cuda(W, _dev(x[:5].copy()))
    with pytest.raises(ValueError, match="out= is not supported"):
        cuda_ops.spmm_cuda(W, x, out=np.empty((5, 3), np.float32))
    with pytest.raises(TypeError, match="SparseMatrix"):
        cuda_ops.spmm_cuda(w, x)
