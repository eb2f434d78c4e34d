"""CUDA-graph capture and ``torch.compile`` tracing: when an op may read device values on the host or
reuse what it cached.

Inside ``torch.compile``'s trace there are no values to read; inside a CUDA-graph capture a read
(``.item()``, ``.tolist()``: a device-to-host copy and a sync) is an error that invalidates the capture,
and a replay re-runs the captured kernels but none of the Python around them. So, for every op:

* value checks that read on the host are skipped while tracing or capturing (the inputs were checked
  by the eager warm-up call that every capture is preceded by);
* an op whose output size depends on device values (``topk_gather_varlen``, ``unpad``) cannot be captured
  and says so (``CaptureError``) instead of breaking the capture with a CUDA error;
* a Python-side cache (the block tables of ``varlen_attention``) is neither read nor written while
  capturing: a table cached before the capture would be baked into the graph with the offsets of that
  moment, and a replay after an in-place change of the offsets would read it stale. Built inside the
  capture, the table's kernels are part of the graph and re-run on every replay.
"""

from __future__ import annotations

import torch


class CaptureError(RuntimeError):
    """An op cannot run while a CUDA graph is being captured (its output size needs a host read)."""


def capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream and ``t`` is a CUDA tensor (never
    initialises CUDA; False on a CPU-only machine). False while ``torch.compile`` traces: the question is
    asked again when the compiled graph runs (a custom op's body runs then, and is what CUDA graphs capture)."""
    # is_cuda, not device.type == "cuda": asked on every call, and building the device's type string costs
    # more than the rest of the test
    return t.is_cuda and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing()


def host_reads_allowed(t: torch.Tensor) -> bool:
    """False while ``torch.compile`` traces or while a CUDA graph is captured (see the module docstring)."""
    return not (torch.compiler.is_compiling() or capturing(t))


def refuse_capture(t: torch.Tensor, what: str) -> None:
    """Raise ``CaptureError`` naming ``what`` when a CUDA graph is being captured."""
    if capturing(t):
        raise CaptureError(
            f"{what} reads device values on the host to size its output, which a CUDA graph capture cannot "
            "do; capture only fixed-size work (e.g. topk_gather with a fixed k, varlen_attention on offsets "
            "built outside the graph)"
        )
