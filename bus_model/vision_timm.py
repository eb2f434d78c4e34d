"""Reading timm ViTs for ``BusViT.from_timm``: a checkpoint file's state dict and the ``VisionConfig`` that a
state dict or a live timm ``VisionTransformer`` implies."""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn as nn

from .config import VisionConfig


def read_state_dict(path) -> dict[str, torch.Tensor]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
    if not isinstance(state, dict) or "pos_embed" not in state:
        raise ValueError(f"{path!r} is not a timm ViT state dict (no 'pos_embed')")
    return state


def vision_config_from_state(state: dict[str, torch.Tensor], num_heads: int | None) -> VisionConfig:
    proj = state["patch_embed.proj.weight"]  # (C, in_chans, p, p)
    width, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    return VisionConfig(
        image_size=grid * patch, patch_size=patch, in_chans=in_chans, width=width, depth=depth,
        num_heads=num_heads or max(1, width // 64), mlp_ratio=hidden / width,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
    )


def vision_config_from_timm_module(model: nn.Module) -> tuple[dict[str, torch.Tensor], VisionConfig]:
    for attr in ("patch_embed", "blocks", "pos_embed", "cls_token"):
        if not hasattr(model, attr):
            raise TypeError(f"expected a timm VisionTransformer, got {type(model).__name__} (no {attr!r})")
    if getattr(model, "num_prefix_tokens", 1) != 1 or getattr(model, "global_pool", "token") not in ("token", ""):
        raise ValueError("only timm ViTs with exactly one [CLS] prefix token (no registers) are supported")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    vision = vision_config_from_state(state, model.blocks[0].attn.num_heads)
    norm = model.blocks[0].norm1
    img = model.patch_embed.img_size
    vision = dataclasses.replace(vision, image_size=img[0] if isinstance(img, (tuple, list)) else img,
                                 layer_norm_eps=getattr(norm, "eps", 1e-6))
    return state, vision
