"""lowprec.sparse: packed formats, spmm and qlinear_spmm against dense oracles.

Float: spmm differs from the exact product of the densified weights only by
summation order, |y - y_exact| <= g(n) * sum_k |w x| (+ the bias term) with
g(n) = n u / (1 - n u), u = 2**-24, n = stored entries of the row + 1 (bias).
int8: bit-exact against lowprec.qlinear_matmul on the densified weights (the
transposed product), itself tested against the int64 oracle.
"""

import io

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lowprec
import reference as ref
from lowprec import prune
from lowprec import sparse as sp


@pytest.fixture(params=[i for i in lowprec.available_isas() if i != "amx"])
def isa(request):
    """conftest's `isa` without "amx": it runs the avx512_vnni sparse kernels
    (only its dense INT8 GEMM differs), so it would repeat those tests."""
    before = lowprec.get_isa()
    lowprec.set_isa(request.param)
    yield request.param
    lowprec.set_isa(before)


FORMATS = sp.FORMATS
U = 2.0**-24


def _mask(rng, fmt, M, K, density):
    """A random keep-mask the format can hold (2:4: <= 2 per group), with
    empty rows."""
    if fmt == "nm24":
        mask = np.zeros((M, K), bool)
        for m in range(M):
            for g in range(0, K, 4):
                cols = np.arange(g, min(g + 4, K))
                take = rng.integers(0, min(2, cols.size) + 1)
                mask[m, rng.choice(cols, take, replace=False)] = True
    else:
        mask = rng.random((M, K)) < density
    if M > 2:
        mask[1] = False  # an empty row
    return mask


def _float_bound(W, x, bias=None):
    """Summation-order bound of each output (module docstring)."""
    wd = np.abs(W.to_dense().astype(np.float64))
    n = int(np.diff(W._expanded()[0]).max(initial=0)) + 1
    g = n * U / (1 - n * U)
    mag = wd @ np.abs(x.astype(np.float64))
    if bias is not None:
        mag = mag + np.abs(bias.astype(np.float64)).reshape(-1, *([1] * (x.ndim - 1)))
    return g * mag + 1e-30


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_spmm_matches_dense(isa, fmt, dtype):
    rng = np.random.default_rng([7, FORMATS.index(fmt)])
    for M, K, N, density in [(13, 22, 70, 0.3), (9, 7, 1, 0.5), (4, 64, 16, 0.05)]:
        w = rng.standard_normal((M, K)).astype(dtype)
        mask = _mask(rng, fmt, M, K, density)
        W = sp.from_dense(w, mask, format=fmt)
        assert W.dtype == dtype
        np.testing.assert_array_equal(W.to_dense(), np.where(mask, w, 0))
        x = rng.standard_normal((K, N)).astype(np.float32)
        bias = rng.standard_normal(M).astype(np.float32)
        for xx in (x, x[:, 0]):
            ref = W.to_dense().astype(np.float64) @ xx.astype(np.float64)
            got = sp.spmm(W, xx)
            assert got.shape == ref.shape
            assert got.dtype == np.float32
            assert np.all(np.abs(got - ref) <= _float_bound(W, xx))
        ref = W.to_dense().astype(np.float64) @ x + bias[:, None]
        got = sp.spmm(W, x, bias=bias, activation="relu")
        bound = _float_bound(W, x, bias)
        assert np.all(np.abs(got - np.maximum(ref, 0)) <= bound)
        out = np.full((M, N), np.nan, np.float32)
        assert sp.spmm(W, x, bias=bias, activation=(-0.5, 0.5), out=out) is out
        assert np.all(np.abs(out - np.clip(ref, -0.5, 0.5)) <= bound)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_spmm_k_chunks_same_bits(isa, fmt, dtype, monkeypatch):
    """Long K is walked in chunks (partial sums kept in out between them):
    the chunked result equals the one-pass result bit for bit, with bias and
    activation, for rows that are empty in some chunks."""
    rng = np.random.default_rng([31, FORMATS.index(fmt)])
    M, K, N = 11, 200, 70
    w = rng.standard_normal((M, K)).astype(np.float32)
    mask = _mask(rng, fmt, M, K, 0.15)
    mask[3, 40:] = False  # row 3: only the first chunks hold values
    W = sp.from_dense(w, mask, format=fmt, dtype=dtype)
    x = rng.standard_normal((K, N)).astype(np.float32)
    b = rng.standard_normal(M).astype(np.float32)
    monkeypatch.setattr(sp, "SPMM_K_CHUNK", 1 << 30)
    one = sp.spmm(W, x, bias=b, activation="relu6")
    monkeypatch.setattr(sp, "SPMM_K_CHUNK", 16)
    got = sp.spmm(W, x, bias=b, activation="relu6")
    np.testing.assert_array_equal(got, one)
    ref = np.clip(W.to_dense().astype(np.float64) @ x + b[:, None], 0, 6)
    assert np.all(np.abs(got - ref) <= _float_bound(W, x, b))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_spmm_column_tiles_same_bits(isa, fmt, dtype, monkeypatch):
    """Each output's sum is the same sequence of operations whatever tile its
    column falls in: N = 109 runs tiles of 64 + 32 + 13 columns on the AVX2
    tiles (8 / 4 / 2 vectors; BSR 4x1: 16-column tiles), a 64-column tile and
    a masked 45-column one on zmm; the slices (3, 27) and (8, 45) end in
    1-vector tiles. Column slices (other tile widths, X padded to other
    widths) give the same bits, as does the parallel driver (rows split over
    threads)."""
    rng = np.random.default_rng([41, FORMATS.index(fmt)])
    M, K, N = 10, 45, 109
    w = rng.standard_normal((M, K)).astype(np.float32)
    W = sp.from_dense(w, _mask(rng, fmt, M, K, 0.3), format=fmt, dtype=dtype)
    x = rng.standard_normal((K, N)).astype(np.float32)
    b = rng.standard_normal(M).astype(np.float32)
    y = sp.spmm(W, x, bias=b)
    assert np.all(np.abs(y - (W.to_dense().astype(np.float64) @ x + b[:, None]))
                  <= _float_bound(W, x, b))  # fmt: skip
    for a, e in [(0, 16), (3, 27), (8, 45), (40, 104), (61, 109), (100, 109)]:
        np.testing.assert_array_equal(sp.spmm(W, x[:, a:e], bias=b), y[:, a:e])
    monkeypatch.setattr(sp, "SERIAL_MACS", 0)
    np.testing.assert_array_equal(sp.spmm(W, x, bias=b), y)


