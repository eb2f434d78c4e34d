"""``bus bench quality``: accuracy against training time for every selection policy, on held-out synthetic data.

BUS claims ~1.5x faster training at comparable accuracy. This benchmark trains, from the same initial
seed on the same data stream, every variant the model offers: the ``-baseline`` twin, each selection
policy of ``bus_model.selection.POLICY_INFO`` on the model at its keep schedule (bus, elip, evit,
random = FLIP masking, tome = token merging, and any policy added later), and ``bus-noptm`` (BUS
without the PTM loss), each for the same training-time budget. It then reports, per variant, held-out
retrieval (R@1/5/10 both ways, ITC ranking then ITM re-ranking, as ``bus eval``), captioning CIDEr,
the selector recall of each selection layer (share of the caption-relevant patches, from the exact
synthetic patch labels, still present after it), the accuracy-vs-time curve, the time to reach the
baseline's final mean R@1 and the speedup to it, step time and FLOPs per sample; mean and spread
over seeds.

How time is measured: on a shared, noisy machine a wall clock during training would measure the other
processes. So each variant's step time is measured first, with all variants' steps interleaved round
by round (rotated order, as ``bus bench train`` alternates its pair), and its lower quartile taken
(other processes only add time, in bursts; see ``quality_train.measure_step_times``); a variant
then gets ``budget_s / step_time`` optimizer steps, and "training time" is steps x step time. Each
variant's learning-rate schedule (warm-up, cosine) spans its own step budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .command import run_standalone
from .harness import default_device, environment, markdown_table, parse_overrides, publish, save_plot
from .quality_metrics import mean_and_spread, mean_curve, speedup_to_target, time_to_target
from .quality_oracle import oracle_txt2img_r1
from .quality_train import (
    BASELINE,
    Trainer,
    TrainStream,
    build_model,
    check_spec,
    data_kwargs,
    eval_steps,
    evaluate_model,
    headline,
    measure_step_times,
    policy_specs,
    selector_recalls,
)

FINAL_KEYS = ("img2txt_r1", "txt2img_r1", "mean_r1", "img2txt_r5", "txt2img_r5", "img2txt_r10", "txt2img_r10",
              "itc_mean_r1", "rerank_img2txt_r1", "rerank_txt2img_r1", "rerank_mean_r1", "cider", "bleu4")


@dataclass
class QualitySettings:
    model: str = "bus-mini"
    policies: list[str] | None = None  # None: every variant the model offers
    budget_s: float = 60.0  # training time per variant and seed (steps x measured step time)
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    batch_size: int = 32
    lr: float = 1e-3
    warmup_share: float = 0.1  # linear warm-up over this share of a variant's steps
    weight_decay: float = 0.02
    candidates: int = 256  # held-out images (one caption each) ranked by every evaluation
    rerank_k: int = 0  # curve and target: ITM re-ranks this many ITC candidates (0: ITC ranking only)
    final_rerank_k: int = 8  # the final evaluation also re-ranks this many by ITM (bus eval: --rerank-k)
    evals: int = 3  # held-out evaluations per run (the curve); time-to-target resolution is budget_s / evals
    difficulty: str = "standard"  # synthetic task (bus_model.data.synthetic.DIFFICULTIES)
    data_seed: int = 0  # seed of the held-out split (test); training seed s reads the train split of seed s
    timing_warmup: int = 2
    timing_steps: int = 12
    min_steps: int = 2
    amp: bool | None = None  # bf16 autocast; None: on for CUDA only
    out: str | None = None  # keep each variant's final model (seed = seeds[0]) at out/NAME
    overrides: dict = field(default_factory=dict)  # flat section__field config changes for every variant (--override)

    @classmethod
    def quick(cls) -> "QualitySettings":
        """Seconds on a CPU, for the test suite: tiny batches, a few steps, 16 candidates."""
        return cls(budget_s=0.5, seeds=[0], batch_size=4, candidates=16, final_rerank_k=2, evals=2,
                   timing_warmup=1, timing_steps=1, min_steps=2)


def _tokenizer_and_overrides(model: str):
    from bus_model import get_config
    from bus_model.data import build_synthetic_tokenizer
    from bus_model.data.tokenizer import text_config_overrides

    tokenizer = build_synthetic_tokenizer(model_max_length=get_config(model).max_text_len)
    return tokenizer, text_config_overrides(tokenizer)


def select_specs(settings: QualitySettings, text_overrides: dict):
    """(variants to train, {name: why skipped}); unknown names in ``settings.policies`` raise SystemExit."""
    specs = policy_specs(settings.model)
    for spec in specs.values():  # a variant's own keys (its policy, bus-noptm's ptm) win
        spec.overrides = {**settings.overrides, **spec.overrides}
    wanted = settings.policies or list(specs)
    unknown = [p for p in wanted if p not in specs]
    if unknown:
        raise SystemExit(f"error: --policies: unknown {unknown}; {settings.model} offers {list(specs)}")
    if BASELINE not in wanted:
        wanted = [BASELINE] + wanted  # the target is the baseline's final accuracy
    chosen, skipped = {}, {}
    for name in wanted:
        why = check_spec(specs[name], text_overrides)
        if why is None:
            chosen[name] = specs[name]
        else:
            skipped[name] = why
    if BASELINE in skipped:
        raise SystemExit(f"error: the baseline {specs[BASELINE].config} does not build: {skipped[BASELINE]}")
    return chosen, skipped


def _final_eval(model, held_out, tokenizer, settings, device, amp) -> dict:
    """Retrieval + captioning + selector recall; for text-guided policies also the ITC retrieval with the
    other text-free mode (prune nothing), which measures the train/eval mismatch (README)."""
    from bus_model.selection import POLICY_INFO

    k = max(settings.rerank_k, settings.final_rerank_k)
    full = evaluate_model(model, held_out, tokenizer, device=device, rerank_k=k, captions=True, amp=amp)
    metrics = {**headline(full, settings.rerank_k > 0), "itc_mean_r1": full["itc_mean_r1"],
               "rerank_img2txt_r1": full["rerank_img2txt_r1"], "rerank_txt2img_r1": full["rerank_txt2img_r1"],
               "rerank_mean_r1": full["rerank_mean_r1"], "rerank_k": k, "cider": full["cider"],
               "bleu4": full["bleu4"]}
    metrics["selector_recall"] = selector_recalls(model, held_out, tokenizer, device=device)
    sel = model.config.selection
    if sel.policy in POLICY_INFO and POLICY_INFO[sel.policy].uses_text:
        original = model.vision.selection
        other = "none" if original.text_free in ("auto", "evit") and POLICY_INFO[sel.policy].text_free == "evit" else "evit"
        model.vision.selection = dataclasses.replace(original, text_free=other)
        try:
            alt = evaluate_model(model, held_out, tokenizer, device=device, rerank_k=0, captions=False, amp=amp)
        finally:
            model.vision.selection = original
        metrics["text_free_alternative"] = {"text_free": other, "itc_mean_r1": alt["itc_mean_r1"]}
    return metrics


def train_variant(spec, seed: int, steps: int, step_time: float, settings: QualitySettings, text_overrides: dict,
                  stream: TrainStream, held_out, tokenizer, device, amp, log=print) -> dict:
    """One variant, one seed: ``steps`` optimizer steps with held-out evaluations along the way."""
    model = build_model(spec, text_overrides, seed, device)
    trainer = Trainer(model, lr=settings.lr, weight_decay=settings.weight_decay, total_steps=steps,
                      warmup_steps=round(settings.warmup_share * steps), amp=amp, device=device)
    points = eval_steps(steps, settings.evals)
    curve, final, losses = [], None, []
    for step in range(1, steps + 1):
        losses.append(trainer.step(stream[step - 1]))
        if step in points:
            last = step == steps
            if last:
                metrics = _final_eval(model, held_out, tokenizer, settings, device, amp)
                final = metrics
            else:
                full = evaluate_model(model, held_out, tokenizer, device=device, rerank_k=settings.rerank_k,
                                      captions=False, amp=amp)
                metrics = {**headline(full, settings.rerank_k > 0), "itc_mean_r1": full["itc_mean_r1"]}
            curve.append({"time_s": step * step_time, "step": step, "mean_r1": metrics["mean_r1"],
                          "itc_mean_r1": metrics["itc_mean_r1"]})
            log(f"{spec.name} seed {seed}: step {step}/{steps} ({step * step_time:.1f}s of training) "
                f"mean R@1 {metrics['mean_r1']:.3f} (ITC only {metrics['itc_mean_r1']:.3f}), "
                f"loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
    return {"model": model, "final": final, "curve": curve, "last_loss": losses[-1]}


def _save(model, tokenizer, directory: Path) -> None:
    from bus_model.data import save_tokenizer

    model.save_pretrained(directory)
    save_tokenizer(tokenizer, directory / "tokenizer")  # bus eval --checkpoint DIR finds it there


def run(settings: QualitySettings, device: torch.device | None = None, log=print) -> dict:
    from bus_model.data import SyntheticDataset

    start = time.perf_counter()
    device = device or default_device()
    amp = device.type == "cuda" if settings.amp is None else settings.amp
    tokenizer, text_overrides = _tokenizer_and_overrides(settings.model)
    specs, skipped = select_specs(settings, text_overrides)
    for name, why in skipped.items():
        log(f"skipping {name}: {why}")
    from bus_model import get_config

    config = get_config(specs[BASELINE].config, text=text_overrides)
    held_kwargs = data_kwargs(config, num_samples=settings.candidates, seed=settings.data_seed, split="test",
                              difficulty=settings.difficulty)
    held_out = SyntheticDataset(held_kwargs["num_samples"], **{k: v for k, v in held_kwargs.items() if k != "num_samples"})
    oracle = oracle_txt2img_r1([held_out.sample(i) for i in range(len(held_out))])

    log(f"measuring step times of {list(specs)} (interleaved)")
    timing = measure_step_times(specs, text_overrides, TrainStream(config, tokenizer, settings.batch_size, 0,
                                settings.difficulty, device), lr=settings.lr, warmup=settings.timing_warmup,
                                steps=settings.timing_steps, amp=amp, device=device, log=log)
    steps = {n: max(settings.min_steps, int(settings.budget_s / timing[n]["step_time_s"])) for n in specs}

    runs: dict[str, dict[int, dict]] = {n: {} for n in specs}
    for seed in settings.seeds:
        stream = TrainStream(config, tokenizer, settings.batch_size, seed, settings.difficulty, device)
        for name, spec in specs.items():
            r = train_variant(spec, seed, steps[name], timing[name]["step_time_s"], settings, text_overrides, stream,
                              held_out, tokenizer, device, amp, log)
            if settings.out and seed == settings.seeds[0]:
                _save(r["model"], tokenizer, Path(settings.out) / name)
            del r["model"]
            runs[name][seed] = r

    base_final, _ = mean_and_spread([runs[BASELINE][s]["final"]["mean_r1"] for s in settings.seeds])
    policies = {}
    for name, spec in specs.items():
        per_seed = runs[name]
        finals = [per_seed[s]["final"] for s in settings.seeds]
        final, final_std = {}, {}
        for key in FINAL_KEYS:
            final[key], final_std[key] = mean_and_spread([f.get(key) for f in finals])
        recalls = [f["selector_recall"] for f in finals]
        final["selector_recall"] = None if recalls[0] is None else [
            mean_and_spread([r[k] for r in recalls])[0] for k in range(len(recalls[0]))]
        alts = [f.get("text_free_alternative") for f in finals]
        if alts[0] is not None:  # the train/eval mismatch: retrieval with the other text-free mode
            final["text_free_alternative"] = {"text_free": alts[0]["text_free"],
                                              "itc_mean_r1": mean_and_spread([a["itc_mean_r1"] for a in alts])[0]}
        curve = mean_curve([per_seed[s]["curve"] for s in settings.seeds])
        policies[name] = {
            "config": spec.config, "overrides": spec.overrides, "summary": spec.summary,
            "final": final, "final_std": final_std, "curve": curve,
            "time_to_target_s": time_to_target(curve, base_final),
            "step_time_s": timing[name]["step_time_s"], "step_times_s": timing[name]["step_times_s"],
            "flops_per_sample": timing[name]["flops_per_sample"], "steps": steps[name],
            "seeds": {str(s): {"final": per_seed[s]["final"], "curve": per_seed[s]["curve"],
                               "time_to_target_s": time_to_target(per_seed[s]["curve"], base_final),
                               "last_loss": per_seed[s]["last_loss"]} for s in settings.seeds},
        }
    base_time = policies[BASELINE]["time_to_target_s"]
    for p in policies.values():
        p["speedup_to_target"] = speedup_to_target(base_time, p["time_to_target_s"])
    env = environment(device)
    return {
        "benchmark": "quality", "model": settings.model, "candidates": settings.candidates,
        "budget_s": settings.budget_s, "device": env["device"], "commit": env["commit"], "data": held_kwargs,
        "target": {"metric": "mean_r1", "value": base_final,
                   "definition": "the baseline's final held-out mean R@1 (img->txt and txt->img averaged, after "
                                 "ITM re-ranking), mean over seeds"},
        "policies": policies, "skipped_policies": skipped,
        "oracle_txt2img_r1": oracle,  # what R@1 each level of attribute knowledge allows (quality_oracle.py)
        "time_measurement": "training time = optimizer steps x the variant's step time (lower quartile of "
                            f"{settings.timing_steps} rounds), measured before training with every variant's steps "
                            "interleaved round by round (rotated order); each variant trains budget_s / step time "
                            "steps",
        "settings": {**asdict(settings), "amp": amp}, "wall_s": time.perf_counter() - start,
        **{k: v for k, v in env.items() if k not in ("device", "commit")},
    }


def _fmt_recall(recall) -> str:
    return "n/a" if recall is None else " / ".join(f"{r:.2f}" if r is not None else "n/a" for r in recall)


def render(result: dict) -> str:
    rows = []
    for name, p in result["policies"].items():
        f, sd = p["final"], p["final_std"]
        spread = f" ± {sd['mean_r1']:.3f}" if sd.get("mean_r1") is not None else ""
        rows.append({
            "policy": name, "steps": p["steps"], "step_time_s": p["step_time_s"],
            "gflops": p["flops_per_sample"] / 1e9, "mean_r1": f"{f['mean_r1']:.3f}{spread}",
            "img2txt_r1": f["img2txt_r1"], "txt2img_r1": f["txt2img_r1"], "rerank_mean_r1": f.get("rerank_mean_r1"),
            "cider": f.get("cider"), "ttt": p["time_to_target_s"], "speedup": p["speedup_to_target"],
            "recall": _fmt_recall(f.get("selector_recall")),
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


def plot(result: dict, path: str | None) -> str | None:
    def draw(ax):
        for name, p in result["policies"].items():
            xs = [0.0] + [c["time_s"] for c in p["curve"]]
            ys = [1 / result["candidates"]] + [c["mean_r1"] for c in p["curve"]]
            ax.plot(xs, ys, marker="o", markersize=3, label=name, linestyle="--" if name == "baseline" else "-")
        ax.axhline(result["target"]["value"], color="gray", linewidth=0.8, linestyle=":", label="target")
        ax.set_xlabel("training time (s): steps x interleaved step time (lower quartile)")
        ax.set_ylabel(f"held-out mean R@1 ({result['candidates']} candidates)")
        ax.set_title(f"{result['model']}: accuracy vs training time\n{result['device']}", fontsize=8)
        ax.legend(fontsize=7)

    return save_plot(path, draw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = QualitySettings()
    parser.add_argument("--model", default=d.model, help=f"a BUS config with a -baseline twin (default {d.model})")
    parser.add_argument("--policies", nargs="+", default=None, help="variants to train (default: every one the "
                        "model offers: baseline, each selection policy, bus-noptm)")
    parser.add_argument("--budget-s", type=float, default=d.budget_s, help="training seconds per variant and seed "
                        f"(steps x measured step time; default {d.budget_s:g})")
    parser.add_argument("--seeds", type=int, nargs="+", default=d.seeds, help="initial seeds (default 0 1)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    parser.add_argument("--candidates", type=int, default=d.candidates, help="held-out images ranked (>= 256 for "
                        "the recorded runs)")
    parser.add_argument("--rerank-k", type=int, default=d.rerank_k, help="curve and target: ITM re-ranks the top K "
                        f"ITC candidates (default {d.rerank_k}: ITC ranking only)")
    parser.add_argument("--final-rerank-k", type=int, default=d.final_rerank_k, help="the final evaluation also "
                        f"reports R@1 after ITM re-ranking of the top K (default {d.final_rerank_k})")
    parser.add_argument("--evals", type=int, default=d.evals, help="held-out evaluations per run (the curve)")
    parser.add_argument("--difficulty", default=d.difficulty, help="synthetic task: easy, standard or hard")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: GPU only)")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION__FIELD=JSON",
                        help="set a config field of every variant, e.g. vision__initializer_range=0.02 (repeatable; "
                        "not selection__policy, which names the variants)")
    parser.add_argument("--quick", action="store_true", help="seconds: tiny batches, a few steps, 16 candidates")
    parser.add_argument("--json", help="write the result as JSON here")
    parser.add_argument("--plot", help="write a PNG of mean R@1 against training time here")
    parser.add_argument("--out", help="keep each variant's final model (first seed) at OUT/NAME")


def settings_from_args(args) -> QualitySettings:
    if args.quick:
        settings = QualitySettings.quick()
        settings.model, settings.policies = args.model, args.policies
    else:
        settings = QualitySettings(model=args.model, policies=args.policies, budget_s=args.budget_s,
                                   seeds=list(args.seeds), batch_size=args.batch_size, lr=args.lr,
                                   candidates=args.candidates, rerank_k=args.rerank_k,
                                   final_rerank_k=args.final_rerank_k, evals=args.evals,
                                   difficulty=args.difficulty)
    settings.amp, settings.out = args.amp, args.out
    settings.overrides = parse_overrides(getattr(args, "override", []), "bus bench quality")
    if "selection__policy" in settings.overrides:
        raise SystemExit("bus bench quality: error: --override selection__policy: the variants set the policy; "
                         "choose them with --policies")
    if settings.budget_s <= 0:
        raise SystemExit("error: --budget-s must be > 0")
    for name in ("batch_size", "candidates", "evals"):
        if getattr(settings, name) < (2 if name != "evals" else 1):
            raise SystemExit(f"error: --{name.replace('_', '-')} is too small: {getattr(settings, name)}")
    if min(settings.rerank_k, settings.final_rerank_k) < 0 or not settings.seeds or len(set(settings.seeds)) != len(settings.seeds):
        raise SystemExit("error: --rerank-k must be >= 0 and --seeds distinct")
    from bus_model.data.synthetic import DIFFICULTIES

    if settings.difficulty not in DIFFICULTIES:
        raise SystemExit(f"error: --difficulty must be one of {sorted(DIFFICULTIES)}")
    return settings


def main_from_args(args) -> int:
    from bus_model import list_models

    settings = settings_from_args(args)
    if settings.model not in list_models() or f"{settings.model}-baseline" not in list_models():
        raise SystemExit(f"error: --model must be a BUS config with a -baseline twin, one of "
                         f"{[m for m in list_models() if f'{m}-baseline' in list_models()]}, got {settings.model!r}")
    result = run(settings, log=lambda msg: print(msg, file=sys.stderr))
    return publish(result, render(result), args.json, plot(result, args.plot))


def main(argv: list[str] | None = None) -> int:
    """``python -m bus_benchmarks.quality`` = ``bus bench quality``."""
    return run_standalone("quality", __doc__, add_arguments, main_from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
