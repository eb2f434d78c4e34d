"""Random token scores for FLIP-style random masking (Li et al., "Scaling Language-Image Pre-training
via Masking", CVPR 2023, §3; open_clip's ``patch_dropout``).

FLIP keeps a uniformly random subset of the patches. Drawing i.i.d. uniform scores and keeping the
top k of each row (``topk_gather(x, random_scores(...), k, fuse=False)``) is exactly that, and runs
on the same kernels, with the same cost, as the learned selectors.
"""

from __future__ import annotations

import torch

from .._validation import check_int


def random_scores(
    batch: int, num_tokens: int, *, device: torch.device | str | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """I.i.d. uniform scores in ``[0, 1)``: the top k of a row are a uniformly random k-subset.

    Args:
        batch: int >= 0 rows. num_tokens: int >= 0 candidates per row.
        device: where to draw (None: the default device). generator: a ``torch.Generator`` on that
            device, or None for the global RNG (whose state training checkpoints hold, so a resumed
            run redraws the same masks).

    Returns:
        ``(batch, num_tokens)`` float32, not differentiable.
    """
    batch = check_int("batch", batch, 0)
    num_tokens = check_int("num_tokens", num_tokens, 0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return torch.rand(batch, num_tokens, device=device, generator=generator, dtype=torch.float32)
