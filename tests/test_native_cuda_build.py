"""The CUDA half of csrc/, checked without a GPU: every kernel compiles for sm_80 and sm_90 with no
register spills and no local memory (ptxas -v), the vectorised variants really use 128-bit loads, and
the whole CUDA extension builds, links and registers its CUDA kernels.

Both builds are cached (under ~/.cache/bus_kernels, keyed by the sources), so only the first run pays
for nvcc (~0.5 min for the kernels, a few minutes for the full extension on 2 cores)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from bus_kernels import build

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(build.find_cuda_home() is None, reason="no CUDA toolkit (nvcc) found"),
]

ARCHS = "8.0;9.0"
DTYPES = ("float", "__half", "__nv_bfloat16")
TEMPLATED = ("topk_gather_fwd_kernel", "topk_gather_bwd_kernel", "tps_logits_kernel", "tps_bwd_kernel")


@pytest.fixture(scope="module")
def report():
    return build.ptxas_report(ARCHS)


def test_every_kernel_compiles_for_sm80_and_sm90(report):
    names = {(r.arch, r.kernel) for r in report}
    for arch in ("sm_80", "sm_90"):
        assert any(a == arch and "tps_combine_kernel" in k for a, k in names)
        for kernel in TEMPLATED:
            for dtype in DTYPES:
                vec = {"float": 4, "__half": 8, "__nv_bfloat16": 8}[dtype]
                for v in (1, vec):
                    assert any(a == arch and f"{kernel}<{dtype}, {v}>" in k for a, k in names), (arch, kernel, dtype, v)


def test_no_spills_and_no_local_memory(report):
    print("\n" + build.format_ptxas(report))
    for r in report:
        assert r.spill_stores == 0 and r.spill_loads == 0, r
        assert r.stack_bytes == 0, r  # no local memory (stack frame) at all
        assert 0 < r.registers <= 255, r


def _cuobjdump() -> str | None:
    try:
        from bus_kernels.aot import _cuobjdump as triton_cuobjdump

        path = triton_cuobjdump()
        if os.path.isfile(path):
            return path
    except Exception:  # triton layout differs: fall back to the toolkit's
        pass
    home = build.find_cuda_home()
    path = os.path.join(home, "bin", "cuobjdump") if home else ""
    return path if os.path.isfile(path) else None


def test_vectorised_variants_use_128_bit_global_loads(report):
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump to disassemble with")
    obj = build.build_root() / "ptxas" / f"obj-{build.source_hash('cuda')}" / "topk_gather.o"
    sass = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    # one section per kernel and arch: "Function : <mangled name>"
    sections = re.split(r"\n\s*Function : ", sass)
    fwd_half8 = [s for s in sections if s.startswith("_ZN") and "topk_gather_fwd_kernel" in s.split("\n")[0]
                 and "I6__halfLi8E" in s.split("\n")[0]]
    fwd_half1 = [s for s in sections if s.startswith("_ZN") and "topk_gather_fwd_kernel" in s.split("\n")[0]
                 and "I6__halfLi1E" in s.split("\n")[0]]
    assert fwd_half8 and fwd_half1
    assert all("LDG.E.128" in s for s in fwd_half8)
    assert all("STG.E.128" in s for s in fwd_half8)
    assert not any("LDG.E.128" in s for s in fwd_half1)


def test_cuda_extension_builds_links_and_registers_cuda_kernels():
    if not torch.version.cuda:
        pytest.skip("torch without CUDA: only the CPU extension is built")
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=ARCHS, **{build.AUTOLOAD_ENV: "0"})
    subprocess.run([sys.executable, "-m", "bus_kernels.build"], env=env, check=True, capture_output=True, text=True,
                   timeout=1200)
    probe = (
        "import bus_kernels.native as n\n"
        "from bus_kernels.backends import backend_status\n"
        "print(n.library_path().parent.name, n.has_cuda_kernels(), backend_status('cuda')['native'])\n"
    )
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=ARCHS)
    out = subprocess.run([sys.executable, "-c", probe], env=env, check=True, capture_output=True, text=True).stdout
    variant, has_cuda, reason = out.strip().split(" ", 2)
    assert variant == "cuda" and has_cuda == "True"
    if not torch.cuda.is_available():
        assert reason == "no CUDA device"
