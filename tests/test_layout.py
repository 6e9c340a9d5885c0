"""kernels/layout.py: the byte transposes and the 2x2 max pool against numpy."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from lowprec.kernels import layout


# shapes that reach every block kind: 64x16 and 16x64 zmm blocks, 8x8 uint64
# blocks, and the byte tails on both axes
@pytest.mark.parametrize(
    "shape",
    [(1, 256, 3, 56), (1, 200, 1, 64), (2, 70, 5, 19), (1, 64, 3, 16),
     (1, 129, 2, 130), (1, 16, 1, 64), (1, 33, 1, 200), (1, 7, 2, 5)],
)  # fmt: skip
@pytest.mark.parametrize("flip", [0, 0x80])
def test_transpose_matches_numpy(shape, flip):
    rng = np.random.default_rng(sum(shape))
    src = rng.integers(0, 256, shape, dtype=np.uint8)
    before = src.copy()
    dst = np.zeros(tuple(np.array(shape)[[0, 2, 3, 1]]), np.uint8)
    layout.transpose(src, dst, np.uint8(flip))
    np.testing.assert_array_equal(dst, src.transpose(0, 2, 3, 1) ^ np.uint8(flip))
    np.testing.assert_array_equal(src, before)


def test_transpose_into_strided_destination():
    # the padded NHWC buffer's interior: row strides larger than the rows
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, (1, 96, 4, 40), dtype=np.uint8)
    big = np.full((1, 6, 44, 96), 7, np.uint8)
    layout.transpose(src, big[:, 1:5, 2:42], np.uint8(0))
    np.testing.assert_array_equal(big[:, 1:5, 2:42], src.transpose(0, 2, 3, 1))
    assert (big[:, 0] == 7).all()
    assert (big[:, :, :2] == 7).all()
    assert (big[:, :, 42:] == 7).all()


# 64-channel blocks (the last overlapping: 70, 130), 16-pixel blocks across
# image rows (14 x 14, 3 x 7, 1 x 16) and the last one overlapping, batches,
# pixel runs past one task (_TASK_PIXELS = 256: 19 x 19)
@pytest.mark.parametrize(
    ("N", "C", "H", "W", "pads"),
    [(1, 64, 14, 14, (1, 1, 1, 1)), (2, 70, 3, 7, (0, 2, 1, 0)),
     (1, 130, 1, 16, (0, 0, 0, 0)), (2, 64, 19, 19, (2, 1, 0, 3)),
     (1, 256, 5, 17, (1, 1, 1, 1))],
)  # fmt: skip
@pytest.mark.parametrize("flip", [0, 0x80])
def test_to_padded_nhwc_matches_numpy(N, C, H, W, pads, flip):
    pt, pb, pl, pr = pads
    rng = np.random.default_rng(C * H + W)
    x = rng.integers(0, 256, (N, C, H, W), dtype=np.uint8)
    before = x.copy()
    dst = np.full((N, H + pt + pb, W + pl + pr, C), 7, np.uint8)
    layout.to_padded_nhwc(x.reshape(N, C, H * W), dst, W, pt, pl, np.uint8(flip))
    want = np.pad(
        x.transpose(0, 2, 3, 1) ^ np.uint8(flip),
        ((0, 0), (pt, pb), (pl, pr), (0, 0)),
        constant_values=7,
    )
    np.testing.assert_array_equal(dst, want)
    np.testing.assert_array_equal(x, before)


def test_maxpool2x2_nhwc():
    rng = np.random.default_rng(4)
    y = rng.standard_normal((2, 7, 9, 5)).astype(np.float32)
    out = np.empty((2, 3, 4, 5), np.float32)
    layout.maxpool2x2_nhwc(y, out)
    want = y[:, :6, :8].reshape(2, 3, 2, 4, 2, 5).max(axis=(2, 4))
    np.testing.assert_array_equal(out, want)


def test_maxpool2x2_nchw():
    # numpy's np.maximum rule (NaN propagates), odd sizes dropped; the float16
    # variant (F16C) rounds the pooled float32 once
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 7, 9)).astype(np.float32)
    x.flat[rng.choice(x.size, 40, replace=False)] = np.float32(np.nan)
    x.flat[rng.choice(x.size, 40, replace=False)] = np.float32(-np.inf)
    x[1] = 1e5  # past float16's range
    x[2, :, 0::2] = -0.0  # ties of -0 and +0: numpy keeps the second
    x[2, :, 1::2] = 0.0
    x[3, 0::2] = 0.0
    x[3, 1::2] = -0.0
    before = x.copy()
    out = np.empty((5, 3, 4), np.float32)
    tmp = np.empty((numba.config.NUMBA_NUM_THREADS, 9 + 12), np.float32)
    layout.maxpool2x2_nchw(x, out, tmp)
    t = np.maximum(x[:, 0:6:2, :8], x[:, 1:6:2, :8])
    want = np.maximum(t[..., 0::2], t[..., 1::2])
    np.testing.assert_array_equal(out, want)
    bits = ~np.isnan(want)  # signs of zero included
    np.testing.assert_array_equal(out.view(np.uint32)[bits], want.view(np.uint32)[bits])
    assert np.signbit(want[2:4]).any()
    assert not np.signbit(want[2:4]).all()
    assert np.isnan(out).any()
    np.testing.assert_array_equal(x, before)
    from lowprec import half
    from lowprec.kernels import fp16_conv

    if half.get_half_isa() == "portable":
        pytest.skip("float16 rows: F16C paths only")
    for chunk in (1, 2, fp16_conv.pool16_planes(3, 4)):  # the last: all 5 planes
        o16 = np.empty((5, 3, 4), np.uint16)
        t16 = np.empty((numba.config.NUMBA_NUM_THREADS, 9 + chunk * 12), np.float32)
        fp16_conv.maxpool2x2_to16(x, o16, t16, chunk)
        np.testing.assert_array_equal(o16, want.astype(np.float16).view(np.uint16))
