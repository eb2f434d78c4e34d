"""Held-out evaluation of ``bus bench quality`` on named paths, in galleries (issue 24).

Every trained model is ranked on the same held-out pairs along each path, on the same weights:

* ``"unpruned"``: images encoded with no pruning and no caption (every patch): what training alone did;
* ``"deployed"``: images encoded as the policy does without a caption at retrieval time (bus: its
  text-free mode, the EViT fallback by default; random: nothing dropped at evaluation; the baseline: as
  unpruned);
* ``"rerank"``: the top ``k`` of the deployed ITC ranking re-ranked by ITM, whose pass lets the caption guide
  the selection (as in training).

The pairs are split into galleries of ``gallery_size``; R@1 is computed inside each gallery (one caption per
image, both directions) and averaged over the galleries, whose spread gives the standard error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quality_metrics import gallery_recalls

PATHS = ("unpruned", "deployed", "rerank")


@dataclass
class HeldOut:
    """The held-out pairs as tensors: images (N, 3, H, W) float32, input_ids / attention_mask (N, L)."""

    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @classmethod
    def build(cls, dataset, tokenizer, config, batch_size: int = 256) -> "HeldOut":
        from bus_model.data import Collator

        v = config.vision
        collate = Collator(tokenizer, image_size=v.image_size, patch_size=v.patch_size, max_length=config.max_text_len)
        parts = [collate([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])
                 for s in range(0, len(dataset), batch_size)]
        width = max(p["input_ids"].shape[1] for p in parts)

        def padded(key):
            return torch.cat([torch.nn.functional.pad(p[key], (0, width - p[key].shape[1])) for p in parts])

        return cls(torch.cat([p["images"] for p in parts]), padded("input_ids"), padded("attention_mask"))

    def __len__(self) -> int:
        return self.images.shape[0]


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


@torch.no_grad()
def encode(model, held: HeldOut, *, device: torch.device, amp: bool, batch_size: int = 256,
           paths: tuple[str, ...] = ("unpruned", "deployed")) -> dict[str, torch.Tensor]:
    """``{"text", *paths}`` -> (N, E) float32 normalised embeddings (CPU); ``paths``: image paths to encode."""
    model.eval()
    out: dict[str, list[torch.Tensor]] = {"text": [], **{p: [] for p in paths}}
    same = model.config.selection.policy == "none"  # the baseline: both paths are one
    for s in range(0, len(held), batch_size):
        images = held.images[s : s + batch_size].to(device)
        with _autocast(device, amp):
            ids, mask = held.input_ids[s : s + batch_size].to(device), held.attention_mask[s : s + batch_size].to(device)
            out["text"].append(model.encode_text(ids, mask).embedding.float().cpu())
            full = None
            if "unpruned" in paths or same:
                full = model._image_embedding(model.vision.forward_features(images, policy="none")).float().cpu()
            if "unpruned" in paths:
                out["unpruned"].append(full)
            if "deployed" in paths:
                out["deployed"].append(full if same else model.encode_image(images).embedding.float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def rerank_recalls(model, held: HeldOut, image_emb: torch.Tensor, text_emb: torch.Tensor, gallery_size: int,
                   k: int, *, device: torch.device, amp: bool, batch_size: int = 256) -> torch.Tensor:
    """``(G, 2)`` per-gallery (i->t, t->i) R@1 after ITM re-ranks the top ``k`` of the ITC ranking of
    ``image_emb`` / ``text_emb`` (``BusModel.itm_score``: the caption guides the selection)."""
    model.eval()
    n = len(held)
    g = n // gallery_size
    k = min(k, gallery_size)
    rows = []
    for gi in range(g):
        lo = gi * gallery_size
        sim = image_emb[lo : lo + gallery_size] @ text_emb[lo : lo + gallery_size].t()  # (n, n) [image, text]
        recalls = []
        for queries_are_images, s in ((True, sim), (False, sim.t())):
            top = s.topk(k, dim=1).indices  # (n, k) candidates per query, local indices
            query = torch.arange(gallery_size)[:, None].expand(-1, k)
            img, txt = (query, top) if queries_are_images else (top, query)
            img, txt = img.reshape(-1) + lo, txt.reshape(-1) + lo
            scores = []
            for s0 in range(0, img.numel(), batch_size):
                i, t = img[s0 : s0 + batch_size], txt[s0 : s0 + batch_size]
                mask = held.attention_mask[t]
                width = int(mask.sum(dim=1).max())
                with _autocast(device, amp):
                    scores.append(model.itm_score(held.images[i].to(device), held.input_ids[t, :width].to(device),
                                                  mask[:, :width].to(device)).float().cpu())
            best = top.gather(1, torch.cat(scores).view(gallery_size, k).argmax(dim=1, keepdim=True))[:, 0]
            recalls.append((best == torch.arange(gallery_size)).double().mean())
        rows.append(torch.stack(recalls))
    return torch.stack(rows)


def evaluate_paths(model, held: HeldOut, gallery_size: int, *, device: torch.device, amp: bool,
                   rerank_k: int = 0, paths: tuple[str, ...] = ("unpruned", "deployed")) -> dict[str, torch.Tensor]:
    """``{path: (G, 2) per-gallery (i->t, t->i) R@1}`` for ``paths`` (``unpruned``, ``deployed``) and
    (``rerank_k`` > 0, which needs ``deployed``) ``rerank``."""
    emb = encode(model, held, device=device, amp=amp, paths=paths)
    out = {p: gallery_recalls(emb[p], emb["text"], gallery_size) for p in paths}
    if rerank_k > 0 and model.itm_head is not None and "deployed" in paths:
        out["rerank"] = rerank_recalls(model, held, emb["deployed"], emb["text"], gallery_size, rerank_k,
                                       device=device, amp=amp)
    return out
