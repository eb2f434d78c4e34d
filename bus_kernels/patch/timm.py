"""Drop-in token pruning for timm ``VisionTransformer`` (BUS TSPS, arXiv 2307.08504 Sec. 3.2; EViT).

``patch_timm(model, layers=[3, 6, 9], keep=0.7)`` swaps each listed ``Block`` for a subclass whose
``forward`` runs timm's own ``Block.forward`` (LayerScale, qk-norm, fused attention, drop-path all
untouched) and then prunes the block's output with the scores of that block's attention: the layer's
queries and keys are read by hooks on ``attn.q_norm`` / ``attn.k_norm`` (identity modules unless the
model uses qk-norm), so no upstream code is copied. timm is imported only when a model is patched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _core, _select


class _PruningBlock:
    """Mixed in front of a timm block class (see ``_core.swap_layer``)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        state: _core.PatchState = self._bus_patch_state
        if args and args[0] is not None or kwargs.get("attn_mask") is not None:
            raise ValueError(
                "attn_mask cannot survive token pruning: the blocks after a pruning block get fewer tokens "
                "than the mask covers; call the patched ViT without attn_mask"
            )
        if state.policy == "text":
            text_query = _core.text_query_for(state, x.shape[0], self._bus_layer_index)
        out = super().forward(x, *args, **kwargs)
        attn = self.attn
        query = None
        if state.policy == "text":
            query = _project_text(attn, text_query)  # (B, H, D); its q_norm call refills captured["q"]
        captured = self._bus_captured
        q, k = captured.pop("q"), captured.pop("k")  # (B, H, N, D) each, after qk-norm
        if state.policy == "evit":
            query = q[:, :, 0]  # the image [CLS] query (patch_timm refuses evit without a class token)
        return _select.prune_tokens(
            state, self._bus_layer_index, out, k.transpose(1, 2), attn.scale, query=query, training=self.training
        )


def _project_text(attn: nn.Module, text_query: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` caption embedding -> ``(B, H, D)`` through the layer's query projection and q-norm."""
    H, D = attn.num_heads, attn.head_dim
    weight = attn.qkv.weight[: H * D]  # q rows of the fused (3 * H * D, C) qkv weight
    bias = attn.qkv.bias[: H * D] if attn.qkv.bias is not None else None
    q = F.linear(text_query.to(weight.dtype), weight, bias).view(-1, H, D)
    return attn.q_norm(q)


def _check_model(model: nn.Module) -> None:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as exc:  # timm is an optional (test) dependency
        raise ImportError("bus_kernels.patch.timm needs timm: pip install timm") from exc
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"model must be a timm VisionTransformer (e.g. timm.create_model('vit_base_patch16_224')), "
            f"got {type(model).__name__}"
        )


def _check_attention(index: int, block: nn.Module) -> nn.Module:
    attn = getattr(block, "attn", None)
    needed = ("qkv", "q_norm", "k_norm", "num_heads", "head_dim", "scale")
    if attn is None or not all(hasattr(attn, name) for name in needed) or not isinstance(attn.qkv, nn.Linear):
        raise TypeError(
            f"block {index} ({type(block).__name__}) has no timm Attention with a fused qkv projection "
            f"and q_norm/k_norm; only the standard ViT block is supported"
        )
    return attn


def patch_timm(
    model: nn.Module,
    *,
    layers,
    keep=0.7,
    policy: str = "evit",
    fuse: bool = True,
    backend: str | None = None,
) -> nn.Module:
    """Add token pruning to a timm ``VisionTransformer`` in place (undo with ``bus_kernels.patch.unpatch``).

    Args:
        model: a timm ``VisionTransformer`` (any size, with or without register tokens, qk-norm,
            LayerScale); a model patched before is unpatched first.
        layers: 0-based block indices (``int`` or sequence). Each listed block runs in full; its
            attention's query/key then score the patch tokens and its output keeps the best of them.
        keep: share of the CURRENT patch tokens each listed block keeps, in ``(0, 1]``: one float, or one
            per layer. A block keeps ``k = clamp(round_half_up(keep * n), 1, n)`` of its ``n`` patch
            tokens; ``k == n`` leaves the tokens untouched.
        policy: ``"evit"`` scores with the image [CLS] query; ``"text"`` with a caption embedding
            ``(B, C)`` passed through the layer's query projection, supplied by
            ``with bus_kernels.patch.text_guidance(model, text_query): ...``; ``"random"`` keeps a random
            subset in training (FLIP; nothing dropped at inference); ``"tome"`` merges the other
            tokens into their most similar ones (ToMe; ``keep >= 0.5``). See ``_select.py``.
        fuse: append one token, the score-weighted mean of the dropped ones, after the kept tokens
            (``evit`` / ``text``; ignored by ``random`` and ``tome``). Later pruning layers treat it as
            an ordinary patch token.
        backend: kernel backend for ``text_patch_scores`` / ``topk_gather`` (None: best available).

    Returns:
        ``model``. After block ``l`` the sequence is ``[prefix tokens, k kept patch tokens in their
        original order, fused token]`` of length ``num_prefix_tokens + k + fuse``; ``forward_head``
        pools as usual ('token': the [CLS]; 'avg': the mean of the remaining non-prefix tokens).
        ``bus_kernels.patch.kept_patches(model)`` tells which patches the last forward kept.
    """
    _check_model(model)
    return patch_vit_blocks(model, model, layers=layers, keep=keep, policy=policy, fuse=fuse, backend=backend)


def patch_vit_blocks(owner: nn.Module, model: nn.Module, *, layers, keep, policy, fuse, backend) -> nn.Module:
    """``patch_timm`` on the timm ViT ``model`` (checked by the caller), its state held by ``owner`` and
    by ``model`` (``owner`` is e.g. open_clip's ``CLIP`` around a timm tower)."""
    blocks = list(model.blocks)
    keep_by_layer = _core.check_options(layers, keep, policy, fuse, len(blocks))
    if policy == "evit" and not getattr(model, "has_class_token", False):
        raise ValueError("policy='evit' scores with the image [CLS] query, but this model has no class token")
    swaps = {}
    for index in keep_by_layer:
        attn = _check_attention(index, blocks[index])
        swaps[index] = (blocks[index], _PruningBlock, [(attn.q_norm, "output", "q"), (attn.k_norm, "output", "k")])
    _core.install((owner, model), swaps, keep=keep_by_layer, policy=policy, fuse=fuse, backend=backend,
                  num_prefix_tokens=int(model.num_prefix_tokens), embed_dim=int(model.embed_dim))
    return owner
