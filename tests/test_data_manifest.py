"""Real-data loaders: JSONL/JSON/CSV manifests and COCO captions; broken images are skipped and reported."""

import csv
import json
import tarfile

import pytest
import torch

from bus_model.data import (
    CocoCaptionsDataset,
    Collator,
    ImageTransform,
    ManifestDataset,
    SkipReport,
    read_coco_captions,
    read_manifest,
    retrieval_groups,
)
from bus_model.data.tokenizer import build_synthetic_tokenizer

PIL = pytest.importorskip("PIL.Image")


def _write_images(root, n, size=(40, 30)):
    """n small images with distinct flat colours, alternating jpg/png; returns names and colours."""
    root.mkdir(parents=True, exist_ok=True)
    names, colours = [], []
    for i in range(n):
        name = f"img{i}.{'jpg' if i % 2 else 'png'}"
        colour = (20 * i % 256, 255 - 13 * i % 256, 90)
        PIL.new("RGB", size, colour).save(root / name)
        names.append(name)
        colours.append(colour)
    return names, colours


@pytest.fixture
def corpus(tmp_path):
    names, colours = _write_images(tmp_path / "images", 6)
    (tmp_path / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3)
    rows = [{"image": f"images/{n}", "caption": f"picture number {i}"} for i, n in enumerate(names)]
    rows[2]["boxes"] = [[0, 0, 10, 10], [30, 20, 40, 30]]
    rows.insert(3, {"image": "images/corrupt.jpg", "caption": "broken file"})
    rows.insert(5, {"image": "images/missing.png", "caption": "no such file"})
    return tmp_path, rows, colours


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption", "boxes"])
        writer.writeheader()
        for r in rows:
            boxes = json.dumps(r["boxes"]) if "boxes" in r else ""
            writer.writerow({"image": r["image"], "caption": r["caption"], "boxes": boxes})
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "json"])
def test_manifest_skips_corrupt_and_missing_images_and_reports_both(corpus, fmt):
    root, rows, colours = corpus
    path = root / f"manifest.{fmt}"
    if fmt == "jsonl":
        _write_jsonl(path, rows)
    elif fmt == "csv":
        _write_csv(path, rows)
    else:
        path.write_text(json.dumps(rows))
    ds = ManifestDataset(path, ImageTransform(32, train=False, mean=(0, 0, 0), std=(1, 1, 1)), patch_size=8)
    assert len(ds) == 8
    assert [s.key for s in ds.missing_files()] == [str(root / "images" / "missing.png")]
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=0,
                                         collate_fn=Collator(build_synthetic_tokenizer(), image_size=32, patch_size=8))
    report, captions, images, labels = SkipReport(), [], [], []
    for batch in loader:
        report.update(batch["skipped"])
        captions += batch["captions"]
        images.append(batch["images"])
        labels.append(batch["patch_labels"][batch["has_patch_labels"]])
    assert captions == [f"picture number {i}" for i in range(6)]
    assert report.total == 2 and dict(report.counts) == {"decode_error": 1, "missing": 1}
    assert {e.key for e in report.examples} == {str(root / "images" / "corrupt.jpg"), str(root / "images" / "missing.png")}
    assert "decode_error: 1" in report.summary() and "missing: 1" in report.summary()
    # images arrive decoded in manifest order (flat colours survive jpeg to within a few levels)
    images = torch.cat(images)
    for i, colour in enumerate(colours):
        torch.testing.assert_close(images[i].mean(dim=(1, 2)), torch.tensor(colour) / 255.0, atol=4 / 255, rtol=0)
    # the one row with boxes: a 40x30 image resized to 32x32, patch 8 -> boxes (0,0,8,10.7) and (24,21.3,32,32)
    labels = torch.cat(labels)
    want = torch.zeros(4, 4)
    want[0, 0] = want[1, 0] = 1  # first box spans rows 0..10.7 -> patch rows 0 and 1
    want[2, 3] = want[3, 3] = 1
    assert labels.shape == (1, 16) and torch.equal(labels[0], want.reshape(-1))


def test_karpathy_style_json_expands_caption_lists(tmp_path):
    names, _ = _write_images(tmp_path, 2)
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"image": names[0], "caption": ["one", "two"]}, {"image": names[1], "caption": "three"}]))
    records = read_manifest(path)
    assert [r.caption for r in records] == ["one", "two", "three"]
    assert [r.key for r in records] == ["1:0", "1:1", "2"]
    assert records[0].image == str(tmp_path / names[0])


def test_image_root_overrides_manifest_directory(tmp_path):
    names, _ = _write_images(tmp_path / "elsewhere", 1)
    path = _write_jsonl(tmp_path / "m.jsonl", [{"image_path": names[0], "text": "hello"}])
    assert read_manifest(path, image_root=tmp_path / "elsewhere")[0].image == str(tmp_path / "elsewhere" / names[0])


