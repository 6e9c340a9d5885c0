"""nbits_cuda: matmul_nbits / matmul_codebook on the GPU (or the simulator).

The int8 path (accuracy level 4) must give the CPU kernels' bits; the float
path stays within lowprec/nbits.py's bound (K + 2) u sum |a| |w| of the exact
product, as the CPU path does."""

import numpy as np
import pytest

from lowprec import nbits as nb

pytestmark = pytest.mark.cuda_exec
U = 2.0**-24


def _dev(x):
    from numba import cuda

    return cuda.to_device(x)


CASES = [(2, 70, 12, 4, 32, True), (3, 64, 9, 2, 16, False), (1, 40, 7, 8, 32, False)]


@pytest.mark.parametrize(("M", "K", "N", "bits", "bs", "sym"), CASES)
def test_nbits_cuda_matches_cpu(M, K, N, bits, bs, sym):
    rng = np.random.default_rng([M, K, N, bits])
    w = rng.standard_normal((K, N)).astype(np.float32)
    p, s, z = nb.quantize_blockwise(w, bits=bits, block_size=bs, symmetric=sym)
    pk = nb.pack_nbits(p, s, z, K=K, N=N, bits=bits, block_size=bs)
    a = rng.standard_normal((M, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    # int8 path: bit for bit, host arrays in (device="cuda") and device in
    cpu4 = nb.matmul_nbits(a, pk, bias=bias, accuracy_level=4)
    gpu4 = nb.matmul_nbits(a, pk, bias=bias, accuracy_level=4, device="cuda")
    assert np.array_equal(gpu4, cpu4)
    dev4 = nb.matmul_nbits(_dev(a), pk, bias=bias, accuracy_level=4)
    assert np.array_equal(dev4.copy_to_host(), cpu4)
    # float path: the bound
    wd = nb.dequantize_blockwise(p, s, z, K=K, bits=bits, block_size=bs).astype(float)
    ref = a.astype(float) @ wd + bias
    got = nb.matmul_nbits(a, pk, bias=bias, device="cuda")
    bound = (K + 2) * U * (np.abs(a) @ np.abs(wd) + np.abs(bias))
    assert (np.abs(got - ref) <= bound).all()


@pytest.mark.parametrize("per_row", [False, True])
def test_codebook_cuda_matches_cpu(per_row):
    rng = np.random.default_rng(3)
    M, K, N = 2, 50, 10
    w = rng.standard_normal((K, N)).astype(np.float32)
    idx, cb = nb.kmeans_quantize(w, bits=4, per_row=per_row)
    pk = nb.pack_codebook(idx, cb, K=K, N=N)
    a = rng.standard_normal((M, K)).astype(np.float32)
    cpu4 = nb.matmul_codebook(a, pk, accuracy_level=4)
    assert np.array_equal(
        nb.matmul_codebook(a, pk, accuracy_level=4, device="cuda"), cpu4
    )
    wd = nb.dequantize_codebook(idx, cb, K=K).astype(float)
    ref = a.astype(float) @ wd
    got = nb.matmul_codebook(a, pk, device="cuda")
    assert (np.abs(got - ref) <= (K + 2) * U * (np.abs(a) @ np.abs(wd))).all()


def test_nbits_cuda_rejects_float16_device_input():
    w = np.ones((32, 4), np.float32)
    p, s, _ = nb.quantize_blockwise(w)
    pk = nb.pack_nbits(p, s, K=32, N=4)
    with pytest.raises(TypeError, match="float32"):
        nb.matmul_nbits(_dev(np.ones((1, 32), np.float16)), pk)


def test_nbits_cuda_int8_path_rejects_non_finite():
    w = np.ones((32, 4), np.float32)
    p, s, _ = nb.quantize_blockwise(w)
    pk = nb.pack_nbits(p, s, K=32, N=4)
    a = np.ones((1, 32), np.float32)
    a[0, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or infinity"):
        nb.matmul_nbits(a, pk, accuracy_level=4, device="cuda")
    assert np.isinf(nb.matmul_nbits(a, pk, device="cuda")).all()
