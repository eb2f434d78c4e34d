"""bus_kernels: fused kernels for efficient vision-language pre-training.

Public API (shapes and dtypes in each docstring):
    text_patch_scores(query, keys)            -> (B, N) float32 patch relevance (BUS TSPS)
    topk_gather(x, scores, k)                 -> kept tokens + one fused token, and their positions
    topk_gather_varlen(x, scores, k_per_row)  -> the same, a different k per row, packed
    keep_by_mass(scores, mass, lo, hi)        -> per-row k reaching a share of the score mass
    random_scores(B, N)                       -> uniform scores: top k = FLIP random masking
    bipartite_soft_matching(metric, r)        -> ToMe merge plan; merge_tokens(x, plan, size) applies it
    varlen_attention(q, k, v, cu_q, cu_k, ...) -> packed variable-length attention (flash-attn layout)
    unpad(x, mask) / pad(x_packed, idx, B, S) -> padded <-> packed tokens for the varlen ops
    available_backends(device)                -> which backends run here (python -m bus_kernels.info)
"""

from ._capture import CaptureError
from .backends import BackendNotSupportedError, available_backends, backend_status
from .ops import (
    MergePlan,
    TopkGatherOutput,
    TopkGatherVarlenOutput,
    bipartite_soft_matching,
    keep_by_mass,
    max_merge,
    merge_tokens,
    random_scores,
    text_patch_scores,
    topk_gather,
    topk_gather_varlen,
)
from .ops import UnpadOutput, pad, unpad, varlen_attention
from . import attention_backends as _attention_backends  # noqa: E402,F401  registers flash_attn, xformers, torch_varlen
from . import native as _native  # noqa: E402,F401  registers "native" (csrc/); loads a built library, never compiles

__version__ = "0.1.0"

__all__ = [
    "BackendNotSupportedError",
    "CaptureError",
    "MergePlan",
    "TopkGatherOutput",
    "TopkGatherVarlenOutput",
    "UnpadOutput",
    "available_backends",
    "backend_status",
    "bipartite_soft_matching",
    "keep_by_mass",
    "max_merge",
    "merge_tokens",
    "pad",
    "random_scores",
    "text_patch_scores",
    "topk_gather",
    "topk_gather_varlen",
    "unpad",
    "varlen_attention",
]
