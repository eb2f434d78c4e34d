"""Real image-caption data from a manifest file: JSONL, JSON or CSV rows of image path + caption.

Formats (the extension decides):

* ``.jsonl``: one JSON object per line, ``{"image": "a/b.jpg", "caption": "...", "boxes": [[x1, y1, x2, y2], ...]}``.
* ``.json``: a list of such objects. ``"caption"`` may be a list of captions (the ALBEF/BLIP
  "Karpathy split" files), which gives one record per caption.
* ``.csv``: a header row with ``image`` and ``caption`` columns and an optional ``boxes`` column holding
  the boxes as a JSON string.

Also accepted: ``image_path``/``path``/``filepath`` for the image, ``text`` for the caption. Relative
image paths are resolved against ``image_root`` (default: the manifest's directory).

``boxes`` (optional) are the boxes of the objects the caption mentions, in pixels of the original
image; they become the per-patch relevance labels of the PTM loss (BUS Sec. 3.3) after the image
transform moves them. A row with no boxes has no patch labels (the collate function flags it).

A malformed manifest (unreadable row, no caption column) is a user error and raises ``ValueError``
naming the file and line. A missing or undecodable *image* is not: the dataset returns a
``SkippedSample`` and the run goes on (see ``bus_model.data.decode``).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass

import torch

from .decode import MISSING, ImageLoadError, SkippedSample, load_rgb
from .transforms import ImageTransform, check_image_size, patch_labels_from_boxes

_IMAGE_KEYS = ("image", "image_path", "path", "filepath")
_CAPTION_KEYS = ("caption", "text", "captions")


@dataclass(frozen=True)
class ManifestRecord:
    """One image-caption pair: ``image`` an absolute path, ``boxes`` a tuple of (x1, y1, x2, y2) in
    original pixels or None, ``key`` a stable id (``"<manifest line>:<caption number>"`` unless given)."""

    image: str
    caption: str
    boxes: tuple[tuple[float, float, float, float], ...] | None
    key: str


def _first(row: dict, keys: tuple[str, ...]):
    for k in keys:
        if k in row and row[k] not in (None, ""):
            return row[k]
    return None


def _parse_boxes(raw, where: str):
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: boxes is not valid JSON ({err})") from None
    try:
        boxes = tuple(tuple(float(v) for v in box) for box in raw)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: boxes must be a list of [x1, y1, x2, y2] lists, got {raw!r}") from None
    for box in boxes:
        if len(box) != 4 or box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"{where}: each box must be [x1, y1, x2, y2] with x2 >= x1, y2 >= y1, got {list(box)}")
    return boxes


def records_from_rows(rows, *, source: str, image_root: str) -> list[ManifestRecord]:
    """Turn parsed rows (dicts, with their line numbers) into records. ``rows``: iterable of (line, dict)."""
    records = []
    for line, row in rows:
        where = f"{source}, line {line}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with image and caption, got {type(row).__name__}")
        image = _first(row, _IMAGE_KEYS)
        caption = _first(row, _CAPTION_KEYS)
        if image is None:
            raise ValueError(f"{where}: no image path (one of {', '.join(_IMAGE_KEYS)})")
        if caption is None:
            raise ValueError(f"{where}: no caption (one of {', '.join(_CAPTION_KEYS)})")
        captions = [caption] if isinstance(caption, str) else list(caption)
        boxes = _parse_boxes(row.get("boxes"), where)
        path = image if os.path.isabs(image) else os.path.join(image_root, image)
        base_key = str(row.get("id", row.get("key", line)))
        for k, text in enumerate(captions):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: caption {k} is empty or not a string")
            key = base_key if len(captions) == 1 else f"{base_key}:{k}"
            records.append(ManifestRecord(os.path.abspath(path), text.strip(), boxes, key))
    return records


def read_manifest(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[ManifestRecord]:
    """Read a ``.jsonl`` / ``.json`` / ``.csv`` manifest into records (see the module docstring).

    Raises FileNotFoundError if ``path`` does not exist, ValueError for an unknown extension or a
    malformed row (the message names the file and line)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((line_no, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {line_no}: invalid JSON ({err})") from None
    elif ext == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: invalid JSON ({err})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json manifest must be a list of objects (for COCO annotation files "
                             "use bus_model.data.coco.read_coco_captions)")
        rows = [(i + 1, row) for i, row in enumerate(data)]
    elif ext == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not set(_CAPTION_KEYS) & set(reader.fieldnames):
                raise ValueError(f"{path}: CSV header must have a caption column, got {reader.fieldnames}")
            rows = [(i + 2, row) for i, row in enumerate(reader)]  # line 1 is the header
    else:
        raise ValueError(f"manifest must end in .jsonl, .json or .csv, got {path}")
    records = records_from_rows(rows, source=path, image_root=root)
    if not records:
        raise ValueError(f"{path}: the manifest has no rows")
    return records


class CaptionImageDataset(torch.utils.data.Dataset):
    """Map-style dataset over ``ManifestRecord``s (from a manifest, COCO, or built by hand).

    Args:
        records: list of ``ManifestRecord``.
        transform: an ``ImageTransform`` (its output size is the model's image size).
        patch_size: ViT patch size; when given, records with boxes get ``patch_labels``.

    ``dataset[i]`` is a dict ``image`` (3, H, W) float32, ``caption`` str, ``patch_labels``
    (H/p * W/p,) float32 or None, ``id`` str; or a ``SkippedSample`` when the image is missing or
    cannot be decoded (the collate function drops it and reports it).
    """

    def __init__(self, records: list[ManifestRecord], transform: ImageTransform, *, patch_size: int | None = None):
        if not isinstance(records, (list, tuple)) or not all(isinstance(r, ManifestRecord) for r in records):
            raise TypeError("records must be a list of ManifestRecord")
        if not records:
            raise ValueError("records is empty")
        if not callable(transform):
            raise TypeError(f"transform must be callable (an ImageTransform), got {type(transform).__name__}")
        if patch_size is not None:
            if not hasattr(transform, "image_size"):
                raise TypeError("transform must have an image_size attribute (an ImageTransform) when patch_size is given")
            check_image_size(transform.image_size, patch_size)
        self.records, self.transform, self.patch_size = list(records), transform, patch_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        rec = self.records[index]
        try:
            image = load_rgb(rec.image)
        except ImageLoadError as err:  # the key is the path already: the detail need not repeat it
            return SkippedSample(rec.image, err.reason, "no such file" if err.reason == MISSING else err.detail)
        want_labels = rec.boxes is not None and self.patch_size is not None
        tensor, boxes = self.transform(image, rec.boxes if want_labels else None)
        labels = patch_labels_from_boxes(boxes, self.transform.image_size, self.patch_size) if want_labels else None
        return {"image": tensor, "caption": rec.caption, "patch_labels": labels, "id": rec.key}


class ManifestDataset(CaptionImageDataset):
    """``CaptionImageDataset`` over ``read_manifest(path, image_root)``."""

    def __init__(self, path: str | os.PathLike, transform: ImageTransform, *, patch_size: int | None = None,
                 image_root: str | os.PathLike | None = None):
        super().__init__(read_manifest(path, image_root), transform, patch_size=patch_size)
        self.path = os.fspath(path)

    def missing_files(self) -> list[SkippedSample]:
        """Cheap up-front check (a ``stat`` per file): the records whose image file does not exist."""
        return [SkippedSample(r.image, MISSING, "no such file") for r in self.records if not os.path.isfile(r.image)]
