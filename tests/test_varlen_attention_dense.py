"""The dense fast path of varlen_attention (issue 23 item 3): a batch whose every sequence is full length
goes to PyTorch SDPA (backend ``sdpa``) on a view of the packed tensors; a ragged batch never does.
Values and gradients against the float64 per-sequence reference of ``test_varlen_attention.py``."""

from __future__ import annotations

import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from torch._dynamo.backends.registry import lookup_backend

from bus_kernels import BackendNotSupportedError, varlen_attention
from bus_kernels.backends import registered_ops
from bus_kernels.ops.varlen_attention import ATTENTION_LIMITS
from bus_kernels.ops.varlen_attention.dense import dense_reasons
from test_varlen_attention import cu_seqlens, make_inputs, max_err, reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class SdpaSpy:
    """Counts the calls of ``F.scaled_dot_product_attention`` and keeps the inputs of the last one."""

    def __init__(self):
        self.calls = 0
        self.args = None
        self._original = F.scaled_dot_product_attention

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.args = args
        return self._original(*args, **kwargs)

    def __enter__(self):
        self._patch = mock.patch.object(F, "scaled_dot_product_attention", self)
        self._patch.__enter__()
        return self

    def __exit__(self, *exc):
        return self._patch.__exit__(*exc)


def _dense(B, S_q, S_k, H, D, dtype, seed, causal=False, bias=False, backend=None, **kw):
    """Output and gradients of a dense call (and of the float64 reference), with the SDPA spy."""
    lens_q, lens_k = [S_q] * B, [S_k] * B
    q, k, v, grad = make_inputs(lens_q, lens_k, H, D, dtype, seed)
    key_bias = torch.randn(B * S_k, generator=torch.Generator().manual_seed(seed + 1)) if bias else None
    leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
    if bias:
        leaves.append(key_bias.clone().requires_grad_(True))
    with SdpaSpy() as spy:
        out = varlen_attention(*leaves[:3], cu_seqlens(lens_q), cu_seqlens(lens_k), S_q, S_k, causal=causal,
                               key_bias=leaves[3] if bias else None, backend=backend, **kw)
    grads = torch.autograd.grad(out, leaves, grad.to(dtype))
    ref_out, ref_grads = reference(q, k, v, grad, lens_q, lens_k, causal, key_bias)
    return spy, (out, grads), (ref_out, ref_grads)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("bias", [False, True], ids=["", "key_bias"])
def test_dense_batch_takes_sdpa_and_matches_float64(dtype, tol, causal, bias):
    spy, (out, grads), (ref_out, ref_grads) = _dense(3, 7, 7, 3, 5, dtype, seed=1, causal=causal, bias=bias)
    assert spy.calls == 1
    assert out.shape == (21, 3, 5) and out.dtype == dtype
    assert max_err(out, ref_out) < tol
    assert len(grads) == (4 if bias else 3)
    for g, r in zip(grads, ref_grads):
        assert max_err(g, r) < (10 * tol if g.dtype == dtype else 1e-5)  # key_bias and its gradient are fp32


def test_dense_cross_attention_with_other_key_length():
    """PAD's queries over fixed-k kept tokens: every q sequence full (S_q), every k sequence full (S_k)."""
    spy, (out, grads), (ref_out, ref_grads) = _dense(2, 5, 11, 2, 6, torch.float64, seed=2, bias=True)
    assert spy.calls == 1
    assert max_err(out, ref_out) < 1e-12 and all(max_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads))


def test_causal_with_unequal_lengths_is_not_dense():
    """Bottom-right alignment differs from SDPA's causal mask: the varlen backends take it."""
    spy, (out, _), (ref_out, _) = _dense(2, 5, 11, 2, 6, torch.float64, seed=3, causal=True)
    assert spy.calls == 0
    assert max_err(out, ref_out) < 1e-12
    assert dense_reasons(2, 10, 22, 5, 11, True) == ["causal with q length 5 != k length 11 (bottom-right alignment)"]


@pytest.mark.parametrize("lens_q, lens_k", [([4, 7, 7], [4, 7, 7]), ([7, 7, 7], [7, 6, 7]), ([0, 0], [0, 0])],
                         ids=["ragged_q", "ragged_k", "empty"])
