"""The pure arithmetic of ``bus bench quality``: selector recall, time-to-target, speedup, and the mean
and spread over seeds. No model, no data: each function is tested on hand-made inputs."""

from __future__ import annotations

import math
import statistics
from typing import Sequence

import torch


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
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
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
