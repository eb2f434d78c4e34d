"""``BusViT``: a ViT with timm's parameter names and token selection inside the backbone (BUS §3.2).

Names match timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), so a timm model or checkpoint
loads as it is (``BusViT.from_timm``); with ``policy="none"`` ``forward_features`` equals timm's.
bus/evit select (and tome merges) after the attention of the configured blocks, before their MLP, as
EViT and ToMe do; elip selects before the configured blocks, from a no-grad look-ahead as ELIP's official
code does; random (FLIP) drops before the configured blocks (block 0: at the patch embedding).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import multi_head_attention, packed_attention, packing, sdpa_heads
from .config import SelectionConfig, VisionConfig
from .selection import (
    POLICY_INFO,
    SelectionRecord,
    apply_selection,
    elip_lookahead_scores,
    keep_count,
    keep_rule,
    mass_keep,
    merge_step,
    random_keep_scores,
    score_candidates,
    text_free_mode,
)
from .vision_timm import read_state_dict, vision_config_from_state, vision_config_from_timm_module


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def project_query(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, C), already normed -> this layer's query (B, H, D) (the q third of ``qkv``)."""
        # the whole qkv projection of B rows, then its q third: it reuses the weight autocast has already
        # cast for the block (a slice of the weight would be cast again, and cost more ops than the B x 2C extra)
        C = h.shape[-1]
        return self.qkv(h)[:, :C].view(h.shape[0], self.num_heads, -1)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _unpack(packed: torch.Tensor, rows: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """packed (total, *F) at flat positions ``rows`` -> (batch, seqlen, *F), zeros elsewhere."""
    out = packed.new_zeros(batch * seqlen, *packed.shape[1:]).index_copy(0, rows, packed)
    return out.view(batch, seqlen, *packed.shape[1:])


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.width, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio))

    def attend(self, x: torch.Tensor, mask: torch.Tensor | None, impl: str, key_bias: torch.Tensor | None = None):
        """x (B, N, C) -> (x after the attention residual, q, k), q and k head-major (B, H, N, D).

        Ragged rows (``mask`` given) with ``impl="varlen"`` run packed: the projections see only the valid
        tokens and attention goes through ``varlen_attention``; padding stays zero. ``key_bias (B, N)``
        float32 is added to every score of its key (ToMe's proportional attention, ``log(size)``)."""
        B, N, C = x.shape
        H = self.attn.num_heads
        if impl == "varlen" and mask is not None:
            rows, cu, max_len = packing(mask, B, N, x.device)
            xs = x.reshape(B * N, C).index_select(0, rows)  # (total, C) valid tokens only
            bias = None if key_bias is None else key_bias.reshape(B * N).index_select(0, rows).float()
            xs, q, k = self.attend_packed(xs, cu, max_len, bias)
            return _unpack(xs, rows, B, N), _unpack(q, rows, B, N).transpose(1, 2), _unpack(k, rows, B, N).transpose(1, 2)
        q, k, v = self.attn.qkv(self.norm1(x)).view(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        if mask is None and key_bias is None:  # dense rows (every block before a ragged selection): plain SDPA
            out = sdpa_heads(q, k, v, None)  # (B, N, C)
        else:
            out = multi_head_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_mask=mask,
                                       query_mask=mask, impl=impl, key_bias=key_bias).reshape(B, N, C)
        return x + self.attn.proj(out), q, k

    def attend_packed(self, xs: torch.Tensor, cu: torch.Tensor, max_len: int, key_bias: torch.Tensor | None = None):
        """The attention residual on packed tokens: xs (total, C), cu (B + 1,) int32 -> (xs, q, k), q and k
        (total, H, D); key_bias (total,) float32 or None."""
        C, H = xs.shape[1], self.attn.num_heads
        q, k, v = self.attn.qkv(self.norm1(xs)).view(-1, 3, H, C // H).unbind(1)  # each (total, H, D)
        xs = xs + self.attn.proj(packed_attention(q, k, v, cu, cu, max_len, max_len, key_bias=key_bias).reshape(-1, C))
        return xs, q, k

    def feed_forward_packed(self, xs: torch.Tensor) -> torch.Tensor:
        """xs (total, C) packed tokens -> xs + MLP(norm2(xs))."""
        return xs + self.mlp(self.norm2(xs))

    def feed_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, impl: str = "sdpa") -> torch.Tensor:
        """x (B, N, C) -> x + MLP(norm2(x)); packed over the valid tokens for ragged rows with varlen."""
        if impl == "varlen" and mask is not None:
            B, N, C = x.shape
            rows = packing(mask, B, N, x.device)[0]  # the stage's packing, shared with attend (no host read)
            xs = x.reshape(B * N, C).index_select(0, rows)
            return _unpack(self.feed_forward_packed(xs), rows, B, N)
        return x + self.mlp(self.norm2(x))


