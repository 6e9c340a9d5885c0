"""conv_fp16: the accuracy contract of lowprec/conv_half.py, every path.

The oracle is written from the documented order, in numpy float32: x padded
with zeros; for each output one accumulator over the taps i, j (kernel rows,
columns) and then the channels c of the group, c fastest; each step
``acc + x * w`` rounds once (the product of two float16 values is exact in
float32). Vectorized over all outputs at once, one step per (i, j, c).
"""

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from memguard import guarded

from lowprec import conv_half as ch
from lowprec import half

U = 2.0**-24


@pytest.fixture(params=half.available_half_isas())
def half_isa(request):
    """Run the test once per half-precision path this CPU supports (forced)."""
    before = half.get_half_isa()
    half.set_half_isa(request.param)
    yield request.param
    half.set_half_isa(before)


@pytest.fixture(params=["taps", "rows"])
def tile_kernel(request, monkeypatch):
    """Force the SIMD path's tile kernel (6 pixels x 64 channels "taps", or 6
    channels x 64 positions "rows") whatever lowprec's routing would pick."""
    monkeypatch.setattr(ch, "_use_rows", lambda *geo: request.param == "rows")
    return request.param


# --------------------------------------------------------------------------- #
# oracle


def onnx_pads(spatial, k, s, d, auto_pad, pads):
    """(begin, end, out) per axis from the ONNX Conv spec."""
    n = len(k)
    begin, end, out = [], [], []
    for a in range(n):
        ke = (k[a] - 1) * d[a] + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            o = -(-spatial[a] // s[a])
            total = max(0, (o - 1) * s[a] + ke - spatial[a])
            small = total // 2
            b = small if auto_pad == "SAME_UPPER" else total - small
            e = total - b
        elif auto_pad == "VALID":
            b = e = 0
            o = (spatial[a] - ke) // s[a] + 1
        else:
            b, e = (pads[a], pads[a + n]) if pads else (0, 0)
            o = (spatial[a] + b + e - ke) // s[a] + 1
        begin.append(b)
        end.append(e)
        out.append(o)
    return begin, end, out


def ref_conv(x, w, group=1, strides=None, dilations=None, pads=None,
             auto_pad="NOTSET", dtype=np.float32):  # fmt: skip
    """The documented order (i, j, c) in ``dtype`` arithmetic (float32: the
    contract; float64: the exact-ish value and the bound's sum |x||w|)."""
    one_d = x.ndim == 3
    if one_d:
        x, w = x[:, :, None, :], w[:, :, None, :]
    nsp = 1 if one_d else 2
    k = w.shape[2:]
    s = tuple(strides or (1,) * nsp)
    d = tuple(dilations or (1,) * nsp)
    if one_d:
        s, d = (1, *s), (1, *d)
        pads = None if pads is None else (0, pads[0], 0, pads[1])
    b, e, o = onnx_pads(x.shape[2:], k, s, d, auto_pad, pads)
    N, C, H, W = x.shape
    M, Cg = w.shape[:2]
    Mg = M // group
    xp = np.zeros((N, C, H + b[0] + e[0], W + b[1] + e[1]), dtype)
    xp[:, :, b[0] : b[0] + H, b[1] : b[1] + W] = x
    wd = w.astype(dtype)
    acc = np.zeros((N, M, o[0], o[1]), dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        for g in range(group):
            ms = slice(g * Mg, (g + 1) * Mg)
            for i in range(k[0]):
                for j in range(k[1]):
                    for c in range(Cg):
                        r0, c0 = i * d[0], j * d[1]
                        xs = xp[:, g * Cg + c,
                                r0 : r0 + (o[0] - 1) * s[0] + 1 : s[0],
                                c0 : c0 + (o[1] - 1) * s[1] + 1 : s[1]]  # fmt: skip
                        acc[:, ms] = acc[:, ms] + (
                            xs[:, None] * wd[ms, c, i, j][None, :, None, None]
                        )
    return acc[:, :, 0, :] if one_d else acc


def same_bits(x, y):
    """Equal values (signed zeros equal), NaN where NaN."""
    assert x.shape == y.shape
    assert x.dtype == y.dtype
    nan = np.isnan(x.astype(np.float32))
    assert (nan == np.isnan(y.astype(np.float32))).all()
    return bool(np.array_equal(x[~nan], y[~nan]))


def check_contract(x, w, got, **kw):
    ref = ref_conv(x, w, **kw)
    assert got.dtype == np.float32
    assert same_bits(got, ref)
    exact = ref_conv(x, w, **kw, dtype=np.float64)
    mag = ref_conv(np.abs(x), np.abs(w), **kw, dtype=np.float64)
    K = w[0].size
    gamma = K * U / (1 - K * U)
    assert (np.abs(got - exact) <= gamma * mag).all()


def rand(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float16)


# name: (x shape, w shape, attributes); each exercises one kernel choice
CASES = {
    "dense3x3_taps": ((1, 16, 7, 9), (20, 16, 3, 3), {"pads": (1, 1, 1, 1)}),
    "panels_split": ((1, 16, 3, 5), (130, 16, 3, 3), {"pads": (1, 0, 1, 2)}),
    "1x1_flat": ((2, 17, 4, 5), (9, 17, 1, 1), {}),
    "1x1_stride2": ((1, 16, 6, 7), (8, 16, 1, 1), {"strides": (2, 2)}),
    "stem": ((1, 3, 15, 13), (10, 3, 7, 7), {"strides": (2, 2),
                                                    "pads": (3, 3, 3, 3)}),
    "few_channels_dilated": ((2, 4, 9, 9), (6, 4, 3, 2), {"dilations": (2, 3),
                                                    "pads": (0, 2, 1, 0)}),
    "taps_dilated_strided": ((1, 32, 10, 11), (7, 32, 3, 3), {
        "dilations": (2, 1), "strides": (1, 3), "pads": (2, 1, 0, 1)}),
    "groups": ((2, 32, 5, 6), (12, 16, 3, 3), {"group": 2, "pads": (1, 1, 1, 1)}),
    "groups_small": ((1, 6, 5, 5), (9, 2, 3, 3), {"group": 3}),
    "depthwise_s1": ((2, 5, 7, 9), (5, 1, 3, 3), {"group": 5, "pads": (1, 1, 1, 1)}),
    "depthwise_s2": ((1, 6, 9, 8), (6, 1, 3, 3), {"group": 6, "strides": (2, 2),
                                                  "pads": (1, 1, 1, 1)}),
    "depthwise_5x5_dil": ((1, 4, 11, 10), (4, 1, 5, 5), {"group": 4,
                          "dilations": (2, 1), "pads": (2, 3, 4, 1)}),
    "depthwise_mult2": ((1, 3, 6, 6), (6, 1, 3, 3), {"group": 3}),
    "conv1d": ((2, 18, 13), (5, 18, 3), {"pads": (1, 2), "strides": (2,)}),
    "conv1d_depthwise": ((1, 4, 12), (4, 1, 5), {"group": 4, "dilations": (2,)}),
    "same_upper": ((1, 16, 7, 8), (4, 16, 4, 3), {"auto_pad": "SAME_UPPER",
                                                  "strides": (2, 1)}),
    "same_lower": ((1, 3, 7, 8), (4, 3, 4, 3), {"auto_pad": "SAME_LOWER"}),
    "valid": ((1, 16, 6, 6), (4, 16, 3, 3), {"auto_pad": "VALID"}),
    # rows longer than one 96-pixel segment / 64-pixel depthwise chunk (16 for
    # the 3-column kernels on AVX2), masked
    # tails, a second 64-channel panel
    "1x1_flat_segments": ((1, 16, 10, 23), (70, 16, 1, 1), {}),
    "dense_wide_row": ((1, 16, 3, 120), (8, 16, 3, 3), {"pads": (1, 1, 1, 1)}),
    "stem_wide": ((1, 3, 5, 200), (10, 3, 7, 7), {"strides": (2, 2),
                                                  "pads": (3, 3, 3, 3)}),
    # several segments per row / image, 2 panels, groups with dilation
    "padded_rows": ((2, 16, 12, 14), (70, 16, 3, 3), {"pads": (1, 1, 1, 1)}),
    "padded_rows_dilated": ((1, 32, 9, 13), (12, 16, 3, 3), {"group": 2,
                            "dilations": (2, 2), "pads": (2, 2, 2, 2)}),
    "depthwise_wide_rows": ((1, 3, 4, 75), (3, 1, 3, 3), {"group": 3,
                            "pads": (1, 1, 1, 1)}),
    # rows of whole 16-pixel chunks only (no masked tail) from rows of 32
    "depthwise_whole_chunks": ((1, 2, 5, 32), (2, 1, 3, 3), {"group": 2,
                               "pads": (1, 1, 1, 1)}),
    "depthwise_wide_s2": ((1, 2, 5, 150), (2, 1, 3, 3), {"group": 2,
                          "strides": (2, 2), "pads": (1, 1, 1, 1)}),
    "depthwise_rows_dilated": ((1, 2, 9, 20), (2, 1, 3, 3), {"group": 2,
                               "dilations": (2, 1), "pads": (1, 0, 2, 1)}),
    # rows in pairs where the row stride equals the row dilation (2 and 2)
    "depthwise_pairs_dilated": ((1, 3, 11, 19), (3, 1, 3, 3), {"group": 3,
                                "strides": (2, 1), "dilations": (2, 1),
                                "pads": (2, 1, 1, 1)}),
    "depthwise_s3": ((1, 2, 10, 11), (2, 1, 3, 3), {"group": 2,
                     "strides": (3, 3), "pads": (1, 1, 1, 1)}),
    # stride 2 on rows split into column phases: even left pad, a masked
    # 32-column tail; dilated 5x5 taps across both phases
    "depthwise_s2_even_pad": ((1, 3, 7, 45), (3, 1, 3, 3), {"group": 3,
                              "strides": (2, 2), "pads": (2, 0, 1, 2)}),
    "depthwise_s2_dilated": ((1, 2, 9, 40), (2, 1, 5, 5), {"group": 2,
                             "strides": (2, 2), "dilations": (1, 2),
                             "pads": (2, 3, 2, 3)}),
    # AVX2: stride-2 3-column planes split into column phases at load time
    # (rows of < 16 values one at a time; a last overlapping 16; odd and even
    # left pads; a row stride of 1)
    "depthwise_s2_phases_narrow": ((1, 3, 9, 11), (3, 1, 3, 3), {"group": 3,
                                   "strides": (2, 2), "pads": (1, 1, 1, 1)}),
    "depthwise_s2_phases_tail": ((1, 2, 8, 37), (2, 1, 3, 3), {"group": 2,
                                 "strides": (2, 2), "pads": (0, 0, 1, 1)}),
    "depthwise_s2_phases_rows": ((1, 2, 6, 70), (2, 1, 3, 3), {"group": 2,
                                 "strides": (1, 2), "pads": (1, 2, 0, 1)}),
    # rows kernel: stride-2 columns split 32 at a time (odd and even left
    # pads), a grid narrower than a vector (one vector spans 3+ rows), strides
    # and dilations across phases, 6-channel tiles past M/group
    "stem_wide_even_pad": ((1, 3, 4, 100), (7, 3, 5, 5), {"strides": (2, 2),
                           "pads": (2, 2, 2, 2)}),
    "phases_odd_pad": ((1, 5, 9, 77), (8, 5, 3, 4), {"strides": (2, 3),
                       "dilations": (2, 1), "pads": (1, 3, 0, 2)}),
    "narrow_grid": ((2, 7, 6, 4), (13, 7, 3, 3), {"pads": (1, 1, 1, 1)}),
    "rows_groups": ((1, 24, 11, 20), (21, 8, 3, 3), {"group": 3,
                    "strides": (1, 2), "pads": (1, 1, 1, 1)}),
    # taps kernel with finite weights: padding-only taps skipped, border
    # columns as tiles down the column (2 on each side; one side only with
    # stride 2; > 96 rows, 3 chunks per column; no room between them)
    "bands_5x5": ((1, 16, 9, 11), (70, 16, 5, 5), {"pads": (2, 2, 2, 2)}),
    "bands_asym_s2": ((1, 16, 12, 13), (9, 16, 3, 3), {"strides": (2, 2),
                      "pads": (0, 2, 1, 0)}),
    "bands_tall": ((1, 16, 200, 5), (4, 16, 3, 3), {"pads": (1, 1, 1, 1)}),
    "bands_none": ((1, 16, 5, 1), (4, 16, 3, 3), {"pads": (1, 1, 1, 1)}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_float32_equals_ordered_sum(half_isa, tile_kernel, name):
    xs, ws, attrs = CASES[name]
    rng = np.random.default_rng(list(name.encode()))
    x, w = rand(rng, xs), rand(rng, ws)
    got = ch.conv_fp16(x, w, **attrs)
    check_contract(x, w, got, **attrs)


@settings(deadline=None)
@given(
    st.integers(1, 2), st.integers(1, 20), st.integers(1, 9), st.integers(1, 9),
    st.integers(1, 70), st.integers(1, 3), st.integers(1, 3), st.integers(1, 2),
    st.integers(1, 2), st.integers(0, 2), st.sampled_from([1, 2, 0]),
    st.integers(0, 2**32),
)  # fmt: skip
def test_random_geometry(half_isa, N, C, H, W, M, kh, kw, s, d, p, gsel, seed):
    # group: 1, 2 (when it divides) or depthwise (0 -> C)
    g = C if gsel == 0 else gsel
    if C % g:
        g = 1
    if gsel == 0:
        M = C
    elif M % g:
        M = g * max(1, M // g)
    attrs = {"group": g, "strides": (s, s), "dilations": (d, d), "pads": (p,) * 4}
    if H + 2 * p < (kh - 1) * d + 1 or W + 2 * p < (kw - 1) * d + 1:
        return
    rng = np.random.default_rng(seed)
    x, w = rand(rng, (N, C, H, W)), rand(rng, (M, C // g, kh, kw))
    check_contract(x, w, ch.conv_fp16(x, w, **attrs), **attrs)


def test_float32_large_k_bound(half_isa):
    # K = 9 * 64: the bound matters (values of mixed sign, large magnitudes)
    rng = np.random.default_rng(5)
    x, w = rand(rng, (1, 64, 6, 7), 30.0), rand(rng, (70, 64, 3, 3), 30.0)
    check_contract(x, w, ch.conv_fp16(x, w, pads=(1, 1, 1, 1)), pads=(1,) * 4)


@pytest.mark.parametrize(
    ("xs", "ws", "attrs", "rows"),
    [
        ((1, 3, 20, 20), (64, 3, 7, 7), {"strides": (2, 2)}, True),  # RGB stem
        ((1, 8, 9, 9), (64, 8, 3, 3), {}, True),  # few channels per group
        ((1, 32, 30, 30), (32, 32, 3, 3), {"pads": (1,) * 4}, True),  # narrow
        ((1, 64, 30, 30), (64, 64, 3, 3), {"pads": (1,) * 4}, False),
        ((1, 64, 6, 6), (32, 64, 3, 3), {"pads": (1,) * 4}, False),  # small grid
        ((1, 64, 16, 16), (128, 64, 1, 1), {"strides": (2, 2)}, False),
    ],
)
def test_kernel_routing(monkeypatch, xs, ws, attrs, rows):
    # which tile kernel runs (the SIMD path); results as the contract
    if not half._simd("f16"):
        pytest.skip("the selected half-precision path is not F16C+AVX-512")
    kc = ch._kernels()
    ran = []
    for name in ("conv_rows", "conv_simd"):
        real = getattr(kc, name)
        monkeypatch.setattr(
            kc, name, lambda *a, _r=real, _n=name: (ran.append(_n), _r(*a))[1]
        )
    rng = np.random.default_rng(4)
    x, w = rand(rng, xs), rand(rng, ws)
    check_contract(x, w, ch.conv_fp16(x, w, **attrs), **attrs)
    assert ran == ["conv_rows" if rows else "conv_simd"]


def test_depthwise_column_phases_layout():
    # _dw_load_phases (stride-2 depthwise planes on AVX2): padded row r's even
    # columns at [r, :], its odd ones at [r, P/2:], zeros elsewhere, in a
    # buffer of exactly Hp rows of _dw_pitch floats that ends at a page no
    # access may touch (a pitch miscomputed as 2 * (Wp/2 + 15) // 16 * 16
    # overran the scratch: heap corruption on 2 threads); rows of < 16, of
    # whole 16s and with a last overlapping 16, odd and even left pads
    from lowprec.kernels import fp16_conv as kc

    rng = np.random.default_rng(31)
    keep = []
    for H, W, pt, pl, pr in [(3, 11, 1, 1, 1), (4, 37, 0, 0, 1), (2, 70, 1, 2, 0),
                             (5, 16, 1, 1, 1), (3, 33, 2, 3, 2)]:  # fmt: skip
        Hp, Wp = H + pt + 1, W + pl + pr
        P = kc._dw_pitch(Wp, True)
        assert P % 32 == 0
        assert P // 2 >= (Wp + 1) // 2
        x = rng.standard_normal((1, 2, H, W)).astype(np.float16)
        buf = guarded(Hp * P, np.float32, keep)
        buf[:] = 0
        kc._dw_load_phases(x.view(np.uint16), 0, 1, pt, pl, P // 2, buf)
        xp = np.zeros((Hp, Wp), np.float32)
        xp[pt : pt + H, pl : pl + W] = x[0, 1]
        want = np.zeros((Hp, P), np.float32)
        want[:, : (Wp + 1) // 2] = xp[:, 0::2]
        want[:, P // 2 : P // 2 + Wp // 2] = xp[:, 1::2]
        np.testing.assert_array_equal(buf.reshape(Hp, P), want)


@pytest.mark.parametrize("bias", [False, True])
def test_rows_kernel_reads_stay_inside(monkeypatch, bias):
    # the rows kernel's loads of dropped lanes: past the last phase plane into
    # the slack (a 251-tap 1-D kernel reaches 280 floats past it), and the
    # bias when there is none (a 1-element dummy): both buffers end at a page
    # that faults on any read past them
    if not half._simd("f16"):
        pytest.skip("the selected half-precision path is not F16C+AVX-512")
    keep = []
    real = ch._dispatch.scratch

    def scratch(name, shape, dtype):
        if name == "conv_fp16.phases":
            return guarded(shape, dtype, keep)
        return real(name, shape, dtype)

    monkeypatch.setattr(ch._dispatch, "scratch", scratch)
    zero = guarded(1, np.float32, keep)
    zero[0] = 0.0
    monkeypatch.setattr(half, "_ZERO_BIAS", zero)
    rng = np.random.default_rng(12)
    for xs, ws, attrs in (
        ((1, 1, 600), (8, 1, 251), {"pads": (125, 125)}),
        ((1, 3, 9, 9), (12, 3, 3, 3), {"pads": (1, 1, 1, 1)}),
        ((1, 2, 5, 70), (7, 2, 3, 9), {"strides": (1, 2), "pads": (1, 4, 1, 4)}),
    ):
        x, w = rand(rng, xs), rand(rng, ws)
        b = rng.standard_normal(ws[0]).astype(np.float32) if bias else None
        got = ch.conv_fp16(x, w, b, **attrs)
        acc = ref_conv(x, w, **attrs)
        if bias:
            acc = (acc + b[(None, slice(None)) + (None,) * (acc.ndim - 2)]).astype(
                np.float32
            )
        assert same_bits(got, acc)


def test_avx2_taps_read_inside_the_planes(monkeypatch):
    # the avx2_f16c jobs copy each output row's run of a tap from the phase
    # planes (or, 1x1 stride 1 unpadded, from x itself) into their panels:
    # no read past the last plane or past x, which here end at a page that
    # faults; and the strips read no panel row past the job's 64 columns
    if "avx2_f16c" not in half.available_half_isas():
        pytest.skip("this CPU cannot run the avx2_f16c path")
    monkeypatch.setattr(half, "_selected", "avx2_f16c")
    keep = []
    real = ch._dispatch.scratch

    def scratch(name, shape, dtype):
        if name in ("conv_fp16.xq", "conv_fp16.panels"):
            return guarded(int(np.prod(shape)), dtype, keep).reshape(shape)
        return real(name, shape, dtype)

    monkeypatch.setattr(ch._dispatch, "scratch", scratch)
    rng = np.random.default_rng(13)
    for xs, ws, attrs in (
        ((1, 3, 9, 9), (12, 3, 3, 3), {"pads": (1, 1, 1, 1)}),  # 81 pixels
        ((2, 4, 6, 70), (5, 4, 3, 3), {"dilations": (1, 2)}),  # 4 rows of 66
        ((1, 8, 5, 5), (6, 8, 1, 1), {}),  # 1x1: x read in place
        ((1, 8, 13, 11), (6, 8, 1, 1), {}),  # 1x1: a last segment of 15
        ((1, 2, 300), (4, 2, 5), {"pads": (2, 2)}),  # 1-D, 5 segments
        # a last tile of 1 or 2 channels: its strips run 4 or 2 at a time
        ((1, 4, 9, 9), (1, 4, 3, 3), {"pads": (1, 1, 1, 1)}),
        ((1, 4, 9, 9), (7, 4, 3, 3), {"pads": (1, 1, 1, 1)}),
        ((1, 4, 9, 9), (8, 4, 3, 3), {"pads": (1, 1, 1, 1)}),
        # strided: the taps' runs from the stride phases
        ((1, 3, 15, 15), (8, 3, 7, 7), {"strides": (2, 2), "pads": (3, 3, 3, 3)}),
        ((1, 2, 11, 13), (3, 2, 3, 3), {"strides": (2, 3), "dilations": (2, 2)}),
        ((1, 2, 40), (3, 2, 4), {"strides": (3,), "pads": (1, 2)}),
        # runs of 1-3 pixels (element copies) next to longer ones
        ((1, 2, 3, 35), (1, 2, 1, 5),
         {"strides": (1, 3), "dilations": (1, 2), "pads": (1, 1, 1, 1)}),
        ((1, 3, 8, 3), (4, 3, 2, 2), {}),  # rows of 2 output pixels
    ):  # fmt: skip
        x, w = rand(rng, xs), rand(rng, ws)
        ref = ref_conv(x, w, **attrs)
        assert same_bits(ch.conv_fp16(x, w, **attrs), ref)
        xg = guarded(x.size, np.float16, keep).reshape(x.shape)
        xg[...] = x
        assert same_bits(ch.conv_fp16(xg, w, **attrs), ref)


@pytest.mark.parametrize("shared", [True, False])
def test_avx2_channel_blocks(monkeypatch, shared):
    # the avx2_f16c jobs split a group's channels into blocks of 24 (weights
    # past AVX2_W_BYTES) or of fewer than 2 jobs a thread's worth of
    # segments; forced here on every layer: the bits stay the portable ones.
    # shared: the blocks read panels packed once, before them; else (panels
    # past AVX2_PRE_BYTES) each job packs its own
    if "avx2_f16c" not in half.available_half_isas():
        pytest.skip("this CPU cannot run the avx2_f16c path")
    monkeypatch.setattr(half, "_selected", "avx2_f16c")
    monkeypatch.setattr(ch._kernels(), "AVX2_W_BYTES", 0)
    if not shared:
        monkeypatch.setattr(ch._kernels(), "AVX2_PRE_BYTES", 0)
    packs = []
    kernel = ch._kernels().conv_avx2
    monkeypatch.setattr(
        ch._kernels(),
        "conv_avx2",
        lambda *a: packs.append((a[6], a[5] < a[2][14])) or kernel(*a),
    )
    rng = np.random.default_rng(17)
    for xs, ws, attrs in (
        ((1, 6, 12, 12), (50, 6, 3, 3), {"pads": (1, 1, 1, 1)}),  # 24+24+2
        ((2, 8, 7, 9), (62, 4, 3, 3), {"group": 2, "strides": (2, 1)}),
        ((1, 4, 20, 20), (7, 4, 1, 1), {}),  # one block of 7
        ((1, 64, 7, 7), (64, 64, 3, 3), {"pads": (1, 1, 1, 1)}),  # 1 segment
    ):
        x, w = rand(rng, xs), rand(rng, ws)
        b = rng.standard_normal(ws[0]).astype(np.float32)
        for out_dtype in (np.float32, np.float16):
            got = ch.conv_fp16(x, w, b, activation="relu", out_dtype=out_dtype,
                               **attrs)  # fmt: skip
            acc = ref_conv(x, w, **attrs)
            acc = np.maximum((acc + b[None, :, None, None]).astype(np.float32), 0)
            assert same_bits(got, acc.astype(out_dtype))
    # (shared panels, channel blocks) per call: one block of 7 has no blocks
    assert any(blocks for _, blocks in packs)
    assert all(pre == (shared and blocks) for pre, blocks in packs)


def test_avx2_segments_span_images(monkeypatch):
    # the avx2_f16c segments of 64 output pixels run over the images one after
    # another: a segment's panel and epilogue pieces cross image boundaries
    # (49-pixel images; 1-pixel images: a piece a column), in both output
    # types, through shared panels and per-job ones
    if "avx2_f16c" not in half.available_half_isas():
        pytest.skip("this CPU cannot run the avx2_f16c path")
    monkeypatch.setattr(half, "_selected", "avx2_f16c")
    rng = np.random.default_rng(23)
    keep = []
    for xs, ws, attrs in (
        ((5, 6, 7, 7), (13, 6, 3, 3), {"pads": (1, 1, 1, 1)}),  # 245 pixels
        ((70, 3, 3, 3), (8, 3, 3, 3), {}),  # one pixel an image
        ((4, 5, 5, 7), (6, 5, 1, 1), {}),  # 1x1: the image read in place
        ((3, 4, 9, 5), (6, 2, 2, 3), {"group": 2, "strides": (2, 1)}),
    ):
        x, w = rand(rng, xs), rand(rng, ws)
        xg = guarded(x.size, np.float16, keep).reshape(x.shape)
        xg[...] = x
        b = rng.standard_normal(ws[0]).astype(np.float32)
        acc = ref_conv(x, w, **attrs)
        acc = np.clip((acc + b[None, :, None, None]).astype(np.float32), -0.5, 2)
        for blocks in (False, True):
            if blocks:  # channel blocks of 6 on panels packed first
                monkeypatch.setattr(ch._kernels(), "AVX2_W_BYTES", 0)
                monkeypatch.setattr(ch._kernels(), "AVX2_MB", 6)
            for out_dtype in (np.float32, np.float16):
                got = ch.conv_fp16(xg, w, b, activation=(-0.5, 2),
                                   out_dtype=out_dtype, **attrs)  # fmt: skip
                assert same_bits(got, acc.astype(out_dtype))


# --------------------------------------------------------------------------- #
# epilogue and output type


@pytest.mark.parametrize(
    "name",
    [
        "dense3x3_taps",
        "padded_rows",  # 2 images: the taps path pads and runs one at a time
        "stem",
        "depthwise_s1",
        "1x1_flat_segments",
        "depthwise_wide_rows",
        "narrow_grid",
    ],
)
def test_bias_activation_float16_output(half_isa, tile_kernel, name):
    xs, ws, attrs = CASES[name]
    rng = np.random.default_rng(11)
    # large values: the float16 output overflows to inf in places
    x, w = rand(rng, xs, 90.0), rand(rng, ws, 90.0)
    M = ws[0]
    saw_inf = False
    bias = rng.standard_normal(M).astype(np.float32) * 100
    acc = ref_conv(x, w, **attrs)
    y = (acc + bias[None, :, None, None]).astype(np.float32)
    for act, (lo, hi) in ((None, (-np.inf, np.inf)), ("relu", (0, np.inf)),
                          ((-5e4, 3e4), (-5e4, 3e4))):  # fmt: skip
        exp32 = np.clip(y, np.float32(lo), np.float32(hi))
        got32 = ch.conv_fp16(x, w, bias, activation=act, **attrs)
        assert same_bits(got32, exp32)
        got16 = ch.conv_fp16(
            x, w, bias.astype(np.float16).astype(np.float32) if act else bias,
            activation=act, out_dtype=np.float16, **attrs,
        )  # fmt: skip
        if act:
            b16 = bias.astype(np.float16).astype(np.float32)
            exp32 = np.clip(
                (acc + b16[None, :, None, None]).astype(np.float32),
                np.float32(lo), np.float32(hi),
            )  # fmt: skip
        assert got16.dtype == np.float16
        # numpy's astype rounds to nearest even, overflow -> inf
        with np.errstate(over="ignore"):
            assert same_bits(got16, exp32.astype(np.float16))
        saw_inf |= bool(np.isinf(got16).any())
    assert saw_inf


def test_float16_bias_accepted(half_isa):
    xs, ws, attrs = CASES["groups"]
    rng = np.random.default_rng(3)
    x, w = rand(rng, xs), rand(rng, ws)
    b16 = rand(rng, (ws[0],))
    a = ch.conv_fp16(x, w, b16, **attrs)
    b = ch.conv_fp16(x, w, b16.astype(np.float32), **attrs)
    assert same_bits(a, b)


def test_skip_plan():
    # which taps the taps kernel may leave out: (pt, pl, H, W, eL, eR)
    w = np.ones((8, 16, 3, 3), np.float16)
    packed = ch.pack_conv_weights_fp16(w)
    # 3x3 pad 1 on 7x9: one border column on each side
    plan = ch._skip_plan(packed, 6, 1, 1, 7, 9, 9, 11, 3, 1, 1, 9)
    assert plan.tolist() == [1, 1, 7, 9, 1, 1]
    # stride 2, pads (0, 2, 1, 0) on 12x13: column 0 only
    plan = ch._skip_plan(packed, 6, 0, 2, 12, 13, 13, 15, 3, 2, 1, 7)
    assert plan.tolist()[4:] == [1, 0]
    # no padding, or an inf weight (it must meet the padding's zeros): none
    assert ch._skip_plan(packed, 6, 0, 0, 7, 9, 7, 9, 3, 1, 1, 7)[0] == -1
    w[3, 2, 0, 0] = np.inf
    inf_packed = ch.pack_conv_weights_fp16(w)
    assert ch._skip_plan(inf_packed, 6, 1, 1, 7, 9, 9, 11, 3, 1, 1, 9)[0] == -1


@pytest.mark.parametrize("name", ["dense3x3_taps", "stem", "depthwise_s1",
                                  "depthwise_s2", "1x1_flat"])  # fmt: skip
def test_nan_inf_propagate(half_isa, tile_kernel, name):
    xs, ws, attrs = CASES[name]
    rng = np.random.default_rng(7)
    x, w = rand(rng, xs), rand(rng, ws)
    x[0, 0, 1, 1] = np.nan
    x[-1, -1, 2, 0] = np.inf
    x[0, -1, 0, 2] = -np.inf
    w[-1, 0, 0, -1] = np.inf  # next to padding: 0 * inf = NaN, as documented
    got = ch.conv_fp16(x, w, **attrs)
    ref = ref_conv(x, w, **attrs)
    assert np.isnan(ref).any()
    assert np.isinf(ref).any()
    assert same_bits(got, ref)


# --------------------------------------------------------------------------- #
# API: packing, views, inputs untouched


@pytest.mark.parametrize("name", ["dense3x3_taps", "padded_rows", "depthwise_s1",
                                  "1x1_flat"])  # fmt: skip
def test_prepared_calls_follow_every_argument(half_isa, tile_kernel, name):
    # conv_fp16 keeps a prepared call per input shape and attributes on the
    # packed weights: later calls with other bias values, a strided x, other
    # activations, output types and thread counts still give the contract's
    # bits, and bad arguments still raise
    rng = np.random.default_rng(21)
    xs, ws, attrs = CASES[name]
    group = attrs.get("group", 1)
    x, w = rand(rng, xs), rand(rng, ws)
    packed = ch.pack_conv_weights_fp16(w, group=group)
    acc = ref_conv(x, w, **attrs)
    threads = numba.get_num_threads()
    try:
        for t in sorted({1, threads}):
            numba.set_num_threads(t)
            for _ in range(2):  # the second round runs the kept calls
                b = rng.standard_normal(ws[0]).astype(np.float32)
                want = (acc + b[None, :, None, None]).astype(np.float32)
                assert same_bits(ch.conv_fp16(x, packed, b, **attrs), want)
                assert same_bits(ch.conv_fp16(x, packed, **attrs), acc)
                relu = ch.conv_fp16(x, packed, b, activation="relu", **attrs)
                assert same_bits(relu, np.maximum(want, np.float32(0)))
                y16 = ch.conv_fp16(x, packed, b, out_dtype=np.float16, **attrs)
                assert same_bits(y16, want.astype(np.float16))
                wide = np.zeros(xs[:3] + (2 * xs[3],), np.float16)
                wide[..., ::2] = x
                assert same_bits(ch.conv_fp16(wide[..., ::2], packed, **attrs), acc)
    finally:
        numba.set_num_threads(threads)
    # a clamp at -0.0 or +0.0 gives zeros of that sign: keys tell them apart
    for lo in (0.0, -0.0, 0.0):
        got = ch.conv_fp16(x, packed, activation=(lo, np.inf), **attrs)
        zero = got == 0
        assert zero.any()
        assert (np.signbit(got[zero]) == (lo == 0.0 and np.signbit(lo))).all()
    assert len(packed._plans) > 0
    with pytest.raises(TypeError, match="x"):
        ch.conv_fp16(x.astype(np.float32), packed, **attrs)
    with pytest.raises(ValueError, match="bias"):
        ch.conv_fp16(x, packed, np.zeros(3, np.float32), **attrs)
    with pytest.raises(ValueError, match="packed with"):
        ch.conv_fp16(x, packed, **dict(attrs, group=group + 1))
    bad = dict(attrs, pads=(1.5, 1, 1, 1))
    for _ in range(2):
        with pytest.raises((TypeError, ValueError)):
            ch.conv_fp16(x, packed, **bad)


def test_packed_weights_same_result(half_isa):
    xs, ws, attrs = CASES["groups"]
    rng = np.random.default_rng(1)
    x, w = rand(rng, xs), rand(rng, ws)
    packed = ch.pack_conv_weights_fp16(w, group=2)
    assert packed.shape == ws
    assert packed.group == 2
    assert "PackedConvWeightsFP16" in repr(packed)
    assert packed.nbytes > 0
    assert same_bits(ch.conv_fp16(x, packed, **attrs),
                     ch.conv_fp16(x, w, **attrs))  # fmt: skip
    with pytest.raises(AttributeError, match="immutable"):
        packed.group = 1
    with pytest.raises(ValueError, match="packed with"):
        ch.conv_fp16(x, packed, group=1)
    with pytest.raises(TypeError, match="already"):
        ch.pack_conv_weights_fp16(packed)


def test_views_and_inputs_untouched(half_isa):
    rng = np.random.default_rng(2)
    big = rand(rng, (2, 20, 9, 12))
    x = big[:, ::2, :, ::-1]  # non-contiguous, negative strides
    x.flags.writeable = False
    w = rand(rng, (6, 10, 3, 3))
    xc, wc = x.copy(), w.copy()
    got = ch.conv_fp16(x, w, pads=(1, 1, 1, 1))
    check_contract(np.ascontiguousarray(x), w, got, pads=(1, 1, 1, 1))
    assert np.array_equal(x, xc)
    assert np.array_equal(w, wc)
    # 1x1, stride 1, no padding: avx2_f16c reads a contiguous x in place
    x1 = rand(rng, (2, 10, 7, 9))
    w1 = rand(rng, (12, 10, 1, 1))
    x1c = x1.copy()
    check_contract(x1c, w1, ch.conv_fp16(x1, w1))
    assert same_bits(x1, x1c)


def test_empty_batch():
    x = np.zeros((0, 3, 5, 5), np.float16)
    w = np.zeros((4, 3, 3, 3), np.float16)
    assert ch.conv_fp16(x, w).shape == (0, 4, 3, 3)


# --------------------------------------------------------------------------- #
# bad input


X = np.zeros((1, 4, 5, 5), np.float16)
W = np.zeros((6, 4, 3, 3), np.float16)


@pytest.mark.parametrize(
    ("args", "kw", "exc", "match"),
    [
        (
            (X.astype(np.float32), W),
            {},
            TypeError,
            r"x must have dtype float16.*astype",
        ),
        ((X, W.astype(np.float32)), {}, TypeError, r"w must have dtype float16"),
        ((X.tolist(), W), {}, TypeError, "numpy.ndarray"),
        ((X, W[:, :2]), {}, ValueError, "C=4 channels"),
        ((X, W), {"group": 2}, ValueError, "not divisible|C=4 channels"),
        ((X, W), {"group": 0}, ValueError, "group must be >= 1"),
        ((X, W), {"group": 1.5}, TypeError, "group must be an int"),
        ((X[0], W), {}, ValueError, "dimensions"),
        ((X[..., None], W[..., None]), {}, NotImplementedError, "3-D convolution"),
        ((X, W), {"kernel_shape": (2, 2)}, ValueError, "kernel_shape"),
        ((X, W), {"pads": (1, 1, 1, 1), "auto_pad": "VALID"}, ValueError, "together"),
        ((X, W), {"auto_pad": "SAME"}, ValueError, "auto_pad must be one of"),
        ((X, W), {"strides": (0, 1)}, ValueError, "strides"),
        ((X, W), {"dilations": (3, 3)}, ValueError, "larger than the padded"),
        ((X, W), {"out_dtype": np.int8}, TypeError, "out_dtype"),
        ((X, W, np.zeros(5, np.float32)), {}, ValueError, "bias"),
        ((X, W, np.zeros(6, np.int32)), {}, TypeError, "bias"),
        ((X, W), {"activation": "gelu"}, ValueError, "activation"),
    ],
)
def test_bad_input(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        ch.conv_fp16(*args, **kw)


def test_geometry_cache_keeps_checking():
    # the attributes' checks are cached by value: a valid call first, then the
    # same values as bools / floats / numpy ints must still be judged afresh
    ok = ch.conv_fp16(X, W, pads=[1, 1, 1, 1], strides=(1, 1), group=1)
    assert ok.shape == (1, 6, 5, 5)
    with pytest.raises(ValueError, match="pads"):
        ch.conv_fp16(X, W, pads=[True, 1, 1, 1], strides=(1, 1))
    with pytest.raises(ValueError, match="pads"):
        ch.conv_fp16(X, W, pads=[1.0, 1, 1, 1])
    with pytest.raises(TypeError, match="group must be an int"):
        ch.conv_fp16(X, W, group=True)
    same = ch.conv_fp16(X, W, pads=np.array([1, 1, 1, 1]), strides=(1, 1))
    assert same_bits(same, ok)


def test_pack_bad_input():
    with pytest.raises(TypeError, match="float16"):
        ch.pack_conv_weights_fp16(W.astype(np.float32))
    with pytest.raises(ValueError, match="not divisible"):
        ch.pack_conv_weights_fp16(W, group=4)
    with pytest.raises(ValueError, match="3-D .* or 4-D"):
        ch.pack_conv_weights_fp16(W[0, 0])
