"""Small helpers shared by the Triton launchers."""

from __future__ import annotations

import contextlib

import torch

from .. import _capture


# Plain integer arithmetic: triton.next_power_of_2 / triton.cdiv are jit-able functions whose host call
# costs several microseconds each (issue 23: host time per call).
def next_pow2(n: int) -> int:
    """The smallest power of two >= max(n, 1)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def tile_rows(block_cols: int, budget: int = 4096, max_rows: int = 64) -> int:
    """Rows per tile so that a (rows, block_cols) fp32 tile stays within ``budget`` elements."""
    return max(1, min(max_rows, budget // block_cols))


def on_device(t: torch.Tensor):
    """Context for launching Triton kernels on ``t``'s GPU: Triton launches on the *current* CUDA device
    and its current stream, so tensors on another GPU (``cuda:1`` while device 0 is current) would be
    read with the wrong device's context. A no-op for CPU tensors (the interpreter) and when ``t``'s GPU is
    already the current one (the common case: no device switch on the host)."""
    if not t.is_cuda or t.device.index == torch.cuda.current_device():
        return _NO_SWITCH
    return torch.cuda.device(t.device)


_NO_SWITCH = contextlib.nullcontext()


# Small read-only constant tensors the launchers pass to their kernels, by (shape, value, dtype, device):
# built once instead of an allocation and a fill on every call. Bounded (oldest dropped first). Neither read
# nor written while torch.compile traces (the fill goes into the graph as before) or while a CUDA graph is
# captured: the fill is then captured with the kernels that read it, so no replay reads a cached tensor that
# a later eviction may have freed.
_CONSTANTS: dict[tuple, torch.Tensor] = {}
_MAX_CONSTANTS = 64


def constant(shape: tuple[int, ...], value: int | float, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """A tensor of ``shape`` filled with ``value`` on ``like``'s device, never to be written to."""
    if torch.compiler.is_compiling() or _capture.capturing(like):
        return torch.full(shape, value, dtype=dtype, device=like.device)
    key = (shape, value, dtype, like.device)
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) >= _MAX_CONSTANTS:
            del _CONSTANTS[next(iter(_CONSTANTS))]
        t = _CONSTANTS[key] = torch.full(shape, value, dtype=dtype, device=like.device)
    return t
