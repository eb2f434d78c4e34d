"""Embedded synthetic image-caption data with exact per-patch relevance labels.

Stands in for a real VLP corpus on a laptop and in tests: every sample is a pure function of
``(seed, split, index)``, generated in well under a millisecond at 64x64 (numpy, vectorised), with no
files. It exercises everything BUS needs:

* ITC / ITM / MLM / PrefixLM: a caption naming the size, colour and shape of two objects and their
  spatial relation, e.g. ``"a small red circle left of a large blue square"``.
* PTM (BUS Sec. 3.3, patch-text matching): ``patch_labels`` marks exactly the patches of the
  ``image_size / patch_size`` grid that contain at least one pixel of an object the caption mentions.
* Retrieval: ``split="test"`` draws from a different random stream than ``"train"`` (held out).

Every scene also holds distractors the caption does not mention, so the caption-relevant patches are
a minority (``relevant_share``: about 16% of a 64 px image's 8 px patches at ``"standard"``) and text
guidance has something to select. ``difficulty`` sets them (``DIFFICULTIES``):

* ``"easy"``: 1-2 distractors of random attributes.
* ``"standard"`` (default): 2-3 distractors; the first reuses a mentioned object's colour (another
  shape), the second a mentioned object's shape (another colour): retrieval cannot be solved by colour
  alone, only the combination of attributes plus the relation identifies the image.
* ``"hard"``: 3-4 distractors, every one echoing a mentioned colour or shape.

No distractor matches a mentioned object in all of size, colour and shape, so the caption names its
objects unambiguously.

``scene`` sets the layout (``SCENES``):

* ``"standard"`` (default): the scenes above, 3-5 objects.
* ``"cluttered"``: 12-16 smaller objects (radii ``CLUTTER_RADIUS_SCALE`` x ``SIZES``), the caption still
  names 2. The first ``CLUTTER_ECHO`` distractors echo a mentioned object's colour, its shape, or both
  (another size), in turn; the rest are random. The objects cover more patches than a 25% keep budget
  holds, so an image-only (saliency) selector cannot keep them all and random masking often drops a whole
  mentioned object: the scene where knowing the caption can pay off (``synthetic_stats.random_keep_loss`` measures it).
  ``difficulty`` applies to the standard scene only.

Geometry (normalised units, image side = 1): an object has a centre ``(cx, cy)`` and a radius ``r``.
A pixel in row ``i``, column ``j`` of an ``S x S`` image is inside the object when its centre
``u = (j + 0.5) / S - cx``, ``v = (i + 0.5) / S - cy`` satisfies

* circle:   ``u^2 + v^2 <= r^2``
* square:   ``max(|u|, |v|) <= 0.8 r``
* diamond:  ``|u| + |v| <= r``
* triangle: ``-r <= v <= r`` and ``|u| <= (v + r) / 2`` (apex up)
* cross:    ``(|u| <= r/3 and |v| <= r) or (|v| <= r/3 and |u| <= r)``

Objects never overlap (centres are at least ``r_a + r_b + gap`` apart), so none is occluded. The
relation ``"A left of B"`` holds when ``cx_A + margin < cx_B`` (``right of``, ``above`` = smaller
``cy``, ``below`` likewise), with ``margin = RELATION_MARGIN``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "diamond", "triangle", "cross")
SIZES = {"small": 0.065, "medium": 0.095, "large": 0.13}  # radius as a fraction of the image side
COLOURS = {  # RGB, uint8; saturated so the textured grey background never looks like an object
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 215, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 15),
    "cyan": (30, 200, 215),
    "white": (245, 245, 245),
}
RELATIONS = ("left of", "right of", "above", "below")
TEMPLATES = (  # {a}, {b}: "a small red circle"; {rel}: one of RELATIONS
    "{a} {rel} {b}",
    "{a} is {rel} {b}",
    "there is {a} {rel} {b}",
    "{a} placed {rel} {b}",
    "an image of {a} {rel} {b}",
)
SPLITS = {"train": 0, "val": 1, "test": 2}
RELATION_MARGIN = 0.1  # normalised distance between centres along the relation's axis
GAP = 0.03  # smallest free space between two objects (normalised)
MAX_DISTRACTORS = 3  # at "standard"
CLUTTER_RADIUS_SCALE = 0.7  # "cluttered": every size's radius x this (small 2.9 px at 64 px)
CLUTTER_GAP = 0.02  # "cluttered": smallest free space between two objects
CLUTTER_ECHO = 8  # "cluttered": distractors that echo a mentioned object's colour, shape or both


@dataclass(frozen=True)
class Difficulty:
    """How a scene's distractors are drawn: between ``min_distractors`` and ``max_distractors`` of them
    (uniform); ``echo`` of them (the first ones) reuse a mentioned object's colour or shape, the rest
    have random attributes."""

    min_distractors: int
    max_distractors: int
    echo: int
    echo_kinds: tuple[int, ...] = (0, 1)  # cycled over the echoing distractors (``_distractor_attributes``)
    radius_scale: float = 1.0  # every object's radius = SIZES[size] x this
    gap: float = GAP  # smallest free space between two objects


DIFFICULTIES = {
    "easy": Difficulty(1, 2, 0),
    "standard": Difficulty(2, MAX_DISTRACTORS, 2),
    "hard": Difficulty(3, 4, 4),
}
# scene -> its distractor rule (None: the one ``difficulty`` names)
SCENES = {
    "standard": None,
    "cluttered": Difficulty(10, 14, CLUTTER_ECHO, echo_kinds=(0, 1, 3), radius_scale=CLUTTER_RADIUS_SCALE,
                            gap=CLUTTER_GAP),
}


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene. ``cx, cy, radius`` are normalised to the image side (0..1)."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float

    @property
    def phrase(self) -> str:
        """``"a small red circle"`` (``"an"`` before a vowel)."""
        article = "an" if self.size[0] in "aeiou" else "a"
        return f"{article} {self.size} {self.colour} {self.shape}"

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]


@dataclass
class SyntheticSample:
    """image: (S, S, 3) uint8. patch_labels: (S/p * S/p,) float32, row-major over the patch grid (the
    order of a ViT's flattened patch tokens); 1 where the patch shows a mentioned object.
    objects: every object drawn; ``mentioned`` holds the indices of the caption's two objects
    (subject first) and ``relation`` the relation between them."""

    image: np.ndarray
    caption: str
    patch_labels: np.ndarray
    objects: list[SceneObject]
    mentioned: tuple[int, int]
    relation: str
    index: int
    split: str


def _check_geometry(image_size: object, patch_size: object) -> tuple[int, int]:
    for name, value in (("image_size", image_size), ("patch_size", patch_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels for legible shapes, got {image_size}")
    if image_size % patch_size != 0:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    return image_size, patch_size


def _check_difficulty(difficulty: object) -> Difficulty:
    if not isinstance(difficulty, str):
        raise TypeError(f"difficulty must be a str, got {type(difficulty).__name__}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
    return DIFFICULTIES[difficulty]


def _check_scene(scene: object, difficulty: object) -> Difficulty:
    """The distractor rule of ``(scene, difficulty)``; ``difficulty`` is checked too."""
    if not isinstance(scene, str):
        raise TypeError(f"scene must be a str, got {type(scene).__name__}")
    if scene not in SCENES:
        raise ValueError(f"scene must be one of {sorted(SCENES)}, got {scene!r}")
    level = _check_difficulty(difficulty)
    if SCENES[scene] is None:
        return level
    if difficulty != "standard":
        raise ValueError(f"difficulty applies to scene='standard' only, got scene={scene!r} with "
                         f"difficulty={difficulty!r}")
    return SCENES[scene]


def _check_index_args(seed: object, index: object, split: object) -> None:
    for name, value in (("seed", seed), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")


class _Draws:
    """Scalar random draws served from one block of uniforms: one generator call instead of dozens
    (each ``Generator`` call costs microseconds, which dominates a 64x64 sample)."""

    def __init__(self, rng: np.random.Generator, block: int = 64):
        self.rng, self.block = rng, block
        self.values, self.pos = rng.random(block).tolist(), 0

    def uniform(self, lo: float = 0.0, hi: float = 1.0) -> float:
        if self.pos == len(self.values):
            self.values, self.pos = self.rng.random(self.block).tolist(), 0
        v = self.values[self.pos]
        self.pos += 1
        return lo + (hi - lo) * v

    def choice(self, n: int) -> int:
        return min(int(self.uniform() * n), n - 1)


_COLOUR_NAMES = tuple(COLOURS)
_SIZE_NAMES = tuple(SIZES)


def _place(draws: _Draws, radius: float, placed: list[SceneObject], tries: int = 32, gap: float = GAP):
    """A centre for a new object of ``radius`` that keeps ``gap`` from every placed one, or None after
    ``tries`` rejected candidates. Plain Python: with at most 16 objects this beats array set-up."""
    lo, hi = radius + 0.01, 1.0 - radius - 0.01
    for _ in range(tries):
        cx, cy = draws.uniform(lo, hi), draws.uniform(lo, hi)
        if all((cx - o.cx) ** 2 + (cy - o.cy) ** 2 >= (o.radius + radius + gap) ** 2 for o in placed):
            return cx, cy
    return None


def _valid_relations(a: SceneObject, b: SceneObject) -> list[str]:
    """Relations ``"a REL b"`` that hold with ``RELATION_MARGIN`` to spare."""
    rels = []
    if a.cx + RELATION_MARGIN < b.cx:
        rels.append("left of")
    if a.cx > b.cx + RELATION_MARGIN:
        rels.append("right of")
    if a.cy + RELATION_MARGIN < b.cy:
        rels.append("above")
    if a.cy > b.cy + RELATION_MARGIN:
        rels.append("below")
    return rels


def _attributes(draws: _Draws) -> tuple[str, str, str]:
    shape = SHAPES[draws.choice(len(SHAPES))]
    colour = _COLOUR_NAMES[draws.choice(len(_COLOUR_NAMES))]
    return shape, colour, _SIZE_NAMES[draws.choice(len(_SIZE_NAMES))]


def _distractor_attributes(draws: _Draws, kind: int, ref: SceneObject) -> tuple[str, str, str]:
    """kind 0: ``ref``'s colour, another shape; 1: ``ref``'s shape, another colour; 2: anything;
    3: ``ref``'s colour and shape, another size."""
    shape, colour, size = _attributes(draws)
    if kind == 3:
        shape, colour = ref.shape, ref.colour
        size = _SIZE_NAMES[(_SIZE_NAMES.index(ref.size) + 1 + draws.choice(len(_SIZE_NAMES) - 1)) % len(_SIZE_NAMES)]
    elif kind == 0:
        colour = ref.colour
        shape = SHAPES[(SHAPES.index(ref.shape) + 1 + draws.choice(len(SHAPES) - 1)) % len(SHAPES)]
    elif kind == 1:
        shape = ref.shape
        n = len(_COLOUR_NAMES)
        colour = _COLOUR_NAMES[(_COLOUR_NAMES.index(ref.colour) + 1 + draws.choice(n - 1)) % n]
    return shape, colour, size


def make_scene(seed: int, index: int, split: str = "train", difficulty: str = "standard",
               scene: str = "standard") -> tuple[list[SceneObject], tuple[int, int], str, str]:
    """The resolution-independent part of a sample: (objects, mentioned indices, relation, caption).

    The same ``(seed, split, index, difficulty, scene)`` gives the same scene at every image size."""
    _check_index_args(seed, index, split)
    level = _check_scene(scene, difficulty)
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index)])
    return _make_scene(rng, level)[:4]


