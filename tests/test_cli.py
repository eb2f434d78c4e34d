"""The ``bus`` command line: bad flags, missing paths, unknown models, config files, the bench hook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

from bus_model.training import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_args(tmp_path, *extra):
    return ["train", "--model", "bus-tiny", "--data", "synthetic", "--out", str(tmp_path / "run"), *extra]


def test_unknown_flag_exits_2_with_message(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(_train_args(tmp_path, "--no-such-flag"))
    assert exc.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_missing_required_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--model", "bus-tiny"])
    assert exc.value.code == 2
    assert "--data" in capsys.readouterr().err


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--batch-size", "1"], "--batch-size must be >= 2"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--warmup-steps", "50", "--steps", "10"], "--warmup-steps must be in [0, --steps]"),
    ],
)
def test_bad_values_exit_2(capsys, tmp_path, extra, message):
    assert cli.main(_train_args(tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("bus train: error:") and message in err
    assert not (tmp_path / "run").exists()  # nothing written before the checks


def test_missing_data_path_exits_2(capsys, tmp_path):
    args = ["train", "--model", "bus-tiny", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "run"),
            "--tokenizer", str(tmp_path)]
    assert cli.main(args) == 2
    assert "path not found" in capsys.readouterr().err


def test_missing_shards_exit_2(capsys, tmp_path):
    args = ["train", "--model", "bus-tiny", "--data", str(tmp_path / "shard-{00000..00003}.tar"),
            "--out", str(tmp_path / "run"), "--tokenizer", str(tmp_path)]
    assert cli.main(args) == 2
    assert "not found" in capsys.readouterr().err


def test_real_data_without_tokenizer_exits_2(capsys, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "a.png", "caption": "x"}\n')
    assert cli.main(["train", "--model", "bus-tiny", "--data", str(manifest), "--out", str(tmp_path / "r")]) == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_unknown_model_exits_2(capsys, tmp_path):
    assert cli.main(["train", "--model", "bus-gigantic", "--data", "synthetic", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown model name 'bus-gigantic'" in err and "bus-tiny" in err


def test_eval_missing_checkpoint_exits_2(capsys, tmp_path):
    assert cli.main(["eval", "--checkpoint", str(tmp_path), "--data", "synthetic"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_subprocess_reports_error_and_status(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bus_model.training.cli", "train", "--model", "nope", "--data", "synthetic", "--out",
         str(tmp_path / "r")], capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2
    assert "bus train: error: --model: unknown model name 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr


def _parse_train(argv):
    sub = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    return cli._parse(sub, argv)


def test_config_file_yaml_and_command_line_override(tmp_path):
    pytest.importorskip("yaml")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: bus-tiny\ndata: synthetic\nout: /tmp/x\nbatch-size: 8\nlr: 3e-4\nresume: true\n"
                   "betas: [0.8, 0.9]\n")
    args = _parse_train(["--config", str(cfg), "--batch-size", "4"])
    assert args.model == "bus-tiny" and args.data == "synthetic" and args.out == "/tmp/x"
    assert args.batch_size == 4  # the command line wins
    assert args.lr == pytest.approx(3e-4) and isinstance(args.lr, float)  # YAML's "3e-4" is a string
    assert args.resume is True and list(args.betas) == [0.8, 0.9]


def test_config_file_json(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": "bus-tiny", "data": "synthetic", "out": "o", "steps": 7, "amp": False}))
    args = _parse_train(["--config", str(cfg)])
    assert (args.steps, args.amp, args.out) == (7, False, "o")


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"model": "bus-tiny", "not_a_flag": 1}', "unknown option 'not_a_flag'"),
        ('{"steps": "many"}', "steps: invalid value"),
        ('{"resume": "yes"}', "resume takes true or false"),
        ("[1, 2]", "expected a mapping"),
        ("{not json", "invalid JSON"),
    ],
)
def test_bad_config_file_exits_2(capsys, tmp_path, content, message):
    cfg = tmp_path / "bad.json"
    cfg.write_text(content)
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--config", str(cfg), "--model", "bus-tiny", "--data", "synthetic", "--out", "o"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_config_file_exits_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", "--config", str(tmp_path / "none.yaml")])
    assert exc.value.code == 2
    assert "file not found" in capsys.readouterr().err


def test_bench_dispatches_to_bus_benchmarks(monkeypatch):
    seen = []
    pkg = types.ModuleType("bus_benchmarks")
    mod = types.ModuleType("bus_benchmarks.cli")
    mod.main = lambda argv: seen.append(list(argv)) or 0
    pkg.cli = mod
    monkeypatch.setitem(sys.modules, "bus_benchmarks", pkg)
    monkeypatch.setitem(sys.modules, "bus_benchmarks.cli", mod)
    assert cli.main(["bench", "pruning", "--json", "x.json"]) == 0
    assert seen == [["pruning", "--json", "x.json"]]


def test_bench_without_benchmarks_fails_clearly(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bus_benchmarks", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "bus_benchmarks.cli", None)
    assert cli.main(["bench", "anything"]) == 2
    assert "benchmarks are not installed" in capsys.readouterr().err


def test_bus_model_imports_without_training_extras():
    code = (
        "import sys\n"
        "for name in ('tqdm', 'yaml', 'pycocoevalcap', 'torch.utils.tensorboard', 'tensorboard'):\n"
        "    sys.modules[name] = None\n"
        "import bus_model, bus_model.training.train, bus_model.training.evaluate, bus_model.training.cli, bus_model.training.checkpoint\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_console_script_is_declared():
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["scripts"]["bus"] == "bus_model.training.cli:main"
    for extra in ("train", "test"):
        names = " ".join(project["optional-dependencies"][extra])
        assert "pycocoevalcap" in names and "tqdm" in names and "pyyaml" in names


def test_tensorboard_missing_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    rc = cli.main(_train_args(tmp_path, "--steps", "1", "--batch-size", "2", "--train-samples", "4", "--tensorboard",
                              "--num-threads", "1", "--no-progress"))
    assert rc == 2
    assert "--tensorboard needs the tensorboard package" in capsys.readouterr().err


def test_fresh_run_into_an_existing_run_directory_exits_2(capsys, tmp_path):
    """Starting over in a directory with checkpoints would mix two runs (``bus eval`` picks the newest
    step): refused unless --resume."""
    args = _train_args(tmp_path, "--steps", "1", "--batch-size", "2", "--train-samples", "4", "--num-threads", "1",
                       "--no-progress")
    assert cli.main(args) == 0
    assert cli.main(args) == 2
    assert "already holds a run (checkpoint at step 1): pass --resume" in capsys.readouterr().err
