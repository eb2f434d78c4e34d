"""Drop-in token pruning for Hugging Face vision encoders: CLIP, ViT, SigLIP, BLIP (BUS TSPS, arXiv
2307.08504 Sec. 3.2; EViT).

The HF twin of ``bus_kernels/patch/timm.py``: each listed encoder layer (``CLIPEncoderLayer``,
``ViTLayer``, ``SiglipEncoderLayer``, ``BlipEncoderLayer``) becomes a subclass that runs the original
``forward`` (whatever attention implementation the config selects: eager, sdpa, flash) and prunes
its output. The layer's queries and keys are read by forward hooks: on the attention's ``q_proj`` /
``k_proj`` (``query`` / ``key`` in transformers 4.x), or on BLIP's fused ``qkv`` projection.
SigLIP has no [CLS]: every token is a patch token (all of them are scored), and ``policy="evit"``
scores with the mean query over the tokens (``_core.scoring_query``); its attention-pooling head
then pools the kept tokens. transformers is never imported here: models are recognised by their
structure and class names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import _core, _select

# backbone class name -> (path to its layer list, prefix tokens ([CLS]) in front of the patches)
_BACKBONES = {
    "CLIPVisionModel": (("encoder", "layers"), 1),  # transformers 5
    "CLIPVisionTransformer": (("encoder", "layers"), 1),  # transformers 4.x
    "ViTModel": (("layers",), 1),  # transformers 5; 4.x: encoder.layer (tried below)
    "SiglipVisionModel": (("encoder", "layers"), 0),  # transformers 5
    "SiglipVisionTransformer": (("encoder", "layers"), 0),  # transformers 4.x
    "BlipVisionModel": (("encoder", "layers"), 1),
}
# wrapper class attribute that holds the backbone (CLIPModel, SiglipModel, BlipModel, ViTFor..., and
# transformers 4.x's SiglipVisionModel / CLIPVisionModel, which hold a *VisionTransformer)
_WRAPPERS = ("vision_model", "vit")
SUPPORTED = "CLIPVisionModel, ViTModel, SiglipVisionModel or BlipVisionModel"


@dataclass(frozen=True)
class _Attention:
    """How one layer's attention exposes its queries and keys."""

    taps: list  # (module, "output", name) hooks for _core.swap_layer
    fused: nn.Linear | None  # BLIP: the fused qkv projection, rows [q | k | v]
    q_module: nn.Module | None  # separate query projection (CLIP, ViT, SigLIP)
    heads: int
    head_dim: int
    scale: float

    def queries_keys(self, captured: dict, B: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, N, H, D)`` queries and keys of the layer's last forward."""
        H, D = self.heads, self.head_dim
        if self.fused is not None:
            qkv = captured.pop("qkv").view(B, N, 3, H, D)
            return qkv[:, :, 0], qkv[:, :, 1]
        q, k = captured.pop("q"), captured.pop("k")  # (B, N, H * D) each
        return q.view(B, N, H, D), k.view(B, N, H, D)

    def project_text(self, text_query: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` caption embedding -> ``(B, H, D)`` through the layer's query projection."""
        H, D = self.heads, self.head_dim
        if self.fused is not None:
            weight = self.fused.weight[: H * D]
            bias = self.fused.bias[: H * D] if self.fused.bias is not None else None
            return F.linear(text_query.to(weight.dtype), weight, bias).view(-1, H, D)
        # the module itself (a LoRA or quantised wrapper is respected); its hook fires, the capture is stale
        return self.q_module(text_query.to(self.q_module.weight.dtype)).view(-1, H, D)


class _PruningEncoderLayer:
    """Mixed in front of an HF encoder layer class (see ``_core.swap_layer``)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        state: _core.PatchState = self._bus_patch_state
        mask = args[0] if args else kwargs.get("attention_mask")
        if mask is not None:
            raise ValueError(
                "attention_mask cannot survive token pruning: the layers after a pruning layer get fewer "
                "tokens than the mask covers; call the patched vision model without attention_mask"
            )
        if state.policy == "text":
            text_query = _core.text_query_for(state, hidden_states.shape[0], self._bus_layer_index)
        out = super().forward(hidden_states, *args, **kwargs)
        x = out[0] if isinstance(out, tuple) else out  # transformers 4.x layers return tuples
        attn: _Attention = self._bus_attention
        B, N, _ = x.shape
        q, k = attn.queries_keys(self._bus_captured, B, N)
        query = None
        if state.policy == "text":
            query = attn.project_text(text_query)
        elif state.policy == "evit":
            query = _core.scoring_query(state, q)
        self._bus_captured.clear()  # drop the capture project_text may have refilled
        x = _select.prune_tokens(state, self._bus_layer_index, x, k, attn.scale, query=query, training=self.training)
        return (x, *out[1:]) if isinstance(out, tuple) else x


def _attention(layer: nn.Module) -> _Attention:
    """How ``layer``'s self-attention exposes its queries and keys (or TypeError)."""
    attn = getattr(layer, "self_attn", None) or getattr(layer, "attention", None)
    if attn is not None and not hasattr(attn, "q_proj") and hasattr(attn, "attention"):
        attn = attn.attention  # transformers 4.x ViT: ViTAttention.attention is the self-attention
    if attn is None:
        raise TypeError(f"{type(layer).__name__} has no self-attention module (self_attn / attention)")
    D = int(getattr(attn, "head_dim", 0) or getattr(attn, "attention_head_size", 0))
    fused = getattr(attn, "qkv", None)
    if isinstance(fused, nn.Linear):  # BLIP
        if D <= 0 or fused.out_features % (3 * D):
            raise TypeError(f"{type(attn).__name__}: cannot tell its head size")
        H = fused.out_features // (3 * D)
        taps, q_module = [(fused, "output", "qkv")], None
    else:
        q_module = getattr(attn, "q_proj", None) or getattr(attn, "query", None)
        k_module = getattr(attn, "k_proj", None) or getattr(attn, "key", None)
        if not isinstance(q_module, nn.Linear) or not isinstance(k_module, nn.Linear):
            raise TypeError(f"{type(attn).__name__} has no separate query/key nn.Linear projections")
        if D <= 0 or q_module.out_features % D:
            raise TypeError(f"{type(attn).__name__}: cannot tell its head size")
        H = q_module.out_features // D
        taps, fused = [(q_module, "output", "q"), (k_module, "output", "k")], None
    scale = float(getattr(attn, "scale", None) or getattr(attn, "scaling", None) or D**-0.5)
    return _Attention(taps, fused, q_module, H, D, scale)


def _find_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, int]:
    """The vision backbone inside ``model``, its encoder layers and its prefix token count (or TypeError)."""
    backbone = model
    for _ in range(3):  # e.g. SiglipModel -> SiglipVisionModel -> (4.x) SiglipVisionTransformer
        layers = _has_layers(backbone)
        if layers is not None:
            return backbone, layers, _BACKBONES[type(backbone).__name__][1]
        backbone = next(
            (getattr(backbone, name) for name in _WRAPPERS if isinstance(getattr(backbone, name, None), nn.Module)),
            None,
        )
        if backbone is None:
            break
    raise TypeError(
        f"model must be a Hugging Face {SUPPORTED} (or a model holding one as `vision_model` / `vit`, "
        f"e.g. CLIPModel, SiglipModel, BlipModel, ViTForImageClassification), got {type(model).__name__}"
    )


def _has_layers(backbone: nn.Module) -> nn.ModuleList | None:
    name = type(backbone).__name__
    if name not in _BACKBONES:
        return None
    for path in (_BACKBONES[name][0], ("encoder", "layer")):
        layers = backbone
        for attr in path:
            layers = getattr(layers, attr, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    return None


def patch_hf_vision(
    model: nn.Module,
    *,
    layers,
    keep=0.7,
    policy: str = "evit",
    fuse: bool = True,
    backend: str | None = None,
) -> nn.Module:
    """Add token pruning to a Hugging Face vision encoder in place (undo with ``unpatch``).

    Args:
        model: ``CLIPVisionModel``, ``ViTModel``, ``SiglipVisionModel``, ``BlipVisionModel``, or a model
            holding one as ``vision_model`` / ``vit`` (``CLIPModel``, ``SiglipModel``, ``BlipModel``,
            ``BlipForConditionalGeneration``, ``ViTForImageClassification``, ...). A model patched
            before is unpatched first.
        layers, keep, policy, fuse, backend: as in ``bus_kernels.patch.timm``: the listed 0-based
            encoder layers run in full, then keep ``clamp(round_half_up(keep * n), 1, n)`` of their
            ``n`` patch tokens (a [CLS] is always kept) and append the fused token. With
            ``policy="text"`` the caption embedding ``(B, hidden_size)`` comes from
            ``bus_kernels.patch.text_guidance(model, text_query)`` (``caption_query`` maps a CLIP / BLIP
            text embedding to that width); ``"random"`` / ``"tome"`` as there. SigLIP has no [CLS]: all
            its tokens are scored, and ``policy="evit"`` uses the mean query over the tokens in place
            of the [CLS] query.

    Returns:
        ``model``. ``last_hidden_state`` is ``(B, P + k + fuse, hidden_size)`` after the last pruning
        layer (``P`` = 1, or 0 for SigLIP); the pooled output keeps its shape (CLIP / BLIP: the [CLS];
        SigLIP: its attention-pooling head over the kept tokens). Passing an ``attention_mask`` to a
        pruning layer raises ``ValueError``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    backbone, encoder_layers, prefix = _find_layers(model)
    keep_by_layer = _core.check_options(layers, keep, policy, fuse, len(encoder_layers))
    attentions = {index: _attention(encoder_layers[index]) for index in keep_by_layer}
    swaps = {index: (encoder_layers[index], _PruningEncoderLayer, attn.taps) for index, attn in attentions.items()}
    _core.install((model,), swaps, keep=keep_by_layer, policy=policy, fuse=fuse, backend=backend,
                  num_prefix_tokens=prefix, embed_dim=int(backbone.config.hidden_size))
    for index, attn in attentions.items():
        encoder_layers[index]._bus_attention = attn  # how this layer reads its queries and keys
    return model


__all__ = ["SUPPORTED", "patch_hf_vision"]
