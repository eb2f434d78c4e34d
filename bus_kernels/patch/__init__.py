"""Drop-in text-guided token pruning for existing timm, open_clip and Hugging Face ViTs (the ToMe way).

BUS TSPS (arXiv 2307.08504, Sec. 3.2), EViT, FLIP random masking and ToMe merging (policies
``text``, ``evit``, ``random``, ``tome``; see ``_select.py``) without adopting ``bus_model``::

    import bus_kernels.patch
    bus_kernels.patch.timm(vit, layers=[3, 6, 9], keep=0.7, policy="text")
    with bus_kernels.patch.text_guidance(vit, caption_cls):  # (B, C_vit)
        features = vit.forward_features(images)
    bus_kernels.patch.unpatch(vit)

    timm(model, *, layers, keep, policy, fuse)       -> patch a timm VisionTransformer in place
    open_clip(model, *, layers, keep, policy, fuse)  -> the same for open_clip's vision tower (CLIP, CoCa, timm towers)
    hf_vision(model, *, layers, keep, policy, fuse)  -> the same for HF CLIP / ViT / SigLIP / BLIP vision models
    caption_query(model, text_features)              -> a dual encoder's text embedding in its ViT's width
    text_guidance(model, text_query)                 -> context manager supplying the caption embedding
    kept_patches(model)                              -> which patches the last forward kept, per layer
    unpatch(model)                                   -> the original classes, exactly
    register_hf_attention()                          -> "bus_varlen": HF models attend on packed sequences
                                                        through varlen_attention (set_attn_implementation)

timm, open_clip and transformers are imported only when a model is patched (or the attention registered).
"""

from ._core import kept_patches, text_guidance, unpatch
from .captions import caption_query
from .hf import patch_hf_vision
from .hf_attention import HF_ATTENTION_NAME, hf_varlen_attention, register_hf_attention
from .open_clip import patch_open_clip
from .timm import patch_timm

hf_vision = patch_hf_vision
open_clip = patch_open_clip
timm = patch_timm  # ``bus_kernels.patch.timm(model, ...)``, as ``tome.patch.timm``

__all__ = [
    "HF_ATTENTION_NAME",
    "caption_query",
    "hf_varlen_attention",
    "hf_vision",
    "kept_patches",
    "open_clip",
    "patch_hf_vision",
    "patch_open_clip",
    "patch_timm",
    "register_hf_attention",
    "text_guidance",
    "timm",
    "unpatch",
]
