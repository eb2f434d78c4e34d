"""Pure PyTorch twins of the pruning ops (the ``"torch"`` backend).

Same contracts as the public functions in ``bus_kernels.ops``; inputs are assumed validated. They
run on any device and dtype, are differentiable through autograd, and are what the fused kernels
are tested against (the tests add an independent float64 computation on top).
"""

from __future__ import annotations

import torch

# Denominator floor of the fused token: sum_{j dropped} s_j x_j / max(sum_{j dropped} s_j, FUSE_EPS).
FUSE_EPS = 1e-6


def text_patch_scores(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """query (B, H, D), keys (B, N, H, D) -> (B, N) float32: mean over heads of softmax_N(scale * q.k)."""
    q = query.float()
    k = keys.float()
    logits = torch.einsum("bhd,bnhd->bhn", q, k) * scale  # (B, H, N)
    return logits.softmax(dim=-1).mean(dim=1)


def select_topk(scores: torch.Tensor, k: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean keep mask (B, N) and per-row keep counts (B,) int64.

    Row b keeps its ``k[b]`` highest scores; equal scores go to the lower position (a stable
    descending sort). -0.0 and +0.0 count as equal. NaN ranks below -inf (kept only when k forces it),
    NaNs among themselves by position: the rule of the kernels (``score_key`` in csrc/ops/common/pruning.h).
    """
    B, N = scores.shape
    k = torch.as_tensor(k, device=scores.device, dtype=torch.int64).expand(B)
    s = scores.float() + 0.0
    nan = torch.isnan(s)
    # torch.sort puts NaN first in a descending sort: sort with NaN as -inf, then move the NaNs behind
    # everything with a second stable sort (which keeps both groups in their order)
    order = torch.sort(torch.where(nan, float("-inf"), s), dim=-1, descending=True, stable=True).indices  # (B, N)
    order = torch.gather(order, 1, torch.sort(torch.gather(nan, 1, order).to(torch.int8), dim=1, stable=True).indices)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(N, device=scores.device).expand(B, N))  # rank of each position
    return rank < k[:, None], k


def _fused_tokens(x: torch.Tensor, scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, C) in x's dtype: score-weighted mean of the dropped tokens of each row (zeros if none)."""
    w = torch.where(keep, torch.zeros_like(scores), scores).float()  # (B, N)
    num = torch.einsum("bn,bnc->bc", w, x.float())
    den = w.sum(dim=1, keepdim=True).clamp_min(FUSE_EPS)
    return (num / den).to(x.dtype)


def topk_gather(
    x: torch.Tensor, scores: torch.Tensor, k: int, fuse: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, N, C), scores (B, N) -> tokens (B, k + fuse, C) in x's dtype, index (B, k) int64."""
    B, N, C = x.shape
    keep, _ = select_topk(scores, k)
    # positions of the kept tokens, ascending: sort the keep mask with kept first, stable
    index = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :k]
    tokens = torch.gather(x, 1, index[:, :, None].expand(B, k, C))
    if fuse:
        tokens = torch.cat([tokens, _fused_tokens(x, scores, keep)[:, None]], dim=1)
    return tokens, index


def topk_gather_varlen(
    x: torch.Tensor, scores: torch.Tensor, k: torch.Tensor, fuse: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """x (B, N, C), scores (B, N), k (B,) int64 ->
    tokens (total, C), index (sum k,) int64, cu_seqlens (B + 1,) int32, max_seqlen.

    Row b's kept tokens (ascending position) then, if ``fuse``, its fused token occupy
    ``tokens[cu_seqlens[b]:cu_seqlens[b + 1]]``; its kept positions are
    ``index[cu_seqlens[b] - b * fuse : cu_seqlens[b + 1] - (b + 1) * fuse]``.
    """
    B, N, C = x.shape
    keep, k = select_topk(scores, k)
    pos = torch.arange(N, device=x.device).expand(B, N)
    index = pos[keep]  # row-major boolean indexing keeps rows in order, positions ascending
    kept = x[keep]  # (sum k, C)
    if fuse:
        fused = _fused_tokens(x, scores, keep)  # (B, C)
        starts = torch.cumsum(k, 0) - k  # where each row's kept tokens start in `kept`
        lengths = k + 1
        tokens = x.new_empty(int(lengths.sum()), C)
        offsets = torch.cumsum(lengths, 0) - lengths
        row_of = torch.repeat_interleave(torch.arange(B, device=x.device), k)
        slot = torch.arange(kept.shape[0], device=x.device) - starts[row_of] + offsets[row_of]
        tokens[slot] = kept
        tokens[offsets + k] = fused
    else:
        lengths = k
        tokens = kept
    cu_seqlens = torch.zeros(B + 1, dtype=torch.int32, device=x.device)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    max_seqlen = int(lengths.max()) if B > 0 else 0
    return tokens, index, cu_seqlens, max_seqlen
