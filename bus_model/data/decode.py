"""Image decoding for real data, and the record of samples skipped because their image was bad.

A real corpus always has a few missing or broken images. They must never stop a run: a dataset returns
a ``SkippedSample`` in place of the sample, the collate function drops it and lists it in the batch
(``batch["skipped"]``), and the training loop sums those lists in a ``SkipReport``. Passing the record
through the batch is what makes the count right with DataLoader worker processes, which share no state
with the main process.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from dataclasses import dataclass, field

MISSING = "missing"
DECODE_ERROR = "decode_error"
NO_CAPTION = "no_caption"


@dataclass(frozen=True)
class SkippedSample:
    """A sample left out: ``key`` (its path or shard/key), ``reason`` (``"missing"``,
    ``"decode_error"``, ``"no_caption"``) and ``detail`` (the underlying error message)."""

    key: str
    reason: str
    detail: str = ""


class ImageLoadError(Exception):
    """An image could not be read; ``reason`` is ``MISSING`` or ``DECODE_ERROR``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def load_rgb(source: str | os.PathLike | bytes):
    """Decode an image file path or encoded bytes to an RGB ``PIL.Image`` (fully loaded).

    Raises ``ImageLoadError`` (never anything else for a bad file): ``MISSING`` when the path does not
    exist, ``DECODE_ERROR`` when the bytes are not a decodable image (truncated, corrupt, not an image).
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (bytes, bytearray)):
        stream = io.BytesIO(source)
    else:
        if not os.path.isfile(source):
            raise ImageLoadError(MISSING, f"no such file: {os.fspath(source)}")
        stream = source
    try:
        with Image.open(stream) as img:
            img.load()  # decode now: a truncated file fails here, not later in a transform
            return img.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as err:
        # PIL raises OSError for truncated data, SyntaxError for some broken headers, DecompressionBombError
        # for absurd dimensions
        raise ImageLoadError(DECODE_ERROR, f"{err.__class__.__name__}: {err}") from None


@dataclass
class SkipReport:
    """Running total of skipped samples: counts per reason and the first ``max_examples`` records."""

    max_examples: int = 20
    counts: Counter = field(default_factory=Counter)
    examples: list[SkippedSample] = field(default_factory=list)

    def update(self, skipped) -> None:
        """Add an iterable of ``SkippedSample`` (e.g. ``batch["skipped"]``)."""
        for s in skipped:
            self.counts[s.reason] += 1
            if len(self.examples) < self.max_examples:
                self.examples.append(s)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line per reason with a few example keys, e.g. for the end of a run's log."""
        if not self.total:
            return "skipped samples: none"
        lines = [f"skipped samples: {self.total}"]
        for reason, n in sorted(self.counts.items()):
            keys = [e.key for e in self.examples if e.reason == reason][:3]
            lines.append(f"  {reason}: {n} (e.g. {', '.join(keys)})")
        return "\n".join(lines)
