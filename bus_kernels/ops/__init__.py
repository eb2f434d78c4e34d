"""One op per file: Triton kernels, launchers, torch.library registration and the public function."""

from .padding import UnpadOutput, pad, unpad
from .random_scores import random_scores
from .text_patch_scores import text_patch_scores
from .topk_gather import (
    TopkGatherOutput,
    TopkGatherVarlenOutput,
    keep_by_mass,
    topk_gather,
    topk_gather_varlen,
)
from .token_merge import MergePlan, bipartite_soft_matching, max_merge, merge_tokens
from .varlen_attention import varlen_attention

__all__ = [
    "MergePlan",
    "bipartite_soft_matching",
    "max_merge",
    "merge_tokens",
    "random_scores",
    "TopkGatherOutput",
    "TopkGatherVarlenOutput",
    "UnpadOutput",
    "keep_by_mass",
    "pad",
    "text_patch_scores",
    "topk_gather",
    "topk_gather_varlen",
    "unpad",
    "varlen_attention",
]