def _make_scene(rng: np.random.Generator, level: Difficulty = DIFFICULTIES["standard"]):
    draws = _Draws(rng)
    objects: list[SceneObject] = []
    scale, gap = level.radius_scale, level.gap
    # The two mentioned objects, with distinct descriptions; an empty canvas always fits two.
    while len(objects) < 2:
        shape, colour, size = _attributes(draws)
        if objects and (shape, colour, size) == (objects[0].shape, objects[0].colour, objects[0].size):
            continue
        radius = SIZES[size] * scale
        centre = _place(draws, radius, objects, gap=gap)
        if centre is None:
            continue
        obj = SceneObject(shape, colour, size, centre[0], centre[1], radius)
        # the pair needs a relation: always true at full radii (centres >= 0.16 apart, > margin on one axis),
        # not at the cluttered scene's smaller ones, where a pair too close on both axes is redrawn
        if objects and not _valid_relations(objects[0], obj):
            continue
        objects.append(obj)
    a, b = objects
    relations = _valid_relations(a, b)  # non-empty (above)
    relation = relations[draws.choice(len(relations))]

    # Distractors: the first ``level.echo`` echo a mentioned object's colour / shape (/ both), in turn (hard
    # negatives for a colour-only or shape-only matcher); none repeats a mentioned object's full description.
    taken = {(o.shape, o.colour, o.size) for o in objects}
    n_distractors = level.min_distractors + draws.choice(level.max_distractors - level.min_distractors + 1)
    kinds = level.echo_kinds
    # a crowded canvas may have no room for a large shape: redraw (the cluttered scene, which must reach
    # its minimum count, tries longer)
    attempts = 4 if level.min_distractors <= MAX_DISTRACTORS else 16
    for k in range(n_distractors):
        for _attempt in range(attempts):
            ref = objects[draws.choice(2)]
            shape, colour, size = _distractor_attributes(draws, kinds[k % len(kinds)] if k < level.echo else 2, ref)
            if (shape, colour, size) in taken:
                continue
            radius = SIZES[size] * scale
            centre = _place(draws, radius, objects, gap=gap)
            if centre is not None:
                objects.append(SceneObject(shape, colour, size, centre[0], centre[1], radius))
                break

    template = TEMPLATES[draws.choice(len(TEMPLATES))]
    caption = template.format(a=a.phrase, rel=relation, b=b.phrase)
    return objects, (0, 1), relation, caption, draws


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean inside-test for pixel-centre offsets ``u`` (1, w), ``v`` (h, 1) -> (h, w)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        return np.maximum(au, av) <= 0.8 * r
    if shape == "diamond":
        return au + av <= r
    if shape == "triangle":
        return (v >= -r) & (v <= r) & (au <= (v + r) / 2)
    if shape == "cross":
        t = r / 3
        return ((au <= t) & (av <= r)) | ((av <= t) & (au <= r))
    raise ValueError(f"unknown shape {shape!r}")


