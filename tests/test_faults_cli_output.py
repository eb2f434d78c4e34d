"""Output a person reads (issue 15): one-line errors for bad and missing flags, --help with defaults and
model names, plain-text bench help, no ``nan`` placeholders, a line per phase and per file written."""

from __future__ import annotations

import json

import pytest
import torch

from bus_model.config import list_config_names
from bus_model.training import cli


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("argv,message", [
    (["train", "--model", "bus-tiny"], "the following arguments are required: --data, --out"),
    (["train", "--model", "bus-tiny", "--data", "synthetic", "--out", "x", "--no-such-flag"],
     "unrecognized arguments: --no-such-flag"),
    (["train", "--model", "bus-tiny", "--data", "synthetic", "--out", "x", "--steps", "ten"],
     "argument --steps: invalid int value: 'ten'"),
    (["eval"], "the following arguments are required: --checkpoint, --data"),
])
def test_bad_or_missing_flags_print_one_error_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines  # no usage block before it
    command = argv[0]
    assert lines[0].startswith(f"bus {command}: error: ") and message in lines[0]
    assert f"(see `bus {command} --help`)" in lines[0]


def test_bench_errors_are_one_line_too(capsys):
    from bus_benchmarks import cli as bench

    with pytest.raises(SystemExit) as exc:
        bench.main(["train", "--steps", "x"])
    assert exc.value.code == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("bus bench train: error: argument --steps")
    with pytest.raises(SystemExit, match=r"^bus bench train: error: --steps must be >= 1"):
        bench.main(["train", "--steps", "0"])


def test_train_help_shows_defaults_and_model_names(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo the line wrapping
    for name in list_config_names():
        assert name in text
    assert "list_models()" not in text
    for flag, default in (("--steps STEPS", "1000"), ("--batch-size BATCH_SIZE", "32"), ("--lr LR", "0.0001"),
                          ("--seed SEED", "0"), ("--max-skip-share MAX_SKIP_SHARE", "0.5"),
                          ("--betas B1 B2", "(0.9, 0.999)")):
        after = text.split(flag, 2)[-1]  # the option's entry (after its mention in the usage line)
        assert f"(default: {default})" in after.split(" --", 1)[0], flag


def test_bench_help_is_plain_text(capsys):
    from bus_benchmarks import cli as bench

    for argv in (["--help"], ["train", "--help"]):
        with pytest.raises(SystemExit):
            bench.main(argv)
        out = capsys.readouterr().out
        assert "``" not in out and "bus bench" in out
    with pytest.raises(SystemExit):
        bench.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: bus-small)" in text or "default bus-small" in text


def test_bench_train_logs_warmup_times_every_phase_and_every_file(tmp_path, monkeypatch, capsys):
    """No 'nan' for warm-up steps; a line before FLOP counting and each memory probe; a 'wrote' line for
    the JSON and the plot. The training step is stubbed: this checks what is printed, not the numbers."""
    from bus_benchmarks import harness, train_speed

    monkeypatch.setattr(train_speed, "make_step", lambda *a, **k: (lambda batch: torch.tensor(1.0)))
    monkeypatch.setattr(train_speed, "training_flops_per_sample", lambda model, batch: 7)
    monkeypatch.setattr(train_speed, "measure_memory", lambda name, settings: {"peak_memory_mib": 1.0})
    settings = train_speed.TrainBenchSettings.quick()
    settings.warmup, settings.steps = 2, 3
    logged = []
    result = train_speed.run(settings, device=torch.device("cpu"), log=logged.append)
    assert not any("nan" in line for line in logged), logged
    assert [line.split(":")[0] for line in logged[:5]] == [
        "warm-up step 1/2 (not measured)", "warm-up step 2/2 (not measured)", "step 1/3", "step 2/3", "step 3/3"]
    assert sum("counting the training FLOPs per sample" in line for line in logged) == 2
    assert sum("measuring the peak memory" in line for line in logged) == 2
    json_path, png = tmp_path / "r.json", tmp_path / "r.png"
    harness.publish(result, train_speed.render(result), str(json_path), train_speed.plot(result, str(png)))
    err = capsys.readouterr().err
    assert f"wrote {json_path}" in err and json.loads(json_path.read_text())["benchmark"] == "train"
    if png.exists():  # matplotlib installed
        assert f"wrote {png}" in err
