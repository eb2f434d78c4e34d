"""Image transforms, box -> patch labels, and batch collation."""

import numpy as np
import pytest
import torch

from bus_model.data import Collator, ImageTransform, SkippedSample, SyntheticDataset, patch_labels_from_boxes
from bus_model.data.tokenizer import build_synthetic_tokenizer

PIL = pytest.importorskip("PIL.Image")


def _reference_box_labels(boxes, h, w, p):
    """Brute force: a patch is relevant when its intersection area with some box is positive."""
    out = torch.zeros((h // p) * (w // p))
    for r in range(h // p):
        for c in range(w // p):
            for x1, y1, x2, y2 in boxes:
                ix = min(x2, (c + 1) * p) - max(x1, c * p)
                iy = min(y2, (r + 1) * p) - max(y1, r * p)
                if ix > 0 and iy > 0:
                    out[r * (w // p) + c] = 1.0
    return out


def test_patch_labels_from_boxes_match_brute_force():
    rng = np.random.default_rng(0)
    for h, w, p in [(48, 80, 16), (56, 56, 8), (30, 45, 15)]:
        for _ in range(20):
            k = int(rng.integers(0, 4))
            boxes = np.zeros((k, 4))  # x1, y1, x2, y2, partly outside the image, fractional
            boxes[:, [0, 2]] = np.sort(rng.uniform(-3, w + 3, size=(k, 2)), axis=1)
            boxes[:, [1, 3]] = np.sort(rng.uniform(-3, h + 3, size=(k, 2)), axis=1)
            got = patch_labels_from_boxes(torch.tensor(boxes, dtype=torch.float32), (h, w), p)
            want = _reference_box_labels(torch.tensor(boxes, dtype=torch.float32).tolist(), h, w, p)
            assert torch.equal(got, want)
    # a box on a patch boundary touches, but does not overlap, the next patch
    assert patch_labels_from_boxes([[0, 0, 8, 8]], 16, 8).tolist() == [1, 0, 0, 0]
    assert patch_labels_from_boxes(None, 16, 8).tolist() == [0, 0, 0, 0]


def test_eval_transform_resizes_and_normalises():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    colour = (200, 40, 90)
    img = PIL.new("RGB", (50, 30), colour)
    out, boxes = ImageTransform((24, 40), train=False, mean=mean, std=std)(img, [[5, 3, 25, 15]])
    assert out.shape == (3, 24, 40) and out.dtype == torch.float32 and type(out) is torch.Tensor
    colour64, mean64, std64 = (torch.tensor(v, dtype=torch.float64) for v in (colour, mean, std))
    want = (colour64 / 255 - mean64) / std64
    torch.testing.assert_close(out.double().mean(dim=(1, 2)), want, atol=1e-5, rtol=0)
    # a resize scales the boxes by (40/50, 24/30)
    torch.testing.assert_close(boxes, torch.tensor([[4.0, 2.4, 20.0, 12.0]]), atol=1e-4, rtol=0)


def test_train_transform_crops_boxes_inside_canvas():
    torch.manual_seed(0)
    t = ImageTransform(32, train=True, scale=(0.3, 0.6))
    img = torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8)
    for _ in range(10):
        out, boxes = t(img, [[10, 10, 40, 50], [60, 5, 85, 30]])
        assert out.shape == (3, 32, 32)
        assert boxes.shape == (2, 4) and bool((boxes >= 0).all() and (boxes <= 32).all())
        assert bool((boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all())


def test_transform_bad_arguments():
    with pytest.raises(ValueError, match="mean"):
        ImageTransform(32, train=False, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="std"):
        ImageTransform(32, train=False, std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="scale"):
        ImageTransform(32, train=True, scale=(0.8, 0.2))
    with pytest.raises(TypeError, match="image_size"):
        ImageTransform("big", train=False)
    with pytest.raises(ValueError, match="interpolation"):
        ImageTransform(32, train=False, interpolation="lanczos9")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        patch_labels_from_boxes([[0, 0, 1, 1]], 30, 8)
    with pytest.raises(ValueError, match="boxes"):
        patch_labels_from_boxes(torch.zeros(2, 3), 32, 8)


@pytest.fixture(scope="module")
def tok():
    return build_synthetic_tokenizer()


def test_collate_shapes_padding_and_label_flags(tok):
    ds = SyntheticDataset(5, image_size=64, patch_size=16)
    items = [ds[i] for i in range(5)]
    items[1] = dict(items[1], patch_labels=None)  # e.g. a real-data sample without boxes
    items.insert(2, SkippedSample("/data/bad.jpg", "decode_error", "broken"))
    batch = Collator(tok, image_size=64, patch_size=16)(items)
    b = 5
    assert batch["images"].shape == (b, 3, 64, 64) and batch["images"].dtype == torch.float32
    assert batch["input_ids"].dtype == torch.int64 and batch["attention_mask"].dtype == torch.int64
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == b
    assert batch["patch_labels"].shape == (b, 16) and batch["patch_labels"].dtype == torch.float32
    assert batch["has_patch_labels"].tolist() == [True, False, True, True, True]
    assert bool((batch["patch_labels"][1] == -1).all())
    good = [it for it in items if not isinstance(it, SkippedSample)]
    for i, it in enumerate(good):
        assert torch.equal(batch["images"][i], it["image"])
        n = len(tok(it["caption"])["input_ids"])
        assert int(batch["attention_mask"][i].sum()) == n
        assert bool((batch["input_ids"][i, n:] == tok.pad_token_id).all())
        assert tok.decode(batch["input_ids"][i, :n], skip_special_tokens=True) == it["caption"]
        if it["patch_labels"] is not None:
            assert torch.equal(batch["patch_labels"][i], it["patch_labels"])
    assert batch["captions"] == [it["caption"] for it in good] and batch["ids"] == [it["id"] for it in good]
    assert [s.key for s in batch["skipped"]] == ["/data/bad.jpg"]


def test_collate_all_skipped_gives_an_empty_batch(tok):
    batch = Collator(tok, image_size=(32, 48), patch_size=16)([SkippedSample("k", "missing")])
    assert batch["images"].shape == (0, 3, 32, 48) and batch["patch_labels"].shape == (0, 6)
    assert batch["input_ids"].shape[0] == 0 and len(batch["skipped"]) == 1


def test_collate_with_dataloader_truncates(tok):
    ds = SyntheticDataset(7, image_size=64, patch_size=8)
    collate = Collator(tok, image_size=64, patch_size=8, max_length=6)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
    batches = list(loader)
    assert [b["images"].shape[0] for b in batches] == [4, 3]
    assert all(b["input_ids"].shape[1] == 6 for b in batches)


def test_collate_bad_arguments(tok):
    with pytest.raises(TypeError, match="tokenizer"):
        Collator(None, image_size=64, patch_size=8)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        Collator(tok, image_size=60, patch_size=8)
    with pytest.raises(ValueError, match="max_length"):
        Collator(tok, image_size=64, patch_size=8, max_length=1)
    item = SyntheticDataset(1, image_size=64, patch_size=8)[0]
    with pytest.raises(ValueError, match="expected \\(3, 32, 32\\)"):
        Collator(tok, image_size=32, patch_size=8)([item])
    with pytest.raises(ValueError, match="patch labels"):
        Collator(tok, image_size=64, patch_size=16)([item])
