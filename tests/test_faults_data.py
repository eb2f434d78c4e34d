"""Data faults (issue 15): a run on data that cannot fill a batch stops with one clear error instead of
re-reading broken files forever; every unreadable sample is counted once per run (epochs, workers,
ranks); truncated shards are skipped and counted; a dead or stalled DataLoader worker is an error."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from bus_model.data import (
    Collator,
    DataError,
    ImageTransform,
    ManifestDataset,
    ReadMonitor,
    SkippedSample,
    SkipReport,
    WebDatasetShards,
    build_synthetic_tokenizer,
    save_tokenizer,
)
from bus_model.training.batches import BatchStream
from bus_model.training.distributed import DistInfo

PIL = pytest.importorskip("PIL.Image")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = DistInfo(0, 1, 0, torch.device("cpu"))


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when the body runs longer than ``seconds``."""

    def on_alarm(_signum, _frame):
        raise TimeoutError(f"still running after {seconds} s: the stream hangs")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _manifest(root, good: int, *, missing: int = 0, corrupt: int = 0, order=None):
    """A JSONL manifest of `good` readable PNGs, `missing` absent files and `corrupt` undecodable ones."""
    rows = []
    for i in range(good):
        PIL.new("RGB", (24, 20), (10 * i % 256, 200, 30)).save(root / f"good{i}.png")
        rows.append({"image": f"good{i}.png", "caption": f"picture {i}"})
    for i in range(missing):
        rows.append({"image": f"missing{i}.png", "caption": "gone"})
    for i in range(corrupt):
        (root / f"corrupt{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image at all" * 3)
        rows.append({"image": f"corrupt{i}.png", "caption": "broken"})
    if order is not None:
        rows = [rows[i] for i in order]
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _stream(dataset, batch_size=2, workers=0, **kwargs):
    collator = Collator(build_synthetic_tokenizer(), image_size=16, patch_size=8)
    return BatchStream(dataset, collator, batch_size=batch_size, seed=0, info=CPU, workers=workers, **kwargs)


def _dataset(path):
    return ManifestDataset(path, ImageTransform(16, train=False), patch_size=8)