@pytest.mark.parametrize("fmt", FORMATS)
def test_spmm_all_zero_and_fully_dense(isa, fmt):
    rng = np.random.default_rng(3)
    M, K, N = 6, 8, 20
    x = rng.standard_normal((K, N)).astype(np.float32)
    Z = sp.from_dense(np.zeros((M, K), np.float32), format=fmt)
    assert Z.to_dense().shape == (M, K)
    np.testing.assert_array_equal(sp.spmm(Z, x), np.zeros((M, N), np.float32))
    b = np.arange(M, dtype=np.float32)
    np.testing.assert_array_equal(sp.spmm(Z, x, bias=b), np.repeat(b[:, None], N, 1))
    w = rng.standard_normal((M, K)).astype(np.float32)
    if fmt == "nm24":
        w = np.where(prune.magnitude(w, pattern=(2, 4)), w, 0)
    D = sp.from_dense(w, np.ones((M, K), bool) if fmt != "nm24" else None, format=fmt)
    ref = w.astype(np.float64) @ x
    assert np.all(np.abs(sp.spmm(D, x) - ref) <= _float_bound(D, x))


def test_wide_k_uses_int32_indices(isa):
    rng = np.random.default_rng(4)
    M, K, N = 3, 70_001, 17
    w = np.zeros((M, K), np.float32)
    cols = rng.choice(K, 40, replace=False)
    w[0, cols] = 1.5
    w[2, K - 1] = -2.0
    W = sp.from_dense(w)
    assert W.idx.dtype == np.int32
    assert sp.from_dense(w[:, :65535]).idx.dtype == np.uint16
    x = rng.standard_normal((K, N)).astype(np.float32)
    assert np.all(
        np.abs(sp.spmm(W, x) - w.astype(np.float64) @ x) <= _float_bound(W, x)
    )


