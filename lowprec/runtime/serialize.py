"""Save / load a (transformed) graph without pickle, and export it to ONNX.

File format (``.lpz``): an ``np.savez`` archive of two uint8 arrays, read back
with ``allow_pickle=False``: ``graph.json`` describes the graph (inputs,
outputs, constants, metadata and, per node, its op, name, tensor names, JSON
parameters and its arrays' descriptors: dtype, shape, encoding, offsets) and
``tensors.bin`` holds every array, 8-byte aligned. Arrays are stored

* ``dense``: as they are;
* ``bitmask`` (at least 40 % zeros): ``np.packbits`` of the nonzero mask and
  the nonzero values (unstructured pruning: 1 bit per weight + the kept ones;
  at 50 % that is 62.5 % of the dense int8 bytes before entropy coding);
* ``nm24`` (Conv/Gemm weights with at most 2 nonzeros in every 4 along the
  GEMM's K axis): 2 values per group of 4 and the position pair (one of 6)
  of 3 groups packed base-6 into one byte: 50 % + 1/12 byte per weight.

The parts of the two sparse encodings are deflated (zlib) when that saves at
least 5 %: they are decoded at load anyway. Kept int8 weights carry ~7 bits of
entropy (measured on the demo's MNIST CNN: 7.0-7.2 bits per kept value), so the
50 % unstructured int8 model shrinks from 63.9 % to 59.3 % of the dense int8
file; a 50 % random mask itself does not compress. Dense arrays stay raw.

Loading validates every field; an unknown op, dtype or shape is an error that
names the node. Node arrays are rebuilt into the same node classes (weights are
packed again at load).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
import zlib

import numpy as np

from . import graph as G

FORMAT = "lowprec.runtime/1"
# deflate the archive (np.savez_compressed): about 10 % smaller int8 files,
# slower to save and load; off by default
COMPRESS = False
_DTYPES = {
    "float32",
    "float16",
    "float64",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "bool",
}
_PAIRS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def _gemm_matrix(op_type, w):
    """(view (rows, K), shape to restore, transpose flag) for N:M detection."""
    if op_type in ("Conv", "QLinearConv", "HalfConv") and w.ndim in (3, 4):
        w4 = w if w.ndim == 4 else w[:, :, None, :]
        return w4.transpose(0, 2, 3, 1).reshape(w.shape[0], -1), w4.shape
    if op_type in ("Gemm", "QGemm", "HalfGemm") and w.ndim == 2:
        return w.T, None
    return None, None


def _from_gemm(op_type, mat, w4shape, shape):
    if w4shape is not None:
        M, C, kh, kw = w4shape
        return mat.reshape(M, kh, kw, C).transpose(0, 3, 1, 2).reshape(shape)
    return mat.T.reshape(shape)


class _Blob:
    """All arrays of a file in one byte buffer (8-byte aligned parts): one
    archive entry instead of one per array (each .npy entry costs ~230 bytes
    of headers, 10 KB over a 44-array model)."""

    def __init__(self, data=None):
        self.parts, self.size, self.data = [], 0, data

    def add(self, a, deflate=False) -> dict:
        """Append ``a``; ``deflate``: store it zlib-compressed when that saves
        at least 5 % (the sparse encodings' parts: they are decoded at load
        anyway, while dense arrays stay raw)."""
        a = np.asarray(a)  # tobytes() is C order; ascontiguousarray would make 0-d 1-d
        pad = (-self.size) % 8
        if pad:
            self.parts.append(b"\0" * pad)
            self.size += pad
        desc = {"offset": self.size, "dtype": str(a.dtype), "shape": list(a.shape)}
        raw = a.tobytes()
        if deflate:
            packed = zlib.compress(raw, 9)
            if len(packed) <= 0.95 * len(raw):
                raw = packed
                desc["deflated"] = len(packed)
        self.parts.append(raw)
        self.size += len(raw)
        return desc

    def get(self, d) -> np.ndarray:
        dtype = str(d["dtype"])
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r}")
        shape = tuple(int(x) for x in d["shape"])
        off, n = int(d["offset"]), int(np.prod(shape))
        dt = np.dtype(dtype)
        size = int(d.get("deflated", n * dt.itemsize))
        if off < 0 or size < 0 or off + size > self.data.size:
            raise ValueError("points outside the tensor data")
        if "deflated" not in d:
            a = np.frombuffer(self.data, dt, count=n, offset=off)
            return a.reshape(shape).copy()
        # bounded inflate: a corrupt or hostile part cannot expand past its array
        z = zlib.decompressobj()
        try:
            raw = z.decompress(self.data[off : off + size].tobytes(), n * dt.itemsize)
        except zlib.error as e:
            raise ValueError(f"a compressed part is corrupt ({e})") from None
        if len(raw) != n * dt.itemsize or z.unconsumed_tail or not z.eof:
            raise ValueError("a compressed part does not inflate to its array")
        return np.frombuffer(raw, dt).reshape(shape).copy()

    def bytes(self) -> np.ndarray:
        return np.frombuffer(b"".join(self.parts), np.uint8)


def _encode(a, op_type, blob):
    """Store array ``a``; returns its JSON descriptor."""
    a = np.asarray(a)
    desc = {"dtype": str(a.dtype), "shape": list(a.shape)}
    zero = np.zeros((), a.dtype)
    nz = a != zero
    if a.size >= 64 and a.ndim >= 2 and nz.mean() <= 0.6:
        mat, w4 = _gemm_matrix(op_type, a)
        if mat is not None and mat.shape[1] % 4 == 0:
            m = (mat != zero).reshape(mat.shape[0], -1, 4)
            if m.sum(axis=2).max() <= 2:
                g = mat.reshape(mat.shape[0], -1, 4)
                # the two kept positions (pad with free slots when fewer)
                order = np.argsort(~m, axis=2, kind="stable")[:, :, :2]
                order.sort(axis=2)
                code = np.zeros(order.shape[:2], np.uint8)
                for c, (i, j) in enumerate(_PAIRS):
                    code[(order[..., 0] == i) & (order[..., 1] == j)] = c
                vals = np.take_along_axis(g, order, axis=2)
                flat = code.ravel()
                pad = (-flat.size) % 3
                flat = np.concatenate([flat, np.zeros(pad, np.uint8)]).reshape(-1, 3)
                packed = (flat[:, 0] + 6 * flat[:, 1] + 36 * flat[:, 2]).astype(
                    np.uint8
                )
                desc.update(
                    encoding="nm24",
                    groups=int(code.size),
                    matrix=list(mat.shape),
                    values=blob.add(vals, deflate=True),
                    codes=blob.add(packed, deflate=True),
                )
                return desc
        desc.update(
            encoding="bitmask",
            mask=blob.add(np.packbits(nz.ravel()), deflate=True),
            values=blob.add(a[nz], deflate=True),
        )
        return desc
    desc.update(encoding="dense", data=blob.add(a))
    return desc


def _decode(desc, blob, op_type, where):
    try:
        dtype = desc["dtype"]
        shape = tuple(int(s) for s in desc["shape"])
        enc = desc["encoding"]
    except (KeyError, TypeError, ValueError):
        msg = f"{where}: malformed tensor descriptor {desc!r}"
        raise ValueError(msg) from None
    if dtype not in _DTYPES or any(s < 0 for s in shape):
        msg = f"{where}: unsupported tensor dtype/shape {dtype} {shape}"
        raise ValueError(msg)
    n = int(np.prod(shape))
    try:
        if enc == "dense":
            a = blob.get(desc["data"])
        elif enc == "bitmask":
            mask = np.unpackbits(blob.get(desc["mask"]), count=n).astype(bool)
            a = np.zeros(n, dtype)
            a[mask] = blob.get(desc["values"])
            a = a.reshape(shape)
        elif enc == "nm24":
            rows, K = (int(s) for s in desc["matrix"])
            groups = int(desc["groups"])
            b = blob.get(desc["codes"]).astype(np.int64)
            codes = np.stack([b % 6, (b // 6) % 6, b // 36], axis=1).ravel()[:groups]
            if codes.max(initial=0) > 5 or groups != rows * (K // 4):
                raise ValueError("bad codes")
            pos = np.array(_PAIRS)[codes].reshape(rows, K // 4, 2)
            g = np.zeros((rows, K // 4, 4), dtype)
            vals = blob.get(desc["values"]).reshape(rows, K // 4, 2)
            np.put_along_axis(g, pos, vals, axis=2)
            _, w4 = _gemm_matrix(op_type, np.empty(shape, dtype))
            a = _from_gemm(op_type, g.reshape(rows, K), w4, shape)
        else:
            raise ValueError(f"unknown encoding {enc!r}")
    except (KeyError, ValueError, IndexError, TypeError) as e:
        msg = f"{where}: tensor data is missing or corrupt ({e})"
        raise ValueError(msg) from None
    if a.dtype != np.dtype(dtype) or a.shape != shape:
        msg = f"{where}: tensor is {a.dtype}{a.shape}, expected {dtype}{shape}"
        raise ValueError(msg)
    return np.ascontiguousarray(a)


def _json_value(v):
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, tuple | list):
        return [_json_value(x) for x in v]
    if isinstance(v, float) and not np.isfinite(v):
        return {"float": repr(v)}
    return v


def _from_json(v):
    if isinstance(v, dict):
        if set(v) == {"float"}:
            return float(v["float"])
        return {k: _from_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    return v


def save(model, path) -> None:
    """Write ``model`` to ``path`` (a path or a binary file object)."""
    blob = _Blob()
    nodes = []
    for node in model.nodes:
        params, tensors = {}, {}
        for k, val in node.params.items():
            if isinstance(val, np.ndarray | np.generic):
                tensors[k] = _encode(val, node.op_type, blob)
            else:
                params[k] = _json_value(val)
        nodes.append(
            {
                "op_type": node.op_type,
                "name": node.name,
                "inputs": node.inputs,
                "outputs": node.outputs,
                "params": params,
                "tensors": tensors,
            }
        )
    consts = {name: _encode(a, "", blob) for name, a in model.constants.items()}
    doc = {
        "format": FORMAT,
        "inputs": [
            [n, None if s is None else list(s), str(d)] for n, s, d in model.inputs
        ],
        "outputs": model.outputs,
        "constants": consts,
        "meta": _json_value(model.meta),
        "nodes": nodes,
    }
    text = json.dumps(doc, separators=(",", ":"))
    arrays = {
        "graph.json": np.frombuffer(text.encode(), np.uint8),
        "tensors.bin": blob.bytes(),
    }
    write = np.savez_compressed if COMPRESS else np.savez
    if hasattr(path, "write"):
        write(path, **arrays)
        return
    with open(os.fspath(path), "wb") as f:
        write(f, **arrays)


def load(path):
    """Read a graph written by :func:`save` (never unpickles anything)."""
    path = path if hasattr(path, "read") else os.fspath(path)
    try:
        npz = np.load(path, allow_pickle=False)
        doc = json.loads(bytes(npz["graph.json"]).decode())
        blob = _Blob(npz["tensors.bin"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        msg = f"{path} is not a lowprec.runtime model file ({e})"
        raise ValueError(msg) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else doc
        msg = f"{path}: unknown format {got!r} (expected {FORMAT!r})"
        raise ValueError(msg)
    try:
        consts = {
            n: _decode(d, blob, "", f"{path}: constant {n!r}")
            for n, d in doc["constants"].items()
        }
        inputs = []
        for n, s, d in doc["inputs"]:
            if d not in _DTYPES:
                raise ValueError(f"input {n!r} dtype {d!r}")
            inputs.append((n, s, d))
        nodes = []
        for nd in doc["nodes"]:
            op, name = nd["op_type"], nd["name"]
            cls = G.NODE_TYPES.get(op)
            where = f"{path}: node {name!r} (op {op})"
            if cls is None:
                raise ValueError(f"node {name!r}: unknown op {op!r}")
            params = {k: _from_json(val) for k, val in nd["params"].items()}
            for k, d in nd["tensors"].items():
                params[k] = _decode(d, blob, op, where)
            try:
                nodes.append(cls(name, nd["inputs"], nd["outputs"], **params))
            except (TypeError, ValueError, KeyError) as e:
                raise ValueError(f"{where}: {e}") from None
        return G.Graph(nodes, inputs, doc["outputs"], consts, _from_json(doc["meta"]))
    except (KeyError, TypeError) as e:
        msg = f"{path}: malformed graph description ({e!r})"
        raise ValueError(msg) from None


# --------------------------------------------------------------------------- #
# ONNX export (QDQ for quantized nodes)


def export_onnx(model, path=None, *, opset=17):
    """Write ``model`` as ONNX: float nodes as themselves, quantized nodes as
    QDQ (DequantizeLinear -> Conv/Gemm -> [Relu/Clip] -> QuantizeLinear, int8
    per-channel weights and int32 bias as initializers) that ONNX Runtime fuses
    back into QLinearConv / QGemm; fp16 nodes as float Conv/Gemm on the fp16
    weights widened to float32. Returns the ``onnx.ModelProto``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, used = [], [], set()

    def init(name, arr):
        if name not in used:
            inits.append(numpy_helper.from_array(np.asarray(arr), name))
            used.add(name)
        return name

    def gemm_node(name, ins, dst, p):
        # Gemm, or MatMul (+ Add of the bias) for a node loaded from MatMul:
        # its A may have batch dimensions, which ONNX Gemm rejects
        if not p.get("matmul"):
            nodes.append(helper.make_node("Gemm", ins, [dst], name=name))
            return
        mm = dst if len(ins) == 2 else name + "_mm"
        nodes.append(helper.make_node("MatMul", ins[:2], [mm], name=name))
        if len(ins) > 2:
            nodes.append(helper.make_node("Add", [mm, ins[2]], [dst], name=name + "_b"))

    def act_nodes(name, src, dst, activation):
        if activation is None:
            return src
        if activation == "relu":
            nodes.append(helper.make_node("Relu", [src], [dst], name=name + "_relu"))
            return dst
        lo, hi = (0.0, 6.0) if activation == "relu6" else activation
        nodes.append(
            helper.make_node(
                "Clip",
                [
                    src,
                    init(name + "_min", np.float32(lo)),
                    init(name + "_max", np.float32(hi)),
                ],
                [dst],
                name=name + "_clip",
            )
        )
        return dst

    def conv_attrs(p):
        a = {}
        for k in ("strides", "pads", "dilations"):
            if p.get(k) is not None:
                a[k] = [int(x) for x in p[k]]
        if p.get("auto_pad", "NOTSET") != "NOTSET":
            a["auto_pad"] = p["auto_pad"]
        if int(p.get("group", 1)) != 1:
            a["group"] = int(p["group"])
        return a

    def pool_node(name, src, dst, pool):
        a = {
            k: ([int(x) for x in val] if isinstance(val, list | tuple) else val)
            for k, val in pool.items()
        }
        nodes.append(
            helper.make_node("MaxPool", [src], [dst], name=name + "_pool", **a)
        )

    prefixes = set()
    for n in model.nodes:
        # node names prefix their initializers: a repeated name (a hand-built
        # Graph) would hand one node's weights to the other through init()
        nm, k = n.name, 1
        while nm in prefixes:
            nm, k = f"{n.name}_{k}", k + 1
        prefixes.add(nm)
        p = n.params
        op = n.op_type
        if op in ("Conv", "HalfConv", "Gemm", "HalfGemm"):
            w = np.asarray(p["w"], np.float32)
            ins = [n.inputs[0], init(nm + "_w", w)]
            if p.get("b") is not None:
                ins.append(init(nm + "_b", np.asarray(p["b"], np.float32)))
            pool = p.get("pool")
            y = n.outputs[0]
            core = nm + "_core" if p.get("activation") or pool else y
            if op in ("Conv", "HalfConv"):
                nodes.append(
                    helper.make_node("Conv", ins, [core], name=nm, **conv_attrs(p))
                )
            else:
                gemm_node(nm, ins, core, p)
            t = act_nodes(nm, core, nm + "_act" if pool else y, p.get("activation"))
            if pool:
                pool_node(nm, t, y, pool)
        elif op in ("QLinearConv", "QGemm"):
            conv = op == "QLinearConv"
            axis = 0 if conv else 1
            xs, xz = np.float32(p["x_scale"]), np.asarray(p["x_zero_point"])
            ws = np.asarray(p["w_scale"], np.float32)
            wz = (
                np.asarray(p["w_zero_point"])
                if p.get("w_zero_point") is not None
                else np.zeros(ws.shape, p["w"].dtype)
            )
            xf = nm + "_x_dq"
            nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [
                        n.inputs[0],
                        init(nm + "_xs", xs),
                        init(nm + "_xz", xz.reshape(())),
                    ],
                    [xf],
                    name=nm + "_x_dq",
                )
            )
            wkw = {"axis": axis} if ws.size > 1 else {}
            nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [
                        init(nm + "_wq", p["w"]),
                        init(
                            nm + "_ws",
                            ws.reshape(-1) if ws.size > 1 else ws.reshape(()),
                        ),
                        init(
                            nm + "_wz",
                            wz.reshape(-1) if ws.size > 1 else wz.reshape(()),
                        ),
                    ],
                    [nm + "_w_dq"],
                    name=nm + "_w_dq",
                    **wkw,
                )
            )
            ins = [xf, nm + "_w_dq"]
            if p.get("bias") is not None:
                bs = (xs * ws).astype(np.float32)
                nodes.append(
                    helper.make_node(
                        "DequantizeLinear",
                        [
                            init(nm + "_bq", np.asarray(p["bias"], np.int32)),
                            init(
                                nm + "_bs",
                                bs.reshape(-1) if bs.size > 1 else bs.reshape(()),
                            ),
                            init(
                                nm + "_bz",
                                np.zeros(bs.shape, np.int32).reshape(-1)
                                if bs.size > 1
                                else np.int32(0),
                            ),
                        ],
                        [nm + "_b_dq"],
                        name=nm + "_b_dq",
                        **({"axis": 0} if bs.size > 1 else {}),
                    )
                )
                ins.append(nm + "_b_dq")
            core = nm + "_core"
            if conv:
                nodes.append(
                    helper.make_node("Conv", ins, [core], name=nm, **conv_attrs(p))
                )
            else:
                gemm_node(nm, ins, core, p)
            y = n.outputs[0]
            pool = p.get("pool")
            float_out = p.get("y_scale") is None
            t = act_nodes(nm, core, nm + "_act", p.get("activation"))
            if float_out:
                if pool:
                    pool_node(nm, t, y, pool)
                else:
                    nodes.append(
                        helper.make_node("Identity", [t], [y], name=nm + "_out")
                    )
            else:
                q = nm + "_q" if pool else y
                nodes.append(
                    helper.make_node(
                        "QuantizeLinear",
                        [
                            t,
                            init(nm + "_ys", np.float32(p["y_scale"])),
                            init(nm + "_yz", np.asarray(p["y_zero_point"]).reshape(())),
                        ],
                        [q],
                        name=nm + "_y_q",
                    )
                )
                if pool:
                    pool_node(nm, q, y, pool)
        elif op in (
            "QuantizeLinear",
            "DequantizeLinear",
            "MaxPool",
            "AveragePool",
            "GlobalAveragePool",
            "Flatten",
            "Reshape",
            "Transpose",
            "Concat",
            "Softmax",
            "Relu",
            "Clip",
            "Sigmoid",
            "Add",
            "Sub",
            "Mul",
            "Div",
            "MatMul",
            "Identity",
            "MatMulInteger",
            "QLinearMatMul",
            "DynamicQuantizeLinear",
        ):
            attrs = {
                k: ([int(x) for x in val] if isinstance(val, list | tuple) else val)
                for k, val in p.items()
                if not isinstance(val, np.ndarray)
                and val is not None
                and not (op == "Clip" and k in ("min", "max"))
            }
            for t in n.inputs:
                if t in model.constants:
                    init(t, model.constants[t])
            ins = list(n.inputs)
            if (
                op == "Clip"
                and len(ins) == 1
                and (p.get("min") is not None or p.get("max") is not None)
            ):
                # opset < 11 bounds (attributes): inputs from opset 11 on
                ins += [
                    init(f"{nm}_{k}", np.float32(p[k])) if p.get(k) is not None else ""
                    for k in ("min", "max")
                ]
            if op == "Softmax" and attrs.pop("legacy", False):
                # opset < 13: softmax over all axes from `axis` on, as one
                # flattened axis, then the input's shape again
                shp, flat, sm = nm + "_shape", nm + "_flat", nm + "_sm"
                nodes.append(helper.make_node("Shape", ins[:1], [shp], name=shp))
                nodes.append(
                    helper.make_node(
                        "Flatten",
                        ins[:1],
                        [flat],
                        name=flat,
                        axis=int(attrs.get("axis", 1)),
                    )  # fmt: skip
                )
                nodes.append(helper.make_node("Softmax", [flat], [sm], name=nm, axis=1))
                nodes.append(
                    helper.make_node("Reshape", [sm, shp], n.outputs, name=nm + "_r")
                )
                continue
            nodes.append(helper.make_node(op, ins, n.outputs, name=nm, **attrs))
        else:
            msg = f"node {nm!r} (op {op}) has no ONNX export"
            raise NotImplementedError(msg)

    elem = {
        np.dtype(np.float32): TensorProto.FLOAT,
        np.dtype(np.uint8): TensorProto.UINT8,
        np.dtype(np.int8): TensorProto.INT8,
        np.dtype(np.float16): TensorProto.FLOAT16,
    }
    g_in = [
        helper.make_tensor_value_info(
            nm,
            elem[np.dtype(d)],
            None if s is None else ["N" if x is None else x for x in s],
        )
        for nm, s, d in model.inputs
    ]
    graph = helper.make_graph(nodes, "lowprec", g_in, [], inits)
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="lowprec.runtime",
    )
    m.ir_version = 8
    # output types and shapes from ONNX shape inference
    inferred = {
        vi.name: vi for vi in onnx.shape_inference.infer_shapes(m).graph.value_info
    }
    for t in model.outputs:
        vi = inferred.get(t) or helper.make_tensor_value_info(t, TensorProto.FLOAT, [])
        m.graph.output.append(vi)
    onnx.checker.check_model(m)
    if path is not None:
        with open(os.fspath(path), "wb") as f:
            f.write(m.SerializeToString())
    return m


def _bytes(model) -> bytes:  # for tests: an in-memory saved model
    buf = io.BytesIO()
    save(model, buf)
    return buf.getvalue()
