"""Training and evaluation pieces of ``bus bench quality``: the policies a model offers, the shared data
stream, the interleaved step-time measurement, one policy's training run with periodic held-out
evaluation, and the selector recall of each selection layer."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import torch

from bus_model.data.transforms import IMAGENET_MEAN, IMAGENET_STD

from .harness import count_flops, median, timed
from .quality_metrics import selector_recall

BASELINE = "baseline"
NO_PTM = "bus-noptm"  # the ablation: BUS selection trained without the patch-text matching loss
ITC_CHOICES = {  # losses.itc_image choice -> summary; each but the model's default is a variant bus-<choice>
    "guided": "BUS, ITC from the caption-guided pass (each positive image seen through its own caption)",
    "detached": "BUS, ITC without gradient through the selection scores (ELIP's rule)",
    "text_free": "BUS, ITC from a caption-free pass (what retrieval encodes)",
}


@dataclass
class PolicySpec:
    """One trained variant: the config it builds and the overrides (flat ``section__field`` keys)."""

    name: str
    config: str
    overrides: dict = field(default_factory=dict)
    summary: str = ""


def policy_specs(model: str) -> dict[str, PolicySpec]:
    """Every variant ``model`` offers, discovered from ``bus_model.selection.POLICY_INFO`` (a policy added
    there appears here): the ``-baseline`` twin, each selection policy on ``model``, ``bus`` without PTM and
    ``bus`` with each ITC image embedding other than the model's default (``ITC_CHOICES``)."""
    from bus_model import get_config
    from bus_model.selection import POLICY_INFO

    default_itc = get_config(model).losses.itc_image

    specs = {BASELINE: PolicySpec(BASELINE, f"{model}-baseline", {}, "the -baseline twin: every patch, no PAD")}
    for name, info in POLICY_INFO.items():
        if name == "none":
            continue
        specs[name] = PolicySpec(name, model, {"selection__policy": name}, info.summary)
        if name == "bus":
            specs[NO_PTM] = PolicySpec(NO_PTM, model, {"selection__policy": "bus", "losses__ptm": False},
                                       "ablation: BUS without the PTM loss")
            for choice, summary in ITC_CHOICES.items():  # the other ITC image embeddings (losses.itc_image)
                if choice == default_itc:
                    continue
                specs[f"bus-{choice.replace('_', '-')}"] = PolicySpec(
                    f"bus-{choice.replace('_', '-')}", model, {"selection__policy": "bus", "losses__itc_image": choice},
                    summary)
    return specs


def check_spec(spec: PolicySpec, text_overrides: dict) -> str | None:
    """None when the variant builds, else why not (e.g. elip needs equal text and ViT widths)."""
    from bus_model import get_config

    try:
        get_config(spec.config, **spec.overrides, text=text_overrides)
    except (TypeError, ValueError) as err:
        return str(err)
    return None


def build_model(spec: PolicySpec, text_overrides: dict, seed: int, device: torch.device):
    from bus_model import create_model

    torch.manual_seed(seed)
    return create_model(spec.config, **spec.overrides, text=text_overrides).to(device)


def data_kwargs(config, *, num_samples: int, seed: int, split: str, difficulty: str, scene: str = "standard") -> dict:
    """Keyword arguments of a ``SyntheticDataset`` at the model's geometry, normalised as ``bus train`` /
    ``bus eval --data synthetic`` normalise (ImageNet mean/std), so a checkpoint re-evaluates the same."""
    v = config.vision
    return {"num_samples": num_samples, "seed": seed, "split": split, "image_size": v.image_size,
            "patch_size": v.patch_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "difficulty": difficulty, "scene": scene}


