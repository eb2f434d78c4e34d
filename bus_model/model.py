"""``BusModel``: the BUS vision-language model (arXiv 2307.08504 §3) and its baseline twin.

image -> ``BusViT`` (TSPS selection inside, guided by the caption's [CLS]) -> PAD summary;
text -> BERT text encoder; fusion encoder (text x [image CLS + summary]) -> ITM / MLM heads;
decoder (causal, cross-attending to the same memory) -> PrefixLM / captions; ITC on the two [CLS].
The baseline (``pad.enabled=False``, ``selection.policy="none"``) feeds every ViT token to the fusion
encoder and decoder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import is_concrete, varlen_available
from .packing import prepack
from .config import BusConfig
from .decoder import LMHead, TextDecoder
from .fusion import FusionEncoder
from .losses import (
    itc_logits,
    itc_loss,
    itc_scale,
    itm_loss,
    mask_tokens,
    masked_mean_cross_entropy,
    mine_hard_negatives,
    prefix_lm_targets,
    ptm_loss,
    random_prefix_lengths,
    temperature_to_logit_scale,
    weighted_total,
)
from .momentum import FeatureQueue, MomentumModel, distilled_mlm_loss, ramped_alpha, soft_itc_loss
from .pad import PatchAbstractionDecoder
from .selection import POLICY_INFO, SelectionRecord
from .text import TextEncoder, fuse_attention_keys, padding_mask, read_hf_state_dict, shifted_padding_mask, stacked_padding_mask
from .vision import BusViT, VisionFeatures

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class BusOutput:
    """loss: () weighted sum of the enabled losses. losses: name -> () each loss, unweighted.
    image_feat, text_feat: (B, E) normalised ITC embeddings. sim_i2t: (B, B) ITC logits (or None).
    memory: (B, M, Cv) what the fusion encoder and decoder attended to; memory_mask (B, M) bool or None.
    selections: the ViT's selection steps (scores, kept positions)."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    image_feat: torch.Tensor
    text_feat: torch.Tensor
    sim_i2t: torch.Tensor | None
    memory: torch.Tensor
    memory_mask: torch.Tensor | None
    selections: list[SelectionRecord] = field(default_factory=list)


@dataclass
class ImageEncoding:
    """embedding (B, E) normalised; memory (B, M, Cv) for fusion/decoder; memory_mask (B, M) bool or None."""

    embedding: torch.Tensor
    memory: torch.Tensor
    memory_mask: torch.Tensor | None
    features: VisionFeatures


@dataclass
class TextEncoding:
    """embedding (B, E) normalised; hidden (B, L, C) text-encoder states; mask (B, L) bool or None."""

    embedding: torch.Tensor
    hidden: torch.Tensor
    mask: torch.Tensor | None


