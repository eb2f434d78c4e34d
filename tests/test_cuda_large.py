"""Large-offset cases on the GPU (marked ``cuda``; skipped without CUDA): element offsets past 2**31,
where a 32-bit index would wrap, and the longest row the on-chip top-k selection takes.

  * varlen_attention (Triton) on q, k, v that are strided views of one fused ``(total, 3, H, D)`` qkv
    tensor of more than 2**31 elements, forward and backward, checked on the sequences at both ends
    against float64;
  * topk_gather (Triton and native) on rows of N = 16384 tokens (``TRITON_MAX_N``) with bf16 tokens and
    fp32 scores, fixed and ragged k, and on an ``x`` of more than 2**31 elements, checked on the row that
    starts past 2**31.

Sizes: small head/channel dims and many rows keep each case at a few GB of GPU memory and seconds.
"""

from __future__ import annotations

import pytest
import torch

import bus_kernels as bk
from _bus_testing import HAS_CUDA, assert_low_precision_close, device_backends
from bus_kernels.backends import backend_status
from test_pruning_ops import ref_kept_positions, ref_row
from test_varlen_attention import attention_per_sequence

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]
INT32_LIMIT = 2**31
CUDA_TOPK = [p for p in device_backends("topk_gather") if p.values[0][1] == "cuda"] or [
    pytest.param(("triton", "cuda"), id="triton-cuda")]  # collected (and skipped) on CPU-only machines


def _cu(lengths: list[int], device) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(device, torch.int32)


@pytest.mark.skipif(HAS_CUDA and backend_status("cuda")["triton"] is not None, reason="needs triton on CUDA")
@pytest.mark.parametrize("causal", [True], ids=["causal"])
def test_varlen_attention_fused_qkv_past_2_31_elements(causal):
    H, D, dtype = 1, 16, torch.float16
    pattern = [97, 1, 300, 33, 0, 160, 511, 64]  # ragged, a zero-length one, several tiles long
    per_cycle = sum(pattern)
    cycles = INT32_LIMIT // (3 * H * D * per_cycle) + 2
    lengths = pattern * cycles + [129, 5, 257]  # the last sequences start past 2**31 elements of qkv
    total = sum(lengths)
    assert total * 3 * H * D > INT32_LIMIT and (total - 391) * 3 * H * D > INT32_LIMIT
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(total, 3, H, D, device="cuda", dtype=dtype, generator=gen).requires_grad_(True)
    q, k, v = qkv.unbind(1)  # strided views: row stride 3 * H * D
    cu = _cu(lengths, "cuda")
    out = bk.varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), causal=causal, backend="triton")
    dout = torch.randn(total, H, D, device="cuda", dtype=dtype, generator=gen)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    starts = cu.tolist()
    # the first two sequences and the last three (past 2**31 elements), each against float64
    for b in [0, 2, len(lengths) - 3, len(lengths) - 2, len(lengths) - 1]:
        lo, hi = starts[b], starts[b + 1]
        seq = [t.detach()[lo:hi].cpu() for t in (q, k, v)]
        leaves64 = [t.double().requires_grad_(True) for t in seq]
        ref = attention_per_sequence(*leaves64, [hi - lo], [hi - lo], D**-0.5, causal)
        ref_grads = torch.autograd.grad(ref, leaves64, dout[lo:hi].cpu().double())
        leaves16 = [t.clone().requires_grad_(True) for t in seq]
        low = attention_per_sequence(*leaves16, [hi - lo], [hi - lo], D**-0.5, causal)
        low_grads = torch.autograd.grad(low, leaves16, dout[lo:hi].cpu())
        assert_low_precision_close(out[lo:hi], ref, low, dtype, f"out of sequence {b} at row {lo}")
        for name, g, r, lg in zip("qkv", dqkv[lo:hi].unbind(1), ref_grads, low_grads):
            assert_low_precision_close(g, r, lg, dtype, f"grad {name} of sequence {b} at row {lo}", ulps=2)


