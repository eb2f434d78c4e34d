"""What each varlen attention backend can take beyond device/dtype (head dims, key_bias), as data."""

from __future__ import annotations

from dataclasses import dataclass

from ...backends import forget_choices

TRITON_MIN_HEAD_DIM = 1
TRITON_MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class AttentionLimits:
    """Head dims a backend takes (``min_head_dim <= D <= max_head_dim``, ``D % head_dim_multiple == 0``),
    whether it takes ``key_bias``, and whether it takes only dense batches (every sequence full length,
    ``dense.dense_reasons``: the ``sdpa`` fast path)."""

    min_head_dim: int
    max_head_dim: int | None
    head_dim_multiple: int
    key_bias: bool
    dense_only: bool = False

    def reasons(self, head_dim: int, has_key_bias: bool) -> list[str]:
        reasons = []
        if head_dim < self.min_head_dim or (self.max_head_dim is not None and head_dim > self.max_head_dim):
            reasons.append(f"head dim {head_dim} outside [{self.min_head_dim}, {self.max_head_dim}]")
        if head_dim % self.head_dim_multiple:
            reasons.append(f"head dim {head_dim} is not a multiple of {self.head_dim_multiple}")
        if has_key_bias and not self.key_bias:
            reasons.append("key_bias is not supported")
        return reasons


ATTENTION_LIMITS: dict[str, AttentionLimits] = {
    "torch": AttentionLimits(1, None, 1, key_bias=True),
    "triton": AttentionLimits(TRITON_MIN_HEAD_DIM, TRITON_MAX_HEAD_DIM, 1, key_bias=True),
    "sdpa": AttentionLimits(1, None, 1, key_bias=True, dense_only=True),
}


def register_attention_limits(backend: str, limits: AttentionLimits) -> None:
    """Declare the head dims / features ``backend`` takes for ``varlen_attention``."""
    ATTENTION_LIMITS[backend] = limits
    forget_choices()
