"""``bus train``: exact resume, atomic checkpoints, broken real data, 2-process DDP on CPU (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bus_model.training import checkpoint as ckpt
from bus_model.training import cli
from bus_model.model import BusModel
from bus_model.training.batches import BatchStream
from bus_model.training.distributed import DistInfo, parameter_hash

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "bus-tiny", "--data", "synthetic", "--num-threads", "1", "--no-progress"]
VOLATILE = ("images_per_s", "tokens_per_s")  # wall-clock numbers: differ between any two runs


def _train(out, *extra) -> None:
    assert cli.main(["train", *TINY, "--out", str(out), *extra]) == 0


def _rows(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in f]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    # 40 samples / batch 8 = 5 batches per epoch: the 8 steps cross an epoch boundary, and the resume
    # point (step 4) sits mid-epoch
    common = ["--steps", "8", "--batch-size", "8", "--train-samples", "40", "--log-every", "1", "--lr", "1e-3",
              "--save-every", "2", "--warmup-steps", "2"]
    _train(tmp_path / "straight", *common)
    _train(tmp_path / "split", *common, "--stop-at", "4")
    first = _rows(tmp_path / "split")
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    assert ckpt.latest_checkpoint(tmp_path / "split").step == 4
    _train(tmp_path / "split", *common, "--resume")
    straight, resumed = _rows(tmp_path / "straight"), _rows(tmp_path / "split")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert resumed == straight  # every loss term, lr, grad norm and epoch, bit for bit
    assert len({r["loss"] for r in straight}) > 1
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary["resumed_from"] == 4 and summary["steps"] == 8
    a = BusModel.from_pretrained(ckpt.latest_checkpoint(tmp_path / "straight").path)
    b = BusModel.from_pretrained(ckpt.latest_checkpoint(tmp_path / "split").path)
    assert parameter_hash(a) == parameter_hash(b)
    # --keep-checkpoints 2 (default): only the two newest remain
    assert [c.step for c in ckpt.list_checkpoints(tmp_path / "straight")] == [6, 8]


def test_resume_mid_window_logs_what_the_uninterrupted_run_logs(tmp_path):
    """Issue 25: a stop between two logged rows (--stop-at 4 with --log-every 3) writes no row of its own,
    and the checkpoint carries the loss sums of step 4, so the resumed row of step 6 averages steps 4-6 as
    the uninterrupted run's does (it averaged 5-6 before)."""
    common = ["--steps", "6", "--batch-size", "4", "--train-samples", "20", "--log-every", "3", "--lr", "1e-3",
              "--save-every", "100", "--warmup-steps", "1"]
    _train(tmp_path / "straight", *common)
    _train(tmp_path / "split", *common, "--stop-at", "4")
    assert [r["step"] for r in _rows(tmp_path / "split")] == [3]
    window = ckpt.load_training_state(ckpt.latest_checkpoint(tmp_path / "split").path).trainer_state["metrics"]
    assert len(window) == 1 and window[0]["itc"][1] == 1  # one rank, one micro-batch since the row of step 3
    _train(tmp_path / "split", *common, "--resume")
    straight, resumed = _rows(tmp_path / "straight"), _rows(tmp_path / "split")
    assert [r["step"] for r in straight] == [3, 6]
    assert resumed == straight


