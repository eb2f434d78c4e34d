"""The token-reduction step every patched layer runs on its output, per policy.

* ``evit`` / ``text``: BUS TSPS (arXiv 2307.08504, Sec. 3.2) and EViT (arXiv 2202.07800, Sec. 3): a query
  (image [CLS], or the caption through the layer's query projection) attends over the layer's patch
  keys (``text_patch_scores``); the best ``k`` patch tokens are kept in order and the rest are fused
  into one score-weighted token (``topk_gather``).
* ``random``: FLIP (arXiv 2212.00794, Sec. 3) keeps a uniformly random ``k``-subset of the patches
  (``random_scores`` + ``topk_gather``, nothing fused), in training only: FLIP, like open_clip's
  ``patch_dropout``, sees every patch at inference. Drawn from the global RNG, which gradient
  checkpointing restores for its recomputation.
* ``tome``: ToMe (arXiv 2210.09461, Sec. 3) merges ``n - k`` patch tokens into their most similar ones
  (bipartite soft matching on the layer's keys averaged over heads, size-weighted averages). Two
  departures from the paper, both because the upstream blocks run unmodified: the merge happens after
  the block (ToMe merges between attention and MLP), and later attention is not proportional (no
  ``log size`` bias on the upstream attention). Sizes are carried from one merging layer to the next.
"""

from __future__ import annotations

import torch

from ..ops import bipartite_soft_matching, merge_tokens, random_scores, text_patch_scores, topk_gather
from ._core import PatchState, keep_count


def prune_tokens(
    state: PatchState,
    layer: int,
    x: torch.Tensor,
    keys: torch.Tensor | None,
    scale: float,
    *,
    query: torch.Tensor | None = None,
    training: bool = True,
) -> torch.Tensor:
    """Reduce one layer's output.

    Args:
        x: ``(B, P + n, C)`` the layer's output (``P`` prefix tokens, then ``n`` patch tokens).
        keys: ``(B, P + n, H, D)`` the layer's attention keys over the same tokens (``evit``, ``text``,
            ``tome``; unused by ``random``).
        scale: the attention's softmax scale.
        query: ``(B, H, D)`` the scoring query (image [CLS] or projected caption; ``evit``, ``text``).
        training: the layer's mode (``random`` reduces in training only).

    Returns:
        ``(B, P + k + fuse, C)``: prefix tokens, then ``k = keep_count(keep, n)`` patch tokens in their
        original order (then the fused token, ``evit``/``text`` with ``fuse``); ``x`` itself when
        ``k == n``.
    """
    P = state.num_prefix_tokens
    B, N, _ = x.shape
    n = N - P
    first = layer == min(state.keep)
    if first:  # first pruning layer of this forward
        state.first_positions = torch.arange(n, device=x.device).expand(B, n)
    k = keep_count(state.keep[layer], n)
    if state.policy == "tome":
        sizes = None if first else state.sizes.get(_previous(state, layer))
    if k == n or state.policy == "random" and not training:
        state.selections[layer] = None
        if state.policy == "tome":
            state.sizes[layer] = sizes if sizes is not None else x.new_ones(B, n, dtype=torch.float32)
        return x
    patches = x[:, P:]
    if state.policy == "tome":
        metric = keys[:, P:].mean(dim=2)  # (B, n, D): ToMe's similarity features, keys averaged over heads
        plan = bipartite_soft_matching(metric, n - k, num_protected=0)
        tokens, state.sizes[layer] = merge_tokens(patches, plan, sizes)  # (B, k, C), (B, k)
        state.selections[layer] = plan.keep
        return torch.cat([x[:, :P], tokens], dim=1)
    if state.policy == "random":
        scores = random_scores(B, n, device=x.device)
    else:
        scores = text_patch_scores(query.to(keys.dtype), keys[:, P:], scale=scale, backend=state.backend)  # (B, n)
    kept = topk_gather(patches, scores, k, fuse=state.fuse, backend=state.backend)
    state.selections[layer] = kept.index
    return torch.cat([x[:, :P], kept.tokens], dim=1)


def _previous(state: PatchState, layer: int) -> int:
    """The reducing layer before ``layer`` (its output sizes are this layer's input sizes)."""
    return max(index for index in state.keep if index < layer)


__all__ = ["prune_tokens"]
