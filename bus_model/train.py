"""``bus train``: pre-train a BUS model (arXiv 2307.08504 §4.1) on synthetic data or a real corpus.

    python -m bus_model.train --model bus-tiny --data synthetic --out runs/tiny --steps 200
    torchrun --nproc_per_node=K -m bus_model.train --model bus-base --data shards/{00000..00999}.tar --out runs/b

The loop in ``train`` reads top to bottom and is built from the small ``setup_*`` functions below:
AdamW, cosine schedule with linear warm-up, gradient accumulation, gradient clipping, bf16 autocast on
GPU, DDP under ``torchrun`` (gloo on CPU, NCCL on GPU; every rank reads its own shard of the data; only
rank 0 writes), or FSDP2 with ``--fsdp`` (parameters, gradients and optimizer state sharded; checkpoints
hold the gathered full state, so they load anywhere). ``OUT/metrics.jsonl`` gets one JSON object per
logged step; ``OUT/checkpoints/`` gets atomic checkpoints (``bus_model.checkpoint``) from which
``--resume`` continues exactly: same data order, same RNG draws, same losses step by step (on CPU).
``--stop-at N`` ends a process early, as a time-limited job would. ``OUT/summary.json`` closes the run
with the final step, throughput, skipped samples and each rank's parameter hash (the ranks must agree).

tqdm, TensorBoard and the data/tokenizer libraries are imported inside the functions that use them,
so ``import bus_model`` needs none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .config import BusConfig, list_config_names, load_config_dict, merge_overrides
from .model import BusModel

LOSS_NAMES = ("itc", "itm", "mlm", "prefix_lm", "ptm")
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


class UsageError(Exception):
    """A bad command line (missing data path, unknown model, inconsistent flags): ``bus`` prints the
    message and exits with status 2, without a traceback."""


# ------------------------------------------------------------------------------------------ arguments
def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``bus train`` flags (shared by ``python -m bus_model.train``)."""
    g = parser.add_argument_group("run")
    g.add_argument("--model", required=True, help="config name (see list_models()) or a config .json file")
    g.add_argument("--data", required=True, help="'synthetic', a manifest (.jsonl/.json/.csv), a COCO captions "
                   "file, or webdataset shards (dir, glob or {00000..00009}.tar)")
    g.add_argument("--out", required=True, help="run directory: metrics.jsonl, checkpoints/, summary.json")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    g.add_argument("--seed", type=int, default=0, help="seed for init, masking and data order")
    g.add_argument("--stop-at", type=int, default=None, help="end this process after this many steps (with a "
                   "checkpoint) as a time-limited job would; --resume continues the same run to --steps")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1000, help="optimizer steps in total")
    g.add_argument("--batch-size", type=int, default=32, help="images per micro-batch on each rank")
    g.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.01, help="final lr as a share of --lr")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 5%% of --steps)")
    g.add_argument("--weight-decay", type=float, default=0.02, help="AdamW decay of matrices (not biases/norms)")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"))
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off on CPU)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    g = parser.add_argument_group("data")
    g.add_argument("--tokenizer", default=None, help="local HF tokenizer directory (required for real data; "
                   "synthetic data builds its own WordPiece tokenizer)")
    g.add_argument("--train-samples", type=int, default=10000, help="synthetic data: dataset size")
    g.add_argument("--data-seed", type=int, default=0, help="synthetic data: the generator's seed")
    g.add_argument("--image-root", default=None, help="directory the manifest's image paths are relative to")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per rank")
    g = parser.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=int, default=10, help="write a metrics.jsonl row every N steps")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept on disk")
    g.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard (needs tensorboard)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = parser.add_argument_group("system")
    g.add_argument("--device", default=None, help="cpu, cuda (default: cuda:LOCAL_RANK if available)")
    g.add_argument("--num-threads", type=int, default=None, help="torch CPU threads per process")
    g.add_argument("--find-unused-parameters", action="store_true", help="DDP option for configs where "
                   "some parameters get no gradient")
    g.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state across "
                   "ranks (FSDP2 fully_shard per Transformer block) instead of DDP, for models too large to replicate")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Raise ``UsageError`` for flags that cannot work, before anything expensive happens."""
    positive = ("steps", "batch_size", "accum_steps", "log_every", "save_every", "keep_checkpoints", "train_samples")
    for name in positive:
        value = getattr(args, name)
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.batch_size < 2:
        raise UsageError("--batch-size must be >= 2 (ITC and ITM take their negatives from the batch)")
    for name in ("lr", "weight_decay", "grad_clip"):
        if not math.isfinite(getattr(args, name)) or getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        raise UsageError(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if args.warmup_steps is not None and not 0 <= args.warmup_steps <= args.steps:
        raise UsageError(f"--warmup-steps must be in [0, --steps], got {args.warmup_steps}")
    if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
        raise UsageError(f"--stop-at must be in [1, --steps], got {args.stop_at}")
    if args.workers < 0 or (args.num_threads is not None and args.num_threads < 1):
        raise UsageError("--workers must be >= 0 and --num-threads >= 1")
    check_model_arg(args.model)
    check_data_arg(args.data)
    if args.data != "synthetic" and args.tokenizer is None:
        raise UsageError("real data needs --tokenizer DIR (a local HF tokenizer directory, e.g. bert-base-uncased)")
    if args.tokenizer is not None and not os.path.isdir(args.tokenizer):
        raise UsageError(f"--tokenizer: directory not found: {args.tokenizer}")


def check_model_arg(model: str) -> None:
    if model.endswith(".json"):
        if not os.path.isfile(model):
            raise UsageError(f"--model: config file not found: {model}")
    elif model not in list_config_names():
        raise UsageError(f"--model: unknown model name {model!r}; available: {', '.join(list_config_names())}")


def check_data_arg(data: str) -> None:
    """'synthetic', an existing file or directory, or a shard pattern (glob / brace range)."""
    if data == "synthetic" or os.path.exists(data):
        return
    if any(c in data for c in "*?[{"):
        from .data.webdataset import expand_shards

        try:
            expand_shards(data)
        except FileNotFoundError as err:
            raise UsageError(f"--data: {err}") from None
        return
    raise UsageError(f"--data: path not found: {data} (give 'synthetic' or an existing manifest, COCO file or shards)")


# -------------------------------------------------------------------------------------------- setup
@dataclass
class DistInfo:
    """This process's place in the run: ``rank`` of ``world_size``, its ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def setup_distributed(args: argparse.Namespace) -> DistInfo:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1 (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if args.device is not None:
        device = torch.device(args.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda given but CUDA is not available")
        torch.cuda.set_device(device)
    if args.fsdp and "WORLD_SIZE" not in os.environ:
        raise UsageError("--fsdp needs a process group: launch with torchrun (--nproc_per_node=1 for one device)")
    if (world > 1 or args.fsdp) and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    return DistInfo(rank, world, local_rank, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_tokenizer(args: argparse.Namespace, max_length: int):
    """The synthetic WordPiece tokenizer, or the local HF tokenizer directory given by ``--tokenizer``."""
    from .data import build_synthetic_tokenizer, load_tokenizer

    if args.tokenizer is not None:
        return load_tokenizer(args.tokenizer)
    return build_synthetic_tokenizer(max_length)


def model_config_dict(model: str) -> dict[str, Any]:
    """The config dict of a named model or a config .json file."""
    if model.endswith(".json"):
        try:
            return json.loads(Path(model).read_text())
        except json.JSONDecodeError as err:
            raise UsageError(f"--model: {model} is not valid JSON ({err})") from None
    return load_config_dict(model)


def tokenizer_overrides(tokenizer) -> dict[str, Any]:
    """Text-config fields that must follow the tokenizer: vocabulary size and special token ids."""
    ids = {"pad_token_id": tokenizer.pad_token_id, "cls_token_id": tokenizer.cls_token_id,
           "sep_token_id": tokenizer.sep_token_id, "mask_token_id": tokenizer.mask_token_id}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise UsageError(f"the tokenizer lacks special tokens: {missing} (a BERT-style tokenizer is needed)")
    return {"text": {"vocab_size": len(tokenizer), **ids}}


def setup_model(args: argparse.Namespace, tokenizer) -> BusModel:
    """A randomly initialised ``BusModel`` whose text side matches the tokenizer."""
    data = merge_overrides(model_config_dict(args.model), tokenizer_overrides(tokenizer))
    try:
        config = BusConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--model {args.model}: {err}") from None
    model = BusModel(config)
    if args.grad_checkpointing:
        if hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(True)
        else:
            apply_grad_checkpointing(model)
    return model


def _checkpointed(fn):
    """``fn`` whose activations are recomputed in backward instead of stored (non-reentrant)."""
    from torch.utils.checkpoint import checkpoint

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)

    return run


def apply_grad_checkpointing(model: torch.nn.Module) -> int:
    """Recompute every Transformer block's activations in backward (activation memory O(1 block)
    instead of O(depth)); returns the number of blocks wrapped. A block is an entry of an
    ``nn.ModuleList``; the ViT's blocks run through ``attend``/``feed_forward``, which are wrapped too.
    The blocks draw no random numbers, so the recomputation is exact."""
    wrapped = 0
    for _name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.ModuleList):
            continue
        for block in module:
            for method in ("forward", "attend", "feed_forward"):
                if hasattr(block, method) and method in type(block).__dict__:
                    setattr(block, method, _checkpointed(getattr(block, method)))
            wrapped += 1
    return wrapped


