"""Build the native extension (``csrc/``: C++ and CUDA kernels of the pruning ops, backend ``"native"``).

    python -m bus_kernels.build [--cpu-only] [--verbose]     # JIT build into a cache dir, then load it
    python -m bus_kernels.build --ptxas [--arch 8.0 9.0]     # compile the CUDA kernels, print registers/spills

A plain ``pip install -e .`` never compiles anything: the extension is built on request (this
module, via ``torch.utils.cpp_extension.load``, cached under ``$BUS_KERNELS_BUILD_DIR`` or
``~/.cache/bus_kernels``) or ahead of time with ``BUS_BUILD_EXT=1 pip install --no-build-isolation .``
(setup.py). ``bus_kernels.native`` finds a built library without compiling.

CUDA: ``CUDA_HOME`` (or ``CUDA_PATH``) if set, else the toolkit of the ``nvcc`` on ``PATH`` -- resolved
through symlinks and, when that ``nvcc`` is a wrapper script outside the toolkit, by asking nvcc where
it lives (``nvcc --dryrun`` prints it) -- else ``/usr/local/cuda``. Without a toolkit, or with
``--cpu-only``, only the CPU kernels are built. ``TORCH_CUDA_ARCH_LIST`` is honoured; with no GPU
visible torch cannot guess the targets, so it then defaults to ``"8.0;9.0"``.

This module imports only the standard library at the top, so setup.py can load it before torch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ._native_paths import (  # noqa: F401  (re-exported: the build's sources and where it goes)
    AUTOLOAD_ENV,
    BUILD_DIR_ENV,
    CSRC,
    STAMP_NAME,
    build_dir,
    build_root,
    cpu_sources,
    cuda_kernel_sources,
    cuda_sources,
    library_name,
    library_path,
    read_stamp,
    source_hash,
)

DEFAULT_ARCH_LIST = "8.0;9.0"
CXX_FLAGS = ["-O3"]  # cpp_extension adds the C++ standard torch needs
NVCC_FLAGS = ["-O3", "-lineinfo"]


class BuildError(RuntimeError):
    """The extension cannot be built here (no compiler, no ninja, no sources); the message says why."""


# ---------------------------------------------------------------------------------------------
# Tools


def find_cxx() -> str | None:
    """Path of the host C++ compiler: ``$CXX`` if set (and found), else ``c++``, ``g++`` or ``clang++``."""
    env = os.environ.get("CXX")
    if env:
        return shutil.which(env)
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _is_cuda_home(path: str | Path) -> bool:
    p = Path(path)
    return (p / "bin" / "nvcc").is_file() and (p / "include" / "cuda_runtime.h").is_file()


def _nvcc_reported_home(nvcc: str) -> str | None:
    """Ask nvcc where it is installed: ``nvcc --dryrun`` prints ``_HERE_=<toolkit>/bin`` (works through wrappers)."""
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
    if match is None:
        return None
    home = os.path.dirname(os.path.realpath(match.group(1)))
    return home if _is_cuda_home(home) else None


def find_cuda_home() -> str | None:
    """The CUDA toolkit root, or ``None`` when there is none (see the module docstring for the order)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        env = os.environ.get(var)
        if env and _is_cuda_home(env):
            return os.path.realpath(env)
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))  # follows symlinks
        if _is_cuda_home(home):
            return home
        home = _nvcc_reported_home(nvcc)  # a wrapper script that execs the real nvcc
        if home is not None:
            return home
    if _is_cuda_home("/usr/local/cuda"):
        return os.path.realpath("/usr/local/cuda")
    return None


def cuda_arch_list() -> str:
    """``TORCH_CUDA_ARCH_LIST`` if set, else ``"8.0;9.0"`` (A100, H100)."""
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST


def _arch_numbers(arch_list: str) -> list[str]:
    """``"8.0;9.0+PTX"`` -> ``["80", "90"]``."""
    archs = []
    for item in re.split(r"[;\s,]+", arch_list.strip()):
        if item:
            major, _, minor = item.replace("+PTX", "").partition(".")
            archs.append(f"{major}{minor or '0'}")
    return archs


# ---------------------------------------------------------------------------------------------
# JIT build


def _require_host_toolchain() -> None:
    if not CSRC.is_dir():
        raise BuildError(f"the C++/CUDA sources are not here ({CSRC} is missing): build from a source checkout")
    if find_cxx() is None:
        raise BuildError(
            "no C++ compiler found (looked for $CXX, c++, g++, clang++): install one (e.g. apt-get install g++) "
            "or set CXX; the 'native' backend stays unavailable until then"
        )
    cpp_extension = _cpp_extension()
    if not cpp_extension.is_ninja_available():
        raise BuildError("ninja is required to build the extension: pip install ninja")


