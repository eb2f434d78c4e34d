"""``bus bench patch`` (benchmarks/patch_effect.py): one table per model family, tokens as documented,
fewer FLOPs when patched, timings present; the README renderer reads the JSON it writes."""

import json

import pytest

pytest.importorskip("timm")
pytest.importorskip("open_clip")
pytest.importorskip("transformers")
patch_effect = pytest.importorskip("bus_benchmarks.patch_effect")

from _patch_planted import schedule  # noqa: E402


@pytest.mark.slow
def test_patch_effect_quick_all_families(tmp_path):
    out = tmp_path / "patch.json"
    assert patch_effect.main(["--quick", "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"device", "torch", "commit", "config", "rows", "versions"} <= result.keys()
    assert result["benchmark"] == "patch" and result["config"]["families"] == ["timm", "open_clip", "hf_clip", "siglip"]
    rows = {(row["family"], row["variant"]): row for row in result["rows"]}
    assert len(rows) == 8
    for family, prefix in (("timm", 1), ("open_clip", 1), ("hf_clip", 1), ("siglip", 0)):
        base, pruned = rows[family, "unpatched"], rows[family, "patched"]
        assert base["tokens_per_layer"] == [prefix + 16] * 12  # 64 px: 4 x 4 patches of 16
        assert pruned["tokens_per_layer"] == schedule(16, prefix, 12, [3, 6, 9], 0.7)
        assert 0 < pruned["gflops_train_step_per_image"] < base["gflops_train_step_per_image"]
        assert pruned["gflops_train_step_per_image_ratio"] < 0.85
        for key in ("forward_ms", "forward_cpu_ms", "train_step_ms", "train_step_cpu_ms"):
            assert base[key] > 0 and pruned[key] > 0 and pruned[key + "_ratio"] > 0
    # the same ViT shape in every family with a [CLS]: one FLOP count
    flops = {rows[f, "unpatched"]["gflops_train_step_per_image"] for f in ("timm", "open_clip", "hf_clip")}
    assert max(flops) / min(flops) < 1.01
    text = patch_effect.render(result)
    for name in ("**timm**", "**open_clip**", "**hf_clip**", "**siglip**", "train-step FLOPs"):
        assert name in text