# --------------------------------------------------------------------------- the hang, end to end
def test_bus_train_on_too_few_readable_images_stops_with_one_clear_error(tmp_path):
    """The issue's report: 1 valid PNG, 1 missing, 1 corrupt, batch 2 sat at 0/3 forever."""
    path = _manifest(tmp_path, 1, missing=1, corrupt=1)
    tok = save_tokenizer(build_synthetic_tokenizer(), tmp_path / "tok")
    cmd = [sys.executable, "-m", "bus_model.training.cli", "train", "--data", str(path), "--model", "bus-tiny",
           "--steps", "3", "--batch-size", "2", "--tokenizer", str(tok), "--out", str(tmp_path / "out"),
           "--no-progress", "--num-threads", "1"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert time.perf_counter() - start < 60
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("bus train: error: --data "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    msg = errors[0]
    assert "1 readable" in msg and "unreadable" in msg and "--batch-size 2" in msg and "corrupt0.png" in msg


@pytest.mark.parametrize("good,missing,corrupt", [(1, 1, 1), (0, 2, 2), (0, 5, 0)])
def test_a_pass_that_cannot_fill_a_batch_raises_data_error(tmp_path, good, missing, corrupt):
    stream = _stream(_dataset(_manifest(tmp_path, good, missing=missing, corrupt=corrupt)), batch_size=2)
    with deadline(60), pytest.raises(DataError, match=r"a full pass .* readable") as err:
        stream.next()
    assert "--batch-size 2" in str(err.value) and ("missing" in str(err.value) or "decode_error" in str(err.value))


def test_a_pass_whose_batches_all_keep_fewer_than_two_samples_raises(tmp_path):
    """Every batch of 2 has one good and one broken sample: the pass reads enough good samples in total,
    but no batch can be trained on (ITC/ITM need 2); the old loop retried forever."""
    stream = _stream(_dataset(_manifest(tmp_path, 3, missing=3, order=[0, 3, 1, 4, 2, 5])), batch_size=2)
    stream._epoch_indices = lambda: list(range(6))[stream.position * 2:]  # manifest order: good, missing, ...
    with deadline(60), pytest.raises(DataError, match="no batch kept 2 or more readable samples"):
        stream.next()


def test_mostly_unreadable_data_stops_before_a_full_pass(tmp_path):
    """90% missing files among 600 rows: more than --max-skip-share of 256 consecutive reads fail, so the
    stream stops long before it has read everything (a broken corpus of millions must not take a pass)."""
    rows = [{"image": "good.png", "caption": "ok"} if i % 10 == 0 else {"image": f"m{i}.png", "caption": "x"}
            for i in range(600)]
    PIL.new("RGB", (16, 16)).save(tmp_path / "good.png")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stream = _stream(_dataset(tmp_path / "d.jsonl"), batch_size=8)
    reads = []
    observe = stream.monitor.observe
    stream.monitor.observe = lambda good, skipped, usable: (reads.append(good + len(skipped)),
                                                            observe(good, skipped, usable))
    with deadline(60), pytest.raises(DataError, match=r"of the last \d+ samples .* --max-skip-share 0.5"):
        for _ in range(100):
            stream.next()
    assert 256 <= sum(reads) < 600


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_max_skip_share_one_trains_on_what_is_readable(tmp_path, share):
    """5 of every 8 reads fail (fixed order g m m m m m g g): the default share stops, 1 trains on."""
    path = _manifest(tmp_path, 3, missing=5, order=[0, 3, 4, 5, 6, 7, 1, 2])
    stream = _stream(_dataset(path), batch_size=2, max_skip_share=share)
    stream._epoch_indices = lambda: list(range(8))[stream.position * 2:]
    stream.monitor.window = 8
    with deadline(60), (pytest.raises(DataError, match="max-skip-share") if share < 1 else contextlib.nullcontext()):
        for _ in range(10):
            assert stream.next()["images"].shape[0] == 2


def test_read_monitor_validates_its_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        ReadMonitor(0)
    with pytest.raises(ValueError, match="max_skip_share"):
        ReadMonitor(2, max_skip_share=0.0)
    with pytest.raises(ValueError, match="max_skip_share"):
        ReadMonitor(2, max_skip_share=float("nan"))
    with pytest.raises(ValueError, match="window"):
        ReadMonitor(2, window=0)


def test_read_monitor_judges_only_full_passes():
    """A pass resumed in the middle (few reads left) must not be mistaken for a pass that had too few."""
    m = ReadMonitor(4)
    m.start_pass(full=False)
    m.observe(1, [SkippedSample("a", "missing")])
    m.end_pass()  # no error: partial pass
    m.start_pass(full=True)
    m.observe(1, [SkippedSample("a", "missing")])
    with pytest.raises(DataError, match="fewer than one batch"):
        m.end_pass()


# ----------------------------------------------------------------------------------- counted once per run
def test_each_unreadable_file_is_counted_once_across_epochs(tmp_path):
    """The issue: 4 good rows + 1 missing + 1 corrupt, 3 steps at batch 2 printed 'skipped samples: 4'."""
    stream = _stream(_dataset(_manifest(tmp_path, 4, missing=1, corrupt=1)), batch_size=2)
    with deadline(60):
        for _ in range(12):  # several epochs: every broken row is read again and again
            stream.next()
    assert stream.epoch >= 3
    assert stream.skips.total == 2 and dict(stream.skips.counts) == {"missing": 1, "decode_error": 1}
    assert sorted(os.path.basename(s.key) for s in stream.skips.records) == ["corrupt0.png", "missing0.png"]
    summary = stream.skips.summary()
    assert summary.startswith("skipped samples: 2") and summary.count("missing0.png") == 1


def test_counted_once_with_dataloader_workers(tmp_path):
    stream = _stream(_dataset(_manifest(tmp_path, 4, missing=1, corrupt=1)), batch_size=2, workers=2, timeout=60)
    with deadline(120):
        for _ in range(8):
            stream.next()
    assert stream.skips.total == 2


def test_skips_survive_a_checkpoint_and_ranks_merge_without_double_counting(tmp_path):
    path = _manifest(tmp_path, 4, missing=1, corrupt=1)
    first = _stream(_dataset(path), batch_size=2)
    with deadline(60):
        for _ in range(6):
            first.next()
    state = json.loads(json.dumps(first.state()))  # the checkpoint stores it as JSON
    resumed = _stream(_dataset(path), batch_size=2)
    resumed.load_state(state)
    with deadline(60):
        for _ in range(6):
            resumed.next()
    assert resumed.skips.total == 2
    # two ranks that met the same broken file: the run's report counts it once
    other = SkipReport.from_state([[first.skips.records[0].key, "missing", "x"], ["/elsewhere.png", "missing", ""]])
    merged = SkipReport()
    merged.merge(SkipReport.from_state(resumed.skips.state()))
    merged.merge(other)
    assert merged.total == 3
    with pytest.raises(ValueError, match="key, reason, detail"):
        SkipReport.from_state([["only two", "fields"]])
    with pytest.raises(TypeError, match="SkippedSample"):
        SkipReport().update(["not a record"])


def test_old_checkpoint_skip_counts_are_accepted(tmp_path):
    stream = _stream(_dataset(_manifest(tmp_path, 4)), batch_size=2)
    stream.load_state({"epoch": 0, "position": 1, "skipped": {"missing": 3}})  # format before issue 15
    assert stream.skips.total == 0 and stream.position == 1


# ------------------------------------------------------------------------------------- webdataset shards
def _shard(path, keys, size=(20, 16)):
    import io

    with tarfile.open(path, "w") as tar:
        for i, key in enumerate(keys):
            for ext, data in (("txt", f"caption {key}".encode()), ("png", None)):
                if data is None:
                    buf = io.BytesIO()
                    PIL.new("RGB", size, (i * 30 % 256, 9, 9)).save(buf, format="PNG")
                    data = buf.getvalue()
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("cut", ["mid_data", "mid_header", "empty", "garbage"])
def test_truncated_shard_is_skipped_and_counted_once_never_fatal(tmp_path, cut):
    _shard(tmp_path / "00000.tar", [f"a{i}" for i in range(6)])
    _shard(tmp_path / "00001.tar", [f"b{i}" for i in range(6)])
    full = (tmp_path / "00001.tar").read_bytes()
    broken = {"mid_data": full[: 512 * 5 + 100],  # inside the 3rd member's data
              "mid_header": full[: 512 * 4 + 200],  # inside the 3rd member's header
              "empty": b"", "garbage": os.urandom(3000)}[cut]
    (tmp_path / "00001.tar").write_bytes(broken)
    dataset = WebDatasetShards(tmp_path, ImageTransform(16, train=False), patch_size=8)
    stream = _stream(dataset, batch_size=2)
    with deadline(60):
        ids = [i for _ in range(9) for i in stream.next()["ids"]]  # 3 batches per pass: 3 passes
    assert stream.epoch >= 2
    assert {i.split("/")[1] for i in ids} >= {f"a{i}" for i in range(6)}
    shard_skips = [s for s in stream.skips.records if s.key == str(tmp_path / "00001.tar")]
    assert len(shard_skips) == 1 and "corrupt shard" in shard_skips[0].detail


def test_all_shards_broken_is_a_data_error(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"")
    (tmp_path / "00001.tar").write_bytes(os.urandom(2000))
    stream = _stream(WebDatasetShards(tmp_path, ImageTransform(16, train=False)), batch_size=2)
    with deadline(60), pytest.raises(DataError, match="0 readable"):
        stream.next()


# ---------------------------------------------------------------------------------- DataLoader workers
class _Fatal(torch.utils.data.Dataset):
    """Readable samples, except that reading index `kill_at` in a worker process kills the worker
    (SIGKILL: what the kernel's OOM killer does) or stalls it (a hung network read)."""

    def __init__(self, inner, kill_at, mode):
        self.inner, self.kill_at, self.mode = inner, kill_at, mode

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if i == self.kill_at and torch.utils.data.get_worker_info() is not None:
            if self.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(120)
        return self.inner[i]


@pytest.mark.parametrize("mode", ["kill", "stall"])
def test_a_dead_or_stalled_worker_is_an_error_not_a_hang(tmp_path, mode):
    dataset = _Fatal(_dataset(_manifest(tmp_path, 8)), kill_at=3, mode=mode)
    stream = _stream(dataset, batch_size=2, workers=1, timeout=3)
    start = time.perf_counter()
    with deadline(90), pytest.raises(DataError, match="DataLoader worker|DataLoader timed out") as err:
        for _ in range(8):
            stream.next()
    assert time.perf_counter() - start < 60
    assert "--workers 0" in str(err.value)
    assert stream._iter is None  # the workers were shut down (a stalled one killed): nothing keeps running
