"""``python -m bus_kernels.info``: versions, devices, and which backend runs which op here (and why not)."""

from __future__ import annotations

import platform
import sys

import torch

from . import __version__
from .backends import backend_status, registered_backends, registered_ops
from .ops.varlen_attention import ATTENTION_LIMITS


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as e:  # any import failure is information, not an error
        return f"not available ({type(e).__name__})"
    return getattr(mod, "__version__", "unknown")


def report() -> str:
    lines = [
        f"bus_kernels {__version__}",
        f"python {platform.python_version()}  torch {torch.__version__}  triton {_version('triton')}",
        f"flash_attn {_version('flash_attn')}  xformers {_version('xformers')}",
        f"cuda available: {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
        "",
        "backends:",
    ]
    status = {dev: backend_status(dev) for dev in ("cpu", "cuda")}
    for name, backend in registered_backends().items():
        lines.append(f"  {name}: {backend.description}")
        lines.append(f"    ops: {', '.join(sorted(backend.ops))}")
        for dev in ("cpu", "cuda"):
            why = status[dev][name]
            lines.append(f"    {dev}: {'available' if why is None else 'unavailable - ' + why}")
    lines += ["", "preference (first available wins):"]
    for op, prefs in sorted(registered_ops().items()):
        lines.append(f"  {op}: " + "; ".join(f"{dev}: {' > '.join(names)}" for dev, names in sorted(prefs.items())))
    lines += ["", "varlen_attention inputs per backend (beyond device and dtype):"]
    for name, limits in ATTENTION_LIMITS.items():
        dims = f"head dims {limits.min_head_dim}..{limits.max_head_dim or 'any'}"
        if limits.head_dim_multiple > 1:
            dims += f" (multiples of {limits.head_dim_multiple})"
        what = [dims, "key_bias" if limits.key_bias else "no key_bias"]
        if limits.dense_only:
            what.append("dense batches only: every sequence full length (total == B * max_seqlen, q and k; "
                        "causal only with equal q/k lengths), decided without a host sync")
        lines.append(f"  {name}: " + ", ".join(what))
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
