"""The one exception the training application raises for a bad command line (see ARCHITECTURE.md)."""

from __future__ import annotations


class UsageError(Exception):
    """A bad command line (missing data path, unknown model, inconsistent flags): ``bus`` prints the
    message and exits with status 2, without a traceback."""
