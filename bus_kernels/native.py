"""Backend ``"native"``: the compiled C++/CUDA kernels of ``csrc/`` (BUS TSPS, Sec. 3.2), bound as
``torch.ops.bus.text_patch_scores``, ``torch.ops.bus.topk_gather`` and their ``*_backward`` ops.

Importing this module never compiles: it looks for a built library (one installed with the package by
``BUS_BUILD_EXT=1 pip install``, else an up-to-date JIT build in the cache of ``python -m
bus_kernels.build``) and loads it. Without one, the backend is registered but reports why it is
unavailable (``python -m bus_kernels.info``). ``load()`` can pick up a build made later in the process.

The C++ ops take a per-row ``k`` tensor, so ``topk_gather`` (all rows keep k) and ``topk_gather_varlen``
share one kernel. Autograd and fake (meta) kernels are registered here with ``torch.library``, so
``backend="native"`` is differentiable and ``torch.compile`` traces through it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import _native_paths as _build
from .backends import PRUNING_OPS, Backend, add_preference, register_backend, register_impl

# "cuda_kernels" is read from the dispatcher once, in load(): select_backend runs inside torch.compile'd
# code, and dynamo cannot trace torch._C._dispatch_has_kernel_for_dispatch_key (a plain bool it can).
_state: dict = {"path": None, "reason": "not looked for yet", "cuda_kernels": False}


def _package_libraries() -> list[Path]:
    """Libraries built ahead of time by setup.py into the package (``bus_kernels/_native*.so``)."""
    return sorted(Path(__file__).resolve().parent.glob("_native*.so"))


def _cached_library(variant: str) -> tuple[Path | None, str | None]:
    """The JIT build of ``variant`` if it exists and matches the sources, else (None, why not)."""
    path = _build.library_path(variant)
    if not path.is_file():
        return None, f"no {variant} build in {path.parent}"
    stamp = _build.read_stamp(variant)
    if _build.CSRC.is_dir() and (stamp is None or stamp.get("source_hash") != _build.source_hash(variant)):
        return None, f"the {variant} build in {path.parent} is stale (csrc/ changed since)"
    return path, None


def _newest_source_mtime() -> float:
    return max((p.stat().st_mtime for p in _build.CSRC.rglob("*") if p.is_file()), default=0.0)


def find_library() -> tuple[Path | None, str]:
    """Path of the library to load (or None) and a description of what was found or missing."""
    notes = []
    for path in _package_libraries():
        if _build.CSRC.is_dir() and _newest_source_mtime() > path.stat().st_mtime:
            notes.append(f"{path.name} is older than csrc/ (rebuild: BUS_BUILD_EXT=1 pip install --no-build-isolation .)")
            continue
        return path, "installed with the package"
    variants = (["cuda"] if torch.version.cuda else []) + ["cpu"]
    for variant in variants:
        path, why = _cached_library(variant)
        if path is not None:
            return path, f"JIT build ({variant})"
        notes.append(why)
    return None, "not built (" + "; ".join(notes) + "): run `python -m bus_kernels.build`"


def is_loaded() -> bool:
    return _state["path"] is not None


def library_path() -> Path | None:
    return _state["path"]


def has_cuda_kernels() -> bool:
    """Whether the loaded library was built with its CUDA kernels."""
    return _state["cuda_kernels"]


def load(path: str | Path | None = None) -> bool:
    """Load the library at ``path`` (default: ``find_library()``); True if the native ops are available."""
    if is_loaded():
        return True
    if path is None:
        path, note = find_library()
        if path is None:
            _state["reason"] = note
            return False
    path = Path(path)
    try:
        if str(path) not in torch.ops.loaded_libraries:
            torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        _state["reason"] = f"failed to load {path}: {e}"
        return False
    _register_python_side()
    _state["cuda_kernels"] = bool(torch._C._dispatch_has_kernel_for_dispatch_key("bus::topk_gather", "CUDA"))
    _state["path"] = path
    _state["reason"] = None
    return True


def _availability(device_type: str) -> str | None:
    if not is_loaded():
        return _state["reason"]
    if device_type == "cuda":
        if not has_cuda_kernels():
            return "the native library was built without CUDA kernels (no toolkit, or --cpu-only)"
        if not torch.cuda.is_available():
            return "no CUDA device"
    return None


# ---------------------------------------------------------------------------------------------
# torch.library: fake kernels and autograd for the C++ ops


def _register_python_side() -> None:
    from .ops.text_patch_scores import register_scores_autograd, scores_backward_fake, scores_fake
    from .ops.topk_gather import gather_backward_fake, gather_fake, register_gather_autograd

    torch.library.register_fake("bus::text_patch_scores")(scores_fake)
    torch.library.register_fake("bus::text_patch_scores_backward")(scores_backward_fake)
    torch.library.register_fake("bus::topk_gather")(gather_fake)
    torch.library.register_fake("bus::topk_gather_backward")(gather_backward_fake)
    register_scores_autograd("bus::text_patch_scores", torch.ops.bus.text_patch_scores_backward)
    register_gather_autograd("bus::topk_gather", torch.ops.bus.topk_gather_backward)
    for op in PRUNING_OPS:
        # CUDA: after triton (the default GPU path; not yet timed against native on a GPU), before torch.
        add_preference(op, "cuda", "native", position=1)
        # CPU: first -- 1.3x to 15x faster than the torch reference at the paper's sizes, forward and
        # backward, fp32 and bf16 (benchmarks/bench_native_cpu.py, results in benchmarks/results/).
        add_preference(op, "cpu", "native", position=0)


# ---------------------------------------------------------------------------------------------
# Implementations behind the public functions (inputs already validated by bus_kernels.ops)


def _tps_native_impl(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.ops.bus.text_patch_scores(query, keys, scale)[0]


def _topk_gather_native_impl(x: torch.Tensor, scores: torch.Tensor, k: int, fuse: bool):
    from .ops._triton_utils import constant

    B, _, C = x.shape
    k_rows = constant((B,), k, torch.int64, x)  # every row keeps k (a cached constant: no fill per call)
    tokens, index, *_ = torch.ops.bus.topk_gather(x, scores, k_rows, B * k, fuse)
    return tokens.view(B, k + int(fuse), C), index.view(B, k)


def _topk_gather_varlen_native_impl(x: torch.Tensor, scores: torch.Tensor, k: torch.Tensor, fuse: bool,
                                    counts: list[int] | None):
    from .ops.topk_gather import _cu_seqlens, kept_totals

    total_kept, max_seqlen = kept_totals(k, fuse, counts)  # one host read, none when counts were read
    tokens, index, *_ = torch.ops.bus.topk_gather(x, scores, k, total_kept, fuse)
    return tokens, index, _cu_seqlens(k, fuse), max_seqlen


register_backend(
    Backend(
        name="native",
        description="compiled C++ (CPU) and CUDA kernels from csrc/ (python -m bus_kernels.build)",
        ops=PRUNING_OPS,
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        availability=_availability,
    )
)
register_impl("text_patch_scores", "native", _tps_native_impl)
register_impl("topk_gather", "native", _topk_gather_native_impl)
register_impl("topk_gather_varlen", "native", _topk_gather_varlen_native_impl)
if os.environ.get(_build.AUTOLOAD_ENV, "1") != "0":
    load()
else:
    _state["reason"] = f"not loaded ({_build.AUTOLOAD_ENV}=0)"
