"""Shared test parametrisation: every backend registered for an op, skipped with the reason where it
cannot run on CPU here. Test files import this instead of listing backends themselves, so a backend
that registers later (e.g. "native") is covered by the same tests."""

from __future__ import annotations

import pytest
import torch

from bus_kernels.backends import backend_status, registered_backends


def cpu_backends(op: str) -> list:
    """pytest params, one per backend implementing ``op``; unavailable ones skip with their reason."""
    status = backend_status("cpu")
    params = []
    for name, backend in registered_backends().items():
        if op not in backend.ops:
            continue
        why = status[name]
        marks = [pytest.mark.skip(reason=f"{name}: {why}")] if why is not None else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def backend_dtypes(name: str, candidates=(torch.float32, torch.float16)) -> list[torch.dtype]:
    return [d for d in candidates if d in registered_backends()[name].dtypes]


def tolerance(dtype: torch.dtype) -> dict:
    return {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
            torch.float64: dict(atol=1e-10, rtol=1e-9)}[dtype]
