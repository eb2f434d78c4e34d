"""The dense fast path of ``varlen_attention`` (backend ``"sdpa"``): a packed batch whose every sequence is
full length is a padded batch without padding, so it runs as PyTorch's ``scaled_dot_product_attention`` on
a ``(B, S, H, D)`` view of the packed tensors -- no copy, no block table, no ``cu_seqlens`` read. This is
the ViT before pruning and after fixed-ratio pruning, the PAD queries over fixed-k kept tokens, and the
Hugging Face ``bus_varlen`` padded path (padded keys masked by ``key_bias``).

Deciding "every sequence is full" costs no host sync: it is decided from what the host already knows.
With valid offsets (``0 = cu[0] <= ... <= cu[B] = total``, every length ``<= max_seqlen``),
``total == B * max_seqlen`` holds exactly when every length equals ``max_seqlen`` (a sum of B lengths,
each at most ``max_seqlen``, reaches ``B * max_seqlen`` only if none is shorter). The default
``check_seqlens=True`` checks those offsets on the host; with ``check_seqlens=False`` the caller vouches
for them (flash-attn's contract: ``max_seqlen`` is at least the longest sequence).

Semantics kept (flash-attn's):
  * causal, bottom-right aligned: with equal q and k lengths this is the usual causal mask, so the path
    takes causal only when ``max_seqlen_q == max_seqlen_k`` (unequal lengths go to the varlen kernels);
  * ``key_bias (total_k,)`` becomes SDPA's additive float mask, broadcast ``(B, 1, 1, S_k)`` (and,
    with causal, merged with the causal mask into one ``(B, 1, S, S)`` mask); it is cast to q's dtype
    (SDPA's mask contract), in float16 first clamped to its finite range, so a ``-1e9`` "masked key"
    bias stays finite: masked keys get zero weight, and a row whose keys are all masked stays finite
    (never NaN).
    Differentiable: its gradient is SDPA's gradient of the mask, summed over the broadcast dims.
  * not taken when a sequence is empty (``max_seqlen_q == 0`` or ``max_seqlen_k == 0``) or ``B == 0``.

One difference stays: a user ``key_bias`` of ``-inf`` on every key of a sequence gives NaN rows here,
zeros on the varlen kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...backends import register_impl

NAME = "sdpa"


def is_dense(batch: int, total_q: int, total_k: int, max_seqlen_q: int, max_seqlen_k: int, causal: bool) -> bool:
    """``not dense_reasons(...)``, without building the reasons (the backend choice's cache key)."""
    return (batch > 0 and max_seqlen_q > 0 and max_seqlen_k > 0 and total_q == batch * max_seqlen_q
            and total_k == batch * max_seqlen_k and not (causal and max_seqlen_q != max_seqlen_k))


def dense_reasons(batch: int, total_q: int, total_k: int, max_seqlen_q: int, max_seqlen_k: int,
                  causal: bool) -> list[str]:
    """Why the dense path cannot take this call (empty: every sequence is full length and it can).
    Host integers only: no device value is read."""
    reasons = []
    if batch == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        reasons.append("needs B >= 1 and non-empty sequences")
        return reasons
    if total_q != batch * max_seqlen_q:
        reasons.append(f"not every q sequence is full length (total_q={total_q} != B * max_seqlen_q="
                       f"{batch} * {max_seqlen_q})")
    if total_k != batch * max_seqlen_k:
        reasons.append(f"not every k sequence is full length (total_k={total_k} != B * max_seqlen_k="
                       f"{batch} * {max_seqlen_k})")
    if causal and max_seqlen_q != max_seqlen_k:
        reasons.append(f"causal with q length {max_seqlen_q} != k length {max_seqlen_k} (bottom-right alignment)")
    return reasons


def _mask(key_bias: torch.Tensor, batch: int, seqlen_q: int, seqlen_k: int, causal: bool,
          dtype: torch.dtype) -> torch.Tensor:
    """key_bias (B * S_k,) fp32 -> additive mask (B, 1, 1, S_k), or (B, 1, S, S) with the causal mask in it."""
    if dtype == torch.float16:  # -1e9 would become -inf in float16
        key_bias = key_bias.clamp(min=torch.finfo(torch.float16).min)
    bias = key_bias.to(dtype).unflatten(0, (batch, seqlen_k))[:, None, None, :]  # (B, 1, 1, S_k), a view
    if causal:
        future = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=bias.device).triu(1)  # (S, S)
        bias = torch.where(future, float("-inf"), bias)  # (B, 1, S, S)
    return bias


def varlen_attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, causal: bool,
    key_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """q (B * S_q, H, D), k/v (B * S_k, H, D), every sequence full length (``dense_reasons`` is empty),
    key_bias (B * S_k,) fp32 or None -> (B * S_q, H, D) in q's dtype."""
    total_q, H, D = q.shape
    B = cu_seqlens_q.shape[0] - 1
    # (B * S, H, D) -> (B, S, H, D) -> (B, H, S, D): views of the packed tensors (any strides)
    qb = q.unflatten(0, (B, max_seqlen_q)).transpose(1, 2)
    kb = k.unflatten(0, (B, max_seqlen_k)).transpose(1, 2)
    vb = v.unflatten(0, (B, max_seqlen_k)).transpose(1, 2)
    mask = None if key_bias is None else _mask(key_bias, B, max_seqlen_q, max_seqlen_k, causal, q.dtype)
    out = F.scaled_dot_product_attention(
        qb, kb, vb, attn_mask=mask, is_causal=causal and mask is None, scale=softmax_scale,
    )  # (B, H, S_q, D)
    return out.transpose(1, 2).reshape(total_q, H, D)  # a view when SDPA's output is (B, S, H, D) in memory


register_impl("varlen_attention", NAME, varlen_attention_sdpa)
