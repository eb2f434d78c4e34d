"""One entry point from a ``--data`` argument to a dataset: ``"synthetic"`` or a path.

``build_dataset`` picks the loader from the path: ``.jsonl``/``.csv`` -> manifest; ``.json`` -> COCO
captions if it has ``images`` and ``annotations``, else a manifest (list of rows); a ``.tar``, a
directory of ``.tar`` files, a glob or a brace range -> webdataset shards.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from .coco import CocoCaptionsDataset
from .manifest import ManifestDataset
from .synthetic import SyntheticDataset
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, check_image_size
from .webdataset import WebDatasetShards, is_shard_spec

DEFAULT_SYNTHETIC_SIZE = {"train": 10000, "val": 1000, "test": 1000}


def _is_coco(path: str) -> bool:
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip()
    if not head.startswith("{"):
        return False
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from None
    return isinstance(data, dict) and "images" in data and "annotations" in data


def build_dataset(data: str | os.PathLike, *, split: str = "train", image_size: int, patch_size: int,
                  mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, seed: int = 0,
                  num_samples: int | None = None, augment: bool | None = None,
                  image_root: str | os.PathLike | None = None, rank: int | None = None, world_size: int | None = None):
    """Dataset for ``data``.

    Args:
        data: ``"synthetic"`` or a path (see the module docstring).
        split: ``"train"``, ``"val"`` or ``"test"``; for synthetic data it picks the random stream
            (held-out splits), for real data it only sets the default of ``augment``.
        image_size, patch_size: the model's input side S and ViT patch p (S a multiple of p).
        mean, std: normalisation (3 floats each), from the model config.
        seed: synthetic data seed; shard shuffling seed for webdataset.
        num_samples: synthetic dataset length (default 10000 for train, 1000 otherwise).
        augment: random resized crop for real data (default: ``split == "train"``).
        image_root: directory the manifest's / COCO file's image paths are relative to (default: the
            file's directory).
        rank, world_size: webdataset split (default: from torch.distributed).

    Returns a map-style dataset (synthetic, manifest, COCO) or an iterable one (webdataset); all yield
    the dicts ``Collator`` takes.

    Raises FileNotFoundError when ``data`` is neither ``"synthetic"`` nor an existing path, ValueError
    for a file type it cannot read.
    """
    check_image_size(image_size, patch_size)
    if os.fspath(data) == "synthetic":
        n = num_samples if num_samples is not None else DEFAULT_SYNTHETIC_SIZE.get(split, 1000)
        return SyntheticDataset(n, seed=seed, split=split, image_size=image_size, patch_size=patch_size,
                                mean=mean, std=std)
    path = os.fspath(data)
    train = (split == "train") if augment is None else bool(augment)
    transform = ImageTransform(image_size, train=train, mean=mean, std=std)
    if is_shard_spec(path):
        return WebDatasetShards(path, transform, patch_size=patch_size, rank=rank, world_size=world_size,
                                shuffle_shards=train, seed=seed)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data path not found: {path} (give 'synthetic', a manifest, a COCO captions "
                                "file or webdataset shards)")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json" and _is_coco(path):
        root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
        return CocoCaptionsDataset(path, root, transform)
    if ext in (".jsonl", ".json", ".csv"):
        return ManifestDataset(path, transform, patch_size=patch_size, image_root=image_root)
    raise ValueError(f"cannot tell what {path} holds: expected .jsonl/.json/.csv, .tar shards or a directory of them")
