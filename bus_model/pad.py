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

from .attention import multi_head_attention
from .config import PadConfig


class PadAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, memory, memory_mask, impl):
        """x (B, M, C) queries, memory (B, N, C), memory_mask (B, N) bool or None -> (B, M, C)."""
        B, M, C = x.shape
        N, H = memory.shape[1], self.num_heads
        q = self.q(x).view(B, M, H, C // H)
        k = self.k(memory).view(B, N, H, C // H)
        v = self.v(memory).view(B, N, H, C // H)
        return self.proj(multi_head_attention(q, k, v, key_mask=memory_mask, impl=impl).reshape(B, M, C))


class PadLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = PadAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.cross_attn = PadAttention(width, heads)
        self.norm3 = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, int(width * mlp_ratio))
        self.fc2 = nn.Linear(int(width * mlp_ratio), width)

    def forward(self, x, memory, memory_mask, impl):
        h = self.norm1(x)
        x = x + self.self_attn(h, h, None, impl)
        x = x + self.cross_attn(self.norm2(x), memory, memory_mask, impl)
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
        for layer in self.layers:
            x = layer(x, tokens, mask, self.attn_impl)
        return self.norm(x)
