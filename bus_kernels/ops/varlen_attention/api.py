"""The public ``varlen_attention``: input validation, then the dispatcher picks a backend."""

from __future__ import annotations

import math

import torch

from ..._capture import host_reads_allowed
from ..._validation import (
    FLOAT_DTYPES,
    check_dim_size,
    check_dtype,
    check_float,
    check_int,
    check_rank,
    check_same_device,
    check_tensor,
)
from ...backends import get_impl, select_backend
from . import dense  # noqa: F401  (registers the sdpa fast path for dense batches)
from . import launch  # noqa: F401  (registers the triton and torch implementations)
from .dense import dense_reasons, is_dense
from .limits import ATTENTION_LIMITS
from .tiles import offsets_facts


def _check_cu_seqlens(name: str, values: list[int], total: int, max_name: str, max_seqlen: int) -> None:
    """Value checks of offsets read on the host: start at 0, non-decreasing, end at ``total``, lengths <= max."""
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values[:-1], values[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of packed tokens {total}, got {values[-1]}")
    longest = max(lengths, default=0)
    if longest > max_seqlen:
        raise ValueError(f"{max_name}={max_seqlen} is smaller than the longest sequence of {name} ({longest})")


def _check_offsets(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int, max_q: int, max_k: int) -> None:
    """The value checks of both offsets, read once per ``cu_seqlens`` object (and version): a model runs every
    layer's attention on the same offsets, and they passed the first time (``tiles.offsets_facts``)."""
    facts_q = offsets_facts(cu_q)
    facts_k = facts_q if cu_k is cu_q else offsets_facts(cu_k)  # self-attention: one object
    key_q, key_k = ("checked", total_q, max_q), ("checked", total_k, max_k)
    if facts_q is not None and facts_k is not None and key_q in facts_q and key_k in facts_k:
        return
    offsets = torch.cat([cu_q, cu_k]).tolist()  # one host read (one sync on CUDA)
    n = cu_q.shape[0]
    _check_cu_seqlens("cu_seqlens_q", offsets[:n], total_q, "max_seqlen_q", max_q)
    _check_cu_seqlens("cu_seqlens_k", offsets[n:], total_k, "max_seqlen_k", max_k)
    for facts, key in ((facts_q, key_q), (facts_k, key_k)):
        if facts is not None:
            facts[key] = True


def _common_case(q, k, v, cu_q, cu_k, max_q, max_k, key_bias) -> bool:
    """The common valid call in a few comparisons (no key bias, int maxima, one device); False sends the call
    through ``_check_inputs``. True implies every check of ``_check_inputs`` passes."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
            and isinstance(cu_q, torch.Tensor) and isinstance(cu_k, torch.Tensor) and key_bias is None
            and type(max_q) is int and type(max_k) is int and max_q >= 0 and max_k >= 0
            and q.dim() == 3 and k.dim() == 3 and q.dtype in FLOAT_DTYPES and k.dtype == q.dtype
            and v.dtype == q.dtype and cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32 and cu_q.dim() == 1):
        return False
    _, H, D = q.shape
    k_shape = k.shape
    device = q.device
    return (H > 0 and D > 0 and k_shape[1] == H and k_shape[2] == D and v.shape == k_shape
            and cu_k.shape == cu_q.shape and cu_q.shape[0] >= 1
            and k.device == device and v.device == device and cu_q.device == device and cu_k.device == device)


def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_bias):
    """Every input check, each raising with the argument's name -> (total_q, H, D, total_k, max_seqlen_q,
    max_seqlen_k) with the maxima as ints."""
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, t)
    check_rank("q", q, 3, "(total_q, H, D)")
    check_rank("k", k, 3, "(total_k, H, D)")
    check_rank("v", v, 3, "(total_k, H, D)")
    check_float("q", q)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    total_q, H, D = q.shape
    total_k = k.shape[0]
    if H == 0 or D == 0:
        raise ValueError(f"q must have H >= 1 heads of D >= 1 dims, got shape {tuple(q.shape)}")
    check_dim_size("k", k, 1, H, "head count H of q")
    check_dim_size("k", k, 2, D, "head dim D of q")
    check_dim_size("v", v, 0, total_k, "token count total_k of k")
    check_dim_size("v", v, 1, H, "head count H of q")
    check_dim_size("v", v, 2, D, "head dim D of q")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_dtype(name, cu, torch.int32)
        check_rank(name, cu, 1, "(B + 1,)")
        if cu.shape[0] == 0:
            raise ValueError(f"{name} must have B + 1 >= 1 entries, got 0")
    check_dim_size("cu_seqlens_k", cu_seqlens_k, 0, cu_seqlens_q.shape[0], "B + 1 entries of cu_seqlens_q")
    max_seqlen_q = check_int("max_seqlen_q", max_seqlen_q, 0)
    max_seqlen_k = check_int("max_seqlen_k", max_seqlen_k, 0)
    named = [("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)]
    if key_bias is not None:
        check_tensor("key_bias", key_bias)
        check_dtype("key_bias", key_bias, torch.float32)
        check_rank("key_bias", key_bias, 1, "(total_k,)")
        check_dim_size("key_bias", key_bias, 0, total_k, "token count total_k of k")
        named.append(("key_bias", key_bias))
    check_same_device(named)
    return total_q, H, D, total_k, max_seqlen_q, max_seqlen_k


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    key_bias: torch.Tensor | None = None,
    check_seqlens: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention over packed variable-length sequences (flash-attn ``flash_attn_varlen_func`` semantics).

    Sequence b has queries ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]`` and keys/values
    ``k, v[cu_seqlens_k[b]:cu_seqlens_k[b+1]]``; its queries attend to its keys only.

    Args:
        q: ``(total_q, H, D)`` float16/bfloat16/float32 (float64: torch backend); any strides with
            a unit stride in D are used as they are (e.g. a slice of a fused qkv tensor).
        k, v: ``(total_k, H, D)``, q's dtype and device.
        cu_seqlens_q, cu_seqlens_k: ``(B + 1,)`` int32 offsets, ``0 = cu[0] <= cu[1] <= ... <= cu[B]
            = total``; zero-length sequences allowed; q and k lengths may differ (cross-attention).
        max_seqlen_q, max_seqlen_k: int, at least the longest q / k sequence.
        softmax_scale: default ``D ** -0.5``.
        causal: mask aligned bottom-right: query i of a length-Lq sequence sees key j iff
            ``j <= i + Lk - Lq``. A query row that sees no key outputs zeros (and gets zero grads).
        key_bias: optional ``(total_k,)`` float32 added to every score of its key (natural-log units;
            ``log(n_j)`` gives proportional attention for a token standing for ``n_j`` patches).
            Differentiable. Supported by the triton and torch backends.
        check_seqlens: read ``cu_seqlens_*`` on the host to check their values (a device sync on
            CUDA), once per offsets object: later calls with the same objects, unchanged in place, and
            the same totals and maxima reuse the verdict (every layer of a model shares its offsets).
            Skipped automatically while ``torch.compile`` traces or a CUDA graph is captured.
        backend: ``"triton"``, ``"torch"``, ``"sdpa"``, ``"flash_attn"``, ``"xformers"``,
            ``"torch_varlen"`` or ``None`` (best available; env ``BUS_KERNELS_BACKEND``). ``None`` sends a
            dense batch (every sequence full length: ``total_q == B * max_seqlen_q`` and ``total_k ==
            B * max_seqlen_k``, decided without reading ``cu_seqlens``) to ``"sdpa"``, PyTorch's
            ``scaled_dot_product_attention`` on a ``(B, S, H, D)`` view (``varlen_attention/dense.py``).

    Returns:
        ``(total_q, H, D)`` in q's dtype. Differentiable in q, k, v (and key_bias).
    """
    if _common_case(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_bias):
        total_q, H, D = q.shape
        total_k = k.shape[0]
    else:  # the named checks, which raise with the argument's name
        total_q, H, D, total_k, max_seqlen_q, max_seqlen_k = _check_inputs(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_bias)
    if softmax_scale is None:
        softmax_scale = D**-0.5
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    softmax_scale = float(softmax_scale)
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if check_seqlens and host_reads_allowed(cu_seqlens_q):
        _check_offsets(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q, max_seqlen_k)

    requires_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or (key_bias is not None and key_bias.requires_grad))

    def extra(name: str) -> list[str]:
        limits = ATTENTION_LIMITS.get(name)
        if limits is None:
            return []
        reasons = limits.reasons(D, key_bias is not None)
        if limits.dense_only:  # host integers only: no read of cu_seqlens
            reasons += dense_reasons(cu_seqlens_q.shape[0] - 1, total_q, total_k, max_seqlen_q, max_seqlen_k, causal)
        return reasons

    dense = is_dense(cu_seqlens_q.shape[0] - 1, total_q, total_k, max_seqlen_q, max_seqlen_k, causal)
    name = select_backend("varlen_attention", q.device, q.dtype, requires_grad, backend, extra,
                          extra_key=(D, key_bias is not None, dense))
    impl = get_impl("varlen_attention", name)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal)
    return impl(*args, key_bias) if key_bias is not None else impl(*args)
