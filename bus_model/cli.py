"""The ``bus`` command: ``bus train``, ``bus eval`` and ``bus bench`` (the benchmarks, in ``bus_benchmarks``).

    bus train --model bus-tiny --data synthetic --out runs/tiny --steps 200
    bus train --config run.yaml --steps 400          # flags from a file; the command line wins
    bus eval --checkpoint runs/tiny --data synthetic --json runs/tiny/eval.json
    bus bench ...                                      # dispatched to bus_benchmarks.cli.main

A ``--config`` file is YAML (``.yaml``/``.yml``, needs PyYAML) or JSON: a mapping from flag names
(``batch-size`` or ``batch_size``) to values; a flag that takes no value (``--resume``) takes
``true``/``false``. Unknown keys are an error. Errors in the command line, a missing data path or an
unknown model name print one line ``bus <command>: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any


def _load_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ValueError(f"--config: file not found: {path}")
    text = open(path, encoding="utf-8").read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ValueError("--config: reading YAML needs PyYAML (pip install pyyaml), or use a .json file") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"--config {path}: invalid YAML ({err})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--config {path}: invalid JSON ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return data


def _config_defaults(parser: argparse.ArgumentParser, data: dict[str, Any], path: str) -> dict[str, Any]:
    """Map config-file keys onto the parser's destinations, converting values like the command line
    would (``type=`` applied to strings; lists for ``nargs``)."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    out = {}
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions:
            raise ValueError(f"--config {path}: unknown option {key!r}; known: {', '.join(sorted(actions))}")
        action = actions[dest]
        if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise ValueError(f"--config {path}: {key} takes true or false, got {value!r}")
        elif action.type is not None and value is not None:
            try:
                value = [action.type(v) for v in value] if isinstance(value, list) else action.type(value)
            except (TypeError, ValueError):
                raise ValueError(f"--config {path}: {key}: invalid value {value!r}") from None
        out[dest] = value
        action.required = False  # given by the file; the command line may still override it
    return out


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with defaults from ``--config FILE`` when given."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        try:
            parser.set_defaults(**_config_defaults(parser, _load_config_file(known.config), known.config))
        except ValueError as err:
            parser.error(str(err))
    return parser.parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    from .evaluate import add_eval_arguments
    from .train import add_train_arguments

    parser = argparse.ArgumentParser(prog="bus", description="BUS vision-language pre-training: train, evaluate, benchmark")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,bench}")
    for name, add, text in (("train", add_train_arguments, "pre-train a model"),
                            ("eval", add_eval_arguments, "retrieval and captioning metrics of a checkpoint")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", help="YAML or JSON file of flag values (the command line overrides them)")
        add(p)
    bench = sub.add_parser("bench", help="speed / memory benchmarks (bus_benchmarks)", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to bus_benchmarks.cli")
    return parser


def _run_bench(argv: list[str]) -> int:
    try:
        bench_cli = importlib.import_module("bus_benchmarks.cli")
    except ImportError as err:
        print(f"bus bench: error: the benchmarks are not installed (cannot import bus_benchmarks.cli: {err}); "
              "install the repository with `pip install -e .` from a checkout that has them", file=sys.stderr)
        return 2
    return int(bench_cli.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bus`` console script; returns the exit status."""
    from .train import UsageError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _run_bench(argv[1:])
    parser = build_parser()
    if not argv or argv[0] not in ("train", "eval"):
        args = parser.parse_args(argv)  # prints usage / the unknown command and exits 2
    sub = parser._subparsers._group_actions[0].choices[argv[0]]
    args = _parse(sub, argv[1:])
    try:
        if argv[0] == "train":
            from .train import train

            train(args)
        else:
            from .evaluate import evaluate_cli

            evaluate_cli(args)
    except UsageError as err:
        print(f"bus {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
