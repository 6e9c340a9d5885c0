"""The ``lowprec`` command.

    lowprec demo [--limit N] [...]    the main job: a pretrained MNIST CNN in fp32,
                                      int8, fp16 and pruned, against onnxruntime
    lowprec run MODEL.onnx [...]      load, transform and run an ONNX model
    lowprec bench [--quick] [...]     benchmark lowprec against installed baselines

Subcommands register themselves in :func:`build_parser`; each has a
``func(opts, argv)`` that does the work, so more (``demo``, ``run``) can be
added beside ``bench`` without touching the others.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _bench(opts: argparse.Namespace, argv: list[str]) -> int:
    from . import bench

    bench.run(opts, argv)
    return 0


def _demo(opts: argparse.Namespace, argv: list[str]) -> int:
    from .runtime import demo

    return demo.main(argv[1:]) or 0


def _run(opts: argparse.Namespace, argv: list[str]) -> int:
    from .runtime import cli_run

    return cli_run(argv[1:]) or 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, bench

    p = argparse.ArgumentParser(
        prog="lowprec",
        description="Hand-written numba kernels for low-precision inference "
        "with ONNX-exact numerics.",
    )
    p.add_argument("--version", action="version", version=f"lowprec {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    pb = sub.add_parser(
        "bench",
        help="benchmark lowprec against installed baselines (onnxruntime, torch, "
        "numpy); start with `lowprec bench --quick`",
        description="Run a benchmark suite: lowprec and every installed baseline "
        "side by side, same inputs, same thread count. Prints a table and writes "
        "JSON (see bench/make_readme_table.py for the README table).",
    )
    bench.add_arguments(pb)
    pb.set_defaults(func=_bench)

    # demo and run parse their own options (lowprec demo --help)
    pd = sub.add_parser(
        "demo",
        help="the main job: a real pretrained MNIST CNN in fp32 / int8 / fp16 / "
        "pruned on lowprec kernels, against onnxruntime",
        add_help=False,
    )
    pd.add_argument("rest", nargs=argparse.REMAINDER)
    pd.set_defaults(func=_demo)
    pr = sub.add_parser(
        "run", help="load, transform and run an ONNX model", add_help=False
    )
    pr.add_argument("rest", nargs=argparse.REMAINDER)
    pr.set_defaults(func=_run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("demo", "run"):
        # their own parsers see every option, --help included
        return (_demo if argv[0] == "demo" else _run)(argparse.Namespace(), argv)
    opts = build_parser().parse_args(argv)
    return opts.func(opts, argv)


if __name__ == "__main__":
    sys.exit(main())
