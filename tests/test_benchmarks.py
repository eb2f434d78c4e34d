"""Each `bus bench` command in its --quick mode writes valid JSON with the documented keys; the byte
counter is exact on hand-checkable examples; the README results are generated from the JSON."""

from __future__ import annotations

import json

import pytest
import torch

from bus_benchmarks import cli, readme_results
from bus_benchmarks.harness import ByteCounter

ENV_KEYS = {"device", "device_type", "torch", "triton", "commit", "date", "command"}


def run_bench(tmp_path, *args) -> dict:
    out = tmp_path / "result.json"
    assert cli.main([*args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_train_quick(tmp_path, capsys):
    result = run_bench(tmp_path, "train", "--quick")
    assert ENV_KEYS <= result.keys() and result["benchmark"] == "train"
    assert set(result["models"]) == {"bus-tiny", "bus-tiny-baseline"}
    for m in result["models"].values():
        assert m["median_step_s"] > 0 and m["images_per_s"] > 0 and m["flops_per_sample"] > 0
        assert len(m["step_times_s"]) == 2
        # a model, its gradients and AdamW state take memory: a probe that measured nothing reads 0
        assert m["peak_memory_mib"] > 1 and "VmHWM" in m["memory_kind"]
    bus, base = result["models"]["bus-tiny"], result["models"]["bus-tiny-baseline"]
    assert result["speedup"] == pytest.approx(base["median_step_s"] / bus["median_step_s"])
    assert result["flops_ratio"] == pytest.approx(bus["flops_per_sample"] / base["flops_per_sample"])
    # at 32 px (4 x 4 patches) the default caption-free ITC pass costs about what pruning saves: no claim that
    # BUS cuts the work at this size (the 64 px rows of the FLOPs benchmark below hold that)
    assert "speedup (baseline step time / BUS step time)" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_train_equal_time_eval(tmp_path):
    result = run_bench(tmp_path, "train", "--quick", "--no-memory", "--eval", "--eval-seconds", "2")
    for m in result["models"].values():
        e = m["equal_time_eval"]
        assert e["train_seconds"] >= 2 and e["train_steps"] >= 1 and e["num_candidates"] == 128
        assert 0 <= e["img2txt_r1"] <= e["img2txt_r10"] <= 1 and 0 <= e["txt2img_r1"] <= e["txt2img_r10"] <= 1
        assert 1 <= e["img2txt_meanr"] <= 128 and 1 <= e["txt2img_meanr"] <= 128


def test_bench_flops_quick(tmp_path):
    result = run_bench(tmp_path, "flops", "--quick")
    rows = {(r["model"], r["image_size"]): r for r in result["rows"]}
    assert set(rows) == {("bus-tiny", 32), ("bus-tiny-baseline", 32), ("bus-tiny", 64), ("bus-tiny-baseline", 64)}
    assert all(r["counted_on"] == "meta" for r in rows.values())
    assert rows[("bus-tiny", 64)]["flops_per_sample"] < rows[("bus-tiny-baseline", 64)]["flops_per_sample"]
    assert rows[("bus-tiny-baseline", 64)]["flops_per_sample"] > rows[("bus-tiny-baseline", 32)]["flops_per_sample"]


@pytest.mark.slow
def test_bench_scaling_quick(tmp_path):
    result = run_bench(tmp_path, "scaling", "--quick")
    assert [r["image_size"] for r in result["rows"]] == [32, 32, 64, 64]
    assert all(r["median_step_s"] > 0 for r in result["rows"])
    assert sum("speedup" in r for r in result["rows"]) == 2


def test_bench_kernels_quick(tmp_path):
    result = run_bench(tmp_path, "kernels", "--quick")
    ops = {r["op"] for r in result["timings"]}
    assert {"text_patch_scores", "topk_gather"} <= ops
    assert all(r["fwd_ms"] > 0 for r in result["timings"])
    # triton on CPU is never timed: it is either unavailable or the interpreter
    assert all(r["backend"] != "triton" for r in result["timings"])
    traffic = {t["op"]: t for t in result["traffic"]}
    assert traffic["topk_gather"]["fwd_excess"] > 1 and traffic["text_patch_scores"]["fwd_excess"] > 1


def test_byte_counter_exact_on_hand_checked_ops():
    a, b = torch.ones(10), torch.ones(10)
    with ByteCounter() as counter:
        c = a + b  # reads 2 x 40 bytes, writes 40
        v = c.view(2, 5)  # a view moves nothing
        s = (v * 2).sum()  # mul: reads 40, writes 40; sum: reads 40, writes 4
    assert s.item() == 40
    assert counter.read == 80 + 40 + 40 and counter.written == 40 + 40 + 4
    assert [name for name, _, _ in counter.ops] == ["add", "mul", "sum"]


def test_readme_results_are_generated_from_json(tmp_path):
    kernels = run_bench(tmp_path, "kernels", "--quick")
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "kernels_cpu.json").write_text(json.dumps(kernels))
    (folder / "other.json").write_text(json.dumps({"not": "a bench result"}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{readme_results.START}\nold\n{readme_results.END}\ntail\n")
    new = readme_results.update_readme(str(readme), str(folder))
    assert "old" not in new and new.endswith(f"{readme_results.END}\ntail\n")
    assert "kernels_cpu.json" in new and kernels["commit"][:12] in new and "topk_gather" in new
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="no results markers"):
        readme_results.update_readme(str(readme), str(folder))


@pytest.mark.parametrize(
    "args,match",
    [
        (["train", "--steps", "0"], "--steps must be >= 1"),
        (["train", "--model", "bus-nonexistent"], "--model must be a BUS config"),
        (["train", "--model", "bus-tiny-baseline"], "--model must be a BUS config"),
        (["train", "--eval", "--eval-seconds", "0"], "--eval-seconds must be > 0"),
    ],
)
def test_bench_bad_arguments(args, match):
    with pytest.raises(SystemExit, match=match):
        cli.main(args)