def test_manifest_errors_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(tmp_path / "absent.jsonl")
    bad_ext = tmp_path / "m.txt"
    bad_ext.write_text("x")
    with pytest.raises(ValueError, match=r"\.jsonl, \.json or \.csv"):
        read_manifest(bad_ext)
    path = _write_jsonl(tmp_path / "m.jsonl", [{"image": "a.jpg", "caption": "ok"}, {"image": "b.jpg"}])
    with pytest.raises(ValueError, match="line 2: no caption"):
        read_manifest(path)
    path.write_text('{"image": "a.jpg", "caption": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        read_manifest(path)
    _write_jsonl(path, [{"image": "a.jpg", "caption": "ok", "boxes": [[5, 5, 1, 1]]}])
    with pytest.raises(ValueError, match="x2 >= x1"):
        read_manifest(path)
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("image,label\na.jpg,x\n")
    with pytest.raises(ValueError, match="caption column"):
        read_manifest(csv_path)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        read_manifest(empty)
    with pytest.raises(TypeError, match="transform"):
        ManifestDataset(_write_jsonl(tmp_path / "ok.jsonl", [{"image": "a.jpg", "caption": "ok"}]), transform=None)


def _coco(tmp_path):
    names, _ = _write_images(tmp_path / "val2017", 3)
    data = {
        "images": [{"id": 10 + i, "file_name": n, "width": 40, "height": 30} for i, n in enumerate(names)],
        "annotations": [
            {"id": 1, "image_id": 11, "caption": "A second image. "},
            {"id": 2, "image_id": 10, "caption": "the first"},
            {"id": 3, "image_id": 11, "caption": "again the second"},
            {"id": 4, "image_id": 12, "caption": "third"},
        ],
    }
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(data))
    return path, names


def test_coco_captions_parse_and_group(tmp_path):
    path, names = _coco(tmp_path)
    records = read_coco_captions(path, tmp_path / "val2017")
    assert [r.caption for r in records] == ["A second image.", "the first", "again the second", "third"]
    assert [r.key for r in records] == ["11:1", "10:2", "11:3", "12:4"]
    assert records[0].image == str(tmp_path / "val2017" / names[1]) and records[0].boxes is None
    images, caption_to_image = retrieval_groups(records)
    assert images == [str(tmp_path / "val2017" / n) for n in (names[1], names[0], names[2])]
    assert caption_to_image == [0, 1, 0, 2]
    ds = CocoCaptionsDataset(path, tmp_path / "val2017", ImageTransform(16, train=False))
    item = ds[1]
    assert item["image"].shape == (3, 16, 16) and item["caption"] == "the first" and item["patch_labels"] is None


def test_coco_bad_inputs(tmp_path):
    path, _ = _coco(tmp_path)
    with pytest.raises(FileNotFoundError, match="annotation file"):
        read_coco_captions(tmp_path / "nope.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="image_root"):
        read_coco_captions(path, tmp_path / "no_dir")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "x", "caption": "y"}]))
    with pytest.raises(ValueError, match="not a COCO captions file"):
        read_coco_captions(bad, tmp_path)
    bad.write_text(json.dumps({"images": [], "annotations": [{"id": 7, "image_id": 3, "caption": "x"}]}))
    with pytest.raises(ValueError, match="unknown image_id 3"):
        read_coco_captions(bad, tmp_path)


def test_build_dataset_picks_the_loader_from_the_path(tmp_path):
    from bus_model.data import CocoCaptionsDataset, SyntheticDataset, WebDatasetShards, build_dataset

    kw = dict(image_size=32, patch_size=8)
    syn = build_dataset("synthetic", split="test", num_samples=12, seed=4, **kw)
    assert isinstance(syn, SyntheticDataset) and len(syn) == 12 and syn.split == "test"
    names, _ = _write_images(tmp_path, 2)
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"image": n, "caption": f"c{i}"} for i, n in enumerate(names)])
    ds = build_dataset(manifest, **kw)
    assert isinstance(ds, ManifestDataset) and ds.transform.train and ds[1]["caption"] == "c1"
    assert not build_dataset(manifest, split="test", **kw).transform.train
    coco, _ = _coco(tmp_path)
    assert isinstance(build_dataset(coco, image_root=tmp_path / "val2017", **kw), CocoCaptionsDataset)
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "00000.tar", "w"):
        pass
    assert isinstance(build_dataset(tmp_path / "shards", **kw), WebDatasetShards)
    with pytest.raises(FileNotFoundError, match="data path not found"):
        build_dataset(tmp_path / "nothing.jsonl", **kw)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="cannot tell"):
        build_dataset(tmp_path / "notes.txt", **kw)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_dataset("synthetic", image_size=36, patch_size=8)
