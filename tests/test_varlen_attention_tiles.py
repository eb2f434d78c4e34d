"""Every tile shape the GPU runtime can pick for varlen_attention, run in the CPU interpreter.

The tile tables of ``bus_kernels/ops/varlen_attention/tiles.py`` (sm_80 and the sm_90 overrides, fp32
and fp16/bf16 entries), the small query tile of short sequences and the ``BUS_KERNELS_AUTOTUNE``
candidate list each give (BLOCK_M, BLOCK_N) per kernel and head-dim block. On the CPU the interpreter
normally runs one 16x16 tile; here ``forced_tiles`` makes the launcher use each GPU tile instead, and
forward + backward (with key_bias) run in fp32 on ragged lengths against a float64 reference written
here. This checks the kernels' indexing, masking and block tables at those tile sizes -- not the
warps/stages (the interpreter ignores them), not fp16/bf16 numerics, not speed: those need a GPU.
"""

from __future__ import annotations

import pytest
import torch

from bus_kernels import backend_status, varlen_attention
from bus_kernels.ops.varlen_attention import autotune
from bus_kernels.ops.varlen_attention.tiles import (
    SHORT_Q,
    _Config,
    _block_d,
    config_for,
    forced_tiles,
    target_configs,
)

pytestmark = pytest.mark.skipif(backend_status("cpu")["triton"] is not None, reason="Triton interpreter off")

KINDS = ("fwd", "dkdv", "dq")
MAJORS = (8, 9)  # sm_80 (A100) and sm_90 (H100/H200): the two tables
BLOCK_DS = (16, 32, 64, 128, 256)  # every head-dim block of the tables (sm_90 overrides at 64 and 128)


def runtime_tiles(kind: str, block_d: int) -> set[tuple[int, int]]:
    """(BLOCK_M, BLOCK_N) of every tile ``kind`` can launch with at head-dim block ``block_d``: each
    table entry (both majors, both dtype classes), its small-query-tile variant for every
    max_seqlen_q <= SHORT_Q, and the autotune candidates around each."""
    configs = set()
    for major in MAJORS:
        for dtype in (torch.float32, torch.float16):
            assert (kind, dtype == torch.float32, block_d) in target_configs(major)
            for max_q in [None, *range(1, SHORT_Q + 1)]:
                configs.add(config_for(kind, dtype, block_d, major, max_q))
    tiles = set()
    for cfg in configs:
        tiles.add((cfg.block_m, cfg.block_n))
        for cand in autotune.candidates(kind, cfg):
            inner = cand.kwargs
            tiles.add((cfg.block_m, inner["BLOCK_N"]) if "BLOCK_N" in inner else (inner["BLOCK_M"], cfg.block_n))
    return tiles


def launch_sets() -> list:
    """Runs of (block_d, fwd tile, dkdv tile, dq tile, run index) such that every tile of every kind is
    in one."""
    params = []
    for block_d in BLOCK_DS:
        per_kind = {kind: sorted(runtime_tiles(kind, block_d)) for kind in KINDS}
        n = max(len(t) for t in per_kind.values())
        for i in range(n):  # the shorter lists wrap around
            tiles = tuple(per_kind[kind][i % len(per_kind[kind])] for kind in KINDS)
            ident = f"D{block_d}-" + "-".join(f"{k}{m}x{n_}" for k, (m, n_) in zip(KINDS, tiles))
            # 256 is no model head dim and its tiles predate 0246df1 (GPU-tested): slow tier
            marks = [pytest.mark.slow] if block_d == 256 else []
            params.append(pytest.param(block_d, *tiles, len(params), id=ident, marks=marks))
    return params


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def reference(q, k, v, bias, lens_q, lens_k, causal):
    """float64 softmax attention, one sequence at a time (bottom-right causal alignment as the kernels:
    query i of a sequence sees key j when j <= i + lk - lq); rows with no visible key give zeros."""
    outs, q0, k0 = [], 0, 0
    for lq, lk in zip(lens_q, lens_k):
        s = torch.einsum("ihd,jhd->hij", q[q0:q0 + lq], k[k0:k0 + lk]) * q.shape[-1] ** -0.5  # (H, lq, lk)
        s = s + bias[k0:k0 + lk]
        allowed = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        w = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        w = torch.where(allowed.any(dim=1)[None, :, None], w, torch.zeros_like(w))
        outs.append(torch.einsum("hij,jhd->ihd", w, v[k0:k0 + lk]))
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(outs)


