"""unpad / pad: flash-attn bert_padding semantics, round trips, gradients, bad inputs, and a padded
attention computed through unpad -> varlen_attention -> pad."""

from __future__ import annotations

import pytest
import torch

from bus_kernels import pad, unpad, varlen_attention


def random_mask(B, S, seed):
    """(B, S) bool with an empty row, a full row and holes (kept positions need not be a prefix)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, S, generator=gen) < 0.6
    mask[0] = False
    mask[1] = True
    return mask


@pytest.mark.parametrize("shape", [(5, 7, 3), (4, 9, 2, 5)], ids=["BSC", "BSHD"])
def test_unpad_matches_a_python_loop_and_pad_inverts_it(shape):
    B, S = shape[:2]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen)
    mask = random_mask(B, S, seed=2)
    x_packed, indices, cu_seqlens, max_seqlen = unpad(x, mask)

    rows, flat, counts = [], [], []
    for b in range(B):
        kept = [s for s in range(S) if mask[b, s]]
        rows += [x[b, s] for s in kept]
        flat += [b * S + s for s in kept]
        counts.append(len(kept))
    assert torch.equal(x_packed, torch.stack(rows))
    assert indices.dtype == torch.int64 and indices.tolist() == flat
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [sum(counts[:b]) for b in range(B + 1)]
    assert max_seqlen == max(counts) and isinstance(max_seqlen, int)

    padded = pad(x_packed, indices, B, S)
    assert padded.shape == x.shape
    keep = mask.reshape(B, S, *([1] * (x.dim() - 2)))
    assert torch.equal(padded, torch.where(keep, x, torch.zeros_like(x)))


def test_integer_mask_and_all_masked_batch():
    x = torch.randn(3, 4, 2)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    x_packed, indices, cu_seqlens, max_seqlen = unpad(x, mask)
    assert indices.tolist() == [0, 2, 8, 9, 10, 11] and cu_seqlens.tolist() == [0, 2, 2, 6] and max_seqlen == 4
    empty = unpad(x, torch.zeros(3, 4, dtype=torch.bool))
    assert empty.x_packed.shape == (0, 2) and empty.max_seqlen == 0 and empty.cu_seqlens.tolist() == [0, 0, 0, 0]
    assert torch.equal(pad(empty.x_packed, empty.indices, 3, 4), torch.zeros(3, 4, 2))


def test_gradients_are_the_gather_and_the_scatter():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 6, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = random_mask(3, 6, seed=4)
    torch.autograd.gradcheck(lambda t: unpad(t, mask).x_packed, (x,))
    _, indices, _, _ = unpad(x, mask)
    packed = torch.randn(indices.numel(), 4, dtype=torch.float64, generator=gen, requires_grad=True)
    torch.autograd.gradcheck(lambda t: pad(t, indices, 3, 6), (packed,))
    # explicit: d unpad / dx puts the packed gradient back in place, zeros at masked positions
    g = torch.randn(indices.numel(), 4, dtype=torch.float64, generator=gen)
    (gx,) = torch.autograd.grad(unpad(x, mask).x_packed, x, g)
    assert torch.equal(gx[mask], g) and torch.all(gx[~mask] == 0)


def test_padded_self_attention_through_unpad_and_pad():
    """Key-padding-masked attention on a padded batch == pad(varlen_attention(unpad(...)))."""
    B, S, H, D = 3, 6, 2, 8
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(3, B, S, H, D, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    packed = [unpad(t, mask) for t in qkv]
    _, indices, cu_seqlens, max_seqlen = packed[0]
    out = pad(varlen_attention(*(p.x_packed for p in packed), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                               backend="torch"), indices, B, S)
    scores = torch.einsum("bihd,bjhd->bhij", qkv[0], qkv[1]) / D**0.5
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    expected = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), qkv[2]) * mask[:, :, None, None]
    assert torch.allclose(out, expected, atol=1e-12)


BAD_UNPAD = [
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.randn(6)), ValueError, "x must have shape"),
    (dict(mask=torch.ones(2, 3, 1, dtype=torch.bool)), ValueError, "mask must have shape"),
    (dict(mask=torch.ones(2, 3)), TypeError, "mask must be a bool or integer tensor"),
    (dict(mask=torch.ones(3, 2, dtype=torch.bool)), ValueError, "mask has shape"),
    (dict(mask=torch.ones(2, 3, dtype=torch.bool, device="meta")), ValueError, "mask is on meta"),
]


@pytest.mark.parametrize("changes,error,match", BAD_UNPAD, ids=[m for _, _, m in BAD_UNPAD])
def test_unpad_bad_inputs(changes, error, match):
    kwargs = dict(x=torch.randn(2, 3, 4), mask=torch.ones(2, 3, dtype=torch.bool))
    kwargs.update(changes)
    with pytest.raises(error, match=match):
        unpad(**kwargs)


BAD_PAD = [
    (dict(x_packed=torch.tensor(1.0)), ValueError, "x_packed must have shape"),
    (dict(indices=torch.tensor([0.0, 1.0])), TypeError, "indices must have dtype"),
    (dict(indices=torch.tensor([[0, 1]])), ValueError, "indices must have shape"),
    (dict(indices=torch.tensor([0, 1, 2])), ValueError, "indices has 3 entries"),
    (dict(indices=torch.tensor([0, 6])), ValueError, r"indices must lie in \[0, batch \* seqlen = 6\)"),
    (dict(indices=torch.tensor([-1, 2])), ValueError, "indices must lie in"),
    (dict(batch=-1), ValueError, "batch must be in"),
    (dict(seqlen=2.5), TypeError, "seqlen must be an int"),
    (dict(indices=torch.tensor([0, 1], device="meta")), ValueError, "indices is on meta"),
]


@pytest.mark.parametrize("changes,error,match", BAD_PAD, ids=[m for _, _, m in BAD_PAD])
def test_pad_bad_inputs(changes, error, match):
    kwargs = dict(x_packed=torch.randn(2, 4), indices=torch.tensor([0, 5]), batch=2, seqlen=3)
    kwargs.update(changes)
    with pytest.raises(error, match=match):
        pad(**kwargs)


def test_pad_accepts_int32_indices_and_the_good_bad_input_defaults():
    x_packed = torch.randn(2, 4)
    out = pad(x_packed, torch.tensor([0, 5], dtype=torch.int32), 2, 3)
    assert torch.equal(out[0, 0], x_packed[0]) and torch.equal(out[1, 2], x_packed[1])
    assert out.abs().sum() == x_packed.abs().sum()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_unpad_attention_pad_matches_the_cpu(dtype):
    """On the GPU: unpad/pad equal their CPU results exactly, and the padded attention through
    unpad -> varlen_attention (default CUDA backend) -> pad matches float64 masked attention."""
    from bus_kernels.backends import available_backends

    B, S, H, D = 3, 70, 2, 32
    gen = torch.Generator().manual_seed(6)
    qkv = torch.randn(3, B, S, H, D, generator=gen, dtype=torch.float64)
    mask = random_mask(B, S, seed=7)
    cpu = [unpad(t.to(dtype), mask) for t in qkv]
    gpu = [unpad(t.to("cuda", dtype), mask.cuda()) for t in qkv]
    for c, g in zip(cpu, gpu):
        assert torch.equal(g.x_packed.cpu(), c.x_packed) and torch.equal(g.indices.cpu(), c.indices)
        assert torch.equal(g.cu_seqlens.cpu(), c.cu_seqlens) and g.max_seqlen == c.max_seqlen
    _, indices, cu_seqlens, max_seqlen = gpu[0]
    backend = "triton" if "triton" in available_backends("cuda") else "torch"
    out = pad(varlen_attention(*(p.x_packed for p in gpu), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                               backend=backend), indices, B, S)
    assert out.device.type == "cuda" and out.dtype == dtype
    ref = qkv.to(dtype).double()  # the inputs the GPU got, in float64
    scores = torch.einsum("bihd,bjhd->bhij", ref[0], ref[1]) / D**0.5
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    weights = torch.nan_to_num(scores.softmax(-1))  # the all-masked row gives zeros
    expected = torch.einsum("bhij,bjhd->bihd", weights, ref[2]) * mask[:, :, None, None]
    tol = 2e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    assert (out.cpu().double() - expected).abs().max().item() < tol * max(1.0, expected.abs().max().item())
