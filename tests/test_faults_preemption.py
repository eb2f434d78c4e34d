"""Preemption (issue 15): SIGTERM / SIGUSR1 make ``bus train`` finish its step, checkpoint and exit with
128 + the signal number; ``--resume`` then continues exactly as if nothing had happened."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bus_model.training import checkpoint as ckpt
from bus_model.training import cli
from bus_model.training.preemption import exit_status

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--model", "bus-tiny", "--data", "synthetic", "--num-threads", "1", "--no-progress", "--steps", "6",
          "--batch-size", "4", "--train-samples", "20", "--log-every", "1", "--save-every", "100", "--lr", "1e-3",
          "--warmup-steps", "2"]
VOLATILE = ("images_per_s", "tokens_per_s")


def _rows(out) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in f if line.endswith("\n")]


def _env(tmp_path) -> dict:
    # TMPDIR: whatever a child writes to the temp dir stays under pytest's tmp_path
    return dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))


def _start(out, tmp_path, *extra):
    cmd = [sys.executable, "-m", "bus_model.training.train", *COMMON, "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=_env(tmp_path), start_new_session=True)


def _signal_after_rows(proc, out, rows: int, send) -> tuple[int, str]:
    deadline = time.monotonic() + 240
    while len(_rows(out)) < rows:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)
    send(proc)
    _, err = proc.communicate(timeout=240)
    return proc.returncode, err


@pytest.mark.parametrize("signum,workers,to_group", [(signal.SIGTERM, 0, False), (signal.SIGUSR1, 1, True)])
def test_signal_checkpoints_and_resume_matches_the_uninterrupted_run(tmp_path, signum, workers, to_group):
    """SIGTERM to the trainer; SIGUSR1 to its whole process group, DataLoader worker included (as SLURM
    signals every process of a job): the worker must survive until the checkpoint is written."""
    extra = ["--workers", str(workers)] if workers else []
    straight = tmp_path / "straight"
    assert cli.main(["train", *COMMON, "--out", str(straight), *extra]) == 0

    out = tmp_path / "split"
    proc = _start(out, tmp_path, *extra)
    send = (lambda p: os.killpg(p.pid, signum)) if to_group else (lambda p: p.send_signal(signum))
    rc, err = _signal_after_rows(proc, out, 2, send)
    assert rc == exit_status(signum) == 128 + signum, err[-3000:]
    stopped = ckpt.latest_checkpoint(out)
    assert stopped is not None and 2 <= stopped.step < 6, err[-3000:]
    assert [r["step"] for r in _rows(out)] == list(range(1, stopped.step + 1))  # finished the step it was in
    assert f"stopped by {signal.Signals(signum).name} after step {stopped.step} of 6" in err
    assert "--resume" in err and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == signal.Signals(signum).name and summary["steps"] == stopped.step

    assert cli.main(["train", *COMMON, "--out", str(out), *extra, "--resume"]) == 0
    assert _rows(out) == _rows(straight)  # every loss term, lr, grad norm, step for step
    a = json.loads((straight / "summary.json").read_text())["param_sha256"]
    b = json.loads((out / "summary.json").read_text())["param_sha256"]
    assert a == b


def test_stop_request_catches_the_signal_and_restores_the_handlers():
    import torch

    from bus_model.training.distributed import DistInfo
    from bus_model.training.preemption import StopRequest

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    with StopRequest(DistInfo(0, 1, 0, torch.device("cpu"))) as stop:
        assert stop.check() is None
        os.kill(os.getpid(), signal.SIGUSR1)  # handled: sets the flag, does not end pytest
        deadline = time.monotonic() + 10
        while stop.check() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.check() == signal.SIGUSR1
    assert {sig: signal.getsignal(sig) for sig in before} == before


def _children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def _rank_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:
        return None
    return int(env[b"RANK"]) if b"RANK" in env else None


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the rank processes through /proc")
def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """SIGTERM reaches only rank 1; rank 0 learns of it through the per-step flag all-reduce, so both stop
    after the same step, rank 0 writes the checkpoint, and both ranks report the stop."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "bus_model.training.train", *COMMON, "--steps", "20", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=_env(tmp_path), start_new_session=True)

    def signal_rank_1(p):
        ranks = {_rank_of(c): c for c in _children(p.pid)}
        os.kill(ranks[1], signal.SIGTERM)

    try:
        rc, err = _signal_after_rows(proc, out, 2, signal_rank_1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc != 0  # torchrun reports its workers' non-zero status (143) as a failure
    assert "rank 1: got SIGTERM" in err and "rank 0: got" not in err
    stopped = ckpt.latest_checkpoint(out)
    assert stopped is not None and 2 <= stopped.step < 20, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == stopped.step
    assert len(set(summary["param_sha256"])) == 1  # both ranks reached the summary with equal weights
    state = json.loads((stopped.path / ckpt.TRAINER_STATE_FILE).read_text())
    assert len(state["data"]) == 2 and state["step"] == stopped.step
    assert [r["step"] for r in _rows(out)] == list(range(1, stopped.step + 1))
