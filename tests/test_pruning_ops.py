"""text_patch_scores, topk_gather, topk_gather_varlen, keep_by_mass: every CPU-capable backend against
a float64 reference written here (independent of bus_kernels.reference), forward and gradients, on
fresh random inputs with odd sizes, ties, fp16 and fp32. On a machine with CUDA the same tests also run
the Triton and native kernels on the GPU (ids ``*-cuda``), in bf16 too, against the float64 CPU
reference (low precision judged against PyTorch's own error in that precision, see _bus_testing.py)."""

from __future__ import annotations

import math

import pytest
import torch

import bus_kernels as bk
from _bus_testing import (
    DTYPES,
    assert_low_precision_close,
    device_backends,
    skip_unless_supported,
    tolerance,
)

FUSE_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# float64 references


def ref_scores(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, H, D), keys (B, N, H, D) float64 -> (B, N): explicit softmax per head, then the head mean."""
    logits = (q[:, None, :, :] * keys).sum(-1) * scale  # (B, N, H)
    logits = logits - logits.max(dim=1, keepdim=True).values
    p = logits.exp() / logits.exp().sum(dim=1, keepdim=True)
    return p.mean(dim=2)


def ref_kept_positions(scores_row: list[float], k: int) -> list[int]:
    """The k best positions (ties to the lower position), ascending; -0.0 == +0.0 as in Python.
    NaN ranks below everything, -inf included; NaNs among themselves by position."""

    def rank(j: int) -> tuple:
        s = scores_row[j]
        return (1, 0.0, j) if math.isnan(s) else (0, -s, j)

    order = sorted(range(len(scores_row)), key=rank)
    return sorted(order[:k])


def ref_row(x_row: torch.Tensor, s_row: torch.Tensor, k: int, fuse: bool) -> tuple[torch.Tensor, list[int]]:
    """x_row (N, C), s_row (N,) float64 -> (k + fuse, C) tokens and the kept positions."""
    N, C = x_row.shape
    keep = ref_kept_positions(s_row.tolist(), k)
    tokens = x_row[keep]
    if fuse:
        kept = set(keep)
        drop = [j for j in range(N) if j not in kept]
        if drop:
            w = s_row[drop]
            fused = (w[:, None] * x_row[drop]).sum(0) / w.sum().clamp_min(FUSE_EPS)
        else:
            fused = x_row.new_zeros(C) + 0 * s_row.sum()  # keep the graph connected
        tokens = torch.cat([tokens, fused[None]])
    return tokens, keep


def make_scores(B: int, N: int, ties: bool, dtype=torch.float32) -> torch.Tensor:
    if ties:
        s = torch.randint(0, 3, (B, N)).to(dtype) / 2
        zero = s == 0
        s[zero & (torch.rand(B, N) < 0.5)] = -0.0  # -0.0 and +0.0 must tie
        return s
    return torch.rand(B, N, dtype=dtype) + 0.01


def grads(out: torch.Tensor, inputs: list[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad((out * g.to(out.device, out.dtype)).sum(), inputs, allow_unused=True,
                                    materialize_grads=True))


# ---------------------------------------------------------------------------------------------
# text_patch_scores

TPS_SHAPES = [(1, 1, 1, 16), (2, 7, 3, 80), (3, 196, 2, 32), (2, 577, 3, 24), (1, 50, 12, 64)]


@pytest.mark.parametrize("case", device_backends("text_patch_scores"))
@pytest.mark.parametrize("B,N,H,D", TPS_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_text_patch_scores_matches_float64(case, B, N, H, D, dtype):
    backend, device = case
    skip_unless_supported(backend, device, dtype)
    q_cpu = (torch.randn(B, H, D) * 2).to(dtype)
    keys_cpu = torch.randn(B, N, H, D).to(dtype)
    q, keys = q_cpu.to(device).requires_grad_(), keys_cpu.to(device).requires_grad_()
    out = bk.text_patch_scores(q, keys, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (B, N) and out.device.type == device

    q64 = q_cpu.double().requires_grad_()
    k64 = keys_cpu.double().requires_grad_()
    expected = ref_scores(q64, k64, D**-0.5)
    torch.testing.assert_close(out.sum(1).cpu(), torch.ones(B), atol=1e-5, rtol=0)
    g = torch.randn(B, N, dtype=torch.float64)
    dq, dk = grads(out, [q, keys], g)
    dq64, dk64 = grads(expected, [q64, k64], g)
    assert dq.dtype == dtype and dk.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out.double().cpu(), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(dq.double().cpu(), dq64, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(dk.double().cpu(), dk64, atol=1e-5, rtol=1e-4)
    else:  # the same math run by PyTorch in the low precision (on the CPU) sets the bar
        q_low, k_low = q_cpu.clone().requires_grad_(), keys_cpu.clone().requires_grad_()
        low = ref_scores(q_low, k_low, D**-0.5)
        dq_low, dk_low = grads(low, [q_low, k_low], g)
        assert_low_precision_close(out, expected, low, dtype, "scores")
        assert_low_precision_close(dq, dq64, dq_low, dtype, "grad query", ulps=2)
        assert_low_precision_close(dk, dk64, dk_low, dtype, "grad keys", ulps=2)


@pytest.mark.parametrize("case", device_backends("text_patch_scores"))
def test_text_patch_scores_strided_keys_and_scale(case):
    """Keys sliced out of a fused qkv tensor (non-contiguous) and an explicit scale."""
    backend, device = case
    B, N, H, D = 2, 33, 3, 40
    qkv = torch.randn(B, N, 3, H, D)
    keys = qkv[:, :, 1]  # (B, N, H, D), strided
    q = torch.randn(B, H, D)
    out = bk.text_patch_scores(q.to(device), qkv.to(device)[:, :, 1], scale=0.37, backend=backend)
    torch.testing.assert_close(out.double().cpu(), ref_scores(q.double(), keys.double(), 0.37), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# topk_gather

TOPK_CASES = [
    # B, N, C, k
    (1, 1, 16, 1),
    (2, 7, 16, 1),
    (3, 7, 72, 2),
    (2, 7, 72, 7),
    (2, 196, 16, 65),
    (1, 196, 72, 196),
    (2, 577, 72, 192),
    (1, 577, 16, 1),
]


@pytest.mark.parametrize("case", device_backends("topk_gather"))
@pytest.mark.parametrize("B,N,C,k", TOPK_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
def test_topk_gather_matches_float64(case, B, N, C, k, dtype, ties, fuse):
    backend, device = case
    skip_unless_supported(backend, device, dtype)
    x_cpu = torch.randn(B, N, C).to(dtype)
    scores_cpu = make_scores(B, N, ties)  # fp32 scores with low-precision tokens, as in the model
    x, scores = x_cpu.to(device).requires_grad_(), scores_cpu.to(device).requires_grad_()
    tokens, index = bk.topk_gather(x, scores, k, fuse=fuse, backend=backend)
    assert tokens.shape == (B, k + fuse, C) and tokens.dtype == dtype and tokens.device.type == device
    assert index.shape == (B, k) and index.dtype == torch.int64

    x64 = x_cpu.double().requires_grad_()
    s64 = scores_cpu.double().requires_grad_()
    rows = [ref_row(x64[b], s64[b], k, fuse) for b in range(B)]
    expected = torch.stack([r[0] for r in rows])
    assert index.tolist() == [r[1] for r in rows]
    # kept tokens are copies: exact; the fused token is accumulated in fp32
    torch.testing.assert_close(tokens[:, :k].cpu(), x_cpu[torch.arange(B)[:, None], index.cpu()], atol=0, rtol=0)

    g = torch.randn(B, k + fuse, C, dtype=torch.float64)
    gx, gs = grads(tokens, [x, scores], g)
    gx64, gs64 = grads(expected, [x64, s64], g)
    assert gx.dtype == dtype and gs.dtype == scores.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(tokens.double().cpu(), expected, **tolerance(dtype))
        torch.testing.assert_close(gx.double().cpu(), gx64, **tolerance(dtype))
        torch.testing.assert_close(gs.double().cpu(), gs64, atol=1e-4, rtol=1e-3)
    else:
        # PyTorch's error in the same precision sets the bar (tokens rounded to their dtype). A fixed
        # tolerance was flaky here: with tied zero scores the fused denominator is clamped to 1e-6 and
        # grad_scores reaches ~1e6, where rounding the incoming gradient to fp16 alone costs > 1e-3.
        x_low, s_low = x_cpu.clone().requires_grad_(), scores_cpu.clone().requires_grad_()
        low = torch.stack([ref_row(x_low[b], s_low[b], k, fuse)[0] for b in range(B)]).to(dtype)
        gx_low, gs_low = grads(low, [x_low, s_low], g)
        assert_low_precision_close(tokens, expected, low, dtype, "tokens")
        assert_low_precision_close(gx, gx64, gx_low, dtype, "grad x", ulps=2)
        assert_low_precision_close(gs, gs64, gs_low, dtype, "grad scores", ulps=2)


@pytest.mark.parametrize("case", device_backends("topk_gather"))
def test_topk_gather_negative_scores_and_large_n(case):
    """Selection is exact for signed scores on a row of 4096 tokens (the on-chip selection size)."""
    backend, device = case
    B, N, k = 2, 4096, 1000
    x = torch.randn(B, N, 8)
    scores = torch.randn(B, N) * 100
    scores[0, :10] = float("inf")
    scores[1, 5:20] = -float("inf")
    tokens, index = bk.topk_gather(x.to(device), scores.to(device), k, fuse=False, backend=backend)
    assert index.tolist() == [ref_kept_positions(scores[b].tolist(), k) for b in range(B)]


def nonfinite_scores(B: int, N: int, seed: int) -> torch.Tensor:
    """(B, N) fp32 scores with NaN, +inf and -inf at random places: row 0 a few of each, row 1 mostly NaN
    (k forces NaNs in), row 2 all NaN, row 3 NaNs of both signs next to -inf and ties."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(B, N, generator=gen)
    place = torch.rand(B, N, generator=gen)
    s[0][place[0] < 0.15] = float("nan")
    s[0][(place[0] >= 0.15) & (place[0] < 0.25)] = float("inf")
    s[0][(place[0] >= 0.25) & (place[0] < 0.35)] = -float("inf")
    s[1][place[1] < 0.8] = float("nan")
    s[2] = float("nan")
    s[3] = torch.randint(-1, 2, (N,), generator=gen).float()
    s[3][place[3] < 0.3] = -float("inf")
    s[3][place[3] > 0.7] = float("nan")
    s[3][place[3] > 0.85] = -float("nan")  # a NaN with the sign bit set ranks lowest too
    return s


