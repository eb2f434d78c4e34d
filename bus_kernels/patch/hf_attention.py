"""``bus_kernels.varlen_attention`` as a Hugging Face attention implementation (transformers >= 4.48).

After ``register_hf_attention()`` any model whose attention goes through transformers'
``AttentionInterface`` (BERT, CLIP, ViT, Llama, ...) runs on packed sequences with
``model.set_attn_implementation("bus_varlen")`` (or ``from_pretrained(..., attn_implementation=
"bus_varlen")``): padding tokens are removed before attention (``unpad``), the packed sequences
attend in ``varlen_attention`` (flash-attn semantics, BUS paper Sec. 3.3's text encoder without the
padding), and the result is scattered back (``pad``). Sequences already packed into one row by a
flattening collator (``cu_seq_lens_q`` / ``cu_seq_lens_k`` keyword arguments) are used as they are.

The mask side (``padding_mask``) hands over the 2D padding mask ``(B, S_k)`` (or None when nothing is
padded), as transformers' flash-attention mask function does but without its data-dependent
``mask.all()`` test while ``torch.compile`` traces.

Under ``torch.compile`` nothing data-dependent is left in the graph (``fullgraph=True`` works): packing
a padded batch needs the token count (``nonzero``) and the longest row on the host (``.item()``), so
there every row keeps its ``S`` slots (``cu_seqlens`` of equal rows, ``max_seqlen = S``, static), the
padded keys get a ``-1e9`` ``key_bias`` (their softmax weight underflows to exactly 0) and the padded
query rows are zeroed. With the mask marking the queries too (``S_q == S_k``) this equals the packed
computation for any mask, causal included: the causal order among a row's kept tokens is the order of
their positions. Packed ``cu_seq_lens`` inputs use ``max_length_*`` as given, or the row length when
they are tensors.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

HF_ATTENTION_NAME = "bus_varlen"
_MASKED = -1e9  # key_bias of a padded key: exp(-1e9 + x) is exactly 0 in float32 for any real logit x


def _heads_last(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B, S, H, D)."""
    return x.transpose(1, 2)


def _full_cu_seqlens(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """(B + 1,) int32 offsets of B unpadded sequences of ``seqlen`` tokens."""
    return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)


