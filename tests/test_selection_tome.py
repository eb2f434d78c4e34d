"""ToMe bipartite soft matching and size-weighted merge vs a float64 computation written here and vs
the loop-per-row reference twin; proportional attention; bad inputs."""

import pytest
import torch
import torch.nn.functional as F

import bus_kernels
from bus_kernels.reference import token_merge as ref


def _float64_matching(metric, r, p):
    """The paper's matching, computed independently: cosine similarity A(even) x B(odd) of the
    mergeable tokens, best B per A, the r strongest edges (ties to the lower A)."""
    m = metric.double()[:, p:]
    m = m / m.norm(dim=-1, keepdim=True)
    a, b = m[:, 0::2], m[:, 1::2]
    sim = torch.einsum("bic,bjc->bij", a, b)
    best, partner = sim.max(-1)
    src, dst = [], []
    for row in range(m.shape[0]):
        order = sorted(range(a.shape[1]), key=lambda i: (-float(best[row, i]), i))[:r]
        src.append([p + 2 * i for i in order])
        dst.append([p + 1 + 2 * int(partner[row, i]) for i in order])
    return torch.tensor(src), torch.tensor(dst)


@pytest.mark.parametrize("B, N, C, r, p", [(3, 27, 10, 9, 1), (2, 12, 5, 6, 0), (1, 8, 3, 4, 1), (2, 17, 7, 0, 1)])
def test_matching_equals_float64_and_reference(B, N, C, r, p):
    g = torch.Generator().manual_seed(N * 7 + r)
    metric = torch.randn(B, N, C, generator=g)
    plan = bus_kernels.bipartite_soft_matching(metric, r, num_protected=p)
    src, dst = _float64_matching(metric, r, p)
    assert torch.equal(plan.src, src.view(B, r)) and torch.equal(plan.dst, dst.view(B, r))
    twin = ref.bipartite_soft_matching(metric, r, num_protected=p)
    assert all(torch.equal(u, v) for u, v in zip(plan, twin))
    assert plan.keep.shape == (B, N - r) and (plan.keep.diff(dim=1) > 0).all()
    assert (plan.keep[:, :p] == torch.arange(p)).all()  # protected tokens never move
    survivors = set(range(N))
    for row in range(B):
        assert set(plan.keep[row].tolist()) == survivors - set(plan.src[row].tolist())
        assert set(plan.dst[row].tolist()) <= set(plan.keep[row].tolist())


def test_merge_is_size_weighted_average_and_differentiable():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 15, 6, dtype=torch.float64, generator=g, requires_grad=True)
    size = torch.randint(1, 5, (2, 15), generator=g).float()
    plan = bus_kernels.bipartite_soft_matching(x.detach(), 7)
    out, new_size = bus_kernels.merge_tokens(x, plan, size)
    ref_out, ref_size = ref.merge_tokens(x.detach(), plan, size)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_size, ref_size)
    torch.testing.assert_close(new_size.sum(1), size.sum(1))  # every patch still counted once
    # the size-weighted mean of all tokens is invariant under merging
    torch.testing.assert_close((out * new_size[..., None].double()).sum(1), (x * size[..., None].double()).sum(1))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_merge_float32_matches_float64():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 21, 9, generator=g)
    plan = bus_kernels.bipartite_soft_matching(x, 10)
    out, _ = bus_kernels.merge_tokens(x, plan)
    out64, _ = ref.merge_tokens(x.double(), plan)
    torch.testing.assert_close(out.double(), out64, rtol=1e-6, atol=1e-6)


def test_proportional_attention_key_bias_equals_repeated_keys():
    """ToMe §3: a key of size s with bias log(s) weighs as s identical keys (varlen_attention's key_bias)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(4, 2, 8, dtype=torch.float64, generator=g)
    k = torch.randn(3, 2, 8, dtype=torch.float64, generator=g)
    v = torch.randn(3, 2, 8, dtype=torch.float64, generator=g)
    sizes = torch.tensor([1, 3, 2])
    cu_q, cu_k = torch.tensor([0, 4], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32)
    out = bus_kernels.varlen_attention(q, k, v, cu_q, cu_k, 4, 3, key_bias=sizes.float().log(), backend="torch")
    kr, vr = k.repeat_interleave(sizes, 0), v.repeat_interleave(sizes, 0)
    att = torch.einsum("qhd,khd->hqk", q, kr).mul(8**-0.5).softmax(-1)
    torch.testing.assert_close(out, torch.einsum("hqk,khd->qhd", att, vr), rtol=1e-6, atol=1e-6)


def test_bad_inputs():
    x = torch.randn(2, 9, 4)
    with pytest.raises(ValueError, match=r"r \(5\) is larger"):
        bus_kernels.bipartite_soft_matching(x, 5)  # 8 mergeable tokens: A has 4
    assert bus_kernels.max_merge(9, 1) == 4 and bus_kernels.max_merge(2, 1) == 0
    with pytest.raises(ValueError, match="metric"):
        bus_kernels.bipartite_soft_matching(x[0], 1)
    with pytest.raises(TypeError, match="metric"):
        bus_kernels.bipartite_soft_matching(x.long(), 1)
    with pytest.raises(TypeError, match="r must be an int"):
        bus_kernels.bipartite_soft_matching(x, 1.5)
    plan = bus_kernels.bipartite_soft_matching(x, 2)
    with pytest.raises(ValueError, match="size"):
        bus_kernels.merge_tokens(x, plan, torch.ones(2, 8))
    with pytest.raises(ValueError, match="plan"):
        bus_kernels.merge_tokens(x[:, :8], plan)
    with pytest.raises(TypeError, match="num_tokens"):
        bus_kernels.random_scores(2, 3.0)


def test_random_scores_keep_a_uniform_subset():
    s = bus_kernels.random_scores(4000, 5, generator=torch.Generator().manual_seed(0))
    assert s.dtype == torch.float32 and s.shape == (4000, 5)
    kept = bus_kernels.topk_gather(torch.randn(4000, 5, 2), s, 2, fuse=False, backend="torch").index
    freq = torch.bincount(kept.flatten(), minlength=5).double() / 4000
    torch.testing.assert_close(freq, torch.full((5,), 0.4, dtype=torch.float64), atol=0.03, rtol=0)
