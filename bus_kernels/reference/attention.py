"""Pure PyTorch twin of ``varlen_attention`` (the ``"torch"`` backend).

Packed (flash-attn varlen) attention computed densely: the packed q/k/v are gathered into padded
``(B, max_seqlen, H, D)`` blocks using ``max_seqlen_*`` (no host read of ``cu_seqlens``, so it
traces under ``torch.compile``), the scores are masked (padding, bottom-right causal), and the
rows are gathered back to the packed layout. A row with no visible key outputs zeros. Runs on any
device and dtype (float16/bfloat16 inputs are computed in float32), differentiable by autograd.
Memory is ``B * H * max_seqlen_q * max_seqlen_k`` floats: a reference and a fallback, not a kernel.
"""

from __future__ import annotations

import torch


def _padded_index(cu_seqlens: torch.Tensor, max_seqlen: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, max_seqlen) int64 packed row of each padded slot (``total`` for a padding slot) and (B, max_seqlen) validity."""
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    pos = torch.arange(max_seqlen, device=cu_seqlens.device)
    valid = pos[None, :] < lengths[:, None]
    return torch.where(valid, starts[:, None] + pos[None, :], total), valid


def _packed_position(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each packed row: its sequence (total,) int64 and its position in that sequence (total,) int64."""
    rows = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), rows, right=True)
    return seq, rows - cu_seqlens.long()[seq]


def _gather_padded(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (total, ...) -> (B, max_seqlen, ...) rows ``x[index]``; index ``total`` reads a zero row."""
    x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])  # (total + 1, ...), still connected to x if it is empty
    return x[index]


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool = False,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """q (total_q, H, D), k/v (total_k, H, D), cu_seqlens_* (B + 1,) int32, key_bias (total_k,) float32 or None
    -> (total_q, H, D) in q's dtype. ``softmax(scale * q.k + key_bias) @ v`` per sequence; causal masks are
    aligned bottom-right (query i of a length-Lq sequence sees key j iff j <= i + Lk - Lq)."""
    total_q, H, D = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    index_q, valid_q = _padded_index(cu_seqlens_q, max_seqlen_q, total_q)  # (B, Mq)
    index_k, valid_k = _padded_index(cu_seqlens_k, max_seqlen_k, k.shape[0])  # (B, Mk)
    qp = _gather_padded(q, index_q).to(compute).transpose(1, 2)  # (B, H, Mq, D)
    kp = _gather_padded(k, index_k).to(compute).transpose(1, 2)  # (B, H, Mk, D)
    vp = _gather_padded(v, index_k).to(compute).transpose(1, 2)  # (B, H, Mk, D)
    scores = torch.matmul(qp, kp.transpose(-1, -2)) * softmax_scale  # (B, H, Mq, Mk)
    if key_bias is not None:
        scores = scores + _gather_padded(key_bias, index_k).to(compute)[:, None, None, :]
    visible = valid_q[:, :, None] & valid_k[:, None, :]  # (B, Mq, Mk)
    if causal:
        len_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
        len_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
        i = torch.arange(max_seqlen_q, device=q.device)
        j = torch.arange(max_seqlen_k, device=q.device)
        shift = (len_k - len_q)[:, None, None]
        visible = visible & (j[None, None, :] <= i[None, :, None] + shift)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    # softmax whose fully masked rows give zeros (and zero gradients) instead of NaN
    if max_seqlen_k > 0:
        row_max = scores.amax(dim=-1, keepdim=True).detach()
    else:  # no keys anywhere: amax over an empty dim is undefined
        row_max = scores.new_zeros(*scores.shape[:-1], 1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, vp) / torch.where(denom > 0, denom, torch.ones_like(denom))  # (B, H, Mq, D)
    out = out.transpose(1, 2)  # (B, Mq, H, D)
    seq, pos = _packed_position(cu_seqlens_q, total_q)
    return out[seq, pos].to(q.dtype)