class TrainStream:
    """Batch ``i`` of the training split for one seed: the same for every policy (model input tuples).

    ``cache=True`` keeps each batch once made (CPU tensors), so the policies trained on one seed's stream
    generate it once (a cluttered 64 px sample takes ~2 ms: 64 ms a batch of 32, as long as a training step)."""

    def __init__(self, config, tokenizer, batch_size: int, seed: int, difficulty: str, device: torch.device,
                 scene: str = "standard", cache: bool = False):
        from bus_model.data import Collator, SyntheticDataset

        kw = data_kwargs(config, num_samples=10**9, seed=seed, split="train", difficulty=difficulty, scene=scene)
        self.dataset = SyntheticDataset(kw.pop("num_samples"), **kw)
        v = config.vision
        self.collate = Collator(tokenizer, image_size=v.image_size, patch_size=v.patch_size,
                                max_length=config.max_text_len)
        self.batch_size, self.device = batch_size, device
        self.cache: dict[int, tuple[torch.Tensor, ...]] | None = {} if cache else None

    def _make(self, i: int) -> tuple[torch.Tensor, ...]:
        b = self.collate([self.dataset[j] for j in range(i * self.batch_size, (i + 1) * self.batch_size)])
        labels = b["patch_labels"].masked_fill(~b["has_patch_labels"][:, None], -1.0)
        return b["images"], b["input_ids"], b["attention_mask"], labels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        if self.cache is None:
            batch = self._make(i)
        else:
            batch = self.cache.get(i)
            if batch is None:
                batch = self.cache[i] = self._make(i)
        return tuple(t.to(self.device) for t in batch)


class Trainer:
    """AdamW (decay on matrices only) with linear warm-up and cosine decay over ``total_steps``, gradient
    clipping at 1: the recipe of ``bus train`` (bus_model.training.optim)."""

    def __init__(self, model, *, lr: float, weight_decay: float, total_steps: int, warmup_steps: int,
                 amp: bool, device: torch.device):
        from bus_model.training.optim import CosineWithWarmup, setup_optimizer

        args = argparse.Namespace(lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), fsdp=False)
        self.model, self.amp, self.device = model, amp, device
        self.optimizer = setup_optimizer(model, args)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, CosineWithWarmup(max(1, warmup_steps), max(1, total_steps), 0.01))

    def step(self, batch) -> float:
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(*batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())


def training_flops_per_sample(model, batch) -> float:
    """FLOPs of forward + backward on ``batch`` / its size (the optimizer update is not counted)."""
    flops = count_flops(lambda: model(*batch).loss.backward())
    model.zero_grad(set_to_none=True)
    return flops / batch[0].shape[0]


def measure_step_times(specs: dict[str, PolicySpec], text_overrides: dict, stream: TrainStream, *, lr: float,
                       warmup: int, steps: int, amp: bool, device: torch.device, log=print) -> dict[str, dict]:
    """Training-step seconds and FLOPs per sample of every variant.

    One fresh model per variant; rounds of one step each, the variants in a rotated order every round, so
    that machine noise (other processes on a shared CPU) hits all of them alike, as ``bus bench train``
    does for its pair. The first ``warmup`` rounds are not timed. The step time is the lower quartile of
    the rounds: other processes only ever add time, in bursts of seconds on a shared 2-core machine
    (measured: the same step took 0.2 s and 7 s in neighbouring rounds), which moves a median of a few
    rounds but not the fast quarter; the median is recorded too."""
    models = {n: build_model(s, text_overrides, 0, device) for n, s in specs.items()}
    trainers = {n: Trainer(m, lr=lr, weight_decay=0.0, total_steps=10**6, warmup_steps=1, amp=amp, device=device)
                for n, m in models.items()}
    names = list(specs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + steps):
        batch = stream[r]
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = timed(lambda: trainers[name].step(batch), device)
            if r >= warmup:
                times[name].append(elapsed)
        if r >= warmup:
            log(f"timing round {r + 1 - warmup}/{steps}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
    out = {}
    for name in names:
        out[name] = {"step_time_s": lower_quartile(times[name]), "median_step_time_s": median(times[name]),
                     "step_times_s": times[name],
                     "flops_per_sample": training_flops_per_sample(models[name], stream[0])}
    return out


def lower_quartile(values: list[float]) -> float:
    """The 25th percentile (linear interpolation between order statistics)."""
    if not values:
        raise ValueError("lower_quartile needs at least one value")
    ordered = sorted(values)
    pos = 0.25 * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])


