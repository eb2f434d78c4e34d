"""Native backend (csrc/) specifics: the C++ ops as registered, their input checks, torch.library
registration (opcheck), bf16 (which the Triton interpreter cannot run), thread-count independence, and
the build helper (compiler / CUDA toolkit discovery, stale or missing builds).

The numerics shared with the other backends (shapes, ties, fp16/fp32, gradients, varlen, compile) are
in test_pruning_ops.py, parametrised over every available backend, native included."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bus_kernels as bk
from bus_kernels import build, native
from bus_kernels.backends import BackendNotSupportedError, select_backend
from test_pruning_ops import ref_row, ref_scores

needs_native = pytest.mark.skipif(not native.is_loaded(), reason=f"native backend: {native._availability('cpu')}")


# ---------------------------------------------------------------------------------------------
# The ops as registered


@needs_native
def test_ops_registered_next_to_the_python_custom_ops():
    for name in ("text_patch_scores", "text_patch_scores_backward", "topk_gather", "topk_gather_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bus::{name}", "CPU")
    # the Python-defined ops of the same namespace are still there
    assert hasattr(torch.ops.bus, "topk_gather_triton") and hasattr(torch.ops.bus, "text_patch_scores_triton")
    assert "native" in bk.available_backends("cpu")
    assert select_backend("topk_gather", torch.device("cpu"), torch.float32, True) == "native"


@needs_native
def test_opcheck_fake_kernels_and_autograd():
    x = torch.randn(3, 11, 8, requires_grad=True)
    s = torch.rand(3, 11, requires_grad=True)
    k = torch.tensor([4, 0, 11])
    torch.library.opcheck(torch.ops.bus.topk_gather.default, (x, s, k, 15, True))
    q = torch.randn(2, 3, 16, requires_grad=True)
    keys = torch.randn(2, 9, 3, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.bus.text_patch_scores.default, (q, keys, 0.25))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_opcheck_fake_kernels_and_autograd(dtype):
    why = native._availability("cuda")
    if why is not None:
        pytest.skip(f"native CUDA kernels: {why}")
    x = torch.randn(3, 11, 8, device="cuda", dtype=dtype, requires_grad=True)
    s = torch.rand(3, 11, device="cuda", requires_grad=True)
    k = torch.tensor([4, 0, 11], device="cuda")
    torch.library.opcheck(torch.ops.bus.topk_gather.default, (x, s, k, 15, True))
    q = torch.randn(2, 3, 16, device="cuda", dtype=dtype, requires_grad=True)
    keys = torch.randn(2, 9, 3, 16, device="cuda", dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.bus.text_patch_scores.default, (q, keys, 0.25))


# Bad inputs of the C++ ops: (code run with D = the device, error, message). The CUDA entry points share
# the checks of common/checks.h; the k-value checks (in range, summing to total_kept) need the values
# on the host, so only the CPU kernels make them.
CPP_CHECK_CASES = [
    ("torch.ops.bus.topk_gather(torch.randn(3, 4, device=D), torch.rand(3, 4, device=D), torch.ones(3, dtype=torch.long, device=D), 3, True)",
     "ValueError", r"x must have shape \(B, N, C\) \(3 dims\), got shape \(3, 4\)", True),
    ("torch.ops.bus.topk_gather(torch.ones(2, 4, 3, dtype=torch.long, device=D), torch.rand(2, 4, device=D), torch.ones(2, dtype=torch.long, device=D), 2, True)",
     "TypeError", r"x must have a floating dtype \(float16, bfloat16, float32\), got torch.int64", True),
    ("torch.ops.bus.topk_gather(torch.randn(2, 4, 3, device=D), torch.rand(2, 5, device=D), torch.ones(2, dtype=torch.long, device=D), 2, True)",
     "ValueError", r"scores has size 5 in dim 1 .* expected 4 \(token count N of x\)", True),
    ("torch.ops.bus.topk_gather(torch.randn(2, 4, 3, device=D), torch.rand(2, 4, device=D), torch.ones(2, dtype=torch.int32, device=D), 2, True)",
     "TypeError", r"k must have dtype torch.int64, got torch.int32", True),
    ("torch.ops.bus.topk_gather(torch.randn(2, 4, 3, device=D), torch.rand(2, 4, device=D), torch.tensor([1, 5], device=D), 6, True)",
     "ValueError", r"k must be in \[0, N=4\] for every row, got 5 in row 1", False),
    ("torch.ops.bus.topk_gather(torch.randn(2, 4, 3, device=D), torch.rand(2, 4, device=D), torch.tensor([1, 2], device=D), 4, True)",
     "ValueError", r"total_kept must equal sum\(k\)=3, got 4", False),
    ("torch.ops.bus.text_patch_scores(torch.randn(2, 3, 8, device=D), torch.randn(2, 5, 3, 8, device=D).half(), 1.0)",
     "TypeError", r"keys must have query's dtype torch.float32, got torch.float16", True),
    ("torch.ops.bus.text_patch_scores(torch.randn(2, 3, 8, device=D), torch.randn(2, 5, 4, 8, device=D), 1.0)",
     "ValueError", r"keys has size 4 in dim 2 \(shape \(2, 5, 4, 8\)\), expected 3 \(head count H of query\)", True),
    # shapes of one dim print as Python's 1-tuples (the messages are built without ostream: checks.h)
    ("torch.ops.bus.topk_gather(torch.randn(2, 4, 3, device=D), torch.rand(2, 4, device=D), torch.tensor([1], device=D), 1, True)",
     "ValueError", r"k has size 1 in dim 0 \(shape \(1,\)\), expected 2 \(batch size B of x\)", True),
    ("torch.ops.bus.text_patch_scores(torch.randn(2, 3, 8, device=D), torch.randn(2, 0, 3, 8, device=D), 1.0)",
     "ValueError", r"keys must hold at least one token \(N >= 1\), got N=0", True),
]


def _run_cpp_check_cases(device: str) -> tuple[int, dict[int, str], str]:
    """Every case of CPP_CHECK_CASES in one child process (a C++ exception that crashes the process --
    as the CUDA build did on the H200, inside the autograd wrapper -- fails these tests, not the session).
    Returns (exit code, case index -> 'ExceptionType: first line of the message', child's output)."""
    lines = ["import torch, bus_kernels", f"D = {device!r}"]
    for i, (code, error, _, _) in enumerate(CPP_CHECK_CASES):
        lines += ["try:", f"    {code}", f"    print('CASE {i} NO EXCEPTION', flush=True)",
                  "except Exception as e:",
                  f"    print('CASE {i}', type(e).__name__ + ':', str(e).splitlines()[0], flush=True)"]
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", "\n".join(lines)], capture_output=True,
                          text=True, timeout=600)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CASE "):
            index, _, rest = line[5:].partition(" ")
            results[int(index)] = rest
    return proc.returncode, results, (proc.stdout + proc.stderr)[-3000:]


