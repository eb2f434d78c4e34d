"""Image decoding for real data, and the record of samples skipped because their image was bad.

A real corpus always has a few missing or broken images. They must never stop a run: a dataset returns
a ``SkippedSample`` in place of the sample, the collate function drops it and lists it in the batch
(``batch["skipped"]``), and the training loop collects those lists in a ``SkipReport``, which counts
each sample key once. Passing the record through the batch is what makes the count right with
DataLoader worker processes, which share no state with the main process.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from dataclasses import dataclass

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


class SkipReport:
    """The samples a run left out, each counted once: one entry per sample key (the image path of a
    manifest row, ``"<shard>/<key>"`` in a webdataset shard, the shard path for a broken shard).

    A key seen again (the next epoch re-reads the same broken file, another DataLoader worker or rank
    meets it) does not count again; the first record (reason, detail) is kept. Worker processes share
    no state with the main process, so the records travel back inside the batch (``batch["skipped"]``)
    and the main process dedupes them here; ranks merge their reports at the end (``merge``).

    Args:
        max_examples: how many records ``summary()`` lists.
    """

    def __init__(self, max_examples: int = 20):
        if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 0:
            raise ValueError(f"max_examples must be an int >= 0, got {max_examples!r}")
        self.max_examples = max_examples
        self._by_key: dict[str, SkippedSample] = {}  # insertion order = first seen

    def update(self, skipped) -> int:
        """Add an iterable of ``SkippedSample`` (e.g. ``batch["skipped"]``); returns how many were new."""
        new = 0
        for s in skipped:
            if not isinstance(s, SkippedSample):
                raise TypeError(f"skipped must hold SkippedSample records, got {type(s).__name__}")
            if s.key not in self._by_key:
                self._by_key[s.key] = s
                new += 1
        return new

    def merge(self, other: "SkipReport") -> None:
        """Add another report's records (e.g. another rank's), keeping each key once."""
        if not isinstance(other, SkipReport):
            raise TypeError(f"other must be a SkipReport, got {type(other).__name__}")
        self.update(other.records)

    @property
    def records(self) -> list[SkippedSample]:
        """Every unique skipped sample, first seen first."""
        return list(self._by_key.values())

    @property
    def examples(self) -> list[SkippedSample]:
        """The first ``max_examples`` records."""
        return self.records[: self.max_examples]

    @property
    def counts(self) -> Counter:
        """Unique skipped samples per reason."""
        return Counter(s.reason for s in self._by_key.values())

    @property
    def total(self) -> int:
        return len(self._by_key)

    def state(self) -> list[list[str]]:
        """JSON-able records ``[[key, reason, detail], ...]`` (for a checkpoint)."""
        return [[s.key, s.reason, s.detail] for s in self._by_key.values()]

    @classmethod
    def from_state(cls, state, max_examples: int = 20) -> "SkipReport":
        """Inverse of ``state()``. Raises ValueError for anything else."""
        report = cls(max_examples)
        if not isinstance(state, (list, tuple)):
            raise ValueError(f"a SkipReport state is a list of [key, reason, detail], got {type(state).__name__}")
        for entry in state:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and all(isinstance(v, str) for v in entry)):
                raise ValueError(f"a SkipReport state entry is [key, reason, detail] (strings), got {entry!r}")
            report.update([SkippedSample(*entry)])
        return report

    def summary(self) -> str:
        """One line per reason with a few example keys, then every key up to ``max_examples`` (for the end
        of a run's log)."""
        if not self.total:
            return "skipped samples: none"
        lines = [f"skipped samples: {self.total} (each counted once)"]
        for reason, n in sorted(self.counts.items()):
            lines.append(f"  {reason}: {n}")
        for s in self.examples:
            lines.append(f"  {s.key}: {s.reason}" + (f" ({s.detail})" if s.detail else ""))
        if self.total > len(self.examples):
            lines.append(f"  ... and {self.total - len(self.examples)} more (all of them in summary.json)")
        return "\n".join(lines)
