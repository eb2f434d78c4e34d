"""Retrieval and captioning metrics of ``bus eval`` against brute-force references."""

from __future__ import annotations

import pytest
import torch

from bus_model.training.evaluate import caption_scores, first_positive_rank, recall_at_k, rerank_top_k


def _reference_ranks(sim: torch.Tensor, positives: list[list[int]]) -> list[int]:
    """Plain loops: 1 + the number of candidates placed before the best correct one (ties broken
    towards the lower index, as the stable sort does)."""
    ranks = []
    for q, pos in enumerate(positives):
        ranks.append(1 + min(sum(1 for c in range(sim.shape[1]) if sim[q, c] > sim[q, p] or (sim[q, c] == sim[q, p] and c < p))
                             for p in pos))
    return ranks


def _reference_recall(sim: torch.Tensor, positives: list[list[int]], k: int) -> float:
    return sum(r <= k for r in _reference_ranks(sim, positives)) / len(positives)


@pytest.mark.parametrize("queries, candidates, seed", [(7, 13, 0), (11, 5, 1), (1, 9, 2)])
def test_recall_at_k_matches_reference(queries, candidates, seed):
    g = torch.Generator().manual_seed(seed)
    sim = torch.randn(queries, candidates, generator=g, dtype=torch.float64)
    sim[0, 1] = sim[0, 2]  # a tie
    positives = [torch.randperm(candidates, generator=g)[: 1 + q % 3].tolist() for q in range(queries)]
    ranking = sim.argsort(dim=1, descending=True, stable=True)
    got = recall_at_k(ranking, positives, ks=(1, 2, 5, 10))
    for k in (1, 2, 5, 10):
        assert got[k] == pytest.approx(_reference_recall(sim, positives, k))
    assert first_positive_rank(ranking, positives).tolist() == _reference_ranks(sim, positives)


def test_recall_at_k_bad_input():
    with pytest.raises(ValueError, match="ranking must be"):
        recall_at_k(torch.zeros(3, 4, dtype=torch.long), [[0], [1]])
    with pytest.raises(ValueError, match="at least one correct"):
        recall_at_k(torch.arange(4).repeat(2, 1), [[0], []])
    with pytest.raises(ValueError, match="ranking must be"):
        first_positive_rank(torch.arange(4), [[0]])


def test_rerank_reorders_only_the_top_k():
    g = torch.Generator().manual_seed(3)
    sim = torch.randn(6, 11, generator=g)
    oracle = torch.randn(6, 11, generator=g)  # the "ITM" scores of every pair
    calls = []

    def scores(q, c):
        calls.append(q.numel())
        return oracle[q, c]

    ranking = rerank_top_k(sim, 4, scores)
    itc_order = sim.argsort(dim=1, descending=True, stable=True)
    assert calls == [6 * 4]  # one batched call, k pairs per query
    for q in range(6):
        top = itc_order[q, :4]
        expected_top = top[oracle[q, top].argsort(descending=True, stable=True)]
        assert ranking[q, :4].tolist() == expected_top.tolist()
        assert ranking[q, 4:].tolist() == itc_order[q, 4:].tolist()
        assert sorted(ranking[q].tolist()) == list(range(11))  # still a permutation


def test_rerank_k_zero_and_k_above_candidates():
    sim = torch.tensor([[0.1, 0.9, 0.5]])
    assert rerank_top_k(sim, 0, None).tolist() == [[1, 2, 0]]
    flipped = rerank_top_k(sim, 10, lambda q, c: -sim[q, c])
    assert flipped.tolist() == [[0, 2, 1]]


def test_caption_scores_rank_good_above_bad():
    pytest.importorskip("pycocoevalcap")
    refs = [["a small red circle left of a large blue square"], ["a medium green cross above a small white diamond"],
            ["there is a large cyan triangle below a small orange circle"]]
    perfect = caption_scores(refs, [r[0] for r in refs])
    close = caption_scores(refs, ["A small red circle left of a large BLUE square.", "a medium green cross above",
                                  "a large cyan triangle below a small orange circle"])
    wrong = caption_scores(refs, ["purple", "yellow yellow", "an image"])
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["bleu4"] >= close["bleu4"] > wrong["bleu4"]
    assert perfect["cider"] > close["cider"] > wrong["cider"]
    # case and punctuation do not matter: the first hypothesis tokenises to the reference exactly
    assert caption_scores(refs[:1], ["A small red circle left of a large BLUE square."])["bleu4"] == pytest.approx(1.0, abs=1e-6)


def test_caption_scores_bad_input():
    pytest.importorskip("pycocoevalcap")
    with pytest.raises(ValueError, match="one hypothesis per image"):
        caption_scores([["a b"]], ["a", "b"])


def test_eval_groups_captions_of_one_image_and_reports_skips(tmp_path):
    """A manifest with 2 captions per image and one missing image: 3 images, 6 texts, 1 skipped;
    every image's recall counts either of its captions."""
    import argparse
    import json

    from PIL import Image

    from bus_model.training import checkpoint as ckpt
    from bus_model import create_model
    from bus_model.data import build_synthetic_tokenizer, render_sample
    from bus_model.training.evaluate import add_eval_arguments, evaluate
    from bus_model.training.model_setup import tokenizer_overrides

    tok = build_synthetic_tokenizer(16)
    torch.manual_seed(0)
    model = create_model("bus-tiny", **tokenizer_overrides(tok))
    run = tmp_path / "ck"
    model.save_pretrained(run)
    tok.save_pretrained(str(run / ckpt.TOKENIZER_DIR))
    rows = []
    for i in range(3):
        s = render_sample(0, i, image_size=64, patch_size=8)
        Image.fromarray(s.image).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": [s.caption, s.caption.replace("a ", "one ", 1)]})
    rows.append({"image": "gone.png", "caption": "a small red circle left of a large blue square"})
    manifest = tmp_path / "val.json"
    manifest.write_text(json.dumps(rows))
    parser = add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--checkpoint", str(run), "--data", str(manifest), "--num-threads", "1",
                              "--rerank-k", "2", "--batch-size", "4", "--json", str(tmp_path / "m.json"),
                              "--amp"])  # bf16 autocast on CPU (the e2e test covers fp32)
    m = evaluate(args)
    assert (m["num_images"], m["num_texts"]) == (3, 6)
    assert m["skipped"] == {"missing": 1}
    assert m["img2txt_r5"] == 1.0 and m["txt2img_r5"] == 1.0  # 5 >= the number of candidates (3 / 6)
    assert 1.0 <= m["txt2img_meanr"] <= 3.0 and 1.0 <= m["img2txt_meanr"] <= 5.0
    assert json.loads((tmp_path / "m.json").read_text())["num_texts"] == 6
