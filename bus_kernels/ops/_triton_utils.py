"""Small helpers shared by the Triton launchers."""

from __future__ import annotations

import contextlib

import torch
import triton


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def tile_rows(block_cols: int, budget: int = 4096, max_rows: int = 64) -> int:
    """Rows per tile so that a (rows, block_cols) fp32 tile stays within ``budget`` elements."""
    return max(1, min(max_rows, budget // block_cols))


def on_device(t: torch.Tensor):
    """Context for launching Triton kernels on ``t``'s GPU: Triton launches on the *current* CUDA device
    and its current stream, so tensors on another GPU (``cuda:1`` while device 0 is current) would be
    read with the wrong device's context. A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
