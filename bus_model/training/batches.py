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
    ``state()`` is ``{"epoch", "position"}`` (micro-batches drawn in the epoch) plus the skip counts.

    Batches with fewer than 2 usable samples (broken images) are skipped: ITC/ITM need negatives.
    Resume is exact with ``workers=0`` (random crops draw from the checkpointed main-process RNG); with
    worker processes the data order is exact but the augmentations of a resumed epoch are redrawn.
    """

    def __init__(self, dataset, collator, *, batch_size: int, seed: int, info: DistInfo, workers: int):
        from ..data import SkipReport

        self.dataset, self.collator, self.batch_size = dataset, collator, batch_size
        self.seed, self.info, self.workers = seed, info, workers
        self.iterable = isinstance(dataset, torch.utils.data.IterableDataset)
        self.epoch, self.position = 0, 0
        self.skips = SkipReport()
        self._iter = None
        if not self.iterable:
            per_rank = len(dataset) // info.world_size
            if per_rank < batch_size:
                raise UsageError(f"the dataset has {len(dataset)} samples: fewer than --batch-size ({batch_size}) "
                                 f"per rank x {info.world_size} rank(s)")

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "skipped": dict(self.skips.counts)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.skips.counts.update(state.get("skipped", {}))
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
        common = dict(batch_size=self.batch_size, collate_fn=self.collator, num_workers=self.workers,
                      generator=g, drop_last=True, pin_memory=self.info.device.type == "cuda")
        if self.iterable:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            it = iter(torch.utils.data.DataLoader(self.dataset, **common))
            # fast-forward to the resume point; the random crops of the re-read samples must not
            # advance the RNG, whose restored state already includes them
            with torch.random.fork_rng(devices=[]):
                for _ in range(self.position):
                    next(it, None)
            return it
        return iter(torch.utils.data.DataLoader(self.dataset, sampler=_IndexSampler(self._epoch_indices()), **common))

    def next(self) -> dict:
        empty_epochs = 0
        while True:
            if self._iter is None:
                self._iter = self._open()
            batch = next(self._iter, None)
            if batch is None:  # end of epoch
                self._iter = None
                empty_epochs = empty_epochs + 1 if self.position == 0 else 0
                if empty_epochs >= 2:
                    raise RuntimeError(f"rank {self.info.rank} got no batch of {self.batch_size} samples from the data")
                self.epoch, self.position = self.epoch + 1, 0
                continue
            self.position += 1
            self.skips.update(batch["skipped"])
            if batch["images"].shape[0] >= 2:
                return batch


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
