"""bus bench quality: selector recall, time-to-target and speedup on hand-made inputs; policy discovery;
the --quick run writes the documented JSON; checkpoints load with BusModel.from_pretrained."""

import json
import math
import subprocess
import sys

import pytest
import torch

from bus_benchmarks import quality
from bus_benchmarks.quality_metrics import (
    mean_and_spread,
    mean_curve,
    selector_recall,
    speedup_to_target,
    time_to_target,
)
from bus_benchmarks.quality_train import BASELINE, NO_PTM, eval_steps, policy_specs


# ------------------------------------------------------------------------------------ selector recall
def test_selector_recall_exact_on_a_hand_made_example():
    # image 0: relevant patches {1, 2, 5}; kept {1, 5, 7} and a fused token (-1) -> 2 of 3
    # image 1: relevant {0}; kept {3, 4} and padding -> 0 of 1
    labels = torch.zeros(2, 9)
    labels[0, [1, 2, 5]] = 1
    labels[1, 0] = 1
    kept = torch.tensor([[1, 5, 7, -1], [3, 4, -1, -1]])
    assert selector_recall(kept, labels) == pytest.approx(2 / 4)
    # everything kept -> 1; nothing relevant -> None (not 0)
    assert selector_recall(torch.arange(9).expand(2, 9), labels) == 1.0
    assert selector_recall(kept, torch.zeros(2, 9)) is None
    # a repeated position counts once
    assert selector_recall(torch.tensor([[1, 1, 1], [0, 0, 0]]), labels) == pytest.approx(2 / 4)


def test_selector_recall_matches_a_loop_on_random_inputs():
    g = torch.Generator().manual_seed(3)
    labels = (torch.rand(7, 37, generator=g) > 0.7).float()
    kept = torch.stack([torch.randperm(37, generator=g)[:13] for _ in range(7)])
    kept[kept % 5 == 0] = -1
    hit = total = 0
    for b in range(7):
        rel = {i for i in range(37) if labels[b, i] > 0.5}
        hit += len(rel & {int(k) for k in kept[b] if k >= 0})
        total += len(rel)
    assert selector_recall(kept, labels) == pytest.approx(hit / total)


def test_selector_recall_rejects_bad_inputs():
    with pytest.raises(ValueError, match="kept_positions"):
        selector_recall(torch.zeros(3, dtype=torch.long), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="rows"):
        selector_recall(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="only 4 patches"):
        selector_recall(torch.tensor([[4]]), torch.zeros(1, 4))
    with pytest.raises(TypeError, match="integer"):
        selector_recall(torch.zeros(1, 2), torch.zeros(1, 4))


# ------------------------------------------------------------------------------------ time to target
CURVE = [{"time_s": 10.0, "step": 5, "mean_r1": 0.1}, {"time_s": 20.0, "step": 10, "mean_r1": 0.35},
         {"time_s": 30.0, "step": 15, "mean_r1": 0.3}, {"time_s": 40.0, "step": 20, "mean_r1": 0.5}]


def test_time_to_target_and_speedup_on_a_hand_made_curve():
    assert time_to_target(CURVE, 0.35) == 20.0  # reached exactly at the second point
    assert time_to_target(CURVE, 0.4) == 40.0  # the dip at 30 s does not count
    assert time_to_target(CURVE, 0.05) == 10.0
    assert time_to_target(CURVE, 0.51) is None  # never reached: null, not a number
    assert time_to_target([], 0.1) is None
    baseline = [{"time_s": 25.0, "step": 10, "mean_r1": 0.2}, {"time_s": 50.0, "step": 20, "mean_r1": 0.4}]
    target = baseline[-1]["mean_r1"]
    assert speedup_to_target(time_to_target(baseline, target), time_to_target(CURVE, target)) == pytest.approx(50 / 40)
    assert speedup_to_target(50.0, None) is None and speedup_to_target(None, 10.0) is None
    with pytest.raises(ValueError, match="increasing"):
        time_to_target(CURVE[::-1], 0.2)
    with pytest.raises(ValueError, match="target"):
        time_to_target(CURVE, float("nan"))


