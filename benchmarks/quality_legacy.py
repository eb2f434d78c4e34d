"""The table of ``bus bench quality`` results recorded before issue 24 (``quality_cpu*.json``: one set of 256
candidates, bus ranked on its EViT fallback, no named paths), so ``readme_results`` still renders them."""

from __future__ import annotations

from .harness import markdown_table


def fmt_recall(recall) -> str:
    return "n/a" if recall is None else " / ".join(f"{r:.2f}" if r is not None else "n/a" for r in recall)


def render_v1(result: dict) -> str:
    """The table of the recorded runs before issue 24 (one 256-candidate set, no paths)."""
    rows = []
    for name, p in result["policies"].items():
        f, sd = p["final"], p["final_std"]
        spread = f" ± {sd['mean_r1']:.3f}" if sd.get("mean_r1") is not None else ""
        rows.append({
            "policy": name, "steps": p["steps"], "step_time_s": p["step_time_s"],
            "gflops": p["flops_per_sample"] / 1e9, "mean_r1": f"{f['mean_r1']:.3f}{spread}",
            "img2txt_r1": f["img2txt_r1"], "txt2img_r1": f["txt2img_r1"], "rerank_mean_r1": f.get("rerank_mean_r1"),
            "cider": f.get("cider"), "ttt": p["time_to_target_s"], "speedup": p["speedup_to_target"],
            "recall": fmt_recall(f.get("selector_recall")),
        })
    table = markdown_table(rows, [
        ("policy", "policy", ""), ("steps", "steps", "d"), ("step_time_s", "step (s)", ".3f"),
        ("gflops", "GFLOPs/sample", ".3f"), ("mean_r1", "mean R@1", ""), ("img2txt_r1", "i->t R@1", ".3f"),
        ("txt2img_r1", "t->i R@1", ".3f"),
        ("rerank_mean_r1", f"mean R@1, ITM re-rank top {result['settings']['final_rerank_k']}", ".3f"),
        ("cider", "CIDEr", ".2f"),
        ("ttt", "time to target (s)", ".1f"), ("speedup", "speedup to target", ".2f"),
        ("recall", "selector recall per layer", ""),
    ])
    mismatch = [f"{name}: {p['final']['itc_mean_r1']:.3f} as deployed vs {alt['itc_mean_r1']:.3f} with "
                f"text_free={alt['text_free']}" for name, p in result["policies"].items()
                if (alt := p["final"].get("text_free_alternative"))]
    if mismatch:
        table += ("\n\ntrain/eval mismatch (ITC-only mean R@1 of text-free retrieval, the image encoded without a "
                  "caption): " + "; ".join(mismatch))
    if oracle := result.get("oracle_txt2img_r1"):
        table += ("\n\nceilings on this held-out set (text->image R@1 of ideal rankers that know only these "
                  "attributes of each object, ties broken at random): "
                  + "; ".join(f"{name} {r:.3f}" for name, r in oracle.items()))
    s = result["settings"]
    target = result["target"]["value"]
    ranking = f"ITC ranking + ITM re-rank of the top {s['rerank_k']}" if s["rerank_k"] else "ITC ranking"
    skipped = "; ".join(f"{k}: {v}" for k, v in result.get("skipped_policies", {}).items()) or "none"
    return (f"{table}\n\ntarget = baseline final mean R@1 {target:.3f} over {result['candidates']} held-out candidates "
            f"(chance {1 / result['candidates']:.4f}); {ranking} for the curve and the target; budget "
            f"{result['budget_s']:g}s of training per variant (steps x interleaved step time, lower quartile), seeds "
            f"{s['seeds']}, batch {s['batch_size']}, lr {s['lr']:g}, difficulty {s['difficulty']}, overrides "
            f"{s.get('overrides') or 'none'}; mean R@1 ± sample "
            f"std over seeds; time to target null = never reached. Skipped: {skipped}. {result['device']}; torch "
            f"{result['torch']}; wall {result['wall_s'] / 60:.1f} min; commit {result['commit']}")
