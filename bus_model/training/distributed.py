"""This process's place in a run (rank, world size, device), process-group setup under ``torchrun``,
DDP/FSDP2 wrapping, and the collectives the loop needs (gather, parameter hash)."""

from __future__ import annotations

import argparse
import hashlib
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..model import BusModel
from .errors import UsageError


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
            if isinstance(module, torch.nn.ModuleList) and "vision" not in name.split("."):  # also momentum_model.vision
                for block in module:
                    fully_shard(block)
        fully_shard(model, ignored_params=scalars)
        return model
    if not info.enabled:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # broadcast_buffers=False: every buffer is identical on all ranks by construction (the ITC queues are
    # filled from all-gathered features, momentum.py); broadcasting them would move 128 MiB per step at K=65,536
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=args.find_unused_parameters, broadcast_buffers=False
    )


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` without distribution)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP shard (a DTensor; collective), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def parameter_hash(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's bytes, in name order: equal on ranks that hold equal weights.
    Under FSDP every rank must call it (the shards are gathered)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(full_tensor(p.detach()).float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
