"""``bus bench quality``: accuracy against training time for every selection policy, on held-out synthetic data.

BUS claims ~1.5x faster training at comparable accuracy. This benchmark trains, from the same initial
seed on the same data stream, the variants the model offers: the ``-baseline`` twin, each selection
policy of ``bus_model.selection.POLICY_INFO`` on the model at one keep schedule (bus, elip, evit, random =
FLIP masking, tome = token merging, and any policy added later), ``bus-noptm`` (BUS without the PTM loss)
and BUS with each ITC image embedding other than the default (``losses.itc_image``: ``bus-guided``,
``bus-detached``),
each for the same training-time budget. The default run trains baseline, bus and random
(``--policies all``: every variant).

What it reports (issue 24), on the same weights for every policy:

* held-out retrieval on named paths (``quality_eval``): ``unpruned`` (every patch, no caption),
  ``deployed`` (what the policy does without a caption at retrieval time) and ``rerank`` (ITM re-ranks the
  deployed ITC top k; its pass lets the caption guide the selection);
* in galleries: ``heldout_pairs`` pairs ranked in galleries of ``gallery_size``; R@1 (image->text and
  text->image averaged) is the mean over galleries, its standard error comes from them;
* paired differences per seed (bus - random, bus - baseline, each policy - baseline) with a 95% bootstrap
  interval over seeds and galleries; "not significant" where it covers 0;
* the declared verdict path and metric (``VERDICT``), fixed before any run: the curve, the target (the
  baseline's final value) and time-to-target use it;
* the selector recall of the caption-relevant patches on the training path (the caption guides) and on
  the caption-free path that retrieval uses; FLOPs per sample and step time.

How time is measured: on a shared, noisy machine a wall clock during training would measure the other
processes. So each variant's step time is measured first, with all variants' steps interleaved round
by round (rotated order, as ``bus bench train`` alternates its pair), and its lower quartile taken
(other processes only add time, in bursts; see ``quality_train.measure_step_times``); a variant
then gets ``budget_s / step_time`` optimizer steps, and "training time" is steps x step time. Each
variant's learning-rate schedule (warm-up, cosine) spans its own step budget.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .command import run_standalone
from .harness import default_device, environment, parse_overrides, publish
from .quality_eval import PATHS, HeldOut, evaluate_paths
from .quality_mlm import mlm_accuracies, summarise_leak
from .quality_report import plot, render
from .quality_metrics import gallery_summary, mean_curve, paired_bootstrap_ci, speedup_to_target, time_to_target
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
    measure_step_times,
    policy_specs,
    selector_recalls,
)

DEFAULT_POLICIES = [BASELINE, "bus", "random"]
# Declared before any run (issue 24 item 1): the path and metric of the curve, the target and the verdict.
VERDICT = {
    "path": "unpruned",
    "metric": "mean_r1",
    "why": "every policy's model is encoded the same way on this path (every patch, no caption), so a difference "
           "comes from training alone, which is the question (does text-guided selection train a better model in "
           "the same time?); 'deployed' adds what each policy does at retrieval without a caption (bus: the EViT "
           "fallback; random: nothing dropped) and is reported beside it; mean R@1 = (image->text + text->image) / 2, "
           "averaged over galleries",
}
SCENE_WHY = {
    "cluttered": "the default: 12-16 objects, more salient patches than a 25% keep budget holds, so an image-only "
                 "selector cannot keep every object and random keep-25% loses a mentioned object most of the time; "
                 "the scene on which the caption can decide the question",
    "standard": "3-5 objects (about 34% of the patches): an image-only selector keeps them all inside a 50% budget, "
                "so text guidance has little to add",
}


@dataclass
class QualitySettings:
    model: str = "bus-mini"
    policies: list[str] | None = None  # None: DEFAULT_POLICIES; ["all"]: every variant the model offers
    budget_s: float = 60.0  # training time per variant and seed (steps x measured step time)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    batch_size: int = 32
    lr: float = 1e-3
    warmup_share: float = 0.1  # linear warm-up over this share of a variant's steps
    weight_decay: float = 0.02
    heldout_pairs: int = 2048  # held-out pairs (one caption per image), ranked in galleries
    gallery_size: int = 256  # candidates per ranking; heldout_pairs must be a multiple
    rerank_k: int = 4  # the final evaluation's "rerank" path: ITM re-ranks this many ITC candidates (0: none)
    evals: int = 3  # held-out evaluations per run (the curve); time-to-target resolution is budget_s / evals
    scene: str = "cluttered"  # synthetic scene (bus_model.data.synthetic.SCENES); SCENE_WHY says why the default
    difficulty: str = "standard"  # the standard scene's distractors (DIFFICULTIES)
    keep_ratios: list[float] | None = field(default_factory=lambda: [0.5, 0.5])  # every selection variant's
    # selection__keep_ratios (bus-mini: after blocks 1 and 2, so 25% of the patches go on); None: the model's own
    data_seed: int = 0  # seed of the held-out split (test); training seed s reads the train split of seed s
    timing_warmup: int = 2
    timing_steps: int = 12
    min_steps: int = 2
    bootstrap_reps: int = 4000
    amp: bool | None = None  # bf16 autocast; None: on for CUDA only
    out: str | None = None  # keep each variant's final model (seed = seeds[0]) at out/NAME
    overrides: dict = field(default_factory=dict)  # flat section__field config changes for every variant (--override)

    @classmethod
    def quick(cls) -> "QualitySettings":
        """Seconds on a CPU, for the test suite: tiny batches, a few steps, 2 galleries of 16."""
        return cls(budget_s=0.5, seeds=[0], batch_size=4, heldout_pairs=32, gallery_size=16, rerank_k=2, evals=2,
                   timing_warmup=1, timing_steps=1, min_steps=2, bootstrap_reps=200)


def _tokenizer_and_overrides(model: str):
    from bus_model import get_config
    from bus_model.data import build_synthetic_tokenizer
    from bus_model.data.tokenizer import text_config_overrides

    tokenizer = build_synthetic_tokenizer(model_max_length=get_config(model).max_text_len)
    return tokenizer, text_config_overrides(tokenizer)


def select_specs(settings: QualitySettings, text_overrides: dict):
    """(variants to train, {name: why skipped}); unknown names in ``settings.policies`` raise SystemExit."""
    specs = policy_specs(settings.model)
    keep = {} if settings.keep_ratios is None else {"selection__keep_ratios": list(settings.keep_ratios)}
    for spec in specs.values():  # a variant's own keys (its policy, bus-noptm's ptm) win
        spec.overrides = {**keep, **settings.overrides, **spec.overrides}
    wanted = settings.policies or list(DEFAULT_POLICIES)
    if wanted == ["all"]:
        wanted = list(specs)
    unknown = [p for p in wanted if p not in specs]
    if unknown:
        raise SystemExit(f"error: --policies: unknown {unknown}; {settings.model} offers {list(specs)} (or 'all')")
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


def _final_eval(model, held: HeldOut, first_gallery, tokenizer, settings, device, amp) -> dict:
    """Every path in galleries, the selector recall on both paths, captioning on the first gallery."""
    paths = evaluate_paths(model, held, settings.gallery_size, device=device, amp=amp, rerank_k=settings.rerank_k)
    caps = evaluate_model(model, first_gallery, tokenizer, device=device, rerank_k=0, captions=True, amp=amp)
    return {
        "paths": paths,  # path -> (G, 2) per-gallery R@1 (dropped before the JSON)
        "mlm": mlm_accuracies(model, held, device=device, chunk=settings.gallery_size, amp=amp),  # or None
        "captioning": {"cider": caps.get("cider"), "bleu4": caps.get("bleu4"), "images": len(first_gallery)},
        "selector_recall": {
            "training": selector_recalls(model, first_gallery, tokenizer, device=device, captions=True),
            "text_free": selector_recalls(model, first_gallery, tokenizer, device=device, captions=False),
        },
    }


def train_variant(spec, seed: int, steps: int, step_time: float, settings: QualitySettings, text_overrides: dict,
                  stream: TrainStream, held: HeldOut, first_gallery, tokenizer, device, amp, log=print) -> dict:
    """One variant, one seed: ``steps`` optimizer steps with held-out evaluations (verdict path) along the way."""
    model = build_model(spec, text_overrides, seed, device)
    trainer = Trainer(model, lr=settings.lr, weight_decay=settings.weight_decay, total_steps=steps,
                      warmup_steps=round(settings.warmup_share * steps), amp=amp, device=device)
    points = eval_steps(steps, settings.evals)
    curve, final, losses = [], None, []
    path = VERDICT["path"]
    for step in range(1, steps + 1):
        losses.append(trainer.step(stream[step - 1]))
        if step in points:
            if step == steps:
                final = _final_eval(model, held, first_gallery, tokenizer, settings, device, amp)
                per_gallery = final["paths"][path]
            else:
                per_gallery = evaluate_paths(model, held, settings.gallery_size, device=device, amp=amp,
                                             paths=(path,))[path]  # the curve: the verdict path only
            value = gallery_summary(per_gallery)["mean_r1"]
            curve.append({"time_s": step * step_time, "step": step, "mean_r1": value})
            log(f"{spec.name} seed {seed}: step {step}/{steps} ({step * step_time:.1f}s of training) "
                f"{path} mean R@1 {value:.4f}, loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
    return {"model": model, "final": final, "curve": curve, "last_loss": losses[-1]}


def _save(model, tokenizer, directory: Path) -> None:
    from bus_model.data import save_tokenizer

    model.save_pretrained(directory)
    save_tokenizer(tokenizer, directory / "tokenizer")  # bus eval --checkpoint DIR finds it there


def comparison_pairs(names: list[str]) -> list[tuple[str, str]]:
    """bus - random, bus - baseline, every other policy - baseline, bus - evit (what the caption adds over the
    image [CLS] selecting at the same schedule), then each BUS variant (``bus-noptm``, the other ITC choices) -
    bus: the ablations compared directly (those present)."""
    pairs = [("bus", "random"), ("bus", BASELINE)] + [(n, BASELINE) for n in names if n not in (BASELINE, "bus")]
    pairs += [("bus", "evit")] + [(n, "bus") for n in names if n.startswith("bus-")]
    return [(a, b) for a, b in pairs if a in names and b in names]


def compare(runs: dict, names: list[str], seeds: list[int], reps: int) -> list[dict]:
    """Paired differences of mean R@1 per seed and gallery on every path both variants have, with the
    bootstrap interval (``paired_bootstrap_ci``) and whether it excludes 0."""
    out = []
    for a, b in comparison_pairs(names):
        for path in PATHS:
            if not all(path in runs[n][s]["final"]["paths"] for n in (a, b) for s in seeds):
                continue
            diffs = torch.stack([runs[a][s]["final"]["paths"][path].mean(dim=1)
                                 - runs[b][s]["final"]["paths"][path].mean(dim=1) for s in seeds])  # (S, G)
            diff, lo, hi = paired_bootstrap_ci(diffs.numpy(), reps=reps)
            out.append({"a": a, "b": b, "path": path, "diff": diff, "ci95": [lo, hi],
                        "per_seed": [float(d.mean()) for d in diffs], "significant": not lo <= 0.0 <= hi})
    return out


def run(settings: QualitySettings, device: torch.device | None = None, log=print) -> dict:
    from bus_model import get_config
    from bus_model.data import SyntheticDataset
    from bus_model.data.synthetic_stats import random_keep_loss

    start = time.perf_counter()
    device = device or default_device()
    env = environment(device)  # the commit the run starts from (the tree may move on while it runs)
    amp = device.type == "cuda" if settings.amp is None else settings.amp
    tokenizer, text_overrides = _tokenizer_and_overrides(settings.model)
    specs, skipped = select_specs(settings, text_overrides)
    for name, why in skipped.items():
        log(f"skipping {name}: {why}")
    config = get_config(specs[BASELINE].config, text=text_overrides)
    held_kwargs = data_kwargs(config, num_samples=settings.heldout_pairs, seed=settings.data_seed, split="test",
                              difficulty=settings.difficulty, scene=settings.scene)
    dataset = SyntheticDataset(**held_kwargs)
    held = HeldOut.build(dataset, tokenizer, config)
    first_gallery = SyntheticDataset(**{**held_kwargs, "num_samples": settings.gallery_size})
    samples = [dataset.sample(i) for i in range(len(dataset))]
    g = settings.gallery_size
    oracles = [oracle_txt2img_r1(samples[i : i + g]) for i in range(0, len(samples), g)]  # within each gallery
    oracle = {k: sum(o[k] for o in oracles) / len(oracles) for k in oracles[0]}
    bus_cfg = get_config(settings.model, **specs.get("bus", specs[BASELINE]).overrides, text=text_overrides)
    kept_share = 1.0
    for r in bus_cfg.selection.keep_ratios:
        kept_share *= r
    scene_stats = random_keep_loss(min(256, settings.heldout_pairs), keep_ratio=kept_share, seed=settings.data_seed,
                                   image_size=config.vision.image_size, patch_size=config.vision.patch_size,
                                   difficulty=settings.difficulty, scene=settings.scene)

    log(f"measuring step times of {list(specs)} (interleaved)")
    timing_stream = TrainStream(config, tokenizer, settings.batch_size, 0, settings.difficulty, device,
                                scene=settings.scene)
    timing = measure_step_times(specs, text_overrides, timing_stream, lr=settings.lr, warmup=settings.timing_warmup,
                                steps=settings.timing_steps, amp=amp, device=device, log=log)
    steps = {n: max(settings.min_steps, int(settings.budget_s / timing[n]["step_time_s"])) for n in specs}

    runs: dict[str, dict[int, dict]] = {n: {} for n in specs}
    for seed in settings.seeds:
        stream = TrainStream(config, tokenizer, settings.batch_size, seed, settings.difficulty, device,
                             scene=settings.scene, cache=True)  # every variant reads the batches made once
        for name, spec in specs.items():
            r = train_variant(spec, seed, steps[name], timing[name]["step_time_s"], settings, text_overrides, stream,
                              held, first_gallery, tokenizer, device, amp, log)
            if settings.out and seed == settings.seeds[0]:
                _save(r["model"], tokenizer, Path(settings.out) / name)
            del r["model"]
            runs[name][seed] = r
        del stream

    path = VERDICT["path"]
    base_final = gallery_summary(torch.stack([runs[BASELINE][s]["final"]["paths"][path]
                                              for s in settings.seeds]).mean(0))["mean_r1"]
    policies = {}
    for name, spec in specs.items():
        per_seed = runs[name]
        names = [p for p in PATHS if all(p in per_seed[s]["final"]["paths"] for s in settings.seeds)]
        final = {p: gallery_summary(torch.stack([per_seed[s]["final"]["paths"][p] for s in settings.seeds]).mean(0))
                 for p in names}  # galleries averaged over seeds, then summarised over galleries
        curve = mean_curve([per_seed[s]["curve"] for s in settings.seeds])

        def mean_of(values):
            present = [v for v in values if v is not None]
            return sum(present) / len(present) if present else None

        recall = {}
        for kind in ("training", "text_free"):
            rs = [per_seed[s]["final"]["selector_recall"][kind] for s in settings.seeds]
            recall[kind] = None if rs[0] is None else [mean_of([r[k] for r in rs]) for k in range(len(rs[0]))]
        policies[name] = {
            "config": spec.config, "overrides": spec.overrides, "summary": spec.summary,
            "final": final,
            "per_seed": [{"seed": s, **{p: gallery_summary(per_seed[s]["final"]["paths"][p]) for p in names},
                          "curve": per_seed[s]["curve"], "last_loss": per_seed[s]["last_loss"],
                          "time_to_target_s": time_to_target(per_seed[s]["curve"], base_final)}
                         for s in settings.seeds],
            "curve": curve, "time_to_target_s": time_to_target(curve, base_final),
            "selector_recall": recall,
            "mlm_leak": summarise_leak([per_seed[s]["final"]["mlm"] for s in settings.seeds], settings.bootstrap_reps),
            "captioning": {k: mean_of([per_seed[s]["final"]["captioning"][k] for s in settings.seeds])
                           for k in ("cider", "bleu4")},
            "step_time_s": timing[name]["step_time_s"], "step_times_s": timing[name]["step_times_s"],
            "flops_per_sample": timing[name]["flops_per_sample"], "steps": steps[name],
        }
    base_time = policies[BASELINE]["time_to_target_s"]
    for p in policies.values():
        p["speedup_to_target"] = speedup_to_target(base_time, p["time_to_target_s"])
    return {
        "benchmark": "quality", "version": 2, "model": settings.model, "scene": settings.scene,
        "scene_why": SCENE_WHY.get(settings.scene), "heldout_pairs": settings.heldout_pairs,
        "gallery_size": settings.gallery_size, "seeds": list(settings.seeds), "data": held_kwargs,
        "budget_s": settings.budget_s, "device": env["device"], "commit": env["commit"],
        "verdict": VERDICT, "kept_share": kept_share, "scene_statistics": scene_stats,
        "target": {"metric": VERDICT["metric"], "path": path, "value": base_final,
                   "definition": f"the baseline's final held-out mean R@1 on the {path} path (galleries of "
                                 f"{settings.gallery_size}, averaged over galleries and seeds)"},
        "policies": policies, "skipped_policies": skipped,
        "comparisons": compare(runs, list(specs), settings.seeds, settings.bootstrap_reps),
        "oracle_txt2img_r1": oracle,  # what R@1 each level of attribute knowledge allows, within a gallery
        "time_measurement": "training time = optimizer steps x the variant's step time (lower quartile of "
                            f"{settings.timing_steps} rounds), measured before training with every variant's steps "
                            "interleaved round by round (rotated order); each variant trains budget_s / step time "
                            "steps",
        "settings": {**asdict(settings), "amp": amp}, "wall_s": time.perf_counter() - start,
        **{k: v for k, v in env.items() if k not in ("device", "commit")},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = QualitySettings()
    parser.add_argument("--model", default=d.model, help=f"a BUS config with a -baseline twin (default {d.model})")
    parser.add_argument("--policies", nargs="+", default=None, help=f"variants to train (default {DEFAULT_POLICIES}; "
                        "'all': every one the model offers: baseline, each selection policy, bus-noptm, bus-guided, "
                        "bus-detached)")
    parser.add_argument("--budget-s", type=float, default=d.budget_s, help="training seconds per variant and seed "
                        f"(steps x measured step time; default {d.budget_s:g})")
    parser.add_argument("--seeds", type=int, nargs="+", default=d.seeds, help=f"initial seeds (default {d.seeds})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    parser.add_argument("--heldout-pairs", type=int, default=d.heldout_pairs, help="held-out image-caption pairs "
                        f"(default {d.heldout_pairs}; a multiple of --gallery-size)")
    parser.add_argument("--gallery-size", type=int, default=d.gallery_size, help="candidates per ranking "
                        f"(default {d.gallery_size})")
    parser.add_argument("--rerank-k", type=int, default=d.rerank_k, help="the final 'rerank' path: ITM re-ranks the "
                        f"top K ITC candidates (default {d.rerank_k}; 0: no rerank path)")
    parser.add_argument("--evals", type=int, default=d.evals, help="held-out evaluations per run (the curve)")
    parser.add_argument("--scene", default=d.scene, help=f"synthetic scene: cluttered or standard (default {d.scene}: "
                        "the one where the caption can matter)")
    parser.add_argument("--difficulty", default=d.difficulty, help="the standard scene's distractors: easy, standard "
                        "or hard")
    parser.add_argument("--keep-ratios", type=float, nargs="+", default=d.keep_ratios, help="selection__keep_ratios "
                        f"of every selection variant (default {d.keep_ratios}: 25%% of bus-mini's patches go on)")
    parser.add_argument("--model-keep-ratios", action="store_true", help="keep the model's own keep schedule")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: GPU only)")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION__FIELD=JSON",
                        help="set a config field of every variant, e.g. vision__initializer_range=0.02 (repeatable; "
                        "not selection__policy, which names the variants)")
    parser.add_argument("--quick", action="store_true", help="seconds: tiny batches, a few steps, 2 galleries of 16")
    parser.add_argument("--json", help="write the result as JSON here")
    parser.add_argument("--plot", help="write a PNG of mean R@1 against training time here")
    parser.add_argument("--out", help="keep each variant's final model (first seed) at OUT/NAME")


def settings_from_args(args) -> QualitySettings:
    if args.quick:
        settings = QualitySettings.quick()
        settings.model, settings.policies, settings.scene = args.model, args.policies, args.scene
    else:
        settings = QualitySettings(model=args.model, policies=args.policies, budget_s=args.budget_s,
                                   seeds=list(args.seeds), batch_size=args.batch_size, lr=args.lr,
                                   heldout_pairs=args.heldout_pairs, gallery_size=args.gallery_size,
                                   rerank_k=args.rerank_k, evals=args.evals, scene=args.scene,
                                   difficulty=args.difficulty, keep_ratios=list(args.keep_ratios))
    if args.model_keep_ratios:
        settings.keep_ratios = None
    settings.amp, settings.out = args.amp, args.out
    settings.overrides = parse_overrides(getattr(args, "override", []), "bus bench quality")
    if "selection__policy" in settings.overrides:
        raise SystemExit("bus bench quality: error: --override selection__policy: the variants set the policy; "
                         "choose them with --policies")
    if settings.policies and "all" in settings.policies and settings.policies != ["all"]:
        raise SystemExit("error: --policies all stands alone")
    if settings.budget_s <= 0:
        raise SystemExit("error: --budget-s must be > 0")
    for name in ("batch_size", "gallery_size", "evals"):
        if getattr(settings, name) < (2 if name != "evals" else 1):
            raise SystemExit(f"error: --{name.replace('_', '-')} is too small: {getattr(settings, name)}")
    if settings.heldout_pairs < settings.gallery_size or settings.heldout_pairs % settings.gallery_size:
        raise SystemExit(f"error: --heldout-pairs ({settings.heldout_pairs}) must be a multiple of --gallery-size "
                         f"({settings.gallery_size})")
    if settings.rerank_k < 0 or not settings.seeds or len(set(settings.seeds)) != len(settings.seeds):
        raise SystemExit("error: --rerank-k must be >= 0 and --seeds distinct")
    from bus_model.data.synthetic import DIFFICULTIES, SCENES

    if settings.scene not in SCENES:
        raise SystemExit(f"error: --scene must be one of {sorted(SCENES)}, got {settings.scene!r}")
    if settings.difficulty not in DIFFICULTIES:
        raise SystemExit(f"error: --difficulty must be one of {sorted(DIFFICULTIES)}")
    if settings.scene != "standard" and settings.difficulty != "standard":
        raise SystemExit("error: --difficulty applies to --scene standard only")
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
