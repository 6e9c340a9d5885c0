"""lowprec.nbits: MatMulNBits blocks, codebooks, power-of-two codes.

Oracles are written from the layout and the math in the module docstring (plain
NumPy, float64 or a float32 evaluation of the int8 path's formula), plus ONNX
Runtime's MatMulNBits on the same arrays.
"""

import numpy as np
import pytest

import lowprec
from lowprec import nbits as nb

# every instruction-set path this machine runs, forced in turn (avx2: the
# vpmaddubsw kernels of kernels/nbits_ymm.py, which avx_vnni runs too)
ISAS = [i for i in ("avx512_vnni", "avx2", "portable") if i in lowprec.available_isas()]


@pytest.fixture(params=ISAS)
def isa(request):
    before = lowprec.get_isa()
    lowprec.set_isa(request.param)
    yield request.param
    lowprec.set_isa(before)


def _codes_oracle(packed, bits, K):
    """(N, nblk, blob) bytes -> (N, K) codes, bit by bit (low bits first)."""
    N = packed.shape[0]
    flat = packed.reshape(N, -1)
    out = np.zeros((N, K), np.int64)
    for k in range(K):
        bit = k * bits
        out[:, k] = (flat[:, bit // 8].astype(np.int64) >> (bit % 8)) & (
            (1 << bits) - 1
        )
    return out


def _weights_oracle(packed, scales, zps, K, bits, bs):
    """float64 (K, N) weights: (code - zp) * scale per block, zps (N, nblk)."""
    N = packed.shape[0]
    codes = _codes_oracle(packed, bits, K)
    blk = np.arange(K) // bs
    s = scales.reshape(N, -1).astype(np.float64)[:, blk]
    z = zps[:, blk]
    return ((codes - z) * s).T


def _int8_oracle(a, w_codes, scales, zps, K, bs):
    """The int8 path, from the docstring: float32 per-block evaluation."""
    M = a.shape[0]
    N = w_codes.shape[0]
    nblk = -(-K // bs)
    y = np.zeros((M, N), np.float32)
    for j in range(nblk):
        sl = slice(j * bs, min(K, (j + 1) * bs))
        blk = a[:, sl].astype(np.float32)
        sa = (np.abs(blk).max(axis=1) / np.float32(127)).astype(np.float32)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            inv = np.where(sa > 0, np.float32(1) / sa, np.float32(0)).astype(np.float32)
            q = np.rint(blk * inv[:, None])
        # 0 * inf (a subnormal scale) is NaN: 0, as every kernel
        qa = np.clip(np.where(np.isnan(q), 0, q), -127, 127).astype(np.int64)
        dot = qa @ w_codes[:, sl].T  # exact integers
        qs = qa.sum(axis=1).astype(np.float32)
        t = dot.astype(np.float32) - zps[:, j].astype(np.float32)[None] * qs[:, None]
        s = scales.reshape(N, -1)[:, j].astype(np.float32)[None] * sa[:, None]
        y = (y + t.astype(np.float32) * s.astype(np.float32)).astype(np.float32)
    return y


CASES = [
    # M, K, N, bits, block_size, symmetric
    (1, 64, 32, 4, 32, True),
    (3, 100, 24, 4, 16, True),  # K not a multiple of the block, N of the group
    (5, 130, 70, 4, 64, False),
    (2, 96, 40, 2, 32, False),
    (6, 130, 17, 8, 32, True),
    (7, 200, 33, 8, 16, False),
    (9, 100, 40, 4, 32, False),  # >= 8 rows: the dequantized-panel float kernel
    (13, 64, 70, 2, 16, True),
    (8, 70, 20, 8, 32, False),
]


@pytest.mark.parametrize(("M", "K", "N", "bits", "bs", "sym"), CASES)
def test_quantize_blockwise_layout_and_roundtrip(M, K, N, bits, bs, sym):
    rng = np.random.default_rng([K, N, bits])
    w = rng.standard_normal((K, N)).astype(np.float32)
    w_in = w.copy()
    packed, scales, zp = nb.quantize_blockwise(
        w, bits=bits, block_size=bs, symmetric=sym
    )
    assert np.array_equal(w, w_in)
    nblk = -(-K // bs)
    assert packed.shape == (N, nblk, bs * bits // 8)
    assert packed.dtype == np.uint8
    assert scales.shape == (N, nblk)
    assert scales.dtype == np.float32
    if sym:
        assert zp is None
        zps = np.full((N, nblk), 1 << (bits - 1))
    else:
        assert zp.shape == (N, -(-nblk * bits // 8))
        zps = _codes_oracle(zp[:, None, :], bits, nblk)
    wd = nb.dequantize_blockwise(packed, scales, zp, K=K, bits=bits, block_size=bs)
    ref = _weights_oracle(packed, scales, zps, K, bits, bs)
    assert np.allclose(wd, ref, rtol=1e-6, atol=0)
    # rounding error: half a step, one step at the clipped end of symmetric
    step = np.abs(scales)[:, np.arange(K) // bs].T
    bound = step * (1.0 if sym else 0.5) * (1 + 1e-5)
    assert (np.abs(wd - w) <= bound).all()
    # axis=1: the same weights given as (N, K)
    p2, s2, z2 = nb.quantize_blockwise(
        w.T.copy(), bits=bits, block_size=bs, symmetric=sym, axis=1
    )
    assert np.array_equal(p2, packed)
    assert np.array_equal(s2, scales)


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_lowers_output_error(sym):
    rng = np.random.default_rng(11)
    K, N, S = 96, 40, 256
    # correlated inputs: where GPTQ's error compensation has something to use
    mix = rng.standard_normal((K, K)) / np.sqrt(K)
    x = (rng.standard_normal((S, K)) @ mix + 0.3 * rng.standard_normal((S, K))).astype(
        np.float32
    )
    w = rng.standard_normal((K, N)).astype(np.float32)
    errs = {}
    for method in ("rtn", "gptq"):
        p, s, z = nb.quantize_blockwise(
            w, bits=4, block_size=32, symmetric=sym, method=method, calibration=x
        )
        wd = nb.dequantize_blockwise(p, s, z, K=K, bits=4, block_size=32)
        errs[method] = float(((x @ (wd - w)) ** 2).mean())
        # same grid: every weight is code * scale of its block
        assert p.shape == (N, 3, 16)
    assert errs["gptq"] < 0.8 * errs["rtn"]


def _pack_codes_ref(codes, bits):
    """(N, L) codes -> bytes, bit by bit."""
    N, L = codes.shape
    out = np.zeros((N, L * bits // 8), np.uint8)
    for k in range(L):
        bit = k * bits
        out[:, bit // 8] |= (codes[:, k] << (bit % 8)).astype(np.uint8)
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_codes_bit_exact(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, (5, 64), dtype=np.uint8)
    packed = nb.pack_codes(codes, bits)
    assert np.array_equal(packed, _pack_codes_ref(codes.astype(np.int64), bits))
    assert np.array_equal(nb.unpack_codes(packed, bits, 64), codes)


@pytest.mark.parametrize(("M", "K", "N", "bits", "bs", "sym"), CASES)
def test_matmul_nbits_float_path_error_bound(isa, M, K, N, bits, bs, sym):
    rng = np.random.default_rng([M, K, N, bits, 1])
    w = rng.standard_normal((K, N)).astype(np.float32)
    packed, scales, zp = nb.quantize_blockwise(
        w, bits=bits, block_size=bs, symmetric=sym
    )
    wd = nb.dequantize_blockwise(
        packed, scales, zp, K=K, bits=bits, block_size=bs
    ).astype(np.float64)
    a = rng.standard_normal((M, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    a_in = a.copy()
    got = nb.matmul_nbits(
        a, packed, scales, zp, K=K, N=N, bits=bits, block_size=bs, bias=bias
    )
    assert np.array_equal(a, a_in)
    assert got.shape == (M, N)
    assert got.dtype == np.float32
    ref = a.astype(np.float64) @ wd + bias
    bound = (K + 2) * 2.0**-24 * (
        np.abs(a).astype(np.float64) @ np.abs(wd)
    ) + 2.0**-23 * np.abs(ref)
    assert (np.abs(got - ref) <= bound).all()
    # prepacked gives the same numbers
    pk = nb.pack_nbits(packed, scales, zp, K=K, N=N, bits=bits, block_size=bs)
    assert np.array_equal(nb.matmul_nbits(a, pk, bias=bias), got)


@pytest.mark.parametrize(("M", "K", "N", "bits", "bs", "sym"), CASES)
def test_matmul_nbits_int8_path_bit_exact(isa, M, K, N, bits, bs, sym):
    rng = np.random.default_rng([M, K, N, bits, 2])
    w = rng.standard_normal((K, N)).astype(np.float32)
    packed, scales, zp = nb.quantize_blockwise(
        w, bits=bits, block_size=bs, symmetric=sym
    )
    a = (rng.standard_normal((M, K)) * 3).astype(np.float32)
    a[0, : min(K, bs)] = 0  # an all-zero block: scale 0
    pk = nb.pack_nbits(packed, scales, zp, K=K, N=N, bits=bits, block_size=bs)
    got = nb.matmul_nbits(a, pk, accuracy_level=4)
    nblk = -(-K // bs)
    zps = (
        np.full((N, nblk), 1 << (bits - 1))
        if zp is None
        else _codes_oracle(zp[:, None, :], bits, nblk)
    )
    codes = _codes_oracle(packed, bits, K)
    ref = _int8_oracle(a, codes, scales, zps, K, bs)
    assert np.array_equal(got, ref)


@pytest.mark.parametrize(
    ("K", "N", "bs", "zero"),
    [
        (64, 96, 32, None),  # a pair of groups and a lone one
        (200, 130, 32, None),  # K past the last whole block, a padded group
        (96, 64, 16, 5),  # 4 rows a block (the loop form), one zero point 5
        (256, 160, 64, None),
        (300, 64, 128, 0),
        (256, 64, 64, 15),  # the largest zero point
        (4096, 64, 4096, None),  # the largest block the GEMV kernel takes
        (8192, 32, 8192, None),  # past it: the tile kernel
    ],
)
def test_matmul_nbits_gemv_bit_exact(isa, K, N, bs, zero):
    # one row of activations, 4 bits, one zero point for the whole matrix:
    # the VNNI path's GEMV kernel (kernels/nbits_vnni.make_gemv4), whose
    # integer zero-point term must give the float formula's bits
    rng = np.random.default_rng([K, N, bs, 7])
    w = rng.standard_normal((K, N)).astype(np.float32)
    packed, scales, zp = nb.quantize_blockwise(w, bits=4, block_size=bs)
    nblk = -(-K // bs)
    zps = np.full((N, nblk), 8)
    if zero is not None:  # two 4-bit codes a byte
        zp = np.full((N, (nblk + 1) // 2), zero * 17, np.uint8)
        zps[:] = zero
    a = (rng.standard_normal((1, K)) * 3).astype(np.float32)
    # a block at the int8 extremes, one sign (the largest integer sums), an
    # all-zero block (scale 0) where there is room
    a[0, K - K % bs - bs : K - K % bs] = 1.0
    if K >= 2 * bs:
        a[0, :bs] = 0
    pk = nb.pack_nbits(packed, scales, zp, K=K, N=N, bits=4, block_size=bs)
    got = nb.matmul_nbits(a, pk, accuracy_level=4)
    ref = _int8_oracle(a, _codes_oracle(packed, 4, K), scales, zps, K, bs)
    assert np.array_equal(got, ref)


@pytest.mark.parametrize("M", [1, 2])
def test_nbits_int8_path_edge_blocks(isa, M):
    # a block of subnormal-scale values (1 / scale overflows: its zeros must
    # quantize to 0, in the vector quantizer and in the partial last block's
    # scalar loop) and a fractional zero point (not the GEMV kernel's integer
    # term): bit for bit with the oracle, one row as two
    rng = np.random.default_rng([M, 9])
    K, N, bs = 80, 48, 32  # blocks 0 and 1 whole (vector), 2 partial (scalar)
    w = rng.standard_normal((K, N)).astype(np.float32)
    packed, scales, _ = nb.quantize_blockwise(w, bits=4, block_size=bs)
    # only tiny blocks, so a wrong block sum shows in the result
    a = np.zeros((M, K), np.float32)
    a[:, 0], a[:, 1] = 1e-38, -3e-39
    a[:, 70] = 2e-39
    codes = _codes_oracle(packed, 4, K)
    for zp in (None, np.full((N, 3), 7.5, np.float32)):
        pk = nb.pack_nbits(packed, scales, zp, K=K, N=N, bits=4, block_size=bs)
        zps = np.full((N, 3), 8.0) if zp is None else np.full((N, 3), 7.5)
        got = nb.matmul_nbits(a, pk, accuracy_level=4)
        ref = _int8_oracle(a, codes, scales, zps, K, bs)
        assert np.array_equal(got, ref)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("bs", [16, 32, 128])
def test_nbits_int8_path_largest_sums(isa, bits, bs):
    # every code at its largest and every activation at +-127: the largest
    # partial sums any kernel holds (the AVX2 kernel's int16 sums of up to 8
    # quads of vpmaddubsw pairs, 8 * 2 * 15 * 127 = 30480 of 32767), in rows 0
    # and 1 (one 2-row tile) and row 2 (a tile of 1), one and several chunks
    K, N, M = 2 * bs, 48, 3
    nblk = K // bs
    packed = np.full((N, nblk, bs * bits // 8), 0xFF, np.uint8)
    rng = np.random.default_rng([bits, bs])
    scales = rng.uniform(0.5, 2.0, (N, nblk)).astype(np.float32)
    a = np.ones((M, K), np.float32)
    a[1] = -1.0
    a[2, ::2] = -1.0
    pk = nb.pack_nbits(packed, scales, None, K=K, N=N, bits=bits, block_size=bs)
    got = nb.matmul_nbits(a, pk, accuracy_level=4)
    codes = np.full((N, K), (1 << bits) - 1)
    zps = np.full((N, nblk), 1 << (bits - 1))
    assert np.array_equal(got, _int8_oracle(a, codes, scales, zps, K, bs))


def _ort_nbits(a, packed, scales, zp, K, N, bits, bs, level):
    pytest.importorskip("onnxruntime")
    from lowprec._bench_nbits import ort_nbits_session

    sess = ort_nbits_session(
        packed, scales, zp, K=K, N=N, bits=bits, block_size=bs, accuracy_level=level
    )
    return sess.run(None, {"A": a})[0]


@pytest.mark.parametrize(("M", "K", "N", "bits", "bs", "sym"), CASES)
def test_matmul_nbits_matches_onnxruntime(M, K, N, bits, bs, sym):
    rng = np.random.default_rng([M, K, N, bits, 3])
    w = rng.standard_normal((K, N)).astype(np.float32)
    packed, scales, zp = nb.quantize_blockwise(
        w, bits=bits, block_size=bs, symmetric=sym
    )
    a = rng.standard_normal((M, K)).astype(np.float32)
    ref = _ort_nbits(a, packed, scales, zp, K, N, bits, bs, 0)
    got = nb.matmul_nbits(a, packed, scales, zp, K=K, N=N, bits=bits, block_size=bs)
    wd = nb.dequantize_blockwise(packed, scales, zp, K=K, bits=bits, block_size=bs)
    tol = 2 * (K + 2) * 2.0**-24 * (np.abs(a) @ np.abs(wd)) + 1e-6
    assert (np.abs(got - ref) <= tol).all()
    # accuracy level 4: both quantize the activations per block; the
    # roundings may differ by one step per element
    ref4 = _ort_nbits(a, packed, scales, zp, K, N, bits, bs, 4)
    got4 = nb.matmul_nbits(a, packed, scales, zp, K=K, N=N, bits=bits, block_size=bs,
                           accuracy_level=4)  # fmt: skip
    step = np.abs(a).max() / 127
    assert np.abs(got4 - ref4).max() <= step * np.abs(wd).sum(axis=0).max()


def test_matmul_nbits_shapes_and_float16():
    rng = np.random.default_rng(5)
    K, N = 64, 48
    w = rng.standard_normal((K, N)).astype(np.float32)
    p, s, _ = nb.quantize_blockwise(w)
    pk = nb.pack_nbits(p, s, K=K, N=N)
    a = rng.standard_normal((2, 3, K)).astype(np.float32)
    y = nb.matmul_nbits(a, pk)
    assert y.shape == (2, 3, N)
    assert np.array_equal(y.reshape(6, N), nb.matmul_nbits(a.reshape(6, K), pk))
    assert nb.matmul_nbits(a[0, 0], pk).shape == (N,)
    h = a.astype(np.float16)
    assert np.array_equal(
        nb.matmul_nbits(h, pk), nb.matmul_nbits(h.astype(np.float32), pk)
    )
    # ORT's flattened scales / zero points are accepted
    p2, s2, z2 = nb.quantize_blockwise(w, symmetric=False)
    y1 = nb.matmul_nbits(a[0], p2, s2, z2, K=K, N=N)
    y2 = nb.matmul_nbits(a[0], p2, s2.reshape(-1), z2.reshape(-1), K=K, N=N)
    assert np.array_equal(y1, y2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [40, 63, 75])  # whole blocks; the partial one
def test_nbits_non_finite_activations(isa, bad, where):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((80, 32)).astype(np.float32)
    p, s, _ = nb.quantize_blockwise(w)
    pk = nb.pack_nbits(p, s, K=80, N=32)
    idx, cb = nb.kmeans_quantize(w)
    pc = nb.pack_codebook(idx, cb, K=80, N=32)
    a = rng.standard_normal((2, 80)).astype(np.float32)
    a[1, where] = bad
    # int8 activations cannot hold it: a clear error, never a finite answer
    with pytest.raises(ValueError, match="NaN or infinity"):
        nb.matmul_nbits(a, pk, accuracy_level=4)
    with pytest.raises(ValueError, match="NaN or infinity"):
        nb.matmul_codebook(a, pc, accuracy_level=4)
    # the float path propagates it (IEEE), the clean row is unaffected
    y = nb.matmul_nbits(a, pk)
    assert not np.isfinite(y[1]).any()
    assert np.isfinite(y[0]).all()


def test_nbits_empty_and_tiny(isa):
    w = np.random.default_rng(6).standard_normal((5, 1)).astype(np.float32)
    p, s, _ = nb.quantize_blockwise(w, block_size=16)
    pk = nb.pack_nbits(p, s, K=5, N=1, block_size=16)
    assert nb.matmul_nbits(np.zeros((0, 5), np.float32), pk).shape == (0, 1)
    assert nb.matmul_nbits(
        np.zeros((0, 5), np.float32), pk, accuracy_level=4
    ).shape == (0, 1)
    a = np.ones((1, 5), np.float32)
    wd = nb.dequantize_blockwise(p, s, K=5, block_size=16)
    assert np.allclose(nb.matmul_nbits(a, pk), a @ wd, rtol=1e-6)


def test_nbits_bad_inputs():
    w = np.ones((64, 32), np.float32)
    with pytest.raises(ValueError, match="bits must be one of"):
        nb.quantize_blockwise(w, bits=5)
    with pytest.raises(ValueError, match="power of two"):
        nb.quantize_blockwise(w, block_size=48)
    with pytest.raises(ValueError, match="power of two"):
        nb.quantize_blockwise(w, block_size=8)
    with pytest.raises(TypeError, match="w must have dtype"):
        nb.quantize_blockwise(w.astype(np.int32))
    with pytest.raises(ValueError, match="needs calibration"):
        nb.quantize_blockwise(w, method="gptq")
    with pytest.raises(ValueError, match=r"calibration must have shape \(S, 64\)"):
        nb.quantize_blockwise(
            w, method="gptq", calibration=np.ones((4, 32), np.float32)
        )
    # empty weights, float64 beyond float32's range, a block whose range
    # overflows float32 (asymmetric scale = (max - min) / 15)
    for empty in (np.ones((0, 5), np.float32), np.ones((5, 0), np.float32)):
        with pytest.raises(ValueError, match="w has no elements"):
            nb.quantize_blockwise(empty)
        with pytest.raises(ValueError, match="w has no elements"):
            nb.kmeans_quantize(empty)
    with pytest.raises(ValueError, match="beyond float32's range"):
        nb.quantize_blockwise(np.full((64, 32), 1e300))
    big = np.ones((64, 32), np.float32)
    big[0, 0], big[1, 0] = 3e38, -3e38
    with pytest.raises(ValueError, match="scale overflows float32"):
        nb.quantize_blockwise(big, symmetric=False)
    with pytest.raises(ValueError, match="method must be"):
        nb.quantize_blockwise(w, method="awq")
    p, s, _ = nb.quantize_blockwise(w)
    a = np.ones((1, 64), np.float32)
    with pytest.raises(ValueError, match="b must have shape"):
        nb.matmul_nbits(a, p[:, :1], s, K=64, N=32)
    with pytest.raises(ValueError, match="b must have shape"):
        nb.matmul_nbits(a, p, s, K=64, N=32, bits=2)
    with pytest.raises(ValueError, match="scales must have shape"):
        nb.matmul_nbits(a, p, s[:, :1], K=64, N=32)
    with pytest.raises(TypeError, match="K and N are required"):
        nb.matmul_nbits(a, p, s)
    with pytest.raises(ValueError, match="a must have shape"):
        nb.matmul_nbits(np.ones((1, 63), np.float32), p, s, K=64, N=32)
    with pytest.raises(ValueError, match="accuracy_level"):
        nb.matmul_nbits(a, p, s, K=64, N=32, accuracy_level=2)
    with pytest.raises(ValueError, match="zero_points must be packed"):
        nb.matmul_nbits(a, p, s, np.zeros(3, np.uint8), K=64, N=32)
    with pytest.raises(ValueError, match="NaN"):
        nb.matmul_nbits(a, p, np.full_like(s, np.nan), K=64, N=32)
    pk = nb.pack_nbits(p, s, K=64, N=32)
    with pytest.raises(TypeError, match="PackedNBits"):
        nb.matmul_nbits(a, pk, s)
    with pytest.raises(ValueError, match="bias must have shape"):
        nb.matmul_nbits(a, pk, bias=np.ones(3, np.float32))


# ---------------------------------------------------------------------------
# codebooks


def test_kmeans_deterministic_and_beats_uniform_grid():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((256, 64)).astype(np.float32)
    idx, cb = nb.kmeans_quantize(w, bits=4)
    idx2, cb2 = nb.kmeans_quantize(w, bits=4)
    assert np.array_equal(idx, idx2)
    assert np.array_equal(cb, cb2)
    assert idx.shape == (64, 128)
    assert cb.shape == (16,)
    wd = nb.dequantize_codebook(idx, cb, K=256)
    mse = float(((wd - w) ** 2).mean())
    # a plain uniform 4-bit grid: symmetric, max |w| / 7.5 steps (16 levels)
    step = np.abs(w).max() / 7.5
    uni = (np.clip(np.floor(w / step), -8, 7) + 0.5) * step
    mse_uniform = float(((uni - w) ** 2).mean())
    assert mse <= mse_uniform
    # per_row: one table per output column, no worse than the shared one
    idx_r, cb_r = nb.kmeans_quantize(w, bits=4, per_row=True)
    assert cb_r.shape == (64, 16)
    wd_r = nb.dequantize_codebook(idx_r, cb_r, K=256)
    assert ((wd_r - w) ** 2).mean() <= mse
    # k-means++ seeding: deterministic per seed, also no worse than the grid
    a1 = nb.kmeans_quantize(w, bits=4, init="kmeans++", seed=3)
    a2 = nb.kmeans_quantize(w, bits=4, init="kmeans++", seed=3)
    assert np.array_equal(a1[0], a2[0])
    assert np.array_equal(a1[1], a2[1])
    wpp = nb.dequantize_codebook(*a1, K=256)
    assert ((wpp - w) ** 2).mean() <= mse_uniform
    # every weight takes its nearest table entry
    d = np.abs(w[..., None] - cb[None, None, :])
    assert np.allclose(np.abs(wd - w), d.min(axis=2))


def test_log2_quantize_codes():
    w = np.array([[1.0, -0.5], [0.26, -3.9], [0.0, 0.001]], np.float32)  # (K=3, N=2)
    idx, cb = nb.log2_quantize(w, bits=4)
    # e = rint(log2(3.9)) = 2: magnitudes 0, 4, 2, 1, 0.5, 0.25, 0.125, 0.0625
    assert np.array_equal(
        cb[:8], np.array([0, 4, 2, 1, 0.5, 0.25, 0.125, 0.0625], np.float32)
    )
    assert np.array_equal(cb[8:], -cb[:8])
    wd = nb.dequantize_codebook(idx, cb, K=3)
    assert np.array_equal(wd, np.array([[1, -0.5], [0.25, -4], [0, 0]], np.float32))


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
# 1 row: the GEMV kernel (150 columns: a set of 4 groups and a lone one)
@pytest.mark.parametrize(("M", "N"), [(3, 40), (1, 150)])
@pytest.mark.parametrize("lookup", ["pshufb", "vpermb"])
def test_matmul_codebook(isa, per_row, bits, M, N, lookup, monkeypatch):
    if "avx512_vnni" in lowprec.available_isas():
        # the GEMV kernel's table lookup, each in turn (vpermb falls back to
        # pshufb on hosts without AVX-512 VBMI)
        from lowprec.kernels import nbits_vnni as kv

        kind = kv.LUT_VPERMB if lookup == "vpermb" else kv.LUT_PSHUFB
        monkeypatch.setattr(kv, "LUT_KIND", kind)
    elif lookup == "vpermb":
        pytest.skip("one lookup without AVX-512 VNNI")
    _check_codebook(bits, per_row, M, N, 150)


@pytest.mark.parametrize("per_row", [False, True])
def test_matmul_codebook_8_bits(isa, per_row):
    # 256-entry tables: no kernel's table lookup (the tables of the fast int8
    # paths hold 16 entries), the general loops on every path
    _check_codebook(8, per_row, 3, 20, 300)


def _check_codebook(bits, per_row, M, N, K):
    """matmul_codebook's float path within the summation bound of the float64
    product, and its int8 path bit for bit with the int8 oracle."""
    rng = np.random.default_rng([bits, per_row, M])
    w = rng.standard_normal((K, N)).astype(np.float32)
    idx, cb = nb.kmeans_quantize(w, bits=bits, per_row=per_row)
    wd = nb.dequantize_codebook(idx, cb, K=K, bits=bits).astype(np.float64)
    a = rng.standard_normal((M, K)).astype(np.float32)
    got = nb.matmul_codebook(a, idx, cb, K=K, N=N, bits=bits)
    ref = a.astype(np.float64) @ wd
    bound = (K + 2) * 2.0**-24 * (np.abs(a).astype(np.float64) @ np.abs(wd))
    assert (np.abs(got - ref) <= bound).all()
    # int8 path: the int8 oracle with the table rounded to int8 (+128, zero point 128)
    pk = nb.pack_codebook(idx, cb, K=K, N=N, bits=bits)
    got4 = nb.matmul_codebook(a, pk, accuracy_level=4)
    table = np.broadcast_to(cb, (N, 1 << bits))
    cs = (np.abs(table).max(axis=1) / np.float32(127)).astype(np.float32)
    qt = np.rint(table / cs[:, None]).astype(np.int64) + 128
    codes = nb.unpack_codes(idx, bits, K).astype(np.int64)
    wq = np.take_along_axis(qt, codes, axis=1)  # (N, K) unsigned table values
    Kp = -(-K // 32) * 32
    ref4 = _int8_oracle(
        a, wq, np.repeat(cs[:, None], Kp // 32, 1), np.full((N, Kp // 32), 128), K, 32
    )
    assert np.array_equal(got4, ref4)


def test_codebook_bad_inputs():
    idx = np.zeros((4, 8), np.uint8)
    cb = np.zeros(16, np.float32)
    a = np.ones((1, 16), np.float32)
    with pytest.raises(ValueError, match="indices must have shape"):
        nb.matmul_codebook(a, idx[:, :3], cb, K=16, N=4)
    with pytest.raises(ValueError, match="codebook must have shape"):
        nb.matmul_codebook(a, idx, cb[:8], K=16, N=4)
    with pytest.raises(TypeError, match="codebook must have dtype"):
        nb.matmul_codebook(a, idx, cb.astype(np.float64), K=16, N=4)
    with pytest.raises(ValueError, match="bits must be one of"):
        nb.kmeans_quantize(np.ones((4, 4), np.float32), bits=3)
    with pytest.raises(ValueError, match="init must be"):
        nb.kmeans_quantize(np.ones((4, 4), np.float32), init="random")
    with pytest.raises(ValueError, match="iters"):
        nb.kmeans_quantize(np.ones((4, 4), np.float32), iters=-1)
    with pytest.raises(ValueError, match="NaN"):
        nb.kmeans_quantize(np.full((4, 4), np.nan, np.float32))
