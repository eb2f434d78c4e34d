"""Launch budgets of the public ops (issue 23 item 1, issue 22 "custom ops' autograd"), counted on CPU.

On a GPU each launch is host time (tens of µs through the Python layers) whatever its size, so an op
should launch its kernels and little else. What counts as a launch, for one call (``LaunchCounter``):

* every Triton kernel launch (counted by wrapping ``InterpretedFunction.run`` of the interpreter; the
  aten ops the interpreter itself runs to stage the arguments are not counted);
* every aten op dispatched by the public function, by its ``bus::`` custom ops' Python bodies (the
  counter descends into them) and by autograd (zero-filled gradients, the backward formula), **except**
  ops that launch nothing on a GPU: views and metadata ops (``view``, ``_unsafe_view``, ``t``,
  ``transpose``, ``permute``, ``expand``, ``slice``, ``select``, ``unsqueeze``, ``squeeze``,
  ``as_strided``, ``detach``, ``alias``, ...: every op whose schema returns an alias) and allocations
  (``empty``, ``empty_like``, ``empty_strided``, ``new_empty``, ``new_empty_strided``: memory from the
  caching allocator, no kernel). ``zeros``/``full``/``ones`` do count: they fill;
* a custom op with a C++ body (the ``native`` backend) counts once: its kernels cannot be seen here;
* every read of device values on the host (a device-to-host copy on a GPU, and a sync): ``.item()``
  dispatches ``_local_scalar_dense``, and ``Tensor.tolist``, which dispatches nothing on CPU, is
  counted by wrapping it.

Counted in the warm state a training step runs in: ``varlen_attention`` after one call with the same
``cu_seqlens`` objects (its block tables are built once per offsets object, about 19 small ops, then
reused by every layer, forward and backward) and with ``check_seqlens=False`` (the model's call; the
default check adds a ``cat`` and a host read on the first call with new offsets objects). Forward + backward is one forward, then
``torch.autograd.grad`` of the op's differentiable output with a contiguous gradient (so that no
copy of the incoming gradient is counted against the op).

``python tests/test_op_launches.py`` prints the counts of every op and backend (the table in the
commit message and the issue note).
"""

from __future__ import annotations

import collections
import contextlib
import os
from unittest import mock

if __name__ == "__main__":  # as a script: the interpreter must be on before bus_kernels defines its kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode

import bus_kernels
from bus_kernels.backends import TRITON_INTERPRET

aten = torch.ops.aten

# allocations: memory from the caching allocator, no kernel
_ALLOCATIONS = {
    aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
    aten.new_empty.default, aten.new_empty_strided.default,
}
# not views by schema, but metadata only
_METADATA = {aten._unsafe_view.default, aten.lift_fresh.default}


def launches(func) -> bool:
    """Whether the aten op ``func`` launches device work (see the module docstring)."""
    return not (func.is_view or func in _ALLOCATIONS or func in _METADATA)


class LaunchCounter(TorchDispatchMode):
    """Counts launches (module docstring) inside it: ``ops`` (aten op name -> calls), ``kernels`` (Triton
    kernel name -> launches), ``free`` (ops seen that launch nothing), ``total`` = launches;
    ``dispatched``: every op dispatched, free ones and ``bus::`` ops included (host work per op)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.kernels: collections.Counter[str] = collections.Counter()
        self.free: collections.Counter[str] = collections.Counter()
        self.dispatched = 0
        self._paused = False

    @property
    def total(self) -> int:
        return sum(self.ops.values()) + sum(self.kernels.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._paused:  # the interpreter staging a kernel's arguments, or paused
            return func(*args, **kwargs)
        self.dispatched += 1
        opdef = _maybe_get_opdef(func) if func.namespace == "bus" else None
        if opdef is not None:  # a Python custom op: count what its body runs
            with self:
                return opdef._init_fn(*args, **kwargs)
        counter = self.ops if launches(func) else self.free
        counter[str(func.overloadpacket.__name__ if func.namespace == "aten" else func)] += 1
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def paused(self):
        """Nothing inside is counted (the test's own set-up)."""
        saved, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = saved

    @contextlib.contextmanager
    def _counting_outside_dispatch(self):
        """Counts what the dispatch mode cannot see: Triton launches (under the interpreter) and tolist."""
        counter = self
        original_tolist = torch.Tensor.tolist

        def tolist(tensor, *args, **kwargs):
            if not counter._paused:
                counter.ops["Tensor.tolist"] += 1
            return original_tolist(tensor, *args, **kwargs)

        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(torch.Tensor, "tolist", tolist))
            if TRITON_INTERPRET:
                from triton.runtime.interpreter import InterpretedFunction

                run = InterpretedFunction.run

                def counted_run(fn, *args, warmup=False, **kwargs):
                    if not warmup and not counter._paused:
                        counter.kernels[fn.__name__] += 1
                    with counter.paused():
                        return run(fn, *args, warmup=warmup, **kwargs)

                stack.enter_context(mock.patch.object(InterpretedFunction, "run", counted_run))
            yield

    # entered again (nested) for each custom op's body: the kernel counting is set up by the outermost
    def __enter__(self):
        self._depth = getattr(self, "_depth", 0) + 1
        if self._depth == 1:
            self._stack = contextlib.ExitStack()
            self._stack.enter_context(self._counting_outside_dispatch())
        return super().__enter__()

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        self._depth -= 1
        if self._depth == 0:
            self._stack.close()
        return result


