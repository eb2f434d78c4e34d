"""Pure PyTorch twins of every op, one place (the ``"torch"`` backend). Tests and benchmarks import
these; they never re-implement an op."""

from .attention import varlen_attention
from .pruning import FUSE_EPS, select_topk, text_patch_scores, topk_gather, topk_gather_varlen

__all__ = ["FUSE_EPS", "select_topk", "text_patch_scores", "topk_gather", "topk_gather_varlen", "varlen_attention"]
