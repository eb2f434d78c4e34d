"""The eager fast path of the Triton ops (``bus_kernels/_direct.py``, issue 23 item 2) and the host-side
caches that keep validation as strong as before while doing it once (backend choice, constants, offsets).

An eager call on plain tensors skips the ``torch.library`` dispatcher; anything that may look at the op
(a dispatch mode, a tensor subclass, torch.compile) still gets the custom op. Both paths must give the
same outputs and gradients, which are checked here against the float64 reference.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bus_kernels as bk
from bus_kernels import _direct, backends, reference
from bus_kernels.backends import BackendNotSupportedError

pytestmark = pytest.mark.skipif(backends.backend_status("cpu")["triton"] is not None,
                                reason="the Triton backend cannot run on CPU here")


class _Recorder(TorchDispatchMode):
    """Records every op dispatched while active (custom ops included)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _scores64(query, keys):
    """The text-patch score in the input's precision: mean over heads of softmax_n(<q_h, k_nh> / sqrt(D))."""
    logits = torch.einsum("bhd,bnhd->bhn", query, keys) * query.shape[-1] ** -0.5
    return logits.softmax(dim=-1).mean(dim=1)


def _cases(g: torch.Generator):
    """name -> (inputs drawn per case, call on the Triton backend, call on the float64 reference)."""
    B, N, H, D, C = 3, int(torch.randint(5, 23, (1,), generator=g)), 2, 16, 24
    k = int(torch.randint(1, N, (1,), generator=g))
    lengths = torch.randint(1, 9, (B,), generator=g)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    total, longest = int(cu[-1]), int(lengths.max())
    k_rows = torch.randint(0, N + 1, (B,), generator=g)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    return {
        "text_patch_scores": ((rand(B, H, D), rand(B, N, H, D)),
                              lambda a, be: bk.text_patch_scores(*a, backend=be),
                              lambda a: _scores64(*a)),
        "topk_gather": ((rand(B, N, C), torch.rand(B, N, generator=g)),
                        lambda a, be: bk.topk_gather(*a, k, backend=be).tokens,
                        lambda a: reference.topk_gather(*a, k, True)[0]),
        "topk_gather_varlen": ((rand(B, N, C), torch.rand(B, N, generator=g)),
                               lambda a, be: bk.topk_gather_varlen(*a, k_rows, backend=be).tokens,
                               lambda a: reference.topk_gather_varlen(*a, k_rows, True)[0]),
        "varlen_attention": ((rand(total, H, D), rand(total, H, D), rand(total, H, D)),
                             lambda a, be: bk.varlen_attention(*a, cu, cu, longest, longest, backend=be),
                             lambda a: reference.varlen_attention(*a, cu, cu, longest, longest, D ** -0.5, False)),
    }


@pytest.mark.parametrize("op", ["text_patch_scores", "topk_gather", "topk_gather_varlen", "varlen_attention"])
@pytest.mark.parametrize("seed", [0, 1])
def test_direct_and_dispatched_paths_agree_with_float64(op, seed):
    g = torch.Generator().manual_seed(1000 * seed + len(op))
    inputs, call, ref = _cases(g)[op]

    def run(under_mode: bool):
        args = tuple(t.clone().requires_grad_(t.is_floating_point()) for t in inputs)
        if under_mode:
            with _Recorder() as rec:
                out = call(args, "triton")
        else:
            with torch.profiler.profile() as prof:
                out = call(args, "triton")
            rec = None
            dispatched = {e.name for e in prof.events()}
            # the direct path: the Python body ran without the custom op (no bus:: op recorded)
            assert not any(name.startswith("bus::") for name in dispatched), dispatched
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        grads = torch.autograd.grad(out, [a for a in args if a.requires_grad], grad_out)
        return out, grads, grad_out, rec

    out_direct, grads_direct, grad_out, _ = run(False)
    out_disp, grads_disp, _, rec = run(True)
    assert any(name.startswith("bus.") and name.endswith("triton") for name in rec.ops), rec.ops

    args64 = tuple(t.double().requires_grad_(t.is_floating_point()) for t in inputs)
    out64 = ref(args64)
    grads64 = torch.autograd.grad(out64, [a for a in args64 if a.requires_grad], grad_out.double())
    for out, grads in ((out_direct, grads_direct), (out_disp, grads_disp)):
        torch.testing.assert_close(out.double(), out64, atol=1e-5, rtol=1e-4)
        for g_, g64 in zip(grads, grads64):  # fp32 sums over channels: an absolute error at the gradient's scale
            torch.testing.assert_close(g_.double(), g64, atol=1e-5 * max(1.0, g64.abs().max().item()) * 10, rtol=1e-4)
    torch.testing.assert_close(out_direct, out_disp, atol=0, rtol=0)  # same kernels, same result


