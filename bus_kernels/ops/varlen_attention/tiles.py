"""Launch geometry of the varlen attention kernels: tile configs, head-dim padding, the block table."""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Iterator, NamedTuple, Optional

import torch

from ..._capture import capturing
from ...backends import TRITON_INTERPRET
from .._triton_utils import constant, next_pow2


class _Config(NamedTuple):
    """Tile sizes of one kernel: rows of the query tile, rows of the key tile, warps, pipeline stages.
    (fwd and dq programs own a query tile and loop over key tiles; dkdv programs the other way round.)"""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (kernel, fp32 inputs?, BLOCK_D) -> tiles (BLOCK_M query rows, BLOCK_N key rows, warps, stages): the
# sm_80 table (and the default), sm_90 overrides below. Picked per head dim as the largest candidate that
# neither spills nor overflows shared memory, as `python -m bus_kernels.aot` compiles it: with the 16-byte
# divisibility the JIT infers for aligned tensors at run time. GPU timings not measured yet.
_GPU_CONFIGS = {
    ("fwd", False, 16): _Config(128, 64, 8, 3),
    ("fwd", False, 32): _Config(128, 64, 8, 3),
    ("fwd", False, 64): _Config(128, 64, 8, 3),
    ("fwd", False, 128): _Config(64, 32, 4, 2),
    ("fwd", False, 256): _Config(64, 32, 8, 1),
    ("dkdv", False, 16): _Config(64, 128, 8, 2),
    ("dkdv", False, 32): _Config(32, 64, 4, 2),
    ("dkdv", False, 64): _Config(64, 32, 4, 2),
    ("dkdv", False, 128): _Config(32, 32, 8, 1),  # 4 warps spilled 8 bytes at D=80 with alignment hints
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
    ("dkdv", True, 64): _Config(32, 32, 8, 1),  # 4 warps spilled 16 bytes on sm_80 with alignment hints
    ("dkdv", True, 128): _Config(16, 16, 8, 1),
    ("dkdv", True, 256): _Config(16, 16, 8, 1),
    ("dq", True, 16): _Config(64, 64, 8, 2),
    ("dq", True, 32): _Config(32, 32, 4, 1),
    ("dq", True, 64): _Config(32, 32, 4, 1),
    ("dq", True, 128): _Config(16, 32, 8, 1),
    ("dq", True, 256): _Config(16, 16, 4, 1),
}
# sm_90 (H100/H200: 227 KB of shared memory, wgmma) overrides for fp16/bf16 at the common head dims,
# shaped as Triton's and FlashAttention-2's Hopper kernels are: 128-row query tiles over 64-128-key tiles
# in the forward; the backward with more pipeline stages, the dK/dV program owning a 128-key tile and
# stepping 32-64 query rows, the dQ program the other way round. Checked by `python -m bus_kernels.aot`
# (no spills, shared memory under the limit); GPU timings not measured yet.
# Candidates compiled for sm_90 with causal+bias at fp16 (registers / spill bytes / shared KB):
#   fwd  D=64: 128x128 w8 s2 202/0/83   D=128: 128x64 w8 s3 240/0/133 (128x64 w4 s3 spills at both)
#   dkdv D=64: 32x128 w8 s3 168/0/59    D=128: 32x128 w8 s3 239/0/116 (w4 spills 56 / 984 bytes)
#   dq   D=64: 128x32 w8 s4 123/0/67    D=128: 128x32 w8 s4 188/0/132 (w4 s3 spills 104 bytes at D=128)
_SM90_CONFIGS: dict = {
    ("fwd", False, 64): _Config(128, 128, 8, 2),
    ("fwd", False, 128): _Config(128, 64, 8, 3),
    ("dkdv", False, 64): _Config(32, 128, 8, 3),
    ("dkdv", False, 128): _Config(32, 128, 8, 3),
    ("dq", False, 64): _Config(128, 32, 8, 4),
    ("dq", False, 128): _Config(128, 32, 8, 4),
}
# The CPU interpreter runs one program at a time: small tiles keep the tests quick and make
# modest sequences span several blocks.
_INTERPRET_CONFIG = _Config(16, 16, 4, 1)


@functools.lru_cache(maxsize=None)  # asked at every launch
def _block_d(D: int) -> int:
    return max(16, next_pow2(D))  # tl.dot needs every block dim >= 16


# Sequences of at most this many queries (captions: 32 tokens in BUS) get a query tile of
# next_pow2(max_seqlen_q) rows (>= 16) instead of the table's 64-128: a 128-row tile over a 32-token
# caption computes 4x the rows it keeps.
SHORT_Q = 32


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def target_configs(major: int) -> dict:
    """The tile table for a GPU of compute capability ``major``: sm_90's entries over the sm_80 table."""
    return {**_GPU_CONFIGS, **_SM90_CONFIGS} if major >= 9 else dict(_GPU_CONFIGS)


# kind -> tiles set by ``forced_tiles`` (tests only); empty in normal use.
_FORCED: dict[str, _Config] = {}