def hf_varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    backend: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function (the ``AttentionInterface`` signature) on ``varlen_attention``.

    Args:
        module: the calling attention module (``is_causal`` is read from it when not passed).
        query: ``(B, H, S_q, D)`` floating. key, value: ``(B, H_kv, S_k, D)``, ``H % H_kv == 0`` (GQA
            heads are repeated).
        attention_mask: None, or the 2D padding mask ``(B, S_k)`` (bool/int, nonzero = token) that
            transformers' flash-attention mask function produces. With ``S_q == S_k`` it also marks
            the query tokens; otherwise (cross-attention, decoding) every query is a token.
        dropout: must be 0 (``varlen_attention`` has no attention dropout).
        scaling: softmax scale (default ``D ** -0.5``).
        is_causal: causal mask aligned bottom-right to each row's unpadded key count (flash-attn).
        kwargs: ``cu_seq_lens_q`` / ``cu_seq_lens_k`` ``(N + 1,)`` and ``max_length_q`` /
            ``max_length_k`` describe sequences packed into a batch of one row (no padding mask).
        backend: ``varlen_attention`` backend (None: best available; ``register_hf_attention`` binds it).

    Returns:
        ``(attn_output (B, S_q, H, D) in query's dtype, None)``; padded query positions are zeros.
    """
    from .. import pad, unpad, varlen_attention

    if dropout:
        raise ValueError(
            f"attn_implementation={HF_ATTENTION_NAME!r} has no attention dropout (got dropout={dropout}): "
            "set the config's attention dropout to 0 or use model.eval()"
        )
    if kwargs.get("output_attentions"):
        raise ValueError(f"attn_implementation={HF_ATTENTION_NAME!r} cannot return attention weights")
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", False))
    B, H, S_q, D = query.shape
    H_kv, S_k = key.shape[1], key.shape[2]
    if H % H_kv:
        raise ValueError(f"query has {H} heads, not a multiple of key's {H_kv}")
    if H_kv != H:  # grouped-query attention: each kv head serves H // H_kv query heads
        key = key.repeat_interleave(H // H_kv, dim=1)
        value = value.repeat_interleave(H // H_kv, dim=1)
    q, k, v = _heads_last(query), _heads_last(key), _heads_last(value)  # (B, S, H, D)
    common = dict(softmax_scale=scaling, causal=bool(is_causal), backend=backend)

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None and attention_mask is None:
        if B != 1:
            raise ValueError(f"cu_seq_lens_q/k describe sequences packed into one row, but the batch has {B} rows")
        out = varlen_attention(
            q[0], k[0], v[0], cu_q.to(torch.int32), cu_k.to(torch.int32),
            _max_length(kwargs["max_length_q"], S_q), _max_length(kwargs["max_length_k"], S_k), **common,
        )
        return out[None], None
    if attention_mask is None:
        # nothing padded: every row is one full sequence
        out = varlen_attention(
            q.reshape(B * S_q, H, D), k.reshape(B * S_k, H, D), v.reshape(B * S_k, H, D),
            _full_cu_seqlens(B, S_q, q.device), _full_cu_seqlens(B, S_k, q.device), S_q, S_k, **common,
        )
        return out.view(B, S_q, H, D), None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attn_implementation={HF_ATTENTION_NAME!r} needs a 2D padding mask (B, S_k), got shape "
            f"{tuple(attention_mask.shape)}: pass the tokenizer's attention_mask, not a prepared 4D mask"
        )
    if torch.compiler.is_compiling():
        return _masked_rows(q, k, v, attention_mask, common), None
    keys = unpad(k, attention_mask)  # k packed (total_k, H, D)
    v_packed = torch.index_select(v.reshape(B * S_k, H, D), 0, keys.indices)
    if S_q == S_k:
        queries = unpad(q, attention_mask)
    else:
        queries = unpad(q, torch.ones(B, S_q, dtype=torch.bool, device=q.device))
    out = varlen_attention(
        queries.x_packed, keys.x_packed, v_packed, queries.cu_seqlens, keys.cu_seqlens,
        queries.max_seqlen, keys.max_seqlen, **common,
    )
    return pad(out, queries.indices, B, S_q), None


def _max_length(value, bound: int) -> int:
    """``max_length_*`` as a host int; a tensor is read on the host, or replaced by the static bound
    (the packed row's length) while torch.compile traces (no ``.item()`` in the graph)."""
    if isinstance(value, torch.Tensor):
        return bound if torch.compiler.is_compiling() else int(value)
    return int(value)


def _masked_rows(q, k, v, attention_mask: torch.Tensor, common: dict) -> torch.Tensor:
    """Static-shape attention of a padded batch (the torch.compile path): every row keeps its ``S``
    slots, padded keys get ``key_bias = -1e9``, padded query rows (``S_q == S_k``) come back as zeros.

    q: (B, S_q, H, D); k, v: (B, S_k, H, D); attention_mask (B, S_k). Returns (B, S_q, H, D)."""
    from .. import varlen_attention

    B, S_q, H, D = q.shape
    S_k = k.shape[1]
    if common["causal"] and S_q != S_k:
        raise ValueError(
            f"attn_implementation={HF_ATTENTION_NAME!r} under torch.compile: a causal padded attention with "
            f"S_q={S_q} != S_k={S_k} aligns each row to its own key count, which needs packed (data-dependent) "
            "shapes; run it uncompiled"
        )
    keep = attention_mask != 0  # (B, S_k)
    key_bias = torch.where(keep, 0.0, _MASKED).to(torch.float32).reshape(B * S_k)
    out = varlen_attention(
        q.reshape(B * S_q, H, D), k.reshape(B * S_k, H, D), v.reshape(B * S_k, H, D),
        _full_cu_seqlens(B, S_q, q.device), _full_cu_seqlens(B, S_k, q.device), S_q, S_k,
        key_bias=key_bias, **common,
    ).view(B, S_q, H, D)
    # padded query rows (S_q == S_k) and rows with no key at all output zeros, as the packed path does
    rows = keep if S_q == S_k else keep.any(dim=1, keepdim=True).expand(B, S_q)
    return out * rows[:, :, None, None].to(out.dtype)


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """transformers mask function (``AttentionMaskInterface``): the 2D padding mask ``(B, kv_length)``
    (its last ``kv_length`` columns), or None when there is none or, outside torch.compile, when nothing
    is padded (the unpadded fast path; testing that is a host read, kept out of compiled graphs)."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and not torch.compiler.is_compiling() and bool(attention_mask.all()):
        return None
    return attention_mask


def register_hf_attention(name: str = HF_ATTENTION_NAME, *, backend: str | None = None) -> str:
    """Register ``hf_varlen_attention`` with transformers under ``name``; returns ``name``.

    Then ``model.set_attn_implementation(name)`` or ``AutoModel.from_pretrained(path,
    attn_implementation=name)``. ``backend`` pins the ``varlen_attention`` backend (``"triton"``,
    ``"flash_attn"``, ...; None: best available for the inputs). Needs transformers >= 4.48
    (``AttentionInterface``). Registering a name again replaces its function.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:
        raise ImportError(
            "registering an attention implementation needs transformers >= 4.48 (AttentionInterface)"
        ) from exc
    function = hf_varlen_attention if backend is None else functools.partial(hf_varlen_attention, backend=backend)
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, padding_mask)  # hands over the 2D padding mask
    return name
