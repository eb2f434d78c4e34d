"""``bus selftest`` (benchmarks/selftest.py): the quick run writes the documented JSON and Markdown, and a
kernel that returns a wrong result or raises is reported as FAILED without stopping the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bus_benchmarks import selftest, selftest_checks
from bus_kernels import backends

SECTION_NAMES = ["environment", "dispatch", "kernels", "syncs", "training", "timing"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("selftest")
    code = selftest.main(["--quick", "--out", str(out), "--isolate", "no"])
    return code, out, json.loads((out / "selftest.json").read_text())


@pytest.mark.slow
def test_quick_run_writes_documented_report(quick_run):
    code, out, report = quick_run
    assert code == 0
    assert set(report) >= {"mode", "device_type", "out", "started", "budget_s", "sections", "summary", "seconds"}
    assert report["mode"] == "quick"
    assert list(report["sections"]) == SECTION_NAMES
    for name, section in report["sections"].items():
        assert section["status"] == "ok", (name, section)
    env = report["sections"]["environment"]
    assert env["torch"] == torch.__version__ and "backends" in env
    if not torch.cuda.is_available():
        assert report["device_type"] == "cpu"
        assert report["summary"].startswith("NO GPU FOUND")
        assert "No GPU was found" in (out / "selftest.md").read_text()

    kernels = report["sections"]["kernels"]["rows"]
    ops = {r["op"] for r in kernels}
    assert ops == {"text_patch_scores", "topk_gather", "topk_gather_varlen", "keep_by_mass", "pad", "unpad",
                   "varlen_attention"}
    passed = [r for r in kernels if r["status"] == "passed"]
    assert passed and not [r for r in kernels if r["status"] == "FAILED"]
    for row in passed:  # every check names its output, error and tolerance, forward and backward
        assert row["checks"] and all({"output", "error", "tolerance", "passed"} <= set(c) for c in row["checks"])
    assert any(c["output"].startswith("grad ") for r in passed for c in r["checks"])
    # both CPU kernel backends of attention are checked (triton through the interpreter)
    assert {r["backend"] for r in passed if r["op"] == "varlen_attention"} >= {"torch", "triton"}
    skipped = [r for r in kernels if r["status"] == "skipped"]
    assert all(r["reason"] for r in skipped)

    dispatch = report["sections"]["dispatch"]["rows"]
    assert {(r["op"], r["dtype"]) for r in dispatch} >= {("varlen_attention", "float32"), ("topk_gather", "float16")}
    assert all(r["chosen"] for r in dispatch)

    syncs = {r["variant"]: r for r in report["sections"]["syncs"]["rows"]}
    assert all(r["status"] == "ok" and isinstance(r["total"], int) for r in syncs.values())
    assert all(r["total"] <= r["budget"] for r in syncs.values() if r["budget"] is not None)
    assert syncs["bus-tiny attn_impl=sdpa"]["budget"] == 0 and syncs["bus-tiny attn_impl=varlen"]["budget"] == 2
    training = report["sections"]["training"]["rows"]
    assert any(r["variant"].endswith("-baseline") for r in training)
    assert all(r["status"] == "ok" and r["step_ms"] > 0 for r in training)
    timing = report["sections"]["timing"]["rows"]
    assert any(r["status"] == "ok" and r["backend"].startswith("padded SDPA") for r in timing)
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in timing if r["status"] == "ok")
    # the work each call cannot avoid, beside its time: MB for the pruning ops, GFLOP for attention
    for row in (r for r in timing if r["status"] == "ok"):
        work = "fwd_gflop" if row["op"] == "varlen_attention" else "fwd_mb"
        assert 0 < row[work] < row[work.replace("fwd", "fwd_bwd")], row
    if torch.cuda.is_available():  # kernel-only and CUDA-graph times, and what the kernels achieve
        assert all(r.get("fwd_kernel_ms") or r.get("fwd_graph_ms") for r in timing if r["status"] == "ok")
        assert any(r.get("fwd_peak_pct") for r in timing if r["status"] == "ok")
    text = (out / "selftest.md").read_text()
    assert "## Kernels against the float64 reference" in text
    assert "work per call (fwd; fwd+bwd)" in text or "kernels achieve (fwd; fwd+bwd)" in text


def test_work_counts_and_achieved_share_of_peak(monkeypatch):
    """What a GPU run reports from its kernel-only times, checked on made-up times and peaks."""
    from bus_benchmarks import harness, selftest_perf as perf

    fwd, full = perf.attention_flops([3, 5], [4, 5], H=2, D=8)
    assert fwd == 4 * 2 * 8 * (12 + 25) and full == 3.5 * fwd
    assert perf.attention_flops([5], [5], 1, 8, causal=True)[0] == 4 * 8 * 25 / 2
    B, N, C, k = 32, 197, 768, 137
    fwd_bytes, _ = perf.topk_gather_bytes(B, N, C, k, esize=2)
    assert fwd_bytes == B * N * C * 2 + B * N * 4 + B * (k + 1) * C * 2 + B * k * 8  # x + scores in, tokens + index out
    tps_fwd, tps_full = perf.tps_bytes(B, N, 12, 64, esize=2)
    assert tps_fwd == B * N * 768 * 2 + B * 768 * 2 + B * N * 4 and tps_full > 2 * tps_fwd

    monkeypatch.setattr(harness, "peak_memory_bandwidth", lambda device: (4.0e12, "made up"))
    monkeypatch.setattr(harness, "peak_bf16_flops", lambda device: (1.0e15, "made up"))
    cuda = torch.device("cuda")
    row = {"fwd_ms": 0.2, "fwd_kernel_ms": 0.01, "fwd_bwd_ms": 1.0, "fwd_bwd_kernel_ms": None, "fwd_bwd_graph_ms": 0.05}
    got = perf.achieved(row, cuda, bytes_moved=(2.0e7, 6.0e7))
    assert got["fwd_gbps"] == pytest.approx(2000) and got["fwd_peak_pct"] == pytest.approx(50)
    assert got["fwd_call_over_kernel"] == pytest.approx(20) and got["fwd_time_basis"] == "kernel"
    assert got["fwd_bwd_time_basis"] == "graph" and got["fwd_bwd_gbps"] == pytest.approx(1200)  # no profile: graph
    got = perf.achieved({"fwd_kernel_ms": 1.0}, cuda, flops=(5e11, 1.75e12))
    assert got["fwd_tflops"] == pytest.approx(500) and got["fwd_peak_pct"] == pytest.approx(50)
    assert "fwd_bwd_tflops" not in got and got["fwd_bwd_gflop"] == pytest.approx(1750)
    assert selftest._achieved_text({**row, **perf.achieved(row, cuda, bytes_moved=(2.0e7, 6.0e7))}) == (
        "2000 GB/s = 50% of peak, call 20.0x kernels; 1200 GB/s = 30% of peak, call 20.0x kernels")
    # on a CPU: the counts only
    assert perf.achieved(row, torch.device("cpu"), bytes_moved=(2.0e7, 6.0e7)) == {"fwd_mb": 20.0, "fwd_bwd_mb": 60.0}


def _only(op: str, monkeypatch) -> None:
    real = selftest_checks.cases
    monkeypatch.setattr(selftest_checks, "cases", lambda quick=False: [c for c in real(quick) if c.op == op])


def test_wrong_kernel_result_is_reported_failed(tmp_path, monkeypatch, capsys):
    """A planted 1% error in the triton text_patch_scores is a FAILED line; --strict turns it into exit 1."""
    _only("text_patch_scores", monkeypatch)
    good = backends.get_impl("text_patch_scores", "triton")
    monkeypatch.setitem(backends._IMPLS, ("text_patch_scores", "triton"), lambda q, k, s: good(q, k, s) * 1.01)
    args = ["--out", str(tmp_path), "--sections", "kernels", "--isolate", "no", "--quick"]
    assert selftest.main(args) == 0  # failures never change the exit status without --strict
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "selftest.json").read_text())
    rows = report["sections"]["kernels"]["rows"]
    bad = [r for r in rows if r["status"] == "FAILED"]
    assert bad and {r["backend"] for r in bad} == {"triton"}
    assert {r["backend"] for r in rows if r["status"] == "passed"} >= {"torch"}
    assert any(c["output"] == "scores" and not c["passed"] and c["error"] > c["tolerance"] for c in bad[0]["checks"])
    assert "FAILED text_patch_scores" in printed
    assert "FAILED" in report["summary"]
    assert selftest.main(args + ["--strict"]) == 1


def test_raising_kernel_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    _only("topk_gather", monkeypatch)

    def broken(*args):
        raise RuntimeError("planted failure")

    monkeypatch.setitem(backends._IMPLS, ("topk_gather", "triton"), broken)
    assert selftest.main(["--out", str(tmp_path), "--sections", "kernels,dispatch", "--isolate", "no", "--quick"]) == 0
    report = json.loads((tmp_path / "selftest.json").read_text())
    rows = report["sections"]["kernels"]["rows"]
    failed = [r for r in rows if r["status"] == "FAILED"]
    assert failed and all("planted failure" in r["exception"] and r["traceback"] for r in failed)
    assert any(r["status"] == "passed" for r in rows)  # the other backends still ran
    assert report["sections"]["dispatch"]["status"] == "ok"  # and so did the next section


def test_section_in_a_child_process_and_as_a_script(tmp_path):
    """The isolation path (used on GPUs) and ``python benchmarks/selftest.py`` from a checkout."""
    script = Path(selftest.__file__)
    proc = subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path), "--sections",
                           "environment,dispatch", "--isolate", "yes"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "selftest.json").read_text())
    assert report["sections"]["dispatch"]["status"] == "ok"
    assert "bus selftest:" in proc.stdout


def test_unknown_section_is_an_error(tmp_path, capsys):
    assert selftest.main(["--out", str(tmp_path), "--sections", "kernels,nope"]) == 2
    assert "nope" in capsys.readouterr().out


def test_time_budget_skips_with_a_reason(tmp_path):
    # environment runs first (it always runs: it is cheap) and takes longer than the budget
    assert selftest.main(["--out", str(tmp_path), "--sections", "environment,timing,training", "--isolate", "no",
                          "--quick", "--budget", "0.001"]) == 0
    report = json.loads((tmp_path / "selftest.json").read_text())
    assert report["sections"]["environment"]["status"] == "ok"
    for name in ("timing", "training"):
        section = report["sections"][name]
        assert section["status"] == "skipped" and "budget" in section["reason"]
    assert "sections skipped (time budget): timing, training" in report["summary"]
    assert not selftest.failures(report)


def test_syncs_over_budget_is_a_failed_line():
    report = {"sections": {"syncs": {"status": "ok", "rows": [
        {"variant": "bus-small attn_impl=sdpa", "status": "over budget", "total": 3, "budget": 0,
         "by_op": {"Tensor.tolist": 3}},
        {"variant": "bus-small-baseline", "status": "ok", "total": 0, "budget": 0}]}}}
    lines = selftest.failures(report)
    assert len(lines) == 1 and lines[0].startswith("FAILED syncs: bus-small attn_impl=sdpa: 3 host syncs > budget 0")
