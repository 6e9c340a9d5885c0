"""The ``lowprec`` command.

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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = build_parser().parse_args(argv)
    return opts.func(opts, argv)


if __name__ == "__main__":
    sys.exit(main())