def _use_cuda_home(cuda_home: str) -> None:
    """Point torch's extension builder at ``cuda_home`` (it guesses once, at import, from ``which nvcc``)."""
    os.environ["CUDA_HOME"] = cuda_home
    module = sys.modules.get("torch.utils.cpp_extension")
    if module is not None:
        module.CUDA_HOME = cuda_home


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported after ``CUDA_HOME`` is resolved (so it does not guess wrong)."""
    import torch

    if torch.version.cuda and not os.environ.get("CUDA_HOME"):
        cuda_home = find_cuda_home()
        if cuda_home is not None:
            _use_cuda_home(cuda_home)
    from torch.utils import cpp_extension

    return cpp_extension


def build(cpu_only: bool = False, verbose: bool = False) -> Path:
    """Build (or find up to date in the cache) and load the extension; returns the library's path.

    Builds the CUDA kernels too when torch has CUDA and a toolkit is found, unless ``cpu_only``.
    Raises ``BuildError`` with the reason when it cannot build here.
    """
    import torch

    _require_host_toolchain()
    cuda_home = None if cpu_only or not torch.version.cuda else find_cuda_home()
    variant = "cuda" if cuda_home else "cpu"
    sources = cpu_sources() + (cuda_sources() if cuda_home else [])
    extra_cuda = []
    if cuda_home:
        _use_cuda_home(cuda_home)
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
    out_dir = build_dir(variant)
    out_dir.mkdir(parents=True, exist_ok=True)
    from . import native

    if native.is_loaded():
        # This process already holds a build of the bus::* ops and cannot load a second one: build in a
        # child process; the new library is what the next Python process loads.
        _build_in_child(cpu_only, verbose)
        return library_path(variant)
    cpp_extension = _cpp_extension()
    try:
        cpp_extension.load(
            name=library_name(variant),
            sources=[str(s) for s in sources],
            extra_cflags=CXX_FLAGS + (["-DBUS_WITH_CUDA"] if cuda_home else []),
            extra_cuda_cflags=NVCC_FLAGS + extra_cuda,
            extra_include_paths=[str(CSRC)],
            build_directory=str(out_dir),
            verbose=verbose,
            with_cuda=bool(cuda_home),
            is_python_module=False,
        )
    except (RuntimeError, subprocess.CalledProcessError) as e:
        raise BuildError(f"building the native extension failed: {e}") from e
    path = library_path(variant)
    unwind_problem = unwind_table_problem(path)
    if unwind_problem is not None:  # see unwind_table_problem: a C++ input check could crash the process
        print(f"warning: {path.name}: {unwind_problem}", file=sys.stderr)
    stamp = {"source_hash": source_hash(variant), "torch": torch.__version__, "variant": variant,
             "cuda_home": cuda_home, "arch_list": cuda_arch_list() if cuda_home else None,
             "unwind_table": unwind_problem or "ok"}
    (out_dir / STAMP_NAME).write_text(json.dumps(stamp, indent=1))
    native.load(path)
    return path


def unwind_table_problem(path: str | Path) -> str | None:
    """None if the shared library has a binary-search table of its unwind info, else what is wrong.

    A C++ exception (every TORCH_CHECK of csrc/ops/common/checks.h) unwinds through the library's
    frames; the unwinder finds their entries through the ``.eh_frame_hdr`` table the linker builds.
    When the linker cannot parse an object's ``.eh_frame`` (it then warns "no .eh_frame_hdr table will
    be created") the unwinder falls back to a linear scan of ``.eh_frame``, which a malformed entry can
    send into a segfault -- one suspect of the crash of the CUDA build on the H200
    (tests/gpu/native_exception_repro.py tells). ELF64 little-endian only (x86-64, aarch64).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return f"cannot read it ({e})"
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None  # not an ELF64 little-endian file: nothing to check here
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _, p_offset = struct.unpack_from("<IIQ", data, phoff + i * phentsize)
        if p_type != 0x6474E550:  # PT_GNU_EH_FRAME
            continue
        version, _, count_enc, table_enc = data[p_offset:p_offset + 4]
        if version != 1:
            return f".eh_frame_hdr has version {version}, not 1"
        if table_enc == 0xFF or count_enc == 0xFF:  # DW_EH_PE_omit: the linker left the table out
            return "the linker built no .eh_frame_hdr search table (it could not parse an object's .eh_frame)"
        if count_enc != 0x03:  # DW_EH_PE_udata4, what GNU ld and lld write
            return None
        fde_count, = struct.unpack_from("<I", data, p_offset + 8)
        return None if fde_count > 0 else "the .eh_frame_hdr search table is empty"
    return "no PT_GNU_EH_FRAME segment (no .eh_frame_hdr): exceptions unwind by a linear scan"


