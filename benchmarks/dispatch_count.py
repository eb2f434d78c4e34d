"""Counting the ops a training step dispatches, by model part: on a GPU each is a host-side cost.

On a GPU whose kernels are short, a step costs about (dispatched ops) x (host time per op), whatever its
FLOPs (issue 22: one H200, bus-small at batch 32, 6086 ops in 114 ms, ~19 us each). The count does not
depend on the device or the batch size, so it is measured exactly on CPU.

``DispatchCounter`` is a ``TorchDispatchMode``: it sees every aten op below autograd, forward and
backward, and the optimizer's. A ``bus::`` custom op counts once (the mode is off inside the op's own
implementation). Each op is charged to a model part:

* in forward, by the Python stack of the call, innermost first: the function files ``selection.py`` /
  ``losses.py`` of ``bus_model``, or a method of one of the ``PARTS`` modules (``self`` of the frame);
* in backward, the part whose forward op created the autograd node being run: a ``TorchFunctionMode``
  tags the ``grad_fn`` of every forward result (``node.metadata["bus_part"]``), and the dispatch mode
  reads ``torch._C._current_autograd_node()``;
* ``optimizer`` for ops outside forward and backward (the AdamW update); an op outside the model's forward
  while the caller says the forward or backward phase runs (the engine's gradient seed, ``ones_like`` of
  the loss) is model glue.

``by_phase`` splits the same ops by phase (``forward``, ``backward``, ``optimizer``) when the caller says
which phase runs (``counter.phase``; ``count_step_ops`` does).
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# (module attribute path on BusModel, part name); the innermost running one wins
PARTS = (
    ("text_encoder", "text tower"),
    ("vision", "ViT"),
    ("pad", "PAD"),
    ("fusion", "fusion encoder"),
    ("decoder", "decoder"),
    ("momentum_model", "momentum model"),
)
# ops issued from these files of bus_model are charged to these parts, whatever module runs them
FILE_PARTS = {"selection.py": "selection", "losses.py": "losses"}
GLUE = "model glue (heads, stacking)"
OPTIMIZER = "optimizer"
PHASES = ("forward", "backward", "optimizer")
_TAG = "bus_part"
_IN_BUS_MODEL = os.sep + "bus_model" + os.sep


class DispatchCounter(TorchDispatchMode):
    """Counts aten (and ``bus::``) ops dispatched inside it; ``by_part``: part -> ops, ``by_op``: op -> calls.

    ``model``: a ``BusModel`` whose parts get hooks while the counter is active (None: every op is GLUE
    or OPTIMIZER)."""

    def __init__(self, model: torch.nn.Module | None = None):
        super().__init__()
        self.model = model
        self.by_part: collections.Counter[str] = collections.Counter()
        self.by_op: collections.Counter[str] = collections.Counter()
        self.by_part_op: collections.Counter[tuple[str, str]] = collections.Counter()
        self.by_phase: collections.Counter[str] = collections.Counter()
        self.phase: str | None = None  # one of PHASES while the caller runs that phase; None: not told
        self._modules: dict[int, str] = {}  # id(part module) -> part name
        self._hooks: list = []
        self._function_mode = _TagGradFn(self)
        self.in_forward = False

    # ---- the part an op belongs to
    def current_part(self) -> str:
        node = torch._C._current_autograd_node()
        if node is not None:  # backward: the part that created this node
            return node.metadata.get(_TAG, GLUE)
        if not self.in_forward:
            return GLUE if self.phase in ("forward", "backward") else OPTIMIZER
        return self._forward_part()

    def _forward_part(self) -> str:
        frame = sys._getframe(2)
        while frame is not None:  # innermost first: a function file of bus_model, or a method of a part module
            path = frame.f_code.co_filename
            name = os.path.basename(path)
            if name in FILE_PARTS and _IN_BUS_MODEL in path:
                return FILE_PARTS[name]
            owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
            if owner is not None and id(owner) in self._modules:
                return self._modules[id(owner)]
            frame = frame.f_back
        return GLUE

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = (func.name() if hasattr(func, "name") else str(func)).split(".")[0]
        part = self.current_part()
        self.by_op[name] += 1
        self.by_part[part] += 1
        self.by_part_op[part, name] += 1
        if self.phase is not None:
            self.by_phase[self.phase] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.by_part.values())

    # ---- module hooks and the forward tagger
    def __enter__(self):
        self._modules = {}
        if self.model is not None:
            for attr, part in PARTS:
                module = getattr(self.model, attr, None)
                if isinstance(module, torch.nn.Module):
                    self._modules[id(module)] = part
            self._hooks.append(self.model.register_forward_pre_hook(self._start_forward))
            self._hooks.append(self.model.register_forward_hook(self._end_forward))
        self._function_mode.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._function_mode.__exit__(*exc)
            for h in self._hooks:
                h.remove()
            self._hooks.clear()

    def _start_forward(self, _module, _args):
        self.in_forward = True

    def _end_forward(self, _module, _args, _out):
        self.in_forward = False


class _TagGradFn(TorchFunctionMode):
    """Tags the autograd nodes a forward call creates with the part that was running (for backward)."""

    def __init__(self, counter: DispatchCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.counter.in_forward and torch.is_grad_enabled():
            part = self.counter._forward_part()
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                    _tag(t.grad_fn, part)
        return out


def _tag(node, part: str) -> None:
    """Tag ``node`` and the untagged nodes behind it (those made inside composite functions)."""
    todo = [node]
    while todo:
        n = todo.pop()
        if n is None or _TAG in n.metadata:
            continue
        n.metadata[_TAG] = part
        todo.extend(nxt for nxt, _ in n.next_functions)


def count_step_ops(model: torch.nn.Module, batch: tuple, *, amp: bool = True, optimizer=None, warmup: int = 1) -> dict:
    """Dispatched ops of one training step: forward, backward and (``optimizer`` given) its ``step``.

    ``batch``: the model's input tuple; ``amp``: bf16 autocast. After ``warmup`` unmeasured steps (caches
    filled, optimizer state built). Each step gets fresh copies of the inputs, made outside the count.
    Returns ``{"total", "by_part", "by_phase", "by_op"}``."""
    device_type = batch[0].device.type

    def step(counter: DispatchCounter | None = None):
        fresh = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in batch)
        def phase(name: str | None) -> None:
            if counter is not None:
                counter.phase = name

        with counter if counter is not None else contextlib.nullcontext():
            phase("forward")
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
                out = model(*fresh)
            phase("backward")
            out.loss.backward()
            phase("optimizer")
            if optimizer is not None:
                optimizer.step()
            phase(None)
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    counter = DispatchCounter(model)
    step(counter)
    return {"total": counter.total, "by_part": dict(counter.by_part.most_common()),
            "by_phase": {p: counter.by_phase[p] for p in PHASES}, "by_op": dict(counter.by_op.most_common())}
