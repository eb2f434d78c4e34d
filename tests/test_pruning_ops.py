"""text_patch_scores, topk_gather, topk_gather_varlen, keep_by_mass: every CPU-capable backend against
a float64 reference written here (independent of bus_kernels.reference), forward and gradients, on
fresh random inputs with odd sizes, ties, fp16 and fp32."""

from __future__ import annotations

import pytest
import torch

import bus_kernels as bk
from _bus_testing import backend_dtypes, cpu_backends, tolerance

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
    """The k best positions (ties to the lower position), ascending; -0.0 == +0.0 as in Python."""
    order = sorted(range(len(scores_row)), key=lambda j: (-scores_row[j], j))
    return sorted(order[:k])


def ref_row(x_row: torch.Tensor, s_row: torch.Tensor, k: int, fuse: bool) -> tuple[torch.Tensor, list[int]]:
    """x_row (N, C), s_row (N,) float64 -> (k + fuse, C) tokens and the kept positions."""
    N, C = x_row.shape
    keep = ref_kept_positions(s_row.tolist(), k)
    tokens = x_row[keep]
    if fuse:
        drop = [j for j in range(N) if j not in set(keep)]
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
    return list(torch.autograd.grad((out * g.to(out.dtype)).sum(), inputs, allow_unused=True, materialize_grads=True))


# ---------------------------------------------------------------------------------------------
# text_patch_scores

TPS_SHAPES = [(1, 1, 1, 16), (2, 7, 3, 80), (3, 196, 2, 32), (2, 577, 3, 24), (1, 50, 12, 64)]


@pytest.mark.parametrize("backend", cpu_backends("text_patch_scores"))
@pytest.mark.parametrize("B,N,H,D", TPS_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_text_patch_scores_matches_float64(backend, B, N, H, D, dtype):
    if dtype not in backend_dtypes(backend):
        pytest.skip(f"{backend} does not take {dtype}")
    q = (torch.randn(B, H, D) * 2).to(dtype).requires_grad_()
    keys = torch.randn(B, N, H, D).to(dtype).requires_grad_()
    out = bk.text_patch_scores(q, keys, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (B, N)

    q64 = q.detach().double().requires_grad_()
    k64 = keys.detach().double().requires_grad_()
    expected = ref_scores(q64, k64, D**-0.5)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out.double(), expected, **tol)
    torch.testing.assert_close(out.sum(1), torch.ones(B), atol=1e-5, rtol=0)

    g = torch.randn(B, N, dtype=torch.float64)
    dq, dk = grads(out, [q, keys], g)
    dq64, dk64 = grads(expected, [q64, k64], g)
    assert dq.dtype == dtype and dk.dtype == dtype
    gtol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(dq.double(), dq64, **gtol)
    torch.testing.assert_close(dk.double(), dk64, **gtol)


@pytest.mark.parametrize("backend", cpu_backends("text_patch_scores"))
def test_text_patch_scores_strided_keys_and_scale(backend):
    """Keys sliced out of a fused qkv tensor (non-contiguous) and an explicit scale."""
    B, N, H, D = 2, 33, 3, 40
    qkv = torch.randn(B, N, 3, H, D)
    keys = qkv[:, :, 1]  # (B, N, H, D), strided
    q = torch.randn(B, H, D)
    out = bk.text_patch_scores(q, keys, scale=0.37, backend=backend)
    torch.testing.assert_close(out.double(), ref_scores(q.double(), keys.double(), 0.37), atol=1e-6, rtol=1e-5)


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


@pytest.mark.parametrize("backend", cpu_backends("topk_gather"))
@pytest.mark.parametrize("B,N,C,k", TOPK_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
def test_topk_gather_matches_float64(backend, B, N, C, k, dtype, ties, fuse):
    if dtype not in backend_dtypes(backend):
        pytest.skip(f"{backend} does not take {dtype}")
    x = torch.randn(B, N, C).to(dtype).requires_grad_()
    scores = make_scores(B, N, ties).requires_grad_()
    tokens, index = bk.topk_gather(x, scores, k, fuse=fuse, backend=backend)
    assert tokens.shape == (B, k + fuse, C) and tokens.dtype == dtype
    assert index.shape == (B, k) and index.dtype == torch.int64

    x64 = x.detach().double().requires_grad_()
    s64 = scores.detach().double().requires_grad_()
    rows = [ref_row(x64[b], s64[b], k, fuse) for b in range(B)]
    expected = torch.stack([r[0] for r in rows])
    assert index.tolist() == [r[1] for r in rows]
    # kept tokens are copies: exact; the fused token is accumulated in fp32
    torch.testing.assert_close(tokens[:, :k], x.detach()[torch.arange(B)[:, None], index], atol=0, rtol=0)
    torch.testing.assert_close(tokens.double(), expected, **tolerance(dtype))

    g = torch.randn(B, k + fuse, C, dtype=torch.float64)
    gx, gs = grads(tokens, [x, scores], g)
    gx64, gs64 = grads(expected, [x64, s64], g)
    assert gx.dtype == dtype and gs.dtype == scores.dtype
    torch.testing.assert_close(gx.double(), gx64, **tolerance(dtype))
    torch.testing.assert_close(gs.double(), gs64, atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=1e-3)


@pytest.mark.parametrize("backend", cpu_backends("topk_gather"))
def test_topk_gather_negative_scores_and_large_n(backend):
    """Selection is exact for signed scores on a row of 4096 tokens (the on-chip selection size)."""
    B, N, k = 2, 4096, 1000
    x = torch.randn(B, N, 8)
    scores = torch.randn(B, N) * 100
    scores[0, :10] = float("inf")
    scores[1, 5:20] = -float("inf")
    tokens, index = bk.topk_gather(x, scores, k, fuse=False, backend=backend)
    assert index.tolist() == [ref_kept_positions(scores[b].tolist(), k) for b in range(B)]


@pytest.mark.parametrize("backend", cpu_backends("topk_gather"))
def test_topk_gather_fused_token_all_dropped_zero_scores(backend):
    """Dropped tokens with zero total score: the denominator is clamped, the fused token is zero."""
    x = torch.randn(2, 5, 16)
    scores = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 2.0, 0, 0]])
    tokens, index = bk.topk_gather(x, scores, 1, backend=backend)
    assert index.tolist() == [[0], [2]]
    assert torch.equal(tokens[:, 1], torch.zeros(2, 16))


