"""Training state in and out of a run checkpoint: the (FSDP-gathered) model and optimizer state, and
the checks and warnings of ``--resume``. The files themselves are written by ``checkpoint``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .args import args_record
from .batches import BatchStream
from .distributed import DistInfo
from .errors import RunError, UsageError
from .metrics import MetricsLogger
from .optim import follow_current_schedule


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


# flags that change what the resumed steps compute: changing them on --resume is allowed, but the run
# then differs from an uninterrupted one
RUN_DEFINING = ("model", "data", "seed", "steps", "batch_size", "accum_steps", "lr", "min_lr_ratio", "warmup_steps",
                 "weight_decay", "betas", "grad_clip", "train_samples", "data_seed", "amp", "compile", "compile_backend")


def warn_changed_args(saved: dict[str, Any], args: argparse.Namespace) -> None:
    now = args_record(args)
    for key in RUN_DEFINING:
        if key in saved and saved[key] != now.get(key):
            print(f"warning: --resume with a different --{key.replace('_', '-')} (checkpoint: {saved[key]!r}, now: "
                  f"{now.get(key)!r}): the run will not match an uninterrupted one", file=sys.stderr)


def find_resume_point(out: Path, args: argparse.Namespace, info: DistInfo):
    """(latest checkpoint of ``out`` or None, its ``LoadedState`` or None). A run directory that already
    holds a checkpoint needs ``--resume``; a checkpoint must be resumed with as many ranks and the same
    ``--fsdp`` setting as wrote it."""
    latest = ckpt.latest_checkpoint(out)
    if latest is None:
        return None, None
    if not args.resume:
        raise UsageError(f"--out {out} already holds a run (checkpoint at step {latest.step}): pass --resume to "
                         "continue it, or choose another --out")
    latest = _newest_valid(out, info)
    loaded = ckpt.load_training_state(latest.path)
    if len(loaded.rng) != info.world_size:
        raise UsageError(f"--resume: {latest.path} was written by {len(loaded.rng)} rank(s), this run has "
                         f"{info.world_size}; resume with the same number of processes")
    if bool(loaded.trainer_state.get("fsdp", False)) != args.fsdp:
        raise UsageError(f"--resume: {latest.path} was written {'with' if args.fsdp is False else 'without'} "
                         "--fsdp; resume with the same setting")
    return latest, loaded


def _newest_valid(out: Path, info: DistInfo) -> ckpt.Checkpoint:
    """The newest checkpoint whose files match their checksums (rank 0 hashes them, every rank gets the
    answer). Newer bad ones are renamed ``step_XXXXXXXX.corrupt`` (kept, never loaded) with a warning; none
    valid is a ``RunError``."""
    choice = [None, []]
    if info.is_main:
        good, bad = ckpt.latest_valid_checkpoint(out)
        choice = [None if good is None else str(good.path), [(str(c.path), why) for c, why in bad]]
    if info.enabled:
        dist.broadcast_object_list(choice, src=0)
    good, bad = choice
    if good is None:
        raise RunError(f"--resume: no valid checkpoint in {out / ckpt.CHECKPOINT_DIR}: "
                       + "; ".join(f"{Path(p).name}: {why}" for p, why in bad)
                       + ". Nothing was loaded; start a fresh run in another --out (or restore the files)")
    if info.is_main:
        for path, why in bad:
            moved, n = Path(path).with_name(Path(path).name + ".corrupt"), 0
            while moved.exists():  # an earlier fallback left one of the same step
                n += 1
                moved = Path(path).with_name(f"{Path(path).name}.corrupt-{n}")
            os.replace(path, moved)
            print(f"warning: --resume: skipping {path}: {why}; kept as {moved.name}; resuming from "
                  f"{Path(good).name}", file=sys.stderr)
    step = int(Path(good).name.split("_")[1])
    return ckpt.Checkpoint(Path(good), step)


def restore_training_state(loaded: ckpt.LoadedState, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LambdaLR, stream: BatchStream,
                           args: argparse.Namespace, info: DistInfo) -> None:
    """Put optimizer, schedule, data position and this rank's RNG back where the checkpoint left them
    (the weights were loaded before wrapping). Call after the per-rank reseed: the RNG restore wins."""
    load_optimizer_state(model, optimizer, loaded.optimizer, fsdp=args.fsdp)
    scheduler.load_state_dict(loaded.scheduler)
    follow_current_schedule(scheduler, args)
    if info.is_main:
        warn_changed_args(loaded.trainer_state.get("args", {}), args)
    stream.load_state(loaded.trainer_state["data"][info.rank])
    ckpt.restore_rng_state(*loaded.rng[info.rank])


def restore_metrics_window(loaded: ckpt.LoadedState, logger: MetricsLogger, *, step: int, log_every: int,
                           info: DistInfo) -> None:
    """Give ``logger`` back the loss sums of the steps since the last logged row (``trainer_state["metrics"]``,
    one entry per rank), so the first row after ``--resume`` equals the uninterrupted run's. A checkpoint
    written before these were saved resumes with an empty window: a warning says which row it shortens."""
    windows = loaded.trainer_state.get("metrics")
    if windows is not None:
        logger.load_window_state(windows[info.rank])
    elif step % log_every and info.is_main:
        print(f"warning: --resume: the checkpoint of step {step} holds no metrics window (an older checkpoint): "
              f"the next metrics row averages only the steps after {step}", file=sys.stderr)
