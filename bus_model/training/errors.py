"""The exceptions the training application turns into one ``bus <command>: error: ...`` line (see
ARCHITECTURE.md): ``UsageError`` (exit status 2) for a bad command line, ``RunError`` (exit status 1)
for a run that cannot go on (a full disk, no valid checkpoint to resume). ``bus_model.data.DataError``
(unusable data) is reported like a ``RunError``."""

from __future__ import annotations


class UsageError(Exception):
    """A bad command line (missing data path, unknown model, inconsistent flags): ``bus`` prints the
    message and exits with status 2, without a traceback."""


class RunError(Exception):
    """A run that cannot go on for a reason outside the command line (a checkpoint that cannot be written,
    no valid checkpoint to resume from): ``bus`` prints the message and exits with status 1, without a
    traceback. The message says what was kept on disk and what to do."""
