"""varlen_attention: torch and triton (interpreter on CPU) against a float64 per-sequence reference
written here, input validation, torch.compile, and backend dispatch (flash_attn/xformers/torch_varlen).

On a machine with CUDA the same tests also run the Triton kernels on the GPU (ids ``triton-cuda``,
marked ``cuda``), forward and backward, in fp32, fp16 and bf16 against the float64 CPU reference;
low precision is judged against PyTorch's own error in that precision (FlashAttention's criterion,
``_bus_testing.assert_low_precision_close``)."""

from __future__ import annotations


import pytest
import torch

import bus_kernels
from bus_kernels import BackendNotSupportedError, backend_status, varlen_attention
from bus_kernels.backends import registered_ops
from bus_kernels.ops.varlen_attention import ATTENTION_LIMITS
from _bus_testing import HAS_CUDA, LOW_DTYPES, assert_low_precision_close

TRITON_OK = backend_status("cpu")["triton"] is None
# (backend, device): the CPU ids are the backend names; the GPU run of the Triton kernels is "triton-cuda"
BACKENDS = [
    pytest.param(("torch", "cpu"), id="torch"),
    pytest.param(("triton", "cpu"), id="triton", marks=pytest.mark.skipif(not TRITON_OK, reason="Triton interpreter off")),
]
if HAS_CUDA:
    _why = backend_status("cuda")["triton"]
    BACKENDS.append(pytest.param(("triton", "cuda"), id="triton-cuda", marks=[
        pytest.mark.cuda, pytest.mark.skipif(_why is not None, reason=f"triton on cuda: {_why}")]))
# head dims: the model's (16, 32, 64, 128), a masked one (80) and the largest (256, GPU only: slow in
# the interpreter)
HEAD_DIMS = [32, 64, 80, 128] + ([16, 256] if HAS_CUDA else [])

# sequence lengths: zero-length q and k, a single query, several 16-row blocks (the interpreter
# tile), more queries than keys (causal rows with no visible key) and more keys than queries
LENS_Q = [0, 1, 37, 20, 5]
LENS_K = [3, 0, 21, 40, 5]


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32)


def attention_per_sequence(q, k, v, lens_q, lens_k, scale, causal, key_bias=None):
    """Softmax attention one sequence at a time, in the inputs' dtype (float64 for the reference).
    Rows with no visible key give zeros."""
    outs, q0, k0 = [], 0, 0
    for lq, lk in zip(lens_q, lens_k):
        qs, ks, vs = q[q0:q0 + lq], k[k0:k0 + lk], v[k0:k0 + lk]  # (L, H, D)
        scores = torch.einsum("ihd,jhd->hij", qs, ks) * scale  # (H, lq, lk)
        if key_bias is not None:
            scores = scores + key_bias[k0:k0 + lk].to(scores.dtype)
        allowed = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        weights = torch.where(allowed.any(dim=1)[None, :, None], weights, torch.zeros_like(weights))
        outs.append(torch.einsum("hij,jhd->ihd", weights, vs))
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(outs) if outs else q.new_zeros(0, *q.shape[1:])


def make_inputs(lens_q, lens_k, H, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), H, D, generator=gen, dtype=torch.float64)
    k = torch.randn(sum(lens_k), H, D, generator=gen, dtype=torch.float64)
    v = torch.randn(sum(lens_k), H, D, generator=gen, dtype=torch.float64)
    grad = torch.randn(sum(lens_q), H, D, generator=gen, dtype=torch.float64)
    return q, k, v, grad


def run(case, q, k, v, grad, lens_q, lens_k, causal, key_bias=None, **kw):
    """Output and gradients (q, k, v[, key_bias]) of varlen_attention on fresh leaves of q's dtype, on the
    case's device (results stay there; ``max_err`` compares on the CPU)."""
    backend, device = case
    leaves = [t.detach().to(device, copy=True).requires_grad_(True) for t in (q, k, v)]
    if key_bias is not None:
        leaves.append(key_bias.detach().to(device, copy=True).requires_grad_(True))
    out = varlen_attention(
        *leaves[:3], cu_seqlens(lens_q).to(device), cu_seqlens(lens_k).to(device), max(lens_q, default=0),
        max(lens_k, default=0), causal=causal, key_bias=leaves[3] if key_bias is not None else None,
        backend=backend, **kw,
    )
    assert out.device.type == device
    grads = torch.autograd.grad(out, leaves, grad.to(out.device, out.dtype))
    return out, grads


