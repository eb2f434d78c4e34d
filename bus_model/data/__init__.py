"""Data for BUS pre-training: synthetic shapes with patch labels, real-data loaders, tokenizers, batching.

* ``SyntheticDataset`` — procedural image-caption pairs with exact PTM patch labels, no files.
* ``ManifestDataset`` (JSONL/JSON/CSV), ``CocoCaptionsDataset``, ``WebDatasetShards`` (tar shards) —
  real data; broken images are skipped and reported, never fatal.
* ``ImageTransform`` — torchvision crop/resize + normalisation; ``patch_labels_from_boxes``.
* ``build_synthetic_tokenizer`` / ``load_tokenizer`` / ``save_tokenizer``.
* ``build_dataset("synthetic" | path, ...)`` — the loader a ``--data`` argument names.
* ``Collator`` — the batch dict the model consumes; ``SkipReport`` counts each skipped sample once.
* ``ReadMonitor`` / ``DataError`` — stop with a clear error when the data cannot fill batches.

torchvision, PIL and transformers are imported only when a real-data transform, an image decode or a
tokenizer is used, so importing this package needs just torch and numpy.
"""

from .coco import CocoCaptionsDataset, read_coco_captions, retrieval_groups
from .collate import Collator
from .decode import SkippedSample, SkipReport, load_rgb
from .factory import build_dataset
from .health import DataError, ReadMonitor
from .manifest import CaptionImageDataset, ManifestDataset, ManifestRecord, read_manifest
from .synthetic import SyntheticDataset, SyntheticSample, render_sample
from .tokenizer import (
    build_synthetic_tokenizer,
    load_tokenizer,
    save_tokenizer,
    synthetic_vocabulary,
    text_config_overrides,
)
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, patch_labels_from_boxes
from .webdataset import WebDatasetShards, expand_shards

__all__ = [
    "CaptionImageDataset",
    "CocoCaptionsDataset",
    "Collator",
    "DataError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageTransform",
    "ManifestDataset",
    "ManifestRecord",
    "ReadMonitor",
    "SkipReport",
    "SkippedSample",
    "SyntheticDataset",
    "SyntheticSample",
    "WebDatasetShards",
    "build_dataset",
    "build_synthetic_tokenizer",
    "expand_shards",
    "load_rgb",
    "load_tokenizer",
    "patch_labels_from_boxes",
    "read_coco_captions",
    "read_manifest",
    "render_sample",
    "retrieval_groups",
    "save_tokenizer",
    "synthetic_vocabulary",
    "text_config_overrides",
]
