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
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from .harness import default_device, environment, markdown_table, publish, save_plot, write_json

# (BUS config, images per step on one GPU): bus-small as in the H200 measurement (README), bus-base at
# the paper's per-GPU batch
GPU_SUITE = (("bus-small", 32), ("bus-base", 64))
QUICK_SUITE = (("bus-tiny", 4),)
MIN_WARMUP = 3  # CUDA graph trees: a warm-up call, a recording call, then replays (measured)


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


def run_suite(base, pairs, modes, device: torch.device, json_path: str | None = None, log=print) -> dict:
    """Every (BUS config, batch) of ``pairs`` in every mode of ``modes``; ``base`` (a ``TrainBenchSettings``)
    supplies the rest (steps, warm-up, seed, amp, backend, overrides)."""
    from .train_speed import run

    # "benchmark": "train", so that readme_results renders it (train_speed.render hands a result with
    # "cases" to this module's render)
    result = {"benchmark": "train", "suite": "gpu", "modes": list(modes), "cases": [], **environment(device)}
    for model, batch in pairs:
        for mode in modes:
            settings = dataclasses.replace(base, model=model, batch_size=batch, compile=mode, memory=False,
                                           pad_to_max_length=True, eval_seconds=0.0,
                                           warmup=max(base.warmup, MIN_WARMUP if mode != "none" else 1))
            check_compiles(settings, "bus bench train --gpu-suite")
            log(f"== {model} vs {model}-baseline, batch {batch}, compile {mode} ==")
            case = run(settings, device, log)
            result["cases"].append({k: case[k] for k in ("speedup", "flops_ratio", "models", "settings",
                                                          "peak_bf16_flops", "peak_entry")})
            write_json(json_path, result)  # a run cut short keeps the finished cases
            torch._dynamo.reset()  # frees the compiled graphs (and CUDA graph pools) before the next case
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return result


def rows_of(result: dict) -> list[dict]:
    """One row per case: the pair's numbers side by side."""
    rows = []
    for case in result["cases"]:
        s = case["settings"]
        bus, base = case["models"][s["model"]], case["models"][f"{s['model']}-baseline"]
        pct = (lambda m: None if m.get("mfu") is None else 100 * m["mfu"])
        rows.append({
            "pair": s["model"], "batch": s["batch_size"], "compile": s["compile"],
            "bus_ms": 1e3 * bus["median_step_s"], "base_ms": 1e3 * base["median_step_s"], "speedup": case["speedup"],
            "bus_ips": bus["images_per_s"], "base_ips": base["images_per_s"], "bus_mfu": pct(bus), "base_mfu": pct(base),
            "bus_compile_s": bus.get("compile_s"), "base_compile_s": base.get("compile_s"),
        })
    return rows


def compiled_over_eager(result: dict) -> list[dict]:
    """Per model: eager step time / compiled step time, for every compiled mode measured."""
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
    table = markdown_table(rows_of(result), [
        ("pair", "BUS config", ""), ("batch", "batch", "d"), ("compile", "compile", ""),
        ("bus_ms", "BUS step (ms)", ".1f"), ("base_ms", "baseline step (ms)", ".1f"),
        ("speedup", "speedup", ".2f"), ("bus_ips", "BUS images/s", ".1f"), ("base_ips", "baseline images/s", ".1f"),
        ("bus_mfu", "BUS MFU (%)", ".1f"), ("base_mfu", "baseline MFU (%)", ".1f"),
        ("bus_compile_s", "BUS compile (s)", ".1f"), ("base_compile_s", "baseline compile (s)", ".1f"),
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


def plot(result: dict, path: str | None) -> str | None:
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


def main_from_args(args, settings) -> int:
    """``bus bench train --gpu-suite`` (``settings``: the parsed ``TrainBenchSettings``)."""
    device = default_device()
    if device.type != "cuda" and not args.quick:
        raise SystemExit("bus bench train: error: --gpu-suite measures the paper-scale models on a GPU and needs "
                         "CUDA (add --quick for the bus-tiny smoke run on this device)")
    pairs = QUICK_SUITE if args.quick else GPU_SUITE
    modes = ("none", suite_mode(getattr(args, "compile", None), device))
    log = (lambda msg: print(msg, file=sys.stderr))
    result = run_suite(settings, pairs, modes, device, args.json, log)
    return publish(result, render(result), args.json, plot(result, args.plot))
