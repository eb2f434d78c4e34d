"""bus_kernels: fused kernels for efficient vision-language pre-training.

Public API (shapes and dtypes in each docstring):
    text_patch_scores(query, keys)            -> (B, N) float32 patch relevance (BUS TSPS)
    topk_gather(x, scores, k)                 -> kept tokens + one fused token, and their positions
    topk_gather_varlen(x, scores, k_per_row)  -> the same, a different k per row, packed
    keep_by_mass(scores, mass, lo, hi)        -> per-row k reaching a share of the score mass
    available_backends(device)                -> which backends run here (python -m bus_kernels.info)
"""

from .backends import BackendNotSupportedError, available_backends, backend_status
from .ops import (
    TopkGatherOutput,
    TopkGatherVarlenOutput,
    keep_by_mass,
    text_patch_scores,
    topk_gather,
    topk_gather_varlen,
)
from . import native as _native  # noqa: E402,F401  registers "native" (csrc/); loads a built library, never compiles

__version__ = "0.1.0"

__all__ = [
    "BackendNotSupportedError",
    "TopkGatherOutput",
    "TopkGatherVarlenOutput",
    "available_backends",
    "backend_status",
    "keep_by_mass",
    "text_patch_scores",
    "topk_gather",
    "topk_gather_varlen",
]
