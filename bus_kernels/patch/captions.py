"""A dual encoder's own text embedding as the caption query of its patched vision tower.

BUS scores patches with the caption's [CLS] in the ViT's width (arXiv 2307.08504 Sec. 3.2; BUS learns
a linear map for it). A pretrained CLIP-style model already has a map between the two spaces: its
visual projection ``P`` takes the image [CLS] (ViT width ``C``) to the joint space (width ``E``).
``caption_query`` sends a text embedding ``t`` back with the transpose, ``t @ P^T``: the ViT-width
vector whose projection has the largest inner product with ``t`` per unit norm, i.e. the direction
of an image [CLS] that the caption would match. No parameters are added; a model trained with
pruning may prefer a learned map (pass its output to ``text_guidance`` directly).
"""

from __future__ import annotations

import torch
from torch import nn

from .._validation import check_float, check_rank, check_tensor


def _visual_projection(model: nn.Module) -> tuple[torch.Tensor | None, int] | None:
    """(matrix W with ``query = text @ W``, or None for the identity; ViT width) of a supported model,
    or None for an unsupported one."""
    visual = getattr(model, "visual", None)
    if isinstance(visual, nn.Module):  # open_clip
        proj = getattr(visual, "proj", None)
        if isinstance(proj, torch.Tensor) and proj.dim() == 2:  # VisionTransformer: (C, E), image = cls @ proj
            return proj.t(), proj.shape[0]
        head_proj = getattr(getattr(visual, "head", None), "proj", None)
        if isinstance(head_proj, nn.Linear):  # TimmModel: Linear(C -> E), weight (E, C)
            return head_proj.weight, head_proj.in_features
        return None
    projection = getattr(model, "visual_projection", None)
    if isinstance(projection, nn.Linear):  # HF CLIPModel, BlipModel: Linear(C -> E), weight (E, C)
        return projection.weight, projection.in_features
    vision = getattr(model, "vision_model", None)
    if type(model).__name__ == "SiglipModel" and vision is not None:  # one shared width, no projection
        return None, int(vision.config.hidden_size)
    return None


def caption_query(model: nn.Module, text_features: torch.Tensor) -> torch.Tensor:
    """The caption query for ``text_guidance`` from the model's own text embedding.

    Args:
        model: an open_clip ``CLIP`` / ``CustomTextCLIP`` (``.visual.proj`` or a timm tower's
            ``head.proj``), or a Hugging Face ``CLIPModel`` / ``BlipModel`` (``visual_projection``) or
            ``SiglipModel`` (text and image share one width: returned as it is).
        text_features: ``(B, E)`` floating: ``model.encode_text(text)`` (open_clip) or
            ``model.get_text_features(...)`` (HF), normalised or not.

    Returns:
        ``(B, C)`` in the vision tower's width ``C``: ``text_features @ P^T`` for the visual projection
        ``P`` (C -> E). Differentiable in ``text_features`` and ``P``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = _visual_projection(model)
    if found is None:
        raise TypeError(
            "model must be an open_clip CLIP / CustomTextCLIP or a Hugging Face CLIPModel, BlipModel or "
            f"SiglipModel (a model with a visual projection), got {type(model).__name__}"
        )
    matrix, width = found  # (E, C) or None (E == C)
    check_tensor("text_features", text_features)
    check_rank("text_features", text_features, 2, "(B, E)")
    check_float("text_features", text_features)
    expected = width if matrix is None else matrix.shape[0]
    if text_features.shape[1] != expected:
        raise ValueError(
            f"text_features has width {text_features.shape[1]}, expected the model's embedding width {expected}"
        )
    return text_features if matrix is None else text_features.to(matrix.dtype) @ matrix  # (B, C)


__all__ = ["caption_query"]
