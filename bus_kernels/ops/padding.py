"""Padded <-> packed conversion for the varlen ops (flash-attn ``bert_padding`` semantics).

``unpad`` keeps the positions where ``mask`` is set, in row-major order (row 0's kept tokens, then
row 1's, ...), and returns what ``varlen_attention`` needs: the packed tokens, their flat positions
``indices`` into ``B * S``, ``cu_seqlens`` and ``max_seqlen``. ``pad`` scatters packed tokens back to
``(B, S, ...)`` with zeros elsewhere. Both are differentiable (a gather and a scatter: each gradient
is the other operation). Kept positions need not be a prefix of each row.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._capture import host_reads_allowed, refuse_capture
from .._validation import check_int, check_rank, check_tensor


class UnpadOutput(NamedTuple):
    """x_packed: (total, ...) x's dtype. indices: (total,) int64 flat positions ``b * S + s``.
    cu_seqlens: (B + 1,) int32. max_seqlen: int, most kept tokens in a row."""

    x_packed: torch.Tensor
    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int


def unpad(x: torch.Tensor, mask: torch.Tensor) -> UnpadOutput:
    """Pack the tokens of ``x`` where ``mask`` is set.

    Args:
        x: ``(B, S, ...)`` tensor of any dtype (e.g. ``(B, S, C)`` hidden states or ``(B, S, H, D)``).
        mask: ``(B, S)`` bool or integer tensor on x's device; nonzero = keep (an attention mask).

    Returns:
        ``UnpadOutput(x_packed (total, ...), indices (total,) int64, cu_seqlens (B + 1,) int32,
        max_seqlen int)`` with ``total = mask.count_nonzero()``. Reads the row counts on the host
        (for ``max_seqlen``), so it cannot run inside a CUDA graph capture (``CaptureError``).
        Differentiable in ``x``.
    """
    check_tensor("x", x)
    check_tensor("mask", mask)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (B, S, ...) (>= 2 dims), got shape {tuple(x.shape)}")
    check_rank("mask", mask, 2, "(B, S)")
    if mask.dtype.is_floating_point or mask.is_complex():
        raise TypeError(f"mask must be a bool or integer tensor, got {mask.dtype}")
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected x's (B, S) = {tuple(x.shape[:2])}")
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but x is on {x.device}; all inputs must be on one device")
    refuse_capture(x, "unpad")
    B, S = mask.shape
    keep = mask if mask.dtype == torch.bool else mask != 0
    seqlens = keep.sum(dim=1, dtype=torch.int32)  # (B,)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()  # (total,) int64, row-major
    cu_seqlens = torch.zeros(B + 1, dtype=torch.int32, device=x.device)
    cu_seqlens[1:] = torch.cumsum(seqlens, dim=0)
    max_seqlen = max(seqlens.tolist(), default=0)  # the (B,) counts read once, no reduction kernel
    x_packed = torch.index_select(x.reshape(B * S, *x.shape[2:]), 0, indices)  # (total, ...)
    return UnpadOutput(x_packed, indices, cu_seqlens, max_seqlen)


def pad(x_packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Scatter packed tokens back to a padded batch (the inverse of ``unpad``).

    Args:
        x_packed: ``(total, ...)`` tensor of any dtype.
        indices: ``(total,)`` int64 (or int32) distinct flat positions ``b * seqlen + s`` in
            ``[0, batch * seqlen)``, as returned by ``unpad``.
        batch, seqlen: ints >= 0, the padded shape.

    Returns:
        ``(batch, seqlen, ...)`` in x_packed's dtype, zeros where no token lands. Differentiable in
        ``x_packed``.
    """
    check_tensor("x_packed", x_packed)
    check_tensor("indices", indices)
    if x_packed.dim() < 1:
        raise ValueError("x_packed must have shape (total, ...) (>= 1 dim), got a 0-dim tensor")
    check_rank("indices", indices, 1, "(total,)")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must have dtype torch.int64 or torch.int32, got {indices.dtype}")
    if indices.shape[0] != x_packed.shape[0]:
        raise ValueError(f"indices has {indices.shape[0]} entries, expected x_packed's total {x_packed.shape[0]}")
    if indices.device != x_packed.device:
        raise ValueError(
            f"indices is on {indices.device} but x_packed is on {x_packed.device}; all inputs must be on one device"
        )
    batch = check_int("batch", batch, 0)
    seqlen = check_int("seqlen", seqlen, 0)
    if indices.numel() > 0 and host_reads_allowed(indices):  # not while tracing or capturing a CUDA graph
        low, high = torch.stack(indices.aminmax()).tolist()  # one reduction, one host read
        if low < 0 or high >= batch * seqlen:
            raise ValueError(f"indices must lie in [0, batch * seqlen = {batch * seqlen}), got values in [{low}, {high}]")
    out = x_packed.new_zeros(batch * seqlen, *x_packed.shape[1:])
    out = out.index_put((indices.long(),), x_packed)  # out-of-place: differentiable in x_packed
    return out.view(batch, seqlen, *x_packed.shape[1:])
