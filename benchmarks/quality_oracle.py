"""What held-out retrieval on the synthetic task demands: the text->image R@1 of idealised rankers that see
only some of a scene's attributes (``bus bench quality`` reports them next to the trained models).

Each ranker knows, for every candidate image, the set of features its objects show, and for a caption the
features of the two objects it mentions. It ranks first the images whose feature set contains all of the
caption's (the caption's own image always does) and breaks ties uniformly at random, so its expected
R@1 for that caption is ``1 / (number of images that qualify)``. A model can only beat a ranker's number by
knowing more than that ranker does: e.g. the R@1 of a perfect "which colours are present" ranker is the
ceiling of a model that has not learned shapes or which colour goes with which shape (binding).
"""

from __future__ import annotations

from typing import Callable, Sequence

# name -> the features one object contributes to its scene's (or its caption's) feature set
RANKERS: dict[str, Callable] = {
    "colours": lambda o: {("colour", o.colour)},
    "colours + shapes, unbound": lambda o: {("colour", o.colour), ("shape", o.shape)},
    "size-colour bound": lambda o: {(o.size, o.colour)},
    "colour-shape bound": lambda o: {(o.colour, o.shape)},
    "size-colour-shape bound": lambda o: {(o.size, o.colour, o.shape)},
}


def _feature_set(objects, features: Callable) -> frozenset:
    out: set = set()
    for o in objects:
        out |= features(o)
    return frozenset(out)


def oracle_txt2img_r1(samples: Sequence) -> dict[str, float]:
    """Expected text->image R@1 of each ranker of ``RANKERS`` over ``samples``.

    Args:
        samples: the held-out candidates, ``SyntheticSample`` s (``objects``: every object drawn, with
            ``shape``, ``colour``, ``size``; ``mentioned``: the indices of the caption's two objects). Each
            sample's caption is a query and every sample's image a candidate.

    Returns:
        ``{ranker name: mean over captions of 1 / |images whose features contain the caption's|}``.
    """
    if isinstance(samples, (str, bytes)) or not hasattr(samples, "__len__") or len(samples) == 0:
        raise ValueError("samples must be a non-empty sequence of SyntheticSample")
    for i, s in enumerate(samples):
        if not hasattr(s, "objects") or not hasattr(s, "mentioned"):
            raise TypeError(f"samples[{i}] must be a SyntheticSample (objects, mentioned), got {type(s).__name__}")
        if not all(0 <= m < len(s.objects) for m in s.mentioned):
            raise ValueError(f"samples[{i}].mentioned {tuple(s.mentioned)} indexes outside its {len(s.objects)} objects")
    out = {}
    for name, features in RANKERS.items():
        images = [_feature_set(s.objects, features) for s in samples]
        total = 0.0
        for s in samples:
            query = _feature_set([s.objects[m] for m in s.mentioned], features)
            total += 1.0 / sum(query <= image for image in images)
        out[name] = total / len(samples)
    return out
