"""``bus bench train --gpu-suite``: BUS against its baseline at the scale the paper trains (issue 22).

On one GPU, bf16 autocast, 224 px: bus-small at batch 32 and bus-base at batch 64, each pair measured
eager and compiled (``--compile``, by default ``reduce-overhead``: forward + backward as CUDA graphs),
every case by ``train_speed.run`` (the twins' steps interleaved, AdamW eager). Captions are padded to
``max_text_len`` in every case, eager included, so that eager and compiled run the same shapes and
differ only in how the step is launched. Reported side by side per case: step time, images/s, MFU
(counted model FLOPs per second over the GPU's peak dense bf16 FLOP/s) and compile time (first call
to first finished step), and ``speedup`` = baseline step time / BUS step time; and per model, the
compiled step's speedup over eager. Peak memory is not measured here (one process holds both
models); ``bus bench train --model M --batch-size B [--compile MODE]`` measures it per model.

The JSON (``--json``) is rewritten after every case, so a run cut short keeps the cases it finished.
``--quick`` runs the same code on bus-tiny (batch 4, any device): the smoke test of the suite.

``bus bench train --eager-vs-compiled`` measures, on any device, ``--model`` and its baseline each eager
and compiled (``--compile``) with their steps interleaved (the order flips every step), so that machine
noise hits all four alike: the honest eager/compiled step-time ratio on a busy CPU.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from torch._dynamo.utils import counters

from bus_model.training.compile import BACKEND_HELP, COMPILE_HELP

from .harness import default_device, environment, markdown_table, median, publish, save_plot, timed, write_json
from .train_setup import build_model_and_data, make_step

# (BUS config, images per step on one GPU): bus-small as in the H200 measurement (README), bus-base at
# the paper's per-GPU batch
GPU_SUITE = (("bus-small", 32), ("bus-base", 64))
QUICK_SUITE = (("bus-tiny", 4),)
MIN_WARMUP = 3  # CUDA graph trees: a warm-up call, a recording call, then replays (measured)


def add_compile_arguments(parser) -> None:
    """``--compile``, ``--compile-backend``, ``--gpu-suite`` and ``--eager-vs-compiled`` of ``bus bench train``."""
    parser.add_argument("--compile", default=None, nargs="?", const="default", metavar="MODE",
                        help=COMPILE_HELP.replace("Default: none", "Default: none; the compiled half of --gpu-suite "
                                                  "and --eager-vs-compiled: reduce-overhead on CUDA, default elsewhere"))
    parser.add_argument("--compile-backend", default="inductor", metavar="BACKEND", help=BACKEND_HELP)
    parser.add_argument("--gpu-suite", action="store_true",
                        help="issue 22's paper-scale GPU set: bus-small batch 32 and bus-base batch 64 (224 px, bf16), "
                        "each against its baseline, eager and compiled (--compile, default reduce-overhead = CUDA "
                        "graphs); captions padded to max_text_len in every case; speedup, images/s, MFU and compile "
                        "time side by side (JSON written after each case); needs CUDA (with --quick: bus-tiny on "
                        "any device, a smoke test). --steps/--warmup apply (warm-up at least 3)")
    parser.add_argument("--eager-vs-compiled", action="store_true",
                        help="--model and its baseline, each eager and compiled (--compile), all four steps "
                        "interleaved on the same padded batches: the eager/compiled step-time ratio (any device)")


def check_compiles(settings, prog: str) -> None:
    """Both twins (with the compared model's overrides) must compile in ``settings.compile``, else exit
    with one error line naming ``--compile``."""
    from bus_model import get_config
    from bus_model.training.compile import check_compile_config

    for name in (settings.model, f"{settings.model}-baseline"):
        config = get_config(name, **(settings.overrides if name == settings.model else {}))
        try:
            check_compile_config(config, settings.compile)
        except ValueError as err:
            raise SystemExit(f"{prog}: error: {name}: {err}") from None


def suite_mode(requested: str | None, device: torch.device) -> str:
    """The compiled half's mode: ``--compile`` if given (not "none"), else CUDA graphs on CUDA."""
    if requested not in (None, "none"):
        return requested
    return "reduce-overhead" if device.type == "cuda" else "default"


def run_suite(run, base, pairs, modes, device: torch.device, json_path: str | None = None, log=print) -> dict:
    """Every (BUS config, batch) of ``pairs`` in every mode of ``modes``, each case measured by ``run``
    (``train_speed.run``); ``base`` (a ``TrainBenchSettings``) supplies the rest (steps, warm-up, seed,
    amp, backend, overrides)."""
    # "benchmark": "train", so that readme_results renders it (train_speed.render hands a result with
    # "cases" to this module's render)
    result = {"benchmark": "train", "suite": "gpu", "modes": list(modes), "cases": [], **environment(device)}
    for model, batch in pairs:
        flops = {}  # counted in the first (eager) case, reused by the compiled one: same model, same batches
        for mode in modes:
            settings = dataclasses.replace(base, model=model, batch_size=batch, compile=mode, memory=False,
                                           pad_to_max_length=True, eval_seconds=0.0,
                                           warmup=max(base.warmup, MIN_WARMUP if mode != "none" else 1))
            check_compiles(settings, "bus bench train --gpu-suite")
            log(f"== {model} vs {model}-baseline, batch {batch}, compile {mode} ==")
            counters.clear()
            case = run(settings, device, log, flops)
            result["cases"].append({k: case[k] for k in ("speedup", "flops_ratio", "models", "settings",
                                                          "peak_bf16_flops", "peak_entry")})
            result["cases"][-1]["compiler"] = compiler_counts()
            write_json(json_path, result)  # a run cut short keeps the finished cases
            torch._dynamo.reset()  # frees the compiled graphs (and CUDA graph pools) before the next case
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return result


def compiler_counts() -> dict:
    """What dynamo and inductor did in the case just run (``torch._dynamo.utils.counters``): graphs
    compiled, graph breaks, and CUDA graph skips (inductor then runs that graph without CUDA graphs;
    the reason is logged with ``TORCH_LOGS=cudagraphs``)."""
    return {"unique_graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def eager_vs_compiled(settings, device: torch.device, log=print) -> dict:
    """``settings.model`` and its baseline, each eager and in ``settings.compile``, on the same padded batches;
    the four steps of each batch interleaved, their order flipped every step."""
    amp = device.type == "cuda" if settings.amp is None else settings.amp
    names = [settings.model, f"{settings.model}-baseline"]
    steps, batches = {}, None
    for name in names:
        for mode in ("none", settings.compile):
            overrides = settings.overrides if name == settings.model else {}
            model, data = build_model_and_data(name, settings.batch_size, settings.seed, settings.image_size, device,
                                               overrides, pad_to_max_length=True)
            steps[(name, mode)] = make_step(model, settings.lr, amp, device, mode, settings.compile_backend)
            batches = batches or [data[i] for i in range(settings.warmup + settings.steps)]
    times = {key: [] for key in steps}
    for i, batch in enumerate(batches):
        for key in (list(steps) if i % 2 == 0 else list(steps)[::-1]):
            times[key].append(timed(lambda: steps[key](batch), device))
        log(f"step {i + 1}/{len(batches)}{' (warm-up)' if i < settings.warmup else ''}: "
            + ", ".join(f"{n} {m} {times[(n, m)][-1]:.3f}s" for n, m in steps))
    w = settings.warmup
    variants = [{"model": name, "compile": mode, "median_step_s": median(t[w:]), "images_per_s": settings.batch_size / median(t[w:]),
                 "first_step_s": t[0], "step_times_s": t[w:], "warmup_step_times_s": t[:w]}
                for (name, mode), t in times.items()]
    ratios = [{"model": name, "compile": settings.compile,
               "speedup": median(times[(name, "none")][w:]) / median(times[(name, settings.compile)][w:])} for name in names]
    return {"benchmark": "train", "variants": variants, "compiled_over_eager": ratios,
            "settings": {**dataclasses.asdict(settings), "amp": amp, "pad_to_max_length": True}, **environment(device)}


def rows_of(result: dict) -> list[dict]:
    """One row per case: the pair's numbers side by side."""
    rows = []
    for case in result["cases"]:
        s, compiler = case["settings"], case.get("compiler", {})
        bus, base = case["models"][s["model"]], case["models"][f"{s['model']}-baseline"]
        pct = (lambda m: None if m.get("mfu") is None else 100 * m["mfu"])
        rows.append({
            "pair": s["model"], "batch": s["batch_size"], "compile": s["compile"],
            "bus_ms": 1e3 * bus["median_step_s"], "base_ms": 1e3 * base["median_step_s"], "speedup": case["speedup"],
            "bus_ips": bus["images_per_s"], "base_ips": base["images_per_s"], "bus_mfu": pct(bus), "base_mfu": pct(base),
            "bus_compile_s": bus.get("compile_s"), "base_compile_s": base.get("compile_s"),
            "graphs": compiler.get("unique_graphs"), "cudagraph_skips": compiler.get("cudagraph_skips"),
        })
    return rows


def compiled_over_eager(result: dict) -> list[dict]:
    """Per model: eager step time / compiled step time, for every compiled mode measured."""
    if "variants" in result:
        return result["compiled_over_eager"]
    times = {}
    for case in result["cases"]:
        for name, m in case["models"].items():
            times.setdefault((name, case["settings"]["batch_size"]), {})[case["settings"]["compile"]] = m["median_step_s"]
    out = []
    for (name, batch), by_mode in times.items():
        for mode, t in by_mode.items():
            if mode != "none" and "none" in by_mode:
                out.append({"model": name, "batch": batch, "compile": mode, "speedup": by_mode["none"] / t})
    return out


def render(result: dict) -> str:
    if "variants" in result:
        return render_interleaved(result)
    table = markdown_table(rows_of(result), [
        ("pair", "BUS config", ""), ("batch", "batch", "d"), ("compile", "compile", ""),
        ("bus_ms", "BUS step (ms)", ".1f"), ("base_ms", "baseline step (ms)", ".1f"),
        ("speedup", "speedup", ".2f"), ("bus_ips", "BUS images/s", ".1f"), ("base_ips", "baseline images/s", ".1f"),
        ("bus_mfu", "BUS MFU (%)", ".1f"), ("base_mfu", "baseline MFU (%)", ".1f"),
        ("bus_compile_s", "BUS compile (s)", ".1f"), ("base_compile_s", "baseline compile (s)", ".1f"),
        ("graphs", "graphs compiled", "d"), ("cudagraph_skips", "CUDA graph skips", "d"),
    ])
    gains = compiled_over_eager(result)
    if gains:
        table += "\n\ncompiled step vs eager (eager step time / compiled step time, same model and batch):\n\n"
        table += markdown_table(gains, [("model", "model", ""), ("batch", "batch", "d"), ("compile", "compile", ""),
                                        ("speedup", "speedup over eager", ".2f")])
    cases = result["cases"]
    s = cases[0]["settings"] if cases else {}
    peak = cases[0].get("peak_bf16_flops") if cases else None
    peak_text = f"{peak / 1e12:.0f} TFLOP/s, {cases[0].get('peak_entry')}" if peak else "n/a: no known peak"
    return (f"{table}\n\nspeedup = baseline step time / BUS step time; MFU = counted forward + backward FLOPs x "
            f"images/s / peak dense bf16 FLOP/s ({peak_text}); "
            f"compile = first step's wall time; {s.get('steps')} measured steps after at least {s.get('warmup')} "
            f"warm-up, {s.get('image_size')} px, amp={s.get('amp')}, captions padded to {s.get('max_text_len')}, "
            f"backend {s.get('compile_backend')}; {result['device']}; torch {result['torch']}; commit {result['commit']}")


def render_interleaved(result: dict) -> str:
    s = result["settings"]
    table = markdown_table(result["variants"], [
        ("model", "model", ""), ("compile", "compile", ""), ("median_step_s", "median step (s)", ".3f"),
        ("images_per_s", "images/s", ".2f"), ("first_step_s", "first step (s)", ".1f")])
    table += "\n\n" + markdown_table(result["compiled_over_eager"], [
        ("model", "model", ""), ("compile", "compile", ""), ("speedup", "eager step / compiled step", ".2f")])
    return (f"{table}\n\nfour steps per batch interleaved (order flipped every step); first step = first call to first "
            f"finished step (compile included); batch {s['batch_size']}, {s['steps']} measured steps after {s['warmup']} "
            f"warm-up, amp={s['amp']}, captions padded to max_text_len, backend {s['compile_backend']}; "
            f"{result['device']}; torch {result['torch']}; commit {result['commit']}")


def plot(result: dict, path: str | None) -> str | None:
    if "variants" in result:
        return None

    def draw(ax):
        rows = rows_of(result)
        labels = [f"{r['pair']}\n{r['compile']}" for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["bus_ips"] for r in rows], width=0.4, label="BUS", color="tab:green")
        ax.bar([i + 0.2 for i in x], [r["base_ips"] for r in rows], width=0.4, label="baseline", color="tab:gray")
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("images / s (training)")
        ax.set_title(f"BUS vs baseline, eager and compiled ({result['device_type']})")
        ax.legend()

    return save_plot(path, draw)


def main_from_args(args, settings, run) -> int:
    """``bus bench train --gpu-suite`` or ``--eager-vs-compiled`` (``settings``: the parsed
    ``TrainBenchSettings``; ``run``: ``train_speed.run``, which measures one case)."""
    device = default_device()
    log = (lambda msg: print(msg, file=sys.stderr))
    if args.eager_vs_compiled:
        settings.compile = suite_mode(getattr(args, "compile", None), device)
        if settings.compile == "reduce-overhead":
            settings.warmup = max(settings.warmup, MIN_WARMUP)
        check_compiles(settings, "bus bench train --eager-vs-compiled")
        result = eager_vs_compiled(settings, device, log)
        return publish(result, render(result), args.json)
    if device.type != "cuda" and not args.quick:
        raise SystemExit("bus bench train: error: --gpu-suite measures the paper-scale models on a GPU and needs "
                         "CUDA (add --quick for the bus-tiny smoke run on this device)")
    pairs = QUICK_SUITE if args.quick else GPU_SUITE
    modes = ("none", suite_mode(getattr(args, "compile", None), device))
    result = run_suite(run, settings, pairs, modes, device, args.json, log)
    return publish(result, render(result), args.json, plot(result, args.plot))
