"""Load ONNX models into a :class:`~lowprec.runtime.graph.Graph` (needs ``onnx``).

* Float ops: Conv, Gemm, MatMul, Add, Sub, Mul, Div, Relu, Clip, Sigmoid,
  Softmax, MaxPool, AveragePool, GlobalAveragePool, Flatten, Reshape,
  Transpose, Concat, Identity, Dropout (inference: identity),
  BatchNormalization (folded into the Conv before it when that Conv feeds
  nothing else; otherwise a per-channel scale and shift).
* QOperator: QLinearConv, QLinearMatMul, MatMulInteger, ConvInteger,
  QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear.
* QDQ: ``DequantizeLinear -> Conv/Gemm/MatMul (weights DequantizeLinear of a
  constant) [-> Relu] [-> QuantizeLinear]`` is fused into one QLinearConv /
  QGemm node on prepacked weights (as ONNX Runtime does); the fused node
  computes in int32 and requantizes once, so it may differ from the float
  DQ -> op -> Q reference by 1 in the last quantized place.

Only data is read from the file: no custom-op library is loaded and no code in
the model runs. An op or attribute the runtime cannot run is a
:class:`~lowprec.runtime.graph.RuntimeGraphError` naming the node and op.
"""

from __future__ import annotations

import os

import numpy as np

from . import graph as G

SUPPORTED_OPS = (
    "Conv",
    "Gemm",
    "MatMul",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Relu",
    "Clip",
    "Sigmoid",
    "Softmax",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Flatten",
    "Reshape",
    "Transpose",
    "Concat",
    "Identity",
    "Dropout",
    "BatchNormalization",
    "Constant",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
)


def _err(node, what):
    return G.RuntimeGraphError(f"node {node.name or '?'!r} (op {node.op_type}): {what}")


def _read(source):
    import onnx
    from google.protobuf.message import DecodeError

    if isinstance(source, onnx.ModelProto):
        _refuse_external_data(source, "the ModelProto")
        return source
    where = "model bytes"
    try:
        if isinstance(source, bytes | bytearray):
            m = onnx.load_model_from_string(bytes(source))
        else:
            where = os.fspath(source)
            if not os.path.isfile(where):
                raise FileNotFoundError(f"no such model file: {where}")
            m = onnx.load(where)
    except DecodeError as e:
        msg = f"{where}: not a valid ONNX file (truncated or malformed protobuf: {e})"
        raise ValueError(msg) from None
    except FileNotFoundError:
        raise
    except (OSError, ValueError, RuntimeError, onnx.checker.ValidationError) as e:
        # (ValidationError: external data outside the model's folder, a link)
        msg = f"{where}: cannot read the ONNX model ({e})"
        raise ValueError(msg) from None
    if where == "model bytes":
        _refuse_external_data(m, where)
    if not m.graph.node and not m.graph.output:
        msg = f"{where}: empty or malformed ONNX model (no nodes, no outputs)"
        raise ValueError(msg)
    return m


def _refuse_external_data(m, where):
    """Tensors stored in external files are only read when the model is
    loaded from its path (onnx.load resolves them inside the model's folder):
    from bytes or a ModelProto, numpy_helper would resolve them against the
    current directory and read whatever file is there."""
    import onnx

    ext = onnx.TensorProto.EXTERNAL
    names = [t.name for t in m.graph.initializer if t.data_location == ext]
    names += [
        a.t.name or node.name
        for node in m.graph.node
        for a in node.attribute
        if a.type == onnx.AttributeProto.TENSOR and a.t.data_location == ext
    ]
    if names:
        msg = (
            f"{where}: tensor {names[0]!r} keeps its data in an external file, "
            f"which is only read when the model is loaded from its path; pass the "
            f".onnx file's path"
        )
        raise ValueError(msg)


def _attrs(node):
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _decode_attr(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, list):
        return [_decode_attr(x) for x in v]
    return v