@pytest.mark.parametrize("case", device_backends("topk_gather"))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_gather_nan_and_inf_scores(case, seed):
    """One rule on every backend: +inf above every finite score, -inf below, NaN lowest of all (kept
    only when k forces it, NaNs by position); a dropped non-finite score makes the fused token non-finite."""
    backend, device = case
    B, N, C = 4, 37, 16
    x = torch.randn(B, N, C)
    s = nonfinite_scores(B, N, seed)
    for k in (1, 5, 20, N - 1, N):
        tokens, index = bk.topk_gather(x.to(device), s.to(device), k, fuse=True, backend=backend)
        want = [ref_kept_positions(s[b].tolist(), k) for b in range(B)]
        assert index.tolist() == want, f"k={k}"
        tokens = tokens.cpu()
        assert torch.equal(tokens[:, :k], x[torch.arange(B)[:, None], torch.tensor(want)])
        for b in range(B):
            dropped = [j for j in range(N) if j not in set(want[b])]
            if not dropped:
                assert torch.equal(tokens[b, k], torch.zeros(C)), f"row {b}, k={k}"
            elif any(not math.isfinite(s[b, j].item()) for j in dropped):
                assert not torch.isfinite(tokens[b, k]).any(), f"row {b}, k={k}"
            else:
                torch.testing.assert_close(tokens[b, k].double(), ref_row(x[b].double(), s[b].double(), k, True)[0][k],
                                           atol=1e-5, rtol=1e-5)
    ks = torch.tensor([3, 30, 7, N])
    packed = bk.topk_gather_varlen(x.to(device), s.to(device), ks.to(device), fuse=False, backend=backend)
    assert packed.index.tolist() == [p for b in range(B) for p in ref_kept_positions(s[b].tolist(), int(ks[b]))]


