"""A small graph runtime: plain classes, each node calling public lowprec ops.

A :class:`Graph` is a list of :class:`Node` objects in execution order, named
input and output tensors, and constant tensors (ONNX initializers that no node
folded in). Tensors are NCHW as in ONNX. Every node's ``params`` are NumPy
arrays and JSON values only, so a graph saves without pickle
(``lowprec.runtime.serialize``); weights are prepacked once, when the node is
built, for every call after.

Nodes that do the arithmetic:

* float: ``Conv`` (im2col + NumPy matmul), ``Gemm`` (``x @ w + b``), with an
  optional fused activation (``"relu"``, ``"relu6"`` or a ``(min, max)`` clamp);
* INT8: ``QLinearConv`` / ``ConvInteger`` (``lowprec.conv`` when it imports,
  else im2col + ``lowprec.qlinear_matmul`` / ``matmul_integer``, the same
  numerics), ``QGemm`` (``lowprec.qlinear_matmul`` on prepacked weights, fused
  bias and activation, uint8/int8 or float32 output), ``QLinearMatMul``,
  ``MatMulInteger``, ``QuantizeLinear``, ``DequantizeLinear``,
  ``DynamicQuantizeLinear``;
* fp16: ``HalfConv`` (``lowprec.conv_fp16``) / ``HalfGemm``
  (``lowprec.half.matmul_fp16``): fp16 inputs, fp32 accumulation, fp32 output
  (fp16 where every consumer rounds to fp16 anyway);
* the rest in NumPy float32 (``MaxPool`` also on uint8/int8: max commutes with
  a monotonic quantization, so it is exact on quantized tensors).
"""

from __future__ import annotations

import math

import numba
import numpy as np

import lowprec

from .. import _validate as v

try:  # optional kernels, written beside this package; fall back when absent
    from .. import conv as _lp_conv
except Exception:  # noqa: BLE001 (any import failure means: use the fallback)
    _lp_conv = None
try:
    from .. import half as _lp_half
except Exception:  # noqa: BLE001
    _lp_half = None
try:
    from .. import conv_half as _lp_conv_half
except Exception:  # noqa: BLE001
    _lp_conv_half = None

# Which INT8 convolution the QLinearConv/ConvInteger nodes use: "auto" (the
# lowprec.conv kernels when they import), "conv" or "im2col" (the fallback).
CONV_BACKEND = "auto"


class RuntimeGraphError(ValueError):
    """A model that cannot be built or run: names the node and its op."""


# --------------------------------------------------------------------------- #
# helpers


def _act(y, activation):
    """Apply a fused activation to a float array in place."""
    if activation is None:
        return y
    lo, hi = v.activation_bounds(_hashable(activation))
    if hi == np.inf:
        np.maximum(y, np.float32(lo), out=y)
    else:
        np.clip(y, np.float32(lo), np.float32(hi), out=y)
    return y


def _hashable(activation):
    return tuple(activation) if isinstance(activation, list) else activation


