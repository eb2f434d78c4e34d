"""Disk faults (issue 15): a checkpoint write that fails (ENOSPC from the writer) keeps the previous
checkpoint intact and stops with one clear error; a truncated or corrupt newest checkpoint makes
``--resume`` fall back to the previous valid one with a warning naming it, or fail clearly when none is
valid; garbage is never loaded."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch

from bus_model.model import BusModel
from bus_model.training import checkpoint as ckpt
from bus_model.training import cli

ARGS = ["--model", "bus-tiny", "--data", "synthetic", "--num-threads", "1", "--no-progress", "--batch-size", "4",
        "--train-samples", "16", "--log-every", "1", "--save-every", "2", "--lr", "1e-3", "--warmup-steps", "1"]
VOLATILE = ("images_per_s", "tokens_per_s")


def _rows(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in f]


def _train(out, *extra) -> int:
    return cli.main(["train", *ARGS, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("disk") / "run"
    assert _train(out, "--steps", "4") == 0
    assert [c.step for c in ckpt.list_checkpoints(out)] == [2, 4]
    return out


@pytest.fixture
def run(four_steps, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(four_steps, copy)
    return copy


def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_enospc_while_writing_a_checkpoint_keeps_the_previous_one_and_stops_clearly(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    original, calls = torch.save, {"n": 0}

    def filling_disk(obj, f, *args, **kwargs):  # the second checkpoint's writer hits a full disk half way
        calls["n"] += 1
        if calls["n"] == 2:
            with open(f, "wb") as half:
                half.write(b"\0" * 100)
            _no_space()
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", filling_disk)
    assert _train(out, "--steps", "4") == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("bus train: error: could not write the checkpoint of step 4")
    assert "No space left on device" in lines[0] and "step_00000002) is intact" in lines[0] and "--resume" in lines[0]
    assert "Traceback" not in err
    # the previous checkpoint: the only entry, verified and loadable; no temporary directory left over
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]
    previous = ckpt.latest_checkpoint(out)
    assert ckpt.verify_checkpoint(previous.path) is None
    BusModel.from_pretrained(previous.path)
    assert ckpt.load_training_state(previous.path).trainer_state["step"] == 2
    monkeypatch.undo()
    assert _train(out, "--steps", "4", "--resume") == 0  # space freed: the run continues
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]


def test_enospc_on_the_summary_is_one_error_line_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    original = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "summary.json":
            _no_space()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "run"
    assert _train(out, "--steps", "2") == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("bus train: error: [Errno 28] No space left on device")
    assert ckpt.verify_checkpoint(ckpt.latest_checkpoint(out).path) is None
    assert [r["step"] for r in _rows(out)] == [1, 2]


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "flipped_weight_byte": lambda d: _flip_byte(d / "model.safetensors"),
    "truncated_training_state": lambda d: _truncate(d / ckpt.TRAINING_STATE_FILE),
    "truncated_trainer_state": lambda d: _truncate(d / ckpt.TRAINER_STATE_FILE),
    "missing_weights": lambda d: (d / "model.safetensors").unlink(),
    "missing_checksums": lambda d: (d / ckpt.CHECKSUMS_FILE).unlink(),
    "garbage_checksums": lambda d: (d / ckpt.CHECKSUMS_FILE).write_text("{not json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(run, damage, capsys):
    newest = run / "checkpoints" / "step_00000004"
    DAMAGE[damage](newest)
    reason = ckpt.verify_checkpoint(newest)
    assert reason is not None
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step_00000002") is None
    before = _rows(run)
    assert _train(run, "--steps", "4", "--resume") == 0
    err = capsys.readouterr().err
    assert f"warning: --resume: skipping {newest}: {reason}" in err and "resuming from step_00000002" in err
    assert "resuming from" in err and "(step 2)" in err
    # steps 3 and 4 were run again from step 2's state: the same numbers as the first time
    assert _rows(run) == before
    assert (run / "checkpoints" / "step_00000004.corrupt").is_dir()  # kept for inspection, never listed
    assert [c.step for c in ckpt.list_checkpoints(run)] == [2, 4]
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step_00000004") is None
    if damage == "flipped_weight_byte":  # the same fault again: the second copy is kept beside the first
        DAMAGE[damage](newest)
        assert _train(run, "--steps", "4", "--resume") == 0
        assert (run / "checkpoints" / "step_00000004.corrupt-1").is_dir()


def test_no_valid_checkpoint_fails_clearly_and_loads_nothing(run, capsys):
    for d in (run / "checkpoints").iterdir():
        _flip_byte(d / "model.safetensors")
    listing = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert _train(run, "--steps", "6", "--resume") == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("bus train: error: --resume: no valid checkpoint in ")
    assert "step_00000004: model.safetensors is corrupt" in lines[0] and "step_00000002" in lines[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == listing  # nothing renamed or deleted


def test_eval_side_resolve_skips_a_damaged_newest_checkpoint(run):
    _truncate(run / "checkpoints" / "step_00000004" / "model.safetensors")
    with pytest.warns(UserWarning, match="step_00000004: model.safetensors has"):
        assert ckpt.resolve_checkpoint(run).name == "step_00000002"
    _truncate(run / "checkpoints" / "step_00000002" / "config.json")
    with pytest.raises(FileNotFoundError, match="no valid checkpoint"):
        ckpt.resolve_checkpoint(run)


def test_checksums_list_every_file_with_size_and_sha256(run):
    import hashlib

    d = run / "checkpoints" / "step_00000004"
    listed = json.loads((d / ckpt.CHECKSUMS_FILE).read_text())
    on_disk = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != ckpt.CHECKSUMS_FILE)
    assert sorted(listed) == on_disk and set(ckpt.REQUIRED_FILES) <= set(listed)
    for name, entry in listed.items():
        data = (d / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
