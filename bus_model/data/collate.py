"""Batching: stack images, tokenise and pad captions, stack PTM patch labels, drop skipped samples.

Every dataset in ``bus_model.data`` yields dicts ``{"image", "caption", "patch_labels", "id"}`` (or a
``SkippedSample`` for a broken real-data sample); ``Collator`` turns a list of those into the batch the
model and losses consume. Samples without patch labels (real data with no boxes) get a row of -1
(``bus_model.losses.ptm_loss`` skips any row with a negative value) and ``has_patch_labels = False``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .decode import SkippedSample
from .transforms import check_image_size


class Collator:
    """``collate_fn`` for a ``torch.utils.data.DataLoader``.

    Args:
        tokenizer: a ``transformers`` tokenizer (``pad_token`` set).
        image_size: S or (H, W) of the images the dataset yields.
        patch_size: p; the patch grid has N = H/p * W/p cells.
        max_length: truncate captions to this many tokens (with [CLS]/[SEP]); None: the tokenizer's
            ``model_max_length``.
        pad_to_max_length: pad every batch's captions to ``max_length`` (which must then be given)
            instead of to the longest caption of the batch: every batch has the same shape, so a
            ``torch.compile``d (CUDA-graph) step never meets a new shape and never recompiles.

    ``collator(items)`` returns a dict, B = number of good samples (possibly 0):
        images: (B, 3, H, W) float32
        input_ids: (B, L) int64, padded with the tokenizer's pad id (L = longest caption in the batch,
            or ``max_length`` with ``pad_to_max_length``)
        attention_mask: (B, L) int64, 1 on real tokens
        patch_labels: (B, N) float32 in [0, 1], row-major patch grid; a row of -1 where the sample has none
        has_patch_labels: (B,) bool
        captions: list of B str; ids: list of B str
        skipped: list of ``SkippedSample`` left out of this batch
    """

    def __init__(self, tokenizer, *, image_size: int | Sequence[int], patch_size: int, max_length: int | None = None,
                 pad_to_max_length: bool = False):
        if not callable(tokenizer) or getattr(tokenizer, "pad_token_id", None) is None:
            raise TypeError("tokenizer must be a transformers tokenizer with a pad token")
        self.image_size = check_image_size(image_size, patch_size)
        self.patch_size = patch_size
        self.num_patches = (self.image_size[0] // patch_size) * (self.image_size[1] // patch_size)
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
            raise ValueError(f"max_length must be an int >= 2 or None, got {max_length!r}")
        if pad_to_max_length and max_length is None:
            raise ValueError("pad_to_max_length needs max_length (the length every batch is padded to)")
        self.tokenizer, self.max_length = tokenizer, max_length
        self.padding = "max_length" if pad_to_max_length else "longest"

    def __call__(self, items: list) -> dict:
        good = [it for it in items if not isinstance(it, SkippedSample)]
        skipped = [it for it in items if isinstance(it, SkippedSample)]
        h, w = self.image_size
        b = len(good)
        images = torch.empty(b, 3, h, w, dtype=torch.float32)
        labels = torch.full((b, self.num_patches), -1.0, dtype=torch.float32)  # -1: no labels (PTM skips)
        has_labels = torch.zeros(b, dtype=torch.bool)
        for i, it in enumerate(good):
            img = it["image"]
            if tuple(img.shape) != (3, h, w):
                raise ValueError(f"sample {it['id']}: image has shape {tuple(img.shape)}, expected (3, {h}, {w}) "
                                 "(the dataset's transform and the collator's image_size disagree)")
            images[i] = img
            if it.get("patch_labels") is not None:
                pl = it["patch_labels"]
                if pl.numel() != self.num_patches:
                    raise ValueError(f"sample {it['id']}: {pl.numel()} patch labels, expected {self.num_patches} "
                                     f"({h}x{w} image, patch {self.patch_size})")
                labels[i] = pl.reshape(-1)
                has_labels[i] = True
        captions = [it["caption"] for it in good]
        if b:
            enc = self.tokenizer(captions, padding=self.padding, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            input_ids, attention_mask = enc["input_ids"].long(), enc["attention_mask"].long()
        else:
            length = self.max_length if self.padding == "max_length" else 0
            input_ids = torch.zeros(0, length, dtype=torch.long)
            attention_mask = torch.zeros(0, length, dtype=torch.long)
        return {
            "images": images,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "patch_labels": labels,
            "has_patch_labels": has_labels,
            "captions": captions,
            "ids": [it["id"] for it in good],
            "skipped": skipped,
        }
