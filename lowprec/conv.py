"""INT8 convolution: ONNX ConvInteger and QLinearConv, prepacked weights.

The same contract as the INT8 GEMM (docs/quantization.md), with the GEMM's rows
being output pixels and its columns output channels of one group:

    raw product   P = im2col(x') @ w'   x' = x (+128 if int8), w' = w (-128 if uint8)
    exact result  acc = P - ZA*colsum(w') - ZB*rowsum(x - x_zp) + bias     (eq. 8)
    output        int32 acc | sat(rint(acc*mult + y_zp)) | float32(acc*mult) (11-13)

Padding is the input zero point, i.e. a real 0 (ONNX subtracts the zero point
before padding). The input is brought once to a padded NHWC uint8 buffer x'
(skipped for NHWC uint8 input that needs no padding); the kernels never build
a full im2col matrix: the VNNI path gathers 6 output pixels' patches per tile
into a small per-thread buffer (1x1 stride-1 convolutions read the pixels in
place), depthwise convolutions have their own kernel (kernels/int8_conv.py).

NCHW input with few channels per group, large images or a 1x1 stride-1
kernel takes a second VNNI kernel instead (conv_nchw4, chosen by _nchw4_fits):
output channels are the tile's rows and pixels its columns, so there is no
transpose on either side, only a 4-channel interleave of the input (per panel
for 1x1; with a dense K and no channel blocks for few channels on VBMI hosts),
and the output is written as NCHW.
"""

from __future__ import annotations

import math
import numbers

import numba
import numpy as np

from . import _dispatch
from . import _validate as v
from .gemm import (
    K_INT32_SAFE,
    SERIAL_MACS,
    _a_offset,
    _b_offset,
    _bias,
    _hashable,
    _multiplier,
    _on_gpu,
    _out_dtype,
    _quant_bounds,
    _ro,
    _y_zero_point,
)
from .kernels import int8_conv as _kc
from .kernels import int8_gemm_ymm as _ky
from .kernels import layout as _kl

_MODE_INT32, _MODE_QUANT, _MODE_FLOAT = 0, 1, 2
AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")
LAYOUTS = ("NCHW", "NHWC")
# portable path: output pixels per tile (rows of one thread's int32 scratch)
PORTABLE_TILE = 16
# depthwise convolutions with fewer outputs than this run on the calling thread
DW_SERIAL_OUTPUTS = 1 << 15
# rows of the VNNI register tile (output channels on the NCHW4 path)
MR_ROWS = 6
# NCHW input on the VNNI path: the channels-as-rows kernel (conv_nchw4) takes
# convolutions with at most this many input channels per group, or at least
# this many output pixels per image (see _nchw4_fits; tests move both to force
# either kernel)
NCHW4_MAX_CHANNELS = 8
NCHW4_MIN_PIXELS = 8192
# ... and every 1x1 stride-1 unpadded convolution (tests turn it off)
NCHW4_DIRECT = True
# the NCHW4 path packs few-channel inputs with a dense K where it can
# (_dense_k; tests turn it off to run the 4-channel blocks)
NCHW4_DENSE = True
# VNNI path: with fewer than this many pixel tiles per thread, jobs are also
# split over 64-channel weight panels (threads over output channels)
SPLIT_N_TILES = 8
# amx path: convolutions with at least this many output pixels and output
# channels a group run on AMX tile blocks (32 pixels x 64 channels); others
# on the avx512_vnni kernels. Tests set both to 1.
AMX_MIN_ROWS = 32
AMX_MIN_CHANNELS = 16