@pytest.mark.parametrize("threads", ["serial", "parallel"])
@pytest.mark.parametrize("fmt", ["csr", "bsr4x1"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_spmm_one_column_rows(isa, threads, fmt, dtype, monkeypatch):
    """N = 1 (the row-dot of 8-entry groups on x86, the scalar one on the
    portable path): rows of 0..41 stored entries (whole groups, every tail
    length, the alternating sums), both index widths, float16 values widened
    in the kernel, on the calling thread and split into parts; an inf in a
    column no row stores stays out of every row (only stored entries are
    read), and a NaN reaches exactly the rows that store its column."""
    if threads == "parallel":
        if numba.get_num_threads() < 2:
            pytest.skip("one numba thread: the parallel driver would run serially")
        monkeypatch.setattr(sp, "SERIAL_MACS", 0)
    ran = []
    names = ("spmv_float8_serial", "spmv_float8", "spmv_float")
    for name in names:
        real = getattr(sp._ks, name)
        monkeypatch.setattr(
            sp._ks, name, lambda *a, _r=real, _n=name: (ran.append(_n), _r(*a))[1]
        )
    fast = isa != "portable"
    want_kernel = (
        "spmv_float" if not fast
        else "spmv_float8" if threads == "parallel" else "spmv_float8_serial"
    )  # fmt: skip
    rng = np.random.default_rng([len(threads), len(fmt), np.dtype(dtype).itemsize])
    for M, K in [(44, 300), (9, 65_600)]:
        w = np.zeros((M, K), dtype)
        for m in range(M):
            n = min(m if m < 42 else int(rng.integers(0, 60)), K)
            cols = rng.choice(K - 2, n, replace=False)  # never the last two
            w[m, cols] = rng.standard_normal(n).astype(dtype)
        if fmt == "bsr4x1":
            w[:, -2:] = 0  # blocks span 4 rows: keep the two columns unstored
        W = sp.from_dense(w, format=fmt)
        assert W.idx.dtype == (np.uint16 if K <= 65535 else np.int32)
        x = rng.standard_normal(K).astype(np.float32)
        bias = rng.standard_normal(M).astype(np.float32)
        want = W.to_dense().astype(np.float64) @ x + bias
        got = sp.spmm(W, x, bias=bias)
        assert np.all(np.abs(got - want) <= _float_bound(W, x, bias))
        x[-1] = np.inf  # unstored in every row
        assert np.array_equal(sp.spmm(W, x, bias=bias), got)
        indptr, cols, _ = W._expanded()
        k = int(cols[indptr[min(30, M - 1)]])  # a column that row stores
        x[k] = np.nan
        # stored entries (BSR blocks store zeros too: 0 * nan is nan)
        stores = np.array([k in cols[indptr[r] : indptr[r + 1]] for r in range(M)])
        got = sp.spmm(W, x, bias=bias)
        assert np.isnan(got[stores]).all()
        assert not np.isnan(got[~stores]).any()
        # an inf weight or x value at a row's last entry (the one a partial
        # group's spare lanes reread): +-inf, not the nan of 0 * inf
        vals = W._expanded()[2]
        r = next(
            r
            for r in range(M)
            if (indptr[r + 1] - indptr[r]) % 8 and vals[indptr[r + 1] - 1] != 0
        )  # a partial group, a last entry that is no stored zero of a block
        x = rng.standard_normal(K).astype(np.float32)
        x[cols[indptr[r + 1] - 1]] = np.inf
        assert np.isinf(sp.spmm(W, x)[r])
        w2 = W.to_dense()
        w2[r, cols[indptr[r + 1] - 1]] = np.inf
        W2 = sp.from_dense(w2, w2 != 0, format=fmt)
        x = rng.standard_normal(K).astype(np.float32)
        assert np.isinf(sp.spmm(W2, x)[r])
    assert set(ran) == {want_kernel}


def _qref(W, x, sx, zx, sy, zy, **kw):
    """qlinear_matmul on the densified weights, transposed (weights as b)."""
    return lowprec.qlinear_matmul(
        np.ascontiguousarray(x.reshape(x.shape[0], -1).T),
        sx,
        zx,
        np.ascontiguousarray(W.to_dense().T),
        W.scale,
        W.zero_point,
        sy,
        zy,
        **kw,
    ).T.reshape((W.shape[0],) + x.shape[1:])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("x_dtype", [np.uint8, np.int8])
def test_qlinear_spmm_bit_exact(isa, fmt, x_dtype):
    rng = np.random.default_rng([11, FORMATS.index(fmt), x_dtype == np.int8])
    info = np.iinfo(x_dtype)
    for M, K, N, density, zw in [
        (13, 22, 70, 0.3, False),
        (9, 7, 1, 0.6, True),
        (5, 130, 33, 0.2, False),
        (8, 16, 64, 1.0, True),
    ]:
        w = rng.standard_normal((M, K)).astype(np.float32)
        mask = _mask(rng, fmt, M, K, density)
        if zw:  # int8 weights with per-row zero points
            q = rng.integers(-128, 128, (M, K), dtype=np.int8)
            zp = rng.integers(-20, 20, M, dtype=np.int8)
            sc = rng.uniform(0.001, 0.01, M).astype(np.float32)
            W = sp.from_dense(q, mask, format=fmt, scale=sc, zero_point=zp)
            assert np.array_equal(W.to_dense(), np.where(mask, q, zp[:, None]))
        else:
            W = sp.from_dense(w, mask, format=fmt, dtype=np.int8)
        x = rng.integers(info.min, info.max + 1, (K, N), dtype=x_dtype)
        sx, zx = np.float32(0.02), x_dtype(rng.integers(info.min, info.max + 1))
        bias = rng.integers(-5000, 5000, M, dtype=np.int32)
        for y_zp in (np.uint8(128), np.int8(-3)):
            sy = np.float32(0.05)
            for kw in ({}, {"bias": bias, "activation": "relu"}):
                got = sp.qlinear_spmm(W, x, sx, zx, sy, y_zp, **kw)
                ref = _qref(W, x, sx, zx, sy, y_zp, **kw)
                assert got.dtype == ref.dtype
                np.testing.assert_array_equal(got, ref)
        got = sp.qlinear_spmm(W, x[:, 0], sx, zx, None, None, out_dtype=np.float32)
        ref = _qref(W, x[:, 0], sx, zx, None, None, out_dtype=np.float32)
        np.testing.assert_array_equal(got, ref)
        got = sp.qlinear_spmm(
            W,
            x,
            sx,
            zx,
            None,
            None,
            bias=bias,
            activation=(-1.0, 2.0),
            out_dtype=np.float32,
        )
        ref = _qref(
            W,
            x,
            sx,
            zx,
            None,
            None,
            bias=bias,
            activation=(-1.0, 2.0),
            out_dtype=np.float32,
        )
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("threads", ["serial", "private_x", "shared_x"])
def test_qlinear_spmm_vnni_tiles(isa, threads, monkeypatch):
    """The int8 1x4 kernel's tile widths (16 / 32 / 64 columns, chosen per
    tile) and its one-column gather kernel, rows of 0..5 blocks (the loop runs
    two accumulator sets and a last odd block; the gather masks a partial
    group of 16), K not a multiple of 4, both index widths, every output type,
    on the calling thread and across the pool (each thread packing its own
    copy of X, or one copy packed before the parallel region)."""
    if threads != "serial":
        monkeypatch.setattr(sp, "SERIAL_MACS", 0)
    if threads == "shared_x":
        monkeypatch.setattr(sp, "_S8_PRIVATE_X_BYTES", 0)
    rng = np.random.default_rng([21, len(threads)])
    for M, K, N, x_dtype in [
        (7, 23, 16, np.uint8),
        (6, 40, 17, np.int8),
        (9, 21, 32, np.uint8),
        (5, 30, 33, np.int8),
        (11, 64, 65, np.uint8),
        (4, 90, 130, np.int8),
        # int32 block indices (K4 > 65535): 32- then 64- and 16-column tiles
        (3, 4 * 65536 + 3, 20, np.uint8),
        (3, 4 * 65536 + 1, 80, np.int8),
        # one column: the gather kernel (uint16 and int32 indices)
        (9, 300, 1, np.int8),
        (3, 4 * 65536 + 2, 1, np.uint8),
    ]:
        blocks = np.zeros((M, -(-K // 4)), bool)
        for m in range(M):  # row m keeps m % 6 blocks (one column: 7m % 40)
            nb = m % 6 if N > 1 else 7 * m % 40
            keep = rng.choice(blocks.shape[1], min(nb, blocks.shape[1]), False)
            blocks[m, keep] = True
        mask = np.repeat(blocks, 4, axis=1)[:, :K]
        w = rng.standard_normal((M, K)).astype(np.float32)
        W = sp.from_dense(w, mask, format="bsr1x4", dtype=np.int8)
        assert (W.idx.dtype == np.int32) == (-(-K // 4) > 65535)
        info = np.iinfo(x_dtype)
        x = rng.integers(info.min, info.max + 1, (K, N), dtype=x_dtype)
        sx, zx = np.float32(0.03), x_dtype(rng.integers(info.min, info.max + 1))
        bias = rng.integers(-3000, 3000, M, dtype=np.int32)
        for y_zp, kw in [
            (np.uint8(100), {"bias": bias}),
            (np.int8(-7), {"activation": "relu"}),
            (None, {"out_dtype": np.float32, "bias": bias, "activation": (-0.5, 3)}),
        ]:
            sy = None if y_zp is None else np.float32(0.04)
            got = sp.qlinear_spmm(W, x, sx, zx, sy, y_zp, **kw)
            ref = _qref(W, x, sx, zx, sy, y_zp, **kw)
            assert got.dtype == ref.dtype
            np.testing.assert_array_equal(got, ref)
            if y_zp is not None:  # the float64 epilogue where float32 lanes fit
                W._cache.pop("s8_calls", None)
                with monkeypatch.context() as mp:
                    mp.setattr(sp, "_f32_lanes_ok", lambda *a: False)
                    got = sp.qlinear_spmm(W, x, sx, zx, sy, y_zp, **kw)
                np.testing.assert_array_equal(got, ref)


def _int8_bsr1x4(rng, blocks, K):
    """int8 BSR 1x4 weights (M, K) with the 1x4 blocks where blocks (M,
    ceil(K/4)) holds, random normal values."""
    M = blocks.shape[0]
    mask = np.repeat(blocks, 4, axis=1)[:, :K]
    return sp.from_dense(
        rng.standard_normal((M, K)).astype(np.float32), mask, format="bsr1x4",
        dtype=np.int8,
    )  # fmt: skip


@given(
    st.integers(1, 12),
    st.integers(1, 200),
    st.integers(1, 140),
    st.floats(0.0, 1.0),
    st.sampled_from([np.uint8, np.int8]),
    st.sampled_from(["u8", "s8", "f32"]),
    st.booleans(),
    st.sampled_from(lowprec.available_isas()),
    st.integers(0, 2**32 - 1),
)
def test_qlinear_spmm_bsr1x4_matches_oracle(
    use_isa, M, K, N, density, x_dtype, out, parallel, isa, seed
):
    """int8 1x4 blocks (the VNNI kernel where the path has it) against the
    plain int64 oracle of eqs. 8-12 on the densified weights, any shape."""
    use_isa(isa)
    rng = np.random.default_rng(seed)
    W = _int8_bsr1x4(rng, rng.random((M, -(-K // 4))) < density, K)
    info = np.iinfo(x_dtype)
    x = rng.integers(info.min, info.max + 1, (K, N)).astype(x_dtype)
    zx = x_dtype(rng.integers(info.min, info.max + 1))
    sx = np.float32(rng.uniform(0.001, 0.1))
    bias = rng.integers(-20000, 20000, M).astype(np.int32)
    act = [None, "relu", (-1.5, 2.5)][int(rng.integers(3))]
    sy, zy = np.float32(rng.uniform(0.01, 1.0)), None
    kw = {"bias": bias, "activation": act}
    if out == "f32":
        sy, kw["out_dtype"] = None, np.float32
    else:
        zy = np.uint8(rng.integers(0, 256)) if out == "u8" else np.int8(-5)
    before = sp.SERIAL_MACS
    sp.SERIAL_MACS = 0 if parallel else 1 << 62
    try:
        got = sp.qlinear_spmm(W, x, sx, zx, sy, zy, **kw)
    finally:
        sp.SERIAL_MACS = before
    want = ref.qlinear_matmul(
        np.ascontiguousarray(x.T), sx, zx, np.ascontiguousarray(W.to_dense().T),
        W.scale, W.zero_point, sy, zy, **kw,
    ).T  # fmt: skip
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("threads", ["serial", "parallel"])
@pytest.mark.parametrize(
    ("M", "K", "density"),
    [
        (1, 4, 1.0),
        (17, 130, 0.3),  # a partial tile and a partial bank, K % 4 != 0
        (40, 300, 1.0),  # full banks: 32 slots a (tile, bank)
        (33, 520, 0.04),  # empty rows and empty banks
        (16, 1024, 0.6),
    ],
)
@pytest.mark.parametrize(("x_dtype", "out"), [(np.uint8, "u8"), (np.int8, "f32")])
def test_qlinear_spmm_one_column_banks(
    isa, M, K, density, threads, x_dtype, out, monkeypatch
):
    """N = 1: the banked one-column kernel (kernels/sparse_gemm.py BANK_WORDS,
    lowprec.sparse._gemv_banks; AVX-512) and the gathered one (_gather_tile,
    _gemv_gather8; AVX2) against the int64 oracle, serial and split into
    parts; rows are chosen so that some have many blocks in one bank (many
    slots) and others none, and tiles of 16 / 8 rows end inside M."""
    rng = np.random.default_rng([M, K, round(density * 100)])
    blocks = rng.random((M, -(-K // 4))) < density
    blocks[M // 2] = True  # one full row next to sparse ones: padded slots
    W = _int8_bsr1x4(rng, blocks, K)
    info = np.iinfo(x_dtype)
    x = rng.integers(info.min, info.max + 1, K).astype(x_dtype)
    zx = x_dtype(3)
    bias = rng.integers(-20000, 20000, M).astype(np.int32)
    sy, zy, kw = np.float32(0.3), np.uint8(100), {"bias": bias, "activation": "relu"}
    if out == "f32":
        sy, zy, kw["out_dtype"] = None, None, np.float32
    if threads == "parallel":
        monkeypatch.setattr(sp, "SERIAL_MACS", 0)
        monkeypatch.setattr(sp, "BANK_PARALLEL_SLOTS", 0)
        monkeypatch.setattr(sp, "GATHER_PARALLEL_SLOTS", 0)
    got = sp.qlinear_spmm(W, x, np.float32(0.05), zx, sy, zy, **kw)
    want = ref.qlinear_matmul(
        x[None, :], np.float32(0.05), zx, np.ascontiguousarray(W.to_dense().T),
        W.scale, W.zero_point, sy, zy, **kw,
    )[0]  # fmt: skip
    assert got.shape == (M,)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("over", [False, True])
def test_qlinear_spmm_float32_lanes_bound(isa, over, monkeypatch):
    """uint8 output with |acc| up to 2**24: the int8 tiles take their float32
    lanes only while lowprec.sparse's per-call bound (|P| <= stored * 255 *
    128, plus |zx| * max |rowsum| and max |bias|) stays below 2**24 (over:
    one more in the bias, the float64 epilogue), and both give the oracle's
    bytes."""
    rng = np.random.default_rng(5)
    M, K, N = 5, 16, 20
    W = _int8_bsr1x4(rng, rng.random((M, 4)) < 0.7, K)
    x = rng.integers(0, 256, (K, N), dtype=np.uint8)
    sx, zx, zy = np.float32(0.02), np.uint8(7), np.uint8(128)
    maxrow, _, rs = sp._row_stats(W)
    room = 2**24 - 1 - maxrow * 255 * 128 - 7 * int(np.abs(rs).max())
    bias = np.full(M, room + int(over), np.int32)
    bias[::2] *= -1
    # y = acc * M + zy stays inside uint8 for |acc| ~ 1.7e7
    sy = np.float32(float(sx) * float(W.scale.max()) * 1.7e7 / 120)
    seen = []
    real = sp._ks.spmm_s8_vnni_serial
    monkeypatch.setattr(sp._ks, "spmm_s8_vnni_serial",
                        lambda *a: seen.append(a[-3]) or real(*a))  # fmt: skip
    got = sp.qlinear_spmm(W, x, sx, zx, sy, zy, bias=bias)
    want = ref.qlinear_matmul(
        np.ascontiguousarray(x.T), sx, zx, np.ascontiguousarray(W.to_dense().T),
        W.scale, W.zero_point, sy, zy, bias=bias,
    ).T  # fmt: skip
    np.testing.assert_array_equal(got, want)
    assert np.all((got > 0) & (got < 255))  # none saturated: the lanes decide
    assert seen == ([] if isa == "portable" else [0 if over else 1])


def test_qlinear_spmm_cached_parameters():
    """The validated per-tensor parameters are cached on w per call key: calls
    that change one parameter at a time on the same w each match the oracle,
    and a bad value after cached good calls still raises."""
    rng = np.random.default_rng(11)
    M, K = 40, 64
    W = _int8_bsr1x4(rng, rng.random((M, K // 4)) < 0.4, K)
    x = rng.integers(0, 256, (K, 1)).astype(np.uint8)
    xs = x.astype(np.int16) - 128
    f32, u8, relu = np.float32, np.uint8, {"activation": "relu"}
    real = {"out_dtype": np.float32}
    calls = [
        (x, f32(0.02), u8(128), f32(0.5), u8(128), {}),
        (x, f32(0.03), u8(128), f32(0.5), u8(128), {}),
        (x, f32(0.03), 120, f32(0.5), u8(128), {}),
        (x, f32(0.03), 120, np.float16(0.25), u8(128), {}),
        (x, f32(0.03), 120, f32(0.5), u8(3), {}),
        (x, f32(0.03), 120, f32(0.5), np.int8(-3), {}),
        (x, f32(0.03), 120, f32(0.5), u8(3), relu),
        (x, f32(0.03), 120, None, None, real),
        (x, 0.03, 120, None, None, {**real, "activation": (-1.0, 1.0)}),
        (x, 0.03, 120, None, None, {**real, "activation": (0.0, 1.0)}),
        (x, 0.03, 120, None, None, {**real, "activation": (-0.0, 1.0)}),
        (xs.astype(np.int8), f32(0.03), np.int8(-8), f32(0.5), u8(3), {}),
        (x, f32(0.02), u8(128), f32(0.5), u8(128), {}),
    ]  # fmt: skip
    for _ in range(2):  # the second round reads every key from the cache
        for xx, sx, zx, sy, zy, kw in calls:
            got = sp.qlinear_spmm(W, xx, sx, zx, sy, zy, **kw)
            zx_ = np.asarray(zx, xx.dtype)
            want = ref.qlinear_matmul(
                np.ascontiguousarray(xx.T), np.float32(sx), zx_,
                np.ascontiguousarray(W.to_dense().T), W.scale, W.zero_point, sy, zy,
                **kw,
            ).T  # fmt: skip
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(np.signbit(got), np.signbit(want))  # -0.0
    with pytest.raises(ValueError, match="x_scale"):
        sp.qlinear_spmm(W, x, np.float32(-1.0), np.uint8(128), np.float32(0.5),
                        np.uint8(128))  # fmt: skip
    with pytest.raises(ValueError, match="zero_point"):
        sp.qlinear_spmm(W, x, np.float32(0.02), 300, np.float32(0.5), np.uint8(128))


def test_save_load_round_trip_and_smaller(tmp_path):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((256, 512)).astype(np.float32)
    np.save(tmp_path / "dense.npy", w)
    dense_bytes = (tmp_path / "dense.npy").stat().st_size
    mask = prune.magnitude(w, 0.9)
    for fmt, m in [
        ("csr", mask),
        ("bsr4x1", prune.magnitude(w, 0.9, pattern=("block", 4, 1))),
        ("bsr1x4", prune.magnitude(w, 0.9, pattern=("block", 1, 4))),
        ("nm24", prune.magnitude(w, pattern=(2, 4))),
    ]:
        for dt in (np.float32, np.float16, np.int8):
            W = sp.from_dense(w, m, format=fmt, dtype=dt)
            path = tmp_path / f"{fmt}_{np.dtype(dt).name}.npz"
            W.save(path)
            V = sp.load(path)
            assert (V.format, V.shape, V.dtype) == (W.format, W.shape, W.dtype)
            np.testing.assert_array_equal(V.to_dense(), W.to_dense())
            if dt == np.int8:
                np.testing.assert_array_equal(V.scale, W.scale)
            size = path.stat().st_size
            assert size < (0.75 if fmt == "nm24" else 0.25) * dense_bytes, (fmt, dt)
            assert W.nbytes < size + 1024


def test_load_rejects_bad_files(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a lowprec sparse file"):
        sp.load(tmp_path / "x.npz")
    W = sp.from_dense(np.eye(4, dtype=np.float32))
    np.savez(
        tmp_path / "bad.npz",
        lowprec_sparse=np.array(1),
        format=np.array("csr"),
        shape=np.array([4, 4]),
        ptr=W.ptr,
        idx=(W.idx + 9).astype(np.uint16),
        val=W.val,
    )
    with pytest.raises(ValueError, match="corrupt"):
        sp.load(tmp_path / "bad.npz")
    # int8 scales that from_dense would refuse (negated or NaN results), a
    # 2-D val, a plain .npy
    Q = sp.from_dense(np.eye(4, dtype=np.float32), dtype=np.int8)
    good = {"lowprec_sparse": np.array(sp.FORMAT_VERSION), "format": np.array("csr"),
            "shape": np.array([4, 4]), "ptr": Q.ptr, "idx": Q.idx, "val": Q.val,
            "scale": Q.scale, "zero_point": Q.zero_point}  # fmt: skip
    for key, bad in [
        ("scale", -Q.scale),
        ("scale", np.full(4, np.nan, np.float32)),
        ("val", Q.val.reshape(2, 2)),
    ]:
        np.savez(tmp_path / "q.npz", **{**good, key: bad})
        with pytest.raises(ValueError, match="corrupt"):
            sp.load(tmp_path / "q.npz")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(ValueError, match="not an .npz"):
        sp.load(tmp_path / "plain.npy")


def test_save_without_suffix(tmp_path):
    # np.savez alone appends ".npz" to such a name: load(path) found nothing
    W = sp.from_dense(np.eye(3, dtype=np.float32))
    W.save(tmp_path / "weights")
    np.testing.assert_array_equal(sp.load(tmp_path / "weights").to_dense(), np.eye(3))
    buf = io.BytesIO()  # and an open file object, as np.savez takes
    W.save(buf)
    buf.seek(0)
    np.testing.assert_array_equal(sp.load(buf).to_dense(), np.eye(3))


@pytest.mark.parametrize("N", [1, 2, 17])
def test_nm24_free_slots_skip_inf(isa, N, tmp_path):
    # a 2:4 group keeping one weight or none stores free slots (fill value,
    # a repeated position): their products are skipped, so an inf in a pruned
    # column stays out of the row, as for CSR, for every N and path, also
    # after a save / load; a kept 0 (mask True) is a stored entry, as in CSR
    w = np.array([[0, 2, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0]], np.float32)
    mask = w != 0
    mask[1, 1] = True  # a kept zero, alone in its group
    for dt in (np.float32, np.float16):
        W = sp.from_dense(w.astype(dt), mask, format="nm24")
        W.save(tmp_path / "w.npz")
        V = sp.load(tmp_path / "w.npz")
        C = sp.from_dense(w.astype(dt), mask, format="csr")
        for col in (0, 1, 5):  # pruned / kept in row 0, kept 0 in row 1 / pruned
            x = np.ones((8, N), np.float32)
            x[col] = np.inf
            want = sp.spmm(C, x)
            for M_ in (W, V):
                np.testing.assert_array_equal(sp.spmm(M_, x), want)
                np.testing.assert_array_equal(sp.spmm(M_, x[:, 0]), want[:, 0])
        assert W._expanded()[1].tolist() == [1, 1, 4]  # the stored entries only


def test_immutable():
    W = sp.from_dense(np.eye(3, dtype=np.float32))
    with pytest.raises(AttributeError, match="immutable"):
        W.val = None
    with pytest.raises(ValueError, match="read-only"):
        W.val[0] = 2


def test_inputs_not_modified():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((8, 12)).astype(np.float32)
    mask = rng.random((8, 12)) < 0.5
    x = rng.standard_normal((12, 5)).astype(np.float32)
    w0, m0, x0 = w.copy(), mask.copy(), x.copy()
    W = sp.from_dense(w, mask, format="bsr1x4")
    sp.spmm(W, x, bias=np.ones(8, np.float32), activation="relu")
    assert np.array_equal(w, w0)
    assert np.array_equal(mask, m0)
    assert np.array_equal(x, x0)


def test_bad_inputs():
    w = np.eye(4, dtype=np.float32)
    W = sp.from_dense(w)
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"x.shape\[0\] must equal"):
        sp.spmm(W, np.ones((5, 3), np.float32))
    with pytest.raises(TypeError, match="x must have dtype"):
        sp.spmm(W, x.astype(np.float64))
    with pytest.raises(TypeError, match="SparseMatrix"):
        sp.spmm(w, x)
    with pytest.raises(TypeError, match="qlinear_spmm"):
        sp.spmm(sp.from_dense(w, dtype=np.int8), x)
    with pytest.raises(TypeError, match="use lowprec.spmm"):
        sp.qlinear_spmm(W, x.astype(np.uint8), 0.1, 0, 0.1, np.uint8(0))
    with pytest.raises(ValueError, match="out must be"):
        sp.spmm(W, x, out=np.empty((4, 4), np.float32))
    with pytest.raises(ValueError, match="bias must be"):
        sp.spmm(W, x, bias=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="mask must have"):
        sp.from_dense(w, np.ones((4, 5), bool))
    with pytest.raises(ValueError, match="format must be"):
        sp.from_dense(w, format="coo")
    with pytest.raises(ValueError, match="at most 2 of every 4"):
        sp.from_dense(np.ones((2, 8), np.float32), format="nm24")
    with pytest.raises(ValueError, match="scale is required"):
        sp.from_dense(np.ones((2, 8), np.int8))
    with pytest.raises(ValueError, match="w must be 2-D"):
        sp.from_dense(np.ones(8, np.float32))
    Wq = sp.from_dense(w, dtype=np.int8)
    with pytest.raises(ValueError, match="bias must be"):
        sp.qlinear_spmm(
            Wq,
            x.astype(np.uint8),
            0.1,
            0,
            0.1,
            np.uint8(0),
            bias=np.ones(3, np.int32),
        )


def test_auto_pack_rejects_int8_and_takes_empty(monkeypatch):
    # int8 values would be truncated floats (dense) or fail in the timing
    # call (sparse); M = 0 failed to reshape its 4x1 block count
    w = np.ones((8, 8), np.float32)
    with pytest.raises(TypeError, match="dtype must be None, np.float32 or np.float16"):
        sp.auto_pack(w, n_hint=4, dtype=np.int8)
    model = {f: {str(n): [1e-6, 1e-9] for n in sp._CAL_N} for f in ("dense", *FORMATS)}
    monkeypatch.setitem(sp._cost_memory, sp._machine_key(), model)
    got = sp.auto_pack(np.zeros((0, 8), np.float32), n_hint=4, verify=False)
    assert got.weights.shape == (0, 8)


def test_auto_pack_choice_and_reason(monkeypatch):
    # a fixed cost model [seconds per call, per multiply-add]: dense 1 ns/MAC;
    # csr 4 ns per stored value and column (both 1 us per call)
    def table(per):
        return {str(n): [1e-6, per] for n in sp._CAL_N}

    model = {
        "dense": table(1e-9),
        "csr": table(4e-9),
        "bsr4x1": table(3e-9),
        "bsr1x4": table(3e-9),
        "nm24": table(4e-9),
    }
    monkeypatch.setitem(sp._cost_memory, sp._machine_key(), model)
    rng = np.random.default_rng(8)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    got = sp.auto_pack(np.where(prune.magnitude(w, 0.5), w, 0), n_hint=64, verify=False)
    assert got.choice == "dense"
    assert "not" in got.reason
    assert isinstance(got.weights, np.ndarray)
    w95 = np.where(prune.magnitude(w, 0.95), w, 0)
    got = sp.auto_pack(w95, n_hint=64, verify=False)
    assert got.choice == "csr"
    assert isinstance(got.weights, sp.SparseMatrix)
    assert "csr estimated" in str(got)
    assert got.measured_s is None
    # verified: the model's choice is timed against dense on these weights and
    # dropped when it measures slower (a stale or busy-machine model)
    monkeypatch.setattr(sp, "_measure_pair", lambda d, s, n: (1e-5, 3e-5))
    got = sp.auto_pack(w95, n_hint=64)
    assert got.choice == "dense"
    assert "dense kept" in got.reason
    assert got.measured_s == {"dense": 1e-5, "csr": 3e-5}
    np.testing.assert_array_equal(got.weights, w95)
    monkeypatch.setattr(sp, "_measure_pair", lambda d, s, n: (3e-5, 1e-5))
    got = sp.auto_pack(w95, n_hint=64)
    assert got.choice == "csr"
    assert "measured" in got.reason
    with pytest.raises(ValueError, match="n_hint"):
        sp.auto_pack(w, n_hint=0)


def test_measure_pair_times_both():
    w = np.random.default_rng(2).standard_normal((64, 64)).astype(np.float32)
    w[np.abs(w) < 1.5] = 0
    td, ts = sp._measure_pair(w, sp.from_dense(w, format="csr"), 8, rounds=2)
    assert 0 < td < 0.01
    assert 0 < ts < 0.01


def test_calibrate_writes_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(sp, "_cost_memory", {})
    monkeypatch.setattr(sp, "_CAL_N", (1, 16))
    monkeypatch.setattr(sp, "_CAL_SHAPE", (64, 64))
    model = sp.calibrate()
    assert set(model) == {"dense", "csr", "bsr4x1", "bsr1x4", "nm24"}
    assert all(c > 0 for t in model.values() for r in t.values() for c in r)
    assert (tmp_path / "lowprec" / sp._COST_FILE).is_file()
    monkeypatch.setattr(sp, "_cost_memory", {})
    assert sp.calibrate() == model  # read back from the file
