"""Opt-in autotuning of the varlen attention tiles on a GPU (``BUS_KERNELS_AUTOTUNE=1``).

The tile table (``tiles.py``) fixes the tile each program owns -- the block table of the launch is built
from it (query tiles for fwd/dQ, key tiles for dK/dV) -- so only the other tile, the warps and the
pipeline stages are tuned: a short list around the table's entry (it, one more stage, the inner tile
halved and doubled, the other warp count), benchmarked once per (kernel, head dim, flags, dtype) by
``triton.autotune`` on first use.

Off by default: each listed config is compiled on first use (seconds per variant, ~5x the cold-start
compile time of the fixed table) and no GPU timing has yet shown which entries it would change. Never
under the interpreter. Every kernel writes each output element once, so re-running a launch while
benchmarking is harmless.
"""

from __future__ import annotations

import functools

import triton

from ..._env import getenv
from ...backends import TRITON_INTERPRET
from .tiles import _Config

ENV_VAR = "BUS_KERNELS_AUTOTUNE"
_KEY = ["D", "CAUSAL", "HAS_BIAS", "PRECISION", "BLOCK_D"]


def enabled() -> bool:
    """Read at every launch, so it can be switched within a process."""
    return not TRITON_INTERPRET and getenv(ENV_VAR) == "1"


def candidates(kind: str, cfg: _Config) -> list[triton.Config]:
    """The short list for ``kind`` around the table's ``cfg``: only the inner tile, warps and stages vary."""
    inner = "BLOCK_N" if kind in ("fwd", "dq") else "BLOCK_M"
    tile = cfg.block_n if inner == "BLOCK_N" else cfg.block_m
    seen, configs = set(), []
    for t, warps, stages in (
        (tile, cfg.num_warps, cfg.num_stages),
        (tile, cfg.num_warps, cfg.num_stages + 1),
        (min(128, tile * 2), cfg.num_warps, cfg.num_stages),
        (max(16, tile // 2), cfg.num_warps, cfg.num_stages),
        (tile, 4 if cfg.num_warps == 8 else 8, cfg.num_stages),
    ):
        if (t, warps, stages) not in seen:
            seen.add((t, warps, stages))
            configs.append(triton.Config({inner: t}, num_warps=warps, num_stages=stages))
    return configs


@functools.lru_cache(maxsize=None)
def tuned(kind: str, kernel, cfg: _Config):
    """``kernel`` wrapped in ``triton.autotune`` over ``candidates(kind, cfg)`` (one wrapper per table entry)."""
    fixed = "BLOCK_M" if kind in ("fwd", "dq") else "BLOCK_N"
    return triton.autotune(configs=candidates(kind, cfg), key=_KEY + [fixed])(kernel)


def launch(kind: str, kernel, grid: tuple, cfg: _Config, *args, **flags) -> None:
    """Launch ``kernel`` with the table's tiles, or autotuned around them when ``enabled()``."""
    if enabled():
        fixed = {"BLOCK_M": cfg.block_m} if kind in ("fwd", "dq") else {"BLOCK_N": cfg.block_n}
        tuned(kind, kernel, cfg)[grid](*args, **flags, **fixed)
    else:
        kernel[grid](*args, **flags, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                     num_warps=cfg.num_warps, num_stages=cfg.num_stages)
