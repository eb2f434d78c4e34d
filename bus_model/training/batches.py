"""The training data of one rank: the dataset named by ``--data`` and an endless, resumable stream of
micro-batches over it, turned into ``BusModel.forward`` keyword arguments."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..config import BusConfig
from .distributed import DistInfo
from .errors import UsageError


def setup_dataset(args: argparse.Namespace, config: BusConfig, info: DistInfo):
    """The training dataset named by ``--data`` (images at the model's input size)."""
    from ..data import build_dataset

    v = config.vision
    try:
        return build_dataset(args.data, split="train", image_size=v.image_size, patch_size=v.patch_size,
                             seed=args.data_seed, num_samples=args.train_samples, image_root=args.image_root,
                             rank=info.rank, world_size=info.world_size)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"--data {args.data}: {err}") from None


class _IndexSampler(torch.utils.data.Sampler):
    """Yields a fixed list of dataset indices (one rank's share of one epoch, from the resume point)."""

    def __init__(self, indices: list[int]):
        self.indices = indices

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class BatchStream:
    """Endless micro-batches for one rank, epoch after epoch, with a resumable position.

    Map-style data: epoch ``e`` is a permutation seeded by ``(seed, e)``, identical on every rank; rank
    ``r`` takes positions ``r, r + W, ...`` (cut to the same length on every rank) and batches of
    ``batch_size`` (the last partial batch is dropped). Iterable data (webdataset) splits itself across
    ranks and workers; the stream calls ``set_epoch`` and, on resume, skips the batches already read.
    ``state()`` is ``{"epoch", "position"}`` (DataLoader batches drawn in the epoch) plus the skipped samples.

    Batches with fewer than 2 usable samples (broken images) are skipped: ITC/ITM need negatives. Each
    skipped sample is counted once per run (``skips``, a ``SkipReport`` kept in the checkpoint); a pass that
    cannot fill a batch, or mostly failing reads, raise ``DataError`` (``monitor``, a ``ReadMonitor``).
    Resume is exact with ``workers=0`` (random crops draw from the checkpointed main-process RNG); with
    worker processes the data order is exact but the augmentations of a resumed epoch are redrawn.
    """

    def __init__(self, dataset, collator, *, batch_size: int, seed: int, info: DistInfo, workers: int,
                 max_skip_share: float = 0.5, timeout: float = 0.0, source: str = "--data"):
        from ..data import ReadMonitor, SkipReport

        self.dataset, self.collator, self.batch_size = dataset, collator, batch_size
        self.seed, self.info, self.workers, self.timeout = seed, info, workers, timeout
        self.iterable = isinstance(dataset, torch.utils.data.IterableDataset)
        self.epoch, self.position = 0, 0
        self.skips = SkipReport()
        # stops the endless re-reading of broken files when the data cannot fill batches (issue 15)
        self.monitor = ReadMonitor(batch_size, min_batch=2, max_skip_share=max_skip_share, source=source,
                                   rank=info.rank)
        self._iter = None
        if not self.iterable:
            per_rank = len(dataset) // info.world_size
            if per_rank < batch_size:
                raise UsageError(f"the dataset has {len(dataset)} samples: fewer than --batch-size ({batch_size}) "
                                 f"per rank x {info.world_size} rank(s)")

    def state(self) -> dict[str, Any]:
        """``{"epoch", "position", "skipped": [[key, reason, detail], ...]}`` (JSON-able)."""
        return {"epoch": self.epoch, "position": self.position, "skipped": self.skips.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        from ..data import SkipReport

        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        skipped = state.get("skipped", [])
        # checkpoints written before skips were deduplicated hold only counts per reason: start afresh
        self.skips = SkipReport.from_state(skipped if isinstance(skipped, list) else [])
        self._iter = None

    def _epoch_indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(len(self.dataset), generator=g).tolist()
        per_rank = len(perm) // self.info.world_size
        mine = perm[self.info.rank :: self.info.world_size][:per_rank]
        usable = per_rank - per_rank % self.batch_size
        return mine[self.position * self.batch_size : usable]

    def _open(self):
        # an explicit generator keeps DataLoader from drawing its base seed from the global RNG,
        # which would shift every later random draw after a resume
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.monitor.start_pass(full=self.position == 0)
        # iterable data keeps its last partial batch so that the broken samples in it are counted (``next``
        # drops it after counting); map-style data never reads the samples of a partial batch
        common = dict(batch_size=self.batch_size, collate_fn=self.collator, num_workers=self.workers,
                      generator=g, drop_last=not self.iterable, pin_memory=self.info.device.type == "cuda")
        if self.workers > 0:
            # a worker that stalls (a hung network read) surfaces as an error after `timeout` seconds; one
            # that dies is detected by the DataLoader itself
            common.update(timeout=self.timeout, worker_init_fn=_worker_init)
        if self.iterable:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            it = iter(torch.utils.data.DataLoader(self.dataset, **common))
            # fast-forward to the resume point; the random crops of the re-read samples must not
            # advance the RNG, whose restored state already includes them
            with torch.random.fork_rng(devices=[]):
                for _ in range(self.position):
                    self._fetch(it)
            return it
        return iter(torch.utils.data.DataLoader(self.dataset, sampler=_IndexSampler(self._epoch_indices()), **common))

    def _fetch(self, it):
        """The DataLoader's next batch or None at the end of the pass; a dead or stalled worker becomes a
        ``DataError``."""
        from ..data import DataError

        try:
            return next(it, None)
        except RuntimeError as err:
            if self.workers == 0 or "DataLoader" not in str(err):
                raise
            _shutdown(it)  # a stalled worker must not keep the process alive at exit
            self._iter = None
            raise DataError(f"{err} (rank {self.info.rank}, epoch {self.epoch}). Rerun with --workers 0 to see the "
                            "failing sample's error in the main process; --resume continues from the last "
                            "checkpoint") from None

    def close(self) -> None:
        """Stop the DataLoader workers now (before a final checkpoint, or after a worker failed); the
        next ``next()`` reopens the stream at the same position."""
        it, self._iter = self._iter, None
        if it is not None:
            _shutdown(it)

    def next(self) -> dict:
        while True:
            if self._iter is None:
                self._iter = self._open()
            batch = self._fetch(self._iter)
            if batch is None:  # end of the pass: a full pass that could not fill a batch raises
                self._iter = None
                self.monitor.end_pass()
                self.epoch, self.position = self.epoch + 1, 0
                continue
            self.position += 1
            self.skips.update(batch["skipped"])
            good = batch["images"].shape[0]
            partial = self.iterable and good + len(batch["skipped"]) < self.batch_size  # the end of a pass
            self.monitor.observe(good, batch["skipped"], usable=good >= 2 and not partial)
            if good >= 2 and not partial:
                return batch


def _shutdown(it) -> None:
    """End a DataLoader iterator's worker processes: torch's own shutdown (private API, hence guarded),
    then SIGKILL for any worker that did not exit (stuck in a read)."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in getattr(it, "_workers", []):
        if worker.is_alive():
            worker.kill()


def _worker_init(_worker_id: int) -> None:
    """DataLoader workers ignore the preemption signals a scheduler sends to the whole process group
    (SLURM: SIGUSR1, then SIGTERM): the main process finishes its step, checkpoints and shuts them down."""
    from .preemption import ignore_stop_signals_in_worker

    ignore_stop_signals_in_worker()


def to_model_inputs(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """Batch dict -> keyword arguments of ``BusModel.forward`` on ``device``. Samples without patch
    labels get a row of -1 (the PTM loss skips it)."""
    labels = batch["patch_labels"].clone()
    labels[~batch["has_patch_labels"]] = -1.0
    return {
        "images": batch["images"].to(device, non_blocking=True),
        "input_ids": batch["input_ids"].to(device, non_blocking=True),
        "attention_mask": batch["attention_mask"].to(device, non_blocking=True),
        "patch_labels": labels.to(device, non_blocking=True),
    }