def test_mean_and_spread_and_mean_curve():
    assert mean_and_spread([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_and_spread([None, 2.0]) == (2.0, None)
    assert mean_and_spread([None]) == (None, None)
    other = [dict(p, mean_r1=p["mean_r1"] + 0.1) for p in CURVE]
    mean = mean_curve([CURVE, other])
    assert [p["time_s"] for p in mean] == [10.0, 20.0, 30.0, 40.0]
    assert mean[1]["mean_r1"] == pytest.approx(0.4) and mean[1]["mean_r1_std"] == pytest.approx(0.1 / math.sqrt(2))


def test_eval_steps_end_at_the_budget():
    assert eval_steps(10, 4) == [3, 5, 8, 10]
    assert eval_steps(2, 4) == [1, 2]
    assert eval_steps(1, 1) == [1]


# ------------------------------------------------------------------------------------ policies
def test_every_policy_the_model_offers_is_trained():
    from bus_model.selection import POLICY_INFO

    specs = policy_specs("bus-mini")
    itc = {"bus-guided", "bus-detached"}  # the losses.itc_image choices other than the default (issue 24)
    assert set(specs) == {BASELINE, NO_PTM} | itc | (set(POLICY_INFO) - {"none"})
    assert specs[BASELINE].config == "bus-mini-baseline"
    assert specs[NO_PTM].overrides == {"selection__policy": "bus", "losses__ptm": False}
    assert specs["bus-guided"].overrides == {"selection__policy": "bus", "losses__itc_image": "guided"}
    tok, text = quality._tokenizer_and_overrides("bus-mini")
    chosen, skipped = quality.select_specs(quality.QualitySettings(policies=["all"]), text)
    assert set(chosen) == set(specs) and not skipped  # bus-mini builds every variant (elip: equal widths)
    # the default run: baseline, bus, random, every selection variant at 25% of the patches kept
    chosen, _ = quality.select_specs(quality.QualitySettings(), text)
    assert list(chosen) == ["baseline", "bus", "random"]
    assert all(spec.overrides["selection__keep_ratios"] == [0.5, 0.5] for spec in chosen.values())
    settings = quality.settings_from_args(_args("--model-keep-ratios"))
    chosen, _ = quality.select_specs(settings, text)
    assert "selection__keep_ratios" not in chosen["bus"].overrides


def test_unknown_policy_is_refused():
    tok, text = quality._tokenizer_and_overrides("bus-mini")
    with pytest.raises(SystemExit, match="unknown"):
        quality.select_specs(quality.QualitySettings(policies=["bus", "nope"]), text)


def _args(*argv):
    import argparse

    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_override_reaches_every_variant_and_variant_keys_win():
    settings = quality.settings_from_args(_args("--override", "vision__initializer_range=0.05",
                                                "--override", "losses__ptm=true", "--policies", "bus", "bus-noptm"))
    assert settings.overrides == {"vision__initializer_range": 0.05, "losses__ptm": True}
    tok, text = quality._tokenizer_and_overrides("bus-mini")
    chosen, _ = quality.select_specs(settings, text)
    assert set(chosen) == {BASELINE, "bus", NO_PTM}
    for spec in chosen.values():
        assert spec.overrides["vision__initializer_range"] == 0.05
    assert chosen[NO_PTM].overrides["losses__ptm"] is False  # the ablation stays an ablation
    assert chosen["bus"].overrides["losses__ptm"] is True
    model = quality.build_model(chosen[BASELINE], text, 0, torch.device("cpu"))
    assert model.config.vision.initializer_range == 0.05


@pytest.mark.parametrize("argv, match", [
    (["--override", "selection__policy=evit"], "selection__policy"),
    (["--override", "novalue"], "SECTION__FIELD=VALUE"),
])
def test_bad_override_is_refused(argv, match):
    with pytest.raises(SystemExit, match=match):
        quality.settings_from_args(_args(*argv))


def test_override_of_an_unknown_field_names_it():
    settings = quality.settings_from_args(_args("--override", "vision__nope=1"))
    tok, text = quality._tokenizer_and_overrides("bus-mini")
    with pytest.raises(SystemExit, match="nope"):
        quality.select_specs(settings, text)


# ------------------------------------------------------------------------------------ the --quick run
@pytest.mark.slow
def test_quick_run_writes_the_documented_json(tmp_path):
    out, js, png = tmp_path / "ckpt", tmp_path / "q.json", tmp_path / "q.png"
    cmd = [sys.executable, "-m", "bus_benchmarks.quality", "--quick", "--policies", "bus", "random",
           "--json", str(js), "--plot", str(png), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| policy |" in proc.stdout and "| comparison |" in proc.stdout
    result = json.loads(js.read_text())
    # the contract of issue 24 item 6
    for key in ("scene", "heldout_pairs", "gallery_size", "seeds", "data", "comparisons", "verdict",
                "model", "budget_s", "device", "commit", "target", "policies"):
        assert key in result, key
    assert result["scene"] == "cluttered" and result["seeds"] == [0]
    assert result["heldout_pairs"] == 32 and result["gallery_size"] == 16
    assert result["verdict"]["path"] == "unpruned" and result["verdict"]["metric"] == "mean_r1"
    assert result["target"]["metric"] == "mean_r1" and isinstance(result["target"]["value"], float)
    assert set(result["oracle_txt2img_r1"]) >= {"colours", "size-colour-shape bound"}
    assert "ceilings" in proc.stdout
    assert 0.5 < result["scene_statistics"]["lost_mentioned_object"] <= 1.0
    assert set(result["policies"]) == {"baseline", "bus", "random"}
    data = result["data"]
    from bus_model.data import SyntheticDataset

    rebuilt = SyntheticDataset(**data)  # the held-out split can be rebuilt from the recorded kwargs
    assert len(rebuilt) == result["heldout_pairs"] and rebuilt.scene == "cluttered"
    assert SyntheticDataset(**{**data, "seed": 7})[0]["caption"] != rebuilt[0]["caption"]  # another split
    for name, p in result["policies"].items():
        assert {"unpruned", "deployed"} <= set(p["final"]), name
        for path, f in p["final"].items():
            for key in ("mean_r1", "mean_r1_se", "img2txt_r1", "txt2img_r1"):
                assert key in f, (name, path, key)
            assert f["mean_r1"] == pytest.approx((f["img2txt_r1"] + f["txt2img_r1"]) / 2)
            assert 0.0 <= f["mean_r1"] <= 1.0 and f["mean_r1_se"] >= 0.0
        assert [s["seed"] for s in p["per_seed"]] == [0]
        for s in p["per_seed"]:
            assert isinstance(s["unpruned"]["mean_r1"], float) and isinstance(s["deployed"]["mean_r1"], float)
        for key in ("curve", "time_to_target_s", "speedup_to_target", "step_time_s", "flops_per_sample",
                    "selector_recall", "captioning"):
            assert key in p, (name, key)
        assert p["curve"] and all({"time_s", "step", "mean_r1"} <= set(c) for c in p["curve"])
        assert p["step_time_s"] > 0 and p["flops_per_sample"] > 0
        assert "cider" in p["captioning"]
    base = result["policies"]["baseline"]
    assert base["final"]["unpruned"] == base["final"]["deployed"]  # no selection: one path
    assert base["selector_recall"] == {"training": None, "text_free": None}
    recall = result["policies"]["bus"]["selector_recall"]
    assert len(recall["training"]) == 2 and all(0.0 <= r <= 1.0 for r in recall["training"])
    assert len(recall["text_free"]) == 2  # bus without a caption: the EViT fallback selects
    assert result["policies"]["random"]["selector_recall"]["text_free"] is None  # random drops nothing at retrieval
    assert base["speedup_to_target"] == 1.0  # the baseline reaches its own final value
    # the MLM leak: measured for the text-guided policy only
    assert base["mlm_leak"] is None and result["policies"]["random"]["mlm_leak"] is None
    leak = result["policies"]["bus"]["mlm_leak"]
    assert all(0.0 <= leak[w] <= 1.0 for w in ("clean_guided", "masked_guided", "text_free"))
    assert leak["leak"] == pytest.approx(leak["clean_guided"] - leak["masked_guided"], abs=1e-9)
    assert "MLM leak through the selection" in proc.stdout
    pairs = {(c["a"], c["b"], c["path"]) for c in result["comparisons"]}
    for a, b in (("bus", "random"), ("bus", "baseline"), ("random", "baseline")):
        assert {(a, b, "unpruned"), (a, b, "deployed")} <= pairs
    for c in result["comparisons"]:
        lo, hi = c["ci95"]
        assert set(c) >= {"a", "b", "path", "diff", "ci95"} and lo <= c["diff"] <= hi
        assert c["significant"] == (not lo <= 0.0 <= hi)
        assert ("not significant" in proc.stdout) or c["significant"]
    try:
        import matplotlib  # noqa: F401  (the `bench` extra; CI installs only `test`)
    except ImportError:
        assert not png.exists() and "plot skipped: matplotlib not installed" in proc.stderr + proc.stdout
    else:
        assert png.stat().st_size > 0 and f"wrote {png}" in proc.stderr + proc.stdout
    # --out: a checkpoint per variant, loadable as documented, with its tokenizer
    from bus_model import BusModel
    from bus_model.data import load_tokenizer

    model = BusModel.from_pretrained(out / "bus")
    assert model.config.selection.policy == "bus"
    assert len(load_tokenizer(out / "bus" / "tokenizer")) == model.config.text.vocab_size
    # the recorded runs before issue 24 still render
    from pathlib import Path

    old = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "superseded" / "quality_cpu.json"
    if old.exists():
        assert "| policy |" in quality.render(json.loads(old.read_text()))


def test_lower_quartile():
    from bus_benchmarks.quality_train import lower_quartile

    assert lower_quartile([5.0]) == 5.0
    assert lower_quartile([4.0, 1.0, 3.0, 2.0, 5.0]) == 2.0  # position 1 of the sorted values
    assert lower_quartile([1.0, 2.0, 3.0, 4.0]) == pytest.approx(1.75)  # 1 + 0.75 * (2 - 1)
    with pytest.raises(ValueError):
        lower_quartile([])


# ------------------------------------------------------------------------------------ galleries and intervals
def test_gallery_recalls_on_hand_made_embeddings():
    from bus_benchmarks.quality_metrics import gallery_recalls, gallery_summary

    eye = torch.eye(4)
    # gallery 0: perfect; gallery 1: images 2 and 3 swapped -> 0 of 2 both ways
    images = torch.cat([eye[:2], eye[[3, 2]]])
    texts = torch.cat([eye[:2], eye[2:]])
    per = gallery_recalls(images, texts, 2)
    assert per.tolist() == [[1.0, 1.0], [0.0, 0.0]]
    summary = gallery_summary(per)
    assert summary["mean_r1"] == 0.5 and summary["galleries"] == 2
    assert summary["mean_r1_se"] == pytest.approx(math.sqrt(0.5) / math.sqrt(2))  # std of (1, 0) / sqrt(2)
    # one direction only: image 0 matches text 1 better, text 0 still prefers image 0 -> i2t 1/2, t2i 2/2
    images = torch.tensor([[1.0, 0.6], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert gallery_recalls(images, texts, 2).tolist() == [[0.5, 1.0]]
    with pytest.raises(ValueError, match="gallery_size"):
        gallery_recalls(eye, eye, 3)
    with pytest.raises(ValueError, match="shape"):
        gallery_recalls(eye, eye[:3], 1)


def test_paired_bootstrap_interval_covers_zero_only_for_noise():
    import numpy as np

    from bus_benchmarks.quality_metrics import paired_bootstrap_ci

    rng = np.random.default_rng(0)
    shift = 0.05 + 0.01 * rng.standard_normal((3, 8))  # a clear gain in every seed and gallery
    mean, lo, hi = paired_bootstrap_ci(shift, reps=2000)
    assert lo > 0 and lo <= mean <= hi and mean == pytest.approx(shift.mean())
    noise = 0.05 * rng.standard_normal((3, 8))
    _, lo, hi = paired_bootstrap_ci(noise - noise.mean(), reps=2000)
    assert lo < 0 < hi
    assert paired_bootstrap_ci(noise, reps=500) == paired_bootstrap_ci(noise, reps=500)  # reproducible
    with pytest.raises(ValueError, match="diffs"):
        paired_bootstrap_ci(np.zeros(3))


def test_comparison_pairs_and_quality_settings_checks():
    assert quality.comparison_pairs(["baseline", "bus", "random", "evit"]) == [
        ("bus", "random"), ("bus", "baseline"), ("random", "baseline"), ("evit", "baseline"), ("bus", "evit")]
    assert quality.comparison_pairs(["baseline", "random"]) == [("random", "baseline")]
    assert quality.comparison_pairs(["baseline", "bus", "bus-detached", "bus-guided"]) == [
        ("bus", "baseline"), ("bus-detached", "baseline"), ("bus-guided", "baseline"),
        ("bus-detached", "bus"), ("bus-guided", "bus")]  # the ITC choice compared directly with bus
    d = quality.QualitySettings()
    assert d.heldout_pairs >= 2048 and d.gallery_size == 256 and len(d.seeds) >= 3 and d.scene == "cluttered"
    for argv, match in ((["--heldout-pairs", "300"], "multiple"), (["--scene", "busy"], "scene"),
                        (["--policies", "all", "bus"], "all"), (["--scene", "cluttered", "--difficulty", "hard"],
                                                                "difficulty")):
        with pytest.raises(SystemExit, match=match):
            quality.settings_from_args(_args(*argv))


def test_mlm_leak_is_zero_when_the_selection_keeps_everything_and_masks_are_fixed():
    """Keep ratio 1: whatever guides the selection, every patch is kept in position order, so the clean and
    the masked caption give the same memory and the leak is exactly 0; the masks come from mask_seed alone
    (the same accuracies twice) and the caller's RNG is left as it was."""
    from bus_model import BusModel, get_config
    from bus_model.data import SyntheticDataset

    from bus_benchmarks.quality_eval import HeldOut
    from bus_benchmarks.quality_mlm import mlm_accuracies, summarise_leak
    from bus_benchmarks.quality_train import data_kwargs

    tokenizer, text = quality._tokenizer_and_overrides("bus-mini")
    torch.manual_seed(0)
    config = get_config("bus-mini", selection__keep_ratios=[1.0, 1.0], text=text)
    model = BusModel(config)
    held = HeldOut.build(SyntheticDataset(**data_kwargs(config, num_samples=24, seed=3, split="test",
                                                        difficulty="standard")), tokenizer, config)
    state = torch.random.get_rng_state()
    first = mlm_accuracies(model, held, device=torch.device("cpu"), chunk=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = mlm_accuracies(model, held, device=torch.device("cpu"), chunk=8)
    assert set(first) == {"clean_guided", "masked_guided", "text_free"} and first["clean_guided"].shape == (3,)
    for way in first:
        assert torch.equal(first[way], again[way])
    assert torch.equal(first["clean_guided"], first["masked_guided"])
    summary = summarise_leak([first, again], reps=200)
    assert summary["leak"] == 0.0 and summary["ci95"] == [0.0, 0.0] and not summary["significant"]
    baseline = BusModel(get_config("bus-mini-baseline", text=text))
    assert mlm_accuracies(baseline, held, device=torch.device("cpu")) is None
    assert summarise_leak([first, None], reps=10) is None
