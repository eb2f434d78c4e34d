"""Token selection inside the ViT: scoring, keep counts, keep-and-fuse.

BUS §3.2 (TSPS): the text [CLS], through a ViT layer's own query projection, attends over that layer's
patch keys; the best-scoring patches are kept and the rest fused into one score-weighted token.
EViT (Liang et al. 2022): the same with the image [CLS] query. ELIP (arXiv 2309.16738 §3): a fused
query 0.8·visual CLS + 0.2·text CLS, scores from a no-grad look-ahead, keep ratios of the original count.

Token state inside the ViT: ``x (B, N, C)`` with [CLS] at position 0, the candidates after it;
``mask (B, N)`` bool (None when every row is full; rows are left-aligned when ragged);
``positions (B, N - 1)`` int64: the original patch index of each candidate, -1 for fused tokens and padding.

Every policy is listed in ``POLICY_INFO`` (name -> what it does, where, and without a caption), so
benchmarks and the CLI can enumerate them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import bus_kernels

from .packing import register_host_lengths


@dataclass(frozen=True)
class PolicyInfo:
    """What a selection policy does.

    where: ``"after"`` selects after the attention of the configured blocks (before their MLP);
        ``"before"`` selects before the configured blocks (``layers=(0,)`` = at the patch embedding).
    uses_text: whether a caption guides it. text_free: what it does without a caption by default
        (``"evit"``: image-[CLS] scores, ``"none"``: prune nothing; ``selection.text_free`` overrides).
    ratio_of, keep_rounding: how its fixed keep counts are taken by default (``keep_rule``; the
        ``selection`` fields of the same names override): ``keep_ratios`` of the ``"current"`` candidates or
        of the image's ``"original"`` patches, ``"round"``-ed or ``"floor"``-ed.
    """

    name: str
    where: str
    uses_text: bool
    text_free: str
    summary: str
    ratio_of: str = "current"
    keep_rounding: str = "round"


POLICY_INFO: dict[str, PolicyInfo] = {
    p.name: p
    for p in (
        PolicyInfo("bus", "after", True, "evit", "BUS TSPS: the caption's [CLS] through the layer's query projection"),
        PolicyInfo("elip", "before", True, "none",
                   "ELIP: fused query 0.8 visual + 0.2 text [CLS], no-grad look-ahead, keep ratios of the original count",
                   ratio_of="original", keep_rounding="floor"),  # official code: int(num_patches * ratio)
        PolicyInfo("evit", "after", False, "evit", "EViT: the image [CLS] query of the layer"),
        PolicyInfo("random", "before", False, "evit", "FLIP: a uniformly random subset (no fusion; training only by default)"),
        PolicyInfo("tome", "after", False, "evit", "ToMe: bipartite soft matching, size-weighted merge, proportional attention"),
        PolicyInfo("none", "after", False, "none", "no selection: every token through every block"),
    )
}
POLICIES: tuple[str, ...] = tuple(POLICY_INFO)  # every name ``selection.policy`` accepts
TEXT_FREE = ("auto", "evit", "none")  # ``selection.text_free``; "auto": the policy's own default
RATIO_OF = ("auto", "current", "original")  # ``selection.ratio_of``; "auto": the policy's own
KEEP_ROUNDING = ("auto", "round", "floor")  # ``selection.keep_rounding``; "auto": the policy's own


def policy_names() -> tuple[str, ...]:
    """Every selection policy (``bus bench quality`` trains each)."""
    return POLICIES


def text_free_mode(policy: str, text_free: str) -> str:
    """What a text-guided policy does without a caption: ``"evit"`` or ``"none"`` (ELIP's official code
    prunes nothing without text; BUS falls back to the image [CLS], as EViT does)."""
    if policy not in POLICY_INFO:
        raise ValueError(f"selection.policy must be one of {POLICIES}, got {policy!r}")
    if text_free not in TEXT_FREE:
        raise ValueError(f"selection.text_free must be one of {TEXT_FREE}, got {text_free!r}")
    return POLICY_INFO[policy].text_free if text_free == "auto" else text_free


def keep_rule(policy: str, ratio_of: str, keep_rounding: str) -> tuple[str, str]:
    """``(ratio_of, rounding)`` for ``keep_count``: ``"auto"`` takes the policy's own (``PolicyInfo``):
    elip -> ``("original", "floor")`` as ELIP's official code (57 of 64 patches at 0.9, not 58), every
    other policy -> ``("current", "round")``."""
    if policy not in POLICY_INFO:
        raise ValueError(f"selection.policy must be one of {POLICIES}, got {policy!r}")
    if ratio_of not in RATIO_OF:
        raise ValueError(f"selection.ratio_of must be one of {RATIO_OF}, got {ratio_of!r}")
    if keep_rounding not in KEEP_ROUNDING:
        raise ValueError(f"selection.keep_rounding must be one of {KEEP_ROUNDING}, got {keep_rounding!r}")
    info = POLICY_INFO[policy]
    return (info.ratio_of if ratio_of == "auto" else ratio_of,
            info.keep_rounding if keep_rounding == "auto" else keep_rounding)


@dataclass
class SelectionRecord:
    """What one selection step saw and did (PTM trains on ``scores`` at ``positions``).

    layer: the ViT block index.
    scores: ``(B, n)`` float32 selector scores over the candidates (bus/evit: rows sum to 1; elip: the
        [CLS] row of a softmax that also covered the [CLS] key, so rows sum to less; random: the draw;
        tome: uniform, it has no relevance scores; 0 at padding).
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