def object_mask(obj: SceneObject, image_size: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """Pixels of ``obj`` in an ``image_size``-square image: (row slice, col slice) and the boolean mask
    (h, w) inside that window."""
    s = image_size
    y0 = max(math.floor((obj.cy - obj.radius) * s) - 1, 0)
    y1 = min(math.ceil((obj.cy + obj.radius) * s) + 1, s)
    x0 = max(math.floor((obj.cx - obj.radius) * s) - 1, 0)
    x1 = min(math.ceil((obj.cx + obj.radius) * s) + 1, s)
    v = ((np.arange(y0, y1) + 0.5) / s - obj.cy)[:, None]  # (h, 1)
    u = ((np.arange(x0, x1) + 0.5) / s - obj.cx)[None, :]  # (1, w)
    return (slice(y0, y1), slice(x0, x1)), _shape_mask(obj.shape, u, v, obj.radius)


def _background(draws: _Draws, rng: np.random.Generator, s: int) -> np.ndarray:
    """A low-saturation textured background, (s, s, 3) uint8: a grey base with a slight tint, a random
    pattern (stripes at a random angle, a checkerboard or smooth waves) and pixel noise. Every pattern
    is separable (outer products of 1-D waves), which keeps 224 px cheap. Values stay inside
    [0.18, 0.78] * 255 by construction, so no clipping is needed."""
    base = draws.uniform(0.35, 0.6)
    amp = draws.uniform(0.04, 0.1)
    freq = 2 * np.pi * draws.uniform(3.0, 9.0)
    kind = draws.choice(3)
    t = ((np.arange(s, dtype=np.float32) + 0.5) / s).astype(np.float32)  # (s,) pixel centres
    if kind == 0:  # stripes: sin(f (x cos a + y sin a)) = sin(X) cos(Y) + cos(X) sin(Y)
        angle = draws.uniform(0.0, np.pi)
        xs, ys = freq * np.cos(angle) * t, freq * np.sin(angle) * t
        pattern = np.outer(np.cos(ys), np.sin(xs)) + np.outer(np.sin(ys), np.cos(xs))
    elif kind == 1:  # checkerboard
        pattern = np.outer(np.sign(np.sin(freq * t)), np.sign(np.sin(freq * t)))
    else:  # smooth waves: product of two low-frequency waves
        fx, fy = draws.uniform(2.0, 8.0), draws.uniform(2.0, 8.0)
        px, py = draws.uniform(0.0, 6.3), draws.uniform(0.0, 6.3)
        pattern = np.outer(np.sin(fy * t + py), np.sin(fx * t + px))
    noise = rng.random((s, s), dtype=np.float32)  # uniform 0..1
    grey = (255.0 * (base - 0.03) + 0.5) + (255.0 * amp) * pattern + (255.0 * 0.06) * noise  # (s, s)
    image = np.empty((s, s, 3), dtype=np.uint8)
    for c in range(3):  # add the tint per channel straight into uint8 (truncation of a value >= 0)
        np.add(grey, 255.0 * draws.uniform(-0.04, 0.04), out=image[:, :, c], casting="unsafe")
    return image


def patch_grid_labels(mask: np.ndarray, patch_size: int) -> np.ndarray:
    """(S, S) bool pixel mask -> (S/p * S/p,) float32: 1 where any pixel of the patch is set."""
    s = mask.shape[0]
    g = s // patch_size
    return mask.reshape(g, patch_size, g, patch_size).any(axis=(1, 3)).reshape(-1).astype(np.float32)


def render_sample(seed: int, index: int, *, split: str = "train", image_size: int = 64,
                  patch_size: int = 8, difficulty: str = "standard", scene: str = "standard") -> SyntheticSample:
    """Generate sample ``index`` of ``split`` for ``seed``.

    Args:
        seed: int >= 0, the dataset's seed.
        index: int >= 0, the sample's position.
        split: ``"train"``, ``"val"`` or ``"test"`` (independent random streams: held-out splits).
        image_size: side S of the square image in pixels (>= 32, a multiple of ``patch_size``).
        patch_size: side p of a ViT patch; labels are on the (S/p) x (S/p) grid.
        difficulty: ``"easy"``, ``"standard"`` or ``"hard"`` (``DIFFICULTIES``: the distractors).
        scene: ``"standard"`` or ``"cluttered"`` (``SCENES``: 12-16 objects; ``difficulty`` must then be
            ``"standard"``).

    Returns:
        SyntheticSample with ``image`` (S, S, 3) uint8 and ``patch_labels`` (S/p * S/p,) float32.
    """
    _check_geometry(image_size, patch_size)
    _check_index_args(seed, index, split)
    level = _check_scene(scene, difficulty)
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index)])
    objects, mentioned, relation, caption, draws = _make_scene(rng, level)

    image = _background(draws, rng, image_size)  # (S, S, 3) uint8
    relevant = np.zeros((image_size, image_size), dtype=bool)
    for k, obj in enumerate(objects):
        window, mask = object_mask(obj, image_size)
        image[window][mask] = obj.rgb
        if k in mentioned:
            relevant[window] |= mask
    labels = patch_grid_labels(relevant, patch_size)
    return SyntheticSample(image, caption, labels, objects, mentioned, relation, int(index), split)


