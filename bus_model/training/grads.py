"""Gradient helpers for FSDP2 shards and plain tensors alike: averaging the replicated scalars and
global-norm clipping."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .distributed import DistInfo, full_tensor


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
        squares.append(full_tensor(norm) ** 2 if hasattr(norm, "full_tensor") else norm**2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.detach().mul_(scale.to(p.grad.device))
    return total