def reference(q, k, v, grad, lens_q, lens_k, causal, key_bias=None, scale=None):
    """float64 output and gradients."""
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    if key_bias is not None:
        leaves.append(key_bias.detach().double().requires_grad_(True))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = attention_per_sequence(*leaves[:3], lens_q, lens_k, scale, causal, leaves[3] if key_bias is not None else None)
    return out, torch.autograd.grad(out, leaves, grad.double())


def max_err(a, b):
    return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item() if a.numel() else 0.0


def low_precision_run(q, k, v, grad, lens_q, lens_k, causal, key_bias=None, scale=None):
    """The same attention computed by PyTorch on the CPU in q's (low) dtype: output and gradients."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    if key_bias is not None:
        leaves.append(key_bias.detach().clone().requires_grad_(True))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = attention_per_sequence(*leaves[:3], lens_q, lens_k, scale, causal, leaves[3] if key_bias is not None else None)
    return out, torch.autograd.grad(out, leaves, grad.to(out.dtype))


def assert_low_precision_matches(out, grads, q, k, v, grad, lens_q, lens_k, causal, key_bias=None, scale=None):
    """fp16/bf16 output and gradients of a backend (``q, k, v`` the low-precision inputs it got) against
    float64, with PyTorch's error in the same precision as the bar."""
    ref_out, ref_grads = reference(q, k, v, grad, lens_q, lens_k, causal, key_bias, scale)
    low_out, low_grads = low_precision_run(q, k, v, grad, lens_q, lens_k, causal, key_bias, scale)
    assert out.dtype == q.dtype
    assert_low_precision_close(out, ref_out, low_out, q.dtype, "out")
    for name, g, lg, r in zip(["q", "k", "v", "key_bias"], grads, low_grads, ref_grads):
        assert g.dtype == (torch.float32 if name == "key_bias" else q.dtype)
        assert_low_precision_close(g, r, lg, q.dtype, f"grad {name}", ulps=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_fp32_matches_float64(backend, causal, D):
    q, k, v, grad = make_inputs(LENS_Q, LENS_K, 2, D, torch.float32, seed=D + causal)
    out, grads = run(backend, q.float(), k.float(), v.float(), grad, LENS_Q, LENS_K, causal)
    ref_out, ref_grads = reference(q.float(), k.float(), v.float(), grad, LENS_Q, LENS_K, causal)
    assert out.dtype == torch.float32 and out.shape == ref_out.shape
    assert max_err(out, ref_out) < 2e-5
    for name, g, r in zip("qkv", grads, ref_grads):
        assert max_err(g, r) < 5e-5 * max(1.0, r.abs().max().item()), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_visible_keys_are_zero(backend):
    # sequence 1 has no keys; causal with 37 queries over 21 keys hides every key from the first 16 rows
    q, k, v, grad = make_inputs(LENS_Q, LENS_K, 2, 32, torch.float32, seed=3)
    out, (dq, _, _) = run(backend, q.float(), k.float(), v.float(), grad, LENS_Q, LENS_K, causal=True)
    out, dq = out.cpu(), dq.cpu()
    blind = torch.zeros(sum(LENS_Q), dtype=torch.bool)
    blind[LENS_Q[0]] = True  # the single query of the key-less sequence
    start = sum(LENS_Q[:2])
    blind[start:start + LENS_Q[2] - LENS_K[2]] = True
    assert torch.all(out[blind] == 0) and torch.all(dq[blind] == 0)
    assert torch.all(out[~blind].abs().sum(-1) > 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_key_bias_and_its_gradient(backend, causal):
    lens_q, lens_k = [7, 0, 18], [19, 2, 11]
    q, k, v, grad = make_inputs(lens_q, lens_k, 3, 48, torch.float32, seed=11)
    bias = torch.log(torch.randint(1, 9, (sum(lens_k),)).float())  # log token counts (proportional attention)
    scale = 0.3
    out, grads = run(backend, q.float(), k.float(), v.float(), grad, lens_q, lens_k, causal, key_bias=bias,
                     softmax_scale=scale)
    ref_out, ref_grads = reference(q.float(), k.float(), v.float(), grad, lens_q, lens_k, causal, bias, scale)
    assert max_err(out, ref_out) < 2e-5
    for name, g, r in zip(["q", "k", "v", "key_bias"], grads, ref_grads):
        assert max_err(g, r) < 5e-5 * max(1.0, r.abs().max().item()), name


def _gpu_or_fp16(backend, dtype):
    if backend[1] == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is wrong in the Triton interpreter; bf16 runs on CUDA (torch: test below)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_key_bias_in_low_precision(backend, causal, dtype):
    _gpu_or_fp16(backend, dtype)
    lens_q, lens_k = [7, 0, 18], [19, 2, 11]
    q, k, v, grad = make_inputs(lens_q, lens_k, 3, 48, dtype, seed=12 + causal)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    bias = torch.log(torch.randint(1, 9, (sum(lens_k),)).float())
    out, grads = run(backend, q, k, v, grad, lens_q, lens_k, causal, key_bias=bias, softmax_scale=0.3)
    assert_low_precision_matches(out, grads, q, k, v, grad, lens_q, lens_k, causal, bias, 0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_fp16_within_twice_the_error_of_fp16_pytorch(backend, causal, dtype):
    # flash-attn's criterion: error vs float64 at most 2x that of the same math run in fp16 (+ one ulp)
    _gpu_or_fp16(backend, dtype)
    lens_q, lens_k = [1, 33, 0, 12], [24, 17, 4, 12]
    q, k, v, grad = make_inputs(lens_q, lens_k, 2, 64, dtype, seed=5 + causal)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out, grads = run(backend, q, k, v, grad, lens_q, lens_k, causal)
    assert_low_precision_matches(out, grads, q, k, v, grad, lens_q, lens_k, causal)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or backend_status("cuda")["triton"] is not None, reason="needs triton on CUDA")
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_cuda_every_head_dim_and_dtype(dtype, D):
    """Every fp16/bf16 tile config (per head dim) on the GPU, sequences spanning several tiles (fp32:
    test_fp32_matches_float64 runs the same head dims)."""
    lens_q, lens_k = [1, 200, 33, 0, 129], [17, 150, 257, 3, 129]
    q, k, v, grad = make_inputs(lens_q, lens_k, 3, D, dtype, seed=D)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    for causal in (False, True):
        out, grads = run(("triton", "cuda"), q, k, v, grad, lens_q, lens_k, causal)
        assert_low_precision_matches(out, grads, q, k, v, grad, lens_q, lens_k, causal)


def test_bf16_torch_backend_within_twice_the_error_of_bf16_pytorch():
    # bf16 arithmetic is wrong in the Triton interpreter: the triton bf16 kernels are checked by compiling (aot)
    lens_q, lens_k = [4, 19], [19, 6]
    q, k, v, grad = make_inputs(lens_q, lens_k, 2, 32, torch.bfloat16, seed=8)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out, _ = run(("torch", "cpu"), qb, kb, vb, grad, lens_q, lens_k, True)
    ref_out, _ = reference(qb, kb, vb, grad, lens_q, lens_k, True)
    low_out = attention_per_sequence(qb, kb, vb, lens_q, lens_k, 32**-0.5, True)
    assert out.dtype == torch.bfloat16
    assert max_err(out, ref_out) <= 2 * max_err(low_out, ref_out) + 1e-2


@pytest.mark.skipif(not TRITON_OK, reason="Triton interpreter off")
def test_check_seqlens_false_skips_the_host_checks():
    # the Triton kernels size their grid from the token counts, so an understated max_seqlen is harmless there
    good = _good()
    out = _call(max_seqlen_q=1, max_seqlen_k=1, check_seqlens=False, backend="triton")
    ref = attention_per_sequence(*(good[n].double() for n in "qkv"), [3, 4], [5, 2], 16**-0.5, False)
    assert max_err(out, ref) < 1e-5
    with pytest.raises(ValueError, match="max_seqlen_q=1 is smaller"):
        _call(max_seqlen_q=1, backend="triton")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or backend_status("cuda")["triton"] is not None, reason="needs triton on CUDA")
@pytest.mark.parametrize("dtype", [torch.float32] + LOW_DTYPES, ids=str)
@pytest.mark.parametrize("D", [32, 64])
def test_cuda_short_sequences_take_the_small_query_tile(dtype, D):
    """Captions (<= 32 tokens, causal) run on a query tile of next_pow2(max_seqlen_q) rows; an understated
    max_seqlen_q (check_seqlens=False) only changes the tiles, never the result."""
    from bus_kernels.ops.varlen_attention.tiles import SHORT_Q, _config

    lens = [32, 17, 1, 0, 32, 9, 30]
    assert _config("fwd", dtype, D, torch.device("cuda"), 32).block_m == 32 <= SHORT_Q
    assert _config("fwd", dtype, D, torch.device("cuda"), 9).block_m == 16
    q, k, v, grad = make_inputs(lens, lens, 6, D, dtype, seed=D)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out, grads = run(("triton", "cuda"), q, k, v, grad, lens, lens, True)
    if dtype == torch.float32:
        ref_out, ref_grads = reference(q, k, v, grad, lens, lens, True)
        assert max_err(out, ref_out) < 2e-5
        assert all(max_err(g, r) < 5e-5 * max(1.0, r.abs().max().item()) for g, r in zip(grads, ref_grads))
    else:
        assert_low_precision_matches(out, grads, q, k, v, grad, lens, lens, True)
    leaves = [t.to("cuda").requires_grad_(True) for t in (q, k, v)]
    cu = cu_seqlens(lens).cuda()
    understated = varlen_attention(*leaves, cu, cu, 8, 8, causal=True, check_seqlens=False, backend="triton")
    # same rows, same key tiles: equal up to the rounding of a different tile shape
    assert max_err(understated, out) <= 4 * torch.finfo(dtype).eps * max(1.0, out.abs().max().item())


def test_autotune_candidates_keep_the_table_tile_and_vary_the_rest():
    from bus_kernels.ops.varlen_attention import autotune
    from bus_kernels.ops.varlen_attention.tiles import _Config

    fwd = autotune.candidates("fwd", _Config(128, 64, 8, 3))
    assert [c.kwargs for c in fwd] == [{"BLOCK_N": 64}, {"BLOCK_N": 64}, {"BLOCK_N": 128}, {"BLOCK_N": 32}, {"BLOCK_N": 64}]
    assert [(c.num_warps, c.num_stages) for c in fwd] == [(8, 3), (8, 4), (8, 3), (8, 3), (4, 3)]
    dkdv = autotune.candidates("dkdv", _Config(16, 128, 4, 1))  # 16 // 2 is clamped: no duplicate
    assert all(set(c.kwargs) == {"BLOCK_M"} for c in dkdv) and len(dkdv) == 4
    assert not autotune.enabled() or not TRITON_OK  # never under the interpreter


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or backend_status("cuda")["triton"] is not None, reason="needs triton on CUDA")
def test_cuda_autotuned_launches_match_float64(monkeypatch):
    monkeypatch.setenv("BUS_KERNELS_AUTOTUNE", "1")
    lens_q, lens_k = [100, 37, 0, 200], [90, 37, 5, 260]
    q, k, v, grad = make_inputs(lens_q, lens_k, 4, 64, torch.bfloat16, seed=31)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    for causal in (False, True):
        out, grads = run(("triton", "cuda"), q, k, v, grad, lens_q, lens_k, causal)
        assert_low_precision_matches(out, grads, q, k, v, grad, lens_q, lens_k, causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [8, 40])
