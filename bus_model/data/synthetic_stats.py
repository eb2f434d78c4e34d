"""What the synthetic data demands of a selector, measured from its exact labels (issue 24): per-object patch
labels, and how often random masking (FLIP) to a keep budget loses a whole object the caption mentions.
``random_keep_loss`` reports it for either scene (``synthetic.SCENES``)."""

from __future__ import annotations

import math

import numpy as np

from bus_kernels._validation import is_number

from .synthetic import SceneObject, _check_geometry, object_mask, patch_grid_labels, render_sample


def object_patch_labels(objects: list[SceneObject], image_size: int = 64, patch_size: int = 8) -> np.ndarray:
    """(len(objects), S/p * S/p) bool: row ``o`` marks the patches that show a pixel of ``objects[o]``
    (the per-object split of ``patch_labels``, which is the union of the mentioned objects' rows)."""
    _check_geometry(image_size, patch_size)
    g = image_size // patch_size
    out = np.zeros((len(objects), g * g), dtype=bool)
    for k, obj in enumerate(objects):
        mask = np.zeros((image_size, image_size), dtype=bool)
        window, inside = object_mask(obj, image_size)
        mask[window] = inside
        out[k] = patch_grid_labels(mask, patch_size) > 0
    return out


def random_keep_loss_probability(object_patches: np.ndarray, keep: int) -> float:
    """Probability that ``keep`` patches drawn uniformly without replacement (random masking, FLIP) miss
    every patch of at least one of the objects.

    Args:
        object_patches: (num_objects, N) bool, the patches of each object (they may share patches).
        keep: number of patches kept, 0 <= keep <= N.

    Exact, by inclusion-exclusion over the objects: ``P(miss the patch set U) = C(N - |U|, keep) / C(N, keep)``.
    """
    patches = np.asarray(object_patches, dtype=bool)
    if patches.ndim != 2:
        raise ValueError(f"object_patches must be (num_objects, N), got shape {patches.shape}")
    n = patches.shape[1]
    if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or not 0 <= keep <= n:
        raise ValueError(f"keep must be an int in [0, {n}], got {keep!r}")
    total = math.comb(n, int(keep))
    prob = 0.0
    m = patches.shape[0]
    for subset in range(1, 1 << m):
        members = [o for o in range(m) if subset >> o & 1]
        union = int(np.any(patches[members], axis=0).sum())
        prob += (-1) ** (len(members) + 1) * math.comb(n - union, int(keep)) / total
    return float(prob)


def random_keep_loss(num_samples: int = 256, *, keep_ratio: float = 0.25, seed: int = 0, split: str = "test",
                     image_size: int = 64, patch_size: int = 8, difficulty: str = "standard",
                     scene: str = "standard") -> dict:
    """What a keep budget means on this data, measured over the first ``num_samples`` samples.

    Returns a dict:
        ``keep``: patches kept (``round(keep_ratio * N)``);
        ``lost_mentioned_object``: mean probability that random masking to ``keep`` patches loses every
        patch of at least one object the caption mentions (``random_keep_loss_probability``);
        ``salient_share``: mean share of patches that show any object (what an image-only selector sees as
        salient); ``salient_over_budget``: share of images with more salient patches than ``keep``;
        ``relevant_share``: mean share of patches that show a mentioned object; ``objects_per_image``:
        mean object count.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not is_number(keep_ratio) or not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    n = (image_size // patch_size) ** 2 if image_size % patch_size == 0 else 0
    keep = max(1, round(keep_ratio * n))
    lost, salient, over, relevant, count = [], [], [], [], []
    for i in range(num_samples):
        s = render_sample(seed, i, split=split, image_size=image_size, patch_size=patch_size,
                          difficulty=difficulty, scene=scene)
        rows = object_patch_labels(s.objects, image_size, patch_size)  # (objects, N) bool
        lost.append(random_keep_loss_probability(rows[list(s.mentioned)], keep))
        any_object = rows.any(axis=0)
        salient.append(any_object.mean())
        over.append(float(any_object.sum() > keep))
        relevant.append(s.patch_labels.mean())
        count.append(len(s.objects))
    return {"keep": keep, "num_patches": n, "lost_mentioned_object": float(np.mean(lost)),
            "salient_share": float(np.mean(salient)), "salient_over_budget": float(np.mean(over)),
            "relevant_share": float(np.mean(relevant)), "objects_per_image": float(np.mean(count))}
