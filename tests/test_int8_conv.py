"""conv_integer / qlinear_conv against a plain NumPy int64 oracle and ONNX's cases.

The oracle is written from the ONNX operator definitions (and eqs. 10-13 of
docs/quantization.md via tests/reference.py), not from the kernels: zero points
are subtracted first, the input is padded with real zeros, and the convolution
is a sum over taps of int64 products.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lowprec
import reference as ref
from lowprec import conv as lc

# --------------------------------------------------------------------------- #
# oracle


def conv_ref(x, w, x_zp=0, w_zp=0, *, group=1, strides=None, dilations=None,
             pads=None):  # fmt: skip
    """ONNX Conv on int64 of (x - x_zp) and (w - w_zp), NCHW, explicit pads."""
    nsp = x.ndim - 2
    if nsp == 1:
        x, w = x[:, :, None, :], w[:, :, None, :]
        strides = (1, *(strides or (1,)))
        dilations = (1, *(dilations or (1,)))
        pads = (0, (pads or (0, 0))[0], 0, (pads or (0, 0))[1])
    strides = strides or (1, 1)
    dilations = dilations or (1, 1)
    pads = pads or (0, 0, 0, 0)
    xs = x.astype(np.int64) - int(np.asarray(x_zp).reshape(-1)[0])
    wz = np.asarray(w_zp).astype(np.int64).reshape(-1)
    ws = w.astype(np.int64) - (wz[:, None, None, None] if wz.size > 1 else wz[0])
    N, C, H, W = xs.shape
    M, Cg, kh, kw = ws.shape
    xpad = np.zeros((N, C, H + pads[0] + pads[2], W + pads[1] + pads[3]), np.int64)
    xpad[:, :, pads[0] : pads[0] + H, pads[1] : pads[1] + W] = xs
    sh, sw = strides
    dh, dw = dilations
    Ho = (xpad.shape[2] - (kh - 1) * dh - 1) // sh + 1
    Wo = (xpad.shape[3] - (kw - 1) * dw - 1) // sw + 1
    Mg = M // group
    out = np.zeros((N, M, Ho, Wo), np.int64)
    for g in range(group):
        xg = xpad[:, g * Cg : (g + 1) * Cg]
        wg = ws[g * Mg : (g + 1) * Mg]
        for i in range(kh):
            for j in range(kw):
                patch = xg[
                    :,
                    :,
                    i * dh : i * dh + (Ho - 1) * sh + 1 : sh,
                    j * dw : j * dw + (Wo - 1) * sw + 1 : sw,
                ]
                out[:, g * Mg : (g + 1) * Mg] += np.einsum(
                    "nchw,mc->nmhw", patch, wg[:, :, i, j]
                )
    return out[:, :, 0, :] if nsp == 1 else out


def requant_ref(acc, x_scale, w_scale, y_scale, y_zp, bias=None, activation=None,
                out_dtype=None):  # fmt: skip
    """eqs. 8-13 via the GEMM oracle: acc (N, M, *sp) -> rows (pixels) x M."""
    M = acc.shape[1]
    a2 = np.moveaxis(acc, 1, -1).reshape(-1, M)
    # ref.qlinear_matmul multiplies an identity: feed acc as a = acc rows, b = I
    if bias is not None:
        a2 = a2 + np.asarray(bias).astype(np.int64)
    sa = np.asarray(x_scale)
    sb = np.asarray(w_scale)
    sa_col = sa.reshape(())
    sb_row = sb.reshape(-1) if sb.size > 1 else sb.reshape(())
    lo, hi = {None: (-np.inf, np.inf), "relu": (0.0, np.inf), "relu6": (0.0, 6.0)}.get(
        activation if isinstance(activation, str | None) else "x", (None, None)
    )
    if lo is None:
        lo, hi = (float(t) for t in activation)
    if out_dtype == np.float32:
        mult = (sa_col * sb_row).astype(np.float64)
        y = (a2.astype(np.float64) * mult).astype(np.float32)
        y = np.clip(y, np.float32(lo), np.float32(hi)).astype(np.float32)
    else:
        sy = np.asarray(y_scale)
        dtype = np.asarray(y_zp).dtype
        zy = int(np.asarray(y_zp).reshape(-1)[0])
        info = np.iinfo(dtype)
        mult = ((sa_col * sb_row) / sy.reshape(())).astype(np.float64)
        vv = np.rint(a2.astype(np.float64) * mult + zy)
        s1 = float(sy.reshape(-1)[0])
        qlo = info.min if lo == -np.inf else zy + np.rint(lo / s1)
        qhi = info.max if hi == np.inf else zy + np.rint(hi / s1)
        y = np.clip(vv, max(qlo, info.min), min(qhi, info.max)).astype(dtype)
    y = y.reshape(acc.shape[0], *acc.shape[2:], M)
    return np.moveaxis(y, -1, 1)


def test_oracle_matches_gemm_oracle():
    # the conv oracle of a 1x1 convolution is the GEMM oracle on pixels
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 5, 3, 4), dtype=np.uint8)
    w = rng.integers(-128, 128, (7, 5, 1, 1), dtype=np.int8)
    got = conv_ref(x, w, 3, 2)
    a = np.moveaxis(x, 1, -1).reshape(-1, 5)
    want = ref.int_matmul(a, w[:, :, 0, 0].T, 3, 2).reshape(2, 3, 4, 7)
    np.testing.assert_array_equal(got, np.moveaxis(want, -1, 1))


# --------------------------------------------------------------------------- #
# ONNX node cases (bit-exact) and the float Conv cases (shape coverage)

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402


def _node_cases():
    names = ("test_convinteger_with_padding", "test_convinteger_without_padding",
             "test_qlinearconv")  # fmt: skip
    node_dir = os.path.join(
        os.path.dirname(onnx.__file__), "backend", "test", "data", "node"
    )
    cases = []
    if os.path.isdir(node_dir):
        for name in names:
            d = os.path.join(node_dir, name)
            model = onnx.load(os.path.join(d, "model.onnx"))
            sets = []
            for sd in sorted(glob.glob(os.path.join(d, "test_data_set_*"))):
                ins = [_read(p) for p in sorted(glob.glob(f"{sd}/input_*.pb"))]
                outs = [_read(p) for p in sorted(glob.glob(f"{sd}/output_*.pb"))]
                sets.append((ins, outs))
            cases.append((name, model, sets))
        return cases
    import importlib

    node_pkg = importlib.import_module("onnx.backend.test.case.node")
    for mod in ("convinteger", "qlinearconv"):
        importlib.import_module(f"onnx.backend.test.case.node.{mod}")
    for tc in node_pkg._NodeTestCases:
        if tc.name in names:
            sets = [
                ([_np(t) for t in ins], [_np(t) for t in outs])
                for ins, outs in tc.data_sets
            ]
            cases.append((tc.name, tc.model, sets))
    return cases


def _read(path):
    t = onnx.TensorProto()
    with open(path, "rb") as f:
        t.ParseFromString(f.read())
    return numpy_helper.to_array(t)


def _np(t):
    return (
        numpy_helper.to_array(t) if isinstance(t, onnx.TensorProto) else np.asarray(t)
    )


NODE_CASES = _node_cases()


def test_node_cases_found():
    assert sorted(c[0] for c in NODE_CASES) == [
        "test_convinteger_with_padding",
        "test_convinteger_without_padding",
        "test_qlinearconv",
    ]


@pytest.mark.parametrize("case", NODE_CASES, ids=[c[0] for c in NODE_CASES])
def test_onnx_node_case_bit_exact(case, isa):
    name, model, sets = case
    node = model.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    for ins, outs in sets:
        it = iter(ins)
        args = [next(it) if n else None for n in node.input]
        if node.op_type == "ConvInteger":
            got = lowprec.conv.conv_integer(*args, **attrs)
        else:
            got = lowprec.conv.qlinear_conv(*args, **attrs)
        assert got.dtype == outs[0].dtype
        np.testing.assert_array_equal(got, outs[0])


def _float_conv_cases():
    """The fp32 Conv cases: onnx node (test_basic_conv_*, test_conv_with_*) and
    pytorch-converted Conv1d/Conv2d (groups, depthwise, dilation)."""
    cases = []
    import importlib

    try:
        node_pkg = importlib.import_module("onnx.backend.test.case.node")
        importlib.import_module("onnx.backend.test.case.node.conv")
        for tc in node_pkg._NodeTestCases:
            if tc.name.startswith(("test_basic_conv_", "test_conv_with_")):
                ins = [_np(t) for t in tc.data_sets[0][0]]
                cases.append((tc.name, tc.model, ins))
    except (ImportError, AttributeError):
        pass
    base = os.path.join(
        os.path.dirname(onnx.__file__), "backend", "test", "data", "pytorch-converted"
    )
    for d in sorted(glob.glob(os.path.join(base, "test_Conv[12]d*"))):
        model = onnx.load(os.path.join(d, "model.onnx"))
        sd = sorted(glob.glob(os.path.join(d, "test_data_set_*")))[0]
        ins = [_read(p) for p in sorted(glob.glob(f"{sd}/input_*.pb"))]
        cases.append((os.path.basename(d), model, ins))
    return cases


FLOAT_CASES = _float_conv_cases()


def test_float_cases_found():
    names = {c[0] for c in FLOAT_CASES}
    assert len(names) >= 15, names
    assert {
        "test_Conv2d_depthwise",
        "test_Conv1d_groups",
        "test_Conv2d_dilated",
    } <= names


def _conv_node(model):
    nodes = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(nodes) == 1
    node = nodes[0]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return node, inits, attrs


@pytest.mark.parametrize("case", FLOAT_CASES, ids=[c[0] for c in FLOAT_CASES])
def test_float_conv_case_quantized(case, isa):
    """quantize -> qlinear_conv -> compare with the int64 oracle (bit-exact) and
    dequantize -> close to the float reference conv."""
    name, model, ins = case
    node, inits, attrs = _conv_node(model)
    graph_inputs = [i.name for i in model.graph.input if i.name not in inits]
    feed = dict(zip(graph_inputs, ins, strict=False))
    vals = {**inits, **feed}
    xf = vals[node.input[0]].astype(np.float32)
    wf = vals[node.input[1]].astype(np.float32)
    bf = vals[node.input[2]] if len(node.input) > 2 and node.input[2] else None
    sx = np.float32(max(np.abs(xf).max(), 1e-3) / 127)
    sw = (np.abs(wf).reshape(wf.shape[0], -1).max(axis=1) / 127).astype(np.float32)
    sw = np.maximum(sw, np.float32(1e-6))
    xq = lowprec.quantize_linear(xf, sx, np.uint8(128))
    wq = lowprec.quantize_linear(wf, sw, np.int8(0), axis=0)
    bias = None
    if bf is not None:
        bias = np.rint(bf / (sx * sw).astype(np.float64)).astype(np.int32)
    group = attrs.get("group", 1)
    attrs.pop("kernel_shape", None)
    pads = attrs.get("pads")
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    got = lowprec.conv.qlinear_conv(
        xq, sx, np.uint8(128), wq, sw, np.int8(0), None, None, bias,
        out_dtype=np.float32, **attrs,
    )  # fmt: skip
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    nsp = xq.ndim - 2
    if auto_pad != "NOTSET":
        out_sp, b, e, _, _ = lc._geometry(
            xq.shape[2:], wq.shape[2:], auto_pad, attrs.get("dilations"), None,
            attrs.get("strides"),
        )  # fmt: skip
        pads = (*b, *e)
    acc = conv_ref(
        xq, wq, 128, 0, group=group, strides=attrs.get("strides"),
        dilations=attrs.get("dilations"), pads=pads or (0,) * (2 * nsp),
    )  # fmt: skip
    want = requant_ref(acc, sx, sw, None, None, bias=bias, out_dtype=np.float32)
    np.testing.assert_array_equal(got, want)
    # and the real result is the float conv's up to quantization error
    from onnx.reference import ReferenceEvaluator

    yf = ReferenceEvaluator(model).run(None, feed)[0]
    scale = float(np.abs(yf).max()) + 1e-6
    assert np.abs(got - yf).max() <= 0.05 * scale


# --------------------------------------------------------------------------- #
# property test against the oracle


@st.composite
def conv_problems(draw):
    nsp = draw(st.sampled_from([1, 2, 2]))
    kind = draw(st.sampled_from(["general", "depthwise", "stem", "1x1", "big_kernel"]))
    N = draw(st.integers(1, 2))
    group = 1
    if kind == "depthwise":
        C = draw(st.integers(1, 20))
        group = C
        M = C * draw(st.sampled_from([1, 1, 2]))
    elif kind == "stem":
        C, M = 3, draw(st.integers(1, 70))
    else:
        group = draw(st.sampled_from([1, 1, 2, 3]))
        C = group * draw(st.integers(1, 9))
        M = group * draw(st.integers(1, 24 if group == 1 else 8))
    k = [1] * nsp if kind == "1x1" else [draw(st.integers(1, 4)) for _ in range(nsp)]
    s = [draw(st.integers(1, 3)) for _ in range(nsp)]
    d = [1] * nsp if kind == "1x1" else [draw(st.integers(1, 2)) for _ in range(nsp)]
    if kind == "1x1" and draw(st.booleans()):
        s = [1] * nsp
    p = [draw(st.integers(0, 3)) for _ in range(2 * nsp)]
    sp = []
    for a in range(nsp):
        ke = (k[a] - 1) * d[a] + 1
        if kind == "big_kernel":
            lo = max(1, ke - p[a] - p[a + nsp])
            sp.append(draw(st.integers(lo, max(lo, ke - 1))))
        else:
            sp.append(draw(st.integers(max(1, ke - p[a] - p[a + nsp]), 9)))
    xdt = draw(st.sampled_from([np.uint8, np.int8]))
    wdt = draw(st.sampled_from([np.uint8, np.int8]))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    xi, wi = np.iinfo(xdt), np.iinfo(wdt)
    x = rng.integers(xi.min, xi.max + 1, (N, C, *sp), dtype=xdt)
    w = rng.integers(wi.min, wi.max + 1, (M, C // group, *k), dtype=wdt)
    xz = xdt(rng.integers(xi.min, xi.max + 1))
    wz_kind = draw(st.sampled_from(["none", "scalar", "per_channel"]))
    if wz_kind == "none":
        wz = None
    elif wz_kind == "scalar":
        wz = wdt(rng.integers(wi.min, wi.max + 1))
    else:
        wz = rng.integers(wi.min, wi.max + 1, M, dtype=wdt)
    return dict(x=x, w=w, xz=xz, wz=wz, group=group, strides=s, dilations=d, pads=p)


def _to_layout(y, layout):
    return np.ascontiguousarray(np.moveaxis(y, 1, -1)) if layout == "NHWC" else y


_AMX = "amx" in lowprec.available_isas()
_VNNI = "avx512_vnni" in lowprec.available_isas()
_AVX2 = "avx2" in lowprec.available_isas()


@pytest.fixture(
    params=[
        pytest.param("amx", marks=pytest.mark.skipif(not _AMX, reason="no AMX")),
        pytest.param(
            "avx512_vnni", marks=pytest.mark.skipif(not _VNNI, reason="no VNNI")
        ),
        pytest.param("nchw4", marks=pytest.mark.skipif(not _VNNI, reason="no VNNI")),
        pytest.param("avx2", marks=pytest.mark.skipif(not _AVX2, reason="no AVX2")),
        "portable",
    ]
)
def isa(request, monkeypatch):
    """The convolution has two VNNI kernels for NCHW input (the NHWC pixel tile
    and conv_nchw4, channels as rows), the avx2 path's (each tile's im2col rows
    widened for the vpmaddwd tiles, any group count; 3x3 depthwise on
    vpmaddwd) and a portable path: force
    each in turn. "avx512_vnni" never takes conv_nchw4, "nchw4" takes it
    wherever it applies; "amx" runs every non-depthwise convolution on the AMX
    tile blocks (conv_amx), however few its pixels and channels."""
    before = lowprec.get_isa()
    lowprec.set_isa("avx512_vnni" if request.param == "nchw4" else request.param)
    monkeypatch.setattr(lc, "AMX_MIN_ROWS", 1)
    monkeypatch.setattr(lc, "AMX_MIN_CHANNELS", 1)
    on = request.param == "nchw4"
    monkeypatch.setattr(lc, "NCHW4_MAX_CHANNELS", 2**62 if on else -1)
    monkeypatch.setattr(lc, "NCHW4_MIN_PIXELS", 0 if on else 2**62)
    monkeypatch.setattr(lc, "NCHW4_DIRECT", on)
    yield request.param
    lowprec.set_isa(before)


# each example compiles nothing new but runs a full conv and its oracle: 100 per
# path keeps this file near a minute on the 2-core CI machine
@settings(max_examples=min(100, settings.default.max_examples))
@given(prob=conv_problems(), layout=st.sampled_from(["NCHW", "NHWC"]),
       packed=st.booleans(), data=st.data())  # fmt: skip
def test_conv_matches_oracle(isa, prob, layout, packed, data):
    x, w, xz, wz = prob["x"], prob["w"], prob["xz"], prob["wz"]
    kw = {k: prob[k] for k in ("group", "strides", "dilations", "pads")}
    acc = conv_ref(x, w, xz, 0 if wz is None else wz, **kw)
    if layout == "NCHW":
        got = lowprec.conv.conv_integer(x, w, xz, wz, **kw)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, acc)
    M = w.shape[0]
    rng = np.random.default_rng(int(acc.sum()) % 1000)
    sx = np.float32(rng.uniform(0.001, 0.05))
    sw = rng.uniform(0.001, 0.05, M if data.draw(st.booleans()) else 1)
    sw = sw.astype(np.float32)
    std = float(np.abs(acc).std()) + 1.0
    sy = np.float32(sx * float(sw.max()) * std * 3 / 127)
    odt = data.draw(st.sampled_from([np.uint8, np.int8, np.float32]))
    yz = (
        None
        if odt == np.float32
        else odt(rng.integers(-20, 20) + (128 if odt == np.uint8 else 0))
    )
    bias = (
        rng.integers(-5000, 5000, M).astype(np.int32)
        if data.draw(st.booleans())
        else None
    )
    act = data.draw(st.sampled_from([None, "relu", "relu6", (-1.5, 2.0), (-0.3, 0.7)]))
    fdt = np.float32 if odt == np.float32 else None
    wp = lowprec.conv.pack_conv_weights(w, wz, sw, group=prob["group"]) if packed else w
    got = lowprec.conv.qlinear_conv(
        _to_layout(x, layout), sx, xz, wp, None if packed else sw,
        None if packed else wz, None if odt == np.float32 else sy, yz, bias,
        activation=act, layout=layout, out_dtype=fdt, **kw,
    )  # fmt: skip
    want = requant_ref(acc, sx, sw, sy, yz, bias=bias, activation=act,
                       out_dtype=np.float32 if odt == np.float32 else None)  # fmt: skip
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, _to_layout(want, layout))


def test_larger_shapes_every_tile_path(isa, monkeypatch):
    """Sizes where VNNI tiles are full and partial, > 64 channels, panels split."""
    calls, avx2 = [], []
    real = lc._nchw4_plan
    monkeypatch.setattr(lc, "_nchw4_plan", lambda *a: calls.append(1) or real(*a))
    kernel = lc._kc.conv_avx2
    monkeypatch.setattr(lc._kc, "conv_avx2", lambda *a: avx2.append(1) or kernel(*a))
    rng = np.random.default_rng(1)
    for C, M, k, s, pads, H, G in [
        (64, 70, 3, 1, 1, 9, 1),  # 2 panels, tail panel
        (16, 130, 1, 1, 0, 7, 1),  # 1x1 direct rows, 3 panels
        (3, 64, 7, 2, 3, 15, 1),  # stem
        (32, 32, 3, 2, 1, 10, 32),  # depthwise stride 2
        (40, 80, 3, 1, 1, 6, 4),  # grouped
    ]:
        x = rng.integers(0, 256, (2, C, H, H), dtype=np.uint8)
        w = rng.integers(-128, 128, (M, C // G, k, k), dtype=np.int8)
        kw = {"group": G, "strides": (s, s), "pads": (pads,) * 4}
        acc = conv_ref(x, w, 7, 0, **kw)
        got = lowprec.conv.conv_integer(x, w, np.uint8(7), **kw)
        np.testing.assert_array_equal(got, acc)
        wz = rng.integers(-3, 3, M).astype(np.int8)
        got = lowprec.conv.conv_integer(x, w, np.uint8(7), wz, **kw)
        np.testing.assert_array_equal(got, conv_ref(x, w, 7, wz, **kw))
    # the forced kernel really ran (4 non-depthwise shapes, 2 calls each; the
    # avx2 tiles take the grouped one too)
    assert len(calls) == (8 if isa == "nchw4" else 0)
    assert len(avx2) == (8 if isa == "avx2" else 0)


@pytest.mark.parametrize("x_dt", [np.uint8, np.int8])
def test_wide_rows(isa, x_dt, monkeypatch):
    """Rows wide enough for to_nchw4's 16-word vector chunks (stride 1 and 2,
    both phases, left padding, channel blocks with masked bytes, groups) and
    their scalar tails, and for the dense-K panels' 16-pixel vpermi2b rows
    (few channels, kernel rows of >= 3 taps) next to their one-pixel packing."""
    rng = np.random.default_rng(11)
    info = np.iinfo(x_dt)
    for C, M, G, k, s, d, pads, H, W in [
        (3, 8, 1, (7, 7), (2, 2), (1, 1), (3, 3, 3, 3), 9, 77),  # stem-like
        (6, 7, 1, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0), 2, 50),  # 1x1 direct
        (8, 12, 2, (3, 3), (1, 2), (1, 1), (0, 2, 1, 1), 5, 70),
        (5, 6, 1, (2, 3), (2, 1), (1, 2), (1, 0, 0, 2), 4, 40),
    ]:
        x = rng.integers(info.min, info.max + 1, (1, C, H, W), dtype=x_dt)
        w = rng.integers(-128, 128, (M, C // G, *k), dtype=np.int8)
        xz = x_dt(rng.integers(info.min, info.max + 1))
        kw = {"group": G, "strides": s, "dilations": d, "pads": pads}
        # per-channel weight zero points: the pad bytes of the last K word
        # must hold the input's zero point exactly (they meet w' = -w_zp)
        wz = rng.integers(-3, 4, M).astype(np.int8)
        want = conv_ref(x, w, xz, wz, **kw)
        # the NCHW4 path with dense-K panels and with 4-channel blocks
        for dense in (True, False) if isa == "nchw4" else (True,):
            monkeypatch.setattr(lc, "NCHW4_DENSE", dense)
            got = lowprec.conv.conv_integer(x, w, xz, wz, **kw)
            np.testing.assert_array_equal(got, want)


def test_dense_k_routing(monkeypatch):
    """Dense-K panels: channels per group not a multiple of 4, kernel rows of
    >= 3 taps whose 16-pixel windows fit 64 bytes, and VBMI on the host."""
    from types import SimpleNamespace as P

    dense = lc._dense_k
    stem = P(shape=(64, 3, 7, 7))
    assert dense(stem, 2, 1) == ("avx512vbmi" in lowprec._dispatch.host_features())
    monkeypatch.setattr(lowprec._dispatch, "host_features", lambda: {"avx512vbmi"})
    assert dense(stem, 2, 1)
    assert dense(P(shape=(8, 1, 3, 3)), 1, 1)  # MNIST-like: 3 words, not 9
    assert not dense(P(shape=(64, 4, 7, 7)), 2, 1)  # whole channel blocks
    assert not dense(P(shape=(64, 3, 2, 2)), 1, 1)  # a word would span 3 runs
    assert not dense(P(shape=(64, 3, 7, 7)), 4, 1)  # 15*4 + 6 > 63
    assert dense(P(shape=(64, 3, 7)), 3, 2)  # 1-D: 45 + 12 < 64
    monkeypatch.setattr(lowprec._dispatch, "host_features", lambda: {"avx512vnni"})
    assert not dense(stem, 2, 1)
    monkeypatch.setattr(lc, "NCHW4_DENSE", False)
    monkeypatch.setattr(lowprec._dispatch, "host_features", lambda: {"avx512vbmi"})
    assert not dense(stem, 2, 1)


def test_nchw4_routing(monkeypatch):
    """conv_nchw4 is chosen by channels / pixels, never for groups smaller than
    a channel tile, and never where its int32 sum could overflow."""
    from types import SimpleNamespace as P

    fits = lc._nchw4_fits
    assert fits(P(shape=(64, 3, 7, 7)), 1, 64, 112 * 112)  # stem
    assert fits(P(shape=(64, 64, 3, 3)), 1, 64, 112 * 112)  # large image
    assert not fits(P(shape=(64, 64, 3, 3)), 1, 64, 56 * 56)
    assert fits(P(shape=(64, 256, 1, 1)), 1, 64, 56 * 56, direct=True)  # 1x1
    monkeypatch.setattr(lc, "NCHW4_DIRECT", False)
    assert not fits(P(shape=(64, 256, 1, 1)), 1, 64, 56 * 56, direct=True)
    assert not fits(P(shape=(64, 256, 1, 1)), 1, 64, 56 * 56)  # 1x1 with pads
    assert not fits(P(shape=(8, 4, 3, 3)), 4, 2, 112 * 112)  # 2 channels per group
    # padded K = 4 * 182 * 182 = 132496 > (2**31 - 1) // (255 * 128)
    assert not fits(P(shape=(8, 1, 182, 182)), 1, 8, 112 * 112)
    assert fits(P(shape=(8, 1, 128, 128)), 1, 8, 112 * 112)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("w_zp", [0, 3])
def test_depthwise_nchw_fast_paths(isa, stride, w_zp, monkeypatch):
    """The NCHW depthwise kernel's register paths (3x3, stride 1 / 2, even and
    odd widths and pads, rows of several 16-output blocks, int8 x) and its
    tap-by-tap fallback (dilation 2), in all three output modes, against the
    oracle. w_zp 0: w - w_zp fits int8, so VNNI takes the vpdpbusd kernel;
    w_zp 3: it does not (w = -128), so every path takes the int32 one."""
    calls = []
    real = lc._kc.depthwise_nchw_vnni
    monkeypatch.setattr(
        lc._kc, "depthwise_nchw_vnni", lambda *a: calls.append(1) or real(*a)
    )
    rng = np.random.default_rng(stride)
    for C, H, W, pads, dil, xdt in [
        (5, 9, 11, 1, 1, np.uint8),
        (3, 8, 8, 0, 1, np.int8),
        (4, 7, 10, (1, 0, 2, 1), 1, np.uint8),
        (2, 5, 45, (0, 2, 1, 1), 1, np.uint8),
        (2, 9, 9, 2, 2, np.int8),
    ]:
        xi = np.iinfo(xdt)
        x = rng.integers(xi.min, xi.max + 1, (2, C, H, W), dtype=xdt)
        w = rng.integers(-128, 128, (C, 1, 3, 3), dtype=np.int8)
        w[0, 0, 0, 0] = -128
        pads4 = (pads,) * 4 if isinstance(pads, int) else pads
        kw = {"group": C, "strides": (stride, stride), "pads": pads4,
              "dilations": (dil, dil)}  # fmt: skip
        xz, wz = xdt(rng.integers(xi.min, xi.max + 1)), np.int8(w_zp)
        acc = conv_ref(x, w, xz, wz, **kw)
        np.testing.assert_array_equal(
            lowprec.conv.conv_integer(x, w, xz, wz, **kw), acc
        )
        sx, sw = np.float32(0.02), np.float32(0.01)
        sy = np.float32(sx * sw * (float(np.abs(acc).std()) + 1) * 3 / 127)
        bias = rng.integers(-3000, 3000, C).astype(np.int32)
        for yz, fdt in [(np.uint8(128), None), (np.int8(-5), None), (None, np.float32)]:
            got = lowprec.conv.qlinear_conv(
                x, sx, xz, w, sw, wz, None if fdt else sy, yz, bias,
                activation="relu6", out_dtype=fdt, **kw,
            )  # fmt: skip
            want = requant_ref(acc, sx, sw, sy, yz, bias=bias, activation="relu6",
                               out_dtype=fdt)  # fmt: skip
            np.testing.assert_array_equal(got, want)
    # 4 register-path shapes x 4 calls on VNNI with int8-sized weights
    assert len(calls) == (16 if isa != "portable" and w_zp == 0 else 0)


def test_auto_pad_modes():
    x = np.arange(35, dtype=np.uint8).reshape(1, 1, 5, 7)
    w = np.ones((1, 1, 3, 2), np.int8)
    for mode in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        got = lowprec.conv.conv_integer(x, w, auto_pad=mode, strides=(2, 2))
        from onnx.reference.ops.op_conv import _conv_implementation

        want = _conv_implementation(
            x.astype(np.float64), w.astype(np.float64), None, mode, None, 1,
            None, None, [2, 2],
        )  # fmt: skip
        np.testing.assert_array_equal(got, want.astype(np.int64))


def test_inputs_not_modified_and_packed_immutable():
    rng = np.random.default_rng(2)
    x = rng.integers(-128, 128, (1, 4, 5, 5), dtype=np.int8)
    w = rng.integers(0, 256, (6, 4, 3, 3), dtype=np.uint8)
    x0, w0 = x.copy(), w.copy()
    p = lowprec.conv.pack_conv_weights(w, np.uint8(3), np.float32(0.1))
    lowprec.conv.conv_integer(x, p, np.int8(1), pads=(1, 1, 1, 1))
    lowprec.conv.qlinear_conv(x, 0.1, np.int8(1), w, 0.1, np.uint8(3), 0.2,
                              np.uint8(5), pads=(1, 1, 1, 1))  # fmt: skip
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(w, w0)
    with pytest.raises(AttributeError, match="immutable"):
        p.group = 2
    assert "PackedConvWeights" in repr(p)


# --------------------------------------------------------------------------- #
# errors


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"group": 3}, ValueError, "channels"),
        ({"group": 0}, ValueError, "group must be >= 1"),
        ({"group": 1.5}, TypeError, "group must be an int"),
        ({"kernel_shape": (2, 2)}, ValueError, "kernel_shape"),
        ({"kernel_shape": 3}, TypeError, "kernel_shape must be a sequence of 2"),
        ({"pads": (-1, 0, 0, 0)}, ValueError, "non-negative"),
        ({"pads": (1, 1)}, ValueError, "pads must be a sequence of 4"),
        ({"strides": (0, 1)}, ValueError, "strides"),
        ({"auto_pad": "SAME"}, ValueError, "auto_pad"),
        ({"auto_pad": "VALID", "pads": (1, 1, 1, 1)}, ValueError, "together"),
    ],
)
def test_bad_attributes(kwargs, exc, match):
    x = np.zeros((1, 4, 5, 5), np.uint8)
    w = np.zeros((4, 4, 3, 3), np.int8)
    with pytest.raises(exc, match=match):
        lowprec.conv.conv_integer(x, w, **kwargs)


def test_bad_inputs():
    x = np.zeros((1, 4, 5, 5), np.uint8)
    w = np.zeros((4, 4, 3, 3), np.int8)
    with pytest.raises(TypeError, match="x must have dtype"):
        lowprec.conv.conv_integer(x.astype(np.float32), w)
    with pytest.raises(TypeError, match="w must have dtype"):
        lowprec.conv.conv_integer(x, w.astype(np.int16))
    with pytest.raises(TypeError, match="x_zero_point"):
        lowprec.conv.conv_integer(x, w, np.int8(0))
    with pytest.raises(ValueError, match="per output channel"):
        lowprec.conv.conv_integer(x, w, None, np.zeros(3, np.int8))
    with pytest.raises(ValueError, match="x_zero_point must be a scalar"):
        lowprec.conv.conv_integer(x, w, np.zeros(2, np.uint8))
    with pytest.raises(NotImplementedError, match="3-D"):
        lowprec.conv.conv_integer(x[..., None], w[..., None])
    with pytest.raises(ValueError, match="dimensions"):
        lowprec.conv.conv_integer(x[0], w)
    with pytest.raises(ValueError, match="larger than the padded"):
        lowprec.conv.conv_integer(x[:, :, :2, :2], w)
    with pytest.raises(ValueError, match="not divisible by group"):
        lowprec.conv.pack_conv_weights(np.zeros((3, 2, 1, 1), np.int8), group=2)
    with pytest.raises(ValueError, match="w_scale is required"):
        lowprec.conv.qlinear_conv(x, 0.1, None, w, None, None, 0.1, np.uint8(0))
    with pytest.raises(ValueError, match="layout"):
        lowprec.conv.qlinear_conv(x, 0.1, None, w, 0.1, None, 0.1, np.uint8(0),
                                  layout="CHWN")  # fmt: skip
    p = lowprec.conv.pack_conv_weights(w, np.int8(1))
    with pytest.raises(ValueError, match="different values"):
        lowprec.conv.conv_integer(x, p, None, np.int8(2))
    with pytest.raises(ValueError, match="packed with"):
        lowprec.conv.conv_integer(x, p, group=2)
    with pytest.raises(TypeError, match="already"):
        lowprec.conv.pack_conv_weights(p)


def test_plan_cache_follows_every_argument():
    """Calls with prepacked weights reuse a plan per (x shape/dtype, arguments):
    a changed scale, zero point, bias (even mutated in place), activation or
    dtype must give that call's own result, never an earlier plan's."""
    rng = np.random.default_rng(11)
    x = rng.integers(0, 256, (1, 6, 7, 7), dtype=np.uint8)
    w = rng.integers(-128, 128, (10, 6, 3, 3), dtype=np.int8)
    wp = lowprec.conv.pack_conv_weights(w, None, np.float32(0.01))
    bias = rng.integers(-500, 500, 10).astype(np.int32)
    acc = conv_ref(x, w, 3, 0, pads=(1, 1, 1, 1))
    base = {"xz": np.uint8(3), "sy": np.float32(0.3), "yz": np.uint8(128)}

    def run(act=None, b=bias, **changed):
        xz, sy, yz = ({**base, **changed}[k] for k in ("xz", "sy", "yz"))
        got = lowprec.conv.qlinear_conv(
            x, np.float32(0.02), xz, wp, None, None, sy, yz, b, pads=(1, 1, 1, 1),
            activation=act,
        )  # fmt: skip
        want = requant_ref(
            conv_ref(x, w, int(xz), 0, pads=(1, 1, 1, 1)), np.float32(0.02),
            np.float32(0.01), sy, yz, bias=b, activation=act,
        )  # fmt: skip
        np.testing.assert_array_equal(got, want)
        return got

    first = run()
    np.testing.assert_array_equal(run(), first)  # a cache hit, same result
    assert len(wp._plans) == 1
    run(sy=np.float32(0.5))
    run(xz=np.uint8(9))
    run(yz=np.int8(0))
    run(act="relu")
    b2 = bias.copy()
    run(b=b2)
    b2[:] += 100  # mutated in place: a new key by value
    run(b=b2)
    assert len(wp._plans) == 6
    # another x dtype / shape
    xi = (x.astype(np.int16) - 128).astype(np.int8)
    got = lowprec.conv.conv_integer(xi, wp, np.int8(-5), pads=(1, 1, 1, 1))
    np.testing.assert_array_equal(got, conv_ref(xi, w, -5, 0, pads=(1, 1, 1, 1)))
    assert acc.shape == first.shape


@pytest.mark.parametrize("big", [False, True])
def test_qlinear_conv_bias_beyond_the_narrow_epilogue(isa, big):
    # NHWC 3x3 (the VNNI implicit GEMM): int32 lanes + FMA while |P + bias| <
    # 2**29, float64 lanes for a bias near the int32 limits; both exact
    rng = np.random.default_rng(11)
    x = rng.integers(0, 256, (2, 8, 7, 7), dtype=np.uint8)
    w = rng.integers(-128, 128, (20, 8, 3, 3), dtype=np.int8)
    lim = 2**31 - 1 if big else 2**20
    bias = rng.integers(-lim, lim, 20, endpoint=True).astype(np.int32)
    bias[:2] = [lim, -lim]  # where int32 lanes would wrap
    sx, sw = np.float32(0.02), np.full(20, 0.01, np.float32)
    sy = np.float32(0.02 * 0.01 * (2.0**32 if big else 2.0**22) / 200)
    acc = conv_ref(x, w, 5, 0, pads=[1, 1, 1, 1])
    want = requant_ref(acc, sx, sw, sy, np.uint8(128), bias=bias)
    for layout in ("NCHW", "NHWC"):
        got = lowprec.conv.qlinear_conv(
            _to_layout(x, layout), sx, np.uint8(5), w, sw, np.int8(0), sy,
            np.uint8(128), bias, pads=[1, 1, 1, 1], layout=layout,
        )  # fmt: skip
        got = got.transpose(0, 3, 1, 2) if layout == "NHWC" else got
        np.testing.assert_array_equal(got, want)
    assert len(np.unique(want)) > 10
    assert want.min() < 128 < want.max()


def test_depthwise_bias_past_int32(isa):
    # the depthwise kernels sum in int32: a bias near the limit whose sum with
    # the products passes it takes the exact GEMM path (a silent wrap before)
    rng = np.random.default_rng(12)
    x = rng.integers(0, 256, (1, 6, 5, 5), dtype=np.uint8)
    w = rng.integers(-128, 128, (6, 1, 3, 3), dtype=np.int8)
    w[:2] = -100  # with ZA = 255 every tap adds to the bias
    bias = np.full(6, 2**31 - 1, np.int32)
    bias[1] = -(2**31) + 5
    w[1] = 100
    sx, sw, sy = np.float32(1e-6), np.full(6, 1e-3, np.float32), np.float32(1e-3)
    acc = conv_ref(x, w, 255, 0, group=6, pads=[1, 1, 1, 1])
    for out_dtype in (np.float32, None):
        want = requant_ref(acc, sx, sw, sy, np.uint8(7), bias=bias,
                           out_dtype=out_dtype)  # fmt: skip
        for layout in ("NCHW", "NHWC"):
            got = lowprec.conv.qlinear_conv(
                _to_layout(x, layout), sx, np.uint8(255), w, sw, None, sy,
                np.uint8(7), bias, pads=[1, 1, 1, 1], group=6, layout=layout,
                out_dtype=out_dtype,
            )  # fmt: skip
            got = got.transpose(0, 3, 1, 2) if layout == "NHWC" else got
            np.testing.assert_array_equal(got, want)


def test_depthwise_layouts_bounded_and_gemm_layouts_kept():
    # one depthwise layout per weight zero point, at most 16 kept; the GEMM
    # layouts beside them stay
    rng = np.random.default_rng(13)
    w = rng.integers(-100, 100, (6, 1, 3, 3), dtype=np.int8)
    pw = lowprec.pack_conv_weights(w, np.zeros(6, np.int8), group=6)
    gemm = pw._avx2()
    for z in range(20):
        pw._depthwise(np.full(6, z, np.int64))
    dws = [k for k in pw._layouts if isinstance(k, tuple) and k[0] == "dw"]
    assert len(dws) == 16
    assert pw._avx2() is gemm


@pytest.mark.parametrize("y_dt", [np.uint8, np.int8])
def test_qlinear_conv_float32_epilogue(isa, y_dt):
    # The VNNI tiles requantize in float32 lanes where |acc| < 2**24 and
    # |M| >= 2**-22 (kernels/int8_gemm_vnni.py, _store_tile_f32): exact ties
    # (M = 1/2, 1/4 on small integers), saturation (large M), and M = 2**-22
    # against 2**-23, on the NHWC tile, the channels-as-rows tile (1x1 direct,
    # the dense-K stem, channel blocks), the 3x3 depthwise rows and the
    # portable path
    rng = np.random.default_rng(12)
    zy = y_dt(np.iinfo(y_dt).min + 103)
    shapes = [
        (8, 70, 3, 1, 1, 7, 1),  # 3x3, a tail panel
        (16, 13, 1, 1, 0, 6, 1),  # 1x1 direct
        (3, 20, 7, 2, 3, 15, 1),  # stem (dense K)
        (40, 24, 3, 1, 1, 5, 4),  # grouped
        (24, 24, 3, 1, 1, 19, 24),  # depthwise (NCHW planes, vpdpbusd rows)
        (24, 24, 3, 2, 1, 19, 24),  # depthwise, stride 2
    ]
    for C, M, k, s, pad, H, G in shapes:
        kw = {"group": G, "strides": (s, s), "pads": (pad,) * 4}
        small = (
            rng.integers(0, 4, (2, C, H, H), dtype=np.uint8),
            rng.integers(-3, 4, (M, C // G, k, k), dtype=np.int8),
        )
        big = (
            rng.integers(0, 256, (1, C, H, H), dtype=np.uint8),
            rng.integers(-128, 128, (M, C // G, k, k), dtype=np.int8),
        )
        halves = rng.choice([1.0, 0.5], M)  # per-channel multipliers
        for (x, w), sx, sw, sy in [
            (small, 1.0, 0.5 * halves, 1.0),
            (small, 1.0, 0.25 * halves, 1.0),
            (big, 4.0, 250.0 * halves, 1.0),
            (big, 2.0**-11, 2.0**-11, 1.0),
            (big, 2.0**-11, 2.0**-11, 2.0),
        ]:
            sx, sy = np.float32(sx), np.float32(sy)
            sw = np.broadcast_to(np.float32(sw), M).copy()
            bias = rng.integers(-40, 40, M).astype(np.int32)
            acc = conv_ref(x, w, 1, 0, **kw)
            for act in (None, (-2.0, 3.0)):
                want = requant_ref(acc, sx, sw, sy, zy, bias=bias, activation=act)
                got = lowprec.conv.qlinear_conv(
                    x, sx, np.uint8(1), w, sw, np.int8(0), sy, zy, bias,
                    activation=act, **kw,
                )  # fmt: skip
                np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("C", "k", "strides", "dilations", "pads"),
    [
        (8, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),
        (4, (2, 3), (2, 1), (2, 1), (0, 1, 1, 0)),
        (12, (3, 1), (1, 2), (1, 1), (2, 0, 1, 0)),
        (32, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1)),
    ],
)
@pytest.mark.parametrize("x_dt", [np.uint8, np.int8])
def test_nhwc_implicit_gemm_read_in_place(isa, C, k, strides, dilations, pads, x_dt):
    # one group, kw * C a multiple of 4: the VNNI path reads each pixel's
    # kernel-row runs in place (tiles of 6 pixels across output rows and images)
    rng = np.random.default_rng(C)
    x = rng.integers(-128 if x_dt == np.int8 else 0, 128 if x_dt == np.int8 else 256,
                     (3, C, 11, 9)).astype(x_dt)  # fmt: skip
    w = rng.integers(-128, 128, (20, C, *k), dtype=np.int8)
    xz = x_dt(5)
    kw = dict(strides=list(strides), dilations=list(dilations), pads=list(pads))
    acc = conv_ref(x, w, int(xz), 0, **kw)
    sx, sw = np.float32(0.02), np.full(20, 0.01, np.float32)
    sy = np.float32(0.02 * 0.01 * float(np.abs(acc).std() + 1) * 3 / 100)
    want = requant_ref(acc, sx, sw, sy, np.uint8(128))
    got = lowprec.conv.qlinear_conv(
        _to_layout(x, "NHWC"), sx, xz, w, sw, np.int8(0), sy, np.uint8(128),
        layout="NHWC", **kw,
    )  # fmt: skip
    np.testing.assert_array_equal(got.transpose(0, 3, 1, 2), want)
    assert len(np.unique(want)) > 10


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_3x3_stand_in_is_exact(monkeypatch, stride):
    """The 3x3 depthwise block kernel as compiled where LLVM's target lacks
    AVX-512 VNNI (the avx2 path runs it: vpmaddwd on widened bytes): the
    exact sums base + sum x' * w for 16 outputs and for a partial block, the
    int32 output. Built with the stand-in forced, so AVX-512 hosts test it."""
    if "avx2" not in lowprec.available_isas():
        pytest.skip("this CPU cannot run the avx2 path")
    from numba import njit

    from lowprec.kernels import int8_conv as kc

    monkeypatch.setattr(kc, "target_has", lambda context, *features: False)
    dw3 = kc._make_dw3(stride)

    @njit
    def block(rows, wp, base, out, nvalid):
        p = rows.ctypes.data
        n = rows.shape[1]
        dw3(p, p + n, p + 2 * n, wp[0], wp[1], wp[2], base, out.ctypes.data,
            nvalid, 1.0, 0.0, 0.0, 0.0, 0, out)  # fmt: skip

    rng = np.random.default_rng(stride)
    for nvalid in (16, 11):
        rows = rng.integers(0, 256, (3, 64), dtype=np.uint8)  # x' (64: the reads)
        w = rng.integers(-128, 128, (3, 3)).astype(np.int64)
        b8 = w & 0xFF
        wp = (b8[:, 0] | b8[:, 1] << 8 | b8[:, 2] << 16).astype(np.int32)
        out = np.full(16, -7, np.int32)
        block(rows, wp, np.int32(-1234), out, nvalid)
        taps = np.stack(
            [rows[:, stride * np.arange(16) + t] for t in range(3)], axis=-1
        )  # (3 rows, 16 outputs, 3 taps)
        want = -1234 + np.einsum("rlt,rt->l", taps.astype(np.int64), w)
        np.testing.assert_array_equal(out[:nvalid], want[:nvalid])
        assert (out[nvalid:] == -7).all()  # masked lanes untouched