class PackedConvWeights:
    """Immutable prepacked convolution weights for ``conv_integer`` / ``qlinear_conv``.

    Build with :func:`pack_conv_weights`. Holds w' (docs eq. 5) in GEMM order
    (group, kh*kw*C/group, M/group), its column sums, the zero point / scale
    given at pack time, and each path's layout, built on first use.
    """

    __slots__ = (
        "shape",
        "dtype",
        "group",
        "zero_point",
        "scale",
        "_wk",
        "_col_sum",
        "_p_max",
        "_zb_eff",
        "_layouts",
        "_plans",
    )

    def __init__(self, w, group, zero_point=None, scale=None):
        M, Cg = w.shape[:2]
        ks = w.shape[2:]
        kh, kw = (1, ks[0]) if len(ks) == 1 else ks
        G = group
        Mg = M // G
        K = kh * kw * Cg
        flip = np.int16(128 if w.dtype == np.uint8 else 0)
        w_s8 = (w.astype(np.int16) - flip).astype(np.int8).reshape(G, Mg, Cg, kh, kw)
        # wk[g, (i*kw + j)*Cg + c, m] = w'[g*Mg + m, c, i, j]
        wk = np.ascontiguousarray(w_s8.transpose(0, 3, 4, 2, 1).reshape(G, K, Mg))
        col_sum = wk.astype(np.int64).sum(axis=1).reshape(M)
        # |P| <= 255 * max_m sum_k |w'| (x' <= 255): the VNNI tile's float32
        # epilogue needs |P + bias| < 2**24 (narrow_epilogue)
        p_max = 255 * int(np.abs(wk.astype(np.int64)).sum(axis=1).max(initial=0))
        zb = np.zeros(1, w.dtype) if zero_point is None else zero_point
        zb_eff = np.empty(M, np.int64)
        zb_eff[:] = zb.reshape(-1).astype(np.int64) - _b_offset(w.dtype)
        fields = {
            "shape": tuple(w.shape),
            "dtype": w.dtype,
            "group": G,
            "zero_point": zero_point,
            "scale": scale,
            "_wk": wk,
            "_col_sum": col_sum,
            "_p_max": p_max,
            "_zb_eff": zb_eff,
            "_layouts": {},
            "_plans": {},
        }
        for name, value in fields.items():
            if isinstance(value, np.ndarray):
                value.flags.writeable = False
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        msg = (
            "PackedConvWeights is immutable; pack new weights with "
            "lowprec.pack_conv_weights"
        )
        raise AttributeError(msg)

    def __repr__(self):
        zp = "none" if self.zero_point is None else f"{self.zero_point.shape}"
        sc = "none" if self.scale is None else f"{self.scale.shape}"
        return (
            f"PackedConvWeights(shape={self.shape}, group={self.group}, "
            f"dtype={self.dtype}, zero_point={zp}, scale={sc})"
        )

    @property
    def nbytes(self) -> int:
        return (
            self._wk.nbytes
            + self._col_sum.nbytes
            + sum(
                a.nbytes
                for v in self._layouts.values()
                for a in (v if isinstance(v, tuple) else (v,))
            )
        )

    def _vnni(self) -> np.ndarray:
        """(G, NP, K4, 64, 4) int8: kernels/int8_gemm_vnni.pack_b per group."""
        from .kernels import int8_gemm_vnni as kv

        return self._grouped("vnni", (self._wk.shape[1] + 3) // 4, kv.pack_b)

    def _amx(self) -> np.ndarray:
        """(G, NP, K4p, 64, 4) int8: kernels/int8_gemm_amx.pack_b per group
        (the VNNI layout with K padded to a multiple of 64), 64-byte aligned."""
        from .kernels import int8_gemm_amx as ka

        K = self._wk.shape[1]
        return self._grouped("amx", -(-max(K, 1) // ka.KB) * ka.KB // 4, ka.pack_b)

    def _grouped(self, key, K4, pack) -> np.ndarray:
        """The layout `key`, built on first use: (G, NP, K4, 64, 4) int8,
        64-byte aligned, pack(weights of group g) (a VNNI panel layout of K4
        rows of 4 k) in slot g."""
        bp = self._layouts.get(key)
        if bp is None:
            from .kernels import int8_gemm_vnni as kv

            G, _, Mg = self._wk.shape
            NP = -(-Mg // kv.NR)
            size = G * NP * K4 * kv.NR * 4
            raw = np.zeros(size + 64, np.int8)
            off = (-raw.ctypes.data) % 64
            bp = raw[off : off + size].reshape(G, NP, K4, kv.NR, 4)
            for g in range(G):
                bp[g] = pack(self._wk[g])
            bp.flags.writeable = False
            self._layouts[key] = bp
        return bp

    def _avx2(self) -> np.ndarray:
        """(G, NP, K2, 16, 2) int16: kernels/int8_gemm_ymm.pack_b16 per group."""
        bp = self._layouts.get("avx2")
        if bp is None:
            bp = np.stack([_ky.pack_b16(wg, _ky.AVX2_NR) for wg in self._wk])
            bp.flags.writeable = False
            self._layouts["avx2"] = bp
        return bp

    def _nchw4(self, dense=False):
        """(a, rowsum(a), ones): a (M, K) uint8 = w' + 128 in the K order of
        kernels/int8_conv.py's channels-as-rows tile, padding bytes = 128 (w'
        = 0). K order (i, j, c4, 4 channels), channels past C/group padded
        (conv_nchw4); with ``dense`` (i, c, j), K = kh*Cg*kw bytes padded to
        whole words only (conv_nchw4_dense)."""
        key = "nchw4d" if dense else "nchw4"
        lay = self._layouts.get(key)
        if lay is None:
            G, _, Mg = self._wk.shape
            M, Cg = self.shape[:2]
            ks = self.shape[2:]
            kh, kw = (1, ks[0]) if len(ks) == 1 else ks
            w = self._wk.reshape(G, kh, kw, Cg, Mg).astype(np.int16) + 128
            if dense:
                K = kh * Cg * kw
                a = np.full((M, -(-K // 4) * 4), 128, np.uint8)
                a[:, :K] = w.transpose(0, 4, 1, 3, 2).reshape(M, K)
            else:
                a = np.full((G, Mg, kh, kw, 4 * -(-Cg // 4)), 128, np.uint8)
                a[..., :Cg] = w.transpose(0, 4, 1, 2, 3)
                a = a.reshape(M, -1)
            # a's row sums, and the row of ones that sums a panel's columns
            lay = (a, a.sum(axis=1, dtype=np.int64), np.ones(a.shape[1], np.uint8))
            for arr in lay:
                arr.flags.writeable = False
            self._layouts[key] = lay
        return lay

    def _depthwise(self, zb_eff) -> np.ndarray:
        """(kh*kw, C) int32 = w - w_zero_point, exact (one output channel per group)."""
        key = ("dw", zb_eff.tobytes())
        wd = self._layouts.get(key)
        if wd is None:
            G, T, _ = self._wk.shape
            wd = np.ascontiguousarray(
                (self._wk[:, :, 0].astype(np.int64) - zb_eff[:, None]).T
            ).astype(np.int32)
            wd.flags.writeable = False
            # a bounded number of weight zero points: drop the older ones
            # (not the GEMM layouts kept beside them)
            dws = [k for k in self._layouts if isinstance(k, tuple) and k[0] == "dw"]
            for old in dws[: max(0, len(dws) - 15)]:
                del self._layouts[old]
            self._layouts[key] = wd
        return wd


def pack_conv_weights(w, w_zero_point=None, w_scale=None, *, group=1):
    """Prepack convolution weights once for many calls.

    Parameters
    ----------
    w : ndarray (M, C/group, kW) or (M, C/group, kH, kW) of uint8 or int8
        (ONNX weight layout, for both activation layouts)
    w_zero_point : scalar or (M,) of w's dtype, optional
    w_scale : scalar or (M,) float32/float16, optional (needed by qlinear_conv
        unless passed there)
    group : int, the convolution's number of groups

    Returns
    -------
    PackedConvWeights, accepted as ``w`` by :func:`conv_integer` and
    :func:`qlinear_conv` with results identical to the unpacked call.
    """
    if isinstance(w, PackedConvWeights):
        msg = "w is already a PackedConvWeights object; pass it to the conv directly"
        raise TypeError(msg)
    _check_w(w)
    group = _check_group(group)
    M = w.shape[0]
    if M % group:
        msg = (
            f"w has M={M} output channels, not divisible by group={group}; "
            f"each group needs M/group output channels"
        )
        raise ValueError(msg)
    zp = None
    if w_zero_point is not None:
        zp = _m_param(
            v.zero_point_param(w_zero_point, "w_zero_point", w.dtype), "w_zero_point", M
        )
    sc = None
    if w_scale is not None:
        sc = _m_param(v.scale_param(w_scale, "w_scale"), "w_scale", M)
    return PackedConvWeights(w, group, zp, sc)


# --------------------------------------------------------------------------- #
# validation and geometry


def _check_w(w):
    v.check_array(
        w, "w", v.INT8_TYPES, fix="quantize it first with lowprec.quantize_linear"
    )
    check_w_shape(w)


def check_w_shape(w):
    """Convolution weights: (M, C/group, kW) or (M, C/group, kH, kW), no empty
    dimension (shared with the float16 convolution)."""
    if w.ndim == 5:
        msg = "3-D convolution (5-D w) is not implemented; lowprec supports 1-D and 2-D"
        raise NotImplementedError(msg)
    if w.ndim not in (3, 4):
        msg = (
            f"w must be 3-D (M, C/group, kW) or 4-D (M, C/group, kH, kW), "
            f"got shape {w.shape}"
        )
        raise ValueError(msg)
    if 0 in w.shape:
        msg = f"w must not have an empty dimension, got shape {w.shape}"
        raise ValueError(msg)


def _check_group(group):
    if type(group) is int and group >= 1:  # the common case, without the ABC check
        return group
    if not isinstance(group, numbers.Integral) or isinstance(group, bool):
        msg = f"group must be an int, got {type(group).__name__}"
        raise TypeError(msg)
    if group < 1:
        msg = f"group must be >= 1, got {group}"
        raise ValueError(msg)
    return int(group)


def _m_param(arr, name, M):
    if arr.size == 1:
        return arr.reshape(1)
    if arr.ndim == 1 and arr.shape[0] == M:
        return arr
    msg = (
        f"{name} must be a scalar or have shape ({M},) (one per output channel), "
        f"got {arr.shape}"
    )
    raise ValueError(msg)


def _ints(value, name, n, default, minimum):
    if value is None:
        return (default,) * n
    try:
        vals = tuple(value)
    except TypeError:
        msg = f"{name} must be a sequence of {n} ints, got {value!r}"
        raise TypeError(msg) from None
    if len(vals) != n or not all(
        isinstance(t, int | np.integer) and not isinstance(t, bool) for t in vals
    ):
        msg = f"{name} must be a sequence of {n} ints, got {value!r}"
        raise ValueError(msg)
    vals = tuple(int(t) for t in vals)
    if min(vals) < minimum:
        what = "non-negative" if minimum == 0 else f">= {minimum}"
        msg = f"every entry of {name} must be {what}, got {vals}"
        raise ValueError(msg)
    return vals


# _geometry's results by its arguments (validated ones only: a failing call
# raises before anything is stored). Its checks cost ~5 us of a ~20 us small
# conv_fp16 call; engines call a layer with the same attributes every time
_GEOMETRY_CACHE: dict = {}


def _exact_ints(value):
    """value as a tuple key when it is None or a list/tuple of plain ints
    (type-exact: True == 1 must not hit a cached 1); else None."""
    if value is None:
        return ()
    if type(value) in (tuple, list) and all(type(t) is int for t in value):
        return tuple(value)
    return None


def _geometry(x_spatial, k, auto_pad, dilations, pads, strides):
    """ONNX Conv output size and begin/end pads per spatial axis."""
    parts = (_exact_ints(dilations), _exact_ints(pads), _exact_ints(strides))
    if type(auto_pad) is not str or None in parts:
        return _geometry_checked(x_spatial, k, auto_pad, dilations, pads, strides)
    key = (tuple(x_spatial), tuple(k), auto_pad, dilations is None, pads is None,
           strides is None, *parts)  # fmt: skip
    hit = _GEOMETRY_CACHE.get(key)
    if hit is None:
        hit = _geometry_checked(x_spatial, k, auto_pad, dilations, pads, strides)
        if len(_GEOMETRY_CACHE) >= 512:
            _GEOMETRY_CACHE.clear()
        _GEOMETRY_CACHE[key] = hit
    return hit


def _geometry_checked(x_spatial, k, auto_pad, dilations, pads, strides):
    n = len(k)
    if auto_pad not in AUTO_PADS:
        msg = f"auto_pad must be one of {', '.join(AUTO_PADS)}, got {auto_pad!r}"
        raise ValueError(msg)
    d = _ints(dilations, "dilations", n, 1, 1)
    s = _ints(strides, "strides", n, 1, 1)
    if pads is not None and auto_pad != "NOTSET":
        msg = f"pads and auto_pad={auto_pad!r} cannot be used together; drop one"
        raise ValueError(msg)
    p = _ints(pads, "pads", 2 * n, 0, 0)
    begin, end, out = [], [], []
    for a in range(n):
        size, ke = x_spatial[a], (k[a] - 1) * d[a] + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            o = -(-size // s[a])
            total = max((o - 1) * s[a] + ke - size, 0)
            b = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            e = total - b
        else:
            b, e = (p[a], p[a + n]) if auto_pad == "NOTSET" else (0, 0)
            o = (size + b + e - ke) // s[a] + 1
        if o < 1:
            msg = (
                f"the kernel ({k[a]} taps, dilation {d[a]}) is larger than the padded "
                f"input ({size} + pads {b}+{e}) along spatial axis {a}; add padding "
                f"or use a smaller kernel"
            )
            raise ValueError(msg)
        begin.append(b)
        end.append(e)
        out.append(o)
    return tuple(out), tuple(begin), tuple(end), s, d


def _weights(w, w_zero_point, w_scale, group, need_scale):
    """(packed, zb_eff (M,) int64, scale (1|M,) or None) from an array or a pack."""
    group = _check_group(group)
    if isinstance(w, PackedConvWeights):
        if group != w.group:
            msg = (
                f"group={group} differs from the group={w.group} the weights were "
                f"packed with; pass group={w.group}"
            )
            raise ValueError(msg)
        packed = w
        M = w.shape[0]
        zb_eff = w._zb_eff
        if w_zero_point is not None:
            zp = _m_param(
                v.zero_point_param(w_zero_point, "w_zero_point", w.dtype),
                "w_zero_point",
                M,
            )
            if w.zero_point is None:
                zb_eff = np.empty(M, np.int64)
                zb_eff[:] = zp.astype(np.int64) - _b_offset(w.dtype)
            elif not _same(zp, w.zero_point):
                msg = (
                    "w_zero_point was given both to pack_conv_weights and to this "
                    "call with different values; pass it in one place only"
                )
                raise ValueError(msg)
        scale = w.scale
        if w_scale is not None:
            sc = _m_param(v.scale_param(w_scale, "w_scale"), "w_scale", M)
            if scale is not None and not _same(sc, scale):
                msg = (
                    "w_scale was given both to pack_conv_weights and to this call "
                    "with different values; pass it in one place only"
                )
                raise ValueError(msg)
            scale = sc
    else:
        packed = pack_conv_weights(w, w_zero_point, w_scale, group=group)
        zb_eff, scale = packed._zb_eff, packed.scale
    if need_scale and scale is None:
        msg = "w_scale is required (pass it here or to pack_conv_weights)"
        raise ValueError(msg)
    return packed, zb_eff, scale


def _same(a, b):
    return a.dtype == b.dtype and a.size in (1, b.size) and bool(np.all(a == b))


def _check_x(x, packed, layout, kernel_shape):
    v.check_array(
        x, "x", v.INT8_TYPES, fix="quantize it first with lowprec.quantize_linear"
    )
    if layout not in LAYOUTS:
        msg = f"layout must be 'NCHW' or 'NHWC', got {layout!r}"
        raise ValueError(msg)
    wshape = packed.shape
    if x.ndim == 5:
        msg = "3-D convolution (5-D x) is not implemented; lowprec supports 1-D and 2-D"
        raise NotImplementedError(msg)
    if x.ndim != len(wshape):
        msg = (
            f"x has {x.ndim} dimensions and w {len(wshape)}: a {len(wshape) - 2}-D "
            f"convolution needs x of shape (N, C, *spatial) with "
            f"{len(wshape) - 2} spatial axes (layout {layout})"
        )
        raise ValueError(msg)
    C = x.shape[1] if layout == "NCHW" else x.shape[-1]
    spatial = x.shape[2:] if layout == "NCHW" else x.shape[1:-1]
    G = packed.group
    if C != wshape[1] * G:
        msg = (
            f"x has C={C} channels but w expects C/group * group = "
            f"{wshape[1]} * {G} = {wshape[1] * G} (w shape {wshape}, group={G}, "
            f"layout {layout}); fix group or the channel axis"
        )
        raise ValueError(msg)
    k = tuple(wshape[2:])
    if kernel_shape is not None and _ints(kernel_shape, "kernel_shape", len(k), 1,
                                          1) != k:  # fmt: skip
        msg = f"kernel_shape={tuple(kernel_shape)} does not match w.shape[2:]={k}"
        raise ValueError(msg)
    return C, spatial, k


# --------------------------------------------------------------------------- #
# the driver


def _check_k(K):
    """The reduction length must keep the int32 accumulator exact (eq. 7)."""
    if K > K_INT32_SAFE:
        msg = (
            f"C/group * kH * kW = {K} exceeds {K_INT32_SAFE}, beyond which an int32 "
            f"accumulator may overflow; lowprec's convolution does not split K"
        )
        raise ValueError(msg)


def _plan(
    x, packed, zb_eff, za, bias, mult, zy, qlo, qhi, mode, odt, layout, attrs
):  # fmt: skip
    """Validate and prepare one convolution for x's shape, dtype and layout:
    geometry, kernel choice, folded bias, weight layouts; returns run(x) for any
    x of that shape and dtype (qlinear_conv / conv_integer keep it per packed
    weights and call arguments: the preparation is ~40 us of Python)."""
    C, spatial, k = _check_x(x, packed, layout, attrs["kernel_shape"])
    out_sp, pb, pe, s, d = _geometry(
        spatial, k, attrs["auto_pad"], attrs["dilations"], attrs["pads"],
        attrs["strides"],
    )  # fmt: skip
    N = x.shape[0]
    M = packed.shape[0]
    G = packed.group
    Cg, Mg = C // G, M // G
    one_d = len(k) == 1
    H, W = (1, spatial[0]) if one_d else spatial
    kh, kw = (1, k[0]) if one_d else k
    Ho, Wo = (1, out_sp[0]) if one_d else out_sp
    sh, sw = (1, s[0]) if one_d else s
    dh, dw = (1, d[0]) if one_d else d
    pt, pl = (0, pb[0]) if one_d else pb
    pbot, pr = (0, pe[0]) if one_d else pe
    K = kh * kw * Cg
    _check_k(K)
    rows = N * Ho * Wo
    shape_nhwc = (N, Wo, M) if one_d else (N, Ho, Wo, M)
    shape_nchw = (N, M, *shape_nhwc[1:-1])
    if rows == 0 or M == 0:
        return lambda x: np.empty(shape_nhwc if layout == "NHWC" else shape_nchw, odt)

    za_eff = int(za) + _a_offset(x.dtype)
    flip = np.uint8(0x80 if x.dtype == np.int8 else 0)
    Hp, Wp = H + pt + pbot, W + pl + pr
    x4shape = (N, C, H, W) if layout == "NCHW" else (N, H, W, C)
    geo = np.array(
        [N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M], np.int64
    )
    threads = numba.config.NUMBA_NUM_THREADS  # scratch rows
    # small convolutions run on the calling thread (call_on_threads); depthwise
    # ones by output count: at 9 MACs per output, 1M MACs is ~0.1 ms of work
    # (144 x 28 x 28 stride 2: 0.16 -> 0.11 ms on two threads)
    depthwise = G == C and Mg == 1
    if depthwise:
        # the depthwise kernels sum (bias - ZA sum w') + sum x * w' in int32:
        # where that could pass int32 (huge biases), the GEMM path's exact
        # int64 sums take the layer instead of a silent wrap
        wd = packed._depthwise(zb_eff)
        wd64 = wd.astype(np.int64)
        base64 = bias - za_eff * wd64.sum(axis=0)
        bound = np.abs(base64) + 255 * np.abs(wd64).sum(axis=0)
        depthwise = bool(bound.max(initial=0) <= np.iinfo(np.int32).max)
        base = _ro(base64.astype(np.int32))  # the kernels' bias (eq. 8)
    small = rows * M < DW_SERIAL_OUTPUTS if depthwise else rows * M * K < SERIAL_MACS
    zy, qlo, qhi = float(zy), float(qlo), float(qhi)
    mult = _ro(mult)
    isa = _dispatch.get_isa()

    def x_bytes(x):
        return _ro(np.ascontiguousarray(x).reshape(x4shape).view(np.uint8))

    def par():
        return 1 if small else _dispatch.num_threads()

    if depthwise and layout == "NCHW":
        # depthwise on the NCHW planes themselves: no transposes
        kernel, wk = _kc.depthwise_nchw, wd
        if (
            isa in ("amx", "avx512_vnni", "avx_vnni", "avx2")
            and (kh, kw, dw) == (3, 3, 1)
            and sw in (1, 2)
            and -128 <= wd.min() <= wd.max() <= 127
        ):
            # the kernel rows' int8 weights packed (w0, w1, w2, 0) per int32;
            # vpdpbusd on AVX-512 VNNI, vpmaddwd on AVX2 (_dw3_pmaddwd: 144 x
            # 56^2, 1 thread, Zen 3: stride 1 19 -> 22 GOP/s, stride 2 6.7 ->
            # 12, ORT QLinearConv 13 / 8)
            b8 = wd.astype(np.int64) & 0xFF
            wk = (b8[0::3] | b8[1::3] << 8 | b8[2::3] << 16).astype(np.int32)
            kernel = _kc.depthwise_nchw_vnni
            # requantized in float32 lanes where exact (|acc| <= |base| + 9 *
            # 255 * 128 < 2**24, the multipliers, z_y and bounds of the GEMM
            # tile's case 3): 144 x 56^2, 1 thread: stride 1 252 -> 152 us,
            # stride 2 112 -> 88 us
            if mode == _MODE_QUANT and _f32_epilogue_ok(
                int(np.abs(base).max(initial=0)) + 9 * 255 * 128, mult, zy, qlo, qhi
            ):
                mode = 3
        wk = _ro(wk)
        # per-thread scratch rows padded to whole cache lines (+1): rows that
        # shared a line made 2 threads slower than 1 (false sharing)
        plane_shape = (threads, -(-Hp * (Wp + 1) // 64) * 64 + 64)
        acc_shape = (threads, -(-Wo // 16) * 16 + 16)

        def run_depthwise(x):
            out = np.empty(shape_nchw, odt)
            _dispatch.call_on_threads(
                par(), kernel, x_bytes(x), flip, np.uint8(za_eff), wk, base, geo,
                pt, pl, _dispatch.scratch("dw.plane", plane_shape, np.uint8),
                _dispatch.scratch("dw.acc", acc_shape, np.int32), mult, zy, qlo,
                qhi, mode, out.reshape(N, M, Ho, Wo),
            )  # fmt: skip
            return out

        return run_depthwise
    amx = isa == "amx" and rows >= AMX_MIN_ROWS and Mg >= AMX_MIN_CHANNELS
    if (
        layout == "NCHW"
        and isa == "avx512_vnni"
        and _nchw4_fits(
            packed,
            G,
            Mg,
            Ho * Wo,
            kh == kw == 1 and sh == sw == 1 and pt == pl == pbot == pr == 0,
        )
    ):
        nchw4 = _nchw4_plan(
            x, packed, zb_eff, za_eff, bias, mult, zy, qlo, qhi, mode, geo,
            (pt, pl, pbot, pr),
        )  # fmt: skip

        def run_nchw4(x):
            out = np.empty(shape_nchw, odt)
            nchw4(x_bytes(x), par(), out.reshape(N, M, Ho, Wo))
            return out

        return run_nchw4

    def padded(x):
        # x' as padded NHWC uint8 (the input itself when nothing has to change)
        if (
            layout == "NHWC"
            and x.dtype == np.uint8
            and (Hp, Wp) == (H, W)
            and x.flags.c_contiguous
        ):
            return x.reshape(x4shape)
        return _pad_nhwc(x.reshape(x4shape), layout, flip, np.uint8(za_eff), pt, pbot,
                         pl, pr)  # fmt: skip

    def output(out):
        return (
            out.reshape(shape_nhwc) if layout == "NHWC" else _to_nchw(out, shape_nhwc)
        )

    def rows_out():
        # an NCHW result is transposed out of this (rows, M) buffer: reused scratch
        if layout == "NHWC":
            return np.empty((rows, M), odt)
        return _dispatch.scratch("conv.rows", (rows, M), odt)

    if depthwise:

        def run_depthwise_nhwc(x):
            out = rows_out()
            scratch = np.empty((threads, -(-C // 16) * 16 + 16), np.int32)  # own lines
            _dispatch.call_on_threads(
                par(), _kc.depthwise, padded(x), wd, base, geo, scratch, mult, zy,
                qlo, qhi, mode, out,
            )  # fmt: skip
            return output(out)

        return run_depthwise_nhwc

    za_arr = np.full(1, za_eff, np.int64)
    cs = packed._col_sum
    need_rows = bool(zb_eff.any())

    def row_sums(xp):
        if not need_rows:
            return np.zeros((G, 1), np.int64)
        rs = np.empty((G, rows), np.int64)
        _kc.row_sums(xp, geo, za_eff, rs)
        return rs

    if isa in ("amx", "avx512_vnni"):
        bp = packed._vnni()
        ka = -(-max(K, 4) // 64) * 64  # rows of the gather buffer 64-byte apart
        direct = int(kh == 1 and kw == 1 and sh == 1 and sw == 1 and G == 1 and C >= 4)
        if not direct and G == 1 and dw == 1 and (kw * C) % 4 == 0:
            # rows read in place as kernel-row runs, no gather: 3x3 32->64 at
            # 14x14 1.40 -> 1.28 ms, 64->128 at 7x7 1.17 -> 1.13 ms (62 images,
            # 1 thread, best of 6 alternating processes)
            direct = 2
        mt = -(-rows // _kc.MR_MAX)
        panels = bp.shape[1]
        # the fused tile's epilogue (read-only arrays, float bounds, no float
        # bias: conv's bias is the integer one in the accumulator), ZA folded
        # into the bias (eq. 8): the tile then skips the general correction
        # unless the weights have zero points
        zero1 = _ro(np.zeros(1, np.int64))
        folded = _ro(bias - za_eff * cs)
        fzeros = _ro(np.full(M, -0.0, np.float32))  # no float bias: x + -0.0 = x

        if amx:
            return _amx_runner(
                packed, padded, row_sums, rows_out, output, geo, (zero1, cs,
                _ro(zb_eff), folded, mult, zy, qlo, qhi, mode, fzeros), par,
            )  # fmt: skip

        def run_vnni(x):
            xp = padded(x)
            fused = (zero1, _ro(row_sums(xp)), cs, _ro(zb_eff), folded, mult, zy,
                     qlo, qhi, mode, fzeros)  # fmt: skip
            nth = _dispatch.num_threads()
            pbk = panels if mt * G >= SPLIT_N_TILES * nth else 1
            # pixel tiles per job: up to 8 while leaving >= 16 jobs per thread
            jobs = mt * G * -(-panels // pbk)
            tj = max(1, min(8, jobs // (16 * nth)))
            out = rows_out()
            sa = np.zeros((threads, _kc.MR_MAX if direct == 0 else 1, ka), np.uint8)
            st = np.empty((threads, _kc.MR_MAX), np.int64)
            _dispatch.call_on_threads(
                par(), _kc.conv_vnni, _ro(xp), bp, geo, pbk, tj, direct, sa, st,
                fused, packed._p_max, out,
            )  # fmt: skip
            return output(out)

        return run_vnni

    if isa == "avx2":
        # AVX2 without VNNI: conv_vnni's jobs on the exact vpmaddwd tiles, each
        # job's rows gathered and widened in per-thread scratch (kernels/
        # int8_conv.conv_avx2). Against the whole-image gather, serial
        # pack_a16 and GEMM it replaced, Zen 3, GOP/s, 1 / 2 threads: 3x3
        # 64->64 at 56^2 101 -> 118 / 129 -> 224, 1x1 256->64 89 -> 105 / 108
        # -> 164, 3x3 256->256 at 14^2 100 -> 130 / 188 -> 219, stem 77 -> 91
        # / 102 -> 173, the 56^2 3x3 at batch 8 94 -> 117 / 125 -> 236
        bp = packed._avx2()
        # 1x1 stride 1: the padded input's pixels are the output rows
        direct = int(kh == kw == 1 and sh == sw == 1 and G == 1)
        ka = -(-max(K, 1) // 64) * 64
        mt = -(-rows // _ky.AVX2_MR)
        panels = bp.shape[1]
        zero1 = _ro(np.zeros(1, np.int64))
        folded = _ro(bias - za_eff * cs)
        fzeros = _ro(np.full(M, -0.0, np.float32))  # no float bias: x + -0.0 = x

        def run_avx2(x):
            xp = padded(x)
            fused = (zero1, _ro(row_sums(xp)), cs, _ro(zb_eff), folded, mult, zy,
                     qlo, qhi, mode, fzeros)  # fmt: skip
            nth = _dispatch.num_threads()
            pbk = panels if mt * G >= SPLIT_N_TILES * nth else 1
            jobs = mt * G * -(-panels // pbk)
            # pixel tiles per job as run_vnni's, their widened rows <= 256 KB
            tj = max(1, min(8, jobs // (16 * nth), (256 << 10) // (192 * -(-K // 16))))
            out = rows_out()
            sa = _dispatch.scratch("conv.avx2.sa", (threads, _ky.AVX2_MR, ka), np.uint8)
            s16 = _dispatch.scratch(
                "conv.avx2.s16",
                (threads, *_ky.a16_shape(_ky.AVX2_MR * tj, K)),
                np.uint16,
            )
            _dispatch.call_on_threads(
                par(), _kc.conv_avx2, _ro(xp), bp, geo, pbk, tj, direct, sa, s16,
                fused, packed._p_max, out,
            )  # fmt: skip
            return output(out)

        return run_avx2

    def run_portable(x):
        xp = padded(x)
        out = rows_out()
        sa = np.zeros((threads, PORTABLE_TILE, max(K, 1)), np.uint8)
        sp = np.empty((threads, PORTABLE_TILE, Mg), np.int32)
        _dispatch.call_on_threads(
            par(), _kc.conv_portable, xp, packed._wk, geo, sa, sp, za_arr,
            row_sums(xp), cs, zb_eff, bias, mult, zy, qlo, qhi, mode, out,
        )  # fmt: skip
        return output(out)

    return run_portable


def _amx_runner(packed, padded, row_sums, rows_out, output, geo, epi, par):
    """run(x) for the amx path (kernels/int8_conv.conv_amx): the VNNI plan's
    jobs on 32 x 64 AMX tile blocks, im2col rows gathered per job into
    per-thread scratch of 64-byte aligned rows, or read in place (1x1 stride
    1, one group, C a multiple of 64, the pixels on 64-byte lines)."""
    from .kernels import int8_gemm_amx as _ka

    zero1, cs, zb, folded, mult, zy, qlo, qhi, mode, fzeros = epi
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = (int(v) for v in geo)
    bp = packed._amx()
    kp = 4 * bp.shape[2]
    panels = bp.shape[1]
    mt = -(-(N * Ho * Wo) // _ka.AMX_MR)
    in_place = kh == kw == sh == sw == 1 and G == 1 and C == kp

    def run_amx(x):
        xp = padded(x)
        fused = (zero1, _ro(row_sums(xp)), cs, zb, folded, mult, zy, qlo, qhi, mode,
                 fzeros)  # fmt: skip
        nth = par()
        pbk = panels if mt * G >= SPLIT_N_TILES * nth else 1
        jobs = mt * G * -(-panels // pbk)
        # 32-row tiles per job: up to 4 while leaving >= 8 jobs per thread
        tj = max(1, min(4, jobs // (8 * nth)))
        direct = int(in_place and xp.ctypes.data % 64 == 0)
        sa = _dispatch.scratch(
            "conv.amx.sa", (nth, 1 if direct else tj * _ka.AMX_MR, kp), np.uint8
        )
        out = rows_out()
        _dispatch.call_on_threads(
            nth, _kc.conv_amx, _ro(xp), bp, geo, pbk, tj, direct, sa, fused,
            packed._p_max, nth, out,
        )  # fmt: skip
        return output(out)

    return run_amx


# conv_nchw4's x4 argument where it packs from x itself (one compiled variant)
_NO_X4 = np.zeros(16, np.uint32)
_NO_X4.flags.writeable = False
# the NCHW4 path's P = sum a*b is exact in int32 up to this padded K
# (|a| <= 255, |b| <= 128: 255 * 128 * K < 2**31)
_NCHW4_K_MAX = (2**31 - 1) // (255 * 128)


def _f32_epilogue_ok(acc_max, mult, zy, qlo, qhi):
    """Whether requantized output may take the VNNI kernels' float32 lanes:
    int8_gemm_vnni.float32_requant_ok, the one definition of the condition."""
    from .kernels import int8_gemm_vnni as kv

    return bool(kv.float32_requant_ok(acc_max, _ro(mult), zy, qlo, qhi))


def _nchw4_fits(packed, G, Mg, P, direct=False):
    """Whether conv_nchw4 takes this NCHW convolution (VNNI, not depthwise).

    Where it is measured faster than transposes + the NHWC implicit GEMM
    (interleaved A/B, 1 and 2 threads, same process): few input channels per
    group (the NHWC gather copies runs of kw*C bytes; 3-channel stem 1.4-1.6x,
    1-channel MNIST conv 3.6-3.9x), large images (P = Ho*Wo >= 8192: 3x3 and
    1x1 at 112^2 1.05-1.46x), and every 1x1 stride-1 unpadded (``direct``)
    convolution, whose panels are packed from the NCHW rows themselves (256 ->
    64 at 56^2 1.14-1.17x, 512 -> 128 at 28^2 1.24-1.36x, 96 -> 24 at 28^2
    1.7-2.3x, 1024 -> 256 at 14^2 1.1x; 256 -> 1024 at 14^2 0.94-1.0x). Other
    3x3 layers below 112^2 lose to the NHWC tile (56^2 0.86-0.89x, 28^2
    0.72-0.91x: 64-pixel panels, the gather). Groups need at least one full
    6-channel tile, and K must keep P exact in int32.
    """
    if Mg < MR_ROWS and G > 1:
        return False
    Cg = packed.shape[1]
    if Cg > NCHW4_MAX_CHANNELS and P < NCHW4_MIN_PIXELS:
        if not (direct and NCHW4_DIRECT):
            return False
    return math.prod(packed.shape[2:]) * 4 * -(-Cg // 4) <= _NCHW4_K_MAX


def _nchw4_plan(x, packed, zb_eff, za_eff, bias, mult, zy, qlo, qhi, mode, geo, pads):
    """NCHW convolution with output channels as the GEMM's rows (kernels/
    int8_conv.py, conv_nchw4): no layout change of the input beyond the
    4-channel interleave, output written in place as NCHW. Returns
    run(x bytes (N, C, H, W), threads, out (N, M, Ho, Wo))."""
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo.tolist()
    pt, pl, pbot, pr = pads
    H, W = Hp - pt - pbot, Wp - pl - pr
    dense = _dense_k(packed, sw, dw)
    a, asum, ones = packed._nchw4(dense)
    Cg4 = -(-Cg // 4)
    K4 = a.shape[1] // 4  # kh*kw*Cg4, or the dense K's words
    Wq = -(-Wp // sw)
    geo4 = np.array(
        [N, C, H, W, G, Cg, Cg4, Hp, sw, Wq, Ho, Wo, kh, kw, sh, sw, dh, dw, pt, pl,
         M, Mg], np.int64,
    )  # fmt: skip
    # b = x' - 128: uint8 x ^ 0x80, int8 x as it is; padding b = ZX = ZA - 128
    zx = za_eff - 128
    flip = np.uint8(0x80 if x.dtype == np.uint8 else 0)
    fill = np.uint8(zx & 0xFF)
    zw = zb_eff.astype(np.int64) + 128
    general = int(zw.any())
    rbias = bias - zx * (asum - 4 * K4 * zw)
    # case 2 of the tile's epilogue: every term of eq. 8 in int32 lanes and
    # rint(acc * mult + zy) one FMA, exact when |acc| < 2**29 (|P|, |ZW *
    # colsum| <= 255 * 128 * K each; mult a float32 value, eq. 10)
    rmax = int(np.abs(rbias).max(initial=0))
    if 2 * 255 * 128 * 4 * K4 + rmax < 2**29:
        general = 2
        # case 3, float32 lanes (kernels/int8_gemm_vnni.py, _store_tile_f32):
        # requantized output with |acc| < 2**24, where acc = sum_k (a - ZW) *
        # b + rbias and |b| <= 128 (padding included), and the multipliers,
        # z_y and bounds of narrow_epilogue's case 3
        span = np.abs(a.astype(np.int64) - zw[:, None]).sum(axis=1).max(initial=0)
        if mode == _MODE_QUANT and _f32_epilogue_ok(
            128 * int(span) + rmax, mult, zy, qlo, qhi
        ):
            general = 3
    rbias = _ro(rbias)
    zw = _ro(zw)
    m = _ro(np.ascontiguousarray(np.broadcast_to(mult[0], (M,))))
    threads = numba.config.NUMBA_NUM_THREADS
    direct = kh == kw == 1 and sh == sw == 1 and pt == pl == pbot == pr == 0
    x4_size = N * G * Cg4 * Hp * sw * Wq + 64  # +64: the last panel's vector loads
    # per-thread panels (rows 64-byte multiples) and column sums (own lines)
    buf_shape = (threads, K4 * 256)
    npan = -(-(Ho * Wo) // 64)
    jobs = N * G * npan
    mt = -(-Mg // MR_ROWS)

    dense_run = None
    if dense:
        dense_run = _dense_plan(geo, (pt, pl), K4, npan, fill, flip)

    def run(xb, par, out):
        nth = _dispatch.num_threads() if par != 1 else 1
        # too few panels for the threads: split the channel tiles too (each
        # channel block packs the panel again; packing is a few % of a job)
        nrb = 1 if jobs >= 8 * nth else min(mt, -(-8 * nth // jobs))
        if dense:
            dense_run(xb, par, nrb, a, ones, rbias, zw, general, m, zy, qlo, qhi,
                      _dispatch.scratch("nchw4.panel", buf_shape, np.uint8),
                      _dispatch.scratch("nchw4.colsum", (threads, 80), np.int32),
                      out)  # fmt: skip
            return
        if direct:  # the panels are packed from x itself
            x4b = _NO_X4
        else:
            x4b = _dispatch.scratch("nchw4.x", x4_size, np.uint32)
            _dispatch.call_on_threads(par, _kc.to_nchw4, xb, flip, fill, geo4, x4b)
        _dispatch.call_on_threads(
            par, _kc.conv_nchw4, xb.reshape(-1), flip, fill, _ro(x4b), geo4, nrb,
            direct, a, ones, rbias, zw, general, m, zy, qlo, qhi,
            _dispatch.scratch("nchw4.panel", buf_shape, np.uint8),
            _dispatch.scratch("nchw4.colsum", (threads, 80), np.int32), out,
        )  # fmt: skip

    return run


def _dense_k(packed, sw, dw):
    """Whether the NCHW4 tile takes its B with a dense K (kernels/int8_conv.py,
    conv_nchw4_dense): channels per group not a multiple of 4 (the channel blocks
    pad them), kernel rows of >= 3 taps (a word then spans <= 2 runs), 16
    pixels' taps inside one 64-byte window, and a host with AVX-512 VBMI."""
    Cg, ks = packed.shape[1], packed.shape[2:]
    kw = ks[-1]
    return (
        NCHW4_DENSE
        and Cg % 4 != 0
        and kw >= 3
        and 15 * sw + (kw - 1) * dw < 64
        and "avx512vbmi" in _dispatch.host_features()
    )


def _dense_plan(geo, pads, K4, npan, fill, flip):
    """The dense-K NCHW4 call (kernels/int8_conv.py, conv_nchw4_dense): the
    padded input, then the channel tiles on panels packed per job. The word
    rows' run pairs and vpermi2b indices are built once per plan."""
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo.tolist()
    pt, pl = pads
    K = kh * Cg * kw
    R = kh * Cg
    k = np.arange(4 * K4).reshape(K4, 4)
    last = np.minimum(k[:, 3], K - 1)
    rsel = np.stack([k[:, 0] // kw, last // kw], axis=1).astype(np.int64)
    # index of byte u of pixel q in word row k4: window r1 or r2 (bit 6), byte
    # q*sw + t*dw; the pad bytes (k >= K) point at byte 0 and are rewritten
    kk = k[:, None, :]  # (K4, 1, 4)
    q = np.arange(16)[None, :, None]
    second = (kk // kw) != rsel[:, :1, None]
    idx = np.where(kk < K, 64 * second + q * sw + (kk % kw) * dw, 0)
    idx = _ro(np.ascontiguousarray(idx.reshape(K4, 64).astype(np.uint8)))
    rsel = _ro(rsel)
    geoD = np.array(
        [N, C, Hp, Wp, G, Cg, Ho, Wo, kh, kw, sh, sw, dh, dw, K, K4, npan, fill],
        np.int64,
    )
    threads = numba.config.NUMBA_NUM_THREADS
    xp_size = N * C * Hp * Wp + 64  # +64: the last row's 64-byte windows

    def run(xb, par, nrb, *rest):
        xp = _dispatch.scratch("nchw4.xp", xp_size, np.uint8)
        _dispatch.call_on_threads(par, _kc.pad_bytes, xb, flip, fill, geoD, pt, pl, xp)
        runs = _dispatch.scratch("nchw4.runs", (threads, R), np.int64)
        _dispatch.call_on_threads(
            par, _kc.conv_nchw4_dense, _ro(xp), geoD, rsel, idx, runs, nrb, *rest
        )

    return run


def _pad_nhwc(x4, layout, flip, fill, pt, pb, pl, pr):
    """x' (eq. 5) as (N, Hp, Wp, C) uint8 with a border of ``fill`` (= ZA).

    NCHW input: kernels/layout.py's blocked byte transposes (to_padded_nhwc
    with >= 64 channels: 256x56x56 49 us on one core; numpy's strided copy
    0.35 ms, a numba loop 1.6 ms).
    """
    src = x4.view(np.uint8)
    if layout == "NCHW":
        N, C, H, W = src.shape
    else:
        N, H, W, C = src.shape
    xp = _dispatch.scratch("conv.xp", (N, H + pt + pb, W + pl + pr, C), np.uint8)
    if pt or pb or pl or pr:
        xp[:, :pt] = fill
        xp[:, pt + H :] = fill
        xp[:, pt : pt + H, :pl] = fill
        xp[:, pt : pt + H, pl + W :] = fill
    inner = xp[:, pt : pt + H, pl : pl + W]
    if layout == "NCHW" and C >= 64 and H * W >= 16:
        src = _ro(np.ascontiguousarray(src)).reshape(N, C, H * W)
        _kl.to_padded_nhwc(src, xp, W, pt, pl, flip)
    elif layout == "NCHW":
        _kl.transpose(_ro(np.ascontiguousarray(src)), inner, flip)
    elif flip:
        np.bitwise_xor(src, flip, out=inner)
    else:
        inner[...] = src
    return xp


def _to_nchw(out, shape_nhwc):
    """(rows, M) NHWC result -> NCHW array (byte outputs: the blocked transpose)."""
    N, M = shape_nhwc[0], shape_nhwc[-1]
    spatial = shape_nhwc[1:-1]
    if out.itemsize != 1:
        # a copy always: out may be reused scratch (a view would alias it)
        return np.moveaxis(out.reshape(shape_nhwc), -1, 1).copy()
    res = np.empty((N, M, *spatial), out.dtype)
    src = out.view(np.uint8).reshape(N, -1, 1, M)
    _kl.transpose(_ro(src), res.view(np.uint8).reshape(N, 1, M, -1), np.uint8(0))
    return res


def _attrs(auto_pad, dilations, kernel_shape, pads, strides):
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    return {
        "auto_pad": auto_pad,
        "dilations": dilations,
        "kernel_shape": kernel_shape,
        "pads": pads,
        "strides": strides,
    }


def _x_zero_point(value, dtype):
    if value is None:
        return 0
    zp = v.zero_point_param(value, "x_zero_point", dtype)
    if zp.size != 1:
        msg = (
            f"x_zero_point must be a scalar (per-tensor, as ONNX requires), got "
            f"shape {zp.shape}"
        )
        raise ValueError(msg)
    return int(zp.reshape(-1)[0])


# --------------------------------------------------------------------------- #
# per-call plans: a call with prepacked weights and the same x shape / dtype
# and arguments as an earlier one reuses that call's _plan (validation,
# geometry, folded bias and multipliers: ~40-100 us of Python on every call)

_PLANS_MAX = 64  # per PackedConvWeights; cleared when full


class _Uncacheable(Exception):
    pass


# numpy scalar types keyed by their bytes (-0.0 and 0.0, NaN payloads apart)
_SCALAR_TYPES = frozenset(
    {np.float16, np.float32, np.float64, np.uint8, np.int8, np.uint16, np.int16,
     np.int32, np.int64}
)  # fmt: skip


def _key(value):
    """A hashable stand-in for one argument, equal exactly when the argument's
    type and value are (arrays by dtype, shape and bytes; floats with their
    sign, as -0.0 == 0.0: a clamp at -0.0 keeps the sign of zero outputs)."""
    t = type(value)
    if value is None or t is str:
        return value
    if (t is list or t is tuple) and all(type(v) is int for v in value):
        # pads, strides, dilations in one step, and below the scalars by their
        # bytes: a small layer's key 14.5 -> 7.7 us (loaded machine, Zen 3)
        return ("ints", *value)  # (no other key is a tuple led by "ints")
    if t in _SCALAR_TYPES:  # the scalars of a call, by their bits
        return (t, value.tobytes())
    if isinstance(value, np.generic):
        item = value.item()
        if type(item) is float:
            return (value.dtype.char, item, math.copysign(1.0, item))
        return (value.dtype.char, item)
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    if type(value) is float:
        return (float, value, math.copysign(1.0, value))
    if type(value) in (int, bytes):
        return (type(value), value)
    if isinstance(value, list | tuple):
        return (tuple, *map(_key, value))
    if isinstance(value, type) and issubclass(value, np.generic):
        return (type, value)
    raise _Uncacheable


def _plan_key(x, w, *args):
    """The plan-cache key of a CPU call, or None (not prepacked, or an
    argument without a cheap exact key)."""
    if not isinstance(w, PackedConvWeights) or not isinstance(x, np.ndarray):
        return None
    try:
        return (x.shape, x.dtype.str, _dispatch.get_isa(), *(_key(a) for a in args))
    except _Uncacheable:
        return None


def _remember(w, key, plan):
    if key is not None:
        if len(w._plans) >= _PLANS_MAX:
            w._plans.clear()
        w._plans[key] = plan
    return plan


# --------------------------------------------------------------------------- #
# public functions


def conv_integer(
    x,
    w,
    x_zero_point=None,
    w_zero_point=None,
    *,
    auto_pad="NOTSET",
    dilations=None,
    group=1,
    kernel_shape=None,
    pads=None,
    strides=None,
    device=None,
):
    """ONNX ConvInteger: ``conv(x - x_zero_point, w - w_zero_point)`` in int32.

    Parameters
    ----------
    x : ndarray (N, C, W) or (N, C, H, W) of uint8 or int8
    w : ndarray (M, C/group, kW) or (M, C/group, kH, kW) of uint8 or int8, or
        :class:`PackedConvWeights`
    x_zero_point : scalar of x's dtype, default 0; padding is this value (real 0)
    w_zero_point : scalar or (M,) per output channel, w's dtype, default 0
    auto_pad, dilations, group, kernel_shape, pads, strides : as ONNX Conv
    device : None, "cpu" or "cuda"; None follows x (CUDA arrays run on the GPU
        and come back as the same kind, docs/cuda.md)

    Returns
    -------
    int32 ndarray (N, M, *out_spatial).

    Examples
    --------
    >>> import numpy as np, lowprec
    >>> x = np.arange(9, dtype=np.uint8).reshape(1, 1, 3, 3) + 2
    >>> w = np.ones((1, 1, 2, 2), np.uint8)
    >>> lowprec.conv_integer(x, w, np.uint8(1))
    array([[[[12, 16],
             [24, 28]]]], dtype=int32)
    """
    if _on_gpu(device, x, None):
        from . import cuda_ops

        return cuda_ops.conv_integer_cuda(
            x, w, x_zero_point, w_zero_point, auto_pad=auto_pad,
            dilations=dilations, group=group, kernel_shape=kernel_shape,
            pads=pads, strides=strides,
        )  # fmt: skip
    key = _plan_key(
        x, w, "int", x_zero_point, w_zero_point, auto_pad, dilations, group,
        kernel_shape, pads, strides,
    )  # fmt: skip
    plan = w._plans.get(key) if key is not None else None
    if plan is not None:
        return plan(x)
    v.check_array(x, "x", v.INT8_TYPES, fix="quantize it first")
    packed, zb_eff, _ = _weights(w, w_zero_point, None, group, need_scale=False)
    za = _x_zero_point(x_zero_point, x.dtype)
    M = packed.shape[0]
    plan = _plan(
        x, packed, zb_eff, za, np.zeros(M, np.int64), np.ones((1, M)), 0.0, 0.0, 0.0,
        _MODE_INT32, np.int32, "NCHW",
        _attrs(auto_pad, dilations, kernel_shape, pads, strides),
    )  # fmt: skip
    return _remember(w, key, plan)(x)


def qlinear_conv(
    x,
    x_scale,
    x_zero_point,
    w,
    w_scale,
    w_zero_point,
    y_scale,
    y_zero_point,
    bias=None,
    *,
    auto_pad="NOTSET",
    dilations=None,
    group=1,
    kernel_shape=None,
    pads=None,
    strides=None,
    activation=None,
    layout="NCHW",
    out_dtype=None,
    device=None,
):
    """ONNX QLinearConv with fused bias, activation, float output and NHWC layout.

    ``y = saturate(rint(conv(x - x_zp, w - w_zp) + bias) * M + y_zp))`` with
    ``M = x_scale * w_scale / y_scale`` per output channel, computed and rounded
    exactly as :func:`lowprec.qlinear_matmul` does (docs/quantization.md,
    eqs. 10-13).

    Parameters
    ----------
    x : ndarray of uint8/int8, (N, C, [H,] W) for layout "NCHW" (ONNX) or
        (N, [H,] W, C) for "NHWC"; the output has the same layout
    x_scale, x_zero_point : per-tensor scalars (float32/float16 and x's dtype)
    w : ndarray (M, C/group, [kH,] kW) of uint8/int8, or :class:`PackedConvWeights`
    w_scale, w_zero_point : scalar or (M,) per output channel (asymmetric
        per-channel zero points allowed); may be None when packed
    y_scale, y_zero_point : scalars; y_zero_point's dtype is the output type.
        Both may be None with ``out_dtype=np.float32``.
    bias : int32 (M,), optional, in the accumulator's scale x_scale * w_scale
    auto_pad, dilations, group, kernel_shape, pads, strides : as ONNX Conv
    activation : None, "relu", "relu6" or (min, max), in real units (eq. 12)
    layout : "NCHW" or "NHWC"
    out_dtype : np.uint8, np.int8 or np.float32 (the real result, eq. 13)
    device : None, "cpu" or "cuda"; None follows x (docs/cuda.md)
    """
    if _on_gpu(device, x, None):
        from . import cuda_ops

        return cuda_ops.qlinear_conv_cuda(
            x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale,
            y_zero_point, bias, auto_pad=auto_pad, dilations=dilations,
            group=group, kernel_shape=kernel_shape, pads=pads, strides=strides,
            activation=activation, layout=layout, out_dtype=out_dtype,
        )  # fmt: skip
    key = _plan_key(
        x, w, "q", x_scale, x_zero_point, w_scale, w_zero_point, y_scale,
        y_zero_point, bias, auto_pad, dilations, group, kernel_shape, pads, strides,
        activation, layout, out_dtype,
    )  # fmt: skip
    plan = w._plans.get(key) if key is not None else None
    if plan is not None:
        return plan(x)
    v.check_array(x, "x", v.INT8_TYPES, fix="quantize it first")
    packed, zb_eff, sw = _weights(w, w_zero_point, w_scale, group, need_scale=True)
    za = _x_zero_point(x_zero_point, x.dtype)
    sx = v.scale_param(x_scale, "x_scale")
    if sx.size != 1:
        msg = f"x_scale must be a scalar (per-tensor), got shape {sx.shape}"
        raise ValueError(msg)
    sx = sx.reshape(1)
    M = packed.shape[0]
    odt = _out_dtype(out_dtype)
    lo, hi = v.activation_bounds(activation)
    bias_arr = _bias(bias, M)
    if bias_arr.shape != (M,):
        bias_arr = np.full(M, bias_arr[0], np.int64)
    attrs = _attrs(auto_pad, dilations, kernel_shape, pads, strides)
    if odt == np.float32:
        mult = _multiplier(sx, sw, None, M)
        plan = _plan(
            x, packed, zb_eff, za, bias_arr, mult, 0.0, lo, hi, _MODE_FLOAT,
            np.float32, layout, attrs,
        )  # fmt: skip
        return _remember(w, key, plan)(x)
    sy = v.output_scale(y_scale)
    zyp = _y_zero_point(y_zero_point, odt)
    odt = zyp.dtype
    zy = float(zyp.reshape(-1)[0])
    qlo, qhi = _quant_bounds(_hashable(activation), zy, float(sy.reshape(-1)[0]), odt)
    mult = _multiplier(sx, sw, sy.reshape(-1), M)
    plan = _plan(
        x, packed, zb_eff, za, bias_arr, mult, zy, qlo, qhi, _MODE_QUANT, odt,
        layout, attrs,
    )  # fmt: skip
    return _remember(w, key, plan)(x)
