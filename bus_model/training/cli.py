"""The ``bus`` command: ``bus train``, ``bus eval`` and ``bus bench`` (the benchmarks, in ``bus_benchmarks``).

    bus train --model bus-tiny --data synthetic --out runs/tiny --steps 200
    bus train --config run.yaml --steps 400          # flags from a file; the command line wins (command.py)
    bus eval --checkpoint runs/tiny --data synthetic --json runs/tiny/eval.json
    bus bench ...                                      # dispatched to bus_benchmarks.cli.main

Errors in the command line, a missing data path or an unknown model name print one line
``bus <command>: error: ...`` and exit with status 2.

Adding a subcommand is one entry in ``SUBCOMMANDS``: the module (imported only when the subcommand
runs or its flags are needed) defines ``add_arguments(parser)`` and ``run(args) -> int | None``, or, with
``own_parser=True``, ``main(argv) -> int`` that parses its arguments itself (as ``bus bench`` does).
The modules never import this one (no import circles; tests/test_import_layout.py checks it).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from .command import CommandParser, HelpFormatter, add_config_flag, parse_with_config, run_command


@dataclass(frozen=True)
class Subcommand:
    module: str  # dotted module name, imported lazily
    help: str
    own_parser: bool = False  # the module's main(argv) parses everything after the subcommand name
    missing: str | None = None  # what to tell the user when the module cannot be imported (optional parts)


SUBCOMMANDS: dict[str, Subcommand] = {
    "train": Subcommand("bus_model.training.train", "pre-train a model"),
    "eval": Subcommand("bus_model.training.evaluate", "retrieval and captioning metrics of a checkpoint"),
    "bench": Subcommand("bus_benchmarks.cli", "speed / memory benchmarks (bus_benchmarks)", own_parser=True,
                        missing="the benchmarks are not installed"),
    "selftest": Subcommand("bus_benchmarks.selftest", "first run on a new machine (on a GPU, run this first): "
                           "kernels vs float64, dispatch, timings, a training step, host syncs", own_parser=True,
                           missing="the benchmarks are not installed"),
}

_parse = parse_with_config  # the name the tests use


def build_parser() -> argparse.ArgumentParser:
    """The whole ``bus`` parser; imports the modules of the subcommands that use it for their flags."""
    parser = CommandParser(prog="bus", description="BUS vision-language pre-training: train, evaluate, benchmark")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, command in SUBCOMMANDS.items():
        if command.own_parser:
            p = sub.add_parser(name, help=command.help, add_help=False)
            p.add_argument("args", nargs=argparse.REMAINDER, help=f"passed to {command.module}")
            continue
        p = sub.add_parser(name, help=command.help, description=command.help, formatter_class=HelpFormatter)
        add_config_flag(p)
        importlib.import_module(command.module).add_arguments(p)
    return parser


def _run_own_parser(name: str, command: Subcommand, argv: list[str]) -> int:
    try:
        module = importlib.import_module(command.module)
    except ImportError as err:
        if command.missing is None:
            raise
        print(f"bus {name}: error: {command.missing} (cannot import {command.module}: {err}); "
              "install the repository with `pip install -e .` from a checkout that has them", file=sys.stderr)
        return 2
    return int(module.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bus`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = SUBCOMMANDS.get(argv[0]) if argv else None
    if command is not None and command.own_parser:
        return _run_own_parser(argv[0], command, argv[1:])
    parser = build_parser()
    if command is None:
        parser.parse_args(argv)  # prints usage / help / the unknown command and exits
    sub = parser._subparsers._group_actions[0].choices[argv[0]]
    module = importlib.import_module(command.module)
    return run_command(argv[0], module.add_arguments, module.run, argv[1:], parser=sub)


if __name__ == "__main__":
    sys.exit(main())
