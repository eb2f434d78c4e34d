"""``bus bench train``: BUS vs its baseline twin, training speed side by side on synthetic data.

The paper's claim (BUS §4): about 50% higher training throughput than the same stack without BUS.
Both models are measured in one process on the embedded synthetic data.

Both models see the same batches, on the same machine, in the same run; their steps alternate (and
the order flips every step) so that machine noise hits both. A step is forward + backward + AdamW
update. Reported per model: median step time after warm-up, images/s, peak memory, FLOPs per sample;
and ``speedup = baseline step time / BUS step time``.

Peak memory is measured in a separate process per model (so one model's allocations never count
for the other): on GPU ``torch.cuda.max_memory_allocated``; on CPU the process's peak resident set
size (``VmHWM``) minus its resident size before the model was built. The JSON says which.

``--compile MODE`` measures the compiled step (``bus_model.training.compile``: forward + backward under
``torch.compile(fullgraph=True)``, captions padded to ``max_text_len``, AdamW eager); ``compile_s`` is the
first step's wall time (first call to first finished step, compile included). On CUDA with bf16 each
model also reports MFU: model FLOPs per second (the counted forward + backward FLOPs x images/s) over
the GPU's peak dense bf16 FLOP/s (``harness.PEAK_BF16_FLOPS``). ``--gpu-suite`` runs the paper-scale
set of issue 22 (``train_suite``): bus-small batch 32 and bus-base batch 64, eager and CUDA graphs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass, field

import torch

from bus_model.training.compile import check_compile_mode

from .command import run_standalone
from .harness import default_device, environment, markdown_table, median, parse_overrides, peak_bf16_flops, publish, save_plot, timed
# the setup shared by the benchmarks that train lives in train_setup; re-exported (other modules import it from here)
from .train_setup import SyntheticBatches, build_model_and_data, make_step, training_flops_per_sample  # noqa: F401
from .train_suite import add_compile_arguments


@dataclass
class TrainBenchSettings:
    model: str = "bus-small"  # a BUS config; its twin "<model>-baseline" is the reference
    batch_size: int = 8
    steps: int = 8  # measured steps per model
    warmup: int = 2  # unmeasured steps per model first
    image_size: int | None = None  # None: the config's
    seed: int = 0
    lr: float = 1e-4
    amp: bool | None = None  # bf16 autocast; None: on for CUDA, off for CPU
    memory: bool = True  # measure peak memory in a separate process per model
    eval_seconds: float = 0.0  # > 0: also train both for this much wall-clock time each, then retrieval R@1
    eval_images: int = 128  # held-out images (and their captions) ranked by the equal-time evaluation
    overrides: dict = field(default_factory=dict)  # config of the compared model (not its baseline twin), flat
    # "section__field" keys: {"selection__policy": "tome"} (--policy, --override)
    compile: str = "none"  # torch.compile mode of the step (bus_model.training.compile.COMPILE_MODES)
    compile_backend: str = "inductor"
    pad_to_max_length: bool | None = None  # captions padded to max_text_len; None: when compiling (static shapes)

    @property
    def padded(self) -> bool:
        return self.compile != "none" if self.pad_to_max_length is None else self.pad_to_max_length

    @classmethod
    def quick(cls) -> "TrainBenchSettings":
        """Seconds on a CPU: for the test suite."""
        return cls(model="bus-tiny", batch_size=4, steps=2, warmup=1)


# ---------------------------------------------------------------------------------------------
# memory, one process per model


def _proc_status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` memory field in KiB (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _cpu_peak_kib() -> int:
    # VmHWM is this process's own peak; ru_maxrss would also count the parent's peak (Linux keeps it across exec)
    hwm = _proc_status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _memory_probe(name: str, settings: TrainBenchSettings) -> dict:
    """Runs in a child process: build one model, run 2 steps, report its peak memory."""
    device = default_device()
    rss_before = _proc_status_kib("VmRSS") or _cpu_peak_kib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, data = build_model_and_data(name, settings.batch_size, settings.seed, settings.image_size, device,
                                       _overrides_for(name, settings), settings.padded)
    step = make_step(model, settings.lr, _amp(settings, device), device, settings.compile, settings.compile_backend)
    batch = data[0]
    for _ in range(3 if settings.compile != "none" else 2):  # CUDA graphs: warm-up, record, replay
        step(batch)
    if device.type == "cuda":
        return {"peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20,
                "memory_kind": "torch.cuda.max_memory_allocated in a dedicated process"}
    return {"peak_memory_mib": (_cpu_peak_kib() - rss_before) / 1024,
            "memory_kind": "CPU: peak resident set size (VmHWM) of a dedicated process minus its resident size "
                           "before the model was built"}


def measure_memory(name: str, settings: TrainBenchSettings) -> dict:
    cmd = [sys.executable, "-m", "bus_benchmarks.train_speed", "--_memory-probe", name,
           "--_settings", json.dumps(asdict(settings))]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe for {name} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# the benchmark


def _overrides_for(name: str, settings: TrainBenchSettings) -> dict:
    return settings.overrides if name == settings.model else {}


def _amp(settings: TrainBenchSettings, device: torch.device) -> bool:
    return device.type == "cuda" if settings.amp is None else settings.amp


def run(settings: TrainBenchSettings, device: torch.device | None = None, log=print,
        flops_cache: dict | None = None) -> dict:
    """``flops_cache``: FLOPs per sample by model name, filled and reused (the eager and compiled cases of
    ``--gpu-suite`` run the same math: counting once spares an eager fp32 step beside CUDA graph pools)."""
    device = device or default_device()
    amp = _amp(settings, device)
    names = [settings.model, f"{settings.model}-baseline"]
    n_batches = settings.warmup + settings.steps
    models, steps = {}, {}
    for name in names:
        models[name], data = build_model_and_data(name, settings.batch_size, settings.seed, settings.image_size, device,
                                                  _overrides_for(name, settings), settings.padded)
        steps[name] = make_step(models[name], settings.lr, amp, device, settings.compile, settings.compile_backend)
    batches = [data[i] for i in range(n_batches)]  # the twins share tokenizer and image size: one set of batches

    times: dict[str, list[float]] = {n: [] for n in names}
    warmup_times: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, list[float]] = {n: [] for n in names}
    for i in range(n_batches):
        order = names if i % 2 == 0 else names[::-1]
        now = {}
        for name in order:
            loss = []
            now[name] = timed(lambda: loss.append(steps[name](batches[i])), device)
            losses[name].append(float(loss[0]))
            (times if i >= settings.warmup else warmup_times)[name].append(now[name])
        where = (f"warm-up step {i + 1}/{settings.warmup} (not measured)" if i < settings.warmup
                 else f"step {i + 1 - settings.warmup}/{settings.steps}")
        log(f"{where}: " + ", ".join(f"{n} {now[n]:.3f}s" for n in names))

    peak, peak_key = peak_bf16_flops(device) if amp else (None, None)  # MFU against the bf16 peak only
    flops_cache = {} if flops_cache is None else flops_cache
    rows = []
    for name in names:
        step_s = median(times[name])
        if name not in flops_cache:
            log(f"counting the training FLOPs per sample of {name} (one step under a FLOP counter) ...")
            flops_cache[name] = training_flops_per_sample(models[name], batches[0])
        flops = flops_cache[name]
        first = (warmup_times[name] or times[name])[0]
        row = {
            "model": name,
            "median_step_s": step_s,
            "step_times_s": times[name],
            "images_per_s": settings.batch_size / step_s,
            "flops_per_sample": flops,
            "mfu": flops * settings.batch_size / step_s / peak if peak else None,
            "first_step_s": first,  # from the first call to the first finished step
            "compile_s": first if settings.compile != "none" else None,
            "warmup_step_times_s": warmup_times[name],
            "final_loss": losses[name][-1],
            "overrides": _overrides_for(name, settings),
        }
        if settings.memory:
            log(f"measuring the peak memory of {name} in a separate process (--no-memory skips this) ...")
            row.update(measure_memory(name, settings))
        rows.append(row)
    bus, base = rows
    config = models[names[0]].config
    del models, steps
    if settings.eval_seconds:
        for name, metrics in equal_time_retrieval(names, settings, device, log).items():
            next(r for r in rows if r["model"] == name)["equal_time_eval"] = metrics
    return {
        "benchmark": "train",
        "speedup": base["median_step_s"] / bus["median_step_s"],
        "flops_ratio": bus["flops_per_sample"] / base["flops_per_sample"],
        "models": {r["model"]: r for r in rows},
        "settings": {**asdict(settings), "amp": amp, "image_size": config.vision.image_size,
                     "pad_to_max_length": settings.padded, "max_text_len": config.max_text_len},
        "peak_bf16_flops": peak, "peak_entry": peak_key,
        **environment(device),
    }


def equal_time_retrieval(names: list[str], settings: TrainBenchSettings, device: torch.device, log=print) -> dict:
    """Train each model (fresh, same seed) for ``settings.eval_seconds`` of training-step time, then rank
    held-out synthetic images and captions (ITC, then ITM re-ranking of the top 16). Steps alternate
    between the models, the one with less training time so far going next, so both see the same machine."""
    from bus_model.data import SyntheticDataset
    from bus_model.training.evaluate import encode_dataset, retrieval_metrics

    amp = _amp(settings, device)
    log(f"--eval: training each model for {settings.eval_seconds:g} s of step time, then held-out retrieval ...")
    state = {}
    for name in names:
        model, data = build_model_and_data(name, settings.batch_size, settings.seed + 1, settings.image_size, device,
                                           _overrides_for(name, settings), settings.padded)
        state[name] = {"model": model, "data": data, "step": make_step(model, settings.lr, amp, device, settings.compile,
                                                                       settings.compile_backend),
                       "seconds": 0.0, "steps": 0}
    while True:
        pending = [n for n in names if state[n]["seconds"] < settings.eval_seconds]
        if not pending:
            break
        s = state[min(pending, key=lambda n: state[n]["seconds"])]
        batch = s["data"][s["steps"]]  # made outside the timed region
        s["seconds"] += timed(lambda: s["step"](batch), device)
        s["steps"] += 1
        if s["steps"] % 20 == 0:
            log("--eval training: " + ", ".join(f"{n} {state[n]['steps']} steps / {state[n]['seconds']:.0f} s"
                                                for n in names))
    results = {}
    for name in names:
        s = state[name]
        model = s["model"].eval()
        v = model.config.vision
        held_out = SyntheticDataset(settings.eval_images, seed=settings.seed, split="test", image_size=v.image_size,
                                    patch_size=v.patch_size)
        log(f"--eval: retrieval of {name} over {settings.eval_images} held-out image-caption pairs ...")
        with torch.no_grad():
            enc = encode_dataset(model, held_out, s["data"].tokenizer, device=device, batch_size=32, captions=False,
                                 max_caption_len=model.config.max_text_len, num_beams=1, amp=amp)
            metrics = retrieval_metrics(model, enc, device=device, rerank_k=16, batch_size=32, amp=amp)
        results[name] = {"train_seconds": s["seconds"], "train_steps": s["steps"],
                         "images_seen": s["steps"] * settings.batch_size, "num_candidates": settings.eval_images,
                         **{k: metrics[k] for k in ("img2txt_r1", "txt2img_r1", "img2txt_r10", "txt2img_r10",
                                                    "img2txt_meanr", "txt2img_meanr")}}
        log(f"{name}: {s['steps']} steps in {s['seconds']:.1f}s of training, "
            f"img2txt R@1 {metrics['img2txt_r1']:.3f}, txt2img R@1 {metrics['txt2img_r1']:.3f}")
    return results


def render(result: dict) -> str:
    if "cases" in result or "variants" in result:  # --gpu-suite, --eager-vs-compiled
        from .train_suite import render as render_suite

        return render_suite(result)
    rows = list(result["models"].values())
    for r in rows:
        r["gflops_per_sample"] = r["flops_per_sample"] / 1e9
        r["mfu_percent"] = None if r.get("mfu") is None else 100 * r["mfu"]
    columns = [
        ("model", "model", ""), ("median_step_s", "median step (s)", ".3f"), ("images_per_s", "images/s", ".2f"),
        ("gflops_per_sample", "GFLOPs/sample (fwd+bwd)", ".4g"), ("peak_memory_mib", "peak memory (MiB)", ".0f"),
        ("mfu_percent", "MFU (%)", ".1f"), ("compile_s", "compile (s)", ".1f"),
    ]
    # columns that no row has (CPU: no MFU; eager: no compile time; older results) are left out
    table = markdown_table(rows, [c for c in columns if c[0] not in ("mfu_percent", "compile_s")
                                  or any(r.get(c[0]) is not None for r in rows)])
    s = result["settings"]
    evals = [{"model": r["model"], **r["equal_time_eval"]} for r in rows if "equal_time_eval" in r]
    if evals:
        table += ("\n\nequal training time, then retrieval on held-out synthetic data (after ITM re-ranking; chance: "
                  "R@K = K/candidates, mean rank = (candidates + 1)/2):\n\n")
        table += markdown_table(evals, [
            ("model", "model", ""), ("train_seconds", "train time (s)", ".0f"), ("images_seen", "images seen", "d"),
            ("num_candidates", "candidates", "d"), ("img2txt_r1", "img->txt R@1", ".3f"),
            ("txt2img_r1", "txt->img R@1", ".3f"), ("img2txt_r10", "img->txt R@10", ".3f"),
            ("txt2img_r10", "txt->img R@10", ".3f"), ("img2txt_meanr", "img->txt mean rank", ".1f"),
            ("txt2img_meanr", "txt->img mean rank", ".1f")])
    return (
        f"{table}\n\nspeedup (baseline step time / BUS step time): **{result['speedup']:.2f}x**; "
        f"FLOPs ratio BUS/baseline: {result['flops_ratio']:.2f}\n"
        f"batch {s['batch_size']}, {s['steps']} measured steps after {s['warmup']} warm-up, "
        f"{s['image_size']} px, amp={s['amp']}, overrides {s.get('overrides') or 'none'}{compiled_with(s)}; "
        f"{result['device']}; torch {result['torch']}; commit {result['commit']}"
    )


def compiled_with(settings: dict) -> str:
    """``, compile MODE (backend, captions padded to N)`` for a compiled result's settings; ``""`` for an
    eager one (as results from before ``--compile`` existed)."""
    padded = f"captions padded to {settings.get('max_text_len')}"
    if settings.get("compile", "none") == "none":
        return f", {padded}" if settings.get("pad_to_max_length") else ""
    return f", compile {settings['compile']} ({settings.get('compile_backend', 'inductor')}, {padded})"


def plot(result: dict, path: str | None) -> str | None:
    if "cases" in result or "variants" in result:
        from .train_suite import plot as plot_suite

        return plot_suite(result, path)

    def draw(ax):
        names = list(result["models"])
        ips = [result["models"][n]["images_per_s"] for n in names]
        ax.bar(names, ips, color=["tab:green", "tab:gray"])
        ax.set_ylabel("images / s (training)")
        ax.set_title(f"BUS vs baseline: {result['speedup']:.2f}x  ({result['device_type']})")

    return save_plot(path, draw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainBenchSettings()
    parser.add_argument("--model", default=d.model, help=f"BUS config (its -baseline twin is the reference; default {d.model})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--steps", type=int, default=d.steps, help="measured steps per model")
    parser.add_argument("--warmup", type=int, default=d.warmup)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (matters for --eval)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on GPU only)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-model peak memory processes")
    parser.add_argument("--eval", action="store_true",
                        help="also train both models for equal wall-clock time and report held-out retrieval R@1")
    parser.add_argument("--eval-seconds", type=float, default=300.0, help="training time per model for --eval")
    parser.add_argument("--policy", help="selection policy of the compared model (bus_model.selection.POLICIES)")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION__FIELD=JSON",
                        help="set a config field of the compared model, e.g. losses__momentum=0 (repeatable)")
    add_compile_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (bus-tiny, 2 steps)")
    parser.add_argument("--json", help="write the result as JSON here")
    parser.add_argument("--plot", help="write a PNG bar chart here")


def settings_from_args(args) -> TrainBenchSettings:
    if args.quick:
        settings = TrainBenchSettings.quick()
    else:
        settings = TrainBenchSettings(model=args.model, batch_size=args.batch_size, steps=args.steps,
                                      warmup=args.warmup, image_size=args.image_size, seed=args.seed, lr=args.lr)
    settings.amp = args.amp
    settings.memory = not args.no_memory
    settings.compile = getattr(args, "compile", None) or "none"
    settings.compile_backend = getattr(args, "compile_backend", "inductor")
    try:
        check_compile_mode(settings.compile, settings.compile_backend)
    except ValueError as err:
        raise SystemExit(f"bus bench train: error: {err}") from None
    settings.overrides = _parse_overrides(getattr(args, "override", []), getattr(args, "policy", None))
    if args.eval:
        if args.eval_seconds <= 0:
            raise SystemExit("bus bench train: error: --eval-seconds must be > 0")
        settings.eval_seconds = args.eval_seconds
    for name in ("batch_size", "steps"):
        if getattr(settings, name) < 1:
            raise SystemExit(f"bus bench train: error: --{name.replace('_', '-')} must be >= 1")
    if settings.warmup < 0:
        raise SystemExit("bus bench train: error: --warmup must be >= 0")
    return settings


def _parse_overrides(items: list[str], policy: str | None) -> dict:
    """``--override`` items and ``--policy`` -> flat overrides of the compared model."""
    out = parse_overrides(items, "bus bench train")
    if policy is not None:
        out["selection__policy"] = policy
    return out


def main_from_args(args) -> int:
    from bus_model import list_models

    settings = settings_from_args(args)
    if getattr(args, "gpu_suite", False) or getattr(args, "eager_vs_compiled", False):
        from .train_suite import main_from_args as suite_main

        return suite_main(args, settings, run)
    if settings.model not in list_models() or f"{settings.model}-baseline" not in list_models():
        raise SystemExit(f"bus bench train: error: --model must be a BUS config with a -baseline twin, one of "
                         f"{[m for m in list_models() if not m.endswith('-baseline')]}, got {settings.model!r}")
    if settings.overrides:
        from bus_model import get_config

        try:
            get_config(settings.model, **settings.overrides)
        except (TypeError, ValueError) as err:
            raise SystemExit(f"bus bench train: error: --policy/--override: {err}") from None
    from .train_suite import check_compiles

    check_compiles(settings, "bus bench train")
    result = run(settings, log=lambda msg: print(msg, file=sys.stderr))
    return publish(result, render(result), args.json, plot(result, args.plot))


def main(argv: list[str] | None = None) -> int:
    """``python -m bus_benchmarks.train_speed`` = ``bus bench train``; also the entry of the memory probe."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_memory-probe"]:
        name, settings = argv[1], TrainBenchSettings(**json.loads(argv[argv.index("--_settings") + 1]))
        print(json.dumps(_memory_probe(name, settings)))
        return 0
    return run_standalone("train", __doc__, add_arguments, main_from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
