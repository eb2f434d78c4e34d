"""Drop-in token pruning for open_clip's vision tower (BUS TSPS, arXiv 2307.08504 Sec. 3.2; EViT).

``patch_open_clip(model, layers=[3, 6, 9], keep=0.7)`` swaps each listed block of open_clip's
``VisionTransformer`` for a subclass that runs the block's own ``forward`` and then prunes its output
(as ``patch.timm`` does, following ToMe's class swap). Two block kinds exist:

* ``ResidualAttentionBlock`` attends with ``nn.MultiheadAttention``, whose query/key projections are
  slices of one ``in_proj_weight`` and no modules of their own: a forward pre-hook on the attention
  reads its (normalised) input and the block recomputes the KEY projection of the tokens (one
  ``C x C`` matmul per token, ~1/12 of a block's FLOPs, in pruning blocks only) and the query of the
  [CLS] or the caption;
* ``CustomResidualAttentionBlock`` (qk-norm, scaled heads, ...) has open_clip's own ``Attention``: hooks
  on its ``ln_q`` / ``ln_k`` read the normalised queries and keys, as in ``patch.timm``.

open_clip's timm towers (``TimmModel``) hold a timm ``VisionTransformer`` as ``trunk``: it is patched
by ``patch.timm``'s blocks. ``patch_dropout`` keeps working: it drops patches before the first block,
and the pruning blocks then keep their share of the tokens that remain (``kept_patches`` indexes
those). open_clip is imported only when a model is patched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _core, _select
from .timm import patch_vit_blocks

SUPPORTED = (
    "open_clip CLIP / CustomTextCLIP / CoCa (their .visual), an open_clip VisionTransformer, or a "
    "TimmModel tower around a timm VisionTransformer"
)


def _no_mask(attn_mask) -> None:
    if attn_mask is not None:
        raise ValueError(
            "attn_mask cannot survive token pruning: the blocks after a pruning block get fewer tokens than "
            "the mask covers; call the patched vision tower without attn_mask"
        )


class _PruningResidualBlock:
    """Mixed in front of ``ResidualAttentionBlock`` (``nn.MultiheadAttention``)."""

    def forward(self, q_x: torch.Tensor, k_x=None, v_x=None, attn_mask=None) -> torch.Tensor:
        state: _core.PatchState = self._bus_patch_state
        _no_mask(attn_mask)
        if k_x is not None or v_x is not None:
            raise ValueError("k_x / v_x: a pruning block is a self-attention block; cross-attention is not pruned")
        B = q_x.shape[0]
        if state.policy == "text":
            text_query = _core.text_query_for(state, B, self._bus_layer_index)
        out = super().forward(q_x, k_x, v_x, attn_mask)
        normed = self._bus_captured.pop("attn")[0]  # (B, N, C): ln_1(q_x), the attention's query = key input
        mha: nn.MultiheadAttention = self.attn
        C, H = mha.embed_dim, mha.num_heads
        D = C // H
        weight, bias = mha.in_proj_weight, mha.in_proj_bias  # (3C, C) rows [q | k | v]
        keys = query = None
        if state.policy != "random":
            keys = F.linear(normed, weight[C : 2 * C], None if bias is None else bias[C : 2 * C]).view(B, -1, H, D)
        if state.policy in _core.SCORING:
            source = text_query.to(weight.dtype) if state.policy == "text" else normed[:, 0]  # caption or [CLS]
            query = F.linear(source, weight[:C], None if bias is None else bias[:C]).view(B, H, D)
        return _select.prune_tokens(
            state, self._bus_layer_index, out, keys, D**-0.5, query=query, training=self.training
        )


class _PruningCustomBlock:
    """Mixed in front of ``CustomResidualAttentionBlock`` (open_clip's ``Attention``)."""

    def forward(self, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
        state: _core.PatchState = self._bus_patch_state
        _no_mask(attn_mask)
        if state.policy == "text":
            text_query = _core.text_query_for(state, x.shape[0], self._bus_layer_index)
        out = super().forward(x, attn_mask=attn_mask)
        attn = self.attn
        q, k = self._bus_captured.pop("q"), self._bus_captured.pop("k")  # (B, H, N, D) after ln_q / ln_k
        query = None
        if state.policy == "text":
            C = attn.num_heads * attn.head_dim
            weight, bias = attn.in_proj_weight, attn.in_proj_bias
            projected = F.linear(text_query.to(weight.dtype), weight[:C], None if bias is None else bias[:C])
            query = attn.ln_q(projected.view(-1, attn.num_heads, attn.head_dim))  # (B, H, D)
            self._bus_captured.clear()  # ln_q's hook fired again
        elif state.policy == "evit":
            query = q[:, :, 0]  # the image [CLS] query
        return _select.prune_tokens(
            state, self._bus_layer_index, out, k.transpose(1, 2), attn.scale, query=query, training=self.training
        )


def _find_tower(model: nn.Module):
    """(open_clip module, the vision tower inside ``model``) or TypeError naming the supported classes."""
    try:
        import open_clip.transformer as oc
        from open_clip.timm_model import TimmModel
    except ImportError as exc:  # open_clip is an optional (test) dependency
        raise ImportError("bus_kernels.patch.open_clip needs open_clip: pip install open-clip-torch") from exc
    tower = model if isinstance(model, (oc.VisionTransformer, TimmModel)) else getattr(model, "visual", None)
    if not isinstance(tower, (oc.VisionTransformer, TimmModel)):
        raise TypeError(f"model must be an {SUPPORTED}; got {type(model).__name__}")
    return oc, tower, TimmModel


def _block_taps(oc, index: int, block: nn.Module):
    """(mixin, hooks) for one open_clip block (or TypeError)."""
    if isinstance(block, oc.ResidualAttentionBlock):
        mha = block.attn
        if not isinstance(mha, nn.MultiheadAttention) or mha.in_proj_weight is None or not mha.batch_first:
            raise TypeError(
                f"block {index}: its nn.MultiheadAttention must be batch_first with one in_proj_weight "
                "(open_clip >= 2.23 builds it so)"
            )
        return _PruningResidualBlock, [(mha, "inputs", "attn")]
    if isinstance(block, oc.CustomResidualAttentionBlock):
        attn = block.attn
        if getattr(attn, "logit_scale", None) is not None:
            raise TypeError(
                f"block {index}: scaled cosine attention is not supported (its logits are not scale * q.k)"
            )
        return _PruningCustomBlock, [(attn.ln_q, "output", "q"), (attn.ln_k, "output", "k")]
    raise TypeError(
        f"block {index} is a {type(block).__name__}; supported: ResidualAttentionBlock, CustomResidualAttentionBlock"
    )


def patch_open_clip(
    model: nn.Module,
    *,
    layers,
    keep=0.7,
    policy: str = "evit",
    fuse: bool = True,
    backend: str | None = None,
) -> nn.Module:
    """Add token pruning to open_clip's vision tower in place (undo with ``bus_kernels.patch.unpatch``).

    Args:
        model: an open_clip ``CLIP`` / ``CustomTextCLIP`` / ``CoCa`` (its ``.visual`` is patched; the text
            tower is untouched), a ``VisionTransformer``, or a ``TimmModel`` tower with a timm ViT trunk.
            A model patched before is unpatched first.
        layers: 0-based block indices of the vision transformer (``int`` or sequence).
        keep: share of the CURRENT patch tokens each listed block keeps, in ``(0, 1]``: one float, or one
            per layer; ``k = clamp(round_half_up(keep * n), 1, n)`` of ``n``.
        policy: ``"evit"`` scores with the image [CLS] query; ``"text"`` with a caption embedding
            ``(B, width)`` supplied by ``with bus_kernels.patch.text_guidance(model, text_query):``;
            ``bus_kernels.patch.caption_query(model, model.encode_text(text))`` maps the model's own
            text embedding to the tower's width; ``"random"`` (FLIP, training only) and ``"tome"``
            (ToMe merging, ``keep >= 0.5``) as in ``bus_kernels.patch.timm``.
        fuse: append one token, the score-weighted mean of the dropped ones, after the kept tokens
            (``evit`` / ``text`` only).
        backend: kernel backend for ``text_patch_scores`` / ``topk_gather`` (None: best available).

    Returns:
        ``model``. ``encode_image`` returns features of the usual shape; with ``output_tokens=True`` the
        tokens are the kept ones plus the fused token, ``(B, k + fuse, width)``. ``text_guidance``,
        ``kept_patches`` and ``unpatch`` take ``model`` or its ``.visual``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    oc, tower, TimmModel = _find_tower(model)
    if isinstance(tower, TimmModel):
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(tower.trunk, VisionTransformer):
            raise TypeError(f"model's timm tower must be a timm VisionTransformer, got {type(tower.trunk).__name__}")
        patch_vit_blocks(tower, tower.trunk, layers=layers, keep=keep, policy=policy, fuse=fuse, backend=backend)
        if model is not tower:
            _core.attach(_core.get_state(tower), model)
        return model
    blocks = list(tower.transformer.resblocks)
    keep_by_layer = _core.check_options(layers, keep, policy, fuse, len(blocks))
    if not tower.transformer.batch_first:
        raise TypeError("model's vision transformer runs sequence-first (batch_first=False): open_clip >= 2.23 needed")
    swaps = {index: (blocks[index], *_block_taps(oc, index, blocks[index])) for index in keep_by_layer}
    # num_prefix_tokens: open_clip's ViT always has its class token in front
    _core.install((model, tower), swaps, keep=keep_by_layer, policy=policy, fuse=fuse, backend=backend,
                  num_prefix_tokens=1, embed_dim=int(tower.transformer.width))
    return model


__all__ = ["SUPPORTED", "patch_open_clip"]
