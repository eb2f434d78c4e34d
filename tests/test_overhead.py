"""``bus bench overhead`` (issues 22 and 23): the quick run writes its JSON and Markdown with the documented
fields; the dispatch counter charges each op to the right model part on a hand-made model whose ops are
known one by one; a step's count does not depend on the batch size; a failing ``torch.compile`` is recorded,
not raised; ``--help`` works."""

from __future__ import annotations

import importlib.util
import json
import types

import pytest
import torch

from bus_benchmarks import cli, overhead
from bus_benchmarks.dispatch_count import GLUE, OPTIMIZER, DispatchCounter, count_step_ops

ENV_KEYS = {"device", "device_type", "torch", "triton", "commit", "date", "command"}


@pytest.mark.slow
def test_bench_overhead_quick_writes_json_and_markdown(tmp_path, capsys):
    out, md = tmp_path / "overhead.json", tmp_path / "overhead.md"
    assert cli.main(["overhead", "--quick", "--json", str(out), "--markdown", str(md)]) == 0
    result = json.loads(out.read_text())
    assert ENV_KEYS <= result.keys() and result["benchmark"] == "overhead"

    rows = {(r["model"], r["attn_impl"]): r for r in result["ops_per_step"]}
    assert set(rows) == {(m, a) for m in ("bus-tiny", "bus-tiny-baseline") for a in ("sdpa", "varlen")}
    for r in rows.values():
        assert r["total"] > 100 and sum(r["by_part"].values()) == r["total"]
        assert sum(r["by_phase"].values()) == r["total"] and r["by_phase"]["backward"] > r["by_phase"]["forward"]
        assert r["same_op_graph"], "the narrow stand-in must run the configs' op graph"
    for impl in ("sdpa", "varlen"):
        bus, base = rows["bus-tiny", impl], rows["bus-tiny-baseline", impl]
        assert bus["total"] > base["total"] and bus["by_part"]["selection"] > 0 and "PAD" not in base["by_part"]
    assert set(result["kernel_backends"]) == {"text_patch_scores", "topk_gather", "varlen_attention"}

    steps = {(r["model"], r["attn_impl"], r["precision"], r["mode"]): r for r in result["host_ms_per_step"]}
    assert set(steps) == {(m, a, p, "eager") for m, a in rows for p in ("bf16", "fp32")}
    for (m, a, p, _), r in steps.items():
        assert 0 < r["p25_ms"] <= r["median_ms"] and r["cpu_median_ms"] > 0 and r["steps"] == 2
        assert r["cpu_us_per_op"] > 0 and 0 < r["compute_share"] < 1
        if p == "bf16":  # the timed stand-in is the counted one
            assert r["ops"] == rows[m, a]["standin_total"] == rows[m, a]["total"]
        else:  # the same graph without the autocast casts
            assert r["ops"] < steps[m, a, "bf16", "eager"]["ops"]

    ops = result["op_host_us"]
    assert ops["stubbed_kernels"] and ops["ops_without_stubbed_launch"] == []
    assert set(ops["backends"].values()) == {"triton"}  # every op ran the (stubbed) Triton path
    by_op = {r["op"]: r for r in ops["rows"]}
    assert set(by_op) == {*overhead.PUBLIC_OPS, "x * 2", "trivial custom op"}
    for name, r in by_op.items():
        assert all(r[f"{k}_us"] > 0 and r[f"{k}_cpu_us"] > 0 for k in ("fwd", "fwd_grad", "fwd_bwd"))
        if name in overhead.PUBLIC_OPS:
            assert r["launches"]["fwd"] >= 1 and r["launches"]["fwd_bwd"] > r["launches"]["fwd"]
            assert isinstance(r["fwd_target_met"], bool) and isinstance(r["fwd_bwd_target_met"], bool)
        else:
            assert r["launches"]["fwd_bwd"] == 0 and "fwd_target_met" not in r

    text = md.read_text()
    assert "Dispatched ops per training step" in text and "Host milliseconds per training step" in text
    assert "Host microseconds per public call" in text and "varlen_attention" in text
    assert "Host microseconds per public call" in capsys.readouterr().out