@dataclass
class VisionFeatures:
    """tokens: ``(B, N', C)`` final tokens after ``norm`` ([CLS] first; kept patches; fused tokens).
    mask: ``(B, N')`` bool valid tokens, or None when every row is full.
    selections: one ``SelectionRecord`` per selection step (scores and kept positions, for PTM).
    sizes: ``(B, N')`` float32 patches each token stands for (tome), or None."""

    tokens: torch.Tensor
    mask: torch.Tensor | None = None
    selections: list[SelectionRecord] = field(default_factory=list)
    sizes: torch.Tensor | None = None

    def rows(self, rows: slice) -> "VisionFeatures":
        """These features for a slice of the images (views)."""
        return VisionFeatures(
            self.tokens[rows], None if self.mask is None else self.mask[rows],
            [SelectionRecord(r.layer, r.scores[rows], r.positions[rows], r.kept_positions[rows], r.num_kept[rows])
             for r in self.selections], None if self.sizes is None else self.sizes[rows])


class BusViT(nn.Module):
    """ViT image encoder with in-backbone token selection.

    Args:
        vision: sizes. selection: policy, layers, keep ratios. text_width: width of the text [CLS]
            query (bus/elip); a learned ``text_query_proj`` maps it to the ViT width when it differs.
        attn_impl: ``"sdpa"`` or ``"varlen"``. kernel_backend: bus_kernels backend for the pruning ops.
    """

    def __init__(
        self,
        vision: VisionConfig,
        selection: SelectionConfig | None = None,
        text_width: int | None = None,
        attn_impl: str = "sdpa",
        kernel_backend: str | None = None,
    ):
        super().__init__()
        self.vision_config = vision
        self.selection = selection or SelectionConfig(policy="none")
        self.attn_impl = attn_impl
        self.kernel_backend = kernel_backend
        self.num_patches = (vision.image_size // vision.patch_size) ** 2
        self.patch_embed = PatchEmbed(vision)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, vision.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, vision.width))
        self.blocks = nn.ModuleList(Block(vision) for _ in range(vision.depth))
        # (1, num_patches) original patch ids, built once (not saved: checkpoints hold weights only)
        self.register_buffer("patch_ids", torch.arange(self.num_patches)[None], persistent=False)
        self.norm = nn.LayerNorm(vision.width, eps=vision.layer_norm_eps)
        self.text_width = text_width
        widths_differ = bool(text_width) and text_width != vision.width
        if self.selection.policy == "elip" and widths_differ:
            raise ValueError(
                f"policy 'elip' mixes the text [CLS] into the visual query without parameters: the text width "
                f"({text_width}) must equal the ViT width ({vision.width}); use policy 'bus' (learned mapping) or 'evit'"
            )
        self.text_query_proj = (
            nn.Linear(text_width, vision.width) if self.selection.policy == "bus" and widths_differ else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                std = self.vision_config.initializer_range  # timm: 0.02, truncated at +-2 (absolute, as timm)
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------------------
    def _check_inputs(self, images: torch.Tensor, text_query: torch.Tensor | None) -> None:
        cfg = self.vision_config
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point, got {images.dtype}")
        if images.shape[1] != cfg.in_chans:
            raise ValueError(f"images have {images.shape[1]} channels, this model expects {cfg.in_chans}")
        if images.shape[2] != cfg.image_size or images.shape[3] != cfg.image_size:
            raise ValueError(
                f"images are {images.shape[2]}x{images.shape[3]} px, this model expects {cfg.image_size}x{cfg.image_size}"
            )
        if text_query is not None:
            width = self.text_width or cfg.width
            if not isinstance(text_query, torch.Tensor) or text_query.shape != (images.shape[0], width):
                got = tuple(text_query.shape) if isinstance(text_query, torch.Tensor) else type(text_query).__name__
                raise ValueError(f"text_query must have shape (B, {width}) = ({images.shape[0]}, {width}), got {got}")

    def _text_in_vision_width(self, text_query: torch.Tensor | None) -> torch.Tensor | None:
        if text_query is None or self.text_query_proj is None:
            return text_query
        return self.text_query_proj(text_query)

    def _keep(self, i: int, scores: torch.Tensor, mask: torch.Tensor | None) -> int | torch.Tensor:
        s = self.selection
        ratio = s.keep_ratios[s.layers.index(i)]
        if s.keep_mode == "mass":
            return mass_keep(scores, mask, s.keep_mass, s.min_keep_ratio, ratio)
        return self._keep_count(i, scores.shape[1])

    def _keep_count(self, i: int, num_candidates: int) -> int:
        """Fixed keep count at block i, by the configured policy's rule (``keep_rule``: "auto" -> elip keeps
        int(ratio * original patches), the others round(ratio * candidates))."""
        s = self.selection
        ratio_of, rounding = keep_rule(s.policy, s.ratio_of, s.keep_rounding)
        return keep_count(s.keep_ratios[s.layers.index(i)], num_candidates, self.num_patches, ratio_of, rounding)

    def _lookahead_end(self, i: int) -> int:
        """One past the last block of the ELIP look-ahead that starts at block i."""
        s = self.selection
        if s.lookahead:
            return i + s.lookahead[s.layers.index(i)]
        later = [j for j in s.layers if j > i]
        return later[0] if later else len(self.blocks)

    def _merge_count(self, i: int, num_candidates: int) -> int:
        s = self.selection
        if s.tome_r:
            return s.tome_r
        return num_candidates - self._keep_count(i, num_candidates)

    def effective_policy(self, policy: str, has_text: bool) -> str:
        """The policy that runs: a text-guided one without a caption follows ``selection.text_free``
        (``"evit"``; elip then looks ahead with the visual [CLS] alone) or prunes nothing (``"none"``);
        ``random`` drops nothing in eval mode unless ``selection.random_at_eval``."""
        if policy not in POLICY_INFO:
            raise ValueError(f"policy must be one of {tuple(POLICY_INFO)}, got {policy!r}")
        if POLICY_INFO[policy].uses_text and not has_text:
            fallback = text_free_mode(policy, self.selection.text_free)
            return "none" if fallback == "none" else ("elip" if policy == "elip" else "evit")
        if policy == "random" and not self.training and not self.selection.random_at_eval:
            return "none"
        return policy

    def forward_features(
        self, images: torch.Tensor, text_query: torch.Tensor | None = None, policy: str | None = None,
        *, detach_scores: bool = False,
    ) -> VisionFeatures:
        """Encode images, selecting tokens as configured.

        Args:
            images: ``(B, in_chans, image_size, image_size)`` floating.
            text_query: ``(B, text_width)`` text [CLS] embedding for bus/elip; None: text-free (what a
                policy then does is ``selection.text_free``: bus -> EViT image [CLS], elip -> nothing).
            policy: override the configured policy for this call (e.g. ``"none"``).
            detach_scores: bus: fuse the dropped tokens with detached scores (no gradient from the tokens
                into the selector; ``SelectionRecord.scores`` stays differentiable for PTM).

        Returns:
            ``VisionFeatures(tokens (B, N', C), mask (B, N') bool or None, selections, sizes)``.
        """
        self._check_inputs(images, text_query)
        policy = self.effective_policy(policy or self.selection.policy, text_query is not None)
        text_query = self._text_in_vision_width(text_query)
        return self._blocks_from(self._embed(images), 0, policy, text_query, detach_scores)

    def forward_features_and_text_free(
        self, images: torch.Tensor, text_query: torch.Tensor, *, detach_scores: bool = False
    ) -> tuple[VisionFeatures, VisionFeatures]:
        """The caption-guided features and the caption-free ones (what retrieval encodes), with the blocks
        before the first selection layer run once for both: ``(guided, text_free)``, each as
        ``forward_features`` returns. ``text_query``: ``(B, text_width)``."""
        self._check_inputs(images, text_query)
        guided = self.effective_policy(self.selection.policy, True)
        free = self.effective_policy(self.selection.policy, False)
        text_query = self._text_in_vision_width(text_query)
        first = min(self.selection.layers) if self.selection.layers and guided != "none" else len(self.blocks)
        x = self._embed(images)
        for block in self.blocks[:first]:  # no selection before ``first``: every row full, no mask
            x = block.feed_forward(block.attend(x, None, self.attn_impl)[0], None, self.attn_impl)
        if (guided, free) == ("bus", "evit") and not detach_scores:
            # one pass over both row sets stacked (2B rows): the same blocks, the same keep rule, only the query
            # differs (caption / image [CLS]); the same math as two passes with half the dispatched ops (issue 22)
            B = x.shape[0]
            both = self._blocks_from(torch.cat([x, x]), first, guided, text_query, detach_scores, free_rows=B)
            return both.rows(slice(0, B)), both.rows(slice(B, 2 * B))
        return (self._blocks_from(x, first, guided, text_query, detach_scores),
                self._blocks_from(x, first, free, None, False))

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, 1 + num_patches, C): [CLS] + patch embeddings + positions."""
        B = images.shape[0]
        x = self.patch_embed(images)  # (B, num_patches, C)
        return torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed

    def _blocks_from(self, x: torch.Tensor, start: int, policy: str, text_query: torch.Tensor | None,
                     detach_scores: bool, free_rows: int = 0) -> VisionFeatures:
        """Blocks ``start..depth-1`` on full rows ``x (B, N, C)`` (no selection has run yet), then ``norm``.
        ``free_rows``: bus only: the last ``free_rows`` rows select with their image [CLS] (EViT, the
        text-free fallback) and ``text_query`` covers the others."""
        B = x.shape[0]
        mask = None
        size = None  # tome: (B, N) float32 patches per token
        positions = self.patch_ids.expand(B, -1)  # (B, n) original patch ids
        records: list[SelectionRecord] = []
        layers = set(self.selection.layers) if policy != "none" else set()
        fuse, backend = self.selection.fuse, self.kernel_backend
        packed = None  # (rows, xs (total, C)): x's valid tokens while a ragged stage runs packed
        for i in range(start, len(self.blocks)):
            block = self.blocks[i]
            if self.attn_impl == "varlen" and mask is not None and size is None and i not in layers:
                # Ragged rows between two selection steps stay packed: gathered once per stage, not per block.
                rows, cu, max_len = packing(mask, B, x.shape[1], x.device)  # cached for this mask
                xs = x.reshape(-1, x.shape[2]).index_select(0, rows) if packed is None else packed[1]
                xs = block.feed_forward_packed(block.attend_packed(xs, cu, max_len)[0])
                packed = (rows, xs)
                continue
            if packed is not None:  # the stage ends: back to (B, N, C), zeros at padding
                x, packed = _unpack(packed[1], packed[0], B, x.shape[1]), None
            if i in layers and policy in ("elip", "random"):  # before the block (random at 0: the patch embedding)
                if policy == "elip":
                    scores = elip_lookahead_scores(
                        self.blocks[i : self._lookahead_end(i)], x, mask, text_query,
                        self.selection.elip_visual_weight, self.attn_impl, backend,
                    )
                else:
                    scores = random_keep_scores(x)  # FLIP: drop, never fuse
                keep = self._keep(i, scores, mask)
                x, mask, positions, rec = apply_selection(
                    x, mask, positions, scores, keep, fuse=fuse and policy == "elip", backend=backend, layer=i
                )
                records.append(rec)
            x, q, k = block.attend(x, mask, self.attn_impl, None if size is None else size.log())
            if i in layers and policy in ("bus", "evit"):
                if policy == "bus":
                    query = block.attn.project_query(block.norm1(text_query))  # TSPS: text [CLS] query
                    if free_rows:
                        query = torch.cat([query, q[-free_rows:, :, 0]])  # the stacked caption-free rows: EViT
                else:
                    query = q[:, :, 0]  # EViT: the image [CLS] query of this layer, (B, H, D)
                cand_mask = None if mask is None else mask[:, 1:]
                scores = score_candidates(query, k[:, :, 1:].transpose(1, 2), cand_mask, backend)  # keys (B, n, H, D)
                keep = self._keep(i, scores, mask)
                if detach_scores and policy == "bus":  # ELIP's rule: no loss steers the selection through the
                    # fused token's weights; the record keeps the live scores, so PTM still trains the selector
                    x, mask, positions, rec = apply_selection(x, mask, positions, scores.detach(), keep, fuse=fuse,
                                                              backend=backend, layer=i)
                    rec.scores = scores
                else:
                    x, mask, positions, rec = apply_selection(x, mask, positions, scores, keep, fuse=fuse,
                                                              backend=backend, layer=i)
                records.append(rec)
            elif i in layers and policy == "tome":  # between attention and MLP (ToMe §3)
                r = self._merge_count(i, x.shape[1] - 1)
                x, size, positions, rec = merge_step(x, size, positions, k.transpose(1, 2), r, i)
                records.append(rec)
            x = block.feed_forward(x, mask, self.attn_impl)
        if packed is not None:
            x = _unpack(packed[1], packed[0], B, x.shape[1])
        return VisionFeatures(self.norm(x), mask, records, size)

    def forward(self, images: torch.Tensor, text_query: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C_in, H, W) -> final tokens (B, N', C)."""
        return self.forward_features(images, text_query).tokens

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_timm(cls, model_or_checkpoint_path, policy: str = "none", **prune_options) -> "BusViT":
        """Build a BusViT with the architecture and weights of a timm ``VisionTransformer``.

        Args:
            model_or_checkpoint_path: a timm ``VisionTransformer`` instance, or the path of a
                ``.safetensors`` file (or a ``.pth``/``.bin`` state dict, read with ``weights_only=True``).
            policy: one of ``bus_model.selection.POLICIES`` ("bus", "elip", "evit", "random", "tome", "none").
            **prune_options: other ``SelectionConfig`` fields (``layers``, ``keep_ratios``, ``keep_mode``...),
                plus ``num_heads`` (a checkpoint does not record it; default width // 64), ``text_width``,
                ``attn_impl`` and ``kernel_backend``.

        Returns:
            The model; the timm classifier head (``head.*``, ``fc_norm.*``) is not part of it.
        """
        options = dict(prune_options)
        text_width = options.pop("text_width", None)
        attn_impl = options.pop("attn_impl", "sdpa")
        kernel_backend = options.pop("kernel_backend", None)
        num_heads = options.pop("num_heads", None)
        if isinstance(model_or_checkpoint_path, nn.Module):
            state, vision = vision_config_from_timm_module(model_or_checkpoint_path)
        elif isinstance(model_or_checkpoint_path, (str, os.PathLike)):
            state = read_state_dict(model_or_checkpoint_path)
            vision = vision_config_from_state(state, num_heads)
        else:
            raise TypeError(
                "model_or_checkpoint_path must be a timm VisionTransformer or a checkpoint path, "
                f"got {type(model_or_checkpoint_path).__name__}"
            )
        if num_heads is not None:
            vision = dataclasses.replace(vision, num_heads=num_heads)
        known = {f.name for f in dataclasses.fields(SelectionConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown prune option(s) {unknown}; known: {sorted(known)}")
        if "layers" in options:
            options["layers"] = tuple(options["layers"])
        if "keep_ratios" in options:
            options["keep_ratios"] = tuple(options["keep_ratios"])
        selection = SelectionConfig(policy=policy, **options)
        _validate_selection(vision, selection)
        model = cls(vision, selection, text_width=text_width, attn_impl=attn_impl, kernel_backend=kernel_backend)
        model.load_timm_state_dict(state)
        return model

    def load_timm_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load timm-named tensors; every ViT tensor must be present with the right shape."""
        own = self.state_dict()
        expected = [k for k in own if not k.startswith("text_query_proj.")]
        missing = [k for k in expected if k not in state]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} ViT tensor(s), e.g. {missing[:5]}")
        for k in expected:
            if tuple(state[k].shape) != tuple(own[k].shape):
                raise ValueError(f"checkpoint tensor {k} has shape {tuple(state[k].shape)}, model expects {tuple(own[k].shape)}")
        self.load_state_dict({k: state[k] for k in expected}, strict=False)


def _validate_selection(vision: VisionConfig, selection: SelectionConfig) -> None:
    from .config import BusConfig, PadConfig

    BusConfig(vision=vision, selection=selection, pad=PadConfig(enabled=False)).validate()
