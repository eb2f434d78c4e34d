"""Token merging (ToMe: Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023, §3).

Between the attention and the MLP of a block, ToMe removes ``r`` tokens by merging each into its most
similar partner instead of dropping it:

1. *Bipartite soft matching* on a similarity metric (the attention keys, averaged over heads): the
   mergeable tokens are split alternately into sets A (even) and B (odd); every A token draws one
   edge to its most similar B token (cosine similarity); the ``r`` most similar edges are kept, and
   their A tokens are merged into their B partners. No iteration, no clustering: one matrix product.
2. *Size-weighted average*: a token that stands for ``s`` patches counts ``s`` times, so the merged
   value is ``(s_b x_b + sum_a s_a x_a) / (s_b + sum_a s_a)`` and sizes add up.
3. *Proportional attention* (§3, eq. 1): later attention adds ``log s`` to every score of a key of
   size ``s`` (``varlen_attention(..., key_bias=size.log())``), so a merged token weighs as the
   patches it replaces.

Written from the paper (ToMe's own code is CC-BY-NC and was not used). Unlike the paper's code, the
surviving tokens keep their order (ascending position), which keeps position bookkeeping simple; the
first ``num_protected`` tokens (e.g. [CLS]) take no part in the matching and never move.

Plain PyTorch (a matrix product, a sort, two scatters): a fused kernel pays only if a profile shows
this step matters next to the block's attention and MLP. ``bus_kernels.reference.token_merge`` is
the loop-per-row twin the tests compare against.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._validation import check_float, check_int, check_rank, check_same_device, check_tensor


class MergePlan(NamedTuple):
    """Which tokens merge where (positions index the ``N`` tokens of the input row).

    keep: ``(B, N - r)`` int64 surviving positions, ascending (protected tokens first).
    src: ``(B, r)`` int64 positions merged away (members of set A).
    dst: ``(B, r)`` int64 the surviving position each ``src`` merges into (a member of set B).
    """

    keep: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor


def max_merge(num_tokens: int, num_protected: int = 0) -> int:
    """The most tokens one bipartite step can merge: the size of set A, ``ceil((N - p) / 2)`` (0 when
    fewer than two tokens are mergeable, since B would be empty)."""
    n = num_tokens - num_protected
    return (n + 1) // 2 if n >= 2 else 0


def bipartite_soft_matching(metric: torch.Tensor, r: int, *, num_protected: int = 1) -> MergePlan:
    """ToMe's bipartite soft matching.

    Args:
        metric: ``(B, N, C)`` floating similarity features (ToMe: the block's keys averaged over heads).
            Compared by cosine similarity, in float32 (float64 stays float64).
        r: int, tokens to merge per row, ``0 <= r <= max_merge(N, num_protected)``.
        num_protected: int >= 0, leading tokens that take no part (e.g. 1 for [CLS]).

    Returns:
        ``MergePlan(keep (B, N - r), src (B, r), dst (B, r))`` int64. Among equal similarities the
        lower A position wins (stable sort); not differentiable (indices only).
    """
    check_tensor("metric", metric)
    check_rank("metric", metric, 3, "(B, N, C)")
    check_float("metric", metric)
    B, N, _ = metric.shape
    num_protected = check_int("num_protected", num_protected, 0, N)
    r = check_int("r", r, 0)
    limit = max_merge(N, num_protected)
    if r > limit:
        raise ValueError(
            f"r ({r}) is larger than the tokens one bipartite step can merge: {limit} "
            f"(set A is every other one of the {N - num_protected} mergeable tokens)"
        )
    device = metric.device
    with torch.no_grad():
        m = metric[:, num_protected:]
        m = F.normalize(m if m.dtype == torch.float64 else m.float(), dim=-1)
        a, b = m[:, 0::2], m[:, 1::2]  # (B, nA, C), (B, nB, C)
        a_pos = torch.arange(num_protected, N, 2, device=device)  # (nA,) positions of A in the row
        b_pos = torch.arange(num_protected + 1, N, 2, device=device)  # (nB,)
        if r == 0 or b.shape[1] == 0:
            empty = torch.empty(B, 0, dtype=torch.int64, device=device)
            return MergePlan(torch.arange(N, device=device).expand(B, N).contiguous(), empty, empty.clone())
        sim = a @ b.transpose(1, 2)  # (B, nA, nB) cosine similarities
        best, partner = sim.max(dim=-1)  # (B, nA): each A token's best edge
        order = torch.sort(best, dim=1, descending=True, stable=True).indices  # strongest edges first
        src_a = order[:, :r]  # (B, r) indices into A
        src = a_pos[src_a]
        dst = b_pos[partner.gather(1, src_a)]
        pos = torch.arange(N, device=device).expand(B, N)
        merged = torch.zeros(B, N, dtype=torch.bool, device=device).scatter(1, src, True)
        # survivors first, in position order, without a host sync: sort by (merged, position)
        keep = torch.sort(pos + merged.long() * N, dim=1).values[:, : N - r]
    return MergePlan(keep, src, dst)


def merge_tokens(
    x: torch.Tensor, plan: MergePlan, size: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a ``MergePlan`` by size-weighted average.

    Args:
        x: ``(B, N, C)`` floating tokens. plan: from ``bipartite_soft_matching`` on these N tokens.
        size: ``(B, N)`` float32 patches each token stands for; None: all 1.

    Returns:
        ``(x (B, N - r, C) in x's dtype, size (B, N - r) float32)``. Differentiable in ``x`` (and ``size``);
        the averages are computed in float32 (float64 stays float64).
    """
    check_tensor("x", x)
    check_rank("x", x, 3, "(B, N, C)")
    check_float("x", x)
    B, N, C = x.shape
    for name, t in zip(MergePlan._fields, plan):
        check_tensor(f"plan.{name}", t)
        if t.dim() != 2 or t.shape[0] != B or t.dtype != torch.int64:
            raise ValueError(f"plan.{name} must be (B={B}, *) int64, got {tuple(t.shape)} {t.dtype}")
    if plan.keep.shape[1] + plan.src.shape[1] != N or plan.dst.shape != plan.src.shape:
        raise ValueError(
            f"plan does not fit x: keep {tuple(plan.keep.shape)} + src {tuple(plan.src.shape)} must cover N={N}"
        )
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    unit_size = size is None
    if unit_size:
        size = torch.ones(B, N, dtype=torch.float32, device=x.device)
    else:
        check_tensor("size", size)
        if tuple(size.shape) != (B, N):
            raise ValueError(f"size must have shape (B, N) = ({B}, {N}), got {tuple(size.shape)}")
        check_float("size", size)
    check_same_device([("x", x), ("plan.keep", plan.keep), ("size", size)])
    s = size.to(acc_dtype)
    # (B, N, C); unit sizes weigh nothing: no multiply (nor its backward) launched
    weighted = x.to(acc_dtype) if unit_size else x.to(acc_dtype) * s[..., None]
    src_c = plan.src[..., None].expand(-1, -1, C)
    dst_c = plan.dst[..., None].expand(-1, -1, C)
    total = weighted.scatter_add(1, dst_c, weighted.gather(1, src_c))  # B tokens absorb their A partners
    s_total = s.scatter_add(1, plan.dst, s.gather(1, plan.src))  # (B, N)
    keep_c = plan.keep[..., None].expand(-1, -1, C)
    s_out = s_total.gather(1, plan.keep)  # (B, N - r)
    out = total.gather(1, keep_c) / s_out[..., None]
    return out.to(x.dtype), s_out.to(torch.float32)
