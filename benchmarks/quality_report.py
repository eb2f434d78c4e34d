"""The tables and the plot of ``bus bench quality`` (``quality.py`` runs it): the policy table, the paired
comparisons, the MLM leak, the declared verdict, and accuracy against training time."""

from __future__ import annotations

from .harness import markdown_table, save_plot
from .quality_legacy import fmt_recall, render_v1
from .quality_mlm import render_leak


def _fmt_path(summary: dict | None) -> str:
    if not summary:
        return "n/a"
    se = summary.get("mean_r1_se")
    return f"{summary['mean_r1']:.4f}" + (f" ± {se:.4f}" if se is not None else "")


def render(result: dict) -> str:
    if "heldout_pairs" not in result:
        return render_v1(result)
    rows = []
    for name, p in result["policies"].items():
        f, rec = p["final"], p.get("selector_recall") or {}
        rows.append({
            "policy": name, "steps": p["steps"], "step_time_s": p["step_time_s"], "gflops": p["flops_per_sample"] / 1e9,
            "unpruned": _fmt_path(f.get("unpruned")), "deployed": _fmt_path(f.get("deployed")),
            "rerank": _fmt_path(f.get("rerank")), "ttt": p["time_to_target_s"], "speedup": p["speedup_to_target"],
            "recall": fmt_recall(rec.get("training")), "recall_free": fmt_recall(rec.get("text_free")),
            "cider": (p.get("captioning") or {}).get("cider"),
        })
    s = result["settings"]
    table = markdown_table(rows, [
        ("policy", "policy", ""), ("steps", "steps", "d"), ("step_time_s", "step (s)", ".3f"),
        ("gflops", "GFLOPs/sample", ".3f"), ("unpruned", "unpruned R@1 ± se", ""),
        ("deployed", "deployed R@1 ± se", ""), ("rerank", f"ITM re-rank top {s['rerank_k']} R@1 ± se", ""),
        ("ttt", "time to target (s)", ".1f"), ("speedup", "speedup to target", ".2f"),
        ("recall", "selector recall, caption", ""), ("recall_free", "selector recall, no caption", ""),
        ("cider", "CIDEr", ".2f"),
    ])
    comp = [{"cmp": f"{c['a']} - {c['b']}", "path": c["path"], "diff": c["diff"],
             "ci": f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]",
             "per_seed": " / ".join(f"{d:+.4f}" for d in c.get("per_seed", [])),
             "sig": "significant" if c["significant"] else "not significant"} for c in result["comparisons"]]
    comp_table = markdown_table(comp, [("cmp", "comparison", ""), ("path", "path", ""), ("diff", "diff", "+.4f"),
                                       ("ci", "95% interval", ""), ("per_seed", "per seed", ""), ("sig", "", "")])
    v, st = result["verdict"], result.get("scene_statistics") or {}
    skipped = "; ".join(f"{k}: {w}" for k, w in result.get("skipped_policies", {}).items()) or "none"
    oracle = "; ".join(f"{name} {r:.3f}" for name, r in (result.get("oracle_txt2img_r1") or {}).items())
    return (
        f"{table}\n\n{comp_table}\n\n{render_leak(result['policies'])}\n\n"
        f"Verdict path and metric (declared before running): {v['path']} {v['metric']}: {v['why']}. Target = the "
        f"baseline's final value {result['target']['value']:.4f}. R@1 in {result['heldout_pairs'] // result['gallery_size']} "
        f"galleries of {result['gallery_size']} held-out pairs (chance {1 / result['gallery_size']:.4f}), ± standard "
        f"error over galleries; differences paired per seed and gallery, 95% bootstrap interval over seeds and "
        f"galleries ({s['bootstrap_reps']} replicates). Scene {result['scene']} ({result.get('scene_why')}); "
        f"{result['kept_share']:.0%} of the patches kept by the selection variants: random keep loses a mentioned "
        f"object {st.get('lost_mentioned_object', float('nan')):.2f} of the time, salient patches "
        f"{st.get('salient_share', float('nan')):.2f} of the image. Within-gallery ceilings (text->image R@1 of "
        f"ideal rankers knowing only these attributes): {oracle}. Budget {result['budget_s']:g}s of training per "
        f"variant and seed (steps x interleaved step time, lower quartile), seeds {result['seeds']}, batch "
        f"{s['batch_size']}, lr {s['lr']:g}, keep ratios {s.get('keep_ratios') or 'the model default'}, overrides "
        f"{s.get('overrides') or 'none'}. Skipped: {skipped}. "
        f"{result['device']}; torch {result['torch']}; wall {result['wall_s'] / 60:.1f} min; commit {result['commit']}")


def plot(result: dict, path: str | None) -> str | None:
    chance = 1 / result.get("gallery_size", result.get("candidates", 1))
    where = (f"{result['verdict']['path']} path, galleries of {result['gallery_size']}" if "verdict" in result
             else f"{result.get('candidates')} candidates")

    def draw(ax):
        for name, p in result["policies"].items():
            xs = [0.0] + [c["time_s"] for c in p["curve"]]
            ys = [chance] + [c["mean_r1"] for c in p["curve"]]
            ax.plot(xs, ys, marker="o", markersize=3, label=name, linestyle="--" if name == "baseline" else "-")
        ax.axhline(result["target"]["value"], color="gray", linewidth=0.8, linestyle=":", label="target")
        ax.set_xlabel("training time (s): steps x interleaved step time (lower quartile)")
        ax.set_ylabel(f"held-out mean R@1 ({where})")
        ax.set_title(f"{result['model']}: accuracy vs training time\n{result['device']}", fontsize=8)
        ax.legend(fontsize=7)

    return save_plot(path, draw)