def test_the_custom_op_is_taken_under_modes_subclasses_and_transforms():
    op = _direct.DirectOp("Probe", custom_op=lambda *a: "custom op", forward=lambda *a: "direct")
    plain = torch.randn(3)
    assert op(plain, 2, None) == "direct"
    assert op(torch.nn.Parameter(plain)) == "direct"
    with _Recorder():
        assert op(plain) == "custom op"

    class Sub(torch.Tensor):
        pass

    assert op(plain, plain.as_subclass(Sub)) == "custom op"
    seen = []
    torch.func.vmap(lambda t: seen.append(op(t)) or t)(torch.randn(2, 3))
    assert seen == ["custom op"]


def test_backward_under_a_dispatch_mode_takes_the_backward_custom_op():
    """Forward on the direct path, backward under a dispatch mode: the mode sees one backward op."""
    x = torch.randn(2, 9, 8, requires_grad=True)
    scores = torch.rand(2, 9, requires_grad=True)
    out = bk.topk_gather(x, scores, 4, backend="triton").tokens
    with _Recorder() as rec:
        out.sum().backward()
    assert "bus.topk_gather_triton_backward" in rec.ops, rec.ops


def test_backend_choice_is_cached_and_forgotten_when_the_registry_changes(monkeypatch):
    q, keys = torch.randn(2, 2, 16), torch.randn(2, 5, 2, 16)
    backends.forget_choices()
    bk.text_patch_scores(q, keys)
    assert any(key[0] == "text_patch_scores" for key in backends._CHOSEN)
    # the environment is part of the key: a change is seen on the next call
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.select_backend("text_patch_scores", q.device, q.dtype, False, extra_reasons=lambda n: [],
                                   extra_key=False) == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    assert backends.select_backend("text_patch_scores", q.device, q.dtype, False, extra_reasons=lambda n: [],
                                   extra_key=False) == "triton"
    monkeypatch.delenv(backends.ENV_VAR)
    # registering anything forgets every choice (the preference list is restored: other tests rely on it)
    saved = list(backends._PREFERENCE["text_patch_scores"]["cpu"])
    try:
        backends.add_preference("text_patch_scores", "cpu", "torch", position=0)
        assert not backends._CHOSEN
    finally:
        backends._PREFERENCE["text_patch_scores"]["cpu"] = saved
        backends.forget_choices()
    # errors are never cached, and a bad backend argument still gets its own error
    with pytest.raises(TypeError, match="backend must be a str"):
        bk.text_patch_scores(q, keys, backend=["triton"])
    with pytest.raises(BackendNotSupportedError, match="head dim 300"):
        bk.text_patch_scores(torch.randn(1, 1, 300), torch.randn(1, 3, 1, 300), backend="triton")
    assert bk.text_patch_scores(torch.randn(1, 1, 300), torch.randn(1, 3, 1, 300)).shape == (1, 3)  # torch takes it


def test_offsets_are_checked_once_per_object_and_again_after_an_in_place_change(monkeypatch):
    from bus_kernels.ops.varlen_attention import tiles

    reads = []
    real_tolist = torch.Tensor.tolist

    def counting_tolist(self):
        reads.append(self.shape)
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    q = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    for _ in range(3):
        bk.varlen_attention(q, q, q, cu, cu, 6, 6, backend="torch")
    assert len(reads) == 1  # read once, then known good
    with pytest.raises(ValueError, match="max_seqlen_q=5"):
        bk.varlen_attention(q, q, q, cu, cu, 5, 6, backend="torch")  # another claim: checked again
    cu[1] = 7  # in place: a new version, so the values are read and checked again
    with pytest.raises(ValueError, match="smaller than the longest"):
        bk.varlen_attention(q, q, q, cu, cu, 6, 6, backend="torch")
    cu[1] = 11
    with pytest.raises(ValueError, match="non-decreasing"):
        bk.varlen_attention(q, q, q, cu, cu, 20, 20, backend="torch")
    other = torch.tensor([0, 4, 10], dtype=torch.int32)
    before = len(reads)
    bk.varlen_attention(q, q, q, other, other, 6, 6, backend="torch")
    assert len(reads) == before + 1  # a new object is read
    assert tiles.offsets_facts(other) is not None


def test_is_dense_matches_dense_reasons():
    from bus_kernels.ops.varlen_attention.dense import dense_reasons, is_dense

    g = torch.Generator().manual_seed(7)
    for _ in range(500):
        b, mq, mk = (int(v) for v in torch.randint(0, 4, (3,), generator=g))
        tq = b * mq - int(torch.randint(0, 2, (1,), generator=g))
        tk = b * mk - int(torch.randint(0, 2, (1,), generator=g))
        causal = bool(torch.randint(0, 2, (1,), generator=g))
        assert is_dense(b, tq, tk, mq, mk, causal) == (not dense_reasons(b, tq, tk, mq, mk, causal))