@pytest.mark.parametrize("case", CUDA_TOPK)
@pytest.mark.parametrize("ragged", [False, True], ids=["fixed_k", "ragged_k"])
def test_topk_gather_rows_of_16384_tokens(case, ragged):
    backend, device = case
    B, N, C, dtype = 3, 16384, 24, torch.bfloat16
    x_cpu = torch.randn(B, N, C).to(dtype)
    s_cpu = torch.rand(B, N)
    s_cpu[1] = torch.randint(0, 50, (N,)).float() / 49  # many ties
    s_cpu[2] = s_cpu[2] ** 8  # most scores near zero
    x, scores = x_cpu.to(device).requires_grad_(True), s_cpu.to(device).requires_grad_(True)
    ks = [N // 2 + 1, 4999, 1] if ragged else [4999] * B
    if ragged:
        tokens, index, cu, _ = bk.topk_gather_varlen(x, scores, torch.tensor(ks, device=device), backend=backend)
        assert cu.tolist() == [0, ks[0] + 1, ks[0] + ks[1] + 2, sum(ks) + 3]
    else:
        tokens, index = bk.topk_gather(x, scores, ks[0], backend=backend)
        tokens, index = tokens.reshape(-1, C), index.reshape(-1)
    x64, s64 = x_cpu.double().requires_grad_(True), s_cpu.double().requires_grad_(True)
    rows = [ref_row(x64[b], s64[b], ks[b], True) for b in range(B)]
    assert index.tolist() == [p for b in range(B) for p in ref_kept_positions(s_cpu[b].tolist(), ks[b])]
    expected = torch.cat([r[0] for r in rows])
    g = torch.randn(expected.shape, dtype=torch.float64)
    gx, gs = torch.autograd.grad(tokens, (x, scores), g.to(device, dtype))
    gx64, gs64 = torch.autograd.grad(expected, (x64, s64), g)
    x_low, s_low = x_cpu.clone().requires_grad_(True), s_cpu.clone().requires_grad_(True)
    low = torch.cat([ref_row(x_low[b], s_low[b], ks[b], True)[0] for b in range(B)]).to(dtype)
    gx_low, gs_low = torch.autograd.grad(low, (x_low, s_low), g.to(dtype))
    assert_low_precision_close(tokens, expected, low, dtype, "tokens")
    assert_low_precision_close(gx, gx64, gx_low, dtype, "grad x", ulps=2)
    assert_low_precision_close(gs, gs64, gs_low, dtype, "grad scores", ulps=2)


@pytest.mark.parametrize("case", CUDA_TOPK)
def test_topk_gather_x_past_2_31_elements(case):
    backend, device = case
    B, N, C, k, dtype = 3, 16384, 43_712, 6000, torch.bfloat16  # 2.1e9 elements; row 2 starts at 1.4e9...
    assert (B - 1) * N * C < INT32_LIMIT < B * N * C
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(B, N, C, device=device, dtype=dtype, generator=gen).requires_grad_(True)
    scores = torch.rand(B, N, device=device, generator=gen).requires_grad_(True)
    tokens, index = bk.topk_gather(x, scores, k, backend=backend)
    g = torch.randn(tokens.shape, device=device, dtype=dtype, generator=gen)
    gx, gs = torch.autograd.grad(tokens, (x, scores), g)
    b = B - 1  # its last elements lie past 2**31
    s = scores.detach()[b].double()
    assert index[b].tolist() == ref_kept_positions(scores.detach()[b].tolist(), k)
    keep = torch.zeros(N, dtype=torch.bool, device=device)
    keep[index[b]] = True
    xb = x.detach()[b]
    assert torch.equal(tokens[b, :k], xb[index[b]])  # copies
    w = torch.where(keep, 0.0, s)
    den = w.sum()
    fused = (w @ xb.double()) / den  # float64 on the GPU: (C,)
    torch.testing.assert_close(tokens[b, k].double(), fused, rtol=torch.finfo(dtype).eps, atol=1e-6)
    gf = g[b, k].double()
    want_gx = (w / den)[:, None] * gf[None, :]  # (N, C): dropped rows
    want_gx[index[b]] = g[b, :k].double()
    torch.testing.assert_close(gx[b].double(), want_gx, rtol=torch.finfo(dtype).eps, atol=1e-30)
    gs_terms = (xb.double() - fused[None, :]) * gf[None, :]  # (N, C)
    want_gs = torch.where(keep, 0.0, gs_terms.sum(1) / den)
    mass = torch.where(keep, 0.0, gs_terms.abs().sum(1) / den)  # fp32 sums over C: error relative to this
    assert torch.all((gs[b].double() - want_gs).abs() <= 1e-4 * mass + 1e-30)
