"""Graph transformations: activation fusion, static INT8 quantization, fp16,
magnitude pruning, per-layer precision and a per-layer sensitivity report.

Every transformation returns a new :class:`~lowprec.runtime.graph.Graph`; the
model given is never modified.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from . import graph as G

QUANT_METHODS = ("minmax", "percentile", "entropy", "mse")
# ops that pass a quantized tensor through unchanged in scale / zero point
_TRANSPARENT = ("MaxPool", "Flatten", "Reshape", "Transpose", "Identity")
_COMPUTE = ("Conv", "Gemm")


def _copy(node, **changes):
    params = dict(node.params)
    params.update(changes.pop("params", {}))
    kw = {"name": node.name, "inputs": node.inputs, "outputs": node.outputs}
    kw.update(changes)
    cls = changes.pop("cls", type(node))
    kw.pop("cls", None)
    return cls(kw["name"], kw["inputs"], kw["outputs"], **params)


def _graph_like(model, nodes, constants=None, meta=None):
    return G.Graph(
        nodes,
        model.inputs,
        model.outputs,
        model.constants if constants is None else constants,
        {**model.meta, **(meta or {})},
    )


# --------------------------------------------------------------------------- #
# fusion


def fuse_activations(model):
    """Fold Relu / Clip (constant bounds) into the Conv or Gemm before them."""
    nodes = list(model.nodes)
    out, skip = [], set()
    for i, node in enumerate(nodes):
        if i in skip:
            continue
        if type(node) in (G.Conv, G.Gemm) and node.params.get("activation") is None:
            t = node.outputs[0]
            cons = model.consumers(t)
            if len(cons) == 1 and t not in model.outputs:
                nxt = cons[0]
                act = _activation_of(nxt, model)
                if act is not None and nodes.index(nxt) == i + 1:
                    out.append(
                        _copy(node, outputs=nxt.outputs, params={"activation": act})
                    )
                    skip.add(i + 1)
                    continue
        out.append(node)
    return _fuse_pools(_graph_like(model, out))


def _fuse_pools(model):
    """Fold a MaxPool into the Conv before it (params["pool"]): the conv node
    pools its channels-last result before going back to NCHW, 4x less to move."""
    nodes = list(model.nodes)
    out, skip = [], set()
    for i, node in enumerate(nodes):
        if i in skip:
            continue
        if type(node) in (G.Conv, G.QLinearConv, G.HalfConv) and not node.params.get(
            "pool"
        ):
            t = node.outputs[0]
            cons = model.consumers(t)
            if (
                len(cons) == 1
                and t not in model.outputs
                and i + 1 < len(nodes)
                and nodes[i + 1] is cons[0]
                and cons[0].op_type == "MaxPool"
                and len(cons[0].outputs) == 1
            ):
                pool = {k: val for k, val in cons[0].params.items()}
                out.append(_copy(node, outputs=cons[0].outputs, params={"pool": pool}))
                skip.add(i + 1)
                continue
        out.append(node)
    return _nhwc_handoff(_graph_like(model, out))


# convolutions that compute channels-last (im2col rows, the INT8 kernels'
# NHWC path); HalfConv's conv_fp16 reads and writes NCHW
_CONVS = (G.Conv, G.QLinearConv)
_HANDOFF = ("nhwc_in", "nhwc_out")


def _nhwc_handoff(model):
    """Between two 2-D convolutions (the first feeding only the second), keep
    the tensor channels-last: the first skips its NHWC -> NCHW transpose and
    the second its NCHW -> NHWC one. Such tensors are NHWC inside the graph."""
    flags = {}  # by node identity: names may repeat in a hand-built Graph
    for node in model.nodes:
        if type(node) not in _CONVS or node.params["w"].ndim != 4:
            continue
        t = node.outputs[0]
        cons = model.consumers(t)
        if (
            len(cons) == 1
            and t not in model.outputs
            and type(cons[0]) in _CONVS
            and cons[0].params["w"].ndim == 4
            and cons[0].inputs[0] == t
        ):
            flags.setdefault(id(node), {})["nhwc_out"] = True
            flags.setdefault(id(cons[0]), {})["nhwc_in"] = True
    if not flags:
        return model
    nodes = [
        _copy(n, params=flags[id(n)]) if id(n) in flags else n for n in model.nodes
    ]
    return _graph_like(model, nodes)


def _activation_of(node, model):
    if node.op_type == "Relu":
        return "relu"
    if node.op_type == "Clip":
        lo, hi = node.params.get("min"), node.params.get("max")
        if len(node.inputs) > 1 and node.inputs[1]:
            lo = model.constants.get(node.inputs[1])
            if lo is None:
                return None
        if len(node.inputs) > 2 and node.inputs[2]:
            hi = model.constants.get(node.inputs[2])
            if hi is None:
                return None
        lo = -np.inf if lo is None else float(np.asarray(lo))
        hi = np.inf if hi is None else float(np.asarray(hi))
        return "relu" if lo == 0 and hi == np.inf else [lo, hi]
    return None


# --------------------------------------------------------------------------- #
# observers (bounded memory: a fixed number of histogram bins per tensor)


class HistogramObserver:
    """Running min / max and a ``bins``-bin histogram over [lo, hi].

    When a batch falls outside the current range, the range grows and the
    counts are re-binned (each old bin's count goes to the new bin holding its
    center), so memory stays ``bins`` counts whatever the data size.
    """

    def __init__(self, bins=2048):
        self.bins = bins
        self.lo = self.hi = None
        self.counts = np.zeros(bins, np.float64)

    def update(self, x):
        x = np.asarray(x, np.float32).ravel()
        x = x[np.isfinite(x)]
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if self.lo is None:
            # a constant tensor: a range wide enough for np.histogram's
            # float32 bins at that magnitude (2048 bins need > 2048 float32
            # steps: |lo| * 2**-12; lo + 1e-8 == lo in float32 at 0.7)
            pad = max(1e-8, max(abs(lo), abs(hi)) * 2.0**-10)
            self.lo, self.hi = lo, max(hi, lo + pad)
        elif lo < self.lo or hi > self.hi:
            nlo, nhi = min(lo, self.lo), max(hi, self.hi)
            # grow a little more than needed so a slowly widening range
            # does not re-bin on every batch
            width = nhi - nlo
            nlo = nlo - 0.05 * width if lo < self.lo else nlo
            nhi = nhi + 0.05 * width if hi > self.hi else nhi
            centers = self.edges()[:-1] + 0.5 * (self.hi - self.lo) / self.bins
            idx = np.clip(
                ((centers - nlo) / (nhi - nlo) * self.bins).astype(int),
                0,
                self.bins - 1,
            )
            counts = np.zeros(self.bins)
            np.add.at(counts, idx, self.counts)
            self.counts, self.lo, self.hi = counts, nlo, nhi
        self.counts += np.histogram(x, self.bins, (self.lo, self.hi))[0]
        self.min = lo if not hasattr(self, "min") else min(self.min, lo)
        self.max = hi if not hasattr(self, "max") else max(self.max, hi)

    def edges(self):
        return np.linspace(self.lo, self.hi, self.bins + 1)

    def range(self, method="minmax", *, qmin=0, qmax=255, percentile=99.999):
        """The real [lo, hi] to quantize to qmin..qmax (always contains 0)."""
        if self.lo is None:
            return 0.0, 1.0
        if method == "minmax":
            lo, hi = self.min, self.max
        elif method == "percentile":
            c = np.cumsum(self.counts) / self.counts.sum()
            e = self.edges()
            tail = (100 - percentile) / 100
            lo = max(self.min, e[np.searchsorted(c, tail)]) if self.min < 0 else 0.0
            hi = min(self.max, e[min(np.searchsorted(c, 1 - tail) + 1, self.bins)])
        elif method == "mse":
            lo, hi = self._mse(qmax - qmin)
        elif method == "entropy":
            lo, hi = self._entropy(qmax - qmin)
        else:
            msg = f"method must be one of {QUANT_METHODS}, got {method!r}"
            raise ValueError(msg)
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        if hi - lo < 1e-12:
            hi = lo + 1e-6
        return lo, hi

    def _centers(self):
        e = self.edges()
        return 0.5 * (e[:-1] + e[1:])

    def _mse(self, levels):
        c, n = self._centers(), self.counts
        best, best_err = (self.min, self.max), math.inf
        for f in np.linspace(0.2, 1.0, 81):
            lo, hi = min(self.min * f, 0.0), max(self.max * f, 0.0)
            step = (hi - lo) / levels or 1e-12
            clipped = np.clip(c, lo, hi)
            err = float(np.sum(n * ((c - clipped) ** 2 + step * step / 12)))
            if err < best_err:
                best, best_err = (lo, hi), err
        return best

    def _entropy(self, levels):
        """KL-divergence threshold search (TensorRT style) on the histogram."""
        c, n = self._centers(), self.counts
        zero = int(np.clip(np.searchsorted(c, 0.0), 0, self.bins - 1))
        best, best_kl = (self.min, self.max), math.inf
        # candidate upper cut-offs: at least 'levels' bins right of zero (a
        # shorter range would be represented exactly, KL 0), up to the end
        start = min(self.bins, zero + levels)
        for stop in np.unique(np.linspace(start, self.bins, 64).astype(int)):
            # the bin holding 0 is left out: 0 is exact at any scale, and the
            # ReLU spike there (half the mass here) made the merged q look
            # worst for every wider range, so the search always clipped to
            # 1/8 of the range (MNIST demo: 98.58 % top-1 instead of 99.70 %)
            ref = n[zero:stop].copy()
            ref[0] = 0.0
            if ref.size == 0 or ref.sum() == 0:
                continue
            p = ref.copy()
            p[-1] += n[stop:].sum()  # the clipped outliers land in the last bin
            # q: ref merged into 'levels' bins, spread back over nonzero bins
            q = np.zeros_like(p)
            for ch in np.array_split(np.arange(p.size), min(levels, p.size)):
                nz = p[ch] > 0
                if nz.any():
                    q[ch[nz]] = ref[ch].sum() / nz.sum()
            ps, qs = p / p.sum(), q / max(q.sum(), 1e-300)
            qs = np.where((ps > 0) & (qs == 0), 1e-4, qs)  # smoothed, as ORT does
            m = ps > 0
            kl = float(np.sum(ps[m] * np.log(ps[m] / qs[m])))
            if kl < best_kl:
                best_kl, best = kl, (self.min, min(c[stop - 1], self.max))
        return best


def _batches(data, batch):
    if isinstance(data, np.ndarray):
        for i in range(0, data.shape[0], batch):
            yield data[i : i + batch]
    elif isinstance(data, dict):
        yield data
    else:
        yield from data


def _progress(it, total, desc):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, total=total, desc=desc, leave=False, disable=None)


def _run_observed(model, feeds, wanted, observers):
    env = dict(model.constants)
    env.update(model._feeds((feeds,), {}))
    for t in wanted & set(env):
        observers[t].update(env[t])
    for node in model.nodes:
        ys = node(*(env[t] if t else None for t in node.inputs))
        for t, y in zip(node.outputs, ys, strict=False):
            env[t] = y
            if t in wanted:
                observers[t].update(y)


def calibrate(model, data, tensors, *, batch=250, bins=2048):
    """Histogram observers for ``tensors`` over ``data`` (array or iterable)."""
    obs = {t: HistogramObserver(bins) for t in tensors}
    total = math.ceil(data.shape[0] / batch) if isinstance(data, np.ndarray) else None
    name = model.inputs[0][0]
    for b in _progress(_batches(data, batch), total, "calibrating"):
        feeds = b if isinstance(b, dict) else {name: b}
        _run_observed(model, feeds, set(tensors), obs)
    return obs


# --------------------------------------------------------------------------- #
# static INT8 quantization


def _act_params(lo, hi, dtype):
    info = np.iinfo(dtype)
    scale = np.float32((hi - lo) / (info.max - info.min))
    zp = int(np.clip(round(info.min - lo / float(scale)), info.min, info.max))
    return np.array(scale, np.float32), np.array(zp, dtype)


def _weight_params(w2, axis_n, per_channel, dtype):
    """Symmetric weights: scale = max|w| / 127 per column (axis_n) or tensor."""
    a = np.abs(w2)
    amax = a.max(axis=1 - axis_n) if per_channel else np.array(a.max())
    amax = np.where(amax > 0, amax, 1.0).astype(np.float32)
    scale = (amax / np.float32(127)).astype(np.float32)
    zp = np.zeros(scale.shape, dtype) + (128 if dtype == np.uint8 else 0)
    return scale, zp.astype(dtype)


def _fit_bias(ws, b, xs):
    """Weight scales raised where the bias would not fit int32 in the
    accumulator's scale xs * ws (|b| / (xs * ws) > 2**31 - 1: tiny weights
    beside a large bias), as ONNX Runtime's quantizer does; the bias is then
    exact to rounding instead of clipped (a Gemm column with weights ~1e-7 and
    bias 5 gave 0.058 for 5.0)."""
    if b is None:
        return ws
    lim = 2**31 - 1
    xs1 = float(np.asarray(xs, np.float64).reshape(-1)[0])  # per tensor
    need = np.abs(np.asarray(b, np.float64)) / (xs1 * lim)
    if ws.ndim == 0 or ws.size == 1:
        need = need.max(initial=0.0)
    need = np.nextafter(need.astype(np.float32), np.float32(np.inf))
    return np.maximum(ws, need).astype(np.float32).reshape(ws.shape)


def _quantize_w(w2, scale, zp, axis_n):
    sc = scale if scale.ndim == 0 else np.expand_dims(scale, 1 - axis_n)
    z = zp if zp.ndim == 0 else np.expand_dims(zp, 1 - axis_n)
    info = np.iinfo(zp.dtype)
    q = np.rint(w2 / sc) + z.astype(np.float32)
    return np.clip(q, info.min, info.max).astype(zp.dtype)


def _matches(node, exclude):
    return node.name in exclude or node.op_type in exclude


def quantize(
    model,
    calibration_data,
    *,
    method="minmax",
    per_channel=True,
    activation_dtype=np.uint8,
    weight_dtype=np.int8,
    exclude=(),
    batch=250,
    bins=2048,
    percentile=99.999,
):
    """Static INT8: symmetric weights (per output channel by default) and
    asymmetric per-tensor activations from histogram observers.

    ``calibration_data``: an array of model inputs, an iterable of batches or of
    feed dicts. Conv / Gemm nodes (activations fused first) become QLinearConv
    / QGemm; MaxPool, Flatten, Reshape, Transpose run on the quantized tensors;
    every other op gets float input through DequantizeLinear. ``exclude``: node
    names or op types kept in float.
    """
    if method not in QUANT_METHODS:
        msg = f"method must be one of {QUANT_METHODS}, got {method!r}"
        raise ValueError(msg)
    adt, wdt = np.dtype(activation_dtype), np.dtype(weight_dtype)
    for dt, nm in ((adt, "activation_dtype"), (wdt, "weight_dtype")):
        if dt not in (np.uint8, np.int8):
            msg = f"{nm} must be np.uint8 or np.int8, got {dt}"
            raise TypeError(msg)
    exclude = set(exclude)
    model = fuse_activations(model)
    qnodes = [
        n for n in model.nodes if n.op_type in _COMPUTE and not _matches(n, exclude)
    ]

    def wants_quant(t):
        if t in model.outputs:
            return False
        cons = model.consumers(t)
        return bool(cons) and all(
            (c in qnodes and c.inputs[0] == t)
            or (
                c.op_type in _TRANSPARENT
                and c.inputs[0] == t
                and wants_quant(c.outputs[0])
            )
            for c in cons
        )

    observe = set()
    for n in qnodes:
        observe.add(n.inputs[0])
        if wants_quant(n.outputs[0]):
            observe.add(n.outputs[0])
    obs = calibrate(model, calibration_data, sorted(observe), batch=batch, bins=bins)
    info = np.iinfo(adt)
    qp = {
        t: _act_params(
            *o.range(method, qmin=info.min, qmax=info.max, percentile=percentile), adt
        )
        for t, o in obs.items()
    }

    consts = dict(model.constants)
    nodes, qname, fname = [], {}, {n: n for n, _, _ in model.inputs}
    fname.update({c: c for c in consts})
    qparams = {}

    def need_q(t):
        if t not in qname:
            s, z = qp[t]
            consts[t + "_scale"], consts[t + "_zero_point"] = s, z
            nodes.append(
                G.QuantizeLinear(
                    f"{t}_quantize",
                    [fname[t], t + "_scale", t + "_zero_point"],
                    [t + "_q"],
                )
            )
            qname[t], qparams[t] = t + "_q", (s, z)
        return qname[t]

    def need_f(t):
        if t not in fname:
            s, z = qparams[t]
            consts.setdefault(t + "_scale", s)
            consts.setdefault(t + "_zero_point", z)
            nodes.append(
                G.DequantizeLinear(
                    f"{t}_dequantize", [qname[t], t + "_scale", t + "_zero_point"], [t]
                )
            )
            fname[t] = t
        return fname[t]

    for node in model.nodes:
        x = node.inputs[0] if node.inputs else None
        if node in qnodes:
            xq = need_q(x)
            xs, xz = qparams[x]
            y = node.outputs[0]
            p = node.params
            if node.op_type == "Conv":
                w = p["w"]
                w2 = w.reshape(w.shape[0], -1)  # (M, K): channels on axis 0
                ws, wz = _weight_params(w2, 0, per_channel, wdt)
                ws = _fit_bias(ws, p.get("b"), xs)
                wq = _quantize_w(w2, ws, wz, 0).reshape(w.shape)
                geo = {
                    k: p[k]
                    for k in (
                        "group",
                        "strides",
                        "pads",
                        "dilations",
                        "auto_pad",
                        "pool",
                        "nhwc_in",
                        "nhwc_out",
                    )
                    if k in p
                }
                cls = G.QLinearConv
            else:
                w = p["w"]  # (K, N): channels on axis 1
                ws, wz = _weight_params(w, 1, per_channel, wdt)
                ws = _fit_bias(ws, p.get("b"), xs)
                wq = _quantize_w(w, ws, wz, 1)
                geo, cls = {"matmul": True} if p.get("matmul") else {}, G.QGemm
            bias = None
            if p.get("b") is not None:
                acc_scale = xs.astype(np.float64) * ws.astype(np.float64)
                bias = np.clip(np.rint(p["b"] / acc_scale), -(2**31), 2**31 - 1)
                bias = np.broadcast_to(
                    bias, (wq.shape[0 if cls is G.QLinearConv else 1],)
                ).astype(np.int32)
            params = {
                "w": wq,
                "w_scale": ws,
                "w_zero_point": wz,
                "x_scale": xs,
                "x_zero_point": xz,
                "bias": bias,
                "activation": p.get("activation"),
                **geo,
            }
            if y in qp:
                ys, yz = qp[y]
                params.update(y_scale=ys, y_zero_point=yz)
                nodes.append(cls(node.name, [xq], [y + "_q"], **params))
                qname[y], qparams[y] = y + "_q", (ys, yz)
            else:
                nodes.append(cls(node.name, [xq], [y], **params))
                fname[y] = y
        elif (
            node.op_type in _TRANSPARENT
            and x in qname
            and x not in fname
            and wants_quant(node.outputs[0])
        ):
            y = node.outputs[0]
            rest = [fname.get(t, t) for t in node.inputs[1:]]
            nodes.append(_copy(node, inputs=[qname[x], *rest], outputs=[y + "_q"]))
            qname[y], qparams[y] = y + "_q", qparams[x]
        else:
            ins = [need_f(t) if t else t for t in node.inputs]
            nodes.append(_copy(node, inputs=ins))
            fname.update({t: t for t in node.outputs})
    for t in model.outputs:
        need_f(t)
    meta = {
        "quantization": {
            "method": method,
            "per_channel": bool(per_channel),
            "activation_dtype": str(adt),
            "weight_dtype": str(wdt),
            "exclude": sorted(exclude),
        }
    }
    return _graph_like(model, nodes, consts, meta)


# --------------------------------------------------------------------------- #
# fp16


def to_fp16(model, *, exclude=()):
    """Conv / Gemm in fp16-in / fp32-accumulate (lowprec.half); everything else
    (reductions, softmax, pooling, norms) stays float32."""
    G._half()
    exclude = set(exclude)
    model = fuse_activations(model)
    nodes = []
    half = {G.Conv: G.HalfConv, G.Gemm: G.HalfGemm}
    for n in model.nodes:
        cls = half.get(type(n))
        if cls is None or _matches(n, exclude):
            nodes.append(n)
            continue
        w = n.params["w"]
        big = float(np.abs(w).max(initial=0.0))
        if not big <= _F16_MAX:  # inf in float16 (or NaN weights): keep float32
            warnings.warn(
                f"to_fp16: node {n.name!r} ({n.op_type}) has weights beyond "
                f"float16's range (max |w| = {big:g} > {_F16_MAX}); it stays float32",
                RuntimeWarning,
                stacklevel=2,
            )
            nodes.append(n)
            continue
        nodes.append(_copy(n, cls=cls, params={"w": w.astype(np.float16)}))
    # the channels-last handoffs again, without the HalfConv nodes (NCHW)
    nodes = [
        type(n)(n.name, n.inputs, n.outputs,
                **{k: val for k, val in n.params.items() if k not in _HANDOFF})
        if any(k in n.params for k in _HANDOFF) else n
        for n in nodes
    ]  # fmt: skip
    model = _nhwc_handoff(_graph_like(model, nodes, meta={"fp16": True}))
    return _half_outputs(model)


def _half_outputs(model):
    """HalfConv nodes whose every consumer rounds its input to float16 (HalfConv,
    HalfGemm, directly or through a Flatten) write float16 (``out_fp16``): the
    same bits downstream for half the bytes."""

    def rounds(t):
        if t in model.outputs:
            return False
        cons = model.consumers(t)
        return bool(cons) and all(
            type(c) in (G.HalfConv, G.HalfGemm) and c.inputs[0] == t
            and t not in c.inputs[1:]
            or type(c) is G.Flatten and rounds(c.outputs[0])
            for c in cons
        )  # fmt: skip

    nodes = [
        _copy(n, params={"out_fp16": True})
        if type(n) is G.HalfConv and rounds(n.outputs[0])
        else n
        for n in model.nodes
    ]
    return _graph_like(model, nodes)


_F16_MAX = float(np.finfo(np.float16).max)  # 65504


# --------------------------------------------------------------------------- #
# pruning


def _gemm_view(node):
    """Weights as the GEMM's (rows=N outputs, K) matrix and the way back."""
    w = node.params["w"]
    if node.op_type in ("Conv", "QLinearConv", "HalfConv"):
        M = w.shape[0]
        # K in the im2col order (kh, kw, c): N:M groups run along K
        w4 = w if w.ndim == 4 else w[:, :, None, :]
        mat = w4.transpose(0, 2, 3, 1).reshape(M, -1)

        def back(m):
            return (
                m.reshape(M, *w4.shape[2:], w4.shape[1])
                .transpose(0, 3, 1, 2)
                .reshape(w.shape)
            )

        return mat, back
    return w.T, lambda m: m.T