# ---------------------------------------------------------------------------------------------
# One call of each op, at small shapes (the counts do not depend on them)

B, N, C, H, D = 2, 17, 32, 2, 16


def _leaf(*shape, positive=False):
    g = torch.Generator().manual_seed(sum(shape))
    t = torch.rand(*shape, generator=g) if positive else torch.randn(*shape, generator=g)
    return t.requires_grad_(True)


def _case_topk_gather(backend):
    x, scores = _leaf(B, N, C), _leaf(B, N, positive=True)
    return (x, scores), lambda: (bus_kernels.topk_gather(x, scores, 9, backend=backend).tokens,)


def _case_topk_gather_varlen(backend):
    x, scores = _leaf(B, N, C), _leaf(B, N, positive=True)
    k = torch.tensor([9, 4])
    return (x, scores), lambda: (
        bus_kernels.topk_gather_varlen(x, scores, k, backend=backend, check_k=False).tokens,
    )


def _case_text_patch_scores(backend):
    query, keys = _leaf(B, H, D), _leaf(B, N, H, D)
    return (query, keys), lambda: (bus_kernels.text_patch_scores(query, keys, backend=backend),)


def _attention_case(backend, key_bias: bool):
    cu_q = torch.tensor([0, 17, 26], dtype=torch.int32)
    cu_k = torch.tensor([0, 13, 33], dtype=torch.int32)
    q, k, v = _leaf(26, H, D), _leaf(33, H, D), _leaf(33, H, D)
    bias = _leaf(33) if key_bias else None
    inputs = (q, k, v) + ((bias,) if key_bias else ())

    def call():
        return (bus_kernels.varlen_attention(
            q, k, v, cu_q, cu_k, 17, 20, key_bias=bias, check_seqlens=False, backend=backend,
        ),)

    return inputs, call


def _case_unpad(backend):
    x = _leaf(B, N, C)
    mask = torch.arange(N) < torch.tensor([[N], [9]])  # (B, N) bool
    return (x,), lambda: (bus_kernels.unpad(x, mask).x_packed,)


def _case_pad(backend):
    x_packed = _leaf(26, C)
    indices = (torch.arange(N) < torch.tensor([[N], [9]])).flatten().nonzero().flatten()
    return (x_packed,), lambda: (bus_kernels.pad(x_packed, indices, B, N),)


def _case_merge_tokens(backend):
    x = _leaf(B, N, C)
    plan = bus_kernels.bipartite_soft_matching(x.detach(), 4)
    return (x,), lambda: (bus_kernels.merge_tokens(x, plan)[0],)


# ops with no backend choice (plain PyTorch): counted once
NO_BACKEND = {"unpad": _case_unpad, "pad": _case_pad, "merge_tokens": _case_merge_tokens}

CASES = {
    "topk_gather": _case_topk_gather,
    "topk_gather_varlen": _case_topk_gather_varlen,
    "text_patch_scores": _case_text_patch_scores,
    "varlen_attention": lambda backend: _attention_case(backend, key_bias=False),
    "varlen_attention key_bias": lambda backend: _attention_case(backend, key_bias=True),
    **NO_BACKEND,
}


def _run(inputs, call, backward: bool, counter: LaunchCounter | None = None) -> None:
    outputs = call()
    if backward:
        with counter.paused() if counter is not None else contextlib.nullcontext():
            grads = [torch.randn(o.shape) for o in outputs]
        torch.autograd.grad(outputs, inputs, grads)


def count(op: str, backend: str, backward: bool) -> LaunchCounter:
    """Launches of one forward (and backward) of ``op`` on ``backend``, after one uncounted warm-up call
    with the same inputs (lazy set-up such as varlen_attention's block tables is not counted)."""
    inputs, call = CASES[op](backend)
    _run(inputs, call, backward=True)
    with LaunchCounter() as counter:
        _run(inputs, call, backward, counter)
    return counter


