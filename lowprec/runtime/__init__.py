"""lowprec.runtime: a small reference graph runtime on lowprec's kernels.

Load a model (ONNX through the optional ``onnx`` package, or a torch zip
checkpoint without torch), transform it (static INT8, fp16, pruning), run it,
save it without pickle and export it back to ONNX. See docs/runtime.md.
"""

from .graph import Graph, Node, RuntimeGraphError
from .transforms import (
    apply_precision,
    fuse_activations,
    prune,
    quantize,
    sensitivity,
    to_fp16,
)

__all__ = [
    "Graph",
    "Node",
    "RuntimeGraphError",
    "apply_precision",
    "cli_run",
    "export_onnx",
    "fuse_activations",
    "load",
    "load_onnx",
    "prune",
    "quantize",
    "save",
    "sensitivity",
    "to_fp16",
]


def load_onnx(path_or_model, **kw):
    from .onnx_loader import load_onnx as _load

    return _load(path_or_model, **kw)


def save(model, path):
    from .serialize import save as _save

    return _save(model, path)


def load(path):
    from .serialize import load as _load

    return _load(path)


def export_onnx(model, path, **kw):
    from .serialize import export_onnx as _export

    return _export(model, path, **kw)


def cli_run(argv=None):
    from .demo import cli_run as _run

    return _run(argv)