def _stack_rows(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Tensors (B_i, ...) -> one (sum B_i, ...) tensor; None when every part is None (no mask).
    Masks are all None or all tensors here: the same mask source feeds every group of a stack."""
    if parts[0] is None:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class BusModel(nn.Module):
    # True: also check the values of input_ids (within the vocabulary) and attention_mask (0/1, [CLS] kept)
    # on every call, at the cost of one host read (a GPU sync) each. Off by default: a training step then
    # never waits for the GPU; the data pipeline's tokenizer produces valid ids and masks.
    check_input_values: bool = False

    def __init__(self, config: BusConfig):
        super().__init__()
        if not isinstance(config, BusConfig):
            raise TypeError(f"config must be a BusConfig, got {type(config).__name__}")
        config.validate()
        if config.attn_impl == "varlen" and not varlen_available():
            raise RuntimeError("attn_impl='varlen' needs bus_kernels.varlen_attention, which is not available here")
        self.config = config
        v, t, impl = config.vision, config.text, config.attn_impl
        self.text_encoder = TextEncoder(t, impl)
        self.vision = BusViT(v, config.selection, text_width=t.hidden_size, attn_impl=impl,
                             kernel_backend=config.kernel_backend)
        self.pad = (
            PatchAbstractionDecoder(config.pad, v.width, v.num_heads, v.layer_norm_eps, impl) if config.pad.enabled else None
        )
        self.fusion = FusionEncoder(t, config.fusion_layers, v.width, impl)
        self.decoder = TextDecoder(t, config.decoder_layers, v.width, impl) if config.decoder_layers > 0 else None
        lc = config.losses
        self.vision_proj = nn.Linear(v.width, lc.embed_dim)
        self.text_proj = nn.Linear(t.hidden_size, lc.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(temperature_to_logit_scale(lc.temperature)))
        self.itm_head = nn.Linear(t.hidden_size, 2) if lc.itm else None
        self.mlm_head = LMHead(t) if lc.mlm else None
        if lc.prefix_lm and self.decoder is None:
            raise ValueError("losses.prefix_lm needs a decoder: set decoder_layers >= 1")
        self._init_text_side()
        # ALBEF momentum distillation (momentum.py): EMA towers + ITC feature queues, all in the state dict
        self.momentum_model = MomentumModel(self, lc.momentum) if lc.momentum_distill else None
        self.itc_queue = FeatureQueue(lc.queue_size, lc.embed_dim) if lc.momentum_distill and lc.itc else None

    def _init_text_side(self) -> None:
        """BERT initialisation (normal, std ``text.initializer_range``: 0.02 as BERT) outside the ViT."""
        std = self.config.text.initializer_range
        for name, module in self.named_modules():
            if name.startswith("vision"):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------------------------------- checks
    def _check_text(self, input_ids, attention_mask, batch: int | None = None) -> None:
        t = self.config.text
        for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
            if value.dim() != 2:
                raise ValueError(f"{name} must have shape (B, L), got {tuple(value.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64 (or int32), got {input_ids.dtype}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids shape {tuple(input_ids.shape)}"
            )
        if batch is not None and input_ids.shape[0] != batch:
            raise ValueError(f"input_ids has batch {input_ids.shape[0]} but images has batch {batch}")
        if input_ids.shape[1] > t.max_position_embeddings:
            raise ValueError(f"input_ids length {input_ids.shape[1]} exceeds max_position_embeddings {t.max_position_embeddings}")
        if input_ids.shape[1] < 2:
            raise ValueError("input_ids needs at least 2 tokens ([CLS] and one more)")
        # Value checks read the device (a host sync that stalls the GPU queue): opt-in, see check_input_values.
        if self.check_input_values and is_concrete(input_ids) and is_concrete(attention_mask) and input_ids.numel():
            stats = torch.stack([input_ids.min().long(), input_ids.max().long(),
                                 ((attention_mask != 0) & (attention_mask != 1)).any().long(),
                                 (attention_mask[:, 0] == 0).any().long()])
            lo, hi, not_binary, no_cls = stats.tolist()  # one host read
            if lo < 0 or hi >= t.vocab_size:
                raise ValueError(f"input_ids must be in [0, {t.vocab_size}) (vocab_size), got values in [{lo}, {hi}]")
            if not_binary:
                raise ValueError("attention_mask must contain only 0 and 1")
            if no_cls:
                raise ValueError("attention_mask must be 1 at position 0 ([CLS]) of every row (right padding)")

    # -------------------------------------------------------------------------------------- encoders
    def _visual_memory(self, feats: VisionFeatures, pad: nn.Module | None = None):
        """[image CLS + PAD summary] (BUS) or every ViT token (baseline) -> (memory (B, M, C), mask or None).
        ``pad``: the PAD to use (the momentum model's), default this model's."""
        pad = self.pad if pad is None else pad
        if pad is None:
            return feats.tokens, feats.mask
        summary = pad(feats.tokens, feats.mask)  # (B, num_queries, C)
        return torch.cat([feats.tokens[:, :1], summary], dim=1), None

    def _image_embedding(self, feats: VisionFeatures) -> torch.Tensor:
        return F.normalize(self.vision_proj(feats.tokens[:, 0]).float(), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEncoding:
        """input_ids (B, L) int64, attention_mask (B, L) 0/1 -> TextEncoding."""
        self._check_text(input_ids, attention_mask)
        return self._text_encoding(self.text_encoder(input_ids, attention_mask), attention_mask)

    def _text_encoding(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> TextEncoding:
        emb = F.normalize(self.text_proj(hidden[:, 0]).float(), dim=-1)
        return TextEncoding(emb, hidden, padding_mask(attention_mask))

    def encode_image(self, images: torch.Tensor, text_cls: torch.Tensor | None = None) -> ImageEncoding:
        """images (B, C, H, W) -> ImageEncoding. Text-free by default (bus selects with the image [CLS],
        as EViT does): use it to index images for retrieval. ``text_cls (B, hidden)`` guides TSPS."""
        return self._image_encoding(self.vision.forward_features(images, text_cls))

    def _image_encoding(self, feats: VisionFeatures) -> ImageEncoding:
        return ImageEncoding(self._image_embedding(feats), *self._visual_memory(feats), feats)

    def _uses_text_query(self) -> bool:
        return POLICY_INFO[self.config.selection.policy].uses_text

    @torch.no_grad()
    def _momentum_features(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """The momentum model's (image feat (B, E), text feat (B, E), memory, memory mask). Its ViT never sees
        the caption (the policy's text-free behaviour): its features go into the queue (momentum.py)."""
        mm = self.momentum_model
        hidden = mm.text_encoder(input_ids, attention_mask)
        text_feat = F.normalize(mm.text_proj(hidden[:, 0]).float(), dim=-1)
        feats = mm.vision.forward_features(images)
        image_feat = F.normalize(mm.vision_proj(feats.tokens[:, 0]).float(), dim=-1)
        memory, memory_mask = self._visual_memory(feats, getattr(mm, "pad", None) if self.pad is not None else None)
        return image_feat, text_feat, memory, memory_mask

    def _fused_cls(self, text: TextEncoding, memory, memory_mask) -> torch.Tensor:
        return self.fusion(text.hidden, text.mask, memory, memory_mask)[:, 0]

    @torch.no_grad()
    def itm_score(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Probability that image b matches caption b: images (B, C, H, W), input_ids/attention_mask (B, L)
        -> (B,) float32. The caption guides the token selection (BUS TSPS), as in training."""
        if self.itm_head is None:
            raise RuntimeError("this model has no ITM head (config.losses.itm is False)")
        self._check_text(input_ids, attention_mask, images.shape[0] if isinstance(images, torch.Tensor) else None)
        text = self.encode_text(input_ids, attention_mask)
        image = self.encode_image(images, text.hidden[:, 0] if self._uses_text_query() else None)
        logits = self.itm_head(self._fused_cls(text, image.memory, image.memory_mask))
        return logits.float().softmax(-1)[:, 1]

    @torch.no_grad()
    def generate(
        self, images: torch.Tensor, *, max_length: int = 20, num_beams: int = 1, length_penalty: float = 1.0
    ) -> torch.Tensor:
        """Caption images (B, C, H, W) -> token ids (B, <= max_length) int64: [CLS] first, [SEP] ends,
        [PAD] after. ``num_beams=1`` greedy, else beam search."""
        if self.decoder is None:
            raise RuntimeError("this model has no decoder (config.decoder_layers is 0)")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
        image = self.encode_image(images)
        t = self.config.text
        return self.decoder.generate(
            image.memory, image.memory_mask, max_length=max_length, num_beams=num_beams,
            bos_token_id=t.cls_token_id, eos_token_id=t.sep_token_id, pad_token_id=t.pad_token_id,
            length_penalty=length_penalty,
        )

    # --------------------------------------------------------------------------------------- training
    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        patch_labels: torch.Tensor | None = None,
    ) -> BusOutput:
        """One pre-training step's losses.

        Args:
            images: ``(B, in_chans, image_size, image_size)`` floating.
            input_ids: ``(B, L)`` int64 BERT ids, [CLS] first, [SEP] last, right-padded with [PAD].
            attention_mask: ``(B, L)`` 0/1, 1 at real tokens.
            patch_labels: ``(B, num_patches)`` float relevance in [0, 1] per patch (row-major grid) for PTM;
                a row with a negative value has no labels; None: PTM skipped.

        Returns:
            ``BusOutput``; ``losses`` holds each enabled loss that applies to this batch.
        """
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        B = images.shape[0] if images.dim() == 4 else None
        self._check_text(input_ids, attention_mask, B)
        if self.config.attn_impl == "varlen":  # the text masks' packed sizes in one host read (packing.py)
            prepack(padding_mask(attention_mask), shifted_padding_mask(attention_mask))
        if patch_labels is not None:
            n = self.vision.num_patches
            if not isinstance(patch_labels, torch.Tensor) or tuple(patch_labels.shape) != (input_ids.shape[0], n):
                got = tuple(patch_labels.shape) if isinstance(patch_labels, torch.Tensor) else type(patch_labels).__name__
                raise ValueError(f"patch_labels must have shape (B, num_patches) = ({input_ids.shape[0]}, {n}), got {got}")
        lc = self.config.losses
        B = input_ids.shape[0]
        if lc.mlm:
            # one text-encoder pass over the clean and the masked captions stacked (2B, L): the same math as
            # two passes, half the dispatched ops (issue 22)
            masked, positions, labels = mask_tokens(input_ids, attention_mask, self.config.text, lc.mlm_probability)
            both = self.text_encoder(torch.cat([input_ids, masked]), stacked_padding_mask(attention_mask, 2))
            text, masked_hidden = self._text_encoding(both[:B], attention_mask), both[B:]
        else:
            text = self._text_encoding(self.text_encoder(input_ids, attention_mask), attention_mask)
        t_cls = text.hidden[:, 0]
        itc_image = lc.itc_image if self._uses_text_query() and (lc.itc or lc.itm) else "guided"
        if itc_image == "text_free":  # ITC (and ITM's mining) reads a caption-free pass, as retrieval does
            feats, free = self.vision.forward_features_and_text_free(images, t_cls)
            image = ImageEncoding(self._image_embedding(free), *self._visual_memory(feats), feats)
        else:  # "detached": the selector's scores reach the tokens without gradient (ELIP)
            image = self._image_encoding(self.vision.forward_features(
                images, t_cls if self._uses_text_query() else None, detach_scores=itc_image == "detached"))
        memory, memory_mask = image.memory, image.memory_mask
        losses: dict[str, torch.Tensor] = {}
        sim = None
        distill = self.momentum_model is not None and (lc.itc or lc.mlm)
        if distill:
            mm = self.momentum_model
            alpha = ramped_alpha(lc.distill_alpha, mm.step, lc.alpha_ramp_steps)  # from the steps before this one
            if self.training and mm.update_in_forward:
                mm.update(self)  # EMA with this step's weights, then the momentum features (ALBEF's order)
            image_m, text_m, memory_m, memory_mask_m = self._momentum_features(images, input_ids, attention_mask)
        if lc.itc and distill:
            queue = self.itc_queue
            image_all, text_all = torch.cat([image_m, queue.image]), torch.cat([text_m, queue.text])  # (B + K, E)
            losses["itc"] = soft_itc_loss(image.embedding, text.embedding, image_all, text_all, image_m, text_m,
                                          itc_scale(self.logit_scale), alpha)
            sim = itc_logits(image.embedding, text.embedding, self.logit_scale)  # in-batch: ITM negatives, output
            if self.training:
                queue.enqueue(image_m, text_m)
        elif lc.itc:
            losses["itc"], sim = itc_loss(image.embedding, text.embedding, self.logit_scale)
        # one fusion pass over the ITM triplet and the MLM rows stacked (up to 4B rows): the same layers on the
        # same kinds of input, so one pass gives what two would, with half the dispatched ops (issue 22)
        rows: list[tuple] = []  # (text states, text mask, memory, memory mask) per stacked group
        if lc.itm:
            if B < 2:
                raise ValueError("the ITM loss mines negatives inside the batch: batch size must be >= 2")
            if sim is None:
                sim = itc_logits(image.embedding, text.embedding, self.logit_scale)
            neg_text, neg_image = mine_hard_negatives(sim.detach(), lc.itm_negatives, lc.itm_random_share)
            t_mask_neg = None if text.mask is None else text.mask[neg_text]
            m_mask_neg = None if memory_mask is None else memory_mask[neg_image]
            rows += [(text.hidden, text.mask, memory, memory_mask),  # positive pairs
                     (text.hidden, text.mask, memory[neg_image], m_mask_neg),  # each text with a hard negative image
                     (text.hidden[neg_text], t_mask_neg, memory, memory_mask)]  # each image with a hard negative text
        if lc.mlm:
            rows.append((masked_hidden, text.mask, memory, memory_mask))
        if rows:
            fused = self.fusion(*(_stack_rows([r[j] for r in rows]) for j in range(4)))  # (len(rows) * B, L, C)
        if lc.itm:
            losses["itm"] = itm_loss(self.itm_head(fused[: 3 * B, 0]), B)
        if lc.mlm:
            fused_mlm = fused[-B:]  # (B, L, C)
            picked = fused_mlm.gather(1, positions[:, :, None].expand(-1, -1, fused_mlm.shape[-1]))  # (B, K, C)
            logits = self.mlm_head(picked, self.text_encoder.embeddings.word_embeddings.weight)  # (B, K, V)
            if distill:
                with torch.no_grad():
                    hidden_m = mm.text_encoder(masked, attention_mask)
                    fused_m = mm.fusion(hidden_m, text.mask, memory_m, memory_mask_m)
                    picked_m = fused_m.gather(1, positions[:, :, None].expand(-1, -1, fused_m.shape[-1]))
                    logits_m = mm.mlm_head(picked_m, mm.text_encoder.embeddings.word_embeddings.weight)
                losses["mlm"] = distilled_mlm_loss(logits.flatten(0, 1), labels.flatten(), logits_m.flatten(0, 1), alpha)
            else:
                losses["mlm"] = masked_mean_cross_entropy(logits.flatten(0, 1), labels.flatten())
        if lc.prefix_lm and lc.prefix_split == "random":
            # SimVLM/mPLUG PrefixLM: a random prefix is decoder context, the loss is on the remainder
            targets = prefix_lm_targets(input_ids, attention_mask, random_prefix_lengths(attention_mask))
            logits = self.decoder(input_ids[:, :-1], shifted_padding_mask(attention_mask), memory, memory_mask)
            losses["prefix_lm"] = masked_mean_cross_entropy(logits.flatten(0, 1), targets.flatten())
        elif lc.prefix_lm:
            losses["prefix_lm"] = self.decoder.loss(input_ids, attention_mask, memory, memory_mask)
        records = image.features.selections
        if lc.ptm and patch_labels is not None and any(r.scores.requires_grad for r in records):
            losses["ptm"] = ptm_loss(records, patch_labels)
        return BusOutput(
            loss=weighted_total(losses, lc), losses=losses, image_feat=image.embedding, text_feat=text.embedding,
            sim_i2t=sim, memory=memory, memory_mask=memory_mask, selections=records,
        )

    # ------------------------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` (no pickle) into ``directory``."""
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt", "bus_model": self.config.name})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **overrides) -> "BusModel":
        """Load a model written by ``save_pretrained`` (``overrides`` as in ``create_model``)."""
        from safetensors.torch import load_file

        from .config import merge_overrides

        path = Path(directory)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{str(path)!r} must contain {CONFIG_FILE} and {WEIGHTS_FILE}")
        data = merge_overrides(json.loads((path / CONFIG_FILE).read_text()), overrides)
        model = cls(BusConfig.from_dict(data))
        model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
        return model

    def load_text_weights(self, directory: str | os.PathLike) -> dict[str, list[str]]:
        """Initialise the text side from a local HF BERT directory (safetensors).

        Layers ``0 .. text.num_layers-1`` go to the text encoder, the next ``fusion_layers`` to the fusion
        encoder's self-attention and FFN (ALBEF's split of BERT-base: 6 + 6); the embeddings go to the
        text encoder (and the decoder's embeddings). Returns ``{"loaded": [...], "ignored": [...]}``
        checkpoint keys.
        """
        state, _ = read_hf_state_dict(directory)
        own = self.state_dict()
        n_text = self.config.text.num_layers
        proposed: dict[str, tuple[str, torch.Tensor]] = {}  # our key (HF's attention names) -> (checkpoint key, tensor)
        for key, value in state.items():
            targets = []
            if key.startswith("embeddings."):
                targets.append(f"text_encoder.{key}")
                if self.decoder is not None:
                    targets.append(f"decoder.{key}")
            elif key.startswith("encoder.layer."):
                idx = int(key.split(".")[2])
                rest = ".".join(key.split(".")[3:])
                if idx < n_text:
                    targets.append(f"text_encoder.encoder.layer.{idx}.{rest}")
                elif idx - n_text < self.config.fusion_layers:
                    targets.append(f"fusion.encoder.layer.{idx - n_text}.{rest}")
            for k in targets:
                proposed[k] = (key, value)
        # HF's separate query/key/value -> our fused qkv (one matmul); a fused key stands for its three parts
        tensors = {k: v for k, (_, v) in proposed.items()}
        sources = {k: [src] for k, (src, _) in proposed.items()}
        for prefix in {k[: -len("query.weight")] for k in proposed if k.endswith("attention.self.query.weight")}:
            fuse_attention_keys(tensors, prefix, cross=False)
            for kind in ("weight", "bias"):
                parts = [f"{prefix}{p}.{kind}" for p in ("query", "key", "value")]
                if f"{prefix}qkv.{kind}" in tensors:
                    sources[f"{prefix}qkv.{kind}"] = [src for n in parts for src in sources.pop(n)]
        mapped: dict[str, torch.Tensor] = {}
        used: set[str] = set()
        for k, value in tensors.items():
            if k not in own:
                continue
            if tuple(own[k].shape) != tuple(value.shape):
                raise ValueError(f"checkpoint tensor(s) {', '.join(sources[k])} give shape {tuple(value.shape)}, "
                                 f"{k} expects {tuple(own[k].shape)}")
            mapped[k] = value
            used.update(sources[k])
        loaded = [key for key in state if key in used]
        ignored = [key for key in state if key not in used]
        needed = [k for k in own if k.startswith("text_encoder.")]
        missing = [k for k in needed if k not in mapped]
        if missing:
            raise ValueError(f"{str(directory)!r} lacks {len(missing)} text-encoder tensor(s), e.g. {missing[:5]}")
        self.load_state_dict(mapped, strict=False)
        return {"loaded": loaded, "ignored": ignored}

