"""Adding a ``bus`` subcommand or a ``bus bench`` benchmark is one table entry (ARCHITECTURE.md,
"Where to add"), and the modules' own ``main`` / ``python -m`` entries work without the CLI."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types

import pytest

from bus_benchmarks import cli as bench_cli
from bus_benchmarks import readme_results, registry
from bus_model.training import cli
from bus_model.training.errors import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_subcommand(seen: list):
    mod = types.ModuleType("fake_bus_hello")

    def add_arguments(parser):
        parser.add_argument("--name", required=True)
        parser.add_argument("--times", type=int, default=1)

    def run(args):
        if args.name == "bad":
            raise UsageError("--name: bad is not a name")
        seen.append((args.name, args.times))
        return 0

    mod.add_arguments, mod.run = add_arguments, run
    return mod


def test_a_new_subcommand_is_one_table_entry(monkeypatch, capsys, tmp_path):
    seen = []
    monkeypatch.setitem(sys.modules, "fake_bus_hello", _fake_subcommand(seen))
    monkeypatch.setitem(cli.SUBCOMMANDS, "hello", cli.Subcommand("fake_bus_hello", "say hello"))
    assert cli.main(["hello", "--name", "x", "--times", "3"]) == 0
    assert seen == [("x", 3)]
    # --config files work for it too (command.py), the command line still wins
    cfg = tmp_path / "h.json"
    cfg.write_text('{"name": "from-file", "times": 2}')
    assert cli.main(["hello", "--config", str(cfg), "--times", "5"]) == 0
    assert seen[-1] == ("from-file", 5)
    # a UsageError is one line and status 2
    assert cli.main(["hello", "--name", "bad"]) == 2
    assert "bus hello: error: --name: bad is not a name" in capsys.readouterr().err
    # and it is listed in the help
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "hello" in out and "say hello" in out


def test_an_own_parser_subcommand_gets_the_rest_of_the_line(monkeypatch):
    seen = []
    mod = types.ModuleType("fake_bus_selftest")
    mod.main = lambda argv: seen.append(list(argv)) or 3
    monkeypatch.setitem(sys.modules, "fake_bus_selftest", mod)
    monkeypatch.setitem(cli.SUBCOMMANDS, "selftest", cli.Subcommand("fake_bus_selftest", "x", own_parser=True))
    assert cli.main(["selftest", "--quick", "-k", "topk"]) == 3
    assert seen == [["--quick", "-k", "topk"]]


def test_a_missing_required_module_is_not_swallowed(monkeypatch):
    """Only subcommands marked optional (``missing=``) turn an ImportError into a message."""
    monkeypatch.setitem(sys.modules, "fake_bus_broken", None)
    monkeypatch.setitem(cli.SUBCOMMANDS, "broken", cli.Subcommand("fake_bus_broken", "x", own_parser=True))
    with pytest.raises(ImportError):
        cli.main(["broken"])


def test_a_new_benchmark_is_one_registry_entry(monkeypatch, tmp_path):
    seen = []
    mod = types.ModuleType("bus_benchmarks.fake_quality")
    mod.__doc__ = "``bus bench quality``: a fake benchmark.\n\nLonger text."
    mod.add_arguments = lambda p: p.add_argument("--budget", type=float, default=1.0)
    mod.main_from_args = lambda args: seen.append(args.budget) or 0
    mod.render = lambda result: f"| budget | {result['budget']} |"
    monkeypatch.setitem(registry.BENCHMARKS, "quality", mod)
    assert bench_cli.main(["quality", "--budget", "2.5"]) == 0
    assert seen == [2.5]
    assert "quality" in bench_cli.build_parser().format_help()
    # readme_results renders its results from the same table
    (tmp_path / "q.json").write_text('{"benchmark": "quality", "budget": 7, "device": "cpu", "commit": "abc", '
                                     '"date": "d", "command": "bus bench quality"}')
    assert "| budget | 7 |" in readme_results.render_results(str(tmp_path))


def test_benchmark_main_parses_its_own_flags(capsys):
    """A benchmark module's ``main`` builds its parser itself (``command.run_standalone``)."""
    from bus_benchmarks import flops

    with pytest.raises(SystemExit) as exc:
        flops.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: bus bench flops") and "--resolutions" in out
    with pytest.raises(SystemExit) as exc:
        flops.main(["--no-such-flag"])
    assert exc.value.code == 2


def test_training_module_main_runs_without_the_cli(capsys, tmp_path):
    """``python -m bus_model.training.train`` parses and reports errors like ``bus train``."""
    from bus_model.training import evaluate, train

    assert train.main(["--model", "bus-gigantic", "--data", "synthetic", "--out", str(tmp_path / "r")]) == 2
    assert "bus train: error: --model: unknown model name 'bus-gigantic'" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(tmp_path), "--data", "synthetic"]) == 2
    assert "bus eval: error:" in capsys.readouterr().err
    assert isinstance(train.add_arguments(argparse.ArgumentParser()), argparse.ArgumentParser)


@pytest.mark.parametrize("argv, expect", [
    (["-m", "bus_model.training", "--help"], "{train,eval,bench,selftest}"),
    (["-m", "bus_model.training", "bench", "--help"], "usage: bus bench"),
    (["-m", "bus_model.training.train", "--help"], "usage: bus train"),
    (["-m", "bus_benchmarks.kernels", "--help"], "usage: bus bench kernels"),
])
def test_module_entry_points(argv, expect):
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert expect in proc.stdout