@pytest.fixture(scope="module")
def cpp_check_results():
    cache = {}

    def get(device):
        if device not in cache:
            cache[device] = _run_cpp_check_cases(device)
        return cache[device]

    return get


@needs_native
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("case", range(len(CPP_CHECK_CASES)))
def test_cpp_checks_name_the_argument(cpp_check_results, device, case):
    code, error, match, on_cuda = CPP_CHECK_CASES[case]
    if device == "cuda":
        why = native._availability("cuda")
        if why is not None:
            pytest.skip(f"native CUDA kernels: {why}")
        if not on_cuda:
            pytest.skip("checked by the CPU kernels only")
    rc, results, output = cpp_check_results(device)
    assert case in results, f"the child process died before this case (exit {rc}):\n{output}"
    assert rc == 0, f"the child process crashed after raising (exit {rc}):\n{output}"
    assert re.fullmatch(f"{error}: .*{match}.*", results[case]), results[case]


@needs_native
@pytest.mark.parametrize("B,N,C,k", [(2, 37, 24, 9), (3, 200, 40, 1), (1, 5, 8, 5)])
def test_bfloat16_matches_float64(B, N, C, k):
    x = torch.randn(B, N, C).bfloat16()
    s = torch.rand(B, N)
    tokens, index = bk.topk_gather(x, s, k, backend="native")
    assert tokens.dtype == torch.bfloat16
    for b in range(B):
        want, keep = ref_row(x[b].double(), s[b].double(), k, True)
        assert index[b].tolist() == keep
        torch.testing.assert_close(tokens[b, :k].double(), want[:k], atol=0, rtol=0)  # a copy
        torch.testing.assert_close(tokens[b, k].double(), want[k], atol=1e-2, rtol=1e-2)  # one bf16 rounding
    q = torch.randn(B, 3, 32).bfloat16()
    keys = torch.randn(B, N, 3, 32).bfloat16()
    out = bk.text_patch_scores(q, keys, backend="native")
    torch.testing.assert_close(out.double(), ref_scores(q.double(), keys.double(), 32**-0.5), atol=1e-6, rtol=1e-4)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,N,C,k", [(3, 41, 700, 17), (1, 9, 513, 9), (2, 30, 256, 1)])
