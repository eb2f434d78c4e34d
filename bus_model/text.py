"""BERT layers with the parameter names of HF ``transformers`` ``BertModel``, so its checkpoints load as they are.

The same layer, with a cross-attention block (``crossattention.*``, as HF names it with
``add_cross_attention``), makes the fusion encoder and the decoder (BUS §3.1, following ALBEF/mPLUG:
text encoder = the first BERT layers, fusion = further layers that also cross-attend to the image).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import additive_mask, attention_dtype, fuse_linear_keys, packed_attention, sdpa_heads
from .packing import gather_rows, known_lengths, memo, packing, register_host_lengths, scatter_rows
from .config import TextConfig


class BertSelfAttention(nn.Module):
    """Self-attention, its query, key and value projections fused into one matmul (``qkv``); or, with
    ``context_width``, cross-attention: ``query`` from ``hidden``, key and value fused (``kv``) from the context.

    HF checkpoints keep ``query``/``key``/``value`` apart: ``_load_from_state_dict`` fuses them on load
    (``fuse_attention_keys``), so HF weights and older bus checkpoints load as they are."""

    def __init__(self, hidden: int, heads: int, context_width: int | None = None):
        super().__init__()
        self.num_heads = heads
        if context_width is None:
            self.qkv = nn.Linear(hidden, 3 * hidden)
        else:
            self.query = nn.Linear(hidden, hidden)
            self.kv = nn.Linear(context_width, 2 * hidden)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        fuse_attention_keys(state_dict, prefix, cross=not hasattr(self, "qkv"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, hidden, context, bias, causal):
        """hidden (B, Sq, C), context (B, Sk, Cm), bias from ``additive_mask`` or None -> (B, Sq, C)."""
        B, Sq, C = hidden.shape
        H, D = self.num_heads, C // self.num_heads
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(hidden).view(B, Sq, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, Sq, D)
        else:
            q = self.query(hidden).view(B, Sq, H, D).transpose(1, 2)  # (B, H, Sq, D)
            k, v = self.kv(context).view(B, context.shape[1], 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        return sdpa_heads(q, k, v, bias, causal)

    def forward_packed(self, hidden, context, q_seqs, k_seqs, causal):
        """hidden (Tq, C), context (Tk, Cm) packed; q_seqs/k_seqs: (rows, cu_seqlens, max_seqlen) -> (Tq, C)."""
        H, D = self.num_heads, hidden.shape[-1] // self.num_heads
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(hidden).view(-1, 3, H, D).unbind(1)  # each (T, H, D)
        else:
            q = self.query(hidden).view(-1, H, D)
            k, v = self.kv(context).view(-1, 2, H, D).unbind(1)
        out = packed_attention(q, k, v, q_seqs[1], k_seqs[1], q_seqs[2], k_seqs[2], causal=causal)
        return out.reshape(-1, H * D)


def fuse_attention_keys(state: dict, prefix: str, cross: bool) -> None:
    """HF's ``{prefix}query|key|value.*`` -> our ``{prefix}qkv.*`` (self-attention) or, ``cross``,
    ``{prefix}key|value.*`` -> ``{prefix}kv.*`` (``query`` stays), in place (``fuse_linear_keys``)."""
    if cross:
        fuse_linear_keys(state, prefix, ("key", "value"), "kv")
    else:
        fuse_linear_keys(state, prefix, ("query", "key", "value"), "qkv")


class BertSelfOutput(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, states, residual):
        return self.LayerNorm(self.dense(states) + residual)


class BertAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float, context_width: int | None = None):
        super().__init__()
        self.self = BertSelfAttention(hidden, heads, context_width)
        self.output = BertSelfOutput(hidden, eps)

    def forward(self, hidden, context, bias, causal):
        return self.output(self.self(hidden, context, bias, causal), hidden)

    def forward_packed(self, hidden, context, q_seqs, k_seqs, causal):
        return self.output(self.self.forward_packed(hidden, context, q_seqs, k_seqs, causal), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.dense = nn.Linear(hidden, inner)

    def forward(self, x):
        return F.gelu(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, inner: int, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(inner, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, states, residual):
        return self.LayerNorm(self.dense(states) + residual)


class BertLayer(nn.Module):
    """Post-norm BERT layer; with ``cross_width`` it also cross-attends to a memory of that width."""

    def __init__(self, cfg: TextConfig, cross_width: int | None = None):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.attention = BertAttention(h, cfg.num_heads, eps)
        self.crossattention = BertAttention(h, cfg.num_heads, eps, cross_width) if cross_width else None
        self.intermediate = BertIntermediate(h, cfg.intermediate_size)
        self.output = BertOutput(cfg.intermediate_size, h, eps)

    def forward(self, hidden, bias=None, memory=None, memory_bias=None, causal=False):
        """hidden (B, L, C); memory (B, M, Cm); bias / memory_bias: the stack's masks from ``additive_mask``
        (None: nothing masked). Padded query rows are computed but never read (their keys are masked)."""
        hidden = self.attention(hidden, hidden, bias, causal)
        if self.crossattention is not None:
            if memory is None:
                raise ValueError("this layer cross-attends: memory (B, M, C) is required")
            hidden = self.crossattention(hidden, memory, memory_bias, False)
        return self.output(self.intermediate(hidden), hidden)

    def forward_packed(self, hidden, seqs, memory=None, memory_seqs=None, causal=False):
        """The same layer on packed tokens: hidden (T, C), memory (Tm, Cm); seqs as from ``packing``."""
        hidden = self.attention.forward_packed(hidden, hidden, seqs, seqs, causal)
        if self.crossattention is not None:
            if memory is None:
                raise ValueError("this layer cross-attends: memory (B, M, C) is required")
            hidden = self.crossattention.forward_packed(hidden, memory, seqs, memory_seqs, False)
        return self.output(self.intermediate(hidden), hidden)


def run_layers(layers, hidden, mask, impl, memory=None, memory_mask=None, causal=False) -> torch.Tensor:
    """Run BERT ``layers`` over hidden (B, L, C) with key mask (B, L) bool or None, optionally
    cross-attending to memory (B, M, Cm) with memory_mask (B, M) bool or None.

    ``impl="varlen"``: the valid tokens are packed once for the whole stack, so every projection, FFN
    and attention skips padding; padded positions of the result are zero. ``"sdpa"``: padded, the masks
    built once for the stack (padded positions of the result hold values nobody should read)."""
    if impl != "varlen":  # the masks are built once for the whole stack
        dtype = attention_dtype(hidden)
        bias = additive_mask(mask, dtype, causal=causal, query_len=hidden.shape[1])
        memory_bias = additive_mask(memory_mask, dtype)
        for layer in layers:
            hidden = layer(hidden, bias, memory=memory, memory_bias=memory_bias, causal=causal)
        return hidden
    B, L, C = hidden.shape
    seqs = packing(mask, B, L, hidden.device)
    x = gather_rows(hidden.reshape(B * L, C), seqs[0])  # (T, C)
    mem, mem_seqs = None, None
    if memory is not None:
        M = memory.shape[1]
        mem_seqs = packing(memory_mask, B, M, memory.device)
        mem = gather_rows(memory.reshape(B * M, -1), mem_seqs[0])  # (Tm, Cm)
    for layer in layers:
        x = layer.forward_packed(x, seqs, mem, mem_seqs, causal)
    return scatter_rows(x, seqs[0], B * L).view(B, L, C)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        # built once, not per forward (as HF does); not saved: checkpoints hold weights only
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        x = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids[:L])[None]
        x = x + self.token_type_embeddings.weight[0]  # token type 0 everywhere (single segment)
        return self.LayerNorm(x)


class BertEncoderLayers(nn.Module):
    """``encoder.layer.N`` in HF naming."""

    def __init__(self, cfg: TextConfig, num_layers: int, cross_width: int | None = None):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg, cross_width) for _ in range(num_layers))


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 HF attention mask -> (B, L) bool key mask.

    Always a mask (finding out that nothing is padded would read the device: a host sync per call), and
    the same mask object for the same ``attention_mask`` while it lives, so every stack that packs it
    (``attn_impl="varlen"``) reuses one packing."""
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return memo(attention_mask, "padding_mask", attention_mask.bool)


