"""The attribute-ceiling rankers of bus bench quality (benchmarks/quality_oracle.py) on hand-made scenes whose
expected R@1 is worked out by hand, and on generated data against a brute-force re-computation."""

import random
from types import SimpleNamespace

import pytest

from bus_benchmarks.quality_oracle import RANKERS, oracle_txt2img_r1
from bus_model.data import SyntheticDataset
from bus_model.data.synthetic import SceneObject


def _obj(size, colour, shape):
    return SceneObject(shape=shape, colour=colour, size=size, cx=0.5, cy=0.5, radius=0.1)


def _scene(objects, mentioned=(0, 1)):
    return SimpleNamespace(objects=objects, mentioned=mentioned)


def test_hand_made_scenes():
    # scene 0 mentions a small red circle and a large blue square.
    # scene 1 shows a red square and a blue circle (same colours and shapes, swapped: only binding tells).
    # scene 2 shows a small red circle and a large blue square too, plus a distractor, but mentions a green cross.
    s0 = _scene([_obj("small", "red", "circle"), _obj("large", "blue", "square")])
    s1 = _scene([_obj("small", "red", "square"), _obj("large", "blue", "circle")])
    s2 = _scene([_obj("small", "green", "cross"), _obj("small", "red", "circle"), _obj("large", "blue", "square")],
                mentioned=(0, 1))
    r = oracle_txt2img_r1([s0, s1, s2])
    # caption 0 {red, blue}: all three images qualify -> 1/3; caption 1 {red, blue}: 1/3;
    # caption 2 {green, red}: only image 2 -> 1
    assert r["colours"] == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)
    # unbound colours+shapes: caption 0 {red, blue, circle, square}: all three -> 1/3; caption 1 likewise;
    # caption 2 {green, red, cross, circle}: image 2 -> 1
    assert r["colours + shapes, unbound"] == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)
    # colour-shape bound: caption 0 {(red, circle), (blue, square)}: images 0 and 2 -> 1/2; caption 1
    # {(red, square), (blue, circle)}: image 1 -> 1; caption 2 {(green, cross), (red, circle)}: image 2 -> 1
    assert r["colour-shape bound"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    assert r["size-colour-shape bound"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    # size-colour bound: caption 0 {(small, red), (large, blue)}: images 0, 1, 2 -> 1/3; caption 1 the same
    # set -> 1/3; caption 2 {(small, green), (small, red)}: image 2 -> 1
    assert r["size-colour bound"] == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)
    assert set(r) == set(RANKERS)


@pytest.mark.parametrize("n", [1, 7, 64])
def test_generated_data_matches_a_brute_force_count(n):
    seed = random.randrange(1000)
    ds = SyntheticDataset(n, seed=seed, split="test", image_size=64, patch_size=8, difficulty="hard")
    samples = [ds.sample(i) for i in range(n)]
    r = oracle_txt2img_r1(samples)
    for name in ("colours", "size-colour-shape bound"):
        total = 0.0
        for s in samples:
            wanted = [s.objects[m] for m in s.mentioned]
            if name == "colours":
                count = sum(all(any(o.colour == w.colour for o in t.objects) for w in wanted) for t in samples)
            else:
                count = sum(all(any((o.size, o.colour, o.shape) == (w.size, w.colour, w.shape) for o in t.objects)
                                for w in wanted) for t in samples)
            total += 1 / count
        assert r[name] == pytest.approx(total / n)
    # more knowledge never lowers the ceiling
    assert r["colours"] <= r["colours + shapes, unbound"] + 1e-12
    assert r["size-colour bound"] <= r["size-colour-shape bound"] + 1e-12
    assert r["colour-shape bound"] <= r["size-colour-shape bound"] + 1e-12
    if n == 1:
        assert all(v == 1.0 for v in r.values())


@pytest.mark.parametrize("bad, err", [([], ValueError), ("abc", ValueError), ([object()], TypeError),
                                       ([_scene([_obj("small", "red", "circle")], mentioned=(0, 3))], ValueError)])
def test_bad_input(bad, err):
    with pytest.raises(err, match="samples"):
        oracle_txt2img_r1(bad)