class SyntheticDataset(torch.utils.data.Dataset):
    """Map-style dataset of ``num_samples`` synthetic samples (see module docstring).

    ``dataset[i]`` is a dict: ``image`` (3, S, S) float32 normalised with ``mean``/``std``, ``caption``
    str, ``patch_labels`` (S/p * S/p,) float32, ``id`` ``"synthetic-{split}-{seed}-{i}"`` (with
    ``-{difficulty}`` and ``-{scene}`` appended unless they are ``"standard"``). Images are generated at the
    target size, so no crop or resize is applied (a crop could cut a mentioned object out and make the caption
    false). ``scene="cluttered"``: 12-16 objects per image (module docstring).
    """

    def __init__(self, num_samples: int, *, seed: int = 0, split: str = "train", image_size: int = 64,
                 patch_size: int = 8, mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
                 std: tuple[float, float, float] = (0.5, 0.5, 0.5), difficulty: str = "standard",
                 scene: str = "standard"):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int):
            raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        _check_geometry(image_size, patch_size)
        _check_index_args(seed, 0, split)
        _check_scene(scene, difficulty)
        from .transforms import check_mean_std

        self.num_samples, self.seed, self.split = num_samples, seed, split
        self.image_size, self.patch_size, self.difficulty = image_size, patch_size, difficulty
        self.scene = scene
        mean_t, std_t = check_mean_std(mean, std)
        self._scale = (1.0 / (255.0 * std_t)).view(3, 1, 1)
        self._shift = (-mean_t / std_t).view(3, 1, 1)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, index: int) -> SyntheticSample:
        """The raw sample (uint8 image, scene objects) behind ``self[index]``."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a dataset of {self.num_samples} samples")
        return render_sample(self.seed, index, split=self.split, image_size=self.image_size,
                             patch_size=self.patch_size, difficulty=self.difficulty, scene=self.scene)

    def __getitem__(self, index: int) -> dict:
        s = self.sample(index)
        # (S, S, 3) uint8 -> (3, S, S) float32 (x / 255 - mean) / std, as one copy and one fused op
        image = torch.from_numpy(s.image).permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)
        image = torch.addcmul(self._shift, image, self._scale)
        return {
            "image": image,
            "caption": s.caption,
            "patch_labels": torch.from_numpy(s.patch_labels),
            "id": f"synthetic-{self.split}-{self.seed}-{index}"
                  + ("" if self.difficulty == "standard" else f"-{self.difficulty}")
                  + ("" if self.scene == "standard" else f"-{self.scene}"),
        }


def relevant_share(num_samples: int = 200, *, seed: int = 0, split: str = "test", image_size: int = 64,
                   patch_size: int = 8, difficulty: str = "standard", scene: str = "standard") -> float:
    """Mean share of an image's patches that show a caption-mentioned object, over the first
    ``num_samples`` samples: the share a perfect text-guided selector needs to keep."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    shares = [render_sample(seed, i, split=split, image_size=image_size, patch_size=patch_size,
                            difficulty=difficulty, scene=scene).patch_labels.mean() for i in range(num_samples)]
    return float(np.mean(shares))
