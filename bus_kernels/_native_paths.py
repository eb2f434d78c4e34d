"""Where the native extension's sources are and where its JIT builds go (standard library only).

Shared by ``bus_kernels.native`` (finds a build at import, never compiles) and ``bus_kernels.build``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
BUILD_DIR_ENV = "BUS_KERNELS_BUILD_DIR"
# "0": importing bus_kernels does not load a built library (the build CLI sets it for child builds)
AUTOLOAD_ENV = "BUS_KERNELS_NATIVE_AUTOLOAD"
STAMP_NAME = "bus_native_stamp.json"


def cpu_sources(root: Path = CSRC) -> list[Path]:
    """The registration file and the CPU kernels."""
    return [root / "ops" / "register.cpp", *sorted((root / "ops" / "cpu").glob("*.cpp"))]


def cuda_kernel_sources(root: Path = CSRC) -> list[Path]:
    """The ``.cu`` files (kernels + raw-pointer launchers; no ATen, so they compile fast)."""
    return sorted((root / "ops" / "cuda").glob("*.cu"))


def cuda_sources(root: Path = CSRC) -> list[Path]:
    """Everything the CUDA variant compiles beyond the CPU sources (kernels + ATen-level dispatch)."""
    return [*cuda_kernel_sources(root), *sorted((root / "ops" / "cuda").glob("*.cpp"))]


def source_hash(variant: str = "cuda", root: Path = CSRC) -> str:
    """sha256 over the files of ``csrc`` that ``variant`` compiles (sources and headers; ``"cpu"`` leaves out
    ``ops/cuda/``): a built library is stale when it changes."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in {".h", ".cpp", ".cu", ".cuh"}):
        rel = path.relative_to(root).as_posix()
        if variant == "cpu" and rel.startswith("ops/cuda/"):
            continue
        h.update(rel.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# JIT build cache


def build_root() -> Path:
    return Path(os.environ.get(BUILD_DIR_ENV) or Path.home() / ".cache" / "bus_kernels")


def build_dir(variant: str) -> Path:
    """Cache dir of one variant (``"cpu"`` or ``"cuda"``), per torch and Python version."""
    import torch

    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info.major}{sys.version_info.minor}"
    return build_root() / tag / variant


def library_name(variant: str) -> str:
    return f"bus_native_{variant}"


def library_path(variant: str) -> Path:
    return build_dir(variant) / f"{library_name(variant)}.so"


def read_stamp(variant: str) -> dict | None:
    path = build_dir(variant) / STAMP_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