def test_channel_blocks_match_float64(dtype, B, N, C, k):
    """With fewer rows than threads the gather runs per (row, channel block) of 256 channels, as the CUDA
    kernel splits it: several blocks, a partial last one, one row, nothing dropped, one exact block; values
    and gradients."""
    x = torch.randn(B, N, C).to(dtype).requires_grad_(True)
    s = torch.rand(B, N, requires_grad=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(8)  # more threads than rows: the channel split is taken
    try:
        out = bk.topk_gather(x, s, k, backend="native")
    finally:
        torch.set_num_threads(threads)
    leaves = (x.detach().double().requires_grad_(True), s.detach().double().requires_grad_(True))
    ref = bk.topk_gather(*leaves, k, backend="torch")
    assert torch.equal(out.index, ref.index)
    torch.testing.assert_close(out.tokens[:, :k].double(), ref.tokens[:, :k], atol=0, rtol=0)  # copies
    fused_tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out.tokens[:, k].double(), ref.tokens[:, k].detach(), **fused_tol)
    g = torch.randn(out.tokens.shape).to(dtype)
    got = torch.autograd.grad(out.tokens, (x, s), g)
    want = torch.autograd.grad(ref.tokens, leaves, g.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=1e-3)


@needs_native
def test_results_do_not_depend_on_the_thread_count():
    x = torch.randn(5, 301, 33, requires_grad=True)
    s = torch.rand(5, 301, requires_grad=True)
    g = torch.randn(5, 151, 33)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            tokens, index = bk.topk_gather(x, s, 150, backend="native")
            results.append((tokens, index, *torch.autograd.grad(tokens, (x, s), g)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_native
def test_cpu_benchmark_quick(tmp_path):
    from bus_benchmarks import bench_native_cpu

    out, md = tmp_path / "r.json", tmp_path / "r.md"
    assert bench_native_cpu.main(["--quick", "--json", str(out), "--md", str(md)]) == 0
    result = json.loads(out.read_text())
    assert {"device", "torch", "commit"} <= result.keys()
    assert {(r["op"], r["pass"]) for r in result["rows"]} == {
        (op, p) for op in ("text_patch_scores", "topk_gather") for p in ("forward", "backward", "forward+backward")}
    for r in result["rows"]:
        assert r["torch_ms"] > 0 and r["native_ms"] > 0 and r["speedup"] == pytest.approx(r["torch_ms"] / r["native_ms"])
    assert "| torch / native |" in md.read_text()


@needs_native
def test_backend_selection_traces_under_compile_fullgraph():
    # On the GPU, select_backend(..., "cuda") asked the dispatcher whether CUDA kernels exist (a C
    # call dynamo cannot trace): a graph break under fullgraph=True. The cuda availability path runs
    # here on CPU too (it says "no CUDA device" or None), so a CPU run catches an untraceable call.
    torch._dynamo.reset()

    def pick(x):
        cuda_ok = native._availability("cuda") is None and native.has_cuda_kernels()
        name = select_backend("topk_gather", x.device, x.dtype, True, backend="native")
        return x * 2 if (cuda_ok or name == "native") else x * 3

    x = torch.randn(5)
    compiled = torch.compile(pick, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), x * 2)
    assert native.has_cuda_kernels() == torch._C._dispatch_has_kernel_for_dispatch_key("bus::topk_gather", "CUDA")


# ---------------------------------------------------------------------------------------------
# Availability and the build helper


def test_reports_unavailable_with_reason_when_not_built(tmp_path):
    code = (
        "import torch, bus_kernels\n"
        "from bus_kernels.backends import backend_status, select_backend, BackendNotSupportedError\n"
        "print(backend_status('cpu')['native'])\n"
        "try:\n"
        "    select_backend('topk_gather', torch.device('cpu'), torch.float32, False, backend='native')\n"
        "except BackendNotSupportedError as e:\n"
        "    print('REJECTED', e)\n"
    )
    env = dict(os.environ, BUS_KERNELS_BUILD_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "not built" in out and "python -m bus_kernels.build" in out and str(tmp_path) in out
    assert "REJECTED backend 'native' cannot run topk_gather" in out


def test_stale_build_is_not_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv(build.BUILD_DIR_ENV, str(tmp_path))
    lib = build.library_path("cpu")
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")  # never loaded by this test
    stamp = lib.parent / build.STAMP_NAME
    stamp.write_text(json.dumps({"source_hash": "0" * 16}))
    path, why = native._cached_library("cpu")
    assert path is None and "stale" in why
    stamp.write_text(json.dumps({"source_hash": build.source_hash("cpu")}))
    assert native._cached_library("cpu") == (lib, None)


def test_package_library_older_than_the_sources_is_skipped(tmp_path, monkeypatch):
    lib = tmp_path / "_native.so"
    lib.write_bytes(b"")  # never loaded by this test
    monkeypatch.setattr(native, "_package_libraries", lambda: [lib])
    monkeypatch.setenv(build.BUILD_DIR_ENV, str(tmp_path / "empty"))
    os.utime(lib, (0, 0))  # older than every source file
    path, note = native.find_library()
    assert path is None and "_native.so is older than csrc/" in note
    os.utime(lib, None)  # now newer
    assert native.find_library() == (lib, "installed with the package")


def test_cpu_hash_ignores_cuda_sources_only():
    assert build.source_hash("cpu") != build.source_hash("cuda")
    files = {p.relative_to(build.CSRC).as_posix() for p in build.cpu_sources() + build.cuda_sources()}
    assert "ops/register.cpp" in files and any(f.endswith(".cu") for f in files)


def test_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/bin/c++")
    assert build.find_cxx() is None
    with pytest.raises(build.BuildError, match=r"no C\+\+ compiler found .*set CXX"):
        build.build(cpu_only=True)


def _fake_toolkit(root: Path) -> Path:
    """A directory shaped like a CUDA toolkit whose nvcc, like the real one, prints _HERE_ on --dryrun."""
    home = root / "cuda-fake"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    (home / "include" / "cuda_runtime.h").write_text("")
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "#$ _HERE_={home}/bin" >&2\n')
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return home


def test_cuda_home_from_a_wrapper_script_on_path(tmp_path, monkeypatch):
    home = _fake_toolkit(tmp_path)
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    wrapper = wrappers / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrappers}:/usr/bin:/bin")
    assert build.find_cuda_home() == str(home)


def test_cuda_home_through_a_symlink_and_from_the_environment(tmp_path, monkeypatch):
    home = _fake_toolkit(tmp_path)
    links = tmp_path / "links"
    links.mkdir()
    (links / "nvcc").symlink_to(home / "bin" / "nvcc")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{links}:/usr/bin:/bin")
    assert build.find_cuda_home() == str(home)
    other = _fake_toolkit(tmp_path / "other")
    monkeypatch.setenv("CUDA_HOME", str(other))
    assert build.find_cuda_home() == str(other)


def test_arch_list_parsing():
    assert build._arch_numbers("8.0;9.0") == ["80", "90"]
    assert build._arch_numbers("8.6 9.0+PTX") == ["86", "90"]


@pytest.mark.skipif(build.find_cxx() is None, reason="no C++ compiler")
def test_unwind_table_check(tmp_path):
    # A library whose exceptions unwind by a linear scan of .eh_frame (no search table) is reported.
    src = tmp_path / "throws.cpp"
    src.write_text("int f(int x) { if (x) throw x; return 1; }\n")
    ok, none = tmp_path / "ok.so", tmp_path / "none.so"
    cxx = build.find_cxx()
    subprocess.run([cxx, "-shared", "-fPIC", str(src), "-o", str(ok)], check=True)
    subprocess.run([cxx, "-shared", "-fPIC", str(src), "-Wl,--no-eh-frame-hdr", "-o", str(none)], check=True)
    assert build.unwind_table_problem(ok) is None
    assert "no PT_GNU_EH_FRAME" in build.unwind_table_problem(none)
    # the header of ok.so with its table encoding set to DW_EH_PE_omit, as ld writes it when an
    # object's .eh_frame cannot be parsed
    import struct

    data = bytearray(ok.read_bytes())
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    headers = [struct.unpack_from("<IIQ", data, phoff + i * phentsize) for i in range(phnum)]
    hdr = next(offset for p_type, _, offset in headers if p_type == 0x6474E550)  # PT_GNU_EH_FRAME
    data[hdr + 3] = 0xFF
    omitted = tmp_path / "omitted.so"
    omitted.write_bytes(bytes(data))
    assert "no .eh_frame_hdr search table" in build.unwind_table_problem(omitted)
    assert build.unwind_table_problem(src) is None  # not ELF: nothing to say
    if native.is_loaded():
        assert build.unwind_table_problem(native.library_path()) is None
