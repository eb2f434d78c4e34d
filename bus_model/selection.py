"""Token selection inside the ViT: scoring, keep counts, keep-and-fuse.

BUS §3.2 (TSPS): the text [CLS], through a ViT layer's own query projection, attends over that layer's
patch keys; the best-scoring patches are kept and the rest fused into one score-weighted token.
EViT (Liang et al. 2022): the same with the image [CLS] query. ELIP (arXiv 2309.16738 §3): a fused
query 0.8·visual CLS + 0.2·text CLS, scores from a no-grad look-ahead, keep ratios of the original count.

Token state inside the ViT: ``x (B, N, C)`` with [CLS] at position 0, the candidates after it;
``mask (B, N)`` bool (None when every row is full; rows are left-aligned when ragged);
``positions (B, N - 1)`` int64: the original patch index of each candidate, -1 for fused tokens and padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import bus_kernels


@dataclass
class SelectionRecord:
    """What one selection step saw and did (PTM trains on ``scores`` at ``positions``).

    layer: the ViT block index.
    scores: ``(B, n)`` float32 selector scores over the candidates (rows sum to 1; 0 at padding).
    positions: ``(B, n)`` int64 original patch index per candidate, -1 for fused tokens and padding.
    kept_positions: ``(B, k_max)`` int64 original patch index of each kept candidate (-1: fused/padding).
    num_kept: ``(B,)`` int64 candidates kept per image.
    """

    layer: int
    scores: torch.Tensor
    positions: torch.Tensor
    kept_positions: torch.Tensor
    num_kept: torch.Tensor


def score_candidates(
    query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, backend: str | None
) -> torch.Tensor:
    """query (B, H, D), keys (B, n, H, D), mask (B, n) bool or None -> (B, n) float32 scores.

    Dense rows use the fused ``bus_kernels.text_patch_scores``. Ragged rows (after a ``keep_by_mass``
    step) need a key mask, which that kernel has no argument for: a masked softmax in PyTorch then.
    """
    if mask is None:
        return bus_kernels.text_patch_scores(query, keys, backend=backend)
    scale = query.shape[-1] ** -0.5
    logits = torch.einsum("bhd,bnhd->bhn", query.float(), keys.float()) * scale  # (B, H, n)
    logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)  # (B, n)


def keep_count(ratio: float, num_candidates: int, num_original: int, ratio_of: str) -> int:
    """Fixed number of candidates to keep, in ``[1, num_candidates]``."""
    base = num_original if ratio_of == "original" else num_candidates
    return min(num_candidates, max(1, round(ratio * base)))


def _repad(packed: torch.Tensor, lengths: torch.Tensor, width: int, fill: float | int) -> tuple[torch.Tensor, torch.Tensor]:
    """packed (total, *F) rows of ``lengths`` (B,) -> (B, width, *F) left-aligned with ``fill``, and (rows, cols)."""
    B = lengths.shape[0]
    rows = torch.repeat_interleave(torch.arange(B, device=packed.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    cols = torch.arange(packed.shape[0], device=packed.device) - starts[rows]
    out = packed.new_full((B, width, *packed.shape[1:]), fill)
    out = out.index_put((rows, cols), packed)
    return out, cols


def apply_selection(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    positions: torch.Tensor,
    scores: torch.Tensor,
    keep: int | torch.Tensor,
    *,
    fuse: bool,
    backend: str | None,
    layer: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, SelectionRecord]:
    """Keep the best candidates of each row (and fuse the rest); [CLS] at position 0 always stays.

    Args:
        x: ``(B, N, C)`` tokens, [CLS] first. mask: ``(B, N)`` bool or None. positions: ``(B, N - 1)`` int64.
        scores: ``(B, N - 1)`` float32 candidate scores (0 at padding).
        keep: an int (same count for every row, dense result) or a ``(B,)`` int64 tensor (ragged result).

    Returns:
        ``(x (B, N', C), mask (B, N') bool or None, positions (B, N' - 1), SelectionRecord)``.
    """
    cls, cand = x[:, :1], x[:, 1:]
    if isinstance(keep, int) and mask is None:
        out = bus_kernels.topk_gather(cand, scores, keep, fuse=fuse, backend=backend)
        kept_pos = positions.gather(1, out.index)  # (B, k)
        new_pos = torch.cat([kept_pos, kept_pos.new_full((x.shape[0], 1), -1)], 1) if fuse else kept_pos
        num_kept = torch.full((x.shape[0],), keep, dtype=torch.int64, device=x.device)
        record = SelectionRecord(layer, scores, positions, kept_pos, num_kept)
        return torch.cat([cls, out.tokens], dim=1), None, new_pos, record
    B = x.shape[0]
    if isinstance(keep, int):
        keep = torch.full((B,), keep, dtype=torch.int64, device=x.device)
    if mask is not None:
        keep = torch.minimum(keep, mask[:, 1:].sum(1))  # never keep padding
    keep = keep.clamp(min=1)
    out = bus_kernels.topk_gather_varlen(cand, scores, keep, fuse=fuse, backend=backend)
    lengths = keep + int(fuse)
    width = out.max_seqlen
    new_cand, _ = _repad(out.tokens, lengths, width, 0.0)  # (B, width, C)
    kept_pos_packed = positions[torch.repeat_interleave(torch.arange(B, device=x.device), keep), out.index]
    kept_pos, _ = _repad(kept_pos_packed, keep, int(keep.max()), -1)  # (B, k_max)
    new_pos = torch.full((B, width), -1, dtype=torch.int64, device=x.device)
    new_pos[:, : kept_pos.shape[1]] = kept_pos
    cand_mask = torch.arange(width, device=x.device)[None, :] < lengths[:, None]  # (B, width)
    new_mask = torch.cat([cand_mask.new_ones(B, 1), cand_mask], dim=1)
    record = SelectionRecord(layer, scores, positions, kept_pos, keep)
    return torch.cat([cls, new_cand], dim=1), new_mask, new_pos, record


def mass_keep(scores: torch.Tensor, mask: torch.Tensor | None, mass: float, min_ratio: float, max_ratio: float) -> torch.Tensor:
    """Per-image keep counts: the fewest candidates holding ``mass`` of the scores, clamped to
    ``[ceil(min_ratio * n), round(max_ratio * n)]`` of the ``n`` candidates (the keep ratio caps the cost)."""
    n = scores.shape[1]
    hi = max(1, min(n, round(max_ratio * n)))
    lo = min(hi, max(1, math.ceil(min_ratio * n)))
    k = bus_kernels.keep_by_mass(scores, mass, lo, hi)
    if mask is not None:
        k = torch.minimum(k, mask[:, 1:].sum(1))
    return k
