"""What a run reports while it trains: ``OUT/metrics.jsonl`` rows (loss terms reduced over micro-batches
and ranks, lr, throughput, skipped samples), TensorBoard and the progress bar."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..config import BusConfig
from .distributed import DistInfo, full_tensor
from .errors import UsageError

if TYPE_CHECKING:
    from .batches import BatchStream

LOSS_NAMES = ("itc", "itm", "mlm", "prefix_lm", "ptm")

METRICS_FILE = "metrics.jsonl"


def reduce_losses(sums: torch.Tensor, counts: torch.Tensor, info: DistInfo) -> dict[str, float]:
    """Mean of each loss term over micro-batches and ranks: sums, counts (len(LOSS_NAMES),)."""
    both = torch.stack([sums, counts]).double()
    if info.enabled:
        dist.all_reduce(both)
    return {name: float(both[0, i] / both[1, i]) for i, name in enumerate(LOSS_NAMES) if both[1, i] > 0}


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics rows logged after the checkpoint being resumed (they will be logged again)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    os.replace(tmp, path)


class MetricsLogger:
    """Accumulates loss terms and throughput between logged steps; writes one ``metrics.jsonl`` row
    per logged step (rank 0), mirrors it to TensorBoard and the progress bar.

    ``add(output, inputs)`` after every micro-batch (no host sync); ``write(step, ...)`` reduces the
    window over micro-batches and ranks and returns the row. A checkpoint taken mid-window carries this
    rank's running loss sums (``window_state`` / ``load_window_state``), so the first row after
    ``--resume`` averages the same steps as an uninterrupted run's; throughput counts only the steps this
    process ran (the time before the stop is not part of its clock)."""

    def __init__(self, out: Path, config: BusConfig, info: DistInfo, *, tensorboard: bool, bar):
        self.config, self.info, self.bar = config, info, bar
        self.file = open(out / METRICS_FILE, "a") if info.is_main else None
        self.tb = _tensorboard(out) if tensorboard and info.is_main else None
        self.sums = torch.zeros(len(LOSS_NAMES), device=info.device)
        self.counts = torch.zeros(len(LOSS_NAMES), device=info.device)
        self._reset()

    def _reset(self) -> None:
        self.start = time.perf_counter()
        self.throughput = torch.zeros(2, dtype=torch.float64, device=self.info.device)  # images, tokens
        self.sums.zero_()
        self.counts.zero_()

    def add(self, output, inputs: dict[str, torch.Tensor]) -> None:
        for i, name in enumerate(LOSS_NAMES):
            if name in output.losses:
                self.sums[i] += output.losses[name].detach().float()
                self.counts[i] += 1
        self.throughput[0] += inputs["images"].shape[0]
        self.throughput[1] += inputs["attention_mask"].sum()

    def window_state(self) -> dict[str, list[float]]:
        """This rank's loss sums and counts since the last logged row, JSON-able, exact (float32 values
        survive the trip through a Python float): ``{loss name: [sum, count]}``. Reads the device."""
        sums, counts = self.sums.tolist(), self.counts.tolist()
        return {name: [sums[i], counts[i]] for i, name in enumerate(LOSS_NAMES) if counts[i] > 0}

    def load_window_state(self, state: dict[str, list[float]]) -> None:
        """Continue the window that ``window_state`` saved (after a resume)."""
        unknown = sorted(set(state) - set(LOSS_NAMES))
        if unknown:
            raise ValueError(f"metrics window state names unknown loss terms {unknown}; known: {list(LOSS_NAMES)}")
        for i, name in enumerate(LOSS_NAMES):
            total, count = state.get(name, (0.0, 0.0))
            self.sums[i] = total
            self.counts[i] = count

    def write(self, step: int, *, lr: float, grad_norm, stream: "BatchStream") -> dict[str, Any]:
        losses = reduce_losses(self.sums, self.counts, self.info)
        loss = sum(getattr(self.config.losses, f"{n}_weight") * v for n, v in losses.items())
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step}: the loss is not finite ({losses})")
        elapsed = time.perf_counter() - self.start
        counted = self.throughput.clone()  # (images, tokens) of this rank's window
        if self.info.enabled:
            dist.all_reduce(counted)
        images, tokens = float(counted[0]), float(counted[1])
        row = {"step": step, "loss": loss, **{f"loss_{n}": v for n, v in losses.items()}, "lr": lr,
               "images_per_s": images / elapsed, "tokens_per_s": tokens / elapsed,
               "epoch": stream.epoch, "skipped": stream.skips.total}
        if grad_norm is not None:
            row["grad_norm"] = float(full_tensor(grad_norm))
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if key != "step":
                    self.tb.add_scalar(f"train/{key}", value, step)
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{row['images_per_s']:.1f}")
        self._reset()
        return row

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def progress_bar(start: int, total: int, disabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=disabled, unit="step", dynamic_ncols=True)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(str(out / "tensorboard"))
