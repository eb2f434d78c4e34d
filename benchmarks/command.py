"""One benchmark's parser, shared by ``bus bench <name>`` (``cli``) and ``python -m bus_benchmarks.<module>``
(each module's ``main``), so that no benchmark module imports the CLI that imports it."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable


def configure_parser(parser: argparse.ArgumentParser, doc: str | None,
                     add_arguments: Callable[[argparse.ArgumentParser], Any]) -> argparse.ArgumentParser:
    """The module docstring as the description (layout kept, reST ``code`` marks dropped: --help is plain
    text), then the benchmark's flags, shown with their defaults."""
    from bus_model.training.command import HelpFormatter

    parser.description = doc.replace("``", "") if doc else doc
    parser.formatter_class = HelpFormatter
    add_arguments(parser)
    return parser


def run_standalone(name: str, doc: str | None, add_arguments: Callable[[argparse.ArgumentParser], Any],
                   main_from_args: Callable[[argparse.Namespace], int], argv: list[str] | None = None) -> int:
    """``python -m bus_benchmarks.<module> ...``: the same flags and behaviour as ``bus bench <name> ...``."""
    from bus_model.training.command import CommandParser  # one-line errors, as `bus bench <name>` gives

    parser = configure_parser(CommandParser(prog=f"bus bench {name}"), doc, add_arguments)
    return main_from_args(parser.parse_args(sys.argv[1:] if argv is None else argv))
