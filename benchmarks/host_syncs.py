"""Counting the host syncs of a training step: each is a point where the CPU waits for the GPU.

On a GPU every value the host reads from a device tensor (``.item()``, ``int(t)``, ``.tolist()``, a
``bool`` test) and every op whose output *shape* depends on the data (``nonzero``, boolean-mask
indexing, ``repeat_interleave`` without ``output_size``, ``unique``) blocks the Python thread until
the GPU has finished all work queued before it, so the CPU stops queueing kernels ahead of the GPU.

Two counters:
  * ``SyncCounter`` (any device, used on CPU): a ``TorchDispatchMode`` that records the aten ops which
    sync on CUDA, plus ``Tensor.tolist`` (which reads CPU memory without dispatching an op, so the
    mode cannot see it; it is counted by wrapping the method while the counter is active).
  * ``count_cuda_syncs`` (CUDA): ``torch.cuda.set_sync_debug_mode("warn")`` makes every synchronising
    CUDA call issue a warning; the warnings are counted. This is the ground truth on a GPU.

``step_sync_counts(model, batch)`` runs one forward + backward after a warm-up step and returns both
the op-level count and its breakdown by op.
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# aten ops that read a device value on the host (always a sync on CUDA)
_VALUE_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
# aten ops whose output shape depends on the data: the size must reach the host first
_DATA_SHAPED = {aten.nonzero.default, aten.masked_select.default, aten.nonzero_static.default}
_INHERITED = object()  # marker: torch.Tensor has no tolist of its own


def _is_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def sync_reason(func, args, kwargs) -> str | None:
    """Why the aten call ``func(*args, **kwargs)`` syncs with the host on CUDA, or None when it does not."""
    if func in _VALUE_READS:
        return "value read"
    if func in _DATA_SHAPED or func.__name__.split(".")[0].lstrip("_").startswith("unique"):
        return "data-dependent shape"
    if func is aten.repeat_interleave.Tensor or func is aten.repeat_interleave.self_Tensor:
        if kwargs.get("output_size") is None:
            return "data-dependent shape (repeat_interleave without output_size)"
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
        if _is_bool_index(args[1] if len(args) > 1 else kwargs.get("indices")):
            return "boolean-mask index (nonzero inside)"
    return None


class SyncCounter(TorchDispatchMode):
    """Counts the host syncs (on CUDA) of the PyTorch code run inside it, on any device.

    ``counts``: op name -> calls; ``total``: their sum; ``events``: (op name, reason) in call order.
    The issue's original metric (only ``_local_scalar_dense`` and ``nonzero``) is ``issue_metric``.
    """

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.events: list[tuple[str, str]] = []
        self._saved_tolist = None

    def _record(self, name: str, reason: str) -> None:
        self.counts[name] += 1
        self.events.append((name, reason))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = sync_reason(func, args, kwargs)
        if reason is not None:
            self._record(str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func), reason)
        return func(*args, **kwargs)

    def __enter__(self):
        counter = self
        # torch.Tensor inherits tolist from torch._C.TensorBase; remember whether it had its own
        self._saved_tolist = torch.Tensor.__dict__.get("tolist", _INHERITED)
        original = torch.Tensor.tolist

        def tolist(tensor, *a, **k):
            counter._record("Tensor.tolist", "value read")
            return original(tensor, *a, **k)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            if self._saved_tolist is _INHERITED:
                del torch.Tensor.tolist
            elif self._saved_tolist is not None:
                torch.Tensor.tolist = self._saved_tolist
            self._saved_tolist = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def issue_metric(self) -> int:
        """Only ``_local_scalar_dense`` and ``nonzero`` calls (how issue 14 first measured)."""
        return self.counts.get("_local_scalar_dense", 0) + self.counts.get("nonzero", 0)


@contextlib.contextmanager
def count_cuda_syncs():
    """CUDA only: collect one entry per synchronising CUDA call made inside (sync debug mode "warn").

    Yields a list that is filled, when the block exits, with the Python location (``dir/file.py:line``)
    that issued each one.
    """
    found: list[str] = []
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    # where in Python each sync was issued (a sync inside backward points at the backward() call)
    found.extend(f"{'/'.join(w.filename.split('/')[-2:])}:{w.lineno}" for w in caught
                 if "called a synchronizing" in str(w.message))  # not the "prototype feature" notice


def fwd_bwd(model: torch.nn.Module, batch: tuple, amp: bool = False) -> Callable[[], None]:
    """One forward + backward of ``model(*batch).loss`` (bf16 autocast when ``amp``); grads are cleared."""
    device_type = batch[0].device.type

    def run() -> None:
        # fresh tensors every step, as a data loader gives: nothing cached on the batch objects carries over
        fresh = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in batch)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
            out = model(*fresh)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    return run


def step_sync_counts(model: torch.nn.Module, batch: tuple, amp: bool = False, warmup: int = 1) -> dict:
    """Host syncs of one forward + backward of ``model`` on ``batch`` after ``warmup`` unmeasured steps.

    Returns ``{"total", "issue_metric", "by_op", "cuda_sync_warnings"?}``; on CUDA also the number of
    synchronising calls reported by ``torch.cuda.set_sync_debug_mode`` in a second measured step.
    """
    step = fwd_bwd(model, batch, amp)
    for _ in range(warmup):
        step()
    with SyncCounter() as counter:
        step()
    result = {"total": counter.total, "issue_metric": counter.issue_metric, "by_op": dict(counter.counts)}
    if batch[0].device.type == "cuda":
        torch.cuda.synchronize()
        with count_cuda_syncs() as found:
            step()
        torch.cuda.synchronize()
        result["cuda_sync_warnings"] = len(found)
        result["cuda_sync_sites"] = sorted(collections.Counter(found).items(), key=lambda kv: -kv[1])[:10]
    return result
