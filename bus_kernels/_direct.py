"""Eager calls that skip the ``torch.library`` dispatcher (issue 23 item 2: the wrapper's host time).

Every Triton op is a ``torch.library`` custom op, so that ``torch.compile``, FakeTensor, FLOP counters and
dispatch modes see one opaque op with a fake implementation. But an eager call through the dispatcher walks
several Python layers (the op's ``__call__``, the autograd kernel, a redispatch, the backend kernel) before
the op's body runs: about as much host time as the body itself, on every call. So an eager call on plain
tensors runs the body directly, through a ``torch.autograd.Function`` built from the very
``setup_context`` / ``backward`` pair registered with the custom op when a gradient is recorded, and bare
otherwise. Same kernels, same saved tensors, same gradients.

The custom op is still used whenever something may look at the op instead of running it: while
``torch.compile`` traces, under any ``TorchDispatchMode`` (FakeTensorMode, FlopCounterMode,
``bus_benchmarks.dispatch_count``), under functorch transforms (vmap, grad) and for tensor subclasses. Backward makes the same choice again, so a dispatch mode around ``backward()`` alone
also sees the backward custom op.
"""

from __future__ import annotations

from typing import Callable

import torch

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _outside_eager() -> bool:
    """torch.compile tracing, a TorchDispatchMode or a functorch transform is active."""
    return (torch.compiler.is_compiling()  # first: Dynamo folds it, and never traces the checks after it
            or torch._C._len_torch_dispatch_stack() > 0 or torch._C._are_functorch_transforms_active())


class DirectOp:
    """Calls ``forward(*args)`` directly in eager mode on plain tensors, else ``custom_op(*args)`` (see the
    module docstring).

    ``custom_op``: the ``torch.library`` op whose body is ``forward``; ``autograd(backward_fn)`` returns the
    ``(setup_context, backward)`` pair of its autograd formula (the one given to
    ``torch.library.register_autograd``), with ``backward_fn(grad, *saved)`` computing the input gradients
    from the incoming gradient first. The direct path uses it with a ``backward_fn`` that itself calls
    ``backward_body`` directly (or ``backward_op`` where the dispatcher is needed). ``autograd=None``: the op
    has no backward (every output non-differentiable).
    """

    def __init__(self, name: str, custom_op: Callable, forward: Callable,
                 autograd: Callable | None = None, backward_op: Callable | None = None,
                 backward_body: Callable | None = None):
        self.custom_op = custom_op
        self.forward = forward
        self.function = None
        if autograd is not None:
            def backward_fn(grad, *saved):
                # saved: the forward's plain inputs and outputs; only the incoming gradient is new
                if _outside_eager() or type(grad) not in _PLAIN_TENSORS:
                    return backward_op(grad, *saved)
                return backward_body(grad, *saved)

            setup_context, backward = autograd(backward_fn)

            # forward(ctx, ...) rather than a separate setup_context: Function.apply then skips binding
            # the arguments to forward's signature (inspect.signature on every call)
            def forward_with_ctx(ctx, *args):
                output = forward(*args)
                setup_context(ctx, args, output)
                return output

            self.function = type(name, (torch.autograd.Function,), {
                "forward": staticmethod(forward_with_ctx), "backward": staticmethod(backward)})

    def __call__(self, *args):
        if _outside_eager():
            return self.custom_op(*args)
        grad = False
        for a in args:  # one pass: subclasses (-> the custom op) and whether any input records a gradient
            if isinstance(a, torch.Tensor):
                if type(a) not in _PLAIN_TENSORS:
                    return self.custom_op(*args)
                grad = grad or a.requires_grad
        if grad and self.function is not None and torch.is_grad_enabled():
            return self.function.apply(*args)
        return self.forward(*args)
