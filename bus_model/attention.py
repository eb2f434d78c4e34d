"""Multi-head attention core used by every tower, with the implementation chosen by config.

``sdpa``: padded tensors and boolean key masks through ``torch.nn.functional.scaled_dot_product_attention``.
``varlen``: the valid tokens are packed (flash-attn layout) and sent through ``bus_kernels.varlen_attention``,
so padding (text, ragged kept patches after ``keep_by_mass``) costs no attention work.
Both return the same values at valid query positions; padded query positions are zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import bus_kernels

from .config import ATTN_IMPLS
from .packing import gather_rows, is_concrete, packing, register_host_lengths, scatter_rows  # noqa: F401  (re-exported)


def varlen_available() -> bool:
    """Whether ``bus_kernels`` provides ``varlen_attention`` (needed by ``attn_impl="varlen"``)."""
    return hasattr(bus_kernels, "varlen_attention")


def fuse_linear_keys(state: dict, prefix: str, parts: tuple[str, ...], fused: str) -> None:
    """Rewrite, in place, the separate projections ``{prefix}{part}.weight|bias`` of a state dict into one
    fused ``{prefix}{fused}.*`` (concatenated along the output dim, in ``parts`` order): checkpoints written
    with separate q/k/v projections load into fused ones. Keys already fused, or a group with a part
    missing (left for the strict load to report), stay as they are."""
    for kind in ("weight", "bias"):
        names = [f"{prefix}{p}.{kind}" for p in parts]
        if all(n in state for n in names):
            state[f"{prefix}{fused}.{kind}"] = torch.cat([state.pop(n) for n in names])


def attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention scores will have for activations ``x``: autocast's when it is on, else x's.
    SDPA wants a float mask in the query's dtype (a bool mask it converts on every call)."""
    device_type = x.device.type
    if device_type != "meta" and torch.is_autocast_enabled(device_type):  # meta (FLOP counting) has no autocast
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def additive_mask(
    key_mask: torch.Tensor | None, dtype: torch.dtype, *, causal: bool = False, query_len: int | None = None,
) -> torch.Tensor | None:
    """Build once per stack what every attention call of the stack adds to its scores.

    key_mask: ``(B, Sk)`` bool, True for valid keys, or None. causal: query i sees keys ``<= i``
    (``query_len`` == Sk). Returns ``(B, 1, 1, Sk)`` (``(B, 1, Sq, Sk)`` when causal) float in ``dtype``:
    0 where attention is allowed, -inf where not; None when nothing is masked (no key mask; causal
    attention then uses SDPA's ``is_causal``)."""
    if key_mask is None:
        return None
    B, Sk = key_mask.shape
    bias = torch.zeros(B, 1, 1, Sk, dtype=dtype, device=key_mask.device)
    bias.masked_fill_(~key_mask.view(B, 1, 1, Sk), float("-inf"))  # (B, 1, 1, Sk)
    if causal:
        future = torch.ones(query_len, key_mask.shape[1], dtype=torch.bool, device=key_mask.device).triu_(1)
        bias = bias.masked_fill(future, float("-inf"))  # (B, 1, Sq, Sk)
    return bias


def sdpa_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, causal: bool = False):
    """Attention on head-major tensors: q ``(B, H, Sq, D)``, k/v ``(B, H, Sk, D)``, bias from ``additive_mask``
    -> ``(B, Sq, H * D)`` (back to token-major, heads merged)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal and bias is None)  # (B, H, Sq, D)
    B, H, Sq, D = out.shape
    return out.transpose(1, 2).reshape(B, Sq, H * D)


def multi_head_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
    causal: bool = False,
    impl: str = "sdpa",
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention over heads.

    Args:
        q: ``(B, Sq, H, D)`` floating queries. k, v: ``(B, Sk, H, D)`` same dtype/device.
        key_mask: ``(B, Sk)`` bool, True for valid keys, valid tokens first in each row; None: all valid.
        query_mask: ``(B, Sq)`` bool, True for valid queries (only ``varlen`` uses it to skip padding);
            None: all valid.
        causal: query i sees keys ``<= i`` (self-attention, Sq == Sk).
        impl: ``"sdpa"`` or ``"varlen"``.
        key_bias: ``(B, Sk)`` float added to every score of its key (ToMe's proportional attention:
            ``log(size)``); None: no bias.

    Returns:
        ``(B, Sq, H, D)`` in q's dtype.
    """
    if impl not in ATTN_IMPLS:
        raise ValueError(f"impl must be one of {ATTN_IMPLS}, got {impl!r}")
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    if causal and Sq != Sk:
        raise ValueError(f"causal attention needs Sq == Sk, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if impl == "sdpa":
        attn_mask = None
        if key_mask is not None:
            attn_mask = key_mask[:, None, None, :]  # (B, 1, 1, Sk)
            if causal:
                attn_mask = attn_mask & torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril()
        if key_bias is not None:  # a float mask: the bias, -inf where a boolean mask says no
            bias = key_bias[:, None, None, :].to(q.dtype)  # (B, 1, 1, Sk)
            attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))
            if causal and key_mask is None:
                attn_mask = attn_mask.masked_fill(~torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=attn_mask, is_causal=causal and attn_mask is None,
        )  # (B, H, Sq, D)
        out = out.transpose(1, 2)
        if query_mask is not None:
            out = out * query_mask[:, :, None, None].to(out.dtype)
        return out
    if not varlen_available():
        raise RuntimeError(
            "attn_impl='varlen' needs bus_kernels.varlen_attention, which this bus_kernels does not provide; "
            "use attn_impl='sdpa'"
        )
    q_idx, cu_q, max_q = packing(query_mask, B, Sq, q.device)
    k_idx, cu_k, max_k = packing(key_mask, B, Sk, q.device)
    q_packed = gather_rows(q.reshape(B * Sq, H, D), q_idx)  # (total_q, H, D)
    k_packed = gather_rows(k.reshape(B * Sk, H, D), k_idx)
    v_packed = gather_rows(v.reshape(B * Sk, H, D), k_idx)
    bias_packed = None if key_bias is None else gather_rows(key_bias.reshape(B * Sk), k_idx).float()
    out_packed = packed_attention(q_packed, k_packed, v_packed, cu_q, cu_k, max_q, max_k, causal=causal, key_bias=bias_packed)
    return scatter_rows(out_packed.to(q.dtype), q_idx, B * Sq).view(B, Sq, H, D)


def packed_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False, key_bias=None):
    """``bus_kernels.varlen_attention`` on packed tokens: q (total_q, H, D), k/v (total_k, H, D),
    cu_seqlens (B + 1,) int32, key_bias (total_k,) float32 or None -> (total_q, H, D).

    The offsets come from ``packing`` (built by the model, right by construction), so their host-side
    value check is skipped: it would cost a device sync per attention call."""
    if not varlen_available():
        raise RuntimeError("packed attention needs bus_kernels.varlen_attention, which this bus_kernels lacks")
    if key_bias is None:
        return bus_kernels.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                            check_seqlens=False)
    return bus_kernels.varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal, key_bias=key_bias,
        check_seqlens=False,
    )
