"""End to end on CPU: ``bus train`` on synthetic data lowers the loss, ``bus eval`` retrieves well above chance.

The threshold, and why it cannot pass by luck: ``bus eval`` ranks 128 held-out captions for each of
128 held-out images (and the reverse). For a model that knows nothing, the rank of the correct
candidate is uniform on 1..128: mean 64.5, standard deviation sqrt((128^2 - 1) / 12) = 36.9, so the
mean over 128 queries has standard deviation 36.9 / sqrt(128) = 3.27. The test requires a mean rank
of at most 48 in BOTH directions: 5 standard deviations below chance each (one-sided p < 3e-7 per
direction), plus R@10 averaged over the two directions of at least 1.5x chance (15 hits of 128 where
chance expects 10). Measured on a 2-core CPU: mean ranks about 40-42 after 200-250 steps.
"""

from __future__ import annotations

import json
import math

from bus_model.training import cli

STEPS = 220
CANDIDATES = 128
CHANCE_MEAN_RANK = (CANDIDATES + 1) / 2
CHANCE_SD_OF_MEAN = math.sqrt((CANDIDATES**2 - 1) / 12) / math.sqrt(CANDIDATES)
MAX_MEAN_RANK = CHANCE_MEAN_RANK - 5 * CHANCE_SD_OF_MEAN  # 48.1


def test_train_lowers_loss_and_retrieval_beats_chance(tmp_path):
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", "bus-tiny", "--data", "synthetic", "--out", str(out), "--steps", str(STEPS),
                   "--batch-size", "16", "--lr", "1e-3", "--train-samples", "4000", "--log-every", "10",
                   "--save-every", str(STEPS), "--num-threads", "1", "--no-progress"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(10, STEPS + 1, 10))
    first, last = rows[0], rows[-1]
    for key in ("step", "loss", "loss_itc", "loss_itm", "loss_mlm", "loss_prefix_lm", "loss_ptm", "lr", "images_per_s"):
        assert key in last
    assert last["loss"] < 0.7 * first["loss"]
    for term in ("loss_itc", "loss_mlm", "loss_prefix_lm", "loss_ptm"):
        assert last[term] < first[term], term

    report = tmp_path / "eval.json"
    assert cli.main(["eval", "--checkpoint", str(out), "--data", "synthetic", "--num-samples", str(CANDIDATES),
                     "--json", str(report), "--num-threads", "1"]) == 0
    m = json.loads(report.read_text())
    assert m["num_images"] == m["num_texts"] == CANDIDATES
    for direction in ("img2txt", "txt2img"):
        assert m[f"itc_{direction}_meanr"] <= MAX_MEAN_RANK, (direction, m[f"itc_{direction}_meanr"])
        for k in (1, 5, 10):
            assert 0.0 <= m[f"{direction}_r{k}"] <= 1.0
    mean_r10 = (m["itc_img2txt_r10"] + m["itc_txt2img_r10"]) / 2
    assert mean_r10 >= 1.5 * 10 / CANDIDATES, mean_r10
    assert 0.0 <= m["bleu4"] <= 1.0 and m["cider"] >= 0.0