def setup_dataset(args: argparse.Namespace, config: BusConfig, info: DistInfo):
    """The training dataset named by ``--data`` (images at the model's input size)."""
    from .data import build_dataset

    v = config.vision
    try:
        return build_dataset(args.data, split="train", image_size=v.image_size, patch_size=v.patch_size,
                             seed=args.data_seed, num_samples=args.train_samples, image_root=args.image_root,
                             rank=info.rank, world_size=info.world_size)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"--data {args.data}: {err}") from None


def setup_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (biases, norms, the temperature are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel (CPU and CUDA) is ~10x faster than the per-tensor loop on CPU; FSDP keeps the default
    return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas), fused=not args.fsdp)


@dataclass
class CosineWithWarmup:
    """lr multiplier at step s: ``(s + 1) / warmup`` during warm-up, then a cosine from 1 down to
    ``min_ratio`` at ``total``. A plain object (not a lambda) so the scheduler state saves as data."""

    warmup: int
    total: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def setup_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_for(args))


def schedule_for(args: argparse.Namespace) -> CosineWithWarmup:
    """The lr multiplier of a run: warm-up ``--warmup-steps`` (default 5% of ``--steps``), cosine to ``--steps``."""
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 20)
    return CosineWithWarmup(warmup, args.steps, args.min_lr_ratio)


