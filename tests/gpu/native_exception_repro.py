"""Does a C++ input check of the native extension raise a Python exception, or crash the process?

    python tests/gpu/native_exception_repro.py          # seconds; run after `python -m bus_kernels.build`

On an H200 (torch 2.11, CUDA build of csrc/) ``tests/test_native.py::test_cpp_checks_name_the_argument``
died with a segfault in the first bad-input call, while the CPU build on a CPU machine raised
ValueError. Each case below runs in its own child process, so one crash is one line of the report and
the cases tell the suspects apart: the raw op vs the torch.library autograd wrapper of
bus_kernels.native, before vs after CUDA is initialised, CPU vs CUDA tensors, a torch-internal error
for comparison. A crashing case is rerun under gdb (if installed) for the native backtrace.
Exit status: 0 when every case raised the expected exception, 1 otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CUDA_INIT = "torch.zeros(1, device='cuda').sum().item()\n"
BAD_CPU = "torch.ops.bus.topk_gather(torch.randn(3, 4), torch.rand(3, 4), torch.ones(3, dtype=torch.long), 3, True)"
BAD_CPU_TYPE = ("torch.ops.bus.topk_gather(torch.ones(2, 4, 3, dtype=torch.long), torch.rand(2, 4), "
                "torch.ones(2, dtype=torch.long), 2, True)")
BAD_CUDA = ("torch.ops.bus.topk_gather(torch.randn(3, 4, device='cuda'), torch.rand(3, 4, device='cuda'), "
            "torch.ones(3, dtype=torch.long, device='cuda'), 3, True)")
OPCHECK_CUDA = (
    "x = torch.randn(3, 11, 8, device='cuda', requires_grad=True)\n"
    "s = torch.rand(3, 11, device='cuda', requires_grad=True)\n"
    "torch.library.opcheck(torch.ops.bus.topk_gather.default, (x, s, torch.tensor([4, 0, 11], device='cuda'), 15, True))\n"
)


def _call(expr: str, expected: str) -> str:
    return textwrap.dedent(f"""
        try:
            {expr}
        except {expected} as e:
            print('RAISED', type(e).__name__, str(e).splitlines()[0], flush=True)
        else:
            print('NO EXCEPTION', flush=True)
    """)


# name -> (needs cuda, code); the library is loaded by importing bus_kernels (autograd wrapper registered)
# or, for "raw", by torch.ops.load_library alone (no Python-side registration).
def cases() -> dict[str, tuple[bool, str]]:
    imp = "import torch, bus_kernels\n"
    raw = ("import os, torch\nos.environ['BUS_KERNELS_NATIVE_AUTOLOAD'] = '0'\n"
           "import bus_kernels.native as n\npath, _ = n.find_library()\ntorch.ops.load_library(str(path))\n")
    return {
        "torch internal error (aten.mm shapes), for comparison": (False, imp + _call("torch.mm(torch.randn(2, 3), torch.randn(2, 3))", "RuntimeError")),
        "raw op (no autograd wrapper), CPU, ValueError": (False, raw + _call(BAD_CPU, "ValueError")),
        "bus_kernels op, CPU, ValueError": (False, imp + _call(BAD_CPU, "ValueError")),
        "bus_kernels op, CPU, TypeError": (False, imp + _call(BAD_CPU_TYPE, "TypeError")),
        "raw op, CPU, after CUDA init": (True, raw + CUDA_INIT + _call(BAD_CPU, "ValueError")),
        "bus_kernels op, CPU, after CUDA init": (True, imp + CUDA_INIT + _call(BAD_CPU, "ValueError")),
        "bus_kernels op, CUDA tensors, ValueError": (True, imp + _call(BAD_CUDA, "ValueError")),
        "bus_kernels op, CPU, after a CUDA opcheck (the test order)": (True, imp + OPCHECK_CUDA + _call(BAD_CPU, "ValueError")),
    }


def run_case(code: str, timeout: float = 90.0) -> tuple[int | None, str]:
    try:
        proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "timed out"
    return proc.returncode, (proc.stdout + proc.stderr)


def gdb_backtrace(code: str) -> str:
    gdb = shutil.which("gdb")
    if gdb is None:
        return "(no gdb for a native backtrace)"
    cmd = [gdb, "-q", "-batch", "-ex", "set pagination off", "-ex", "handle SIGSEGV stop", "-ex", "run",
           "-ex", "bt 40", "--args", sys.executable, "-c", code]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "(gdb timed out)"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("#") or "signal" in ln.lower()]
    return "\n".join(lines[-45:])


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"({e})"
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    return lines[0] if cmd[-1] != "--version" or "nvcc" not in cmd[0] else lines[-1]


def diagnostics(lib) -> None:
    """The suspects that differ between machines: toolchain, unwinder libraries, the library's unwind table."""
    from bus_kernels import build

    print(f"unwind table of {lib.name}: {build.unwind_table_problem(lib) or 'ok'}")
    print(f"stamp: {build.read_stamp('cuda' if 'cuda' in lib.name else 'cpu')}")
    for cmd in (["c++", "--version"], ["ld", "--version"], ["nvcc", "--version"]):
        print(f"{cmd[0]}: {_first_line(cmd)}")
    try:
        maps = open("/proc/self/maps").read().splitlines()
    except OSError:
        maps = []
    libs = sorted({ln.split()[-1] for ln in maps if any(k in ln for k in ("libstdc++", "libgcc_s", "libunwind", "libcudart"))})
    print("loaded unwinder/runtime libraries:", ", ".join(libs) or "(none found)")
    print("env:", {k: v for k, v in os.environ.items() if k.startswith(("TORCH_SHOW", "TORCH_DISABLE_ADDR2LINE", "LD_"))})


def main() -> int:
    import torch

    import bus_kernels.native as native

    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__} cuda {torch.version.cuda} device {torch.cuda.get_device_name() if cuda else None}")
    print(f"native library: {native.library_path()} (cuda kernels: {native.has_cuda_kernels()}; "
          f"{native._state['reason'] or 'loaded'})")
    if not native.is_loaded():
        print("nothing to check: build it first (python -m bus_kernels.build)")
        return 1
    diagnostics(native.library_path())
    bad = 0
    for name, (needs_cuda, code) in cases().items():
        if needs_cuda and not (cuda and native.has_cuda_kernels()):
            print(f"SKIP   {name} (no CUDA device or CUDA kernels)")
            continue
        rc, out = run_case(code)
        raised = [ln for ln in out.splitlines() if ln.startswith(("RAISED", "NO EXCEPTION"))]
        ok = rc == 0 and raised and raised[0].startswith("RAISED")
        bad += not ok
        what = raised[0] if raised else (out.strip().splitlines() or ["no output"])[0]
        print(f"{'OK   ' if ok else 'CRASH' if rc and rc < 0 else 'FAIL '}  {name}: exit {rc}: {what}", flush=True)
        if rc is not None and rc < 0:
            print(textwrap.indent(gdb_backtrace(code), "    "), flush=True)
    print(f"{bad} case(s) did not raise cleanly")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
