"""Synthetic image-caption data: determinism, exact PTM patch labels, caption/scene consistency, hardness."""

import re

import numpy as np
import pytest
import torch

from bus_model.data import synthetic
from bus_model.data.synthetic import SyntheticDataset, make_scene, render_sample

CAPTION_RE = re.compile(
    r"^(?:there is |an image of )?an? (\w+) (\w+) (\w+) (?:is |placed )?"
    r"(left of|right of|above|below) an? (\w+) (\w+) (\w+)$"
)


def _reference_mask(obj, size):
    """Pixel mask of one object from the geometry stated in the module docstring (torch float64)."""
    c = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    v = (c - obj.cy)[:, None].expand(size, size)
    u = (c - obj.cx)[None, :].expand(size, size)
    r = obj.radius
    if obj.shape == "circle":
        return u**2 + v**2 <= r**2
    if obj.shape == "square":
        return torch.maximum(u.abs(), v.abs()) <= 0.8 * r
    if obj.shape == "diamond":
        return u.abs() + v.abs() <= r
    if obj.shape == "triangle":
        return (v >= -r) & (v <= r) & (u.abs() <= 0.5 * (v + r))
    if obj.shape == "cross":
        return ((u.abs() <= r / 3) & (v.abs() <= r)) | ((v.abs() <= r / 3) & (u.abs() <= r))
    raise AssertionError(obj.shape)


def _reference_labels(mask, patch):
    g = mask.shape[0] // patch
    out = torch.zeros(g * g)
    for row in range(g):
        for col in range(g):
            out[row * g + col] = float(bool(mask[row * patch:(row + 1) * patch, col * patch:(col + 1) * patch].any()))
    return out


def _find(objects, size, colour, shape):
    return [o for o in objects if (o.size, o.colour, o.shape) == (size, colour, shape)]


def test_same_seed_and_index_give_identical_samples():
    for index in (0, 7, 123456):
        a = render_sample(3, index, image_size=64, patch_size=8)
        b = render_sample(3, index, image_size=64, patch_size=8)
        assert np.array_equal(a.image, b.image)
        assert a.caption == b.caption
        assert np.array_equal(a.patch_labels, b.patch_labels)
        assert a.objects == b.objects
    ds1, ds2 = SyntheticDataset(20, seed=5), SyntheticDataset(20, seed=5)
    for i in (0, 13, 19):
        x, y = ds1[i], ds2[i]
        assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"]
        assert torch.equal(x["patch_labels"], y["patch_labels"])


def test_seed_and_split_change_the_sample():
    base = render_sample(0, 4)
    assert not np.array_equal(base.image, render_sample(1, 4).image)
    assert not np.array_equal(base.image, render_sample(0, 4, split="test").image)
    # held-out split: no test image equals a train image
    train = {render_sample(0, i).image.tobytes() for i in range(300)}
    test = {render_sample(0, i, split="test").image.tobytes() for i in range(100)}
    assert not train & test