def wrap_model(model: BusModel, args: argparse.Namespace, info: DistInfo) -> torch.nn.Module:
    """DDP across ranks (rank 0's initial weights are broadcast to all); with ``--fsdp`` the text, fusion,
    decoder and PAD layers (each entry of an ``nn.ModuleList`` outside the ViT) and then the whole model
    are sharded in place (FSDP2) and the model itself is returned; without distribution the model itself."""
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        scalars = {p for p in model.parameters() if p.dim() == 0}  # fully_shard cannot shard 0-d tensors
        for name, module in list(model.named_modules()):
            # the ViT runs its blocks through attend()/feed_forward(), not forward(), which FSDP's
            # hooks need: its parameters stay in the root group (gathered once per forward)
            if isinstance(module, torch.nn.ModuleList) and not name.startswith("vision"):
                for block in module:
                    fully_shard(block)
        fully_shard(model, ignored_params=scalars)
        return model
    if not info.enabled:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=args.find_unused_parameters
    )


# --------------------------------------------------------------------------------------------- data
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
        from .data import SkipReport

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


# ------------------------------------------------------------------------------------------ helpers
def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` without distribution)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def average_replicated_grads(model: torch.nn.Module, info: DistInfo) -> None:
    """FSDP leaves 0-d parameters (the ITC temperature) replicated and unmanaged: average their
    gradients across ranks here, as DDP would."""
    for p in model.parameters():
        if p.dim() == 0 and p.grad is not None and not hasattr(p, "full_tensor"):
            dist.all_reduce(p.grad)
            p.grad.div_(info.world_size)


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Scale all gradients so that their global L2 norm is at most ``max_norm``; returns the norm
    before clipping, () float32. Works on FSDP shards (DTensor) and plain tensors together."""
    squares = []
    for p in model.parameters():
        if p.grad is None:
            continue
        g = p.grad.detach()
        norm = torch.linalg.vector_norm(g.float())
        squares.append(_full(norm) ** 2 if hasattr(norm, "full_tensor") else norm**2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.detach().mul_(scale.to(p.grad.device))
    return total


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP shard (a DTensor; collective), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def parameter_hash(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's bytes, in name order: equal on ranks that hold equal weights.
    Under FSDP every rank must call it (the shards are gathered)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(_full(p.detach()).float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def full_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, fsdp: bool):
    """(model state dict or None, optimizer state dict) to checkpoint. Without FSDP: (None: the model
    saves itself, ``optimizer.state_dict()``). With FSDP (collective, every rank calls it): the
    unsharded model and optimizer state, keyed by parameter name, on CPU, complete on rank 0."""
    if not fsdp:
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, *, fsdp: bool) -> None:
    """Inverse of ``full_training_state`` for the optimizer (every rank read the same checkpoint)."""
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def reduce_losses(sums: torch.Tensor, counts: torch.Tensor, info: DistInfo) -> dict[str, float]:
    """Mean of each loss term over micro-batches and ranks: sums, counts (len(LOSS_NAMES),)."""
    both = torch.stack([sums, counts]).double()
    if info.enabled:
        dist.all_reduce(both)
    return {name: float(both[0, i] / both[1, i]) for i, name in enumerate(LOSS_NAMES) if both[1, i] > 0}


def _resumed_metrics(path: Path, step: int) -> None:
    """Drop metrics rows logged after the checkpoint being resumed (they will be logged again)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    os.replace(tmp, path)


# flags that change what the resumed steps compute: changing them on --resume is allowed, but the run
# then differs from an uninterrupted one
_RUN_DEFINING = ("model", "data", "seed", "steps", "batch_size", "accum_steps", "lr", "min_lr_ratio", "warmup_steps",
                 "weight_decay", "betas", "grad_clip", "train_samples", "data_seed", "amp")


def _warn_changed_args(saved: dict[str, Any], args: argparse.Namespace) -> None:
    now = _args_record(args)
    for key in _RUN_DEFINING:
        if key in saved and saved[key] != now.get(key):
            print(f"warning: --resume with a different --{key.replace('_', '-')} (checkpoint: {saved[key]!r}, now: "
                  f"{now.get(key)!r}): the run will not match an uninterrupted one", file=sys.stderr)


def _follow_current_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, args: argparse.Namespace) -> None:
    """``load_state_dict`` restores the saved schedule's length; make it follow this run's --steps
    (identical when resuming the same run, longer when extending it)."""
    fresh = schedule_for(args)
    for fn in scheduler.lr_lambdas:
        if isinstance(fn, CosineWithWarmup):
            fn.warmup, fn.total, fn.min_ratio = fresh.warmup, fresh.total, fresh.min_ratio
    # the lr of the next step was computed with the saved schedule: recompute it with this one
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _args_record(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if not k.startswith("_")}


class MetricsLogger:
    """Accumulates loss terms and throughput between logged steps; writes one ``metrics.jsonl`` row
    per logged step (rank 0), mirrors it to TensorBoard and the progress bar.

    ``add(output, inputs)`` after every micro-batch (no host sync); ``write(step, ...)`` reduces the
    window over micro-batches and ranks and returns the row."""

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
            row["grad_norm"] = float(_full(grad_norm))
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


# --------------------------------------------------------------------------------------------- loop
def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``args.steps`` optimizer steps (from the latest checkpoint with ``--resume``); returns the
    summary that rank 0 also writes to ``OUT/summary.json``."""
    from .data import Collator, save_tokenizer

    check_args(args)
    info = setup_distributed(args)
    out = Path(args.out)
    seed_everything(args.seed)  # the same initial weights on every rank
    tokenizer = setup_tokenizer(args, model_config_dict(args.model).get("max_text_len", 32))
    model = setup_model(args, tokenizer).to(info.device)
    config = model.config
    dataset = setup_dataset(args, config, info)
    collator = Collator(tokenizer, image_size=config.vision.image_size, patch_size=config.vision.patch_size,
                        max_length=config.max_text_len)
    stream = BatchStream(dataset, collator, batch_size=args.batch_size, seed=args.seed, info=info, workers=args.workers)
    start, loaded = 0, None
    latest = ckpt.latest_checkpoint(out)
    if latest is not None and not args.resume:
        raise UsageError(f"--out {out} already holds a run (checkpoint at step {latest.step}): pass --resume to "
                         "continue it, or choose another --out")
    if latest is not None:
        loaded = ckpt.load_training_state(latest.path)
        if len(loaded.rng) != info.world_size:
            raise UsageError(f"--resume: {latest.path} was written by {len(loaded.rng)} rank(s), this run has "
                             f"{info.world_size}; resume with the same number of processes")
        if bool(loaded.trainer_state.get("fsdp", False)) != args.fsdp:
            raise UsageError(f"--resume: {latest.path} was written {'with' if args.fsdp is False else 'without'} "
                             "--fsdp; resume with the same setting")
        ckpt.load_model_weights(model, latest.path)
    ddp_model = wrap_model(model, args, info)
    optimizer = setup_optimizer(model, args)  # after wrapping: FSDP replaces the parameters with shards
    scheduler = setup_scheduler(optimizer, args)
    seed_everything(args.seed + 7919 * info.rank)  # ranks draw different masks and negatives
    if loaded is not None:
        load_optimizer_state(model, optimizer, loaded.optimizer, fsdp=args.fsdp)
        scheduler.load_state_dict(loaded.scheduler)
        _follow_current_schedule(scheduler, args)
        if info.is_main:
            _warn_changed_args(loaded.trainer_state.get("args", {}), args)
        stream.load_state(loaded.trainer_state["data"][info.rank])
        ckpt.restore_rng_state(*loaded.rng[info.rank])
        start = latest.step
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if latest is not None:
            _resumed_metrics(out / METRICS_FILE, start)
            print(f"resuming from {latest.path} (step {start})", file=sys.stderr)
        elif args.resume:
            print(f"--resume: no checkpoint in {out}, starting from step 0", file=sys.stderr)
        if latest is None and (out / METRICS_FILE).exists():
            (out / METRICS_FILE).unlink()  # a fresh run overwrites, it does not append to an old one
        save_tokenizer(tokenizer, out / ckpt.TOKENIZER_DIR)
    amp = args.amp if args.amp is not None else info.device.type == "cuda"
    bar = _progress_bar(start, args.steps, disabled=args.no_progress or not info.is_main)
    logger = MetricsLogger(out, config, info, tensorboard=args.tensorboard, bar=bar)

    def save(step: int) -> Path:
        """Every rank contributes its RNG and data position; rank 0 writes."""
        rank_rng = gather_objects(ckpt.capture_rng_state(), info)
        data_states = gather_objects(stream.state(), info)
        model_state, optimizer_state = full_training_state(model, optimizer, fsdp=args.fsdp)  # collective
        path = None
        if info.is_main:
            state = {"data": data_states, "args": _args_record(args), "world_size": info.world_size,
                     "fsdp": args.fsdp}
            path = ckpt.save_checkpoint(out, step, model=model, model_state=model_state,
                                        optimizer_state=optimizer_state, scheduler_state=scheduler.state_dict(),
                                        trainer_state=state, rank_rng=rank_rng, tokenizer=tokenizer,
                                        keep=args.keep_checkpoints)
        if info.enabled:
            dist.barrier()
        return path

    model.train()
    run_start = time.perf_counter()
    images_trained = 0
    last_saved = start
    end = args.steps if args.stop_at is None else max(start, args.stop_at)
    for step in range(start, end):
        # ---- one optimizer step: accumulate gradients over micro-batches
        for micro in range(args.accum_steps):
            inputs = to_model_inputs(stream.next(), info.device)
            last = micro == args.accum_steps - 1
            if args.fsdp:  # FSDP reduce-scatters gradients only on the last micro-batch
                model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext() if last or args.fsdp or not info.enabled else ddp_model.no_sync()
            with sync:
                with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=amp):
                    output = ddp_model(**inputs)
                (output.loss / args.accum_steps).backward()
            logger.add(output, inputs)
            images_trained += inputs["images"].shape[0]
        grad_norm = None
        if args.fsdp:
            average_replicated_grads(model, info)
            if args.grad_clip > 0:
                grad_norm = clip_gradients(model, args.grad_clip)
        elif args.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        # ---- log
        if done % args.log_every == 0 or done == end:
            logger.write(done, lr=lr, grad_norm=grad_norm, stream=stream)
        bar.update(1)

        # ---- checkpoint
        if done % args.save_every == 0 or done == end:
            save(done)
            last_saved = done
    bar.close()
    if last_saved != end:  # nothing left to run (resumed at the end): make sure the last one exists
        save(end)

    # ---- summary: every rank's parameter hash (DDP keeps them equal) and skipped samples
    wall = time.perf_counter() - run_start
    hashes = gather_objects(parameter_hash(model), info)
    skipped = gather_objects(dict(stream.skips.counts), info)
    images = gather_objects(images_trained, info)
    summary = {
        "steps": end, "resumed_from": start, "world_size": info.world_size, "wall_s": wall,
        "images_per_s": sum(images) / wall if wall > 0 else None, "param_sha256": hashes,
        "skipped": {k: sum(s.get(k, 0) for s in skipped) for k in sorted({k for s in skipped for k in s})},
        "skipped_examples": [dataclasses.asdict(e) for e in stream.skips.examples],
        "checkpoint": str(ckpt.latest_checkpoint(out).path) if info.is_main else None,
    }
    if info.is_main:
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        print(stream.skips.summary() if info.world_size == 1 else f"skipped samples (all ranks): {summary['skipped']}",
              file=sys.stderr)
    logger.close()
    if info.enabled:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _progress_bar(start: int, total: int, disabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=disabled, unit="step", dynamic_ncols=True)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(str(out / "tensorboard"))


def main(argv: list[str] | None = None) -> int:
    """``python -m bus_model.train ...`` (the same flags as ``bus train``)."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
