"""``--bf16-weights``: bf16 working weights for the matmul layers, fp32 master weights in the optimizer.

Under bf16 autocast every fp32 weight and bias of a ``Linear`` / ``Conv2d`` / ``Embedding`` is cast to bf16
in forward and its gradient cast back to fp32 in backward: about four dispatched ops per tensor and step,
each a kernel launch on a GPU whose step is bound by the host (issue 22). Kept in bf16 they need no cast:
a bus-small step dispatches 3784 ops instead of 4419 (``tests/test_dispatch_budget.py``). The update
stays in fp32, on master copies, at two multi-tensor ops per step (``_foreach_copy_``: the gradients to
the masters, the weights back) whatever the number of tensors.

Numerics: the forward is the same as autocast's (autocast multiplies in bf16 anyway) and so is each
backward matmul; only where one weight gets two gradient terms in a step (tied word embeddings) do they add
in bf16 instead of fp32. LayerNorm, embeddings of positions/[CLS] and every other parameter stay fp32.

Supported with bf16 autocast on (``--amp``; without it fp32 activations would meet bf16 weights), DDP,
``--compile``; not with ``--fsdp`` (FSDP2 has its own mixed-precision policy) nor ``--accum-steps > 1``
(micro-batch gradients would add in bf16: ``.grad`` must stay the all-reduced buffer under DDP).
Checkpoints hold the fp32 masters (``full_precision``), so ``--resume`` restores them exactly.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

MATMUL_MODULES = (nn.Linear, nn.Conv2d, nn.Embedding)


class MasterWeights:
    """The bf16 working weights of ``model`` and their fp32 masters.

    Build it before the optimizer and give the optimizer ``optimizer_params(groups)``; each step call
    ``grads_to_masters()`` after backward (before clipping: clip ``update_params()``) and
    ``masters_to_weights()`` after ``optimizer.step()``."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        seen: set[int] = set()
        self.working: list[nn.Parameter] = []
        for module in model.modules():
            if isinstance(module, MATMUL_MODULES):
                for p in module.parameters(recurse=False):
                    if p.requires_grad and p.is_floating_point() and id(p) not in seen:  # tied weights once
                        seen.add(id(p))
                        self.working.append(p)
        self.masters = [p.detach().float().clone() for p in self.working]
        for p in self.working:
            p.data = p.data.to(dtype)
        self._master_of = {id(p): m for p, m in zip(self.working, self.masters)}
        self._others = [p for p in model.parameters() if p.requires_grad and id(p) not in self._master_of]
        self._grad_buffers: list[torch.Tensor] | None = None

    def optimizer_params(self, groups: list[dict]) -> list[dict]:
        """Optimizer parameter groups with each working weight replaced by its master (same order, so the
        optimizer state of a checkpoint maps one to one)."""
        return [{**g, "params": [self._master_of.get(id(p), p) for p in g["params"]]} for g in groups]

    def update_params(self) -> list[torch.Tensor]:
        """What the optimizer updates: the masters and every other trainable parameter (for clipping)."""
        return self.masters + self._others

    @torch.no_grad()
    def grads_to_masters(self) -> None:
        """Each working weight's gradient (bf16) into its master's ``.grad`` (fp32), in one multi-tensor op,
        through fp32 buffers allocated once (the optimizer may set the masters' ``.grad`` to None); the
        working gradients are dropped. A weight without a gradient leaves its master without one."""
        if self._grad_buffers is None:
            self._grad_buffers = [torch.empty_like(m) for m in self.masters]
        pairs = [(buf, p.grad) for p, buf in zip(self.working, self._grad_buffers) if p.grad is not None]
        if pairs:
            torch._foreach_copy_([b for b, _ in pairs], [g for _, g in pairs])
        for p, m, buf in zip(self.working, self.masters, self._grad_buffers):
            m.grad = None if p.grad is None else buf
            p.grad = None

    @torch.no_grad()
    def masters_to_weights(self) -> None:
        """The updated masters back into the working weights (rounded to bf16), in one multi-tensor op."""
        torch._foreach_copy_(self.working, self.masters)

    @contextlib.contextmanager
    def full_precision(self):
        """Inside, the working weights hold their fp32 masters (for saving a checkpoint); bf16 again after."""
        saved = [p.data for p in self.working]
        try:
            for p, m in zip(self.working, self.masters):
                p.data = m.detach()
            yield
        finally:
            for p, d in zip(self.working, saved):
                p.data = d
