"""Environment variables read on every op call (``BUS_KERNELS_BACKEND``, ``BUS_KERNELS_AUTOTUNE``), so that a
change is seen at once, at a small fraction of ``os.environ.get``'s cost: that re-encodes the name on every
call, about a microsecond, as much as the rest of a cached backend choice (issue 23: host time per call)."""

from __future__ import annotations

import os

# os.environ's own dict (encoded names -> encoded values), kept up to date by os.environ[...] = / del /
# monkeypatch.setenv; absent on platforms where os.environ is something else, which take os.environ.get.
_DATA = getattr(os.environ, "_data", None)
_ENCODED: dict[str, object] = {}


def getenv(name: str) -> str | None:
    """``os.environ.get(name)``."""
    if _DATA is None:
        return os.environ.get(name)
    key = _ENCODED.get(name)
    if key is None:
        key = _ENCODED[name] = os.environ.encodekey(name)
    value = _DATA.get(key)
    return None if value is None else os.environ.decodevalue(value)
