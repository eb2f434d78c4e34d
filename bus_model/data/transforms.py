"""Image transforms for real data (torchvision ``transforms.v2``) and box -> patch-label conversion.

Training: random resized crop (no horizontal flip: captions say "left of"/"right of"), eval: a plain
resize; both end in float32 normalised with the model config's ``mean``/``std``. Boxes, where a
dataset has them, go through the same geometric transform (torchvision moves ``BoundingBoxes`` with
the image), and ``patch_labels_from_boxes`` turns them into the PTM targets of BUS Sec. 3.3: a patch
is relevant when it overlaps a box with positive area.

torchvision is a training dependency (extra ``train``); it is imported when a transform is built,
not when this module is imported.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def check_mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std``: 3 floats each (per RGB channel), ``std`` > 0 -> two (3,) float32 tensors."""
    out = []
    for name, value in (("mean", mean), ("std", std)):
        try:
            t = torch.as_tensor([float(v) for v in value], dtype=torch.float32)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a sequence of 3 floats, got {value!r}") from None
        if t.shape != (3,):
            raise ValueError(f"{name} must have 3 values (one per RGB channel), got {len(t)}")
        out.append(t)
    if not bool(torch.all(out[1] > 0)):
        raise ValueError(f"std must be positive, got {std!r}")
    return out[0], out[1]


def check_image_size(image_size: int | Sequence[int], patch_size: int | None = None) -> tuple[int, int]:
    """``image_size``: int S or (H, W) -> (H, W); each side >= 1 and, if ``patch_size`` is given, a
    multiple of it."""
    if isinstance(image_size, bool):
        raise TypeError("image_size must be an int or a pair of ints, got bool")
    if isinstance(image_size, int):
        hw = (image_size, image_size)
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in image_size
    ):
        hw = (int(image_size[0]), int(image_size[1]))
    else:
        raise TypeError(f"image_size must be an int or a pair of ints (H, W), got {image_size!r}")
    if min(hw) < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    if patch_size is not None:
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        if hw[0] % patch_size or hw[1] % patch_size:
            raise ValueError(f"image_size {hw} must be a multiple of patch_size ({patch_size}) on both sides")
    return hw


def patch_labels_from_boxes(boxes: torch.Tensor | np.ndarray | None, image_size: int | Sequence[int],
                            patch_size: int) -> torch.Tensor:
    """PTM labels from boxes on the (already transformed) image.

    Args:
        boxes: (K, 4) float, ``x1, y1, x2, y2`` in pixels of the ``image_size`` image; K may be 0.
        image_size: S or (H, W), multiples of ``patch_size``.
        patch_size: p.

    Returns:
        (H/p * W/p,) float32, row-major over the patch grid: 1 where patch ``[r*p, (r+1)*p) x
        [c*p, (c+1)*p)`` overlaps some box with positive area, else 0.
    """
    h, w = check_image_size(image_size, patch_size)
    gh, gw = h // patch_size, w // patch_size
    if boxes is None:
        return torch.zeros(gh * gw, dtype=torch.float32)
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float64) if not isinstance(boxes, torch.Tensor) else boxes,
                        dtype=torch.float64)
    if b.numel() == 0:
        return torch.zeros(gh * gw, dtype=torch.float32)
    if b.dim() != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must have shape (K, 4) (x1, y1, x2, y2), got {tuple(b.shape)}")
    starts_y = torch.arange(gh, dtype=torch.float64) * patch_size  # (gh,)
    starts_x = torch.arange(gw, dtype=torch.float64) * patch_size  # (gw,)
    # (K, gh) and (K, gw): does the box's open interval meet the patch row/column interval?
    rows = (b[:, 1:2] < starts_y + patch_size) & (b[:, 3:4] > starts_y)
    cols = (b[:, 0:1] < starts_x + patch_size) & (b[:, 2:3] > starts_x)
    grid = (rows[:, :, None] & cols[:, None, :]).any(dim=0)  # (gh, gw)
    return grid.reshape(-1).float()


class ImageTransform:
    """PIL image or (3, H, W) uint8 tensor (+ optional boxes) -> (3, S_h, S_w) float32 (+ boxes).

    Args:
        image_size: output S or (H, W).
        train: random resized crop (``scale``, ``ratio``) if True, else a resize to ``image_size``.
        mean, std: 3 floats each, applied after scaling pixels to 0..1.
        scale: area fraction range of the random crop.
        ratio: aspect ratio range of the random crop.
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.

    ``__call__(image, boxes=None)`` returns ``(tensor, boxes)``; ``boxes`` (K, 4) float32 xyxy pixels,
    moved and clamped with the crop/resize (None in, None out).
    """

    def __init__(self, image_size: int | Sequence[int], *, train: bool, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, scale: tuple[float, float] = (0.5, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), interpolation: str = "bicubic"):
        from torchvision.transforms import InterpolationMode, v2

        self.image_size = check_image_size(image_size)
        mean_t, std_t = check_mean_std(mean, std)
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
        if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi <= 1, got {scale!r}")
        if not (len(ratio) == 2 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must be (lo, hi) with 0 < lo <= hi, got {ratio!r}")
        mode = InterpolationMode(interpolation)
        if train:
            geometric = v2.RandomResizedCrop(self.image_size, scale=scale, ratio=ratio, interpolation=mode,
                                             antialias=True)
        else:
            geometric = v2.Resize(self.image_size, interpolation=mode, antialias=True)
        self.train = train
        self._pipeline = v2.Compose([
            v2.ToImage(),
            geometric,
            v2.ClampBoundingBoxes(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean_t.tolist(), std_t.tolist()),
        ])

    def __call__(self, image, boxes=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        from torchvision import tv_tensors

        if boxes is None:
            out = self._pipeline(image)
            return out.as_subclass(torch.Tensor), None
        if isinstance(image, torch.Tensor):
            canvas = tuple(image.shape[-2:])
        else:  # PIL: size is (W, H)
            canvas = (image.size[1], image.size[0])
        b = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
        bb = tv_tensors.BoundingBoxes(b, format="XYXY", canvas_size=canvas)
        out, bb = self._pipeline(image, bb)
        return out.as_subclass(torch.Tensor), bb.as_subclass(torch.Tensor).float()