def stacked_padding_mask(attention_mask: torch.Tensor, copies: int) -> torch.Tensor:
    """(B, L) 0/1 mask -> (copies * B, L) bool: ``padding_mask`` repeated, for a pass over stacked rows (the
    clean and masked captions at once). The same object for the same ``attention_mask`` while it lives; its
    packed sizes follow from those of the single mask when the host knows them (no extra host read)."""
    single = padding_mask(attention_mask)

    def make():
        stacked = single.repeat(copies, 1)
        lengths = known_lengths(single)
        if lengths is not None:
            register_host_lengths(stacked, copies * lengths[0], lengths[1])
        return stacked

    return memo(attention_mask, f"stacked_padding_mask_{copies}", make)


def shifted_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 mask -> (B, L - 1) bool mask of the tokens before the last (a decoder's inputs);
    the same object for the same ``attention_mask`` while it lives (as ``padding_mask``)."""
    return memo(attention_mask, "shifted_padding_mask", lambda: attention_mask[:, :-1].to(torch.bool, copy=True))


class TextEncoder(nn.Module):
    """BERT text encoder: ``embeddings`` + ``encoder.layer.N``, as in HF ``BertModel`` (no pooler)."""

    def __init__(self, cfg: TextConfig, impl: str = "sdpa"):
        super().__init__()
        self.config = cfg
        self.impl = impl
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoderLayers(cfg, cfg.num_layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids (B, L) int64, attention_mask (B, L) 0/1 -> last hidden states (B, L, hidden) float."""
        mask = padding_mask(attention_mask)
        return run_layers(self.encoder.layer, self.embeddings(input_ids), mask, self.impl)


def read_hf_state_dict(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and config of a local HF BERT directory (``model.safetensors`` + ``config.json``).

    Keys are returned without the ``bert.`` prefix that ``BertFor*`` heads add. Only safetensors is
    read: pickled ``pytorch_model.bin`` files are refused (never unpickle untrusted files).
    """
    from safetensors.torch import load_file

    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"directory {str(path)!r} does not exist")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors file in {str(path)!r} (save with save_pretrained(..., safe_serialization=True); "
            "pickled .bin checkpoints are not loaded)"
        )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        for key, value in load_file(str(f)).items():
            state[key[len("bert."):] if key.startswith("bert.") else key] = value
    config_file = path / "config.json"
    hf_config = json.loads(config_file.read_text()) if config_file.exists() else {}
    return state, hf_config
