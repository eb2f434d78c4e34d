"""Loop-per-row twin of ``bus_kernels.ops.token_merge`` (ToMe, ICLR 2023 §3), same signatures.

Written for reading, not speed: every edge, every merge is a Python loop, in float64.
"""

from __future__ import annotations

import torch

from ..ops.token_merge import MergePlan


def bipartite_soft_matching(metric: torch.Tensor, r: int, *, num_protected: int = 1) -> MergePlan:
    B, N, _ = metric.shape
    keeps, srcs, dsts = [], [], []
    for row in metric.double():
        a_pos = list(range(num_protected, N, 2))
        b_pos = list(range(num_protected + 1, N, 2))
        unit = row / row.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        edges = []  # (similarity, A position, best B position)
        for p in a_pos:
            sims = [float(unit[p] @ unit[q]) for q in b_pos]
            best = max(range(len(sims)), key=lambda j: (sims[j], -j)) if sims else None
            if best is not None:
                edges.append((sims[best], p, b_pos[best]))
        edges.sort(key=lambda e: (-e[0], e[1]))  # strongest first, ties to the lower A position
        chosen = edges[:r]
        gone = {p for _, p, _ in chosen}
        keeps.append([p for p in range(N) if p not in gone])
        srcs.append([p for _, p, _ in chosen])
        dsts.append([q for _, _, q in chosen])
    as_long = lambda rows: torch.tensor(rows, dtype=torch.int64, device=metric.device).view(B, -1)  # noqa: E731
    return MergePlan(as_long(keeps), as_long(srcs), as_long(dsts))


def merge_tokens(x: torch.Tensor, plan: MergePlan, size: torch.Tensor | None = None):
    B, N, C = x.shape
    size = torch.ones(B, N, dtype=torch.float64) if size is None else size.double()
    outs, sizes = [], []
    for b in range(B):
        value = {p: x[b, p].double() * size[b, p] for p in range(N)}
        weight = {p: size[b, p] for p in range(N)}
        for s, d in zip(plan.src[b].tolist(), plan.dst[b].tolist()):
            value[d] = value[d] + value[s]
            weight[d] = weight[d] + weight[s]
        keep = plan.keep[b].tolist()
        outs.append(torch.stack([value[p] / weight[p] for p in keep]))
        sizes.append(torch.stack([weight[p] for p in keep]))
    return torch.stack(outs).to(x.dtype), torch.stack(sizes).float()