def _build_in_child(cpu_only: bool, verbose: bool) -> None:
    cmd = [sys.executable, "-m", "bus_kernels.build"] + (["--cpu-only"] if cpu_only else []) + (["--verbose"] if verbose else [])
    env = dict(os.environ, **{AUTOLOAD_ENV: "0"})
    proc = subprocess.run(cmd, env=env, capture_output=not verbose, text=True)
    if proc.returncode != 0:
        raise BuildError(f"building the native extension failed:\n{(proc.stderr or '')[-4000:]}")


def ensure_built(cpu_only: bool = False, verbose: bool = False) -> str | None:
    """Load an up-to-date build, building it first if there is none. Returns ``None`` on success, else why not."""
    from . import native

    if native.is_loaded() or native.load():
        return None
    try:
        build(cpu_only=cpu_only, verbose=verbose)
    except BuildError as e:
        return str(e)
    return None


# ---------------------------------------------------------------------------------------------
# ptxas report of the CUDA kernels (no GPU needed)


@dataclass
class KernelResources:
    """ptxas's resource report of one kernel for one arch."""

    kernel: str  # demangled name
    arch: str  # "sm_80"
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int


def parse_ptxas(log: str) -> list[KernelResources]:
    """Read ``-Xptxas -v`` output into one entry per (kernel, arch)."""
    rows: list[KernelResources] = []
    current: dict | None = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'", line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2)}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            smem = re.search(r"(\d+) bytes smem", line)
            current.update(registers=int(m.group(1)), shared_bytes=int(smem.group(1)) if smem else 0)
            current.setdefault("stack_bytes", 0)
            current.setdefault("spill_stores", 0)
            current.setdefault("spill_loads", 0)
            rows.append(KernelResources(**current))
            current = None
    return rows


def _demangle(names: list[str]) -> list[str]:
    filt = shutil.which("c++filt")
    if filt is None or not names:
        return names
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    lines = out.stdout.splitlines()
    return lines if out.returncode == 0 and len(lines) == len(names) else names


def ptxas_report(arch_list: str | None = None, verbose: bool = False) -> list[KernelResources]:
    """Compile every ``.cu`` file for each arch with ``-Xptxas -v`` and return the per-kernel report.

    Cached by source hash and arch list (under the build root), so a second call costs nothing.
    Raises ``BuildError`` when there is no CUDA toolkit or a file fails to compile.
    """
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise BuildError("no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)")
    archs = _arch_numbers(arch_list or cuda_arch_list())
    cache = build_root() / "ptxas" / f"{source_hash('cuda')}-{'_'.join(archs)}.json"
    if cache.is_file():
        return [KernelResources(**row) for row in json.loads(cache.read_text())]
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    out_dir = cache.parent / f"obj-{source_hash('cuda')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    log = []
    for src in cuda_kernel_sources():
        cmd = [nvcc, "-c", str(src), "-o", str(out_dir / (src.stem + ".o")), "-I", str(CSRC), "-std=c++17", *NVCC_FLAGS,
               *gencode, "-Xptxas", "-v"]
        if verbose:
            print(" ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"nvcc failed on {src.name}:\n{proc.stderr[-4000:]}")
        log.append(proc.stderr + proc.stdout)
    rows = parse_ptxas("\n".join(log))
    for row, name in zip(rows, _demangle([r.kernel for r in rows])):
        row.kernel = name
    cache.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return rows


def format_ptxas(rows: list[KernelResources]) -> str:
    lines = ["| kernel | arch | registers | spill stores | spill loads | stack | smem |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r.kernel}` | {r.arch} | {r.registers} | {r.spill_stores} | {r.spill_loads} | "
                     f"{r.stack_bytes} | {r.shared_bytes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bus_kernels.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-only", action="store_true", help="build only the CPU kernels")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--ptxas", action="store_true", help="compile the CUDA kernels and print registers/spills")
    parser.add_argument("--arch", nargs="+", help="with --ptxas: e.g. 8.0 9.0 (default $TORCH_CUDA_ARCH_LIST or 8.0;9.0)")
    args = parser.parse_args(argv)
    try:
        if args.ptxas:
            rows = ptxas_report(";".join(args.arch) if args.arch else None, verbose=args.verbose)
            print(format_ptxas(rows))
            bad = [r for r in rows if r.spill_stores or r.spill_loads or r.stack_bytes]
            return 1 if bad else 0
        path = build(cpu_only=args.cpu_only, verbose=args.verbose)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from . import native

    print(f"built {path}" + (" and loaded it" if native.library_path() == path else " (new Python processes load it)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