# Launches of the Triton backend, (forward, forward + backward): what the ops reach, held so that none
# creeps back. Issue 23's ceilings: topk_gather 3 / 5, text_patch_scores 2 / 3, varlen_attention 1 / 5.
BUDGETS = {
    "topk_gather": (2, 3),  # select, gather (the row counts: a cached constant); backward 1 kernel
    "topk_gather_varlen": (3, 4),  # one host read of k (the output sizes), select, gather; backward 1
    "text_patch_scores": (2, 3),  # logits, combine; backward 1 kernel
    "varlen_attention": (1, 4),  # forward; backward delta, dK/dV, dQ
    "varlen_attention key_bias": (1, 5),  # + the head sum of the key-bias gradient
}
# ops that fill memory: none may run in an op's backward on a kernel backend
_FILLS = {"zeros", "zeros_like", "new_zeros", "full", "full_like", "new_full", "fill_", "zero_"}


def _describe(counter: LaunchCounter) -> str:
    return f"{counter.total}: ops {dict(counter.ops)}, kernels {dict(counter.kernels)}"


needs_interpreter = pytest.mark.skipif(not TRITON_INTERPRET, reason="counts Triton launches through the interpreter")


@needs_interpreter
@pytest.mark.parametrize("op", sorted(BUDGETS))
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_triton_launch_budget(op, backward):
    counter = count(op, "triton", backward)
    budget = BUDGETS[op][backward]
    assert counter.total <= budget, f"{op} {'fwd+bwd' if backward else 'fwd'}: {_describe(counter)} > {budget}"


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("op", sorted(BUDGETS))
def test_backward_fills_nothing(op, backend):
    """The registered autograd of the Triton and native ops (the native ops share it) builds no zero
    gradients for outputs without one, and the backward launchers allocate without filling."""
    if backend not in bus_kernels.available_backends():
        pytest.skip(f"backend {backend} not available here")
    if op.startswith("varlen_attention") and backend == "native":
        pytest.skip("native implements the pruning ops only")
    inputs, call = CASES[op](backend)
    _run(inputs, call, backward=True)  # warm
    outputs = call()
    grads = [torch.randn(o.shape) for o in outputs]
    with LaunchCounter() as counter:
        torch.autograd.grad(outputs, inputs, grads)
    assert not _FILLS & set(counter.ops), _describe(counter)


@needs_interpreter
def test_saved_outputs_carry_no_gradient():
    """Outputs saved only for backward (lse, logits, the gather's bookkeeping) are non-differentiable."""
    from bus_kernels.ops.text_patch_scores import _tps_triton, _tps_triton_direct
    from bus_kernels.ops.topk_gather import _topk_gather_triton, _topk_gather_triton_direct
    from bus_kernels.ops.varlen_attention.launch import _varlen_attention_triton, _varlen_attention_triton_direct

    # the registered custom ops and their eager fast paths (bus_kernels/_direct.py) alike
    for tps, gather, attention in ((_tps_triton, _topk_gather_triton, _varlen_attention_triton),
                                   (_tps_triton_direct, _topk_gather_triton_direct, _varlen_attention_triton_direct)):
        query, keys = _leaf(B, H, D), _leaf(B, N, H, D)
        scores, *saved = tps(query, keys, 0.25)
        assert scores.requires_grad and not any(t.requires_grad for t in saved)
        x, s = _leaf(B, N, C), _leaf(B, N, positive=True)
        for k_rows, fixed_k in ((torch.tensor([3, 5]), -1), (torch.tensor([4, 4]), 4)):
            tokens, *saved = gather(x, s, k_rows, 8, True, fixed_k)
            assert tokens.requires_grad and not any(t.requires_grad for t in saved)
            assert tokens.shape == ((10, C) if fixed_k < 0 else (B, 5, C))
        cu = torch.tensor([0, 5, 9], dtype=torch.int32)
        q = _leaf(9, H, D)
        out, lse = attention(q, q, q, cu, cu, None, 0.25, False, 5)
        assert out.requires_grad and not lse.requires_grad


# ---------------------------------------------------------------------------------------------


def table(backends=("torch", "triton", "native")) -> str:
    """Markdown: launches and dispatched ops of every op and available backend, forward and forward + backward."""
    rows = ["| op | backend | launches fwd | fwd+bwd | dispatched ops fwd | fwd+bwd | fwd+bwd launches |",
            "|---|---|---|---|---|---|---|"]
    for op in CASES:
        for backend in ("-",) if op in NO_BACKEND else backends:
            if op not in NO_BACKEND and backend not in bus_kernels.available_backends():
                continue
            try:
                fwd, both = count(op, backend, False), count(op, backend, True)
            except bus_kernels.BackendNotSupportedError:
                continue
            what = ", ".join(f"{n} {c}" for n, c in sorted({**both.ops, **both.kernels}.items()))
            counts = f"{fwd.total} | {both.total} | {fwd.dispatched} | {both.dispatched}"
            rows.append(f"| {op} | {backend} | {counts} | {what} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