def keep_count(ratio: float, num_candidates: int, num_original: int, ratio_of: str, rounding: str = "round") -> int:
    """Fixed number of candidates to keep, in ``[1, num_candidates]``: ``ratio`` of the current
    candidates or of the image's original patches, rounded or floored (ELIP: ``int(num_patches * ratio)``).
    ``ratio_of`` and ``rounding`` are resolved ones (``keep_rule``), never ``"auto"``."""
    if ratio_of not in ("current", "original") or rounding not in ("round", "floor"):
        raise ValueError(f"keep_count takes ratio_of 'current'/'original' and rounding 'round'/'floor' (resolve "
                         f"'auto' with keep_rule), got {ratio_of!r}, {rounding!r}")
    base = num_original if ratio_of == "original" else num_candidates
    count = math.floor(ratio * base) if rounding == "floor" else round(ratio * base)
    return min(num_candidates, max(1, count))


def _repad(packed: torch.Tensor, lengths: torch.Tensor, width: int, fill: float | int) -> tuple[torch.Tensor, torch.Tensor]:
    """packed (total, *F) rows of ``lengths`` (B,) -> (B, width, *F) left-aligned with ``fill``, and (rows, cols)."""
    B = lengths.shape[0]
    rows = torch.repeat_interleave(torch.arange(B, device=packed.device), lengths, output_size=packed.shape[0])
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
    # keep is in [1, N - 1] by construction: no host check of its range; the output sizes are the one host read
    out = bus_kernels.topk_gather_varlen(cand, scores, keep, fuse=fuse, backend=backend, check_k=False)
    lengths = keep + int(fuse)
    width = out.max_seqlen
    new_cand, _ = _repad(out.tokens, lengths, width, 0.0)  # (B, width, C)
    row_of = torch.repeat_interleave(torch.arange(B, device=x.device), keep, output_size=out.index.shape[0])
    kept_pos_packed = positions[row_of, out.index]
    kept_pos, _ = _repad(kept_pos_packed, keep, width - int(fuse), -1)  # (B, k_max)
    new_pos = torch.full((B, width), -1, dtype=torch.int64, device=x.device)
    new_pos[:, : kept_pos.shape[1]] = kept_pos
    cand_mask = torch.arange(width, device=x.device)[None, :] < lengths[:, None]  # (B, width)
    new_mask = torch.cat([cand_mask.new_ones(B, 1), cand_mask], dim=1)
    register_host_lengths(new_mask, out.tokens.shape[0] + B, width + 1)  # varlen packs it without a host read
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