def test_strided_views_of_a_fused_qkv(backend, D):
    name, device = backend
    lens = [9, 22]
    gen = torch.Generator().manual_seed(9)
    qkv_cpu = torch.randn(sum(lens), 3, 2, D, generator=gen)  # (total, 3, H, D): q, k, v are strided views
    grad = torch.randn(sum(lens), 2, D, generator=gen, dtype=torch.float64)
    qkv = qkv_cpu.to(device).requires_grad_(True)
    q, k, v = qkv.unbind(1)  # the views themselves reach the kernels (no copy)
    assert not q.is_contiguous() and q.stride(0) == 3 * 2 * D
    cu = cu_seqlens(lens).to(device)
    out = varlen_attention(q, k, v, cu, cu, max(lens), max(lens), causal=True, backend=name)
    (dqkv,) = torch.autograd.grad(out, qkv, grad.to(device, out.dtype))
    ref_out, ref_grads = reference(*qkv_cpu.unbind(1), grad, lens, lens, causal=True)
    assert max_err(out, ref_out) < 2e-5
    assert all(max_err(g, r) < 1e-4 for g, r in zip(dqkv.unbind(1), ref_grads))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lens", [[], [0, 0]], ids=["no_sequences", "empty_sequences"])
def test_no_tokens(backend, lens):
    q, k, v, grad = make_inputs(lens, lens, 2, 16, torch.float32, seed=0)
    out, grads = run(backend, q.float(), k.float(), v.float(), grad, lens, lens, causal=False)
    assert out.shape == (0, 2, 16) and all(g.shape == (0, 2, 16) for g in grads)


