"""Webdataset tar shards (img2dataset layout): streaming, rank/worker split without duplicates or loss,
broken samples and shards skipped and reported."""

import io
import json
import tarfile

import pytest
import torch

from bus_model.data import Collator, ImageTransform, SkipReport, WebDatasetShards, expand_shards
from bus_model.data.tokenizer import build_synthetic_tokenizer
from bus_model.data.webdataset import iter_tar_samples

PIL = pytest.importorskip("PIL.Image")


def _jpeg(colour, size=(20, 16)):
    buf = io.BytesIO()
    PIL.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _make_shards(root, num_shards, per_shard, *, corrupt=(), caption_in_json=()):
    """Shards like img2dataset writes: {key}.jpg, {key}.txt, {key}.json per sample. Returns the keys of
    the good samples."""
    root.mkdir(parents=True, exist_ok=True)
    good = []
    for s in range(num_shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for j in range(per_shard):
                key = f"{s:05d}{j:04d}"
                meta = {"key": key, "status": "success", "url": f"http://example.invalid/{key}.jpg"}
                if key in caption_in_json:
                    meta["caption"] = f"caption {key}"
                else:
                    _add(tar, f"{key}.txt", f"caption {key}".encode())
                _add(tar, f"{key}.jpg", b"garbage, not a jpeg" if key in corrupt else _jpeg((s * 40 % 256, j * 9 % 256, 7)))
                _add(tar, f"{key}.json", json.dumps(meta).encode())
                if key not in corrupt:
                    good.append(key)
    return good


def _stream(ds, num_workers):
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers, collate_fn=lambda x: x)
    return list(loader)


def _ids(items):
    return [it["id"].split("/")[1] for it in items if isinstance(it, dict)]


@pytest.fixture(scope="module")
def transform():
    return ImageTransform(16, train=False)


def test_tar_samples_group_members_by_key(tmp_path):
    good = _make_shards(tmp_path, 1, 3)
    samples = list(iter_tar_samples(str(tmp_path / "00000.tar")))
    assert [k for k, _ in samples] == good
    assert all(set(files) == {"txt", "jpg", "json"} for _, files in samples)


@pytest.mark.parametrize("num_shards,per_shard", [(4, 5), (1, 11)])  # split by shard / by sample
def test_two_workers_split_without_duplicates_or_loss(tmp_path, transform, num_shards, per_shard):
    good = _make_shards(tmp_path, num_shards, per_shard)
    items = _stream(WebDatasetShards(tmp_path, transform), num_workers=2)
    ids = _ids(items)
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(good)
    item = next(it for it in items if isinstance(it, dict))
    assert item["image"].shape == (3, 16, 16) and item["caption"] == f"caption {item['id'].split('/')[1]}"


@pytest.mark.parametrize("num_shards", [5, 2])
def test_ranks_times_workers_partition_the_data(tmp_path, transform, num_shards):
    good = _make_shards(tmp_path, num_shards, 3)
    per_rank = [_ids(_stream(WebDatasetShards(tmp_path, transform, rank=r, world_size=2), num_workers=2)) for r in range(2)]
    assert per_rank[0] and per_rank[1]
    assert not set(per_rank[0]) & set(per_rank[1])
    everything = per_rank[0] + per_rank[1]
    assert len(everything) == len(set(everything)) and sorted(everything) == sorted(good)


def test_shuffled_shards_and_buffer_keep_the_same_samples(tmp_path, transform):
    good = _make_shards(tmp_path, 6, 2)
    ds = WebDatasetShards(str(tmp_path / "{00000..00005}.tar"), transform, shuffle_shards=True, seed=3, shuffle_buffer=4)
    orders = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        ids = _ids(_stream(ds, num_workers=0))
        assert sorted(ids) == sorted(good)
        orders.append(ids)
    assert orders[0] != orders[1]
    ds.set_epoch(0)
    assert _ids(_stream(ds, num_workers=0)) == orders[0]  # the epoch fixes the order


def test_broken_samples_and_truncated_shards_are_skipped_and_reported(tmp_path, transform):
    good = _make_shards(tmp_path, 2, 4, corrupt={"000000002"}, caption_in_json={"000010001"})
    # a third shard cut off in the middle of a member
    full = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00002.tar").write_bytes(full[: len(full) // 2 + 100])
    tok = build_synthetic_tokenizer()
    loader = torch.utils.data.DataLoader(WebDatasetShards(tmp_path, transform), batch_size=3, num_workers=2,
                                         collate_fn=Collator(tok, image_size=16, patch_size=8))
    report, ids = SkipReport(), []
    for batch in loader:
        report.update(batch["skipped"])
        ids += [i.split("/")[1] for i in batch["ids"] if i.startswith(("00000", "00001"))]
    assert sorted(ids) == sorted(good)  # caption taken from json where there is no txt
    assert report.counts["decode_error"] == 2  # the corrupt jpeg and the truncated shard
    keys = {e.key for e in report.examples}
    assert "00000.tar/000000002" in keys and str(tmp_path / "00002.tar") in keys


def test_boxes_in_json_become_patch_labels(tmp_path):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        _add(tar, "a.jpg", _jpeg((1, 2, 3), size=(32, 32)))
        _add(tar, "a.txt", b"with boxes")
        _add(tar, "a.json", json.dumps({"boxes": [[17, 1, 30, 6]]}).encode())
    item = next(iter(WebDatasetShards(tmp_path, ImageTransform(32, train=False), patch_size=16)))
    assert item["patch_labels"].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_bad_arguments(tmp_path, transform):
    with pytest.raises(FileNotFoundError, match="no tar shards"):
        expand_shards(str(tmp_path / "*.tar"))
    with pytest.raises(FileNotFoundError, match="not found"):
        expand_shards(str(tmp_path / "{00000..00002}.tar"))
    _make_shards(tmp_path, 1, 1)
    with pytest.raises(ValueError, match="rank"):
        WebDatasetShards(tmp_path, transform, rank=2, world_size=2)
    with pytest.raises(ValueError, match="both rank and world_size"):
        WebDatasetShards(tmp_path, transform, rank=0)
    with pytest.raises(ValueError, match="shuffle_buffer"):
        WebDatasetShards(tmp_path, transform, shuffle_buffer=-1)
    with pytest.raises(TypeError, match="transform"):
        WebDatasetShards(tmp_path, None)