@torch.no_grad()
def elip_lookahead_scores(
    blocks, x: torch.Tensor, mask: torch.Tensor | None, text_query: torch.Tensor | None,
    visual_weight: float, impl: str, backend: str | None,
) -> torch.Tensor:
    """ELIP's scores, as its official code computes them (guoyang9/ELIP ``ALBEF/models/vit.py``).

    Without gradients, on a copy of the tokens: the [CLS] token becomes the fused query
    ``w * visual CLS + (1 - w) * text CLS`` *before* the first look-ahead block, so the mix propagates
    through every block of the look-ahead; ``blocks[:-1]`` run in full, and the last block's attention
    probabilities of the [CLS] row, a softmax over *all* keys ([CLS] included) averaged over heads,
    are the scores, with the [CLS] column dropped and no renormalisation.

    Args:
        blocks: the look-ahead ViT blocks, in order (``Block`` of ``bus_model.vision``).
        x: ``(B, N, C)`` tokens entering ``blocks[0]``, [CLS] first. mask: ``(B, N)`` bool or None.
        text_query: ``(B, C)`` text [CLS] in the ViT width, or None (the visual [CLS] alone).
    Returns:
        ``(B, N - 1)`` float32 scores of the candidates.
    """
    h = x.detach().clone()
    if text_query is not None:
        h[:, 0] = visual_weight * h[:, 0] + (1.0 - visual_weight) * text_query.to(h.dtype)
    for blk in blocks[:-1]:
        h, _, _ = blk.attend(h, mask, impl)
        h = blk.feed_forward(h, mask, impl)
    last = blocks[-1]
    B, N, C = h.shape
    H = last.attn.num_heads
    q, k, _ = last.attn.qkv(last.norm1(h)).view(B, N, 3, H, C // H).unbind(2)  # each (B, N, H, D)
    return score_candidates(q[:, 0], k, mask, backend)[:, 1:]


def random_keep_scores(x: torch.Tensor) -> torch.Tensor:
    """FLIP: uniform scores for the candidates of ``x (B, N, C)`` -> ``(B, N - 1)`` float32, drawn from
    the global RNG of x's device (training checkpoints hold it: a resumed run redraws the same masks)."""
    return bus_kernels.random_scores(x.shape[0], x.shape[1] - 1, device=x.device)


def merge_step(
    x: torch.Tensor, size: torch.Tensor | None, positions: torch.Tensor, keys: torch.Tensor, r: int, layer: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SelectionRecord]:
    """ToMe (ICLR 2023 §3) between a block's attention and its MLP: match on the keys averaged over heads,
    merge ``r`` candidates by size-weighted average; [CLS] never merges.

    Args:
        x: ``(B, N, C)``. size: ``(B, N)`` float32 patches per token, or None (all 1).
        positions: ``(B, N - 1)`` int64. keys: ``(B, N, H, D)`` this block's keys.
    Returns:
        ``(x (B, N - r, C), size (B, N - r), positions (B, N - r - 1), SelectionRecord)``; a merged token
        keeps the position of the token that absorbed the others.
    """
    plan = bus_kernels.bipartite_soft_matching(keys.mean(dim=2), r, num_protected=1)
    x, size = bus_kernels.merge_tokens(x, plan, size)
    kept = positions.gather(1, plan.keep[:, 1:] - 1)  # (B, N - r - 1) candidates that remain
    B, n = positions.shape
    uniform = torch.full((B, n), 1.0 / n, dtype=torch.float32, device=x.device)
    num_kept = torch.full((B,), n - r, dtype=torch.int64, device=x.device)
    return x, size, kept, SelectionRecord(layer, uniform, positions, kept, num_kept)
