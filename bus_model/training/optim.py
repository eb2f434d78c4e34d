"""AdamW with decoupled weight decay on matrices only, and the cosine schedule with linear warm-up
(the recipe of BUS arXiv 2307.08504 §4.1)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from ..momentum import attach_to_optimizer


def setup_optimizer(model: torch.nn.Module, args: argparse.Namespace, master=None) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (biases, norms, the temperature are not decayed). ``master``: a
    ``MasterWeights`` (``--bf16-weights``): the optimizer updates its fp32 masters, copied back into the bf16
    working weights right after each step (before the momentum EMA step, which reads the weights)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if master is not None:
        groups = master.optimizer_params(groups)
    # the fused kernel (CPU and CUDA) is ~10x faster than the per-tensor loop on CPU; FSDP keeps the default
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas), fused=not args.fsdp)
    if master is not None:
        optimizer.register_step_post_hook(lambda *_: master.masters_to_weights())
    attach_to_optimizer(model, optimizer)  # momentum distillation: the EMA step follows each optimizer step
    return optimizer


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


def follow_current_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, args: argparse.Namespace) -> None:
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
