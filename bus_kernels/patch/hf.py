"""Drop-in token pruning for Hugging Face CLIP / ViT vision encoders (BUS TSPS, arXiv 2307.08504 Sec. 3.2).

The HF twin of ``bus_kernels/patch/timm.py``: each listed encoder layer (``CLIPEncoderLayer``,
``ViTLayer``) becomes a subclass that runs the original ``forward`` (whatever attention
implementation the config selects: eager, sdpa, flash) and prunes its output; the layer's queries
and keys are read by hooks on the attention's ``q_proj`` / ``k_proj`` (``query`` / ``key`` in
transformers 4.x). transformers is never imported here: models are recognised by their structure.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _core

# backbone class name -> how to reach its layer list
_BACKBONES = {
    "CLIPVisionModel": ("encoder", "layers"),  # transformers 5
    "CLIPVisionTransformer": ("encoder", "layers"),  # transformers 4.x
    "ViTModel": ("layers",),  # transformers 5; 4.x: encoder.layer (tried below)
}
# wrapper class attribute that holds the backbone
_WRAPPERS = ("vision_model", "vit")


class _PruningEncoderLayer:
    """Mixed in front of an HF encoder layer class (see ``_core.swap_layer``)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        state: _core.PatchState = self._bus_patch_state
        mask = args[0] if args else kwargs.get("attention_mask")
        if mask is not None:
            raise ValueError("attention_mask is not supported on a token-pruned ViT (pruning changes the token count)")
        if state.policy == "text":
            text_query = _core.text_query_for(state, hidden_states.shape[0])
        out = super().forward(hidden_states, *args, **kwargs)
        x = out[0] if isinstance(out, tuple) else out  # transformers 4.x layers return tuples
        q_module, k_module, H, D, scale = _attention_parts(self)
        B, N, _ = x.shape
        if state.policy == "text":
            # through the layer's query projection; the capture hook refills captured["q"]
            query = q_module(text_query.to(q_module.weight.dtype)).view(B, H, D)
        captured = self._bus_captured
        q, k = captured.pop("q"), captured.pop("k")  # (B, N, H * D) each
        if state.policy == "evit":
            query = q[:, 0].view(B, H, D)  # the image [CLS] query
        x = _core.prune_tokens(state, self._bus_layer_index, x, query, k.view(B, N, H, D), scale)
        return (x, *out[1:]) if isinstance(out, tuple) else x


def _attention_parts(layer: nn.Module) -> tuple[nn.Module, nn.Module, int, int, float]:
    """The layer's query and key projections, head count, head dim and softmax scale (or TypeError)."""
    attn = getattr(layer, "self_attn", None) or getattr(layer, "attention", None)
    if attn is not None and not hasattr(attn, "q_proj") and hasattr(attn, "attention"):
        attn = attn.attention  # transformers 4.x ViT: ViTAttention.attention is the self-attention
    if attn is None:
        raise TypeError(f"{type(layer).__name__} has no self-attention module (self_attn / attention)")
    q_module = getattr(attn, "q_proj", None) or getattr(attn, "query", None)
    k_module = getattr(attn, "k_proj", None) or getattr(attn, "key", None)
    if not isinstance(q_module, nn.Linear) or not isinstance(k_module, nn.Linear):
        raise TypeError(f"{type(attn).__name__} has no separate query/key nn.Linear projections")
    D = int(getattr(attn, "head_dim", 0) or getattr(attn, "attention_head_size", 0))
    if D <= 0 or q_module.out_features % D:
        raise TypeError(f"{type(attn).__name__}: cannot tell its head size")
    H = q_module.out_features // D
    scale = float(getattr(attn, "scale", None) or getattr(attn, "scaling", None) or D**-0.5)
    return q_module, k_module, H, D, scale


def _find_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The vision backbone inside ``model`` and its list of encoder layers (or TypeError)."""
    backbone = model
    if type(model).__name__ not in _BACKBONES:
        for name in _WRAPPERS:
            inner = getattr(model, name, None)
            if isinstance(inner, nn.Module) and type(inner).__name__ in _BACKBONES:
                backbone = inner
                break
        else:
            raise TypeError(
                "model must be a Hugging Face CLIPVisionModel or ViTModel (or a model holding one as "
                f"`vision_model` / `vit`, e.g. CLIPModel, ViTForImageClassification), got {type(model).__name__}"
            )
    for path in (_BACKBONES[type(backbone).__name__], ("encoder", "layer")):
        layers = backbone
        for name in path:
            layers = getattr(layers, name, None)
        if isinstance(layers, nn.ModuleList):
            return backbone, layers
    raise TypeError(f"{type(backbone).__name__} has no encoder layer list")


def patch_hf_vision(
    model: nn.Module,
    *,
    layers,
    keep=0.7,
    policy: str = "evit",
    fuse: bool = True,
    backend: str | None = None,
) -> nn.Module:
    """Add token pruning to a Hugging Face CLIP / ViT vision encoder in place (undo with ``unpatch``).

    Args:
        model: ``CLIPVisionModel``, ``ViTModel``, or a model holding one as ``vision_model`` / ``vit``
            (``CLIPModel``, ``CLIPVisionModelWithProjection``, ``ViTForImageClassification``).
            A model patched before is unpatched first.
        layers, keep, policy, fuse, backend: as in ``bus_kernels.patch.timm``: the listed 0-based
            encoder layers run in full, then keep ``clamp(round_half_up(keep * n), 1, n)`` of their
            ``n`` patch tokens (the [CLS] is always kept) and append the fused token. With
            ``policy="text"`` the caption embedding ``(B, hidden_size)`` comes from
            ``bus_kernels.patch.text_guidance(model, text_query)``.

    Returns:
        ``model``. ``last_hidden_state`` is ``(B, 1 + k + fuse, hidden_size)`` after the last pruning
        layer; the pooled output (the [CLS]) keeps its shape. Passing an ``attention_mask`` to a pruning
        layer raises ``ValueError``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    backbone, encoder_layers = _find_layers(model)
    keep_by_layer = _core.check_options(layers, keep, policy, fuse, len(encoder_layers))
    parts = {index: _attention_parts(encoder_layers[index]) for index in keep_by_layer}
    _core.unpatch(model)  # after validation: a rejected call leaves the model as it was
    state = _core.PatchState(
        keep=keep_by_layer,
        policy=policy,
        fuse=fuse,
        num_prefix_tokens=1,  # CLIP and ViT: one [CLS], no register tokens
        embed_dim=int(backbone.config.hidden_size),
        backend=backend,
    )
    for index in sorted(keep_by_layer):
        q_module, k_module = parts[index][:2]
        _core.swap_layer(encoder_layers[index], _PruningEncoderLayer, state, index, q_module, k_module)
    model.__dict__[_core.STATE_ATTR] = state
    return model


__all__ = ["patch_hf_vision"]
