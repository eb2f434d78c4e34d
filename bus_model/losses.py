"""The five pre-training objectives (BUS §3.4; ITC/ITM/MLM as in ALBEF §3, PrefixLM as in SimVLM §3.2).

ITC: symmetric InfoNCE between normalised image and text [CLS] projections, learnable temperature.
ITM: binary matching on the fusion [CLS]; per pair one hard negative image and one hard negative text,
     drawn from the softmax of the ITC similarities (or their argmax), never the positive.
MLM: 15% of the text tokens masked (80% [MASK], 10% random, 10% unchanged), predicted through fusion.
PrefixLM: the decoder's caption loss with the visual summary as prefix (``decoder.TextDecoder.loss``); with
     ``prefix_split="random"`` the caption is split at a random point (SimVLM §3.2, mPLUG): the first part
     is context for the decoder (causal, like the rest), the loss covers the remainder only.
With ``momentum_distill`` ITC and MLM take ALBEF's soft targets from a momentum model (``momentum.py``).
PTM: binary cross-entropy between the selector's patch scores, as logits, and per-patch relevance labels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import LossConfig, TextConfig
from .selection import SelectionRecord


MIN_TEMPERATURE, MAX_TEMPERATURE = 0.001, 0.5  # ALBEF's clamp on the learned temperature


def itc_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """() ``1 / temperature``, the temperature clamped to [0.001, 0.5]."""
    return logit_scale.clamp(math.log(1 / MAX_TEMPERATURE), math.log(1 / MIN_TEMPERATURE)).exp()


def itc_logits(image_feat: torch.Tensor, text_feat: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """(B, E) x (B', E) normalised -> (B, B') similarities / temperature, the temperature clamped to
    [0.001, 0.5]."""
    return itc_scale(logit_scale) * image_feat @ text_feat.t()


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, logit_scale: torch.Tensor):
    """image_feat, text_feat (B, E) L2-normalised, logit_scale () = log(1 / temperature)
    -> (loss (), similarities (B, B) image-to-text logits)."""
    sim = itc_logits(image_feat, text_feat, logit_scale)  # (B, B)
    target = torch.arange(sim.shape[0], device=sim.device)
    loss = 0.5 * (F.cross_entropy(sim.float(), target) + F.cross_entropy(sim.t().float(), target))
    return loss, sim


@torch.no_grad()
def mine_hard_negatives(sim_i2t: torch.Tensor, mode: str, random_share: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """sim_i2t (B, B), B >= 2 -> (negative text per image (B,), negative image per text (B,)) int64.

    ``sample``: draw from softmax over the non-matching entries (Gumbel-max, so it also traces on
    fake/meta tensors); ``hardest``: their argmax. ``random_share``: each image's (and each text's)
    negative is instead drawn uniformly from the non-matching entries with this probability."""
    B = sim_i2t.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=sim_i2t.device)
    logits = sim_i2t.float().masked_fill(eye, float("-inf"))
    rows, cols = logits, logits.t()  # image -> texts, text -> images
    if mode == "sample":
        rows = rows - torch.log(-torch.log(torch.rand_like(rows).clamp_min(1e-20)))
        cols = cols - torch.log(-torch.log(torch.rand_like(cols).clamp_min(1e-20)))
    if random_share > 0:
        # the argmax of uniform noise over the off-diagonal entries is a uniform draw among them
        uniform_rows = torch.rand_like(rows).masked_fill(eye, -1.0)
        uniform_cols = torch.rand_like(cols).masked_fill(eye, -1.0)
        pick = torch.rand_like(rows[:, :2]) < random_share  # (B, 2): rows' and cols' choice per index
        rows = torch.where(pick[:, :1], uniform_rows, rows)
        cols = torch.where(pick[:, 1:], uniform_cols, cols)
    return rows.argmax(dim=1), cols.argmax(dim=1)


def itm_loss(logits: torch.Tensor, num_positive: int) -> torch.Tensor:
    """logits (P + N, 2): the first ``num_positive`` rows are matching pairs (label 1), the rest not."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:num_positive] = 1
    return F.cross_entropy(logits.float(), labels)


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, text: TextConfig, probability: float):
    """BERT masking with a fixed prediction budget per row (BERT's ``max_predictions_per_seq``), so every
    shape is static (the FLOP counter traces it on fake tensors).

    Row b predicts ``n_b = min(m_b, max(1, round(probability * m_b)))`` of its ``m_b`` maskable tokens
    ([CLS], [SEP] and padding never), chosen uniformly; of those 80% become [MASK], 10% a random id,
    10% stay.

    Args: input_ids (B, L) int64, attention_mask (B, L) 0/1.
    Returns: (masked ids (B, L) int64, positions (B, K) int64, labels (B, K) int64 with -100 at unused
        slots), ``K = max(1, ceil(probability * (L - 2)))``.
    """
    B, L = input_ids.shape
    special = (input_ids == text.cls_token_id) | (input_ids == text.sep_token_id) | (input_ids == text.pad_token_id)
    maskable = attention_mask.bool() & ~special
    m = maskable.sum(dim=1)  # (B,)
    n = torch.minimum(m, (probability * m.float()).round().long().clamp_min(1))  # (B,)
    K = max(1, min(L, math.ceil(probability * max(L - 2, 1))))
    draw = torch.rand(B, L, device=input_ids.device).masked_fill(~maskable, -1.0)
    positions = draw.topk(K, dim=1).indices  # (B, K): maskable positions first, in random order
    used = torch.arange(K, device=input_ids.device)[None, :] < n[:, None]  # (B, K)
    originals = input_ids.gather(1, positions)
    labels = originals.masked_fill(~used, -100)
    action = torch.rand(B, K, device=input_ids.device)
    random_ids = torch.randint(0, text.vocab_size, (B, K), device=input_ids.device)
    replaced = torch.where(action < 0.8, torch.full_like(originals, text.mask_token_id), originals)
    replaced = torch.where((action >= 0.8) & (action < 0.9), random_ids, replaced)
    replaced = torch.where(used, replaced, originals)
    return input_ids.scatter(1, positions, replaced), positions, labels