def magnitude_mask(w, sparsity=None, pattern="unstructured"):
    """Keep-mask of a 2-D (rows, K) matrix: unstructured or N:M along K.

    Uses ``lowprec.prune.magnitude`` when it imports, else the same rule here
    (drop the smallest |w|; ties broken by position).
    """
    try:
        from .. import prune as _pr

        return _pr.magnitude(w, sparsity, pattern=pattern, axis=-1)
    except ImportError:
        pass
    a = np.abs(w.astype(np.float64))
    if isinstance(pattern, tuple | list):
        n, m = pattern
        K = w.shape[1]
        if K % m:
            msg = f"{n}:{m} pruning needs K divisible by {m}, got K={K}"
            raise ValueError(msg)
        g = a.reshape(w.shape[0], K // m, m)
        order = np.argsort(-g, axis=2, kind="stable")
        keep = np.zeros_like(g, bool)
        np.put_along_axis(keep, order[:, :, :n], True, axis=2)
        return keep.reshape(w.shape)
    k = round(float(sparsity) * a.size)
    keep = np.ones(a.size, bool)
    keep[np.argsort(a.ravel(), kind="stable")[:k]] = False
    return keep.reshape(w.shape)


def prune(model, sparsity=0.5, *, pattern="unstructured", exclude=(), min_weights=0):
    """Magnitude pruning of Conv / Gemm weights (zeroed; fold before quantize).

    ``pattern``: "unstructured" (per layer, ``sparsity`` of the weights) or an
    (n, m) tuple such as (2, 4): n kept of every m along the GEMM's K axis.
    Layers in ``exclude`` (names or op types) or with fewer than
    ``min_weights`` weights are left dense. Pruned layers run on the dense
    kernels (zeros multiply like any value); the saved file stores them sparse.
    """
    exclude = set(exclude)
    if isinstance(pattern, str) and pattern in ("2:4", "1:4", "4:8"):
        pattern = tuple(int(s) for s in pattern.split(":"))
    nodes, report = [], {}
    for n in model.nodes:
        if (
            type(n) in (G.Conv, G.Gemm)
            and not _matches(n, exclude)
            and n.params["w"].size >= min_weights
        ):
            mat, back = _gemm_view(n)
            keep = magnitude_mask(
                mat, None if isinstance(pattern, tuple) else sparsity, pattern
            )
            w = back(np.where(keep, mat, 0).astype(mat.dtype))
            nodes.append(_copy(n, params={"w": np.ascontiguousarray(w)}))
            report[n.name] = 1.0 - float(keep.mean())
        else:
            nodes.append(n)
    return _graph_like(model, nodes, meta={"pruned": report})


# --------------------------------------------------------------------------- #
# per-layer precision and sensitivity


def apply_precision(model, config, calibration_data=None, **quant_kw):
    """Per-layer precision: ``config`` maps node names to "int8", "fp16" or
    "fp32"; layers not named use ``config.get("default", "fp32")``."""
    default = config.get("default", "fp32")
    layers = [n.name for n in model.nodes if n.op_type in _COMPUTE]
    want = {name: config.get(name, default) for name in layers}
    bad = {k: p for k, p in want.items() if p not in ("int8", "fp16", "fp32")}
    if bad:
        msg = f"precision must be 'int8', 'fp16' or 'fp32', got {bad}"
        raise ValueError(msg)
    out = model
    int8 = [k for k, p in want.items() if p == "int8"]
    if int8:
        if calibration_data is None:
            msg = "calibration_data is required for int8 layers"
            raise ValueError(msg)
        out = quantize(
            out,
            calibration_data,
            exclude=[k for k in layers if k not in int8],
            **quant_kw,
        )
    half = [k for k, p in want.items() if p == "fp16"]
    if half:
        out = to_fp16(out, exclude=[k for k in layers if k not in half])
    return out


def sensitivity(model, data, calibration_data=None, *, precision="int8", **quant_kw):
    """Error each Conv/Gemm layer causes when only that layer is lowered.

    Returns ``{layer: {"rel_l2": ..., "max_abs": ..., "agreement": ...}}``
    against the float32 outputs on ``data`` (agreement: argmax over the last
    axis, for classifiers).
    """
    calibration_data = data if calibration_data is None else calibration_data
    ref = model(data)
    out = {}
    for n in model.nodes:
        if n.op_type not in _COMPUTE:
            continue
        lowered = apply_precision(
            model, {n.name: precision}, calibration_data, **quant_kw
        )
        y = lowered(data)
        d = (y.astype(np.float64) - ref).ravel()
        out[n.name] = {
            "rel_l2": float(np.linalg.norm(d) / max(np.linalg.norm(ref), 1e-30)),
            "max_abs": float(np.abs(d).max()) if d.size else 0.0,
            "agreement": float(np.mean(y.argmax(-1) == ref.argmax(-1))),
        }
    return out


__all__ = [
    "HistogramObserver",
    "apply_precision",
    "calibrate",
    "fuse_activations",
    "magnitude_mask",
    "prune",
    "quantize",
    "sensitivity",
    "to_fp16",
]