@pytest.mark.parametrize("size,patch", [(64, 8), (96, 16), (72, 24), (224, 16)])
def test_patch_labels_mark_exactly_the_mentioned_objects(size, patch):
    rng = np.random.default_rng(size)
    for index in rng.integers(0, 10**6, size=6 if size < 224 else 2):
        s = render_sample(11, int(index), image_size=size, patch_size=patch)
        assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
        assert s.patch_labels.shape == ((size // patch) ** 2,) and s.patch_labels.dtype == np.float32
        union = torch.zeros(size, size, dtype=torch.bool)
        for k, obj in enumerate(s.objects):
            mask = _reference_mask(obj, size)
            assert mask.any(), "every object must cover at least one pixel"
            # the image shows the object exactly where its geometry says (no occlusion)
            pixels = torch.from_numpy(s.image)[mask]
            assert torch.equal(pixels, torch.tensor(obj.rgb, dtype=torch.uint8).expand_as(pixels))
            if k in s.mentioned:
                union |= mask
        expected = _reference_labels(union, patch)
        assert torch.equal(torch.from_numpy(s.patch_labels), expected)
        assert 0 < expected.sum() < expected.numel()


def test_captions_name_unique_objects_and_true_relations():
    for index in range(300):
        objects, mentioned, relation, caption = make_scene(2, index)
        m = CAPTION_RE.match(caption)
        assert m, caption
        size_a, colour_a, shape_a, rel, size_b, colour_b, shape_b = m.groups()
        assert rel == relation
        match_a, match_b = _find(objects, size_a, colour_a, shape_a), _find(objects, size_b, colour_b, shape_b)
        assert len(match_a) == 1 and len(match_b) == 1, caption  # the caption is unambiguous
        a, b = match_a[0], match_b[0]
        assert (a, b) == (objects[mentioned[0]], objects[mentioned[1]])
        margin = synthetic.RELATION_MARGIN
        holds = {
            "left of": a.cx + margin < b.cx,
            "right of": a.cx > b.cx + margin,
            "above": a.cy + margin < b.cy,
            "below": a.cy > b.cy + margin,
        }[rel]
        assert holds, (caption, a, b)
        # objects do not overlap
        for i, o in enumerate(objects):
            for p in objects[i + 1:]:
                assert np.hypot(o.cx - p.cx, o.cy - p.cy) >= o.radius + p.radius + synthetic.GAP - 1e-12


def test_scene_is_resolution_independent():
    for index in (1, 2, 3):
        small = render_sample(4, index, image_size=64, patch_size=8)
        big = render_sample(4, index, image_size=224, patch_size=16)
        assert small.caption == big.caption and small.objects == big.objects


def test_colour_alone_does_not_identify_the_image():
    """Distractors reuse the mentioned colours: a matcher that only checks 'both caption colours occur
    in the image' faces many candidates per caption, so it cannot retrieve the right image."""
    scenes = [make_scene(9, i, "test") for i in range(200)]
    colour_sets = [{o.colour for o in objs} for objs, *_ in scenes]
    shared_colour = shared_shape = 0
    candidates = []
    for objs, (ia, ib), _, _ in scenes:
        mentioned = [objs[ia], objs[ib]]
        distractors = [o for k, o in enumerate(objs) if k not in (ia, ib)]
        shared_colour += any(d.colour == m.colour for d in distractors for m in mentioned)
        shared_shape += any(d.shape == m.shape and d.colour != m.colour for d in distractors for m in mentioned)
        wanted = {objs[ia].colour, objs[ib].colour}
        candidates.append(sum(wanted <= cs for cs in colour_sets))
    assert shared_colour >= 190 and shared_shape >= 190
    assert np.mean(candidates) > 10, np.mean(candidates)


def test_dataset_items_are_normalised_tensors():
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    ds = SyntheticDataset(10, seed=1, split="val", image_size=64, patch_size=16, mean=mean, std=std)
    assert len(ds) == 10 and ds.num_patches == 16
    item = ds[3]
    raw = ds.sample(3)
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    std64, mean64 = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in (std, mean))
    back = item["image"].double() * std64 + mean64
    expected = torch.from_numpy(raw.image).permute(2, 0, 1).double() / 255
    torch.testing.assert_close(back, expected, atol=1e-6, rtol=0)
    assert item["patch_labels"].shape == (16,) and item["caption"] == raw.caption
    assert item["id"] == "synthetic-val-1-3"
    with pytest.raises(IndexError):
        ds[10]


@pytest.mark.parametrize(
    "kwargs,err,msg",
    [
        (dict(image_size=60, patch_size=8), ValueError, "multiple of patch_size"),
        (dict(image_size=16, patch_size=8), ValueError, "at least 32"),
        (dict(image_size=64, patch_size=0), ValueError, "patch_size"),
        (dict(image_size=64.0, patch_size=8), TypeError, "image_size"),
        (dict(split="dev"), ValueError, "split"),
        (dict(seed=-1), ValueError, "seed"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, err, msg):
    args = dict(seed=0, image_size=64, patch_size=8, split="train")
    args.update(kwargs)
    with pytest.raises(err, match=msg):
        render_sample(args["seed"], 0, split=args["split"], image_size=args["image_size"], patch_size=args["patch_size"])
    with pytest.raises(err, match=msg):
        SyntheticDataset(4, **args)


def test_dataset_bad_sizes_and_normalisation():
    with pytest.raises(ValueError, match="num_samples"):
        SyntheticDataset(0)
    with pytest.raises(ValueError, match="mean"):
        SyntheticDataset(4, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="std"):
        SyntheticDataset(4, std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="index"):
        render_sample(0, -3)


def test_difficulty_sets_the_distractors():
    """easy: 1-2 distractors, none required to echo; standard (the default, unchanged): 2-3 with echoes;
    hard: 3-4, every one sharing a mentioned object's colour or shape. The mentioned pair stays the same."""
    counts = {d: [] for d in synthetic.DIFFICULTIES}
    for index in range(120):
        default = make_scene(3, index, "val")
        assert make_scene(3, index, "val", difficulty="standard") == default
        for level in synthetic.DIFFICULTIES:
            objects, (ia, ib), relation, caption = make_scene(3, index, "val", difficulty=level)
            assert relation == default[2] and objects[:2] == default[0][:2]  # same mentioned pair and relation
            distractors = objects[2:]
            spec = synthetic.DIFFICULTIES[level]
            assert len(distractors) <= spec.max_distractors
            counts[level].append(len(distractors))
            full = {(o.shape, o.colour, o.size) for o in objects[:2]}
            assert all((d.shape, d.colour, d.size) not in full for d in distractors)
            if level == "hard":
                mentioned = objects[:2]
                assert all(any(d.colour == m.colour or d.shape == m.shape for m in mentioned) for d in distractors)
    # placement may fail on a crowded canvas, so a scene can hold fewer than the minimum, but rarely
    for level, values in counts.items():
        spec = synthetic.DIFFICULTIES[level]
        assert np.mean([v >= spec.min_distractors for v in values]) > 0.9, (level, values)
    assert np.mean(counts["easy"]) < np.mean(counts["standard"]) < np.mean(counts["hard"])


def test_relevant_patches_are_a_minority():
    """The caption-relevant share (what a perfect text-guided selector keeps) is at most 40% of the patches
    of a 64 px image in 8 px patches, recomputed here from the labels."""
    for level in synthetic.DIFFICULTIES:
        share = synthetic.relevant_share(50, seed=1, image_size=64, patch_size=8, difficulty=level)
        labels = [render_sample(1, i, split="test", image_size=64, patch_size=8, difficulty=level).patch_labels
                  for i in range(50)]
        assert share == pytest.approx(float(np.mean([lab.mean() for lab in labels])), rel=1e-6)
        assert 0.05 < share <= 0.4
    ds = SyntheticDataset(3, difficulty="hard")
    assert ds[0]["id"].endswith("-hard") and ds.sample(0).caption == make_scene(0, 0, "train", "hard")[3]


def test_bad_difficulty_raises():
    with pytest.raises(ValueError, match="difficulty"):
        render_sample(0, 0, difficulty="extreme")
    with pytest.raises(TypeError, match="difficulty"):
        SyntheticDataset(4, difficulty=2)
    with pytest.raises(ValueError, match="num_samples"):
        synthetic.relevant_share(0)
