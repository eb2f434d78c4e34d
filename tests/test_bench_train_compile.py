"""``bus bench train --compile`` and ``--gpu-suite`` (issue 22) on CPU: the code paths, JSON keys and
errors; the GPU numbers come from ``tests/gpu/device_check.sh``. The backend is ``eager`` (dynamo's
graph capture only), the quickest to build: what is timed here is the harness, not the compiler."""

from __future__ import annotations

import json

import pytest
import torch

from bus_benchmarks import cli, harness, readme_results, train_suite


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _bench(tmp_path, *args) -> dict:
    out = tmp_path / "result.json"
    assert cli.main(["train", *args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_train_compiled_reports_compile_time(tmp_path, capsys):
    result = _bench(tmp_path, "--quick", "--no-memory", "--compile", "default", "--compile-backend", "eager")
    s = result["settings"]
    assert s["compile"] == "default" and s["compile_backend"] == "eager" and s["pad_to_max_length"] is True
    for m in result["models"].values():
        assert m["compile_s"] == m["first_step_s"] == m["warmup_step_times_s"][0] > 0
        assert m["mfu"] is None  # CPU: no peak to divide by
        assert len(m["step_times_s"]) == 2
    out = capsys.readouterr().out
    assert "compile (s)" in out and "MFU" not in out and "compile default (eager, captions padded to 16)" in out


@pytest.mark.slow
def test_gpu_suite_quick_runs_every_case(tmp_path, capsys):
    result = _bench(tmp_path, "--gpu-suite", "--quick", "--compile-backend", "eager", "--steps", "1", "--warmup", "0")
    assert result["benchmark"] == "train" and result["suite"] == "gpu" and result["modes"] == ["none", "default"]
    assert [(c["settings"]["model"], c["settings"]["compile"]) for c in result["cases"]] == [
        ("bus-tiny", "none"), ("bus-tiny", "default")]
    for case in result["cases"]:
        assert case["settings"]["pad_to_max_length"] is True and case["settings"]["batch_size"] == 4
        assert set(case["models"]) == {"bus-tiny", "bus-tiny-baseline"}
        bus, base = case["models"]["bus-tiny"], case["models"]["bus-tiny-baseline"]
        assert case["speedup"] == pytest.approx(base["median_step_s"] / bus["median_step_s"])
    assert result["cases"][1]["settings"]["warmup"] == train_suite.MIN_WARMUP  # CUDA graphs: warm-up, record
    eager, compiled = result["cases"]
    assert eager["compiler"]["unique_graphs"] == 0 and compiled["compiler"]["unique_graphs"] == 2  # BUS, baseline
    assert compiled["compiler"]["graph_breaks"] == 0 and compiled["compiler"]["cudagraph_skips"] == 0
    for name in eager["models"]:  # counted once, in the eager case
        assert compiled["models"][name]["flops_per_sample"] == eager["models"][name]["flops_per_sample"] > 0
    captured = capsys.readouterr()
    assert captured.err.count("counting the training FLOPs") == 2
    out = captured.out
    assert "| bus-tiny | 4 | default |" in out and "speedup over eager" in out
    rows = train_suite.compiled_over_eager(result)
    assert {r["model"] for r in rows} == {"bus-tiny", "bus-tiny-baseline"} and all(r["speedup"] > 0 for r in rows)
    folder = tmp_path / "results"  # a recorded suite goes into the README like any bus bench train result
    folder.mkdir()
    (folder / "train_gpu_suite.json").write_text(json.dumps(result))
    assert "speedup over eager" in readme_results.render_results(str(folder))


@pytest.mark.slow
def test_eager_vs_compiled_interleaves_four_steps(tmp_path, capsys):
    result = _bench(tmp_path, "--eager-vs-compiled", "--quick", "--compile-backend", "eager", "--steps", "2",
                    "--warmup", "1")
    assert [(v["model"], v["compile"]) for v in result["variants"]] == [
        ("bus-tiny", "none"), ("bus-tiny", "default"), ("bus-tiny-baseline", "none"), ("bus-tiny-baseline", "default")]
    for v in result["variants"]:
        assert len(v["step_times_s"]) == 2 and len(v["warmup_step_times_s"]) == 1 and v["first_step_s"] > 0
    times = {(v["model"], v["compile"]): v["median_step_s"] for v in result["variants"]}
    for r in result["compiled_over_eager"]:
        assert r["speedup"] == pytest.approx(times[(r["model"], "none")] / times[(r["model"], "default")])
    assert "eager step / compiled step" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--quick", "--compile", "fast"], "--compile: unknown mode 'fast'"),
    (["--quick", "--compile", "reduce-overhead", "--compile-backend", "aot_eager"], "needs --compile-backend inductor"),
    (["--quick", "--compile", "default", "--override", "selection__keep_mode=\"mass\""], 'keep_mode="mass"'),
    (["--gpu-suite"], "needs CUDA"),
])
def test_bench_train_compile_errors(args, message, capsys):
    if "needs CUDA" in message and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as err:
        cli.main(["train", *args])
    assert message in str(err.value) and "bus bench train: error:" in str(err.value)


def test_peak_flops_by_device_name(monkeypatch):
    assert harness.peak_bf16_flops(torch.device("cpu")) == (None, None)
    for name, want in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla T4", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert harness.peak_bf16_flops(torch.device("cuda"))[0] == want, name


def test_suite_mode_defaults_to_cuda_graphs_on_cuda():
    assert train_suite.suite_mode(None, torch.device("cuda")) == "reduce-overhead"
    assert train_suite.suite_mode("none", torch.device("cuda")) == "reduce-overhead"
    assert train_suite.suite_mode("max-autotune", torch.device("cuda")) == "max-autotune"
    assert train_suite.suite_mode(None, torch.device("cpu")) == "default"