@pytest.mark.parametrize("where", ["serialise", "before_rename"])
def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, where):
    out = tmp_path / "run"
    calls = {"n": 0}

    class Crash(RuntimeError):
        pass

    if where == "serialise":  # die while writing the weights of the second checkpoint
        original = BusModel.save_pretrained

        def failing_save(self, directory):
            calls["n"] += 1
            if calls["n"] == 2:
                (directory / "model.safetensors").write_bytes(b"half a file")
                raise Crash("killed while serialising")
            return original(self, directory)

        monkeypatch.setattr(BusModel, "save_pretrained", failing_save)
    else:  # die after every file is written, just before the atomic rename
        original = ckpt._fsync_tree

        def failing_fsync(path):
            calls["n"] += 1
            if calls["n"] == 2:
                raise Crash("killed before rename")
            return original(path)

        monkeypatch.setattr(ckpt, "_fsync_tree", failing_fsync)
    args = ["--steps", "4", "--batch-size", "4", "--train-samples", "16", "--log-every", "1", "--save-every", "2"]
    with pytest.raises(Crash):
        _train(out, *args)
    latest = ckpt.latest_checkpoint(out)
    assert latest.step == 2
    assert not [p for p in (out / "checkpoints").iterdir() if p.name != "step_00000002"]
    model = BusModel.from_pretrained(latest.path)  # the previous checkpoint loads completely
    state = ckpt.load_training_state(latest.path)
    assert state.trainer_state["step"] == 2 and len(state.rng) == 1
    assert parameter_hash(model)

    # a hard kill leaves its temporary directory behind: it is ignored, and swept by the next save
    stale = out / "checkpoints" / ".tmp-step_00000004-12345"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"garbage")
    assert ckpt.latest_checkpoint(out).step == 2
    monkeypatch.undo()
    _train(out, *args, "--resume")
    assert ckpt.latest_checkpoint(out).step == 4 and not stale.exists()
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]


def _write_png(path, seed, index):
    from PIL import Image

    from bus_model.data import render_sample

    sample = render_sample(seed, index, image_size=64, patch_size=8)
    Image.fromarray(sample.image).save(path)
    return sample.caption


