"""bus bench <name>: speed, FLOPs, memory and accuracy-vs-time benchmarks of BUS, its rivals, kernels and patches.

``bus`` is bus_model.training.cli; this is its bench group.

The benchmarks are listed in ``registry.BENCHMARKS``; adding one there adds its subcommand here.
"""

from __future__ import annotations

import argparse
import sys

from .command import configure_parser
from .registry import BENCHMARKS

__all__ = ["BENCHMARKS", "build_parser", "main", "run_args"]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from bus_model.training.command import CommandParser  # one-line errors, like the other bus commands

    parser = parser or CommandParser(prog="bus bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    for name, module in BENCHMARKS.items():
        p = sub.add_parser(name, help=module.__doc__.splitlines()[0].split(": ", 1)[-1])
        configure_parser(p, module.__doc__, module.add_arguments)
    return parser


def run_args(args: argparse.Namespace) -> int:
    return BENCHMARKS[args.benchmark].main_from_args(args)


def main(argv: list[str] | None = None) -> int:
    return run_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