@pytest.mark.parametrize("backend", cpu_backends("topk_gather"))
def test_topk_gather_non_contiguous_input(backend):
    x = torch.randn(16, 3, 40).transpose(0, 1)  # (3, 16, 40), batch and token strides swapped
    scores = torch.rand(16, 3).t()  # (3, 16), non-contiguous
    tokens, index = bk.topk_gather(x, scores, 5, backend=backend)
    rows = [ref_row(x[b].double(), scores[b].double(), 5, True) for b in range(3)]
    torch.testing.assert_close(tokens.double(), torch.stack([r[0] for r in rows]), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# topk_gather_varlen


@pytest.mark.parametrize("backend", cpu_backends("topk_gather"))
@pytest.mark.parametrize("B,N,C", [(1, 1, 16), (4, 7, 16), (3, 197, 72)])
@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
def test_topk_gather_varlen_matches_float64(backend, B, N, C, fuse):
    x = torch.randn(B, N, C, requires_grad=True)
    scores = make_scores(B, N, ties=True).abs().requires_grad_()
    k = torch.randint(0, N + 1, (B,))
    k[0] = N  # nothing dropped in row 0
    if B > 1:
        k[1] = 0  # everything dropped in row 1
    tokens, index, cu, max_seqlen = bk.topk_gather_varlen(x, scores, k, fuse=fuse, backend=backend)

    x64 = x.detach().double().requires_grad_()
    s64 = scores.detach().double().requires_grad_()
    rows = [ref_row(x64[b], s64[b], int(k[b]), fuse) for b in range(B)]
    lengths = [int(k[b]) + fuse for b in range(B)]
    assert cu.dtype == torch.int32 and cu.tolist() == [0] + torch.tensor(lengths).cumsum(0).tolist()
    assert max_seqlen == max(lengths)
    assert index.dtype == torch.int64 and index.tolist() == [p for r in rows for p in r[1]]
    expected = torch.cat([r[0] for r in rows])
    torch.testing.assert_close(tokens.double(), expected, atol=1e-5, rtol=1e-4)

    g = torch.randn_like(expected)
    gx, gs = grads(tokens, [x, scores], g)
    gx64, gs64 = grads(expected, [x64, s64], g)
    torch.testing.assert_close(gx.double(), gx64, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gs.double(), gs64, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("backend", cpu_backends("topk_gather"))
def test_topk_gather_varlen_equals_fixed_k(backend):
    x, scores = torch.randn(3, 20, 24), torch.rand(3, 20)
    fixed = bk.topk_gather(x, scores, 6, backend=backend)
    packed = bk.topk_gather_varlen(x, scores, torch.full((3,), 6), backend=backend)
    assert torch.equal(packed.tokens, fixed.tokens.reshape(-1, 24))
    assert torch.equal(packed.index, fixed.index.reshape(-1))


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


@pytest.mark.parametrize("backend", cpu_backends("topk_gather"))
def test_compile_fullgraph_matches_eager(backend):
    def pipeline(q, keys, x):
        s = bk.text_patch_scores(q, keys, backend=backend)
        out = bk.topk_gather(x, s, 9, backend=backend)
        return out.tokens * 2, out.index

    q = torch.randn(2, 3, 16, requires_grad=True)
    keys = torch.randn(2, 30, 3, 16, requires_grad=True)
    x = torch.randn(2, 30, 24, requires_grad=True)
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
