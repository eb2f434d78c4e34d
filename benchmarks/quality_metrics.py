"""The pure arithmetic of ``bus bench quality``: selector recall, time-to-target, speedup, and the mean
and spread over seeds. No model, no data: each function is tested on hand-made inputs."""

from __future__ import annotations

import math
import statistics
from typing import Sequence

import torch

from bus_kernels._validation import is_number


def selector_recall(kept_positions: torch.Tensor, patch_labels: torch.Tensor) -> float | None:
    """Share of the caption-relevant patches still present as tokens after one selection step.

    Args:
        kept_positions: ``(B, k)`` int64 original patch index of each kept candidate; -1 marks a fused
            token or padding (``SelectionRecord.kept_positions``).
        patch_labels: ``(B, num_patches)`` float, 1 where the patch shows a caption-mentioned object (the
            exact labels of the synthetic data; > 0.5 counts as relevant).

    Returns:
        ``sum_b |kept_b & relevant_b| / sum_b |relevant_b|`` over the batch, or None when no patch is
        relevant (nothing to recall).
    """
    for name, value in (("kept_positions", kept_positions), ("patch_labels", patch_labels)):
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a 2-D tensor, got {got}")
    if kept_positions.shape[0] != patch_labels.shape[0]:
        raise ValueError(f"kept_positions has {kept_positions.shape[0]} rows, patch_labels {patch_labels.shape[0]}")
    if kept_positions.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"kept_positions must be an integer tensor, got {kept_positions.dtype}")
    n = patch_labels.shape[1]
    if kept_positions.numel() and int(kept_positions.max()) >= n:
        raise ValueError(f"kept_positions holds index {int(kept_positions.max())}, but there are only {n} patches")
    relevant = patch_labels > 0.5  # (B, n)
    kept = torch.zeros_like(relevant)
    valid = kept_positions >= 0
    rows = torch.arange(kept_positions.shape[0]).unsqueeze(1).expand_as(kept_positions)
    kept[rows[valid], kept_positions[valid].long()] = True  # a position listed twice counts once
    total = int(relevant.sum())
    if total == 0:
        return None
    return int((kept & relevant).sum()) / total


def time_to_target(curve: Sequence[dict], target: float, metric: str = "mean_r1") -> float | None:
    """Training time (``time_s``) of the first curve point whose ``metric`` is at least ``target``; None when
    no point reaches it. ``curve``: evaluation points in training order (increasing ``time_s``)."""
    if not is_number(target) or not math.isfinite(target):
        raise ValueError(f"target must be a finite number, got {target!r}")
    times = [point["time_s"] for point in curve]
    if any(b < a for a, b in zip(times, times[1:])):
        raise ValueError("curve points must be in increasing time_s order")
    for point in curve:
        value = point.get(metric)
        if value is not None and value >= target:
            return float(point["time_s"])
    return None


def speedup_to_target(baseline_time_s: float | None, policy_time_s: float | None) -> float | None:
    """``baseline time / policy time`` to the same target; None when either never reached it."""
    if baseline_time_s is None or policy_time_s is None:
        return None
    if policy_time_s <= 0:
        raise ValueError(f"policy_time_s must be > 0, got {policy_time_s}")
    return baseline_time_s / policy_time_s


def mean_and_spread(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation) of the values that are not None; spread None below 2 values,
    both None when there is none."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return None, None
    return statistics.fmean(present), (statistics.stdev(present) if len(present) > 1 else None)


def mean_curve(curves: Sequence[Sequence[dict]], metric: str = "mean_r1") -> list[dict]:
    """Point-by-point mean over seeds of curves evaluated at the same steps (the same schedule for every
    seed): ``[{"time_s", "step", metric, metric + "_std"}]``."""
    if not curves:
        return []
    length = min(len(c) for c in curves)
    out = []
    for k in range(length):
        points = [c[k] for c in curves]
        mean, spread = mean_and_spread([p[metric] for p in points])
        out.append({"time_s": points[0]["time_s"], "step": points[0]["step"], metric: mean, f"{metric}_std": spread})
    return out


def gallery_recalls(image_emb: torch.Tensor, text_emb: torch.Tensor, gallery_size: int) -> torch.Tensor:
    """R@1 both ways within each gallery of one-to-one pairs.

    Args:
        image_emb: ``(N, E)`` image embeddings; text_emb: ``(N, E)``, caption ``i`` describes image ``i``.
        gallery_size: pairs per gallery; ``N`` must be a multiple. Gallery ``g`` holds pairs
            ``g * gallery_size ... (g + 1) * gallery_size - 1`` and ranks only among them.

    Returns:
        ``(G, 2)`` float64: per gallery, image->text R@1 and text->image R@1 (ties go to the lower index).
    """
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"image_emb and text_emb must be (N, E) of one shape, got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    n = image_emb.shape[0]
    if isinstance(gallery_size, bool) or not isinstance(gallery_size, int) or gallery_size < 1 or n % gallery_size:
        raise ValueError(f"gallery_size must be a positive int dividing N = {n}, got {gallery_size!r}")
    g = n // gallery_size
    img = image_emb.double().reshape(g, gallery_size, -1)
    txt = text_emb.double().reshape(g, gallery_size, -1)
    sim = img @ txt.transpose(1, 2)  # (G, n, n): sim[g, i, t]
    own = torch.arange(gallery_size)
    i2t = (sim.argmax(dim=2) == own).double().mean(dim=1)
    t2i = (sim.argmax(dim=1) == own).double().mean(dim=1)
    return torch.stack([i2t, t2i], dim=1)


def gallery_summary(per_gallery: torch.Tensor) -> dict:
    """``(G, 2)`` per-gallery (i->t, t->i) R@1 -> means over galleries and the standard error of the mean
    R@1 over them (``mean_r1_se``: sample std of the galleries' mean R@1 / sqrt(G); None for one gallery)."""
    per = per_gallery.double()
    mean = per.mean(dim=1)  # (G,) each gallery's mean R@1
    g = mean.shape[0]
    se = float(mean.std(unbiased=True) / math.sqrt(g)) if g > 1 else None
    return {"img2txt_r1": float(per[:, 0].mean()), "txt2img_r1": float(per[:, 1].mean()),
            "mean_r1": float(mean.mean()), "mean_r1_se": se, "galleries": g}


def paired_bootstrap_ci(diffs, reps: int = 4000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean of paired differences and its bootstrap interval, resampling seeds, then galleries within each.

    Args:
        diffs: ``(S, G)`` per seed and gallery, a - b of one metric on the same galleries and training stream.
        reps: bootstrap replicates (a fixed generator: the interval is reproducible).
        level: coverage of the percentile interval.

    Returns:
        ``(mean, lo, hi)``.
    """
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"diffs must be a non-empty (seeds, galleries) array, got shape {d.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    s, g = d.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, s, size=(reps, s))  # (reps, S) seeds drawn
    galleries = rng.integers(0, g, size=(reps, s, g))  # (reps, S, G) galleries drawn within each
    means = d[seeds[:, :, None], galleries].mean(axis=(1, 2))
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(d.mean()), float(lo), float(hi)
