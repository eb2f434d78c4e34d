"""When to give up on the data: a run must stop with one clear error, never loop forever, when its data
cannot feed it.

Skipping a broken sample is right for a corpus with a few bad files (``decode``), but skipping alone
turns into an endless retry loop when the data has too few good samples: the stream re-reads the same
broken files epoch after epoch. ``ReadMonitor`` watches the reads of one rank's stream and raises
``DataError`` when

* a whole pass over the data (an epoch started from its beginning) yields fewer readable samples than
  one batch, or no batch with enough samples to train on; or
* more than ``max_skip_share`` of the last ``window`` reads failed (a corpus that is mostly broken is
  stopped after a few hundred reads instead of a full pass over millions of files).

It counts samples as the collate function returns them (``batch["skipped"]`` plus the good ones), so it
works the same with DataLoader worker processes.
"""

from __future__ import annotations

import math
from collections import Counter, deque

from bus_kernels._validation import is_number

from .decode import SkippedSample


class DataError(RuntimeError):
    """The data cannot feed the run: too few readable samples, too many failing reads, or a DataLoader
    worker that died or stalled. The message says what was read, what was skipped and why, and what to
    do; ``bus train`` prints it as one ``error:`` line and exits with status 1."""


def _fmt_reasons(records: list[SkippedSample], limit: int = 3) -> str:
    shown = [f"{r.key}: {r.reason}" + (f" ({r.detail})" if r.detail else "") for r in records[:limit]]
    return "; ".join(shown) if shown else "none recorded"


class ReadMonitor:
    """Raise ``DataError`` when one rank's data stream cannot make batches (see the module docstring).

    Args:
        batch_size: samples per micro-batch (int >= 1).
        min_batch: the fewest samples a batch must keep to be trained on (ITC/ITM need 2).
        max_skip_share: stop when more than this share of the last ``window`` reads failed, in (0, 1];
            1 turns the check off.
        window: how many consecutive reads the share is taken over (int >= 1).
        source: how the message names the data (e.g. ``"--data train.jsonl"``).
        rank: the rank, for the message.

    Call ``start_pass(full)`` when a pass over the data opens (``full`` False when it resumes in the
    middle, whose counts cannot judge the whole pass), ``observe(good, skipped)`` after every batch the
    DataLoader returns, ``end_pass()`` when the pass is exhausted.
    """

    def __init__(self, batch_size: int, *, min_batch: int = 2, max_skip_share: float = 0.5, window: int = 256,
                 source: str = "the data", rank: int = 0):
        for name, value, low in (("batch_size", batch_size, 1), ("min_batch", min_batch, 1), ("window", window, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not is_number(max_skip_share) or not math.isfinite(max_skip_share) or not 0.0 < max_skip_share <= 1.0:
            raise ValueError(f"max_skip_share must be a number in (0, 1], got {max_skip_share!r}")
        self.batch_size, self.min_batch, self.window = batch_size, min_batch, window
        self.max_skip_share, self.source, self.rank = float(max_skip_share), source, rank
        self._recent: deque[tuple[int, int]] = deque()  # (good, skipped) per batch, newest last
        self._recent_good = self._recent_bad = 0
        self._recent_first: deque[SkippedSample] = deque(maxlen=3)  # reasons to quote for the share check
        self.start_pass(full=False)

    def start_pass(self, full: bool) -> None:
        self.full_pass = bool(full)
        self.pass_good = self.pass_skipped = self.pass_batches = 0
        self.pass_reasons: Counter = Counter()
        self.pass_first: list[SkippedSample] = []

    def observe(self, good: int, skipped: list[SkippedSample], usable: bool | None = None) -> None:
        """One batch: ``good`` samples kept, ``skipped`` the records left out of it; ``usable`` whether it
        is trained on (default: ``good >= min_batch``; the partial batch at the end of a pass is not)."""
        bad = len(skipped)
        self.pass_good += good
        self.pass_skipped += bad
        self.pass_batches += bool(good >= self.min_batch if usable is None else usable)
        for s in skipped:
            self.pass_reasons[s.reason] += 1
            if len(self.pass_first) < 3 and all(f.key != s.key for f in self.pass_first):
                self.pass_first.append(s)
            self._recent_first.append(s)
        self._recent.append((good, bad))
        self._recent_good += good
        self._recent_bad += bad
        # keep at least `window` reads: drop the oldest batch while the rest still cover the window
        while len(self._recent) > 1 and self._recent_good + self._recent_bad - sum(self._recent[0]) >= self.window:
            old_good, old_bad = self._recent.popleft()
            self._recent_good -= old_good
            self._recent_bad -= old_bad
        reads = self._recent_good + self._recent_bad
        if self.max_skip_share < 1.0 and reads >= self.window and self._recent_bad > self.max_skip_share * reads:
            raise DataError(
                f"{self.source}: {self._recent_bad} of the last {reads} samples read on rank {self.rank} could not be "
                f"used (more than --max-skip-share {self.max_skip_share:g}); last reasons: "
                f"{_fmt_reasons(list(self._recent_first))}. Fix or remove the broken files (check that the image "
                "paths resolve, see --image-root), or raise --max-skip-share to train on what is readable")

    def end_pass(self) -> None:
        """The pass ended: raise ``DataError`` if a full pass could not fill one batch."""
        if not self.full_pass:
            return
        if self.pass_good >= self.batch_size and self.pass_batches > 0:
            return
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.pass_reasons.items())) or "none"
        if self.pass_good < self.batch_size:
            what = f"fewer than one batch of --batch-size {self.batch_size}"
        else:
            what = f"no batch kept {self.min_batch} or more readable samples"
        raise DataError(
            f"{self.source}: a full pass on rank {self.rank} read {self.pass_good + self.pass_skipped} samples: "
            f"{self.pass_good} readable, {self.pass_skipped} unreadable ({reasons}): {what}. First reasons: "
            f"{_fmt_reasons(self.pass_first)}. Fix or remove the broken files (check that the image paths resolve, "
            "see --image-root), add data, or lower --batch-size")