def test_manifest_with_broken_images_trains_and_reports(tmp_path, capsys):
    from bus_model.data import build_synthetic_tokenizer, save_tokenizer

    rows = []
    for i in range(12):
        caption = _write_png(tmp_path / f"img{i}.png", 0, i)
        rows.append({"image": f"img{i}.png", "caption": caption})
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    rows.insert(3, {"image": "corrupt.png", "caption": "a small red circle left of a large blue square"})
    rows.insert(9, {"image": "missing.png", "caption": "a large green cross above a small white diamond"})
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok_dir = save_tokenizer(build_synthetic_tokenizer(16), tmp_path / "tok")
    out = tmp_path / "run"
    # 14 records / batch 7 = one epoch in 2 steps: each broken record is drawn exactly once
    rc = cli.main(["train", "--model", "bus-tiny", "--data", str(manifest), "--tokenizer", tok_dir, "--out", str(out),
                   "--steps", "2", "--batch-size", "7", "--log-every", "1", "--num-threads", "1", "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == {"decode_error": 1, "missing": 1}
    keys = sorted(os.path.basename(e["key"]) for e in summary["skipped_files"])
    assert keys == ["corrupt.png", "missing.png"]
    err = capsys.readouterr().err
    assert "skipped samples: 2" in err and "corrupt.png" in err and "missing.png" in err
    rows_out = _rows(out)
    assert len(rows_out) == 2 and rows_out[-1]["skipped"] == 2
    assert all(r["loss_ptm"] == 0.0 for r in rows_out)  # no boxes in the manifest: nothing to match


@pytest.mark.parametrize("world_size", [2, 3])
def test_batch_stream_shards_ranks_without_overlap(world_size):
    from bus_model.data import Collator, SyntheticDataset, build_synthetic_tokenizer

    dataset = SyntheticDataset(23, image_size=32, patch_size=8)
    collator = Collator(build_synthetic_tokenizer(16), image_size=32, patch_size=8)
    per_rank = 23 // world_size
    batches = per_rank // 3
    seen = []
    for rank in range(world_size):
        info = DistInfo(rank, world_size, rank, torch.device("cpu"))
        stream = BatchStream(dataset, collator, batch_size=3, seed=5, info=info, workers=0)
        ids = [i for _ in range(batches) for i in stream.next()["ids"]]
        assert stream.state()["epoch"] == 0 and stream.state()["position"] == batches
        seen.append(ids)
        nxt = stream.next()  # the next batch opens epoch 1
        assert stream.state() == {"epoch": 1, "position": 1, "skipped": []}
        assert len(nxt["ids"]) == 3
    flat = [i for ids in seen for i in ids]
    assert len(flat) == len(set(flat)) == world_size * batches * 3


def _torchrun(out, *extra) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bus_model.training.train",
           *TINY, "--out", str(out), "--steps", "3", "--batch-size", "4", "--train-samples", "32", "--log-every", "1",
           "--save-every", "3", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_torchrun_two_cpu_processes_agree(tmp_path):
    """DDP over 2 gloo processes; then FSDP (stopped after 2 steps and resumed) trains the same model."""
    out = tmp_path / "ddp"
    _torchrun(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    hashes = summary["param_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]  # DDP kept the replicas identical
    saved = BusModel.from_pretrained(ckpt.latest_checkpoint(out).path)
    assert parameter_hash(saved) == hashes[0]
    state = ckpt.load_training_state(ckpt.latest_checkpoint(out).path)
    assert len(state.rng) == 2 and len(state.trainer_state["data"]) == 2  # each rank's RNG and data position
    assert not torch.equal(state.rng[0][0]["torch"], state.rng[1][0]["torch"])  # ranks draw different masks
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]
    fsdp = tmp_path / "fsdp"
    _torchrun(fsdp, "--fsdp", "--stop-at", "2")
    _torchrun(fsdp, "--fsdp", "--resume")
    fsdp_summary = json.loads((fsdp / "summary.json").read_text())
    assert fsdp_summary["resumed_from"] == 2 and len(set(fsdp_summary["param_sha256"])) == 1
    saved = BusModel.from_pretrained(ckpt.latest_checkpoint(fsdp).path)  # gathered into a plain checkpoint
    assert parameter_hash(saved) == fsdp_summary["param_sha256"][0]
    for a, b in zip(_rows(out), _rows(fsdp), strict=True):  # same math, other reduction order
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def _write_shards(directory, shards: int, per_shard: int) -> None:
    import io
    import tarfile

    from PIL import Image

    from bus_model.data import render_sample

    directory.mkdir()
    for s in range(shards):
        with tarfile.open(directory / f"shard-{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                sample = render_sample(1, s * per_shard + i, image_size=48, patch_size=8)
                png = io.BytesIO()
                Image.fromarray(sample.image).save(png, format="PNG")
                for name, data in ((f"{i:06d}.png", png.getvalue()), (f"{i:06d}.txt", sample.caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_shards_train_and_resume_exactly(tmp_path, workers):
    """Streamed shards with random resized crops: 6 steps straight equal 3 steps + --resume, which
    fast-forwards the stream past the batches already trained on. With 0 workers the crops draw from
    the checkpointed RNG; with 2 workers (one shard each) from worker RNGs seeded per epoch."""
    from bus_model.data import build_synthetic_tokenizer, save_tokenizer

    _write_shards(tmp_path / "shards", shards=2, per_shard=9)  # 18 samples / batch 4: 4 batches per epoch
    tok_dir = save_tokenizer(build_synthetic_tokenizer(16), tmp_path / "tok")
    common = ["--model", "bus-tiny", "--data", str(tmp_path / "shards"), "--tokenizer", tok_dir, "--steps", "6",
              "--batch-size", "4", "--log-every", "1", "--save-every", "3", "--num-threads", "1", "--no-progress",
              "--workers", str(workers)]
    assert cli.main(["train", *common, "--out", str(tmp_path / "a")]) == 0
    assert cli.main(["train", *common, "--out", str(tmp_path / "b"), "--stop-at", "3"]) == 0
    assert cli.main(["train", *common, "--out", str(tmp_path / "b"), "--resume"]) == 0
    straight, resumed = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r["step"] for r in straight] == list(range(1, 7))
    # 4 batches per epoch either way: 18 samples in one stream, or 9 per worker (2 full batches each,
    # the partial batches dropped)
    assert [r["epoch"] for r in straight] == [0, 0, 0, 0, 1, 1]
    assert resumed == straight


def test_accumulation_amp_and_cosine_schedule(tmp_path):
    """--accum-steps 2 with bf16 autocast on CPU and gradient checkpointing trains; the logged lr follows
    linear warm-up then a cosine to min_lr_ratio * lr (closed form written out here)."""
    import math

    out = tmp_path / "run"
    _train(out, "--steps", "6", "--warmup-steps", "2", "--lr", "1e-3", "--min-lr-ratio", "0.1", "--batch-size", "4",
           "--accum-steps", "2", "--amp", "--grad-checkpointing", "--train-samples", "48", "--log-every", "1",
           "--save-every", "6")
    rows = _rows(out)
    expected = []
    for s in range(6):
        if s < 2:
            expected.append(1e-3 * (s + 1) / 2)
        else:
            expected.append(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4))))
    assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-12)
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    # 6 steps x 2 micro-batches x 4 images = 48 images = exactly one epoch
    state = ckpt.load_training_state(ckpt.latest_checkpoint(out).path)
    assert state.trainer_state["data"][0]["epoch"] == 0 and state.trainer_state["data"][0]["position"] == 12


def test_process_killed_while_saving_leaves_previous_checkpoint(tmp_path):
    """SIGKILL the trainer the moment a checkpoint's temporary directory appears (mid-save): the newest
    complete checkpoint still loads, and --resume finishes the run from it."""
    import signal
    import time

    out = tmp_path / "run"
    args = [*TINY, "--out", str(out), "--steps", "16", "--batch-size", "4", "--train-samples", "64", "--log-every", "1",
            "--save-every", "1", "--keep-checkpoints", "3"]
    proc = subprocess.Popen([sys.executable, "-m", "bus_model.training.train", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    root = out / "checkpoints"
    deadline = time.monotonic() + 300
    caught = False
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            complete = ckpt.list_checkpoints(out)
            if root.is_dir() and complete and complete[-1].step >= 3:
                if any(p.name.startswith(".tmp-") for p in root.iterdir()):
                    proc.send_signal(signal.SIGKILL)
                    caught = True
                    break
            time.sleep(0.0005)  # poll fast: a tiny model's save takes milliseconds
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert caught, "never saw a save in progress"
    latest = ckpt.latest_checkpoint(out)
    assert latest is not None and 3 <= latest.step < 16
    model = BusModel.from_pretrained(latest.path)
    state = ckpt.load_training_state(latest.path)
    assert state.trainer_state["step"] == latest.step and parameter_hash(model)
    assert cli.main(["train", *args, "--resume"]) == 0
    assert ckpt.latest_checkpoint(out).step == 16
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]  # the stale one was swept
    assert [r["step"] for r in _rows(out)] == list(range(1, 17))


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    from bus_model import create_model
    from bus_model.data import Collator, SyntheticDataset, build_synthetic_tokenizer
    from bus_model.training.model_setup import apply_grad_checkpointing, tokenizer_overrides

    tok = build_synthetic_tokenizer(16)
    batch = Collator(tok, image_size=32, patch_size=8)([SyntheticDataset(5, image_size=32, patch_size=8)[i] for i in range(5)])
    inputs = {k: batch[k] for k in ("images", "input_ids", "attention_mask", "patch_labels")}
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(3)
        model = create_model("bus-tiny", **tokenizer_overrides(tok))
        if checkpointed:
            assert apply_grad_checkpointing(model) == 4 + 2 + 2 + 2 + 1  # ViT, text, fusion, decoder, PAD
        torch.manual_seed(4)  # the same masks and negatives
        out = model(**inputs)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)


def test_resume_with_more_steps_extends_the_schedule_and_warns(tmp_path, capsys):
    import math

    out = tmp_path / "run"
    common = ["--batch-size", "4", "--train-samples", "16", "--log-every", "1", "--warmup-steps", "1", "--lr", "1e-3",
              "--min-lr-ratio", "0"]
    _train(out, *common, "--steps", "2", "--save-every", "2")
    capsys.readouterr()
    _train(out, *common, "--steps", "4", "--save-every", "4", "--resume")
    err = capsys.readouterr().err
    assert "warning: --resume with a different --steps (checkpoint: 2, now: 4)" in err
    lrs = [r["lr"] for r in _rows(out)]
    # steps 3 and 4 follow the 4-step cosine (warm-up 1), not the finished 2-step one
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 3)) for s in (2, 3)]  # 0-based steps 2, 3
    assert lrs[2:] == pytest.approx(expected, rel=1e-12)