def load_onnx(source, *, check=True):
    """Build a Graph from an ONNX file path, bytes or ``onnx.ModelProto``."""
    import onnx
    from onnx import numpy_helper

    m = _read(source)
    if check:
        try:
            onnx.checker.check_model(m)
        except onnx.checker.ValidationError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            msg = f"invalid ONNX model: {first}"
            raise ValueError(msg) from None
    opset = 0
    for imp in m.opset_import:
        if imp.domain in ("", "ai.onnx"):
            opset = imp.version
    g = m.graph
    consts = {}
    for t in g.initializer:
        try:
            consts[t.name] = numpy_helper.to_array(t)
        except Exception as e:  # noqa: BLE001 (any decode failure of a tensor)
            msg = f"initializer {t.name!r} cannot be read ({e})"
            raise ValueError(msg) from None
    for t in g.sparse_initializer:
        msg = f"sparse initializer {t.values.name!r} is not supported"
        raise G.RuntimeGraphError(msg)
    inputs = []
    for vi in g.input:
        if vi.name in consts:
            continue
        tt = vi.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, TypeError):
            msg = f"graph input {vi.name!r} has an unsupported element type"
            raise G.RuntimeGraphError(msg) from None
        shape = None
        if tt.HasField("shape"):
            shape = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim
            )
        inputs.append((vi.name, shape, dtype))
    return _Builder(g, consts, opset).build(inputs, [o.name for o in g.output])


