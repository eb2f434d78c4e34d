"""Fusion (cross-modal) encoder (BUS §3.1, ALBEF-style).

BERT layers over the text encoder's output that also cross-attend to the visual memory:
[image CLS + PAD summary] in BUS, every ViT token in the baseline. Its [CLS] feeds the ITM head, its
tokens the MLM head.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import TextConfig
from .text import BertEncoderLayers, run_layers


class FusionEncoder(nn.Module):
    """``encoder.layer.N`` BERT layers with ``crossattention`` to a memory of width ``memory_width``."""

    def __init__(self, cfg: TextConfig, num_layers: int, memory_width: int, attn_impl: str = "sdpa"):
        super().__init__()
        self.attn_impl = attn_impl
        self.encoder = BertEncoderLayers(cfg, num_layers, cross_width=memory_width)

    def forward(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """text (B, L, C) text-encoder states, text_mask (B, L) bool or None, memory (B, M, Cv),
        memory_mask (B, M) bool or None -> fused states (B, L, C)."""
        return run_layers(self.encoder.layer, text, text_mask, self.attn_impl, memory, memory_mask)
