"""PAD, the Patch Abstraction Decoder (BUS §3.3).

M learnable queries pass through a few pre-norm Transformer decoder layers: self-attention among the
queries, cross-attention to the ViT's final tokens ([CLS] + kept patches + fused tokens), MLP. The
M outputs are a short, fixed-length visual summary: the fusion encoder and the decoder cross-attend to
[image CLS + summary] instead of every patch, which is where most of BUS's saving in the cross-modal
layers comes from.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import additive_mask, attention_dtype, fuse_linear_keys, multi_head_attention, sdpa_heads
from .config import PadConfig


class PadAttention(nn.Module):
    """Self-attention among the queries (``qkv`` fused: one matmul) or, ``cross``, cross-attention to the
    ViT tokens (``q`` from the queries, ``kv`` fused from the memory). Checkpoints written with separate
    ``q``/``k``/``v`` load (fused on load)."""

    def __init__(self, width: int, heads: int, cross: bool = False):
        super().__init__()
        self.num_heads = heads
        if cross:
            self.q = nn.Linear(width, width)
            self.kv = nn.Linear(width, 2 * width)
        else:
            self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if hasattr(self, "qkv"):
            fuse_linear_keys(state_dict, prefix, ("q", "k", "v"), "qkv")
        else:
            fuse_linear_keys(state_dict, prefix, ("k", "v"), "kv")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x, memory, memory_mask, impl, bias=None):
        """x (B, M, C) queries, memory (B, N, C) (ignored by self-attention), memory_mask (B, N) bool or None
        -> (B, M, C). ``bias``: ``additive_mask(memory_mask)``, built once by the caller (sdpa)."""
        B, M, C = x.shape
        H = self.num_heads
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).view(B, M, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, M, D)
        else:
            q = self.q(x).view(B, M, H, C // H).transpose(1, 2)  # (B, H, M, D)
            k, v = self.kv(memory).view(B, memory.shape[1], 2, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        if impl == "varlen" and memory_mask is not None:  # packed keys: padding costs no attention work
            out = multi_head_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_mask=memory_mask,
                                       impl=impl).reshape(B, M, C)
        else:
            out = sdpa_heads(q, k, v, bias)
        return self.proj(out)


class PadLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = PadAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.cross_attn = PadAttention(width, heads, cross=True)
        self.norm3 = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, int(width * mlp_ratio))
        self.fc2 = nn.Linear(int(width * mlp_ratio), width)

    def forward(self, x, memory, memory_mask, impl, memory_bias=None):
        h = self.norm1(x)
        x = x + self.self_attn(h, None, None, impl)
        x = x + self.cross_attn(self.norm2(x), memory, memory_mask, impl, memory_bias)
        return x + self.fc2(F.gelu(self.fc1(self.norm3(x))))


class PatchAbstractionDecoder(nn.Module):
    """Args: cfg (queries, layers), width/heads of the ViT, attn_impl ("sdpa" | "varlen")."""

    def __init__(self, cfg: PadConfig, width: int, heads: int, eps: float = 1e-6, attn_impl: str = "sdpa"):
        super().__init__()
        self.attn_impl = attn_impl
        self.queries = nn.Parameter(torch.empty(1, cfg.num_queries, width))
        self.layers = nn.ModuleList(PadLayer(width, heads, cfg.mlp_ratio, eps) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(width, eps=eps)
        nn.init.trunc_normal_(self.queries, std=0.02)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, N, C) ViT output, mask (B, N) bool or None -> summary (B, M, C)."""
        x = self.queries.expand(tokens.shape[0], -1, -1)
        bias = additive_mask(mask, attention_dtype(tokens)) if self.attn_impl == "sdpa" else None  # once for all layers
        for layer in self.layers:
            x = layer(x, tokens, mask, self.attn_impl, bias)
        return self.norm(x)
