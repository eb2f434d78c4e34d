"""Input checks shared by every public op.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape, value
or device) with a message that starts with the argument's name, so a user sees at once which
argument is wrong and why.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, value: object) -> torch.Tensor:
    """``value`` must be a ``torch.Tensor``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_rank(name: str, value: torch.Tensor, rank: int, layout: str) -> None:
    """``value`` must have ``rank`` dimensions; ``layout`` (e.g. ``"(B, N, C)"``) is quoted in the error."""
    if value.dim() != rank:
        raise ValueError(f"{name} must have shape {layout} ({rank} dims), got shape {tuple(value.shape)}")


def check_float(name: str, value: torch.Tensor, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    """``value`` must have one of the floating dtypes ``dtypes``."""
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have a floating dtype ({allowed}), got {value.dtype}")


def check_dtype(name: str, value: torch.Tensor, dtype: torch.dtype) -> None:
    if value.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {value.dtype}")


def check_same_device(named: Iterable[tuple[str, torch.Tensor]]) -> torch.device:
    """All tensors must live on one device; returns it."""
    named = list(named)
    first_name, first = named[0]
    device = first.device
    for name, t in named[1:]:
        if t.device != device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {device}; all inputs must be on one device"
            )
    return device


def check_dim_size(name: str, value: torch.Tensor, dim: int, size: int, what: str) -> None:
    """``value.shape[dim]`` must equal ``size`` (``what`` names where that size comes from)."""
    if value.shape[dim] != size:
        raise ValueError(
            f"{name} has size {value.shape[dim]} in dim {dim} (shape {tuple(value.shape)}), expected {size} ({what})"
        )


def is_number(value: object) -> bool:
    """A real number given as a Python ``int`` or ``float`` (NumPy's ``float64`` is one), never a ``bool``:
    ``isinstance(True, int)`` holds, so ``True`` (a JSON ``true``, a flag passed in the wrong place)
    would otherwise pass as 1. The one such check for every package (``bus_model`` and the
    benchmarks import it from here: ``bus_kernels`` imports nothing of theirs)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """``value`` must be a Python int (or 0-dim integer tensor) within ``[low, high]``."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_floating_point:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low or high is not None and value > high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value