# ---------------------------------------------------------------------------------------------
# Bad inputs


def _good():
    lens_q, lens_k = [3, 4], [5, 2]
    gen = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(3, 7, 2, 16, generator=gen).unbind(0)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens(lens_q), cu_seqlens_k=cu_seqlens(lens_k),
                max_seqlen_q=4, max_seqlen_k=5)


def _call(**changes):
    kwargs = _good()
    kwargs.update(changes)
    options = {name: kwargs.pop(name) for name in ("softmax_scale", "causal", "key_bias", "check_seqlens", "backend")
               if name in kwargs}
    return varlen_attention(*kwargs.values(), **options)


BAD_INPUTS = [
    (dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    (dict(q=torch.randn(7, 32)), ValueError, "q must have shape"),
    (dict(k=torch.randn(1, 7, 2, 16)), ValueError, "k must have shape"),
    (dict(q=torch.randint(0, 3, (7, 2, 16))), TypeError, "q must have a floating dtype"),
    (dict(v=torch.randn(7, 2, 16, dtype=torch.float64)), TypeError, "v must have q's dtype"),
    (dict(k=torch.randn(7, 3, 16)), ValueError, "k has size 3 in dim 1"),
    (dict(v=torch.randn(7, 2, 8)), ValueError, "v has size 8 in dim 2"),
    (dict(v=torch.randn(6, 2, 16)), ValueError, "v has size 6 in dim 0"),
    (dict(cu_seqlens_q=cu_seqlens([3, 4]).long()), TypeError, "cu_seqlens_q must have dtype torch.int32"),
    (dict(cu_seqlens_k=cu_seqlens([5, 2])[None]), ValueError, "cu_seqlens_k must have shape"),
    (dict(cu_seqlens_k=cu_seqlens([5, 1, 1])), ValueError, "cu_seqlens_k has size 4"),
    (dict(cu_seqlens_q=torch.tensor([0, 5, 3, 7], dtype=torch.int32),
          cu_seqlens_k=cu_seqlens([2, 2, 3])), ValueError, "cu_seqlens_q must be non-decreasing"),
    (dict(cu_seqlens_q=cu_seqlens([3, 3])), ValueError, r"cu_seqlens_q\[-1\] must equal the number of packed tokens 7"),
    (dict(cu_seqlens_k=torch.tensor([1, 5, 7], dtype=torch.int32)), ValueError, "cu_seqlens_k must start at 0"),
    (dict(max_seqlen_q=3), ValueError, "max_seqlen_q=3 is smaller than the longest sequence"),
    (dict(max_seqlen_k=4.0), TypeError, "max_seqlen_k must be an int"),
    (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k must be in"),
    (dict(softmax_scale="0.5"), TypeError, "softmax_scale must be a float"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(key_bias=torch.zeros(7, dtype=torch.float64)), TypeError, "key_bias must have dtype torch.float32"),
    (dict(key_bias=torch.zeros(6)), ValueError, "key_bias has size 6"),
    (dict(cu_seqlens_k=cu_seqlens([5, 2]).to("meta")), ValueError, "cu_seqlens_k is on meta"),
    (dict(v=torch.randn(7, 2, 16, device="meta")), ValueError, "v is on meta"),
    (dict(backend="nope"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("changes,error,match", BAD_INPUTS, ids=[m.split()[0] + f"-{i}" for i, (_, _, m) in enumerate(BAD_INPUTS)])
def test_bad_inputs_raise_naming_the_argument(changes, error, match):
    with pytest.raises(error, match=match):
        _call(**changes)


def test_good_inputs_of_the_bad_input_table_run():
    good = _good()
    ref = attention_per_sequence(*(good[n].double() for n in "qkv"), [3, 4], [5, 2], 16**-0.5, False)
    assert max_err(_call(), ref) < 1e-5


# ---------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    name, device = backend
    lens_q, lens_k = [5, 18], [12, 9]
    q, k, v, grad = make_inputs(lens_q, lens_k, 2, 32, torch.float32, seed=21)
    cu_q, cu_k = cu_seqlens(lens_q).to(device), cu_seqlens(lens_k).to(device)

    def attend(q, k, v):
        return varlen_attention(q, k, v, cu_q, cu_k, 18, 12, causal=True, backend=name) * 2.0

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    leaves = [t.to(device, torch.float32).requires_grad_(True) for t in (q, k, v)]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves, grad.to(device, torch.float32))
    ref_out, ref_grads = reference(q, k, v, grad * 2.0, lens_q, lens_k, causal=True)
    assert max_err(out, 2.0 * ref_out) < 5e-5
    assert all(max_err(g, r) < 1e-4 for g, r in zip(grads, ref_grads))


# ---------------------------------------------------------------------------------------------
# Dispatch and the optional adapters

ADAPTERS = ["flash_attn", "xformers", "torch_varlen"]


def test_adapters_are_registered_for_cuda_only():
    cuda = registered_ops()["varlen_attention"]["cuda"]
    assert set(ADAPTERS) <= set(cuda) and cuda[-1] == "torch"
    assert not set(ADAPTERS) & set(registered_ops()["varlen_attention"]["cpu"])


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapters_are_rejected_on_cpu_with_a_reason(name):
    kwargs = _good()
    kwargs.update(q=kwargs["q"].half(), k=kwargs["k"].half(), v=kwargs["v"].half())
    with pytest.raises(BackendNotSupportedError, match=f"backend '{name}' cannot run varlen_attention on cpu.*device cpu not supported"):
        varlen_attention(*kwargs.values(), backend=name)
    reason = backend_status("cuda")[name]
    assert reason is None or isinstance(reason, str) and reason


def test_cpu_default_is_the_torch_reference():
    out = _call()
    assert torch.equal(out, _call(backend="torch"))


def test_declared_limits_reject_with_reasons():
    assert ATTENTION_LIMITS["flash_attn"].reasons(64, has_key_bias=True) == ["key_bias is not supported"]
    assert ATTENTION_LIMITS["torch_varlen"].reasons(36, has_key_bias=False) == ["head dim 36 is not a multiple of 8"]
    assert ATTENTION_LIMITS["triton"].reasons(80, has_key_bias=True) == []
    assert "head dim 320 outside" in ATTENTION_LIMITS["triton"].reasons(320, has_key_bias=False)[0]


@pytest.mark.skipif(not TRITON_OK, reason="Triton interpreter off")
def test_triton_rejects_head_dims_above_256():
    q = torch.randn(3, 1, 264)
    cu = cu_seqlens([3])
    with pytest.raises(BackendNotSupportedError, match="head dim 264 outside"):
        varlen_attention(q, q, q, cu, cu, 3, 3, backend="triton")
    out = varlen_attention(q, q, q, cu, cu, 3, 3)  # the torch reference takes it
    assert out.shape == q.shape


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["triton"] + ADAPTERS)
def test_cuda_backends_match_float64(name, dtype):
    why = backend_status("cuda")[name]
    if why is not None:
        pytest.skip(f"{name} unavailable here: {why}")
    lens_q, lens_k = [1, 70, 33, 130], [3, 70, 80, 131]  # q length <= k length everywhere (xformers' causal rule)
    q, k, v, grad = make_inputs(lens_q, lens_k, 4, 64, dtype, seed=1)
    cu_q, cu_k = cu_seqlens(lens_q).cuda(), cu_seqlens(lens_k).cuda()
    for causal in (False, True):
        leaves = [t.to("cuda", dtype).requires_grad_(True) for t in (q, k, v)]
        out = varlen_attention(*leaves, cu_q, cu_k, 130, 131, causal=causal, backend=name)
        grads = torch.autograd.grad(out, leaves, grad.to("cuda", dtype))
        low = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]  # the same math in low precision, on CPU
        low_out = attention_per_sequence(*low, lens_q, lens_k, 64**-0.5, causal)
        low_grads = torch.autograd.grad(low_out, low, grad.to(dtype))
        ref_out, ref_grads = reference(*low, grad, lens_q, lens_k, causal)
        assert max_err(out.cpu(), ref_out) <= 2 * max_err(low_out, ref_out) + 1e-3
        for g, lg, r in zip(grads, low_grads, ref_grads):
            assert max_err(g.cpu(), r) <= 2 * max_err(lg, r) + 2e-3


def test_public_api_exports():
    assert bus_kernels.varlen_attention is varlen_attention
    assert {"varlen_attention", "pad", "unpad"} <= set(bus_kernels.__all__)
    assert ATTENTION_LIMITS["triton"].max_head_dim == 256
