"""The four model families ``bus bench patch`` measures, each built from a config with random weights.

Every family gets the same ViT shape (``--size``: tiny = width 192 / 3 heads, small = 384 / 6 heads;
12 blocks, MLP ratio 4, patch 16), so the rows differ only in each library's block code and in
SigLIP having no [CLS] (and an attention-pooling head). Each ``Family`` knows how to build the model,
patch it (``bus_kernels.patch.<family>``), list its blocks (to count the tokens entering each) and
produce the pooled image embedding a training step differentiates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import bus_kernels.patch

SIZES = {"tiny": (192, 3), "small": (384, 6)}  # width, heads
DEPTH, PATCH, MLP_RATIO = 12, 16, 4


@dataclass(frozen=True)
class Family:
    name: str
    library: str  # the package whose version is recorded
    build: Callable[[int, int, int], nn.Module]  # (width, heads, img_size) -> model in train mode
    patch: Callable[..., nn.Module]  # bus_kernels.patch.<family>(model, layers=, keep=, policy=, fuse=)
    blocks: Callable[[nn.Module], list]  # the transformer blocks, in order
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # images -> (B, E) pooled embedding
    model_name: Callable[[str], str]  # size -> the name shown in the table


def _timm(width, heads, img_size):
    import timm

    name = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224"}[width]
    return timm.create_model(name, pretrained=False, img_size=img_size, num_classes=0)


def _open_clip(width, heads, img_size):
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(
        image_size=img_size, patch_size=PATCH, width=width, layers=DEPTH, heads=heads, mlp_ratio=MLP_RATIO,
        output_dim=width,
    )


def _hf_config(cls_name, width, heads, img_size, **extra):
    import transformers

    return getattr(transformers, cls_name)(
        hidden_size=width, num_attention_heads=heads, num_hidden_layers=DEPTH, intermediate_size=MLP_RATIO * width,
        image_size=img_size, patch_size=PATCH, **extra,
    )


def _hf_clip(width, heads, img_size):
    import transformers

    return transformers.CLIPVisionModel(_hf_config("CLIPVisionConfig", width, heads, img_size, hidden_act="gelu"))


def _siglip(width, heads, img_size):
    import transformers

    return transformers.SiglipVisionModel(_hf_config("SiglipVisionConfig", width, heads, img_size))


FAMILIES = {
    "timm": Family(
        "timm", "timm", _timm, bus_kernels.patch.timm, lambda m: list(m.blocks), lambda m, x: m(x),
        lambda size: f"vit_{size} (timm)",
    ),
    "open_clip": Family(
        "open_clip", "open_clip", _open_clip, bus_kernels.patch.open_clip,
        lambda m: list(m.transformer.resblocks), lambda m, x: m(x), lambda size: f"ViT-{size} (open_clip)",
    ),
    "hf_clip": Family(
        "hf_clip", "transformers", _hf_clip, bus_kernels.patch.hf_vision, lambda m: list(m.encoder.layers),
        lambda m, x: m(pixel_values=x).pooler_output, lambda size: f"CLIPVisionModel-{size} (HF)",
    ),
    "siglip": Family(
        "siglip", "transformers", _siglip, bus_kernels.patch.hf_vision, lambda m: list(m.encoder.layers),
        lambda m, x: m(pixel_values=x).pooler_output, lambda size: f"SiglipVisionModel-{size} (HF)",
    ),
}


def library_version(library: str) -> str | None:
    try:
        module = __import__(library)
    except ImportError:
        return None
    return getattr(module, "__version__", None)


__all__ = ["DEPTH", "FAMILIES", "Family", "SIZES", "library_version"]
