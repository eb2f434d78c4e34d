"""COCO Captions (``captions_train2017.json`` style annotation files) as image-caption records.

The file holds ``"images": [{"id", "file_name", ...}]`` and ``"annotations": [{"image_id", "id",
"caption"}]``; every annotation becomes one ``ManifestRecord`` (an image with 5 captions gives 5
pairs). COCO has no caption-level boxes, so these records have no PTM labels. ``retrieval_groups``
gives the image list and caption-to-image map that retrieval evaluation needs (each image has several
correct captions).
"""

from __future__ import annotations

import json
import os

from .manifest import CaptionImageDataset, ManifestRecord
from .transforms import ImageTransform


def read_coco_captions(annotation_file: str | os.PathLike, image_root: str | os.PathLike) -> list[ManifestRecord]:
    """Parse a COCO captions JSON file.

    Args:
        annotation_file: path to the JSON file.
        image_root: directory holding the images named by ``file_name``.

    Returns:
        One record per annotation, in annotation order; ``key`` is ``"<image_id>:<annotation id>"``.

    Raises FileNotFoundError for a missing file or image_root, ValueError for JSON without
    ``images``/``annotations`` or an annotation whose ``image_id`` is not among the images.
    """
    annotation_file = os.fspath(annotation_file)
    if not os.path.isfile(annotation_file):
        raise FileNotFoundError(f"COCO annotation file not found: {annotation_file}")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image_root is not a directory: {os.fspath(image_root)}")
    with open(annotation_file, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{annotation_file}: invalid JSON ({err})") from None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{annotation_file}: not a COCO captions file (needs 'images' and 'annotations')")
    files = {}
    for img in data["images"]:
        try:
            files[img["id"]] = img["file_name"]
        except (KeyError, TypeError):
            raise ValueError(f"{annotation_file}: every image needs 'id' and 'file_name', got {img!r}") from None
    root = os.path.abspath(os.fspath(image_root))
    records = []
    for ann in data["annotations"]:
        try:
            image_id, caption = ann["image_id"], ann["caption"]
        except (KeyError, TypeError):
            raise ValueError(f"{annotation_file}: every annotation needs 'image_id' and 'caption', got {ann!r}") from None
        if image_id not in files:
            raise ValueError(f"{annotation_file}: annotation {ann.get('id')} refers to unknown image_id {image_id}")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{annotation_file}: annotation {ann.get('id')} has an empty caption")
        records.append(ManifestRecord(os.path.join(root, files[image_id]), caption.strip(), None,
                                      f"{image_id}:{ann.get('id', len(records))}"))
    if not records:
        raise ValueError(f"{annotation_file}: no annotations")
    return records


def retrieval_groups(records: list[ManifestRecord]) -> tuple[list[str], list[int]]:
    """Distinct images (first-seen order) and, per record, the index of its image in that list.

    For R@K: text ``t`` matches image ``caption_to_image[t]``; image ``i`` matches every text whose
    entry is ``i``."""
    images: dict[str, int] = {}
    caption_to_image = []
    for r in records:
        caption_to_image.append(images.setdefault(r.image, len(images)))
    return list(images), caption_to_image


class CocoCaptionsDataset(CaptionImageDataset):
    """``CaptionImageDataset`` over ``read_coco_captions(annotation_file, image_root)``."""

    def __init__(self, annotation_file: str | os.PathLike, image_root: str | os.PathLike, transform: ImageTransform):
        super().__init__(read_coco_captions(annotation_file, image_root), transform)
