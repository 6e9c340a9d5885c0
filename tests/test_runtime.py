"""lowprec.runtime: every supported ONNX op against onnx.reference, QOperator and
QDQ models, transforms, save/load, ONNX export -> onnxruntime, bad files, and
the demo pipeline on a small subset."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest

from lowprec.runtime import graph as G
from lowprec.runtime import serialize as S
from lowprec.runtime import transforms as T
from lowprec.runtime.torch_checkpoint import load_state_dict

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from lowprec.runtime.onnx_loader import load_onnx  # noqa: E402

F = TensorProto.FLOAT
U8, I8, I32 = TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32
RNG = np.random.default_rng(1234)


def model(nodes, inputs, outputs, inits=(), opset=21):
    g = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in inits],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    try:
        info = onnx.shape_inference.infer_shapes(m).graph.value_info
    except onnx.shape_inference.InferenceError:  # custom ops
        info = []
    inferred = {v.name: v for v in info}
    for n, t in outputs:
        m.graph.output.append(
            inferred.get(n) or helper.make_tensor_value_info(n, t, [])
        )
    return m


def run_both(m, feeds):
    ref = ReferenceEvaluator(m).run(None, feeds)
    got = load_onnx(m).run(feeds)
    return ref, [got[o.name] for o in m.graph.output]


def rnd(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------- #
# float ops


def _conv_case(w_shape, x_shape, **attrs):
    w, b = rnd(*w_shape), rnd(w_shape[0])
    n = helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)
    return model([n], [("x", F, list(x_shape))], [("y", F)], [("w", w), ("b", b)]), {
        "x": rnd(*x_shape)
    }


def _single(op, shapes, attrs=None, inits=(), out="y", n_in=None):
    names = [f"x{i}" for i in range(len(shapes))]
    ins = names + [n for n, _ in inits]
    n = helper.make_node(op, ins[: n_in or len(ins)], [out], **(attrs or {}))
    feeds = {nm: rnd(*s) for nm, s in zip(names, shapes, strict=True)}
    return model(
        [n],
        [(nm, F, list(s)) for nm, s in zip(names, shapes, strict=True)],
        [(out, F)],
        inits,
    ), feeds


FLOAT_CASES = {
    "conv_pad": lambda: _conv_case((4, 3, 3, 3), (2, 3, 7, 6), pads=[1, 1, 1, 1]),
    "conv_stride_dil": lambda: _conv_case(
        (5, 2, 3, 2), (1, 2, 9, 8), strides=[2, 1], dilations=[2, 1], pads=[0, 1, 2, 0]
    ),
    "conv_group": lambda: _conv_case(
        (6, 2, 3, 3), (2, 4, 6, 6), group=2, pads=[1, 1, 1, 1]
    ),
    "conv_depthwise_same": lambda: _conv_case(
        (4, 1, 3, 3), (1, 4, 5, 5), group=4, auto_pad="SAME_UPPER"
    ),
    "conv_1d": lambda: _conv_case((3, 2, 3), (2, 2, 9), pads=[1, 1]),
    "gemm_transb": lambda: _single(
        "Gemm",
        [(3, 5)],
        {"transB": 1, "alpha": 0.5, "beta": 2.0},
        [("w", rnd(4, 5)), ("c", rnd(4))],
    ),
    "matmul_const": lambda: _single("MatMul", [(2, 3, 5)], inits=[("w", rnd(5, 4))]),
    "matmul_dyn": lambda: _single("MatMul", [(2, 3, 5), (2, 5, 4)]),
    "add_bcast": lambda: _single("Add", [(2, 3, 4), (4,)]),
    "mul_const": lambda: _single("Mul", [(2, 3)], inits=[("c", rnd(3))]),
    "relu": lambda: _single("Relu", [(3, 7)]),
    "clip": lambda: _single(
        "Clip", [(3, 7)], inits=[("lo", np.float32(-0.5)), ("hi", np.float32(0.7))]
    ),
    "sigmoid": lambda: _single("Sigmoid", [(3, 7)]),
    "softmax": lambda: _single("Softmax", [(2, 3, 5)], {"axis": 1}),
    "maxpool_2x2": lambda: _single(
        "MaxPool", [(2, 3, 7, 6)], {"kernel_shape": [2, 2], "strides": [2, 2]}
    ),
    "maxpool_3x3_pad_ceil": lambda: _single(
        "MaxPool",
        [(1, 2, 7, 7)],
        {
            "kernel_shape": [3, 3],
            "strides": [2, 2],
            "pads": [1, 1, 1, 1],
            "ceil_mode": 1,
        },
    ),
    "avgpool_excl": lambda: _single(
        "AveragePool",
        [(1, 2, 6, 5)],
        {"kernel_shape": [3, 2], "pads": [1, 0, 1, 1], "strides": [2, 1]},
    ),
    "avgpool_incl": lambda: _single(
        "AveragePool",
        [(1, 2, 6, 5)],
        {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1},
    ),
    "gap": lambda: _single("GlobalAveragePool", [(2, 3, 4, 5)]),
    "flatten": lambda: _single("Flatten", [(2, 3, 4, 5)], {"axis": 2}),
    "reshape": lambda: _single(
        "Reshape", [(2, 3, 4)], inits=[("s", np.array([0, -1], np.int64))]
    ),
    "transpose": lambda: _single("Transpose", [(2, 3, 4)], {"perm": [2, 0, 1]}),
    "concat": lambda: _single("Concat", [(2, 3), (2, 4)], {"axis": 1}),
}


@pytest.mark.parametrize("case", sorted(FLOAT_CASES))
def test_float_op_matches_reference(case):
    m, feeds = FLOAT_CASES[case]()
    (ref,), (got,) = run_both(m, feeds)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_batchnorm_folded_into_conv_and_standalone():
    w, b = rnd(4, 3, 3, 3), rnd(4)
    s, bb, mean = rnd(4), rnd(4), rnd(4)
    var = np.abs(rnd(4)) + 0.5
    inits = [("w", w), ("b", b), ("s", s), ("bb", bb), ("m", mean), ("v", var)]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["y"]),
        helper.make_node("BatchNormalization", ["x", "s3", "b3", "m3", "v3"], ["z"]),
    ]
    inits += [
        ("s3", rnd(3)),
        ("b3", rnd(3)),
        ("m3", rnd(3)),
        ("v3", np.ones(3, np.float32)),
    ]
    m = model(nodes, [("x", F, [2, 3, 5, 5])], [("y", F), ("z", F)], inits)
    feeds = {"x": rnd(2, 3, 5, 5)}
    ref, got = run_both(m, feeds)
    ops = [n.op_type for n in load_onnx(m).nodes]
    assert ops.count("Conv") == 1
    assert ops.count("BatchNormalization") == 1
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- #
# QOperator ops: bit-exact


def _q(shape, dtype=np.uint8):
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max + 1, shape, dtype=dtype)


@pytest.mark.parametrize("backend", ["auto", "im2col"])
@pytest.mark.parametrize(
    ("x_shape", "w_shape", "attrs"),
    [
        ((2, 3, 6, 5), (4, 3, 3, 3), {"pads": [1, 1, 1, 1]}),
        ((1, 1, 7, 7), (8, 1, 3, 3), {"pads": [1, 1, 1, 1]}),  # small K: 2 px per row
        ((1, 4, 6, 6), (6, 2, 3, 3), {"group": 2, "strides": [2, 2]}),
    ],
)
def test_qlinearconv_exact(backend, x_shape, w_shape, attrs, monkeypatch):
    monkeypatch.setattr(G, "CONV_BACKEND", backend)
    M = w_shape[0]
    inits = [
        ("xs", np.float32(0.05)),
        ("xz", np.uint8(7)),
        ("w", _q(w_shape, np.int8)),
        ("ws", (RNG.random(M) * 0.02 + 0.001).astype(np.float32)),
        ("wz", np.zeros(M, np.int8)),
        ("ys", np.float32(0.3)),
        ("yz", np.uint8(100)),
        ("b", RNG.integers(-500, 500, M).astype(np.int32)),
    ]
    n = helper.make_node(
        "QLinearConv",
        ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"],
        ["y"],
        **attrs,
    )
    m = model([n], [("x", U8, list(x_shape))], [("y", U8)], inits)
    (ref,), (got,) = run_both(m, {"x": _q(x_shape)})
    np.testing.assert_array_equal(got, ref)


def test_convinteger_exact():
    inits = [("w", _q((4, 3, 3, 3), np.uint8)), ("wz", np.uint8(3))]
    n = helper.make_node(
        "ConvInteger", ["x", "w", "xz", "wz"], ["y"], pads=[1, 1, 1, 1]
    )
    m = model([n], [("x", U8, [2, 3, 5, 5]), ("xz", U8, [])], [("y", I32)], inits)
    feeds = {"x": _q((2, 3, 5, 5)), "xz": np.array(9, np.uint8)}
    got = load_onnx(m).run(feeds)["y"]
    # oracle: float Conv of the zero-point-shifted integers (exact in float32:
    # |sums| < 2**24); onnx.reference's ConvInteger mishandles this case
    xf = feeds["x"].astype(np.float32) - 9
    wf = inits[0][1].astype(np.float32) - 3
    conv = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    fm = model([conv], [("x", F, [2, 3, 5, 5])], [("y", F)], [("w", wf)])
    (ref,) = ReferenceEvaluator(fm).run(None, {"x": xf})
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, ref.astype(np.int32))


@pytest.mark.parametrize("const_b", [True, False])
def test_qlinearmatmul_exact(const_b):
    b = _q((5, 4), np.int8)
    sc = [
        ("as", np.float32(0.02)),
        ("az", np.uint8(120)),
        ("bs", np.float32(0.01)),
        ("bz", np.int8(0)),
        ("ys", np.float32(0.05)),
        ("yz", np.uint8(128)),
    ]
    inits = sc + ([("b", b)] if const_b else [])
    ins = [("a", U8, [3, 5])] + ([] if const_b else [("b", I8, [5, 4])])
    n = helper.make_node(
        "QLinearMatMul", ["a", "as", "az", "b", "bs", "bz", "ys", "yz"], ["y"]
    )
    m = model([n], ins, [("y", U8)], inits)
    feeds = {"a": _q((3, 5))} | ({} if const_b else {"b": b})
    (ref,), (got,) = run_both(m, feeds)
    np.testing.assert_array_equal(got, ref)
    want = "QGemm" if const_b else "QLinearMatMul"
    assert load_onnx(m).nodes[0].op_type == want


@pytest.mark.parametrize("const_b", [True, False])
def test_matmulinteger_exact(const_b):
    b = _q((6, 3), np.int8)
    inits = [("az", np.uint8(5))] + ([("b", b)] if const_b else [])
    ins = [("a", U8, [4, 6])] + ([] if const_b else [("b", I8, [6, 3])])
    n = helper.make_node("MatMulInteger", ["a", "b", "az"], ["y"])
    m = model([n], ins, [("y", I32)], inits)
    feeds = {"a": _q((4, 6))} | ({} if const_b else {"b": b})
    (ref,), (got,) = run_both(m, feeds)
    np.testing.assert_array_equal(got, ref)


def test_quantize_dequantize_dynamic_exact():
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("QuantizeLinear", ["x", "sa", "za"], ["qa"], axis=1),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
        helper.make_node("DynamicQuantizeLinear", ["x"], ["dq", "dqs", "dqz"]),
    ]
    inits = [
        ("s", np.float32(0.03)),
        ("z", np.uint8(128)),
        ("sa", np.array([0.01, 0.02, 0.05], np.float32)),
        ("za", np.array([0, -3, 4], np.int8)),
    ]
    m = model(
        nodes,
        [("x", F, [2, 3, 4])],
        [("q", U8), ("qa", I8), ("d", F), ("dq", U8), ("dqs", F), ("dqz", U8)],
        inits,
    )
    ref, got = run_both(m, {"x": rnd(2, 3, 4) * 3})
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_array_equal(g, r)


# --------------------------------------------------------------------------- #
# QDQ fused at load


def _qdq_model(op, relu=True, q_out=True):
    xs, xz = np.float32(0.04), np.uint8(120)
    if op == "Conv":
        w = _q((4, 3, 3, 3), np.int8)
        ws = (RNG.random(4) * 0.02 + 0.005).astype(np.float32)
        x_shape, axis = [2, 3, 6, 6], 0
    else:
        w = _q((8, 5), np.int8) if op == "Gemm" else _q((5, 8), np.int8)
        ws = (RNG.random(8) * 0.02 + 0.005).astype(np.float32)
        x_shape, axis = [3, 5], 0 if op == "Gemm" else 1
    bq = RNG.integers(-300, 300, ws.size).astype(np.int32)
    inits = [
        ("xs", xs),
        ("xz", xz),
        ("wq", w),
        ("ws", ws),
        ("wz", np.zeros(ws.size, np.int8)),
        ("bq", bq),
        ("bs", xs * ws),
        ("bz", np.zeros(ws.size, np.int32)),
        ("ys", np.float32(0.1)),
        ("yz", np.uint8(0 if relu else 128)),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xf"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wf"], axis=axis),
        helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["bf"], axis=0),
    ]
    attrs = (
        {"pads": [1, 1, 1, 1]}
        if op == "Conv"
        else ({"transB": 1} if op == "Gemm" else {})
    )
    ins = ["xf", "wf", "bf"] if op != "MatMul" else ["xf", "wf"]
    nodes.append(helper.make_node(op, ins, ["c"], **attrs))
    t = "c"
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["r"]))
        t = "r"
    if q_out:
        nodes.append(helper.make_node("QuantizeLinear", [t, "ys", "yz"], ["y"]))
        out = ("y", U8)
    else:
        nodes.append(helper.make_node("Identity", [t], ["y"]))
        out = ("y", F)
    return model(nodes, [("x", U8, x_shape)], [out], inits), {"x": _q(x_shape)}


@pytest.mark.parametrize("op", ["Conv", "Gemm", "MatMul"])
@pytest.mark.parametrize("q_out", [True, False])
def test_qdq_fused_within_one_lsb(op, q_out):
    m, feeds = _qdq_model(op, relu=True, q_out=q_out)
    g = load_onnx(m)
    fused = [n.op_type for n in g.nodes]
    assert fused[0] in ("QLinearConv", "QGemm"), fused
    assert "DequantizeLinear" not in fused
    assert "QuantizeLinear" not in fused
    (ref,), (got,) = run_both(m, feeds)
    if q_out:
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_qdq_around_maxpool_runs_quantized():
    sc = [("s", np.float32(0.1)), ("z", np.uint8(3))]
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "s", "z"], ["xf"]),
        helper.make_node("MaxPool", ["xf"], ["p"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("QuantizeLinear", ["p", "s", "z"], ["y"]),
    ]
    m = model(nodes, [("x", U8, [2, 3, 5, 5])], [("y", U8)], sc)
    assert [n.op_type for n in load_onnx(m).nodes] == ["MaxPool"]
    (ref,), (got,) = run_both(m, {"x": _q((2, 3, 5, 5))})
    np.testing.assert_array_equal(got, ref)


# --------------------------------------------------------------------------- #
# transforms, save/load, export -> onnxruntime


def small_cnn():
    w0, w1 = rnd(8, 1, 3, 3) * 0.5, rnd(16, 8, 3, 3) * 0.2
    nodes = [
        G.Conv("c0", ["x"], ["a0"], w=w0, b=rnd(8) * 0.1, pads=[1, 1, 1, 1]),
        G.Relu("r0", ["a0"], ["b0"]),
        G.MaxPool("p0", ["b0"], ["c0o"], kernel_shape=[2, 2], strides=[2, 2]),
        G.Conv("c1", ["c0o"], ["a1"], w=w1, b=rnd(16) * 0.1, pads=[1, 1, 1, 1]),
        G.Relu("r1", ["a1"], ["b1"]),
        G.MaxPool("p1", ["b1"], ["c1o"], kernel_shape=[2, 2], strides=[2, 2]),
        G.Flatten("f", ["c1o"], ["flat"], axis=1),
        G.Gemm("fc", ["flat"], ["y"], w=rnd(64, 10) * 0.1, b=rnd(10) * 0.1),
    ]
    return G.Graph(nodes, [("x", (None, 1, 8, 8), np.float32)], ["y"])


@pytest.fixture(scope="module")
def cnn_data():
    return small_cnn(), rnd(64, 1, 8, 8)


@pytest.mark.parametrize("method", T.QUANT_METHODS)
def test_quantize_close_to_float(cnn_data, method):
    g, x = cnn_data
    q = T.quantize(g, x, method=method)
    ops = [n.op_type for n in q.nodes]
    assert ops.count("QLinearConv") == 2
    assert "QGemm" in ops
    y, yq = g(x), q(x)
    rel = np.linalg.norm(yq - y) / np.linalg.norm(y)
    assert rel < 0.1, rel


def test_quantize_iterator_equals_array(cnn_data):
    g, x = cnn_data
    a = T.quantize(g, x, batch=16)
    b = T.quantize(g, (x[i : i + 16] for i in range(0, 64, 16)))
    np.testing.assert_array_equal(a(x), b(x))


def test_observer_ranges():
    o = T.HistogramObserver()
    data = np.concatenate([RNG.standard_normal(100000), [40.0] * 5]).astype(np.float32)
    for part in np.array_split(data, 7):
        o.update(part)
    assert o.range("minmax") == (pytest.approx(float(data.min())), 40.0)
    for m in ("percentile", "mse", "entropy"):
        lo, hi = o.range(m, percentile=99.99)
        assert data.min() - 1 <= lo <= 0 <= hi <= 40.0, (m, lo, hi)
        if m != "mse":  # 5 outliers of 100,005 cost mse less than a wide step
            assert hi < 40.0, (m, hi)


def test_entropy_ignores_relu_zero_spike():
    o = T.HistogramObserver()
    x = np.maximum(RNG.standard_normal(200000), 0).astype(np.float32)  # half zeros
    o.update(x)
    lo, hi = o.range("entropy")
    assert lo == 0.0
    assert 0.5 * o.max < hi <= o.max


def test_exclude_and_precision_and_sensitivity(cnn_data):
    g, x = cnn_data
    q = T.quantize(g, x, exclude=["c0"])
    assert [n.op_type for n in q.nodes][0] == "Conv"
    mixed = T.apply_precision(g, {"c1": "int8"}, x)
    assert sorted(n.op_type for n in mixed.nodes if "Q" in n.op_type)[:1] == [
        "QGemm"
    ] or "QLinearConv" in [n.op_type for n in mixed.nodes]
    sens = T.sensitivity(g, x)
    assert set(sens) == {"c0", "c1", "fc"}
    assert all(0 <= s["rel_l2"] < 0.2 for s in sens.values())


def test_conv_backends_identical(cnn_data, monkeypatch):
    g, x = cnn_data
    q = T.quantize(g, x)
    y = q(x)
    monkeypatch.setattr(G, "CONV_BACKEND", "im2col")
    y2 = S.load(io.BytesIO(S._bytes(q)))(x)
    np.testing.assert_array_equal(y, y2)


def test_fp16(cnn_data):
    pytest.importorskip("lowprec.half")
    g, x = cnn_data
    h = T.to_fp16(g)
    assert {n.op_type for n in h.nodes} >= {"HalfConv", "HalfGemm"}
    np.testing.assert_allclose(h(x), g(x), rtol=2e-2, atol=2e-2)


def _without(model, *keys):
    nodes = [type(n)(n.name, n.inputs, n.outputs,
                     **{k: v for k, v in n.params.items() if k not in keys})
             for n in model.nodes]  # fmt: skip
    return G.Graph(nodes, model.inputs, model.outputs, model.constants, model.meta)


def test_fp16_convs_hand_over_float16(cnn_data):
    # HalfConv runs lowprec.conv_fp16 on NCHW (no channels-last handoff); a
    # HalfConv whose consumers round to float16 anyway writes float16 after
    # its pool: the same bits as float32 out, then the consumer's rounding
    pytest.importorskip("lowprec.half")
    g, x = cnn_data
    h = T.to_fp16(g)
    convs = [n for n in h.nodes if n.op_type == "HalfConv"]
    assert len(convs) == 2
    assert all(n.params.get("out_fp16") and n.params.get("pool") for n in convs)
    assert not any(k in n.params for n in h.nodes for k in ("nhwc_in", "nhwc_out"))
    y = h(x)
    np.testing.assert_array_equal(y, _without(h, "out_fp16")(x))
    # the first conv by hand: float16 in, conv_fp16, numpy's pool, rounded
    import lowprec

    c0 = convs[0]
    ref = lowprec.conv_fp16(x.astype(np.float16), c0.params["w"], c0.params["b"],
                            pads=[1, 1, 1, 1], activation="relu")  # fmt: skip
    ref = G.MaxPool("p", ["a"], ["b"], kernel_shape=[2, 2], strides=[2, 2]).run(ref)
    got = c0.run(x)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, ref.astype(np.float16))
    # graphs saved with the handoff flags on HalfConv still run right
    flagged = [
        G.HalfConv(n.name, n.inputs, n.outputs, **n.params, nhwc_out=True)
        if n is convs[0]
        else G.HalfConv(n.name, n.inputs, n.outputs, **n.params, nhwc_in=True)
        if n is convs[1]
        else n
        for n in h.nodes
    ]
    old = G.Graph(flagged, h.inputs, h.outputs, h.constants, h.meta)
    np.testing.assert_array_equal(old(x), y)
    blob = S._bytes(h)
    np.testing.assert_array_equal(S.load(io.BytesIO(blob))(x), y)


@pytest.mark.parametrize("to16", [False, True])
def test_half_conv_other_pools(to16):
    # pools other than 2x2 stride 2 (numpy's MaxPool), 1-D convolutions
    pytest.importorskip("lowprec.half")
    rng = np.random.default_rng(5)
    for w, xs, pool in (
        (rnd(4, 3, 3, 3), (2, 3, 9, 11), {"kernel_shape": [3, 3], "strides": [2, 2]}),
        (rnd(4, 3, 3), (2, 3, 17), {"kernel_shape": [2], "strides": [2]}),
        (rnd(5, 3, 3, 3), (1, 3, 7, 9), {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ):
        w16 = w.astype(np.float16)
        x = rng.standard_normal(xs).astype(np.float32)
        n = G.HalfConv("c", ["x"], ["y"], w=w16, b=rnd(w.shape[0]), pool=pool,
                       out_fp16=to16)  # fmt: skip
        import lowprec

        ref = lowprec.conv_fp16(x.astype(np.float16), w16, n.params["b"])
        ref = G.MaxPool("p", ["a"], ["b"], **pool).run(ref)
        got = n.run(x)
        assert got.dtype == (np.float16 if to16 else np.float32)
        np.testing.assert_array_equal(got, ref.astype(got.dtype))


def test_empty_batch_and_pools_that_do_not_fit():
    # N = 0 through the fused 2x2 pool (both output types) and the float32
    # im2col conv; a 2x2 pool on a 1-row output is the MaxPool node's error
    pytest.importorskip("lowprec.half")
    w = rnd(4, 3, 3, 3)
    pool = {"kernel_shape": [2, 2], "strides": [2, 2]}
    for to16 in (False, True):
        n = G.HalfConv("c", ["x"], ["y"], w=w.astype(np.float16), pads=[1] * 4,
                       pool=pool, out_fp16=to16)  # fmt: skip
        y = n.run(np.zeros((0, 3, 8, 8), np.float32))
        assert y.shape == (0, 4, 4, 4)
        with pytest.raises(ValueError, match="does not fit"):
            n.run(np.zeros((2, 3, 1, 5), np.float32))
        with pytest.raises(TypeError, match="x must have dtype"):  # not cast
            n.run(np.zeros((2, 3, 8, 8), np.uint8))
    hg = G.HalfGemm("g", ["x"], ["y"], w=rnd(8, 4).astype(np.float16))
    with pytest.raises(TypeError, match="x must have dtype"):
        hg.run(np.zeros((2, 8), np.int32))
    c = G.Conv("c", ["x"], ["y"], w=w, pads=[1] * 4, pool=pool)
    assert c.run(np.zeros((0, 3, 8, 8), np.float32)).shape == (0, 4, 4, 4)
    # whole networks (Flatten, Gemm, HalfGemm, QGemm included)
    g, x = small_cnn(), rnd(4, 1, 8, 8)
    for model in (g, T.to_fp16(g), T.quantize(g, x)):
        assert model(np.zeros((0, 1, 8, 8), np.float32)).shape == (0, 10)


@pytest.mark.parametrize("pattern", ["unstructured", (2, 4)])
def test_prune_save_load_sparse(cnn_data, pattern):
    g, x = cnn_data
    p = T.prune(g, 0.5, pattern=pattern, exclude=["c0"])
    w = p.nodes[3].params["w"]  # c1 (after no fusion: index in the plain graph)
    assert abs((w == 0).mean() - 0.5) < 0.02
    q = T.quantize(p, x)
    for model in (p, q):
        blob = S._bytes(model)
        back = S.load(io.BytesIO(blob))
        np.testing.assert_array_equal(back(x), model(x))
    enc = S._bytes(T.quantize(g, x)), S._bytes(q)
    assert len(enc[1]) < len(enc[0])


def test_blob_deflates_and_checks_parts():
    # skewed int8 values (as kept weights are) compress; random bytes do not
    rng = np.random.default_rng(0)
    vals = np.clip(rng.normal(0, 12, 4000), -127, 127).astype(np.int8)
    noise = rng.integers(-128, 128, 4000, dtype=np.int8)
    blob = S._Blob()
    d_vals, d_noise, d_raw = (
        blob.add(vals, deflate=True),
        blob.add(noise, deflate=True),
        blob.add(vals),
    )
    assert 0 < d_vals["deflated"] < 0.95 * vals.nbytes
    assert "deflated" not in d_noise
    assert "deflated" not in d_raw
    back = S._Blob(blob.bytes())
    for d, a in ((d_vals, vals), (d_noise, noise), (d_raw, vals)):
        np.testing.assert_array_equal(back.get(d), a)
    bad = blob.bytes().copy()
    off = d_vals["offset"]
    bad[off + 2 : off + d_vals["deflated"]] ^= np.uint8(0x5A)
    with pytest.raises(ValueError, match="compressed part"):
        S._Blob(bad).get(d_vals)
    # a part that claims a smaller array than its stream holds
    small = dict(d_vals, shape=[10])
    with pytest.raises(ValueError, match="inflate to its array"):
        S._Blob(blob.bytes()).get(small)


def test_save_load_roundtrip_exact(cnn_data, tmp_path):
    g, x = cnn_data
    for model in (g, T.quantize(g, x, per_channel=False)):
        S.save(model, tmp_path / "m.lpz")
        back = S.load(tmp_path / "m.lpz")
        np.testing.assert_array_equal(back(x), model(x))


def test_export_onnx_runs_in_onnxruntime(cnn_data, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    g, x = cnn_data
    for model, tol in ((g, 1e-4), (T.quantize(g, x), None)):
        path = tmp_path / "m.onnx"
        S.export_onnx(model, path)
        so = ort.SessionOptions()
        # without VNNI, ORT's u8s8 kernels sum pairs in saturating 16 bits
        # (vpmaddubsw); this entry makes them exact (measured on an AVX2 Zen 3:
        # max error 0.98 of 6.4 without it, 0 with it)
        so.add_session_config_entry("session.x64quantprecision", "1")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        got = sess.run(None, {"x": x})[0]
        want = model(x)
        if tol:
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
        else:  # fused int8 in ORT vs lowprec: 1-LSB requantization differences
            assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
            assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.95
        back = load_onnx(path)  # our own export loads back, bit-exact
        np.testing.assert_array_equal(back(x), want)


# --------------------------------------------------------------------------- #
# bad inputs


def test_bad_model_files(tmp_path):
    m, _ = FLOAT_CASES["relu"]()
    blob = m.SerializeToString()
    (tmp_path / "trunc.onnx").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "junk.onnx").write_bytes(b"\xff\x00garbage" * 10)
    for name in ("trunc.onnx", "junk.onnx"):
        with pytest.raises(ValueError, match="ONNX"):
            load_onnx(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        load_onnx(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="not a lowprec.runtime model"):
        S.load(tmp_path / "junk.onnx")


def test_unsupported_op_names_node():
    n = helper.make_node("Tanh", ["x"], ["y"], name="my_tanh")
    m = model([n], [("x", F, [2])], [("y", F)])
    with pytest.raises(G.RuntimeGraphError, match=r"my_tanh.*Tanh.*unsupported"):
        load_onnx(m)
    n = helper.make_node("Conv", ["x", "w"], ["y"], name="dyn_conv")
    m = model([n], [("x", F, [1, 1, 3, 3]), ("w", F, [1, 1, 1, 1])], [("y", F)])
    with pytest.raises(G.RuntimeGraphError, match=r"dyn_conv.*Conv.*constant"):
        load_onnx(m)
    n = helper.make_node("Foo", ["x"], ["y"], name="custom", domain="com.example")
    m = model([n], [("x", F, [2])], [("y", F)])
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(G.RuntimeGraphError, match="custom domain"):
        load_onnx(m, check=False)


def test_wrong_input_shape_and_dtype():
    m, feeds = FLOAT_CASES["conv_pad"]()
    g = load_onnx(m)
    with pytest.raises(TypeError, match=r"'x'.*float32.*float64"):
        g(feeds["x"].astype(np.float64))
    with pytest.raises(ValueError, match=r"'x' must have shape"):
        g(feeds["x"][:, :2])
    with pytest.raises(TypeError, match="missing graph input"):
        g.run({})


# --------------------------------------------------------------------------- #
# torch checkpoints without torch


def _zip(tmp_path, pkl: bytes, storages=()):
    p = tmp_path / "ckpt.pth"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        for k, raw in storages:
            z.writestr(f"archive/data/{k}", raw)
    return p


def test_checkpoint_refuses_other_globals(tmp_path):
    evil = b"cos\nsystem\n(S'echo hacked'\ntR."
    with pytest.raises(pickle.UnpicklingError, match=r"refusing global os\.system"):
        load_state_dict(_zip(tmp_path, evil))
    bad = tmp_path / "x.pth"
    bad.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not a torch zip checkpoint"):
        load_state_dict(bad)


def test_checkpoint_reads_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    sd = {
        "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
        "b": torch.tensor([1, -2], dtype=torch.int8),
    }
    torch.save(sd, tmp_path / "m.pth")
    got = load_state_dict(tmp_path / "m.pth")
    np.testing.assert_array_equal(got["a.weight"], np.arange(12).reshape(3, 4).T)
    assert got["b"].dtype == np.int8
    assert list(got["b"]) == [1, -2]


def test_checkpoint_refuses_negative_strides(tmp_path):
    # {"w": _rebuild_tensor_v2(storage of 4 floats, 0, (100,), (-1,), False,
    # OrderedDict())} as torch's protocol-2 opcodes: a negative stride put the
    # view's elements before the storage (as_strided read outside the buffer)
    pkl = (
        b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(("
        b"X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000"
        b"X\x03\x00\x00\x00cpuK\x04tQK\x00Kd\x85J\xff\xff\xff\xff\x85\x89"
        b"ccollections\nOrderedDict\n)RtRs."
    )
    data = [("0", b"\x00\x00\x80\x3f" * 4)]
    with pytest.raises(pickle.UnpicklingError, match="does not fit its storage"):
        load_state_dict(_zip(tmp_path, pkl, data))
    ok = pkl.replace(b"Kd\x85J\xff\xff\xff\xff\x85", b"K\x04\x85K\x01\x85")
    np.testing.assert_array_equal(load_state_dict(_zip(tmp_path, ok, data))["w"], 1.0)
    # a stride-0 view of 2**34 elements over one float (64 GiB copied)
    huge = pkl.replace(
        b"Kd\x85J\xff\xff\xff\xff\x85",
        b"J\x00\x00\x02\x00J\x00\x00\x02\x00\x86K\x00K\x00\x86",
    )
    with pytest.raises(pickle.UnpicklingError, match="does not fit its storage"):
        load_state_dict(_zip(tmp_path, huge, data))


def test_external_data_only_from_a_path(tmp_path):
    # from bytes, a tensor's external file was resolved against the current
    # directory (any file there was read as weights)
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    w.data_location = TensorProto.EXTERNAL
    w.ClearField("raw_data")
    w.external_data.add(key="location", value="secret.bin")
    n = helper.make_node("MatMul", ["x", "w"], ["y"])
    io_ = [helper.make_tensor_value_info(k, F, [1, 2]) for k in "xy"]
    g = helper.make_graph([n], "t", io_[:1], io_[1:], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    for src in (m, m.SerializeToString()):
        with pytest.raises(ValueError, match="external file"):
            load_onnx(src, check=False)


def test_repeated_node_names_keep_channels_last_right():
    # an unnamed Conv (named Conv_0 by the loader) feeding a Conv named Conv_0:
    # the channels-last hand-off flags were keyed by name (both convs got both)
    w1, w2 = rnd(4, 3, 3, 3), rnd(4, 4, 3, 3)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["h", "w2"], ["y"], name="Conv_0", pads=[1, 1, 1, 1]),
    ]
    m = model(nodes, [("x", F, [1, 3, 8, 8])], [("y", F)], [("w1", w1), ("w2", w2)])
    x = rnd(1, 3, 8, 8)
    ref = ReferenceEvaluator(m).run(None, {"x": x})[0]
    g = load_onnx(m)
    assert len({n.name for n in g.nodes}) == len(g.nodes)
    assert g.nodes[1].name == "Conv_0"  # an explicit name is kept; others move
    np.testing.assert_allclose(T.fuse_activations(g).run({"x": x})["y"], ref,
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_integer_div_truncates():
    a, b = np.array([7, -7, 9], np.int64), np.array([2, 2, -4], np.int64)
    got = G.Div("d", ["a", "b"], ["y"]).run(a, b)
    assert got.dtype == np.int64
    assert got.tolist() == [3, -3, -2]
    # the type's minimum (|-128| does not fit int8)
    got = G.Div("d", ["a", "b"], ["y"]).run(np.array([-128], np.int8), np.int8(3))
    assert got.tolist() == [-42]


def test_quantize_constant_input_and_bias_beyond_int32():
    # a non-zero constant tensor (np.histogram's bins at 0.7), and a Gemm
    # column of tiny weights beside a large bias: the weight scale is raised
    # so that the bias fits int32 (it was clipped: 0.058 for 5.0)
    w = np.array([[1.0, 1e-7], [0.5, -1e-7]], np.float32)
    b = np.array([0.0, 5.0], np.float32)
    n = helper.make_node("Gemm", ["x", "w", "b"], ["y"])
    m = model([n], [("x", F, [3, 2])], [("y", F)], [("w", w), ("b", b)])
    g = load_onnx(m)
    calib = np.full((3, 2), 0.7, np.float32)
    q = T.quantize(g, calib)
    np.testing.assert_allclose(q.run({"x": calib})["y"][:, 1], 5.0, rtol=1e-3)
    calib[0, 0] = 0.7001  # a range of fewer float32 steps than bins
    T.quantize(g, calib)
    q = T.quantize(g, calib, per_channel=False)  # the tensor's scale raised
    np.testing.assert_allclose(q.run({"x": calib})["y"][:, 1], 5.0, rtol=1e-3)


def test_quantized_batched_matmul_exports():
    ort = pytest.importorskip("onnxruntime")
    m = model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", F, [2, 3, 5])],
              [("y", F)], [("w", rnd(5, 4))])  # fmt: skip
    x = rnd(2, 3, 5)
    q = T.quantize(load_onnx(m), x)
    want = q.run({"x": x})["y"]
    e = S.export_onnx(q)
    so = ort.SessionOptions()  # exact u8s8 sums (AVX2 CPUs saturate otherwise)
    so.add_session_config_entry("session.x64quantprecision", "1")
    got = ort.InferenceSession(e.SerializeToString(), so).run(None, {"x": x})[0]
    assert got.shape == want.shape == (2, 3, 4)
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())


def test_fp16_keeps_out_of_range_layers_float32():
    w = np.array([[1.0, 70000.0]], np.float32)
    m = model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", F, [1, 1])],
              [("y", F)], [("w", w)])  # fmt: skip
    with pytest.warns(RuntimeWarning, match="beyond float16's range"):
        h = T.to_fp16(load_onnx(m))
    np.testing.assert_array_equal(h.run({"x": np.full((1, 1), 0.5, np.float32)})["y"],
                                  [[0.5, 35000.0]])  # fmt: skip


def test_export_legacy_clip_softmax_and_batched_matmul():
    ort = pytest.importorskip("onnxruntime")
    cases = [
        (model([helper.make_node("Clip", ["x"], ["y"], min=0.0, max=6.0)],
               [("x", F, [2, 4])], [("y", F)], opset=10), rnd(2, 4) * 10),
        (model([helper.make_node("Softmax", ["x"], ["y"], axis=1)],
               [("x", F, [2, 3, 4])], [("y", F)], opset=11), rnd(2, 3, 4)),
        (model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", F, [2, 3, 5])],
               [("y", F)], [("w", rnd(5, 4))]), rnd(2, 3, 5)),
    ]  # fmt: skip
    for m, x in cases:
        g = load_onnx(m)
        want = g.run({"x": x})["y"]
        # (ONNX Runtime: the reference evaluator's opset-11 Softmax takes the
        # opset-13 meaning)
        ref = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
        np.testing.assert_allclose(want, ref, rtol=1e-5, atol=1e-6)
        e = S.export_onnx(g)
        got = ort.InferenceSession(e.SerializeToString()).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_batchnorm_training_mode_refused():
    ins = ["x", "s", "b", "m", "v"]
    n = helper.make_node("BatchNormalization", ins, ["y"], training_mode=1)
    c = [(k, np.ones(3, np.float32)) for k in ins[1:]]
    m = model([n], [("x", F, [2, 3, 4, 4])], [("y", F)], c)
    with pytest.raises(G.RuntimeGraphError, match="training mode"):
        load_onnx(m, check=False)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["demo", "--threads", "1,x"], "--threads must be comma-separated ints"),
        (["demo", "--batch", "0"], "--batch must be >= 1"),
        (["demo", "--limit", "0"], "--limit must be >= 1"),
        (["run", "m.onnx", "--batch", "0"], "--batch must be >= 1"),
        (["run", "nothere.onnx"], "no such model file"),
    ],
)
def test_cli_errors_are_one_line(argv, match, capsys):
    from lowprec import cli

    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's p.error
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert match in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- #
# the demo pipeline on a small subset (needs the two data-only packages)


def test_demo_small_subset(tmp_path, capsys, monkeypatch, threads):
    from lowprec.runtime import demo

    monkeypatch.setattr(G, "CONV_BACKEND", G.CONV_BACKEND)  # the demo picks one

    try:
        demo.locate(*demo.MODEL_FILE)
        demo.locate(*demo.DATA_FILE)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    res = demo.run_demo(limit=500, batch=250, threads=(1,), ort=False)
    rows = {r["variant"]: r for r in res["rows"]}
    assert rows["fp32"]["top1"] >= 0.98
    for name in ("int8 per-tensor", "int8 per-channel"):
        assert rows[name]["agreement"] >= 0.99
        assert rows[name]["size_bytes"] < 0.4 * rows["fp32"]["size_bytes"]
    assert (
        rows["pruned 2:4 + int8"]["size_bytes"] < rows["int8 per-channel"]["size_bytes"]
    )
    print(demo.format_table(res))
    assert "int8 per-channel" in capsys.readouterr().out
    x, _ = demo.load_mnist()
    np.save(tmp_path / "calib.npy", x[:50])
    S.export_onnx(demo.mnist_cnn(), tmp_path / "m.onnx")
    assert (
        demo.cli_run(
            [
                str(tmp_path / "m.onnx"),
                "--quantize",
                "int8",
                "--calib",
                str(tmp_path / "calib.npy"),
                "--save",
                str(tmp_path / "q.lpz"),
            ]
        )
        == 0
    )
    assert "agreement" in capsys.readouterr().out
