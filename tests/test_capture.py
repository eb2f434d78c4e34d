"""Capturable ops (issue 23 item 4): every public op traces into one graph under
``torch.compile(fullgraph=True)``, reads no device value on the host while a CUDA graph is captured, and
keeps no Python-side cache that a graph replay would skip.

CPU only: a capture is simulated by patching ``bus_kernels._capture.capturing`` (the one predicate the ops
ask); the GPU device check captures a real training step. Host reads are caught by making ``tolist`` and
``item`` raise. ``aot_eager`` traces forward and backward as inductor does and runs the traced ops eagerly.
"""

from __future__ import annotations

import contextlib
import weakref
from unittest import mock

import pytest
import torch

import bus_kernels as bk
from bus_kernels import _capture
from bus_kernels.backends import backend_status
from bus_kernels.ops.varlen_attention import tiles

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KERNEL_BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(backend_status("cpu")[name] is not None,
                                                                reason=f"{name}: {backend_status('cpu')[name]}"))
                   for name in ("torch", "triton", "native")]


@contextlib.contextmanager
def no_host_reads():
    def refuse(*_args, **_kwargs):
        raise AssertionError("a device value was read on the host")

    with mock.patch.object(torch.Tensor, "tolist", refuse), mock.patch.object(torch.Tensor, "item", refuse):
        yield


@contextlib.contextmanager
def simulated_capture():
    """As if a CUDA graph were being captured on the current stream (for CPU tensors too)."""
    with mock.patch.object(_capture, "capturing", lambda t: True), mock.patch.object(tiles, "capturing", lambda t: True):
        yield


# ---------------------------------------------------------------------------------------------
# Inputs: one small ViT-like step (B rows of N tokens, H heads of D dims)

B, N, C, H, D, K = 2, 13, 24, 2, 12, 7


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "query": torch.randn(B, H, D, generator=g, requires_grad=True),
        "keys": torch.randn(B, N, H, D, generator=g, requires_grad=True),
        "x": torch.randn(B, N, C, generator=g, requires_grad=True),
    }


CU_RAGGED = torch.tensor([0, 5, 13], dtype=torch.int32)  # 13 tokens in two sequences: 5 and 8