class _Builder:
    def __init__(self, g, consts, opset):
        self.g, self.consts, self.opset = g, consts, opset
        self.onnx_nodes = list(g.node)
        self.consumers = {}
        self.producer = {}
        for n in self.onnx_nodes:
            for t in n.input:
                self.consumers.setdefault(t, []).append(n)
            for t in n.output:
                self.producer[t] = n
        self.outputs = {o.name for o in g.output}
        self.done = set()  # ids of onnx nodes folded into another
        self.nodes = []
        # unique node names (transforms key on them): every explicit name is
        # reserved first, so that a generated or repeated one never takes it
        self._names = {n.name for n in g.node if n.name}
        self._taken = set()

    # ------------------------------------------------------------------ #
    def const(self, node, i, what=None, required=True):
        if i >= len(node.input) or not node.input[i]:
            if required:
                raise _err(node, f"input {i} ({what or 'constant'}) is missing")
            return None
        t = node.input[i]
        if t not in self.consts:
            if required:
                msg = f"input {i} ({what or t}) must be a constant initializer"
                raise _err(node, msg)
            return None
        return self.consts[t]

    def only_consumer(self, tensor, node):
        cons = self.consumers.get(tensor, [])
        return tensor not in self.outputs and len(cons) == 1 and cons[0] is node

    def build(self, inputs, outputs):
        for node in self.onnx_nodes:
            if id(node) in self.done:
                continue
            if node.domain not in ("", "ai.onnx"):
                msg = (
                    f"custom domain {node.domain!r} is not supported (no custom-op "
                    f"code is ever loaded)"
                )
                raise _err(node, msg)
            fn = getattr(self, "op_" + node.op_type, None)
            if fn is None:
                msg = f"unsupported op; supported: {', '.join(SUPPORTED_OPS)}"
                raise _err(node, msg)
            try:
                fn(node, {k: _decode_attr(v) for k, v in _attrs(node).items()})
            except G.RuntimeGraphError:
                raise
            except (ValueError, TypeError, KeyError, IndexError) as e:
                raise _err(node, str(e)) from e
        nodes = self._dead_code(outputs)
        used = {t for n in nodes for t in n.inputs}
        consts = {k: a for k, a in self.consts.items() if k in used}
        return G.Graph(
            nodes, inputs, outputs, consts, {"source": "onnx", "opset": self.opset}
        )

    def _dead_code(self, outputs):
        nodes = list(self.nodes)
        while True:
            needed = set(outputs) | {t for n in nodes for t in n.inputs}
            keep = [n for n in nodes if any(t in needed for t in n.outputs if t)]
            if len(keep) == len(nodes):
                return keep
            nodes = keep

    def emit(self, cls, node, inputs, outputs=None, **params):
        # ONNX does not require unique node names (nor any): a repeated or
        # generated one that is taken gets a suffix
        base = node.name or f"{node.op_type}_{len(self.nodes)}"
        name, k = base, 1
        while name in self._taken or (name != node.name and name in self._names):
            name, k = f"{base}_{k}", k + 1
        self._taken.add(name)
        self.nodes.append(cls(name, inputs, list(outputs or node.output), **params))

    def simple(self, cls, node, **params):
        self.emit(cls, node, list(node.input), **params)

    # ------------------------------------------------------------------ #
    # float ops
    def _conv_attrs(self, node, a, w):
        if w.ndim not in (3, 4):
            raise _err(
                node,
                f"only 1-D and 2-D convolutions are supported, weights "
                f"have shape {w.shape}",
            )
        ks = a.get("kernel_shape")
        if ks is not None and list(ks) != list(w.shape[2:]):
            raise _err(node, f"kernel_shape {ks} does not match weights {w.shape}")
        out = {k: a[k] for k in ("strides", "pads", "dilations") if k in a}
        out["group"] = int(a.get("group", 1))
        out["auto_pad"] = a.get("auto_pad", "NOTSET")
        return out

    def op_Conv(self, node, a):
        if self._qdq_compute(node, a):
            return
        w = self.const(node, 1, "W")
        b = self.const(
            node, 2, "B", required=len(node.input) > 2 and bool(node.input[2])
        )
        self.emit(
            G.Conv,
            node,
            [node.input[0]],
            w=w.astype(np.float32),
            b=None if b is None else b.astype(np.float32),
            **self._conv_attrs(node, a, w),
        )

    def op_BatchNormalization(self, node, a):
        if len(node.output) > 1 and any(node.output[1:]) or a.get("training_mode"):
            # (training_mode=1 normalizes with the batch's statistics, not the
            # stored running ones)
            raise _err(node, "training mode is not supported (inference only)")
        gamma, beta, mean, var = (
            self.const(node, i, nm)
            for i, nm in ((1, "scale"), (2, "B"), (3, "mean"), (4, "var"))
        )
        eps = float(a.get("epsilon", 1e-5))
        scale = (gamma / np.sqrt(var.astype(np.float64) + eps)).astype(np.float64)
        shift = beta - mean * scale
        prev = self.nodes[-1] if self.nodes else None
        x = node.input[0]
        src = self.producer.get(x)
        if (
            type(prev) is G.Conv
            and prev.outputs == [x]
            and src is not None
            and self.only_consumer(x, node)
        ):
            w = prev.params["w"].astype(np.float64)
            w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
            b = prev.params.get("b")
            b = (
                np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
            ) * scale + shift
            self.nodes[-1] = G.Conv(
                prev.name,
                prev.inputs,
                list(node.output[:1]),
                **{**prev.params, "w": w.astype(np.float32), "b": b.astype(np.float32)},
            )
            return
        self.emit(
            G.BatchNormalization,
            node,
            [x],
            list(node.output[:1]),
            scale=scale.astype(np.float32),
            shift=shift.astype(np.float32),
        )

    def op_Gemm(self, node, a):
        if a.get("transA", 0):
            raise _err(node, "transA=1 is not supported; transpose A before Gemm")
        if self._qdq_compute(node, a):
            return
        w = self.const(node, 1, "B")
        if w.ndim != 2:
            raise _err(node, f"B must be 2-D, got {w.shape}")
        w = (w.T if a.get("transB", 0) else w).astype(np.float32) * np.float32(
            a.get("alpha", 1.0)
        )
        c = self.const(
            node, 2, "C", required=len(node.input) > 2 and bool(node.input[2])
        )
        b = None
        if c is not None:
            b = c.astype(np.float32) * np.float32(a.get("beta", 1.0))
            if b.size not in (1, w.shape[1]) or (b.ndim == 2 and b.shape[0] != 1):
                raise _err(
                    node,
                    f"C of shape {c.shape} is not a per-column bias (N={w.shape[1]})",
                )
            b = np.broadcast_to(b.reshape(-1), (w.shape[1],)).copy()
        self.emit(G.Gemm, node, [node.input[0]], w=np.ascontiguousarray(w), b=b)

    def op_MatMul(self, node, a):
        if self._qdq_compute(node, a):
            return
        if node.input[1] in self.consts and self.consts[node.input[1]].ndim == 2:
            w = self.consts[node.input[1]].astype(np.float32)
            # matmul: A may have batch dimensions (ONNX Gemm takes 2-D A only:
            # exported as MatMul, serialize.export_onnx)
            self.emit(G.Gemm, node, [node.input[0]], w=w, b=None, matmul=True)
        else:
            self.simple(G.MatMul, node)

    def op_Add(self, node, a):
        self.simple(G.Add, node)

    def op_Sub(self, node, a):
        self.simple(G.Sub, node)

    def op_Mul(self, node, a):
        self.simple(G.Mul, node)

    def op_Div(self, node, a):
        self.simple(G.Div, node)

    def op_Relu(self, node, a):
        self.simple(G.Relu, node)

    def op_Sigmoid(self, node, a):
        self.simple(G.Sigmoid, node)

    def op_Clip(self, node, a):
        p = {}
        if self.opset < 11:
            p = {
                "min": float(a.get("min", -3.4e38)),
                "max": float(a.get("max", 3.4e38)),
            }
        self.simple(G.Clip, node, **p)

    def op_Softmax(self, node, a):
        legacy = self.opset < 13
        self.simple(
            G.Softmax, node, axis=int(a.get("axis", 1 if legacy else -1)), legacy=legacy
        )

    def op_Identity(self, node, a):
        self.simple(G.Identity, node)

    def op_Dropout(self, node, a):
        if len(node.output) > 1 and any(node.output[1:]):
            raise _err(node, "the mask output is not supported (inference only)")
        self.emit(G.Identity, node, [node.input[0]], list(node.output[:1]))

    def op_Flatten(self, node, a):
        self.simple(G.Flatten, node, axis=int(a.get("axis", 1)))

    def op_Reshape(self, node, a):
        self.simple(G.Reshape, node, allowzero=int(a.get("allowzero", 0)))

    def op_Transpose(self, node, a):
        self.simple(G.Transpose, node, perm=a.get("perm"))

    def op_Concat(self, node, a):
        self.simple(G.Concat, node, axis=int(a["axis"]))

    def _pool(self, node, a, extra=()):
        if int(a.get("storage_order", 0)):
            raise _err(node, "storage_order=1 is not supported")
        if len(node.output) > 1 and any(node.output[1:]):
            raise _err(node, "the Indices output is not supported")
        ks = list(a["kernel_shape"])
        if len(ks) not in (1, 2):
            raise _err(node, f"only 1-D and 2-D pooling is supported, got {ks}")
        p = {
            "kernel_shape": ks,
            "auto_pad": a.get("auto_pad", "NOTSET"),
            "ceil_mode": int(a.get("ceil_mode", 0)),
        }
        p.update({k: list(a[k]) for k in ("strides", "pads", "dilations") if k in a})
        p.update({k: int(a.get(k, 0)) for k in extra})
        return p

    def op_MaxPool(self, node, a):
        self.emit(
            G.MaxPool,
            node,
            [node.input[0]],
            list(node.output[:1]),
            **self._pool(node, a),
        )

    def op_AveragePool(self, node, a):
        self.emit(
            G.AveragePool,
            node,
            [node.input[0]],
            **self._pool(node, a, ("count_include_pad",)),
        )

    def op_GlobalAveragePool(self, node, a):
        self.simple(G.GlobalAveragePool, node)

    def op_Constant(self, node, a):
        from onnx import numpy_helper

        if "value" not in a:
            raise _err(node, "only Constant with a 'value' tensor is supported")
        self.consts[node.output[0]] = numpy_helper.to_array(a["value"])

    # ------------------------------------------------------------------ #
    # QOperator ops
    def _qparams(self, node, a):
        if a.get("block_size"):
            raise _err(node, "blocked quantization (block_size) is not supported")
        if "output_dtype" in a and a["output_dtype"]:
            raise _err(node, "output_dtype is not supported; give a zero point")
        return {"axis": int(a.get("axis", 1))}

    def op_QuantizeLinear(self, node, a):
        if a.get("saturate", 1) != 1:
            raise _err(node, "saturate=0 is not supported")
        self.simple(G.QuantizeLinear, node, **self._qparams(node, a))

    def op_DequantizeLinear(self, node, a):
        p = self._qparams(node, a)
        if all(t in self.consts for t in node.input if t):
            # constant weights: dequantize once at load
            ins = [self.consts[t] if t else None for t in node.input]
            self.consts[node.output[0]] = G.DequantizeLinear(
                node.name, [], [], **p
            ).run(*ins)
            return
        if self._qdq_transparent(node):
            return
        self.simple(G.DequantizeLinear, node, **p)

    _TRANSPARENT = {
        "MaxPool": G.MaxPool,
        "Flatten": G.Flatten,
        "Reshape": G.Reshape,
        "Transpose": G.Transpose,
        "Identity": G.Identity,
    }

    def _same_qparams(self, dq, q):
        ins = [list(dq.input[1:3]), list(q.input[1:3])]
        if any(len(i) < 2 or not all(t in self.consts for t in i) for i in ins):
            return False
        (s1, z1), (s2, z2) = ([self.consts[t] for t in i] for i in ins)
        return bool(
            s1.size == 1
            and s2.size == 1
            and s1.dtype == s2.dtype
            and z1.dtype == z2.dtype
            and s1.reshape(()) == s2.reshape(())
            and z1.reshape(()) == z2.reshape(())
        )

    def _qdq_transparent(self, dq):
        """DQ -> MaxPool/Flatten/Reshape/Transpose/Identity -> Q with the same
        scale and zero point: the op runs on the quantized tensor (exact)."""
        cons = self.consumers.get(dq.output[0], [])
        if len(cons) != 1 or not self.only_consumer(dq.output[0], cons[0]):
            return False
        op = cons[0]
        if op.op_type not in self._TRANSPARENT or op.input[0] != dq.output[0]:
            return False
        if len(op.output) > 1 and any(op.output[1:]):
            return False
        nxt = self.consumers.get(op.output[0], [])
        if len(nxt) != 1 or not self.only_consumer(op.output[0], nxt[0]):
            return False
        q = nxt[0]
        if q.op_type != "QuantizeLinear" or not self._same_qparams(dq, q):
            return False
        attrs = {k: _decode_attr(v) for k, v in _attrs(op).items()}
        if op.op_type == "MaxPool":
            params = self._pool(op, attrs)
        elif op.op_type == "Flatten":
            params = {"axis": int(attrs.get("axis", 1))}
        elif op.op_type == "Reshape":
            params = {"allowzero": int(attrs.get("allowzero", 0))}
        elif op.op_type == "Transpose":
            params = {"perm": attrs.get("perm")}
        else:
            params = {}
        ins = [dq.input[0], *op.input[1:]]
        self.emit(self._TRANSPARENT[op.op_type], op, ins, [q.output[0]], **params)
        self.done.update((id(op), id(q)))
        return True

    def op_DynamicQuantizeLinear(self, node, a):
        self.simple(G.DynamicQuantizeLinear, node)

    def op_QLinearConv(self, node, a):
        w = self.const(node, 3, "w")
        p = {
            "x_scale": self.const(node, 1, "x_scale"),
            "x_zero_point": self.const(node, 2, "x_zero_point"),
            "w": w,
            "w_scale": self.const(node, 4, "w_scale"),
            "w_zero_point": self.const(node, 5, "w_zero_point"),
            "y_scale": self.const(node, 6, "y_scale"),
            "y_zero_point": self.const(node, 7, "y_zero_point"),
            "bias": self.const(
                node, 8, "B", required=len(node.input) > 8 and bool(node.input[8])
            ),
        }
        self.emit(
            G.QLinearConv, node, [node.input[0]], **p, **self._conv_attrs(node, a, w)
        )

    def op_ConvInteger(self, node, a):
        w = self.const(node, 1, "w")
        wz = self.const(node, 3, "w_zero_point", required=False)
        ins = [node.input[0]] + ([node.input[2]] if len(node.input) > 2 else [])
        self.emit(
            G.ConvInteger,
            node,
            ins,
            w=w,
            w_zero_point=wz,
            **self._conv_attrs(node, a, w),
        )

    def op_QLinearMatMul(self, node, a):
        c = [self.const(node, i, required=False) for i in range(8)]
        if (
            all(x is not None for x in c[1:])
            and c[3].ndim == 2
            and c[1].size == 1
            and c[2].size == 1
            and c[6].size == 1
        ):
            self.emit(
                G.QGemm,
                node,
                [node.input[0]],
                x_scale=c[1],
                x_zero_point=c[2],
                w=c[3],
                w_scale=c[4],
                w_zero_point=c[5],
                y_scale=c[6],
                y_zero_point=c[7],
                matmul=True,  # A may have batch dimensions (exported as MatMul)
            )
        else:
            self.simple(G.QLinearMatMul, node)

    def op_MatMulInteger(self, node, a):
        b = self.const(node, 1, required=False)
        if b is not None and b.ndim == 2:
            zb = self.const(node, 3, required=False)
            ins = [node.input[0]] + ([node.input[2]] if len(node.input) > 2 else [])
            self.emit(G.MatMulInteger, node, ins, w=b, w_zero_point=zb)
        else:
            self.simple(G.MatMulInteger, node)

    # ------------------------------------------------------------------ #
    # QDQ fusion
    def _qdq_compute(self, node, a):
        """DQ(x) -> Conv/Gemm/MatMul(DQ(const w)) [-> Relu] [-> Q]: one node."""
        x_dq = self.producer.get(node.input[0])
        w_dq = self.producer.get(node.input[1])
        if (
            x_dq is None
            or w_dq is None
            or x_dq.op_type != "DequantizeLinear"
            or w_dq.op_type != "DequantizeLinear"
        ):
            return False
        xin = x_dq.input
        if not all(t in self.consts for t in xin[1:] if t) or not all(
            t in self.consts for t in w_dq.input if t
        ):
            return False
        xs = self.consts[xin[1]]
        xz = self.consts[xin[2]] if len(xin) > 2 and xin[2] else None
        if xs.size != 1 or (xz is not None and xz.size != 1):
            return False
        wq = self.consts[w_dq.input[0]]
        if wq.dtype not in (np.int8, np.uint8):
            return False
        ws = self.consts[w_dq.input[1]]
        wz = (
            self.consts[w_dq.input[2]]
            if len(w_dq.input) > 2 and w_dq.input[2]
            else None
        )
        axis = int(_attrs(w_dq).get("axis", 1))
        conv = node.op_type == "Conv"
        if conv:
            if ws.size > 1 and axis != 0:
                return False
            geo = self._conv_attrs(node, a, wq)
            N = wq.shape[0]
        else:
            if wq.ndim != 2:
                return False
            trans = node.op_type == "Gemm" and a.get("transB", 0)
            if ws.size > 1 and axis != (0 if trans else 1):
                return False
            if node.op_type == "Gemm" and (
                a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0
            ):
                return False
            wq = np.ascontiguousarray(wq.T) if trans else wq
            # MatMul: A may have batch dimensions (exported as MatMul)
            geo = {"matmul": True} if node.op_type == "MatMul" else {}
            N = wq.shape[1]
        if xz is None:  # x's type is unknown at load: leave it unfused
            return False
        wz = np.zeros(ws.shape, wq.dtype) if wz is None else wz
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bname = node.input[2]
            b_dq = self.producer.get(bname)
            acc = xs.astype(np.float64).reshape(()) * ws.astype(np.float64).reshape(-1)
            if (
                b_dq is not None
                and b_dq.op_type == "DequantizeLinear"
                and all(t in self.consts for t in b_dq.input if t)
            ):
                breal = G.DequantizeLinear(
                    "b", [], [], axis=int(_attrs(b_dq).get("axis", 1))
                ).run(*[self.consts[t] if t else None for t in b_dq.input])
            elif bname in self.consts:
                breal = self.consts[bname]
            else:
                return False
            breal = np.broadcast_to(np.asarray(breal, np.float64).reshape(-1), (N,))
            bias = np.clip(np.rint(breal / acc), -(2**31), 2**31 - 1).astype(np.int32)
        # activation and output quantization after the op
        out, act = node.output[0], None
        nxt = self.consumers.get(out, [])
        if (
            self.only_consumer(out, nxt[0] if nxt else None)
            and nxt[0].op_type == "Relu"
        ):
            act_node = nxt[0]
            out, act = act_node.output[0], "relu"
        else:
            act_node = None
        q = self.consumers.get(out, [])
        params = {
            "w": wq,
            "w_scale": ws.reshape(-1) if ws.size > 1 else ws.reshape(()),
            "w_zero_point": wz.reshape(-1) if wz.size > 1 else wz.reshape(()),
            "x_scale": xs.reshape(()),
            "x_zero_point": xz.reshape(()),
            "bias": bias,
            "activation": act,
            **geo,
        }
        q_node = q[0] if self.only_consumer(out, q[0] if q else None) else None
        if (
            q_node is not None
            and q_node.op_type == "QuantizeLinear"
            and all(t in self.consts for t in q_node.input[1:] if t)
            and self.consts[q_node.input[1]].size == 1
            and len(q_node.input) > 2
            and q_node.input[2]
        ):
            params["y_scale"] = self.consts[q_node.input[1]].reshape(())
            params["y_zero_point"] = self.consts[q_node.input[2]].reshape(())
            out = q_node.output[0]
            self.done.add(id(q_node))
        if act_node is not None:
            self.done.add(id(act_node))
        cls = G.QLinearConv if conv else G.QGemm
        self.emit(cls, node, [xin[0]], [out], **params)
        return True