def _toy_losses(tmp_path):
    """A loss function in a file ``bus_model/losses.py``: the counter charges what it runs to ``losses``."""
    path = tmp_path / "bus_model" / "losses.py"
    path.parent.mkdir()
    path.write_text("def toy_loss(h, y):\n    return (h * y).sum()\n")
    spec = importlib.util.spec_from_file_location("toy_bus_losses", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dispatch_counter_charges_each_part_exactly(tmp_path):
    losses = _toy_losses(tmp_path)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = torch.nn.Linear(4, 3)  # a part module: the ViT

        def forward(self, x, y):
            h = self.vision(x) + 1  # the add is the model's own glue
            return types.SimpleNamespace(loss=losses.toy_loss(h, y))

    model = Toy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    result = count_step_ops(model, (torch.randn(2, 4), torch.randn(2, 3)), amp=False, optimizer=optimizer)
    # forward: ViT t + addmm, glue add, losses mul + sum. backward: the seed ones_like (glue); losses expand (sum)
    # + mul (d/dh of h*y; y needs no grad); ViT: the weight gradient t, mm, t and the bias gradient sum + view of
    # AddmmBackward, t of TBackward, and AccumulateGrad's detach of each parameter; the add's backward runs nothing.
    # optimizer: _foreach_add_ (step counts), _fused_adamw_, and the profiler's record_function enter/exit
    assert result["by_part"] == {"ViT": 10, "losses": 4, OPTIMIZER: 4, GLUE: 2}
    assert result["by_phase"] == {"forward": 5, "backward": 11, "optimizer": 4}
    assert result["total"] == 20

    x, y = torch.randn(2, 4), torch.randn(2, 3)
    with DispatchCounter(model) as counter:
        counter.phase = "forward"
        out = model(x, y)
        out.loss.add_(0)  # outside the model's forward: glue in the forward phase, not the optimizer
        counter.phase = "backward"
        out.loss.backward()
    assert counter.by_part_op["losses", "aten::mul"] == 2 and counter.by_part_op["losses", "aten::expand"] == 1
    assert counter.by_part_op["ViT", "aten::addmm"] == 1 and counter.by_part_op["ViT", "aten::mm"] == 1
    assert counter.by_part_op[GLUE, "aten::add"] == 1 and counter.by_part_op[GLUE, "aten::ones_like"] == 1
    assert counter.by_part_op[GLUE, "aten::add_"] == 1
    assert OPTIMIZER not in counter.by_part  # nothing ran outside forward and backward


def test_step_op_counts_do_not_depend_on_the_batch_size():
    from bus_benchmarks.train_speed import build_model_and_data

    counts = []
    for batch_size in (2, 4):
        model, data = build_model_and_data("bus-tiny", batch_size, 0, None, torch.device("cpu"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        batch = data[0]
        assert batch[0].shape[0] == batch_size
        r = count_step_ops(model, batch, amp=True, optimizer=optimizer)
        counts.append((r["total"], r["by_part"], r["by_phase"]))
    assert counts[0] == counts[1]
    assert counts[0][1]["selection"] > 0 and counts[0][2]["optimizer"] > 0


def test_narrow_stand_in_keeps_heads_integral():
    assert [overhead._heads(48, h) for h in (1, 5, 6, 7, 12, 16, 64)] == [1, 4, 6, 6, 12, 16, 48]
    small = overhead.narrow_overrides("bus-small", 48)
    assert small["vision__width"] == small["text__hidden_size"] == 48 and small["vision__num_heads"] == 6
    tiny = overhead.narrow_overrides("bus-tiny", 48)  # its ViT (64) is wider than its text tower (48): kept so
    assert tiny["vision__width"] == 64 and tiny["text__hidden_size"] == 48 and "vision__image_size" not in tiny
    # images: at most the config's, whole patches, at least 2 x 2 of them
    assert overhead.narrow_overrides("bus-small", 48, 64)["vision__image_size"] == 64
    assert overhead.narrow_overrides("bus-small", 48, 70)["vision__image_size"] == 64
    assert overhead.narrow_overrides("bus-small", 48, 8)["vision__image_size"] == 32
    assert overhead.narrow_overrides("bus-tiny", 48, 64)["vision__image_size"] == 32


def test_a_failing_compile_is_recorded_not_raised(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    settings = overhead.OverheadSettings.quick()
    settings.models, settings.attn_impls, settings.precisions = ("bus-tiny",), ("sdpa",), ("fp32",)
    settings.compile = True
    rows = overhead.time_steps(settings, log=lambda msg: None)
    eager, compiled = rows
    assert eager["mode"] == "eager" and eager["median_ms"] > 0 and eager["ops"] > 100
    assert compiled["mode"] == "compiled (aot_eager)" and "median_ms" not in compiled
    assert "no compiler here" in compiled["fullgraph_error"] and "no compiler here" in compiled["error"]


def test_help_and_bad_arguments(capsys):
    from bus_model.training import cli as bus_cli

    with pytest.raises(SystemExit) as exc:
        bus_cli.main(["bench", "overhead", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: bus bench overhead") and "--compile" in out and "--models" in out
    with pytest.raises(SystemExit, match="unknown model"):
        cli.main(["overhead", "--models", "bus-nonexistent"])
    with pytest.raises(SystemExit, match="--rounds must be >= 1"):
        cli.main(["overhead", "--rounds", "0"])
