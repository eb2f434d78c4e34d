"""Running one ``bus`` subcommand: its parser (with ``--config FILE``), flag values from a YAML or JSON
file, and the one-line ``bus <command>: error: ...`` / exit status 2 for a bad command line (argparse's own
errors included: ``CommandParser``), ``--help`` with the defaults (``HelpFormatter``).

A ``--config`` file is YAML (``.yaml``/``.yml``, needs PyYAML) or JSON: a mapping from flag names
(``batch-size`` or ``batch_size``) to values; a flag that takes no value (``--resume``) takes
``true``/``false``. Unknown keys are an error. Shared by ``bus`` (``cli``) and the subcommand modules'
own ``main`` (``python -m bus_model.training.train``), which therefore never import ``cli``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from typing import Any, Callable

from ..data.health import DataError
from .errors import RunError, UsageError


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` keeps the description's layout and shows every flag's default (unless it is None/False or
    the help text already says it)."""

    def _default_text(self, action: argparse.Action) -> bool:
        d = action.default
        return (bool(action.option_strings) and not action.required and d is not None and d is not False
                and d != [] and d is not argparse.SUPPRESS and "default" not in (action.help or "")
                and action.nargs != 0)

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._default_text(action):
            action.help = "(default: %(default)s)"  # a flag without help text still shows its default
        return super()._format_action(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        # never wrap inside a hyphenated name (bus-base-384-baseline, --max-skip-share)
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if self._default_text(action):
            text += (" " if text else "") + "(default: %(default)s)"
        return text


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``bus <command>: error: ... (see bus <command>
    --help)``, exit status 2, as for every other bad command line (README); no usage block first.
    Subparsers made from it are of the same class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


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


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with defaults from ``--config FILE`` when given."""
    pre = CommandParser(prog=parser.prog, add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        try:
            parser.set_defaults(**_config_defaults(parser, _load_config_file(known.config), known.config))
        except ValueError as err:
            parser.error(str(err))
    return parser.parse_args(argv)


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML or JSON file of flag values (the command line overrides them)")


def run_command(name: str, add_arguments: Callable[[argparse.ArgumentParser], Any],
                run: Callable[[argparse.Namespace], int | None], argv: list[str],
                parser: argparse.ArgumentParser | None = None) -> int:
    """Parse ``argv`` for ``bus <name>`` (a fresh parser unless given one already holding the flags) and
    run it; a ``UsageError`` prints ``bus <name>: error: ...`` and returns 2."""
    if parser is None:
        parser = CommandParser(prog=f"bus {name}")
        add_config_flag(parser)
        add_arguments(parser)
    args = parse_with_config(parser, argv)
    try:
        return int(run(args) or 0)
    except UsageError as err:
        print(f"bus {name}: error: {err}", file=sys.stderr)
        return 2
    except (RunError, DataError) as err:  # the run cannot go on: say why in one line, no traceback
        print(f"bus {name}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if err.errno not in _DISK_ERRNOS:
            raise
        # a write that failed outside a checkpoint (metrics, summary, tokenizer): files written before stay
        print(f"bus {name}: error: {err} (the disk is full, over quota, read-only or failing); what was written "
              "before is intact: free space or fix the directory, then run the command again (bus train: with "
              "--resume)", file=sys.stderr)
        return 1