@pytest.mark.parametrize("case", device_backends("topk_gather"))
def test_topk_gather_fused_token_all_dropped_zero_scores(case):
    """Dropped tokens with zero total score: the denominator is clamped, the fused token is zero."""
    backend, device = case
    x = torch.randn(2, 5, 16)
    scores = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 2.0, 0, 0]])
    tokens, index = bk.topk_gather(x.to(device), scores.to(device), 1, backend=backend)
    assert index.tolist() == [[0], [2]]
    assert torch.equal(tokens[:, 1].cpu(), torch.zeros(2, 16))


@pytest.mark.parametrize("case", device_backends("topk_gather"))
def test_topk_gather_non_contiguous_input(case):
    backend, device = case
    x_base, s_base = torch.randn(16, 3, 40), torch.rand(16, 3)
    x = x_base.to(device).transpose(0, 1)  # (3, 16, 40), batch and token strides swapped
    scores = s_base.to(device).t()  # (3, 16), non-contiguous
    tokens, index = bk.topk_gather(x, scores, 5, backend=backend)
    rows = [ref_row(x_base[:, b].double(), s_base[:, b].double(), 5, True) for b in range(3)]
    torch.testing.assert_close(tokens.double().cpu(), torch.stack([r[0] for r in rows]), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# topk_gather_varlen


@pytest.mark.parametrize("case", device_backends("topk_gather"))
@pytest.mark.parametrize("B,N,C", [(1, 1, 16), (4, 7, 16), (3, 197, 72)])
@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
def test_topk_gather_varlen_matches_float64(case, B, N, C, fuse):
    backend, device = case
    x_cpu = torch.randn(B, N, C)
    s_cpu = make_scores(B, N, ties=True).abs()
    x, scores = x_cpu.to(device).requires_grad_(), s_cpu.to(device).requires_grad_()
    k = torch.randint(0, N + 1, (B,))
    k[0] = N  # nothing dropped in row 0
    if B > 1:
        k[1] = 0  # everything dropped in row 1
    tokens, index, cu, max_seqlen = bk.topk_gather_varlen(x, scores, k.to(device), fuse=fuse, backend=backend)
    assert tokens.device.type == device and cu.device.type == device

    x64 = x_cpu.double().requires_grad_()
    s64 = s_cpu.double().requires_grad_()
    rows = [ref_row(x64[b], s64[b], int(k[b]), fuse) for b in range(B)]
    lengths = [int(k[b]) + fuse for b in range(B)]
    assert cu.dtype == torch.int32 and cu.tolist() == [0] + torch.tensor(lengths).cumsum(0).tolist()
    assert max_seqlen == max(lengths)
    assert index.dtype == torch.int64 and index.tolist() == [p for r in rows for p in r[1]]
    expected = torch.cat([r[0] for r in rows])
    torch.testing.assert_close(tokens.double().cpu(), expected, atol=1e-5, rtol=1e-4)

    g = torch.randn_like(expected)
    gx, gs = grads(tokens, [x, scores], g)
    gx64, gs64 = grads(expected, [x64, s64], g)
    torch.testing.assert_close(gx.double().cpu(), gx64, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gs.double().cpu(), gs64, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("case", device_backends("topk_gather"))
def test_topk_gather_varlen_equals_fixed_k(case):
    backend, device = case
    x, scores = torch.randn(3, 20, 24, device=device), torch.rand(3, 20, device=device)
    fixed = bk.topk_gather(x, scores, 6, backend=backend)
    packed = bk.topk_gather_varlen(x, scores, torch.full((3,), 6, device=device), backend=backend)
    assert torch.equal(packed.tokens, fixed.tokens.reshape(-1, 24))
    assert torch.equal(packed.index, fixed.index.reshape(-1))


@pytest.mark.slow  # ~20 s: the interpreter runs 260 programs per kernel
@pytest.mark.parametrize("case", device_backends("topk_gather"))
def test_topk_gather_varlen_many_rows(case):
    """More rows than one block of the select kernel's row-offset sum (256): offsets, index, tokens and
    gradients of the later rows still land in their place. (Few tokens: the interpreter runs B programs.)"""
    backend, device = case
    B, N, C, fuse = 260, 3, 2, True
    gen = torch.Generator().manual_seed(0)
    # scores away from 0: the fused-token gradient divides by the dropped mass
    x_cpu, s_cpu = torch.randn(B, N, C, generator=gen), torch.rand(B, N, generator=gen) + 0.5
    k = torch.randint(0, N + 1, (B,), generator=gen)
    x, scores = x_cpu.to(device).requires_grad_(), s_cpu.to(device).requires_grad_()
    tokens, index, cu, max_seqlen = bk.topk_gather_varlen(x, scores, k.to(device), fuse=fuse, backend=backend)
    assert cu.tolist() == [0] + (k + fuse).cumsum(0).tolist() and max_seqlen == int(k.max()) + fuse
    x64, s64 = x_cpu.double().requires_grad_(), s_cpu.double().requires_grad_()
    rows = [ref_row(x64[b], s64[b], int(k[b]), fuse) for b in range(B)]
    assert index.tolist() == [p for r in rows for p in r[1]]
    expected = torch.cat([r[0] for r in rows])
    torch.testing.assert_close(tokens.double().cpu(), expected, atol=1e-5, rtol=1e-5)
    g = torch.randn(expected.shape, generator=gen, dtype=expected.dtype)
    gx, gs = grads(tokens, [x, scores], g)
    gx64, gs64 = grads(expected, [x64, s64], g)
    torch.testing.assert_close(gx.double().cpu(), gx64, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gs.double().cpu(), gs64, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("case", device_backends("topk_gather"))
def test_topk_gather_varlen_no_tokens(case):
    """N = 0 (every k 0): each row is its fused token alone, all zeros (nothing dropped), written -- into
    memory that held non-zeros (csrc once returned before writing them)."""
    backend, device = case
    garbage = torch.full((3, 8), float("nan"), device=device)  # freed: the tokens (3, 8) may reuse it
    del garbage
    x = torch.randn(3, 0, 8, device=device)
    tokens, index, cu, max_seqlen = bk.topk_gather_varlen(
        x, torch.rand(3, 0, device=device), torch.zeros(3, dtype=torch.int64, device=device), backend=backend
    )
    assert torch.equal(tokens.cpu(), torch.zeros(3, 8)) and index.numel() == 0
    assert cu.tolist() == [0, 1, 2, 3] and max_seqlen == 1


# ---------------------------------------------------------------------------------------------
# keep_by_mass


def ref_keep_by_mass(row: list[float], mass: float, lo: int, hi: int) -> int:
    top = sorted(row, reverse=True)
    total = sum(top)
    acc = 0.0
    for k, v in enumerate(top, start=1):
        acc += v
        if acc >= mass * total * (1 - 1e-9):
            return min(max(k, lo), hi)
    return min(max(len(row), lo), hi)


@pytest.mark.parametrize("mass", [0.1, 0.5, 0.9, 1.0])
def test_keep_by_mass(mass):
    scores = torch.rand(5, 197).pow(4)
    scores = scores / scores.sum(1, keepdim=True)
    k = bk.keep_by_mass(scores, mass, 3, 150)
    assert k.dtype == torch.int64 and k.shape == (5,)
    assert k.tolist() == [ref_keep_by_mass(scores[b].double().tolist(), mass, 3, 150) for b in range(5)]


def test_keep_by_mass_peaked_rows_keep_fewer():
    flat = torch.full((1, 100), 0.01)
    peaked = torch.zeros(1, 100)
    peaked[0, :5] = 0.2
    k = bk.keep_by_mass(torch.cat([flat, peaked]), 0.9, 1, 100)
    assert k.tolist() == [90, 5]


# ---------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("case", device_backends("topk_gather"))
def test_compile_fullgraph_matches_eager(case):
    backend, device = case

    def pipeline(q, keys, x):
        s = bk.text_patch_scores(q, keys, backend=backend)
        out = bk.topk_gather(x, s, 9, backend=backend)
        return out.tokens * 2, out.index

    q = torch.randn(2, 3, 16, device=device, requires_grad=True)
    keys = torch.randn(2, 30, 3, 16, device=device, requires_grad=True)
    x = torch.randn(2, 30, 24, device=device, requires_grad=True)
    compiled = torch.compile(pipeline, fullgraph=True, backend="aot_eager")
    (t_eager, i_eager), (t_comp, i_comp) = pipeline(q, keys, x), compiled(q, keys, x)
    assert torch.equal(i_eager, i_comp)
    torch.testing.assert_close(t_comp, t_eager)
    g = torch.randn_like(t_eager)
    torch.testing.assert_close(grads(t_comp, [q, keys, x], g), grads(t_eager, [q, keys, x], g))


def test_compile_inductor_through_triton_op():
    if "triton" not in bk.available_backends("cpu"):
        pytest.skip("triton backend unavailable on CPU (needs TRITON_INTERPRET=1)")
    torch._dynamo.reset()

    def pipeline(q, keys, x):
        s = bk.text_patch_scores(q, keys, backend="triton")
        return bk.topk_gather(x, s, 4, backend="triton").tokens.relu()

    q, keys, x = torch.randn(2, 2, 8), torch.randn(2, 12, 2, 8), torch.randn(2, 12, 16)
    compiled = torch.compile(pipeline, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(q, keys, x), pipeline(q, keys, x))