def test_constants_are_shared_bounded_and_fixed_k_rows_stay_correct():
    from bus_kernels.ops import _triton_utils

    a = _triton_utils.constant((3,), 5, torch.int64, torch.empty(0))
    assert a is _triton_utils.constant((3,), 5, torch.int64, torch.empty(0))
    assert a.tolist() == [5, 5, 5]
    for n in range(2 * _triton_utils._MAX_CONSTANTS):
        _triton_utils.constant((n + 1,), 1, torch.int32, torch.empty(0))
    assert len(_triton_utils._CONSTANTS) <= _triton_utils._MAX_CONSTANTS
    from unittest import mock

    from bus_kernels import _capture

    cached = _triton_utils.constant((3,), 5, torch.int64, torch.empty(0))
    with mock.patch.object(_capture, "capturing", lambda t: True):  # as if a CUDA graph were being captured
        made = _triton_utils.constant((7,), 9, torch.int64, torch.empty(0))
        fresh = _triton_utils.constant((3,), 5, torch.int64, torch.empty(0))  # cached before: not read either
    assert made.tolist() == [9] * 7 and ((7,), 9, torch.int64, made.device) not in _triton_utils._CONSTANTS
    assert fresh.tolist() == [5] * 3 and fresh is not cached
    g = torch.Generator().manual_seed(3)
    for B, N, k in ((1, 7, 3), (4, 7, 3), (4, 7, 6), (2, 33, 1)):  # many (B, k): rows keep k each
        x, s = torch.randn(B, N, 8, generator=g), torch.rand(B, N, generator=g)
        out = bk.topk_gather(x, s, k, backend="triton")
        ref_tokens, ref_index = reference.topk_gather(x.double(), s.double(), k, True)
        torch.testing.assert_close(out.tokens.double(), ref_tokens, atol=1e-5, rtol=1e-5)
        assert torch.equal(out.index, ref_index)


def test_fast_validation_paths_accept_only_what_the_named_checks_accept():
    """The common-case checks of topk_gather and varlen_attention (a few comparisons) must imply the named
    checks: over random valid inputs and one-field corruptions, whenever the fast test passes, the named
    checks pass too; and every corrupted call still raises its named error through the public function."""
    import importlib

    api = importlib.import_module("bus_kernels.ops.varlen_attention.api")
    tg = importlib.import_module("bus_kernels.ops.topk_gather")
    g = torch.Generator().manual_seed(11)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    good = dict(q=torch.randn(7, 2, 8), k=torch.randn(7, 2, 8), v=torch.randn(7, 2, 8), cu_q=cu, cu_k=cu,
                max_q=4, max_k=4, key_bias=None)
    bad_values = {
        "q": [torch.randn(7, 2), torch.randn(7, 2, 8).half(), torch.randn(7, 0, 8), torch.randint(0, 3, (7, 2, 8)),
              "q"],
        "k": [torch.randn(7, 3, 8), torch.randn(7, 2, 4), torch.randn(7, 2, 8).double(), torch.randn(7, 2, 8, 1)],
        "v": [torch.randn(6, 2, 8), torch.randn(7, 2, 8).half(), torch.randn(7, 1, 8)],
        "cu_q": [cu.long(), cu[None], torch.zeros(0, dtype=torch.int32), torch.tensor([0, 7], dtype=torch.int32)],
        "cu_k": [cu.long(), torch.tensor([0, 7], dtype=torch.int32)],
        "max_q": [-1, 4.0, True, None],
        "max_k": [-2, "4"],
        "key_bias": [torch.zeros(7), torch.zeros(7, dtype=torch.float64)],
    }
    for field, values in bad_values.items():
        for value in values:
            args = dict(good, **{field: value})
            ordered = tuple(args[n] for n in ("q", "k", "v", "cu_q", "cu_k", "max_q", "max_k", "key_bias"))
            if api._common_case(*ordered):
                api._check_inputs(*ordered)  # must not raise
            elif field != "key_bias":  # a key bias is valid, only not the common case
                with pytest.raises((TypeError, ValueError)):
                    api._check_inputs(*ordered)
    assert api._common_case(*good.values())
    for _ in range(200):  # random shapes: the fast test passes exactly on consistent ones
        B, N, C = (int(v) for v in torch.randint(0, 4, (3,), generator=g))
        x = torch.randn(B, N, C)
        s = torch.randn(int(torch.randint(0, 4, (1,), generator=g)), N if bool(torch.rand(1, generator=g) < 0.7) else N + 1)
        if s.shape[0] == B and s.shape[1] == N:
            assert tg._check_x_scores(x, s) == (B, N, C)
        else:
            with pytest.raises(ValueError, match="scores has size"):
                tg._check_x_scores(x, s)
    for x, s, match in ((torch.randn(2, 3), torch.rand(2, 3), "x must have shape"),
                        (torch.randn(2, 3, 4), torch.rand(2, 3).long(), "scores must have a floating dtype"),
                        (torch.randn(2, 3, 4).int(), torch.rand(2, 3), "x must have a floating dtype"),
                        ("x", torch.rand(2, 3), "x must be a torch.Tensor")):
        with pytest.raises((TypeError, ValueError), match=match):
            tg._check_x_scores(x, s)
