"""Webdataset tar shards (the layout img2dataset writes), streamed with the standard ``tarfile`` module.

A shard is a tar file whose members are grouped into samples by key: ``000123.jpg``, ``000123.txt``,
``000123.json`` form sample ``000123`` (the key is the member path up to the first dot of its file
name; the rest is the extension). The image is the first of ``jpg``/``jpeg``/``png``/``webp``; the
caption is ``txt``, else ``json["caption"]``; optional ``json["boxes"]`` (original pixels, x1 y1 x2 y2)
become PTM patch labels. Shards are read sequentially (``tarfile`` stream mode), never extracted.

Splitting, without duplicates and without loss: the consumers are the ``world_size x num_workers``
DataLoader workers of all ranks; consumer ``slot = rank * num_workers + worker_id``. With at least as
many shards as consumers, consumer ``slot`` reads shards ``slot, slot + total, ...`` (each shard read
once). With fewer shards, every consumer reads every shard and keeps the samples whose running number
is ``slot`` mod ``total``. Either way each sample reaches exactly one consumer. Shard order is shuffled
with ``(seed, epoch)`` when asked (the same order on every consumer, so the split stays a partition).
Note that consumers may get unequal numbers of samples; the training loop bounds the steps.

Broken data never stops the stream: a sample whose image is absent or undecodable, or that has no
caption, is yielded as a ``SkippedSample`` (dropped and reported by the collate function), and a
truncated or corrupt shard yields one ``SkippedSample`` for the shard and the stream moves on.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from typing import Iterator

import numpy as np
import torch

from .decode import DECODE_ERROR, MISSING, NO_CAPTION, ImageLoadError, SkippedSample, load_rgb
from .transforms import ImageTransform, check_image_size, patch_labels_from_boxes

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(spec) -> list[str]:
    """Shard paths from ``spec``: a list of paths, a directory (its ``*.tar``, sorted), a glob
    (``data/*.tar``) or a brace range (``data/{00000..00009}.tar``, zero padding kept).

    Raises FileNotFoundError when nothing matches or a listed shard does not exist."""
    if isinstance(spec, (list, tuple)):
        paths = [os.fspath(p) for p in spec]
    else:
        spec = os.fspath(spec)
        m = _BRACE.search(spec)
        if m:
            lo, hi = m.group(1), m.group(2)
            width = len(lo)
            paths = [spec[: m.start()] + str(i).zfill(width) + spec[m.end():] for i in range(int(lo), int(hi) + 1)]
        elif os.path.isdir(spec):
            paths = sorted(glob.glob(os.path.join(spec, "*.tar")))
        elif any(c in spec for c in "*?["):
            paths = sorted(glob.glob(spec))
        else:
            paths = [spec]
    if not paths:
        raise FileNotFoundError(f"no tar shards found for {spec!r}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) not found, e.g. {missing[0]}")
    return paths


def is_shard_spec(spec: str) -> bool:
    """Whether a ``--data`` string names webdataset shards: a ``.tar`` file, a directory, a glob or a
    brace range."""
    return bool(_BRACE.search(spec)) or any(c in spec for c in "*?[") or os.path.isdir(spec) or spec.endswith(".tar")


def _split_name(name: str) -> tuple[str, str]:
    """``"dir/000123.jpg"`` -> (``"dir/000123"``, ``"jpg"``); the extension is everything after the
    first dot of the file name, lower-cased."""
    directory, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return os.path.join(directory, stem) if directory else stem, ext.lower() if dot else ""


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream ``(key, {extension: bytes})`` from one shard, grouping consecutive members by key.

    Raises ``tarfile.TarError`` / ``OSError`` / ``EOFError`` if the shard is corrupt or truncated (after
    yielding the samples before the damage). ``tarfile`` itself ends an archive silently when it is cut
    inside a member header; for an uncompressed shard the bytes after the last member are checked, so
    that cut is reported too (``tarfile.ReadError``)."""
    with open(path, "rb") as f:
        plain = not f.read(6).startswith(_COMPRESSED_MAGIC)
    key, files = None, {}
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, ext = _split_name(member.name)
            if k != key and files:
                yield key, files
                files = {}
            key = k
            data = tar.extractfile(member)
            files[ext] = data.read() if data is not None else b""
        end = tar.offset  # where the next header would start
    if files:
        yield key, files
    if plain:
        with open(path, "rb") as f:
            f.seek(end)
            tail = f.read(1024)
        if any(tail):  # a clean archive ends in zero blocks (or nothing); non-zero bytes are a cut header
            raise tarfile.ReadError(f"truncated: a partial member header at byte {end}")


def _distributed_slot(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1
    return rank, world_size


class WebDatasetShards(torch.utils.data.IterableDataset):
    """Stream image-caption samples from webdataset shards, split across ranks and DataLoader workers.

    Args:
        shards: anything ``expand_shards`` takes.
        transform: an ``ImageTransform``.
        patch_size: ViT patch size; samples whose json has ``boxes`` then get ``patch_labels``.
        rank, world_size: this process's place among the data-parallel ranks (default: from
            ``torch.distributed`` if initialised, else 0 of 1).
        shuffle_shards: shuffle the shard order each epoch (seeded by ``seed`` and ``set_epoch``).
        seed: int seed for the shard order and the sample shuffle buffer.
        shuffle_buffer: > 0 to shuffle samples within a consumer through a buffer of this size.

    Yields dicts ``image`` (3, H, W) float32, ``caption`` str, ``patch_labels`` (N,) float32 or None,
    ``id`` ``"<shard>/<key>"``; or ``SkippedSample`` for broken data.
    """

    def __init__(self, shards, transform: ImageTransform, *, patch_size: int | None = None, rank: int | None = None,
                 world_size: int | None = None, shuffle_shards: bool = False, seed: int = 0, shuffle_buffer: int = 0):
        super().__init__()
        self.shards = expand_shards(shards)
        if not callable(transform):
            raise TypeError(f"transform must be callable (an ImageTransform), got {type(transform).__name__}")
        if patch_size is not None:
            check_image_size(transform.image_size, patch_size)
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if world_size is not None and not (isinstance(world_size, int) and world_size >= 1 and
                                           isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be an int >= 0, got {shuffle_buffer!r}")
        self.transform, self.patch_size = transform, patch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle_shards, self.seed, self.shuffle_buffer = shuffle_shards, seed, shuffle_buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch's shard order (call before iterating, on every rank)."""
        self.epoch = int(epoch)

    def _consumer(self) -> tuple[int, int]:
        rank, world = _distributed_slot(self.rank, self.world_size)
        info = torch.utils.data.get_worker_info()
        workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
        return rank * workers + worker_id, world * workers

    def _shard_order(self) -> list[str]:
        order = list(self.shards)
        if self.shuffle_shards:
            rng = np.random.default_rng([self.seed, self.epoch])
            order = [order[i] for i in rng.permutation(len(order))]
        return order

    def _raw_stream(self, slot: int, total: int) -> Iterator[tuple[str, str, dict[str, bytes] | None]]:
        """``(shard, key, files)`` for this consumer's samples; ``files`` None marks a broken shard."""
        order = self._shard_order()
        by_shard = len(order) >= total
        mine = order[slot::total] if by_shard else order
        counter = 0
        for shard in mine:
            try:
                for key, files in iter_tar_samples(shard):
                    if not by_shard:
                        counter += 1
                        if (counter - 1) % total != slot:
                            continue
                    yield shard, key, files
            except (tarfile.TarError, OSError, EOFError) as err:
                # only one consumer reports a broken shard read by all of them
                if by_shard or slot == 0:
                    yield shard, f"{err.__class__.__name__}: {err}", None

    def _decode(self, shard: str, key: str, files: dict[str, bytes]):
        sample_id = f"{os.path.basename(shard)}/{key}"
        meta = {}
        if "json" in files:
            try:
                meta = json.loads(files["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                meta = {}
        caption = files["txt"].decode("utf-8", errors="replace").strip() if "txt" in files else None
        if not caption and isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            caption = meta["caption"].strip()
        if not caption:
            return SkippedSample(sample_id, NO_CAPTION, "no txt member and no json caption")
        ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
        if ext is None:
            return SkippedSample(sample_id, MISSING, f"no image member ({', '.join(IMAGE_EXTENSIONS)})")
        try:
            image = load_rgb(files[ext])
        except ImageLoadError as err:
            return SkippedSample(sample_id, err.reason, err.detail)
        boxes = meta.get("boxes") if isinstance(meta, dict) and self.patch_size is not None else None
        tensor, moved = self.transform(image, boxes)
        labels = patch_labels_from_boxes(moved, self.transform.image_size, self.patch_size) if boxes else None
        return {"image": tensor, "caption": caption, "patch_labels": labels, "id": sample_id}

    def __iter__(self):
        slot, total = self._consumer()
        rng = np.random.default_rng([self.seed, self.epoch, slot, 1])
        buffer = []
        for shard, key, files in self._raw_stream(slot, total):
            item = (SkippedSample(shard, DECODE_ERROR, f"corrupt shard: {key}") if files is None
                    else self._decode(shard, key, files))
            if self.shuffle_buffer <= 1:
                yield item
                continue
            buffer.append(item)
            if len(buffer) >= self.shuffle_buffer:
                j = int(rng.integers(len(buffer)))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()
        while buffer:
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()