def test_ragged_batches_do_not_take_sdpa(lens_q, lens_k):
    q, k, v, _ = make_inputs(lens_q, lens_k, 2, 8, torch.float64, seed=4)
    args = (q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q), max(lens_k))
    with SdpaSpy() as spy:
        out = varlen_attention(*args)
    assert spy.calls == 0
    assert torch.equal(out, varlen_attention(*args, backend="torch"))
    with pytest.raises(BackendNotSupportedError, match="backend 'sdpa' cannot run varlen_attention.*"
                                                       "(not every . sequence is full length|non-empty sequences)"):
        varlen_attention(*args, backend="sdpa")


def test_sdpa_gets_views_of_the_packed_tensors():
    """No copy: SDPA's q/k/v are (B, H, S, D) views of the caller's memory, here slices of a fused qkv."""
    B, S, H, D = 2, 9, 3, 8
    qkv = torch.randn(B * S, 3, H, D, dtype=torch.float64)
    q, k, v = qkv.unbind(1)  # (B * S, H, D) each, row stride 3 * H * D
    cu = cu_seqlens([S] * B)
    with SdpaSpy() as spy:
        out = varlen_attention(q, k, v, cu, cu, S, S, check_seqlens=False)
    assert spy.calls == 1
    for arg, packed in zip(spy.args, (q, k, v)):
        assert arg.shape == (B, H, S, D)
        assert arg.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
        assert arg.data_ptr() == packed.data_ptr()
    ref, _ = reference(q, k, v, torch.zeros_like(q), [S] * B, [S] * B, False)
    assert max_err(out, ref) < 1e-12


def test_the_decision_reads_no_device_value():
    """Decided from shapes and ints: no ``tolist`` / ``item`` (a host sync on a GPU) with check_seqlens=False."""
    B, S = 3, 6
    q = torch.randn(B * S, 2, 4)
    cu = cu_seqlens([S] * B)

    def refuse(*_args, **_kwargs):
        raise AssertionError("a device value was read on the host")

    with mock.patch.object(torch.Tensor, "tolist", refuse), mock.patch.object(torch.Tensor, "item", refuse), \
            SdpaSpy() as spy:
        varlen_attention(q, q, q, cu, cu, S, S, key_bias=torch.zeros(B * S), check_seqlens=False)
    assert spy.calls == 1


def test_masked_keys_stay_finite_in_float16():
    """The Hugging Face padded path masks padded keys with key_bias -1e9, which float16 cannot hold: clamped
    to float16's range, the masked keys get zero weight and a row whose keys are all masked stays finite
    (never NaN; its weights are degenerate on every backend)."""
    B, S, H, D = 2, 5, 2, 8
    q = torch.randn(B * S, H, D, dtype=torch.float16)
    cu = cu_seqlens([S] * B)
    bias = torch.zeros(B * S)
    bias[3:S] = -1e9  # sequence 0: keys 3, 4 masked
    bias[S:] = -1e9  # sequence 1: every key masked
    out = varlen_attention(q, q, q, cu, cu, S, S, key_bias=bias, backend="sdpa")
    ref = varlen_attention(q.float(), q.float(), q.float(), cu, cu, S, S, key_bias=bias, backend="torch")
    assert torch.isfinite(out).all()
    assert max_err(out[:S], ref[:S]) < 5e-3


def test_compiles_fullgraph():
    B, S, H, D = 2, 6, 2, 8
    q, k, v, grad = make_inputs([S] * B, [S] * B, H, D, torch.float32, seed=5)
    cu = cu_seqlens([S] * B)
    bias = torch.randn(B * S)

    def attend(q, k, v):
        return varlen_attention(q, k, v, cu, cu, S, S, causal=True, key_bias=bias)

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, backend=backend)
    leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
    out = compiled(*leaves)
    assert len(graphs) == 1 and "scaled_dot_product_attention" in graphs[0]
    grads = torch.autograd.grad(out, leaves, grad.float())
    ref_out, ref_grads = reference(q, k, v, grad, [S] * B, [S] * B, True, bias)
    assert max_err(out, ref_out) < 2e-5 and all(max_err(g, r) < 1e-4 for g, r in zip(grads, ref_grads))


def test_dispatch_table_and_info_say_so():
    prefs = registered_ops()["varlen_attention"]
    assert prefs["cpu"][0] == "sdpa" and prefs["cuda"][0] == "sdpa" and "sdpa" not in prefs.get("meta", [])
    assert ATTENTION_LIMITS["sdpa"].dense_only and not ATTENTION_LIMITS["triton"].dense_only
    info = subprocess.run([sys.executable, "-m", "bus_kernels.info"], capture_output=True, text=True, check=True)
    assert "varlen_attention: cpu: sdpa > torch" in info.stdout
    assert "sdpa: head dims 1..any, key_bias, dense batches only" in info.stdout
