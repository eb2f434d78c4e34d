"""Shared pieces of the bus_kernels.patch tests: the documented keep rule and a planted caption.

A planted caption: an image made of two patch patterns, "object" cells and "background" cells, fed
to a model whose position embeddings are zero. A transformer is permutation-equivariant, so at every
layer all object tokens are identical to each other and all background tokens too; their keys take
two values ``k_obj`` and ``k_bg``. A caption ``t`` whose query is ``W_q t + b_q = alpha (k_obj - k_bg)``
(solved in float64) scores every object patch above every background patch, so the text policy with
``keep = #objects / #patches`` must keep exactly the object cells.
"""

from __future__ import annotations

import math

import torch


def expected_keep(keep: float, n: int) -> int:
    """The documented rule: round-half-up(keep * n), clamped to [1, n]."""
    return min(n, max(1, int(math.floor(keep * n + 0.5))))


def schedule(n: int, prefix: int, depth: int, layers, keeps, fuse: bool = True) -> list[int]:
    """Token count entering each of ``depth`` layers, written from the documented rule."""
    keeps = keeps if isinstance(keeps, (list, tuple)) else [keeps] * len(layers)
    lengths = []
    for index in range(depth):
        lengths.append(prefix + n)
        if index in layers:
            k = expected_keep(keeps[list(layers).index(index)], n)
            n = k + fuse if k < n else n
    return lengths


def planted_image(grid: int, patch: int, object_cells, seed: int = 0) -> torch.Tensor:
    """``(1, 3, grid * patch, grid * patch)``: pattern A on ``object_cells`` (row-major), pattern B elsewhere."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(3, patch, patch, generator=g), torch.randn(3, patch, patch, generator=g)
    image = torch.empty(3, grid * patch, grid * patch)
    for cell in range(grid * grid):
        r, c = divmod(cell, grid)
        image[:, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = a if cell in object_cells else b
    return image[None]


def planted_caption(
    q_weight: torch.Tensor, q_bias: torch.Tensor | None, k_obj: torch.Tensor, k_bg: torch.Tensor, alpha: float = 4.0
) -> torch.Tensor:
    """``(C,)`` caption whose query projection is ``alpha * (k_obj - k_bg)`` (all heads at once)."""
    target = alpha * (k_obj.double() - k_bg.double())  # (H * D,)
    if q_bias is not None:
        target = target - q_bias.double()
    return torch.linalg.solve(q_weight.double(), target).float()
