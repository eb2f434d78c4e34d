"""Launch geometry of the varlen attention kernels: tile configs, head-dim padding, the block table."""

from __future__ import annotations

import weakref
from typing import NamedTuple, Optional

import torch

from ...backends import TRITON_INTERPRET
from .._triton_utils import next_pow2


class _Config(NamedTuple):
    """Tile sizes of one kernel: rows of the query tile, rows of the key tile, warps, pipeline stages.
    (fwd and dq programs own a query tile and loop over key tiles; dkdv programs the other way round.)"""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (kernel, fp32 inputs?, BLOCK_D) -> tiles (BLOCK_M query rows, BLOCK_N key rows, warps, stages).
# Picked per head dim as the largest candidate that neither spills nor overflows shared memory on
# sm_80 and sm_90, both as `python -m bus_kernels.aot` compiles it (no alignment facts) and with the
# 16-byte divisibility the JIT infers for aligned tensors at run time. GPU timings not measured yet.
_GPU_CONFIGS = {
    ("fwd", False, 16): _Config(128, 64, 8, 3),
    ("fwd", False, 32): _Config(128, 64, 8, 3),
    ("fwd", False, 64): _Config(128, 64, 8, 3),
    ("fwd", False, 128): _Config(64, 32, 4, 2),
    ("fwd", False, 256): _Config(64, 32, 8, 1),
    ("dkdv", False, 16): _Config(64, 128, 8, 2),
    ("dkdv", False, 32): _Config(32, 64, 4, 2),
    ("dkdv", False, 64): _Config(64, 32, 4, 2),
    ("dkdv", False, 128): _Config(32, 32, 4, 1),
    ("dkdv", False, 256): _Config(16, 32, 8, 1),
    ("dq", False, 16): _Config(128, 64, 8, 2),
    ("dq", False, 32): _Config(128, 64, 8, 2),
    ("dq", False, 64): _Config(128, 64, 8, 2),
    ("dq", False, 128): _Config(64, 64, 8, 2),
    ("dq", False, 256): _Config(32, 32, 4, 1),
    ("fwd", True, 16): _Config(64, 64, 8, 2),
    ("fwd", True, 32): _Config(64, 64, 8, 2),
    ("fwd", True, 64): _Config(64, 32, 8, 2),
    ("fwd", True, 128): _Config(16, 16, 4, 1),
    ("fwd", True, 256): _Config(32, 16, 8, 1),
    ("dkdv", True, 16): _Config(64, 64, 8, 2),
    ("dkdv", True, 32): _Config(32, 32, 4, 1),
    ("dkdv", True, 64): _Config(32, 32, 4, 1),
    ("dkdv", True, 128): _Config(16, 16, 8, 1),
    ("dkdv", True, 256): _Config(16, 16, 8, 1),
    ("dq", True, 16): _Config(64, 64, 8, 2),
    ("dq", True, 32): _Config(32, 32, 4, 1),
    ("dq", True, 64): _Config(32, 32, 4, 1),
    ("dq", True, 128): _Config(16, 32, 8, 1),
    ("dq", True, 256): _Config(16, 16, 4, 1),
}
# The CPU interpreter runs one program at a time: small tiles keep the tests quick and make
# modest sequences span several blocks.
_INTERPRET_CONFIG = _Config(16, 16, 4, 1)


def _block_d(D: int) -> int:
    return max(16, next_pow2(D))  # tl.dot needs every block dim >= 16


def _config(kind: str, dtype: torch.dtype, D: int) -> _Config:
    if TRITON_INTERPRET:
        return _INTERPRET_CONFIG
    return _GPU_CONFIGS[(kind, dtype == torch.float32, _block_d(D))]


def _delta_rows(block_d: int) -> int:
    return max(16, min(128, 8192 // block_d))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (no TF32): whoever asks for fp32 attention asks for its accuracy.
    return "ieee" if dtype == torch.float32 else "tf32"


# Block tables by cu_seqlens object: {id: (weak reference, version counter, {(total, block): table})}.
_TABLES: dict[int, tuple] = {}


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter (and cannot change in place)
        return -1


def _block_table(cu_seqlens: torch.Tensor, total: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_build_block_table``, built once per ``cu_seqlens`` object (while it lives and is not changed in
    place): a model packs its tokens once and runs every layer's attention, forward and backward, on the
    same offsets, so the table's small kernels run once per packing instead of three times per layer."""
    key, version = id(cu_seqlens), _version(cu_seqlens)
    entry = _TABLES.get(key)
    if entry is None or entry[0]() is not cu_seqlens or entry[1] != version:
        entry = (weakref.ref(cu_seqlens, lambda _ref, key=key: _TABLES.pop(key, None)), version, {})
        _TABLES[key] = entry
    table = entry[2].get((total, block))
    if table is None:
        table = entry[2][(total, block)] = _build_block_table(cu_seqlens, total, block)
    return table


def _build_block_table(cu_seqlens: torch.Tensor, total: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (sequence, first row) of every ``block``-row tile of every sequence, computed on the device.

    Returns two (n,) int32 tensors, ``n = total // block + B`` (an upper bound on
    ``sum_b ceil(len_b / block)`` known without reading ``cu_seqlens`` on the host); spare entries
    have sequence -1 and their programs exit at once.
    """
    B = cu_seqlens.shape[0] - 1
    n = total // block + B
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    blocks = (lengths + block - 1) // block  # (B,)
    ends = torch.cumsum(blocks, 0)  # (B,) table entries up to and including sequence b
    entry = torch.arange(n, device=cu_seqlens.device)
    seq = torch.searchsorted(ends, entry, right=True)  # (n,) first b with ends[b] > entry
    real = seq < B
    seq_c = seq.clamp(max=max(B - 1, 0))
    start = (entry - (ends[seq_c] - blocks[seq_c])) * block
    return torch.where(real, seq, -1).to(torch.int32), torch.where(real, start, 0).to(torch.int32)


def _bias_arg(key_bias: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Kernels take a pointer even when HAS_BIAS is off: any fp32 tensor does."""
    return key_bias if key_bias is not None else like.new_empty(1, dtype=torch.float32)