def eval_steps(total_steps: int, evals: int) -> list[int]:
    """``evals`` evaluation points spread evenly over training, the last at ``total_steps``."""
    return sorted({max(1, math.ceil(total_steps * k / evals)) for k in range(1, evals + 1)})


@torch.no_grad()
def selector_recalls(model, held_out, tokenizer, *, device: torch.device, batch_size: int = 64,
                     captions: bool = True) -> list[float] | None:
    """Per selection layer: the share of the held-out images' caption-relevant patches still present after
    it, with each image's own caption guiding the policies that read text (``captions=False``: no caption,
    the path retrieval encodes, run in eval mode as retrieval runs: bus falls back to its text-free mode,
    random drops nothing), with a caption run as in training (``random`` drops in training mode only). None
    for a model that selects nothing on that path."""
    from bus_model.data import Collator

    if model.config.selection.policy == "none":
        return None
    v = model.config.vision
    collate = Collator(tokenizer, image_size=v.image_size, patch_size=v.patch_size, max_length=model.config.max_text_len)
    was_training = model.training
    model.train(captions)  # selection as in training (or as retrieval); no dropout in BusModel, nothing else changes
    kept: list[list[torch.Tensor]] = []
    labels = []
    try:
        for start in range(0, len(held_out), batch_size):
            b = collate([held_out[i] for i in range(start, min(start + batch_size, len(held_out)))])
            ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
            query = model.encode_text(ids, mask).hidden[:, 0] if captions and model._uses_text_query() else None
            feats = model.vision.forward_features(b["images"].to(device), query)
            if not kept:
                kept = [[] for _ in feats.selections]
            for k, rec in enumerate(feats.selections):
                kept[k].append(rec.kept_positions.cpu())
            labels.append(b["patch_labels"])
    finally:
        model.train(was_training)
    if not kept or not kept[0]:
        return None  # the text-free path selects nothing (e.g. text_free="none")
    all_labels = torch.cat(labels)
    return [selector_recall(_pad_cat(layer), all_labels) for layer in kept]


def _pad_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate (B_i, k_i) position blocks, padding narrower ones with -1."""
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=-1) for p in parts])


def evaluate_model(model, held_out, tokenizer, *, device: torch.device, rerank_k: int, captions: bool,
                   amp: bool, batch_size: int = 64) -> dict:
    """Held-out retrieval as ``bus eval`` computes it: ITC ranking of text-free image embeddings (keys
    ``itc_img2txt_r1`` ... ``itc_mean_r1``), then ITM re-ranking of the top ``rerank_k`` (keys
    ``rerank_...``; equal to the ITC ones when ``rerank_k`` is 0); optionally captioning CIDEr / BLEU-4."""
    from bus_model.training.eval_metrics import caption_scores
    from bus_model.training.evaluate import encode_dataset, retrieval_metrics

    model.eval()
    enc = encode_dataset(model, held_out, tokenizer, device=device, batch_size=batch_size, captions=captions,
                         max_caption_len=model.config.max_text_len, num_beams=1, amp=amp)
    m = retrieval_metrics(model, enc, device=device, rerank_k=rerank_k, batch_size=batch_size, amp=amp)
    out = {}
    for prefix, source in (("itc_", "itc_"), ("rerank_", "")):
        for d in ("img2txt", "txt2img"):
            for k in (1, 5, 10):
                out[f"{prefix}{d}_r{k}"] = m[f"{source}{d}_r{k}"]
        out[f"{prefix}mean_r1"] = (out[f"{prefix}img2txt_r1"] + out[f"{prefix}txt2img_r1"]) / 2
    out["rerank_k"] = rerank_k
    if captions:
        refs = [[enc.captions[t] for t in texts] for texts in enc.image_texts()]
        out.update(caption_scores(refs, enc.generated))
    return out


def headline(metrics: dict, reranked: bool) -> dict:
    """The retrieval numbers a benchmark reports as ``img2txt_r1`` ... ``mean_r1``: the ITM re-ranked ones
    or the ITC ones."""
    prefix = "rerank_" if reranked else "itc_"
    return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
