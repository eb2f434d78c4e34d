"""The MLM leak of text-guided selection, measured on held-out pairs (issue 24, "the ITC shortcut", last point).

In training, BUS selects the patches with the *clean* caption's [CLS] while MLM predicts words masked out of
that caption: the selection (which patches the fusion encoder gets to see) may carry the masked words. This
measures it on a trained model by running the same MLM prediction three ways, on the same held-out captions
with the same masks:

* ``clean_guided``: the selection guided by the clean caption (what training does);
* ``masked_guided``: guided by the masked caption the model is asked to complete (no leak possible);
* ``text_free``: no caption guides it (the policy's text-free selection, as at retrieval).

``leak = clean_guided - masked_guided`` (masked-token accuracy, in [−1, 1]): what the clean caption adds
through the selection alone, since the fusion encoder reads the masked caption in every case. The interval is
a paired bootstrap over the held-out chunks (and seeds, once averaged by the caller).
"""

from __future__ import annotations

import torch

from .quality_eval import HeldOut

WAYS = ("clean_guided", "masked_guided", "text_free")


@torch.no_grad()
def mlm_accuracies(model, held: HeldOut, *, device: torch.device, chunk: int = 256, mask_seed: int = 0,
                   amp: bool = False) -> dict[str, torch.Tensor] | None:
    """Masked-token accuracy per chunk of ``chunk`` held-out pairs for each of ``WAYS``: ``{way: (G,) float64}``
    (G = number of chunks). None when the model has no MLM head or its policy uses no caption."""
    from bus_model.losses import mask_tokens
    from bus_model.selection import POLICY_INFO

    cfg = model.config
    if model.mlm_head is None or not POLICY_INFO[cfg.selection.policy].uses_text:
        return None
    was_training = model.training
    model.eval()
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(mask_seed)  # the same masks for every model and every way
    out = {w: [] for w in WAYS}
    try:
        for start in range(0, len(held), chunk):
            ids = held.input_ids[start : start + chunk].to(device)
            mask = held.attention_mask[start : start + chunk].to(device)
            images = held.images[start : start + chunk].to(device)
            masked, positions, labels = mask_tokens(ids, mask, cfg.text, cfg.losses.mlm_probability)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                clean = model.encode_text(ids, mask)
                masked_text = model.encode_text(masked, mask)
                guides = {"clean_guided": clean.hidden[:, 0], "masked_guided": masked_text.hidden[:, 0],
                          "text_free": None}
                for way, guide in guides.items():
                    image = model.encode_image(images, guide)
                    fused = model.fusion(masked_text.hidden, masked_text.mask, image.memory, image.memory_mask)
                    picked = fused.gather(1, positions[:, :, None].expand(-1, -1, fused.shape[-1]))
                    logits = model.mlm_head(picked, model.text_encoder.embeddings.word_embeddings.weight)
                    used = labels != -100
                    hits = ((logits.argmax(-1) == labels) & used).sum()
                    out[way].append(float(hits) / max(1, int(used.sum())))
    finally:
        torch.random.set_rng_state(gen_state)
        model.train(was_training)
    return {w: torch.tensor(v, dtype=torch.float64) for w, v in out.items()}


def summarise_leak(per_seed: list[dict[str, torch.Tensor] | None], reps: int) -> dict | None:
    """Seeds' ``mlm_accuracies`` -> mean accuracy of each way, and the leak (clean - masked guided) with its
    95% paired bootstrap interval over seeds and chunks. None when any seed has none."""
    from .quality_metrics import paired_bootstrap_ci

    if not per_seed or any(r is None for r in per_seed):
        return None
    means = {w: float(torch.stack([r[w] for r in per_seed]).mean()) for w in WAYS}
    diffs = torch.stack([r["clean_guided"] - r["masked_guided"] for r in per_seed])  # (S, G)
    diff, lo, hi = paired_bootstrap_ci(diffs.numpy(), reps=reps)
    return {**means, "leak": diff, "ci95": [lo, hi], "significant": not lo <= 0.0 <= hi,
            "per_seed_leak": [float(d.mean()) for d in diffs]}


def render_leak(policies: dict) -> str:
    """One sentence per policy with a measured leak ('' when none)."""
    parts = []
    for name, p in policies.items():
        m = p.get("mlm_leak")
        if m:
            parts.append(f"{name}: masked-token accuracy {m['clean_guided']:.3f} with the selection guided by the "
                         f"clean caption (training), {m['masked_guided']:.3f} guided by the masked caption, "
                         f"{m['text_free']:.3f} with no caption; leak {m['leak']:+.4f} "
                         f"[{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}] "
                         f"({'significant' if m['significant'] else 'not significant'})")
    return ("MLM leak through the selection (quality_mlm.py): " + "; ".join(parts) + ".") if parts else ""
