"""One op per file: Triton kernels, launchers, torch.library registration and the public function."""

from .text_patch_scores import text_patch_scores
from .topk_gather import (
    TopkGatherOutput,
    TopkGatherVarlenOutput,
    keep_by_mass,
    topk_gather,
    topk_gather_varlen,
)

__all__ = [
    "TopkGatherOutput",
    "TopkGatherVarlenOutput",
    "keep_by_mass",
    "text_patch_scores",
    "topk_gather",
    "topk_gather_varlen",
]