# (lens_q, lens_k, causal): self attention with an empty and a one-token sequence and sequences that
# end mid-tile; cross attention with more keys than queries, a sequence with no keys and one with no
# queries. Both exceed a 32-row tile, so a sequence spans several tiles at the small tiles. Each run
# takes the first and one of the other two in turn (the interpreter costs ~1 s a case; 40 runs).
CASES = [
    ([1, 17, 0, 33], [1, 17, 0, 33], True),
    ([1, 17, 0, 33, 6], [5, 0, 40, 29, 6], False),
    ([1, 17, 0, 33, 6], [5, 0, 40, 29, 6], True),
]


@pytest.mark.parametrize("block_d, fwd, dkdv, dq, run", launch_sets())
def test_every_runtime_tile_matches_float64(block_d, fwd, dkdv, dq, run):
    forced = {kind: _Config(m, n, 4, 1) for kind, (m, n) in zip(KINDS, (fwd, dkdv, dq))}
    for i in (0, 1 + run % 2):
        lens_q, lens_k, causal = CASES[i]
        D = block_d if i == 0 else block_d - 3  # a full and a masked head dim in the same block
        assert _block_d(D) == block_d
        gen = torch.Generator().manual_seed(block_d * 100 + i)
        q = torch.randn(sum(lens_q), 2, D, generator=gen, dtype=torch.float64)
        k = torch.randn(sum(lens_k), 2, D, generator=gen, dtype=torch.float64)
        v = torch.randn(sum(lens_k), 2, D, generator=gen, dtype=torch.float64)
        bias = torch.randn(sum(lens_k), generator=gen, dtype=torch.float64)
        grad = torch.randn(sum(lens_q), 2, D, generator=gen, dtype=torch.float64)

        leaves = [t.float().requires_grad_(True) for t in (q, k, v, bias)]
        with forced_tiles(**forced):
            out = varlen_attention(*leaves[:3], cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q), max(lens_k),
                                   causal=causal, key_bias=leaves[3], backend="triton")
            grads = torch.autograd.grad(out, leaves, grad.float())
        ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
        ref = reference(*ref_leaves, lens_q, lens_k, causal)
        ref_grads = torch.autograd.grad(ref, ref_leaves, grad)

        assert (out.double() - ref).abs().max().item() < 2e-5, (i, "out")
        for name, g, r in zip(["q", "k", "v", "key_bias"], grads, ref_grads):
            assert (g.double() - r).abs().max().item() < 5e-5 * max(1.0, r.abs().max().item()), (i, name)


def test_tile_sets_cover_the_new_sm90_and_small_query_tiles():
    """The runs above include the sm_90 tiles of 0246df1 and the small query tile (so a table change that
    drops them from ``runtime_tiles`` fails here, not silently)."""
    assert {(128, 128), (128, 64)} <= runtime_tiles("fwd", 64) | runtime_tiles("fwd", 128)
    assert (32, 128) in runtime_tiles("dkdv", 64) and (32, 128) in runtime_tiles("dkdv", 128)
    assert (128, 32) in runtime_tiles("dq", 64) and (128, 32) in runtime_tiles("dq", 128)
    assert (16, 64) in runtime_tiles("fwd", 64) and (32, 64) in runtime_tiles("fwd", 64)  # small query tiles
    covered = {(p.values[0], kind, p.values[1 + j]) for p in launch_sets() for j, kind in enumerate(KINDS)}
    assert len(covered) == sum(len(runtime_tiles(k, d)) for d in BLOCK_DS for k in KINDS)
    for block_d in BLOCK_DS:
        for kind in KINDS:
            assert {(block_d, kind, t) for t in runtime_tiles(kind, block_d)} <= covered


def test_forced_tiles_validates_and_restores():
    from bus_kernels.ops.varlen_attention.tiles import _config

    with pytest.raises(ValueError, match="forced_tiles takes fwd, dkdv and dq"):
        with forced_tiles(bwd=_Config(16, 16, 4, 1)):
            pass
    with pytest.raises(TypeError, match="forced_tiles fwd must be a _Config"):
        with forced_tiles(fwd=(16, 16, 4, 1)):
            pass
    before = _config("fwd", torch.float32, 64)
    with forced_tiles(fwd=_Config(128, 32, 8, 2)):
        assert _config("fwd", torch.float32, 64) == _Config(128, 32, 8, 2)
        assert _config("dq", torch.float32, 64) == _config("dq", torch.float32, 64, None)
    assert _config("fwd", torch.float32, 64) == before