@contextlib.contextmanager
def forced_tiles(**tiles: _Config) -> Iterator[None]:
    """For tests: within the block, launches of the named kinds (``fwd=``, ``dkdv=``, ``dq=``) use these
    tiles instead of the table's -- under the interpreter too, so a CPU test can run the GPU tables'
    tile shapes (the interpreter ignores warps and stages). Not thread-safe; restores the previous
    setting on exit.

        with forced_tiles(fwd=_Config(128, 128, 8, 2)):
            out = varlen_attention(...)
    """
    unknown = set(tiles) - {"fwd", "dkdv", "dq"}
    if unknown:
        raise ValueError(f"forced_tiles takes fwd, dkdv and dq, got {sorted(unknown)}")
    for kind, cfg in tiles.items():
        if not isinstance(cfg, _Config):
            raise TypeError(f"forced_tiles {kind} must be a _Config, got {type(cfg).__name__}")
    saved = dict(_FORCED)
    _FORCED.update(tiles)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


def _config(kind: str, dtype: torch.dtype, D: int, device: torch.device | None = None,
            max_seqlen_q: int | None = None) -> _Config:
    """Tiles of ``kind`` ("fwd", "dkdv", "dq") for this dtype and head dim on ``device``'s GPU generation;
    a small query tile when every sequence has at most ``SHORT_Q`` queries."""
    forced = _FORCED.get(kind)
    if forced is not None:
        return forced
    if TRITON_INTERPRET:
        return _INTERPRET_CONFIG
    major = _capability(device.index if device.index is not None else torch.cuda.current_device())[0] \
        if device is not None and device.type == "cuda" else 8
    return config_for(kind, dtype, D, major, max_seqlen_q)


@functools.lru_cache(maxsize=None)  # asked at every launch; target_configs builds a dict
def config_for(kind: str, dtype: torch.dtype, D: int, major: int, max_seqlen_q: int | None = None) -> _Config:
    """The GPU tiles of ``kind`` on compute capability ``major`` (what ``_config`` picks, and what
    ``python -m bus_kernels.aot`` compiles)."""
    cfg = target_configs(major)[(kind, dtype == torch.float32, _block_d(D))]
    if max_seqlen_q is not None and max_seqlen_q <= SHORT_Q:
        block_m = max(16, next_pow2(max_seqlen_q))
        if block_m < cfg.block_m:  # fewer rows: fewer warps, and the key tile at most 64
            cfg = _Config(block_m, min(cfg.block_n, 64), min(cfg.num_warps, 4), cfg.num_stages)
    return cfg


def _delta_rows(block_d: int) -> int:
    return max(16, min(128, 8192 // block_d))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (no TF32): whoever asks for fp32 attention asks for its accuracy.
    return "ieee" if dtype == torch.float32 else "tf32"


# What is known about a cu_seqlens object, by object: {id: (weak reference, version counter, facts)}, the
# facts being {(total, block): block table} and {("checked", total, max_seqlen): True} (its values passed
# varlen_attention's checks). The id alone is never trusted: an entry counts only while its weak reference
# still points at this very object (a freed tensor's id may be reused by a new one; its entry is dropped
# when it dies) and its version counter is unchanged (an in-place change of the offsets forgets it all).
_OFFSETS: dict[int, tuple] = {}


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter: an in-place change cannot be seen
        return None


def offsets_facts(cu_seqlens: torch.Tensor) -> dict | None:
    """The facts cached for this ``cu_seqlens`` object in its current version (a dict to read and fill), or
    None where nothing may be cached: inference tensors (no version counter) and while a CUDA graph is
    captured (``bus_kernels._capture``): there the table's kernels become part of the graph and re-run on
    every replay, so a replay after an in-place change of the offsets reads a fresh table, and no
    graph-pool memory leaks into the eager cache."""
    version = _version(cu_seqlens)
    if version is None or capturing(cu_seqlens):
        return None
    key = id(cu_seqlens)
    entry = _OFFSETS.get(key)
    if entry is None or entry[0]() is not cu_seqlens or entry[1] != version:
        entry = (weakref.ref(cu_seqlens, lambda _ref, key=key: _drop(key, _ref)), version, {})
        _OFFSETS[key] = entry
    return entry[2]


def _block_table(cu_seqlens: torch.Tensor, total: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_build_block_table``, built once per ``cu_seqlens`` object (while it lives and is not changed in
    place, ``offsets_facts``): a model packs its tokens once and runs every layer's attention, forward and
    backward, on the same offsets, so the table's small kernels run once per packing instead of three times
    per layer."""
    facts = offsets_facts(cu_seqlens)
    if facts is None:
        return _build_block_table(cu_seqlens, total, block)
    table = facts.get((total, block))
    if table is None:
        table = facts[(total, block)] = _build_block_table(cu_seqlens, total, block)
    return table


def _drop(key: int, ref: weakref.ref) -> None:
    """A cu_seqlens object died: drop its entry (only if the entry is still its own)."""
    entry = _OFFSETS.get(key)
    if entry is not None and entry[0] is ref:
        del _OFFSETS[key]


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
    return key_bias if key_bias is not None else constant((1,), 0.0, torch.float32, like)