def _conv_geometry(spatial, kernel, strides, pads, dilations, auto_pad):
    """Output size and (begin, end) pads per spatial axis (ONNX Conv/Pool)."""
    n = len(spatial)
    strides = list(strides or [1] * n)
    dilations = list(dilations or [1] * n)
    pads = list(pads or [0] * (2 * n))
    out, begins, ends = [], [], []
    for i in range(n):
        k = (kernel[i] - 1) * dilations[i] + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            o = -(-spatial[i] // strides[i])
            total = max(0, (o - 1) * strides[i] + k - spatial[i])
            small = total // 2
            b = small if auto_pad == "SAME_UPPER" else total - small
            begins.append(b)
            ends.append(total - b)
        elif auto_pad == "VALID":
            begins.append(0)
            ends.append(0)
        else:
            begins.append(pads[i])
            ends.append(pads[i + n])
        o = (spatial[i] + begins[i] + ends[i] - k) // strides[i] + 1
        if o < 1:
            msg = (
                f"kernel {kernel} (dilations {dilations}) does not fit the padded "
                f"input {tuple(spatial)}"
            )
            raise ValueError(msg)
        out.append(o)
    return out, begins, ends, strides, dilations


def _as_2d_spatial(x):
    """(N, C, W) -> (N, C, 1, W); 4-D unchanged."""
    if x.ndim == 3:
        return x[:, :, None, :]
    if x.ndim != 4:
        msg = f"expected a 3-D or 4-D NCHW tensor, got shape {x.shape}"
        raise ValueError(msg)
    return x


def im2col_nhwc(x4, kernel, strides, dilations, begins, ends, fill, nhwc=False):
    """(N, C, H, W) (or (N, H, W, C) with ``nhwc``) -> patches
    (N*OH*OW, kh*kw*C) in (kh, kw, c) order.

    Padding is ``fill`` (the input zero point for quantized tensors: a real 0).
    """
    if nhwc:
        N, H, W, C = x4.shape
    else:
        N, C, H, W = x4.shape
    kh, kw = kernel
    (pt, pl), (pb, pr) = begins, ends
    xp = np.full((N, H + pt + pb, W + pl + pr, C), fill, x4.dtype)
    xp[:, pt : pt + H, pl : pl + W, :] = x4 if nhwc else x4.transpose(0, 2, 3, 1)
    sh, sw = strides
    dh, dw = dilations
    oh = (H + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (W + pl + pr - (kw - 1) * dw - 1) // sw + 1
    if C < 8:
        # few channels: one slice copy per kernel tap (a strided 6-D copy with
        # a 1-element inner run was 12x slower for the 1-channel MNIST stem)
        out = np.empty((N, oh, ow, kh, kw, C), x4.dtype)
        for i in range(kh):
            for j in range(kw):
                out[:, :, :, i, j, :] = xp[
                    :,
                    i * dh : i * dh + (oh - 1) * sh + 1 : sh,
                    j * dw : j * dw + (ow - 1) * sw + 1 : sw,
                ]
        return out.reshape(N * oh * ow, kh * kw * C), (N, oh, ow)
    s = xp.strides
    view = np.lib.stride_tricks.as_strided(
        xp,
        (N, oh, ow, kh, kw, C),
        (s[0], s[1] * sh, s[2] * sw, s[1] * dh, s[2] * dw, s[3]),
        writeable=False,
    )
    return view.reshape(N * oh * ow, kh * kw * C), (N, oh, ow)


def _w_gemm(w, group):
    """(M, C/g, kh, kw) -> per group (kh*kw*C/g, M/g) matrices."""
    M = w.shape[0]
    w4 = w if w.ndim == 4 else w[:, :, None, :]
    mg = M // group
    return [
        np.ascontiguousarray(
            w4[g * mg : (g + 1) * mg].transpose(2, 3, 1, 0).reshape(-1, mg)
        )
        for g in range(group)
    ]


def _conv_via_gemm(x, w_shape, group, attrs, fill, gemm):
    """Convolution as im2col + ``gemm(g, patches) -> (rows, M/g)``; NCHW out
    (NHWC in / out where ``attrs`` says ``nhwc_in`` / ``nhwc_out``)."""
    nhwc = bool(attrs.get("nhwc_in")) and x.ndim == 4
    x4 = x if nhwc else _as_2d_spatial(x)
    c_in = x4.shape[3] if nhwc else x4.shape[1]
    cg = w_shape[1]
    kernel = tuple(w_shape[2:]) if len(w_shape) == 4 else (1, w_shape[2])
    if c_in != cg * group:
        msg = (
            f"input has {c_in} channels, the weights expect "
            f"{cg * group} (C/group={cg}, group={group})"
        )
        raise ValueError(msg)
    out, begins, ends, strides, dil = _conv_geometry(
        x4.shape[1:3] if nhwc else x4.shape[2:],
        kernel,
        _spatial2(attrs.get("strides"), x.ndim),
        _pads2(attrs.get("pads"), x.ndim),
        _spatial2(attrs.get("dilations"), x.ndim),
        attrs.get("auto_pad", "NOTSET"),
    )
    ys = []
    for g in range(group):
        sl = slice(g * cg, (g + 1) * cg)
        xg = x4 if group == 1 else (x4[..., sl] if nhwc else x4[:, sl])
        cols, (N, oh, ow) = im2col_nhwc(
            xg, kernel, strides, dil, begins, ends, fill, nhwc=nhwc
        )
        y = gemm(g, cols)
        ys.append(y.reshape(N, oh, ow, y.shape[-1]))  # (no -1: N may be 0)
    y = ys[0] if group == 1 else np.concatenate(ys, axis=3)
    return _nhwc_out(y, attrs.get("pool"), x.ndim, bool(attrs.get("nhwc_out")))


def _maxpool_nchw(y, pool):
    return y if not pool else MaxPool("pool", ["x"], ["y"], **pool).run(y)


def _nhwc_out(y, pool, ndim, keep_nhwc=False):
    """NHWC conv result -> fused max pool (if any) -> NCHW (3-D for 1-D convs),
    or NHWC when the next node is a convolution that reads NHWC."""
    if pool:
        y = _maxpool_nhwc(y, pool, ndim)
    if keep_nhwc and ndim == 4:
        return np.ascontiguousarray(y)
    y = np.ascontiguousarray(y.transpose(0, 3, 1, 2))
    return y[:, :, 0, :] if ndim == 3 else y


def _plain_2x2(pool):
    """Whether a fused max pool is the 2x2 stride-2 one without pads."""
    plain = (
        not any(pool.get("pads") or [])
        and pool.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
        and not pool.get("ceil_mode", 0)
        and all(d == 1 for d in pool.get("dilations") or [1])
    )
    k, st = list(pool["kernel_shape"]), list(pool.get("strides") or [])
    return plain and k == st == [2, 2]


def _maxpool_nhwc(y, pool, ndim):
    """Max pool of an NHWC tensor; 2x2 stride 2 by pairwise maxima of whole
    rows and of channel blocks (contiguous reads), other pools through the
    NCHW MaxPool node. Exact on quantized tensors (max is monotonic)."""
    if ndim == 4 and _plain_2x2(pool):
        from ..kernels import layout

        N, H, W, C = y.shape
        out = np.empty((N, H // 2, W // 2, C), y.dtype)
        layout.maxpool2x2_nhwc(np.ascontiguousarray(y), out)
        return out
    x = y.transpose(0, 3, 1, 2)
    x = x[:, :, 0, :] if ndim == 3 else x
    out = MaxPool("pool", ["x"], ["y"], **pool).run(x)
    out = out[:, :, None, :] if ndim == 3 else out
    return out.transpose(0, 2, 3, 1)


def _half_pool(y, pool, to16):
    """HalfConv's float32 NCHW result -> its fused max pool (if any) -> float32,
    or float16 where ``to16``. The 2x2 stride-2 pool runs a kernel (numpy's
    strided maxima and its float16 conversion, which has no F16C loop, were
    two thirds of the demo's fp16 network on Zen 3); the float16 rows are
    stored by F16C where the machine has it."""
    if pool and y.ndim == 4 and min(y.shape[2:]) >= 2 and _plain_2x2(pool):
        from ..kernels import fp16_conv, layout

        N, C, H, W = y.shape
        f16c = to16 and _lp_half.get_half_isa() != "portable"
        out = np.empty((N, C, H // 2, W // 2), np.float16 if f16c else np.float32)
        x3 = y.reshape(N * C, H, W)
        if f16c:
            chunk = fp16_conv.pool16_planes(H // 2, W // 2)
            tmp = np.empty(
                (numba.config.NUMBA_NUM_THREADS, W + chunk * (H // 2) * (W // 2)),
                np.float32,
            )
            o16 = out.view(np.uint16).reshape(N * C, H // 2, W // 2)
            fp16_conv.maxpool2x2_to16(x3, o16, tmp, chunk)
            return out
        tmp = np.empty((numba.config.NUMBA_NUM_THREADS, W), np.float32)
        layout.maxpool2x2_nchw(x3, out.reshape(N * C, H // 2, W // 2), tmp)
        y = out
    elif pool:
        y = MaxPool("pool", ["x"], ["y"], **pool).run(y)
    return y.astype(np.float16) if to16 else y


def _spatial2(v_, ndim):
    if v_ is None or ndim == 4:
        return v_
    return [1, *v_]


def _pads2(p, ndim):
    if p is None or ndim == 4:
        return p
    return [0, p[0], 0, p[1]]


# --------------------------------------------------------------------------- #
# the node base class and the graph


class Node:
    """One operation. ``params``: NumPy arrays and JSON values, nothing else.

    Subclasses set ``op_type`` and implement ``run(*inputs)`` (one array or a
    tuple of arrays); ``prepare()`` builds derived state (packed weights).
    """

    op_type = "?"

    def __init__(self, name, inputs, outputs, **params):
        self.name = str(name)
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.params = params
        self.prepare()

    def prepare(self):
        pass

    def run(self, *xs):
        raise NotImplementedError

    def __call__(self, *xs):
        try:
            y = self.run(*xs)
        except (ValueError, TypeError, OverflowError) as e:
            msg = f"node {self.name!r} (op {self.op_type}): {e}"
            raise type(e)(msg) from e
        return y if isinstance(y, tuple) else (y,)

    def __repr__(self):
        return f"{self.op_type}({self.name!r}: {self.inputs} -> {self.outputs})"

    def weights(self) -> dict[str, np.ndarray]:
        """The arrays this node holds (for size reports and transforms)."""
        return {k: a for k, a in self.params.items() if isinstance(a, np.ndarray)}


class Graph:
    """Nodes in execution order plus graph inputs, outputs and constants.

    ``inputs``: list of ``(name, shape, dtype)`` with ``None`` for a free
    dimension; ``constants``: ``{name: ndarray}`` read by nodes as inputs.
    """

    def __init__(self, nodes, inputs, outputs, constants=None, meta=None):
        self.nodes = list(nodes)
        self.inputs = [
            (n, tuple(s) if s is not None else None, np.dtype(d)) for n, s, d in inputs
        ]
        self.outputs = list(outputs)
        self.constants = dict(constants or {})
        self.meta = dict(meta or {})
        self._check()

    def _check(self):
        known = {n for n, _, _ in self.inputs} | set(self.constants)
        for node in self.nodes:
            for t in node.inputs:
                if t and t not in known:
                    msg = (
                        f"node {node.name!r} (op {node.op_type}) reads tensor {t!r} "
                        f"that no earlier node, input or constant produces"
                    )
                    raise RuntimeGraphError(msg)
            known.update(node.outputs)
        for t in self.outputs:
            if t not in known:
                msg = f"graph output {t!r} is produced by no node"
                raise RuntimeGraphError(msg)
        last = {}
        for i, node in enumerate(self.nodes):
            for t in node.inputs:
                last[t] = i
        self._free_after = [
            [t for t in node.inputs if last.get(t) == i and t not in self.outputs]
            for i, node in enumerate(self.nodes)
        ]

    def __repr__(self):
        ops = ", ".join(n.op_type for n in self.nodes)
        return f"Graph({len(self.nodes)} nodes: {ops})"

    def _feeds(self, args, kwargs):
        if len(args) == 1 and isinstance(args[0], dict) and not kwargs:
            feeds = dict(args[0])
        else:
            if len(args) > len(self.inputs):
                msg = f"graph takes {len(self.inputs)} inputs, got {len(args)}"
                raise TypeError(msg)
            feeds = {n: a for (n, _, _), a in zip(self.inputs, args, strict=False)}
            feeds.update(kwargs)
        for name, shape, dtype in self.inputs:
            if name not in feeds:
                msg = f"missing graph input {name!r} ({dtype}, shape {shape})"
                raise TypeError(msg)
            x = feeds[name]
            if not isinstance(x, np.ndarray):
                msg = (
                    f"graph input {name!r} must be a numpy.ndarray of {dtype}, got "
                    f"{type(x).__name__}"
                )
                raise TypeError(msg)
            if x.dtype != dtype:
                msg = (
                    f"graph input {name!r} must have dtype {dtype}, got {x.dtype}; "
                    f"convert it with .astype(np.{dtype})"
                )
                raise TypeError(msg)
            if shape is not None and (
                x.ndim != len(shape)
                or any(
                    s is not None and s != d
                    for s, d in zip(shape, x.shape, strict=True)
                )
            ):
                want = tuple("?" if s is None else s for s in shape)
                msg = f"graph input {name!r} must have shape {want}, got {x.shape}"
                raise ValueError(msg)
        return feeds

    def run(self, *args, **kwargs) -> dict[str, np.ndarray]:
        """All graph outputs as ``{name: array}``."""
        env = dict(self.constants)
        env.update(self._feeds(args, kwargs))
        for node, free in zip(self.nodes, self._free_after, strict=True):
            ys = node(*(env[t] if t else None for t in node.inputs))
            for t, y in zip(node.outputs, ys, strict=False):
                if t:
                    env[t] = y
            for t in free:
                if t not in self.constants:
                    env.pop(t, None)
        return {t: env[t] for t in self.outputs}

    def __call__(self, *args, **kwargs):
        """The first output (or a tuple of all outputs when there are several)."""
        out = self.run(*args, **kwargs)
        vals = tuple(out[t] for t in self.outputs)
        return vals[0] if len(vals) == 1 else vals

    def consumers(self, tensor):
        return [n for n in self.nodes if tensor in n.inputs]

    def producer(self, tensor):
        for n in self.nodes:
            if tensor in n.outputs:
                return n
        return None

    def weight_bytes(self) -> int:
        own = sum(a.nbytes for n in self.nodes for a in n.weights().values())
        return own + sum(a.nbytes for a in self.constants.values())


# --------------------------------------------------------------------------- #
# float nodes


class Conv(Node):
    """ONNX Conv (1-D/2-D) in float32: im2col + matmul, optional fused activation.

    params: w (M, C/g, [kh,] kw) float32, b (M,) or None, group, strides, pads,
    dilations, auto_pad, activation.
    """

    op_type = "Conv"

    def prepare(self):
        p = self.params
        w = np.asarray(p["w"], np.float32)
        if w.ndim not in (3, 4):
            msg = f"Conv weights must be 3-D or 4-D, got shape {w.shape}"
            raise RuntimeGraphError(msg)
        self._wg = _w_gemm(w, int(p.get("group", 1)))
        b = p.get("b")
        self._b = None if b is None else np.asarray(b, np.float32)

    def run(self, x):
        v.check_array(x, "x", (np.dtype(np.float32),))
        p = self.params
        mg = self._wg[0].shape[1]

        def gemm(g, cols):
            y = cols @ self._wg[g]
            if self._b is not None:
                y += self._b[g * mg : (g + 1) * mg]
            return y

        y = _conv_via_gemm(x, p["w"].shape, int(p.get("group", 1)), p, 0, gemm)
        return _act(y, p.get("activation"))


class Gemm(Node):
    """y = act(x @ w + b) in float32; w (K, N) (ONNX Gemm/MatMul with constant B)."""

    op_type = "Gemm"

    def prepare(self):
        self._w = np.ascontiguousarray(self.params["w"], np.float32)
        b = self.params.get("b")
        self._b = None if b is None else np.asarray(b, np.float32)

    def run(self, x):
        v.check_array(x, "x", (np.dtype(np.float32),))
        if x.shape[-1] != self._w.shape[0]:
            msg = f"x has {x.shape[-1]} features, the weights expect {self._w.shape[0]}"
            raise ValueError(msg)
        y = x @ self._w
        if self._b is not None:
            y += self._b
        return _act(y, self.params.get("activation"))


class MatMul(Node):
    """numpy matmul of two graph tensors."""

    op_type = "MatMul"

    def run(self, a, b):
        return np.matmul(a, b)


class _Binary(Node):
    fn = None

    def run(self, a, b):
        return type(self).fn(a, b)


class Add(_Binary):
    op_type = "Add"
    fn = np.add


class Sub(_Binary):
    op_type = "Sub"
    fn = np.subtract


class Mul(_Binary):
    op_type = "Mul"
    fn = np.multiply


def _onnx_divide(a, b):
    # ONNX Div: integer tensors divide to the integer type, truncating toward
    # zero (C's division; numpy's // floors); floats as numpy
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "iu" and b.dtype.kind in "iu":
        with np.errstate(divide="ignore"):  # x / 0: undefined in ONNX, 0 here
            q = a // b
            # floor -> toward zero where the exact quotient is negative
            q = q + ((a % b != 0) & ((a < 0) != (b < 0)))
        return q.astype(np.result_type(a, b), copy=False)
    return np.divide(a, b)


class Div(_Binary):
    op_type = "Div"
    fn = staticmethod(_onnx_divide)


class Relu(Node):
    op_type = "Relu"

    def run(self, x):
        return np.maximum(x, np.zeros((), x.dtype))


class Clip(Node):
    op_type = "Clip"

    def run(self, x, lo=None, hi=None):
        lo = self.params.get("min") if lo is None else lo
        hi = self.params.get("max") if hi is None else hi
        y = x
        if lo is not None:
            y = np.maximum(y, np.asarray(lo, x.dtype))
        if hi is not None:
            y = np.minimum(y, np.asarray(hi, x.dtype))
        return y.copy() if y is x else y


class Sigmoid(Node):
    op_type = "Sigmoid"

    def run(self, x):
        with np.errstate(over="ignore"):
            return (1.0 / (1.0 + np.exp(-x))).astype(x.dtype)


class Softmax(Node):
    """Softmax along ``axis`` (opset >= 13 semantics), computed in float32."""

    op_type = "Softmax"

    def run(self, x):
        axis = v.check_axis(int(self.params.get("axis", -1)), x.ndim)
        xf = x.astype(np.float32)
        if self.params.get("legacy"):  # opset < 13: over all axes from `axis` on
            xf = xf.reshape(math.prod(x.shape[:axis]), -1)
            axis = 1
        e = np.exp(xf - xf.max(axis=axis, keepdims=True))
        y = e / e.sum(axis=axis, keepdims=True)
        return y.reshape(x.shape).astype(x.dtype)


class Identity(Node):
    op_type = "Identity"

    def run(self, x):
        return x


class Flatten(Node):
    op_type = "Flatten"

    def run(self, x):
        axis = int(self.params.get("axis", 1))
        axis = axis + x.ndim if axis < 0 else axis
        # explicit sizes: -1 cannot be inferred from an empty batch
        return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


class Reshape(Node):
    op_type = "Reshape"

    def run(self, x, shape):
        shape = [int(s) for s in np.asarray(shape).reshape(-1)]
        if not int(self.params.get("allowzero", 0)):
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)


class Transpose(Node):
    op_type = "Transpose"

    def run(self, x):
        perm = self.params.get("perm")
        return np.transpose(x, None if perm is None else tuple(perm)).copy()


class Concat(Node):
    op_type = "Concat"

    def run(self, *xs):
        return np.concatenate(xs, axis=int(self.params["axis"]))


def _pool_views(x4, kernel, strides, dilations, begins, ends, fill, ceil_mode):
    """Yield the strided slices of the padded input, one per kernel tap."""
    N, C, H, W = x4.shape
    out = []
    for i in range(2):
        k = (kernel[i] - 1) * dilations[i] + 1
        size = (H, W)[i] + begins[i] + ends[i] - k
        o = (-(-size // strides[i]) if ceil_mode else size // strides[i]) + 1
        if ceil_mode and (o - 1) * strides[i] >= (H, W)[i] + begins[i]:
            o -= 1  # the last window must start inside the input or left pad
        out.append(o)
    oh, ow = out
    extra_h = max(
        0,
        (oh - 1) * strides[0]
        + (kernel[0] - 1) * dilations[0]
        + 1
        - (H + begins[0] + ends[0]),
    )
    extra_w = max(
        0,
        (ow - 1) * strides[1]
        + (kernel[1] - 1) * dilations[1]
        + 1
        - (W + begins[1] + ends[1]),
    )
    xp = np.full(
        (N, C, H + begins[0] + ends[0] + extra_h, W + begins[1] + ends[1] + extra_w),
        fill,
        x4.dtype,
    )
    xp[:, :, begins[0] : begins[0] + H, begins[1] : begins[1] + W] = x4
    views = []
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            h0, w0 = i * dilations[0], j * dilations[1]
            views.append(
                xp[
                    :,
                    :,
                    h0 : h0 + (oh - 1) * strides[0] + 1 : strides[0],
                    w0 : w0 + (ow - 1) * strides[1] + 1 : strides[1],
                ]
            )
    return views


def _pool_attrs(params, x):
    kernel = list(params["kernel_shape"])
    nd = x.ndim
    kernel = kernel if nd == 4 else [1, *kernel]
    _, begins, ends, strides, dil = _conv_geometry(
        _as_2d_spatial(x).shape[2:],
        kernel,
        _spatial2(params.get("strides"), nd),
        _pads2(params.get("pads"), nd),
        _spatial2(params.get("dilations"), nd),
        params.get("auto_pad", "NOTSET"),
    )
    return kernel, strides, dil, begins, ends, bool(params.get("ceil_mode", 0))


class MaxPool(Node):
    """ONNX MaxPool (1-D/2-D) on float or quantized (uint8/int8) tensors."""

    op_type = "MaxPool"

    def run(self, x):
        x4 = _as_2d_spatial(x)
        kernel, strides, dil, begins, ends, ceil = _pool_attrs(self.params, x)
        N, C, H, W = x4.shape
        if (
            kernel == strides == [2, 2]
            and dil == [1, 1]
            and not any(begins)
            and not any(ends)
            and not ceil
        ):
            # pairwise maxima of whole rows, then of column pairs (numpy's
            # max over axes (3, 5) of a 6-D view was 10-30x slower here)
            h, w = H // 2, W // 2
            t = np.maximum(
                x4[:, :, 0 : 2 * h : 2, : 2 * w], x4[:, :, 1 : 2 * h : 2, : 2 * w]
            )
            y = np.maximum(t[..., 0::2], t[..., 1::2])
        else:
            if np.issubdtype(x.dtype, np.integer):
                fill = np.iinfo(x.dtype).min
            else:
                fill = -np.inf
            views = _pool_views(x4, kernel, strides, dil, begins, ends, fill, ceil)
            y = views[0].copy()
            for vw in views[1:]:
                np.maximum(y, vw, out=y)
        return y[:, :, 0, :] if x.ndim == 3 else y


class AveragePool(Node):
    op_type = "AveragePool"

    def run(self, x):
        x4 = _as_2d_spatial(x).astype(np.float32, copy=False)
        kernel, strides, dil, begins, ends, ceil = _pool_attrs(self.params, x)
        views = _pool_views(x4, kernel, strides, dil, begins, ends, 0.0, ceil)
        s = views[0].astype(np.float32)
        for vw in views[1:]:
            s += vw
        ones = np.ones((1, 1, *x4.shape[2:]), np.float32)
        if int(self.params.get("count_include_pad", 0)):
            h, w = x4.shape[2:]
            ones = np.ones(
                (1, 1, h + begins[0] + ends[0], w + begins[1] + ends[1]), np.float32
            )
            cnt_views = _pool_views(
                ones, kernel, strides, dil, [0, 0], [0, 0], 0.0, ceil
            )
        else:
            cnt_views = _pool_views(ones, kernel, strides, dil, begins, ends, 0.0, ceil)
        cnt = sum(c for c in cnt_views)
        y = (s / cnt).astype(x.dtype)
        return y[:, :, 0, :] if x.ndim == 3 else y


class GlobalAveragePool(Node):
    op_type = "GlobalAveragePool"

    def run(self, x):
        axes = tuple(range(2, x.ndim))
        return x.astype(np.float32).mean(axis=axes, keepdims=True).astype(x.dtype)


# --------------------------------------------------------------------------- #
# quantized nodes


def _scalar(a):
    return np.asarray(a).reshape(())


class QuantizeLinear(Node):
    """lowprec.quantize_linear; scale / zero point are graph tensors."""

    op_type = "QuantizeLinear"

    def run(self, x, scale, zero_point=None):
        kw = {}
        if "axis" in self.params and np.asarray(scale).size > 1:
            kw["axis"] = int(self.params["axis"])
        if zero_point is None:
            return lowprec.quantize_linear(x, scale, **kw)
        return lowprec.quantize_linear(x, scale, zero_point, **kw)


class DequantizeLinear(Node):
    op_type = "DequantizeLinear"

    def run(self, x, scale, zero_point=None):
        kw = {}
        if "axis" in self.params and np.asarray(scale).size > 1:
            kw["axis"] = int(self.params["axis"])
        return lowprec.dequantize_linear(x, scale, zero_point, **kw)


class DynamicQuantizeLinear(Node):
    op_type = "DynamicQuantizeLinear"

    def run(self, x):
        return tuple(lowprec.dynamic_quantize_linear(x))


class QLinearMatMul(Node):
    """ONNX QLinearMatMul with every operand a graph tensor (no prepacking)."""

    op_type = "QLinearMatMul"

    def run(self, a, sa, za, b, sb, zb, sy, zy):
        return lowprec.qlinear_matmul(a, sa, za, b, sb, zb, sy, zy)


class MatMulInteger(Node):
    """ONNX MatMulInteger; with params w (K, N) (a constant B) and optional
    w_zero_point the weights are packed once and the node takes (a, a_zp)."""

    op_type = "MatMulInteger"

    def prepare(self):
        w = self.params.get("w")
        self._packed = None
        if w is not None:
            self._packed = lowprec.pack_weights(w, self.params.get("w_zero_point"))

    def run(self, a, b=None, za=None, zb=None):
        if self._packed is not None:
            return lowprec.matmul_integer(a, self._packed, b)
        return lowprec.matmul_integer(a, b, za, zb)


class BatchNormalization(Node):
    """Inference BatchNormalization as y = x * scale + shift per channel
    (loaders fold it into the Conv before it when they can)."""

    op_type = "BatchNormalization"

    def run(self, x):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        sc = np.asarray(self.params["scale"], np.float32).reshape(shape)
        sh = np.asarray(self.params["shift"], np.float32).reshape(shape)
        return (x * sc + sh).astype(x.dtype)


class QGemm(Node):
    """y = requant(act((x - x_zp) @ (w - w_zp) + bias)): lowprec.qlinear_matmul.

    params: w (K, N) int8/uint8, w_scale / w_zero_point scalar or (N,),
    x_scale, x_zero_point (per tensor), y_scale / y_zero_point (None: float32
    output), bias int32 (N,) in scale x_scale*w_scale, activation.
    Weights are packed once (``lowprec.pack_weights``).
    """

    op_type = "QGemm"

    def prepare(self):
        p = self.params
        self._packed = lowprec.pack_weights(p["w"], p.get("w_zero_point"), p["w_scale"])
        self._x_scale = np.asarray(p["x_scale"], np.float32).reshape(())
        self._x_zp = _scalar(p["x_zero_point"])
        self._float_out = p.get("y_scale") is None

    def run(self, x):
        p = self.params
        lead = x.shape[:-1]
        x2 = x.reshape(math.prod(lead), x.shape[-1]) if x.ndim != 2 else x
        kw = {"bias": p.get("bias"), "activation": _hashable(p.get("activation"))}
        if self._float_out:
            y = lowprec.qlinear_matmul(
                x2,
                self._x_scale,
                self._x_zp,
                self._packed,
                None,
                None,
                None,
                None,
                out_dtype=np.float32,
                **kw,
            )
        else:
            y = lowprec.qlinear_matmul(
                x2,
                self._x_scale,
                self._x_zp,
                self._packed,
                None,
                None,
                _scalar(p["y_scale"]),
                _scalar(p["y_zero_point"]),
                **kw,
            )
        return y.reshape(*lead, y.shape[-1]) if x.ndim != 2 else y


# Convolutions with fewer multiply-adds per output (K = C/group * kh * kw) than
# this run as im2col + GEMM with ROWS_PER_GEMM_ROW output pixels per GEMM row
# and block-diagonal weights: the INT8 GEMM's cost per output row dominates
# at K = 9 (MNIST stem, 196,000 x 9 @ 9 x 32: 24 ms as is, 12 ms with 2 pixels
# per row, 1 thread), and lowprec.conv took 38 ms on that layer.
SMALL_K = 32
ROWS_PER_GEMM_ROW = 2


def _use_lowprec_conv(w_shape, group) -> bool:
    if CONV_BACKEND == "im2col" or _lp_conv is None:
        return False
    if CONV_BACKEND == "conv":
        return True
    return math.prod(w_shape[1:]) >= SMALL_K


def _block_diag(wm, r):
    """(K, N) -> (r*K, r*N) with wm on the diagonal: r pixels per GEMM row."""
    K, N = wm.shape
    out = np.zeros((r * K, r * N), wm.dtype)
    for i in range(r):
        out[i * K : (i + 1) * K, i * N : (i + 1) * N] = wm
    return out


class QLinearConv(Node):
    """ONNX QLinearConv with fused bias/activation and optional float32 output.

    params: w (M, C/g, [kh,] kw) int8/uint8, w_scale / w_zero_point scalar or
    (M,), x_scale / x_zero_point, y_scale / y_zero_point (None: float32
    output), bias int32 (M,), group, strides, pads, dilations, auto_pad,
    activation. Runs ``lowprec.conv.qlinear_conv`` on weights packed once when
    that module imports, else im2col (padding with the input zero point, a real
    0) + ``lowprec.qlinear_matmul`` on prepacked weights: the same numerics.
    """

    op_type = "QLinearConv"

    def prepare(self):
        p = self.params
        w = p["w"]
        M = w.shape[0]
        group = int(p.get("group", 1))
        self._x_scale = np.asarray(p["x_scale"], np.float32).reshape(())
        self._x_zp = _scalar(p["x_zero_point"])
        self._float_out = p.get("y_scale") is None
        ws = np.asarray(p["w_scale"], np.float32).reshape(-1)
        wz = p.get("w_zero_point")
        wz = None if wz is None else np.asarray(wz).reshape(-1)
        self._lp = _use_lowprec_conv(w.shape, group)
        if self._lp:
            self._packed = _lp_conv.pack_conv_weights(w, wz, ws, group=group)
            return
        mg = M // group
        K = math.prod(w.shape[1:])
        zero_wz = wz is None or not wz.any()  # then the zero blocks add 0
        self._r = ROWS_PER_GEMM_ROW if K < SMALL_K and zero_wz else 1
        self._packs = []
        for g, wm in enumerate(_w_gemm(w, group)):
            sl = slice(g * mg, (g + 1) * mg)
            sc = ws if ws.size == 1 else ws[sl]
            zp = None if wz is None else (wz if wz.size == 1 else wz[sl])
            if self._r > 1:
                wm = _block_diag(wm, self._r)
                sc = sc if sc.size == 1 else np.tile(sc, self._r)
                zp = None
            self._packs.append(lowprec.pack_weights(wm, zp, sc))

    def run(self, x):
        p = self.params
        act = _hashable(p.get("activation"))
        bias = p.get("bias")
        ys, yz = (
            (None, None)
            if self._float_out
            else (_scalar(p["y_scale"]), _scalar(p["y_zero_point"]))
        )
        odt = np.float32 if self._float_out else None
        if self._lp:
            pool = p.get("pool") if x.ndim == 4 else None
            nin, nout = (
                bool(p.get(k)) and x.ndim == 4 for k in ("nhwc_in", "nhwc_out")
            )
            nhwc = nin or nout or bool(pool)
            xl = (
                np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if nhwc and not nin else x
            )
            y = _lp_conv.qlinear_conv(
                xl,
                self._x_scale,
                self._x_zp,
                self._packed,
                None,
                None,
                ys,
                yz,
                bias,
                auto_pad=p.get("auto_pad", "NOTSET"),
                dilations=p.get("dilations"),
                group=int(p.get("group", 1)),
                pads=p.get("pads"),
                strides=p.get("strides"),
                activation=act,
                out_dtype=odt,
                layout="NHWC" if nhwc else "NCHW",
            )
            if nhwc:
                return _nhwc_out(y, pool, 4, nout)
            return _maxpool_nchw(y, p.get("pool"))
        v.check_array(x, "x", v.INT8_TYPES, fix="quantize it first")
        if x.dtype != np.asarray(p["x_zero_point"]).dtype:
            msg = f"x has dtype {x.dtype}, x_zero_point {self._x_zp.dtype}"
            raise TypeError(msg)
        mg = p["w"].shape[0] // len(self._packs)

        r = self._r

        def gemm(g, cols):
            b = None if bias is None else np.asarray(bias)[g * mg : (g + 1) * mg]
            rows = cols.shape[0]
            if r > 1:
                if rows % r:
                    cols = np.concatenate(
                        [cols, np.full((r - rows % r, cols.shape[1]), self._x_zp)]
                    )
                cols = cols.reshape(-1, r * cols.shape[1])
                b = None if b is None else np.tile(b, r)
            y = lowprec.qlinear_matmul(
                cols,
                self._x_scale,
                self._x_zp,
                self._packs[g],
                None,
                None,
                ys,
                yz,
                bias=b,
                activation=act,
                out_dtype=odt,
            )
            return y.reshape(-1, mg)[:rows] if r > 1 else y

        return _conv_via_gemm(x, p["w"].shape, len(self._packs), p, self._x_zp, gemm)


class ConvInteger(Node):
    """ONNX ConvInteger: int32 conv(x - x_zp, w - w_zp); weights constant."""

    op_type = "ConvInteger"

    def prepare(self):
        p = self.params
        w = p["w"]
        group = int(p.get("group", 1))
        wz = p.get("w_zero_point")
        wz = None if wz is None else np.asarray(wz).reshape(-1)
        self._lp = _use_lowprec_conv(w.shape, group)
        if self._lp:
            self._packed = _lp_conv.pack_conv_weights(w, wz, None, group=group)
            return
        mg = w.shape[0] // group
        self._packs = [
            lowprec.pack_weights(
                wm,
                None
                if wz is None
                else (wz if wz.size == 1 else wz[g * mg : (g + 1) * mg]),
            )
            for g, wm in enumerate(_w_gemm(w, group))
        ]

    def run(self, x, x_zero_point=None):
        p = self.params
        zx = np.zeros((), x.dtype) if x_zero_point is None else _scalar(x_zero_point)
        if self._lp:
            return _lp_conv.conv_integer(
                x,
                self._packed,
                zx,
                None,
                auto_pad=p.get("auto_pad", "NOTSET"),
                dilations=p.get("dilations"),
                group=int(p.get("group", 1)),
                pads=p.get("pads"),
                strides=p.get("strides"),
            )
        v.check_array(x, "x", v.INT8_TYPES, fix="quantize it first")

        def gemm(g, cols):
            return lowprec.matmul_integer(cols, self._packs[g], zx)

        return _conv_via_gemm(x, p["w"].shape, len(self._packs), p, zx, gemm)


# --------------------------------------------------------------------------- #
# fp16 nodes (lowprec.half: fp16 inputs, fp32 accumulation, fp32 output)


def _half():
    if _lp_half is None:
        msg = "lowprec.half (fp16 GEMM) is not available in this installation"
        raise RuntimeGraphError(msg)
    return _lp_half


_HALF_IN = (np.dtype(np.float32), np.dtype(np.float16))  # HalfGemm / HalfConv x


class HalfGemm(Node):
    """y = act(fp16(x) @ fp16(w) + b) with fp32 accumulation and output."""

    op_type = "HalfGemm"

    def prepare(self):
        w = np.asarray(self.params["w"], np.float16)
        self._packed = _half().pack_weights_fp16(w)
        b = self.params.get("b")
        self._b = None if b is None else np.asarray(b, np.float32)

    def run(self, x):
        v.check_array(x, "x", _HALF_IN, fix="dequantize an integer tensor first")
        x16 = x if x.dtype == np.float16 else x.astype(np.float16)
        lead = x.shape[:-1]
        y = _half().matmul_fp16(
            x16.reshape(math.prod(lead), x.shape[-1]),
            self._packed,
            bias=self._b,
            activation=_hashable(self.params.get("activation")),
        )
        return y.reshape(*lead, y.shape[-1])


class HalfConv(Node):
    """Conv with fp16 inputs/weights and fp32 accumulation: ``lowprec.conv_fp16``
    on weights prepacked once (implicit GEMM, no im2col), fused bias, activation
    and max pool. ``out_fp16`` (set by ``to_fp16`` where every consumer rounds
    its input to float16 anyway): the result rounded once to float16 (the pool
    and clamp commute with that rounding, so the consumers see the same bits
    for half the bytes)."""

    op_type = "HalfConv"

    def prepare(self):
        p = self.params
        w = np.asarray(p["w"], np.float16)
        if w.ndim not in (3, 4):
            msg = f"HalfConv weights must be 3-D or 4-D, got shape {w.shape}"
            raise RuntimeGraphError(msg)
        if _lp_conv_half is None:
            msg = "lowprec.conv_half (fp16 convolution) is not available"
            raise RuntimeGraphError(msg)
        self._packed = _lp_conv_half.pack_conv_weights_fp16(
            w, group=int(p.get("group", 1))
        )
        b = p.get("b")
        self._b = None if b is None else np.asarray(b, np.float32)

    def run(self, x):
        p = self.params
        v.check_array(x, "x", _HALF_IN, fix="dequantize an integer tensor first")
        if bool(p.get("nhwc_in")) and x.ndim == 4:
            # the channels-last handoff of graphs saved before this node ran
            # conv_fp16 (to_fp16 no longer sets it on HalfConv)
            x = x.transpose(0, 3, 1, 2)
        pool, to16 = p.get("pool"), bool(p.get("out_fp16"))
        y = _lp_conv_half.conv_fp16(
            np.ascontiguousarray(x, np.float16),
            self._packed,
            self._b,
            auto_pad=p.get("auto_pad", "NOTSET"),
            dilations=p.get("dilations"),
            group=int(p.get("group", 1)),
            pads=p.get("pads"),
            strides=p.get("strides"),
            activation=_hashable(p.get("activation")),
            # pooled: rounded to float16 after the pool (as the kernel does)
            out_dtype=np.float16 if to16 and not pool else np.float32,
        )
        if pool:
            y = _half_pool(y, pool, to16)
        if bool(p.get("nhwc_out")) and y.ndim == 4:
            return np.ascontiguousarray(y.transpose(0, 2, 3, 1))
        return y


NODE_TYPES = {
    cls.op_type: cls
    for cls in (
        Conv,
        Gemm,
        MatMul,
        Add,
        Sub,
        Mul,
        Div,
        Relu,
        Clip,
        Sigmoid,
        Softmax,
        Identity,
        Flatten,
        Reshape,
        Transpose,
        Concat,
        MaxPool,
        AveragePool,
        GlobalAveragePool,
        QuantizeLinear,
        DequantizeLinear,
        DynamicQuantizeLinear,
        QLinearMatMul,
        MatMulInteger,
        BatchNormalization,
        QGemm,
        QLinearConv,
        ConvInteger,
        HalfGemm,
        HalfConv,
    )
}