def pipeline(backend, query, keys, x):
    """Every capturable public op once: scores -> fixed-k selection -> dense and ragged attention over the kept
    tokens (key_bias from ToMe sizes) -> merge -> pad. Returns the float results (for values and grads)."""
    attn_backend = None if backend == "native" else backend  # native implements the pruning ops only
    scores = bk.text_patch_scores(query, keys, backend=backend)  # (B, N)
    kept = bk.topk_gather(x, scores, K, backend=backend)  # tokens (B, K + 1, C)
    k_mass = bk.keep_by_mass(scores.detach(), 0.8, 1, N)  # (B,) int64, stays on the device
    plan = bk.bipartite_soft_matching(kept.tokens.detach(), 2)
    merged, size = bk.merge_tokens(kept.tokens, plan)  # (B, K - 1, C), (B, K - 1)
    S = merged.shape[1]
    q, k, v = merged.reshape(B * S, 3, H, C // (3 * H)).unbind(1)  # packed and dense: (B * S, H, 4) each
    cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32)
    dense = bk.varlen_attention(q, k, v, cu, cu, S, S)  # backend=None: the sdpa fast path
    biased = bk.varlen_attention(q, k, v, cu, cu, S, S, key_bias=size.flatten().log(), backend=attn_backend)
    rq, rk, rv = x.reshape(B * N, 3, H, C // (3 * H))[:N].unbind(1)  # (13, H, 4) each: sequences of 5 and 8
    ragged = bk.varlen_attention(rq, rk, rv, CU_RAGGED, CU_RAGGED, 8, 8, causal=True, backend=attn_backend)
    indices = torch.tensor([0, 1, 2, 3, 4, 13, 14, 15, 16, 17, 18, 19, 20])  # the ragged rows in a (2, 13) pad
    padded = bk.pad(ragged.flatten(1), indices, B, N)  # (B, N, H * 4)
    noise = bk.random_scores(B, N)  # the RNG: under compile its own stream, compared by shape only
    return {"scores": scores, "tokens": kept.tokens, "index": kept.index, "k_mass": k_mass, "merged": merged,
            "dense": dense, "biased": biased, "padded": padded}, noise


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_every_op_compiles_into_one_graph(backend):
    inputs = _inputs()
    eager, noise = pipeline(backend, **inputs)
    torch._dynamo.reset()
    compiled = torch.compile(lambda **kw: pipeline(backend, **kw), fullgraph=True, backend="aot_eager")
    traced, traced_noise = compiled(**inputs)
    assert traced_noise.shape == noise.shape
    for name in eager:
        if eager[name].dtype.is_floating_point:
            torch.testing.assert_close(traced[name], eager[name], rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert torch.equal(traced[name], eager[name]), name
    leaves = list(inputs.values())
    floats = [n for n in eager if eager[n].requires_grad]
    g = [torch.randn_like(eager[n]) for n in floats]
    want = torch.autograd.grad([eager[n] for n in floats], leaves, g)
    got = torch.autograd.grad([traced[n] for n in floats], leaves, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# CUDA-graph capture (simulated): no host reads, no cached state


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_no_host_reads_while_capturing(backend):
    """The default path of every capturable op (value checks on by default included) reads nothing while
    a graph is captured: the checks ran in the eager warm-up call."""
    inputs = _inputs()
    pipeline(backend, **inputs)  # eager warm-up (block tables, lazy compiles)
    with simulated_capture(), no_host_reads():
        out, _ = pipeline(backend, **inputs)
        torch.autograd.grad([out["biased"].sum(), out["padded"].sum(), out["scores"].sum()], list(inputs.values()))


def test_ops_whose_size_needs_a_host_read_refuse_capture():
    x, scores = torch.randn(2, 6, 4), torch.rand(2, 6)
    with simulated_capture():
        with pytest.raises(bk.CaptureError, match="topk_gather_varlen reads device values on the host"):
            bk.topk_gather_varlen(x, scores, torch.tensor([2, 3]), check_k=False)
        with pytest.raises(bk.CaptureError, match="unpad reads device values"):
            bk.unpad(x, torch.ones(2, 6, dtype=torch.bool))
    assert not _capture.capturing(torch.empty(1))  # on CPU (and without a capture) never


def test_block_tables_are_neither_read_nor_cached_while_capturing():
    """A table cached before the capture would be baked into the graph with the offsets of that moment."""
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    eager = tiles._block_table(cu, 12, 4)
    new_cu = torch.tensor([0, 3], dtype=torch.int32)
    with simulated_capture():
        first, second = tiles._block_table(cu, 12, 4), tiles._block_table(cu, 12, 4)
        tiles._block_table(new_cu, 3, 4)
    assert first is not eager and second is not first  # built inside the graph every time
    assert all(torch.equal(a, b) for a, b in zip(first, eager))
    assert tiles._block_table(cu, 12, 4) is eager  # the eager entry is untouched
    assert id(new_cu) not in tiles._OFFSETS  # nothing built during the capture was cached


# ---------------------------------------------------------------------------------------------
# The block-table cache: keyed by the offsets object itself, never by a reusable id


def test_block_table_cache_ignores_an_entry_of_a_dead_object_with_the_same_id():
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    other = torch.tensor([0, 9, 9], dtype=torch.int32)
    stale = tiles._build_block_table(other, 9, 4)
    # what a freed tensor whose id the new one reuses would leave, had its entry survived: another object
    tiles._OFFSETS[id(cu)] = (weakref.ref(other), cu._version, {(9, 4): stale})
    try:
        table = tiles._block_table(cu, 9, 4)
        assert table is not stale
        assert all(torch.equal(a, b) for a, b in zip(table, tiles._build_block_table(cu, 9, 4)))
    finally:
        tiles._OFFSETS.pop(id(cu), None)


def test_block_table_cache_entries_die_with_their_offsets_even_when_ids_are_reused():
    for i in range(20):  # CPython reuses freed ids at once: new offsets under an old id get their own table
        cu = torch.tensor([0, i, 2 * i + 1], dtype=torch.int32)
        table = tiles._block_table(cu, 2 * i + 1, 4)
        assert all(torch.equal(a, b) for a, b in zip(table, tiles._build_block_table(cu.clone(), 2 * i + 1, 4)))
        del cu, table
    assert not any(entry[0]() is None for entry in tiles._OFFSETS.values())  # no entry outlives its offsets


def test_inference_tensors_are_not_cached():
    """Inference tensors have no version counter: an in-place change of the offsets could not be seen."""
    with torch.inference_mode():
        cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
        first = tiles._block_table(cu, 12, 4)
        cu[2] = 7  # allowed on an inference tensor, inside inference mode
        second = tiles._block_table(cu, 12, 4)
        expected = tiles._build_block_table(cu.clone(), 12, 4)
    assert second is not first and all(torch.equal(a, b) for a, b in zip(second, expected))


# ---------------------------------------------------------------------------------------------
# Models


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_patched_timm_vit_compiles_fullgraph_on_each_kernel_backend(backend):
    """tests/test_patch_compile.py trains the patched timm ViT compiled on the default backend; here the
    forward on every kernel backend (the Triton one through its custom ops) at a tiny size."""
    timm = pytest.importorskip("timm")
    import bus_kernels.patch as patch

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3).eval()
    patch.timm(model, layers=[1], keep=0.5, policy="text", backend=backend)
    x, text = torch.randn(2, 3, 32, 32), torch.randn(2, 192)
    with torch.no_grad(), patch.text_guidance(model, text):
        expected = model(x)
        torch._dynamo.reset()
        out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