def masked_mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (N, V), labels (N,) with -100 = ignore -> mean CE over the rest (0 when none is left)."""
    per = F.cross_entropy(logits.float(), labels.clamp_min(0), reduction="none")
    valid = (labels != -100).to(per.dtype)
    return (per * valid).sum() / valid.sum().clamp_min(1.0)


def random_prefix_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """PrefixLM split (SimVLM §3.2; mPLUG): per caption of ``n`` real tokens ([CLS] ... [SEP]) a prefix length
    drawn uniformly from ``[1, n - 1]``, so the prefix holds at least [CLS] (the decoder's BOS) and at
    least one token is left to predict. attention_mask (B, L) 0/1 -> (B,) int64."""
    n = attention_mask.sum(dim=1).long()  # (B,)
    draw = torch.rand(n.shape, device=attention_mask.device)
    return 1 + (draw * (n - 1).clamp_min(1).float()).long().clamp_max((n - 2).clamp_min(0))


def prefix_lm_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_len: torch.Tensor | None) -> torch.Tensor:
    """Next-token targets of the decoder input ``input_ids[:, :-1]``: ``(B, L - 1)`` int64, the token at
    position ``t + 1``, or -100 where it is padding or inside the prefix (``t + 1 < prefix_len``: context,
    no loss). ``prefix_len`` None: plain captioning (only [CLS] is context)."""
    targets = input_ids[:, 1:].masked_fill(~attention_mask[:, 1:].bool(), -100)
    if prefix_len is None:
        return targets
    position = torch.arange(1, input_ids.shape[1], device=input_ids.device)[None, :]  # (1, L - 1)
    return targets.masked_fill(position < prefix_len[:, None], -100)


def ptm_loss(records: list[SelectionRecord], patch_labels: torch.Tensor) -> torch.Tensor:
    """Patch-text matching over every selection step.

    records: the ViT's selection steps; ``scores (B, n)`` sum to 1 per row, turned into logits
        ``log(n_valid * score)`` (0 for a patch at the uniform share, positive above it).
    patch_labels: ``(B, num_patches)`` float relevance in [0, 1]; a row with any negative value means
        "no labels for this sample" and is skipped.

    Returns the mean BCE over labelled (sample, original patch) pairs of all steps; 0 (still attached to
    the graph) when nothing is labelled."""
    if not records:
        return patch_labels.new_zeros(())
    # every step at once on the candidates concatenated (B, S): one loss graph instead of one per step
    scores = torch.cat([r.scores for r in records], dim=1)  # (B, S)
    positions = torch.cat([r.positions for r in records], dim=1)  # (B, S)
    with torch.no_grad():  # each step's count of real candidates, spread over that step's columns
        n_valid = torch.cat([(r.positions >= 0).sum(dim=1, keepdim=True).expand(-1, r.positions.shape[1])
                             for r in records], dim=1).clamp_min(1).to(scores.dtype)  # (B, S)
        valid = (positions >= 0) & (patch_labels >= 0).all(dim=1, keepdim=True)  # real patches of labelled samples
        target = patch_labels.gather(1, positions.clamp_min(0)).clamp(0, 1).to(scores.dtype)
    logits = torch.log((scores * n_valid).clamp_min(1e-12))
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * valid).sum() / valid.sum().clamp_min(1)


def weighted_total(losses: dict[str, torch.Tensor], cfg: LossConfig) -> torch.Tensor:
    """Sum of the enabled losses with their configured weights."""
    total = None
    for name, value in losses.items():
        term = getattr(cfg, f"{name}_weight") * value
        total = term if total is None else total + term
    if total is None:
        raise ValueError("every loss is switched off in config.losses; enable at least one")
    return total


def temperature_to_logit_scale(temperature: float) -> float:
    return math.log(1.0 / temperature)
