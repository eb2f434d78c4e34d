"""``bus bench overhead``: the host's cost of a training step and of one bus_kernels call, on CPU.

On a GPU whose kernels are short, a training step costs about (dispatched ops) x (host time per op), not
its FLOPs (issue 22: one H200, bus-small at batch 32, ~6000 ops in 114 ms). This benchmark measures the
host side on CPU, where it is exact (op counts) or at least repeatable (host time). Every number is CPU;
no GPU time is estimated.

1. Dispatched ops per training step (forward + backward + fused AdamW, batch 2, bf16 autocast), total,
   by phase and by model part (``dispatch_count.count_step_ops``), for ``attn_impl`` sdpa and varlen, on
   the named configs. On CPU each bus_kernels op runs on the backend this machine picks (the JSON names
   them): the pruning ops on native C++ custom ops where built (one op each, as Triton's), varlen attention
   on the PyTorch reference, whose aten ops are counted one by one. The "Triton path" count repeats the
   step with every bus_kernels op on its Triton custom op (a child process under TRITON_INTERPRET=1, on
   the narrow stand-in below): the ops a GPU dispatches.
2. Host milliseconds per step on a narrow stand-in: the same configs with every width 48 (vision.width,
   text.hidden_size, the MLP sizes, the ITC embedding; head counts the largest divisor of 48 not above
   the config's; a ViT 64 wide where the config's ViT and text widths differ) and 64 px images (at most
   the config's), so that compute is small and the step time is mostly the host's. The stand-in's op count
   is checked against the config's (same op graph). Steps with bf16 autocast (the counted step) and in fp32
   (the same graph without the autocast casts): bf16 matmuls are emulated on CPUs without AVX512-BF16 or
   AMX, so there even a 48-wide bf16 step computes for a good share of its time; each row gives the share
   of a profiled step spent in matmuls, attention and convolution ("compute share"). Eager, and with
   ``--compile`` the model compiled by ``torch.compile`` (backend ``aot_eager`` by default: the traced
   graph run op by op, the host cost of the compiled graph without a GPU; sdpa only; fullgraph, or where
   that fails its error and a run with graph breaks). The models' steps alternate (the
   order rotates every round), and the median and lower quartile of all step times are reported, wall
   clock and this thread's CPU time (which leaves out the time other processes hold the core: the
   development machines are shared). One torch thread throughout (host cost is single-threaded; on a
   shared machine OpenMP threads add noise).
3. Host microseconds of one public call of each bus_kernels op, kernels stubbed: a child process under
   TRITON_INTERPRET=1 selects the Triton backend for every op (``BUS_KERNELS_BACKEND=triton``) and
   replaces every Triton kernel of ``bus_kernels.ops`` by a stub that only counts its launches, so a call
   runs validation, backend choice, the ``torch.library`` custom op and autograd layers and the aten ops
   around the kernels: the wrapper's own cost, the part a GPU cannot hide. Tiny inputs (allocations stay
   negligible, as with a GPU's caching allocator). Forward without and with autograd recording, and
   forward+backward (``torch.autograd.grad``); beside them ``x * 2`` and a trivial custom op with autograd
   for scale. Issue 23's targets, judged on thread CPU time: <= 15 us forward, <= 60 us forward+backward.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from .command import run_standalone
from .harness import environment, publish, timed
from .overhead_ops import FWD_BWD_TARGET_US, FWD_TARGET_US, PUBLIC_OPS, clock, op_host_times, quantile  # noqa: F401
from .overhead_report import render  # noqa: F401  (the registry's render hook)

DEVICE = torch.device("cpu")


@dataclass
class OverheadSettings:
    models: tuple[str, ...] = ("bus-small", "bus-small-baseline")
    batch_size: int = 2
    attn_impls: tuple[str, ...] = ("sdpa", "varlen")
    width: int = 48  # every width of the narrow stand-in
    image_size: int = 64  # the stand-in's images (at most the config's): fewer tokens, the same op graph (checked)
    precisions: tuple[str, ...] = ("bf16", "fp32")  # stand-in steps: bf16 autocast (the counted step) and fp32
    # (the same graph without the autocast casts; bf16 matmuls are emulated on CPUs without AVX512-BF16/AMX,
    # about 25x slower than fp32 here, so the bf16 stand-in is not free of compute)
    rounds: int = 8  # interleaved timing rounds (host ms per step)
    steps_per_round: int = 2  # timed steps per model per round
    warmup: int = 2  # unmeasured steps per model first
    compile: bool = False  # also time the step with the model compiled (sdpa only)
    compile_backend: str = "aot_eager"
    triton_path: bool = True  # count the step with every bus_kernels op on Triton (interpreter child)
    op_rounds: int = 9  # interleaved timing rounds (per-op host time)
    op_calls: int = 200  # calls per timed block (forward; forward+backward: a quarter)
    count_configs: bool = True  # also count the full-width configs (else only the stand-in)
    seed: int = 0
    timings: dict = field(default_factory=dict)  # filled in: section -> seconds

    @classmethod
    def quick(cls) -> "OverheadSettings":
        """Seconds on a CPU: for the test suite."""
        return cls(models=("bus-tiny", "bus-tiny-baseline"), rounds=2, steps_per_round=1, warmup=1,
                   triton_path=False, op_rounds=2, op_calls=8)


# ---------------------------------------------------------------------------------------------
# the narrow stand-in


def _heads(width: int, heads: int) -> int:
    """The largest divisor of ``width`` that is at most ``heads``: head dims stay integral."""
    return max(h for h in range(1, min(width, heads) + 1) if width % h == 0)


def narrow_overrides(name: str, width: int, image_size: int | None = None) -> dict:
    """Flat config overrides that set every width of ``name`` to ``width``: same op graph, negligible compute.
    Where the config's ViT is wider or narrower than its text tower (a projection maps the text [CLS] for
    selection), the ViT gets ``width + 16`` so that the stand-in keeps that projection. ``image_size``: at
    most the config's, rounded down to whole patches (at least 2 x 2)."""
    from bus_model import get_config

    c = get_config(name)
    v_width = width if c.vision.width == c.text.hidden_size else width + 16
    size = {}
    if image_size is not None:
        patch = c.vision.patch_size
        size["vision__image_size"] = max(2 * patch, min(image_size, c.vision.image_size) // patch * patch)
    return {**size,
        "vision__width": v_width, "vision__num_heads": _heads(v_width, c.vision.num_heads), "vision__mlp_ratio": 1.0,
        "text__hidden_size": width, "text__num_heads": _heads(width, c.text.num_heads),
        "text__intermediate_size": width, "pad__mlp_ratio": 1.0, "losses__embed_dim": width,
    }


def _build(name: str, settings: OverheadSettings, overrides: dict):
    """(model, batch, fused AdamW) as ``bus bench train`` builds them, batch ``settings.batch_size``."""
    from .train_speed import build_model_and_data

    model, data = build_model_and_data(name, settings.batch_size, settings.seed, None, DEVICE, overrides)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return model, data[0], optimizer


def _standin(name: str, settings: OverheadSettings, impl: str) -> dict:
    return {"attn_impl": impl, **narrow_overrides(name, settings.width, settings.image_size)}


def kernel_backends() -> dict:
    """The backend each bus_kernels op gets here for bf16 inputs that require grad (what the counted step runs)."""
    from bus_kernels.backends import select_backend

    out = {}
    for op in ("text_patch_scores", "topk_gather", "varlen_attention"):
        try:
            out[op] = select_backend(op, DEVICE, torch.bfloat16, True)
        except ValueError as err:
            out[op] = f"none: {err}"
    return out


# ---------------------------------------------------------------------------------------------
# 1. dispatched ops per step


def _count(name: str, settings: OverheadSettings, overrides: dict) -> dict:
    from .dispatch_count import count_step_ops

    model, batch, optimizer = _build(name, settings, overrides)
    result = count_step_ops(model, batch, amp=True, optimizer=optimizer)  # batch 2, bf16 autocast, fused AdamW
    result["by_op"] = dict(list(result["by_op"].items())[:12])  # the most frequent ops
    return result


def count_ops(settings: OverheadSettings, log=print) -> list[dict]:
    rows = []
    for name in settings.models:
        for impl in settings.attn_impls:
            log(f"counting the ops of a {name} step, attn_impl={impl} ...")
            standin = _count(name, settings, _standin(name, settings, impl))
            row = {"model": name, "attn_impl": impl, "standin_total": standin["total"]}
            if settings.count_configs:
                row.update(_count(name, settings, {"attn_impl": impl}))
                row["same_op_graph"] = row["total"] == standin["total"]
            else:
                row.update(standin)
                row["counted_on"] = "stand-in"
            rows.append(row)
    return rows


def _triton_count_child(settings: OverheadSettings) -> dict:
    """In the TRITON_INTERPRET=1 child: the stand-in step's ops with every bus_kernels op on Triton (the
    interpreter runs the kernels: the stand-in keeps it to minutes), per model and impl."""
    rows = []
    for name in settings.models:
        for impl in settings.attn_impls:
            row = {"model": name, "attn_impl": impl}
            try:
                row["triton_path"] = _count(name, settings, _standin(name, settings, impl))
            except Exception as err:  # noqa: BLE001 - recorded, the other rows still run
                row["error"] = _error(err)
            rows.append(row)
    return {"rows": rows, "backends": kernel_backends()}


# ---------------------------------------------------------------------------------------------
# 2. host milliseconds per step, narrow stand-in


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip()[:800]}"


def _make_step(model, optimizer, amp: bool):
    def step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(*batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _compiled_entry(name: str, precision: str, settings: OverheadSettings, log) -> dict:
    """A compiled stand-in step (sdpa): fullgraph first; where that fails, its error and a run with graph breaks."""
    import torch._dynamo

    entry = {"model": name, "attn_impl": "sdpa", "precision": precision,
             "mode": f"compiled ({settings.compile_backend})"}
    for fullgraph in (True, False):
        model, batch, optimizer = _build(name, settings, _standin(name, settings, "sdpa"))
        log(f"compiling the {name} stand-in step ({precision}, backend {settings.compile_backend}, "
            f"fullgraph={fullgraph}) ...")
        torch._dynamo.utils.counters.clear()
        try:
            compiled = torch.compile(model, backend=settings.compile_backend, fullgraph=fullgraph, dynamic=False)
            step = _make_step(compiled, optimizer, precision == "bf16")
            entry["compile_s"] = timed(lambda: step(batch), DEVICE)  # the first step traces and compiles
            entry["fullgraph"] = fullgraph
            entry["graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            entry["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
            entry.update(step=step, batch=batch)
            return entry
        except Exception as err:  # noqa: BLE001 - the benchmark records why and goes on
            entry["fullgraph_error" if fullgraph else "error"] = _error(err)
            log(f"  failed: {_error(err)[:200]}")
    return entry


# the ops that compute (the rest of a stand-in step is host work): matmuls, attention, the patch embedding
_COMPUTE_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product",
                "aten::_slow_conv2d", "aten::mkldnn_convolution", "aten::convolution_backward")


def compute_share(step, batch) -> float:
    """Share of one profiled step's self CPU time spent in ``_COMPUTE_OPS`` (the profiler's own cost counts
    as the rest, so this is a lower bound)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    compute = sum(e.self_cpu_time_total for e in events if e.key.startswith(_COMPUTE_OPS))
    return compute / total if total else 0.0


def time_steps(settings: OverheadSettings, log=print) -> list[dict]:
    """Per (model, impl, precision, mode): step times of the stand-in, interleaved; eager steps also counted."""
    from .dispatch_count import count_step_ops

    entries = []
    for impl in settings.attn_impls:
        for precision in settings.precisions:
            for name in settings.models:
                model, batch, optimizer = _build(name, settings, _standin(name, settings, impl))
                amp = precision == "bf16"
                ops = count_step_ops(model, batch, amp=amp, optimizer=optimizer)["total"]
                entries.append({"model": name, "attn_impl": impl, "precision": precision, "mode": "eager", "ops": ops,
                                "step": _make_step(model, optimizer, amp), "batch": batch})
    if settings.compile and "sdpa" in settings.attn_impls:
        entries += [_compiled_entry(name, p, settings, log) for p in settings.precisions for name in settings.models]
    live = [e for e in entries if "step" in e]
    for e in live:
        for _ in range(settings.warmup):
            e["step"](e["batch"])
        e["times"] = []
    log(f"timing {len(live)} stand-in steps, {settings.rounds} interleaved rounds x {settings.steps_per_round} "
        "steps ...")
    for r in range(settings.rounds):
        order = live[r % len(live):] + live[:r % len(live)]
        for e in order if r % 2 == 0 else order[::-1]:
            for _ in range(settings.steps_per_round):
                e["times"].append(clock(lambda: e["step"](e["batch"])))
    rows = []
    for e in entries:
        row = {k: v for k, v in e.items() if k not in ("step", "batch", "times")}
        if "times" in e:
            wall = [w * 1e3 for w, _ in e["times"]]
            cpu = [c * 1e3 for _, c in e["times"]]
            row.update(median_ms=quantile(wall, 0.5), p25_ms=quantile(wall, 0.25), cpu_median_ms=quantile(cpu, 0.5),
                       cpu_p25_ms=quantile(cpu, 0.25), steps=len(wall), step_times_ms=wall, step_cpu_ms=cpu,
                       compute_share=compute_share(e["step"], e["batch"]))
            if "ops" in row:  # eager (a compiled graph runs other, decomposed ops)
                row["cpu_us_per_op"] = row["cpu_median_ms"] * 1e3 / row["ops"]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# 3. host microseconds per public op call, kernels stubbed (overhead_ops.py)


def _op_host_child(settings: OverheadSettings) -> dict:
    """In the TRITON_INTERPRET=1 child: ``overhead_ops.op_host_times`` and the backend each op ran on."""
    return {**op_host_times(settings.op_rounds, settings.op_calls), "backends": kernel_backends()}


def _run_child(kind: str, settings: OverheadSettings) -> dict:
    """Run ``kind`` in a child process under TRITON_INTERPRET=1 with the Triton backend for every op."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "BUS_KERNELS_BACKEND": "triton"}
    cmd = [sys.executable, "-m", "bus_benchmarks.overhead", "--_child", kind, json.dumps(asdict(settings))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        return {"error": f"child {kind} failed (status {proc.returncode}): {proc.stderr.strip()[-1500:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# the benchmark


def run(settings: OverheadSettings, log=print) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(settings, log)
    finally:
        torch.set_num_threads(threads)


def _run(settings: OverheadSettings, log) -> dict:
    clock = {}
    t0 = time.perf_counter()
    rows = count_ops(settings, log)
    clock["counts_s"] = time.perf_counter() - t0
    if settings.triton_path:
        log("counting the Triton path (TRITON_INTERPRET=1 child, on the stand-ins) ...")
        t0 = time.perf_counter()
        triton = _run_child("triton-count", settings)
        clock["triton_path_s"] = time.perf_counter() - t0
        by_key = {(r["model"], r["attn_impl"]): r for r in triton.get("rows", [])}
        for row in rows:
            t = by_key.get((row["model"], row["attn_impl"]), {})
            if "triton_path" in t:
                row["triton_path_total"] = t["triton_path"]["total"]
                row["triton_path"] = t["triton_path"]
            else:
                row["triton_path_error"] = t.get("error") or triton.get("error", "not counted")
    t0 = time.perf_counter()
    steps = time_steps(settings, log)
    clock["step_times_s"] = time.perf_counter() - t0
    log("timing one public call of each bus_kernels op, kernels stubbed (TRITON_INTERPRET=1 child) ...")
    t0 = time.perf_counter()
    ops = _run_child("op-host", settings)
    clock["op_host_s"] = time.perf_counter() - t0
    settings.timings = clock
    return {
        "benchmark": "overhead",
        "ops_per_step": rows,
        "kernel_backends": kernel_backends(),
        "host_ms_per_step": steps,
        "op_host_us": ops,
        "targets_us": {"fwd": FWD_TARGET_US, "fwd_bwd": FWD_BWD_TARGET_US},
        "settings": asdict(settings),
        **environment(DEVICE),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = OverheadSettings()
    parser.add_argument("--models", nargs="+", default=list(d.models),
                        help="configs to measure (a BUS config and its -baseline twin are also compared)")
    parser.add_argument("--attn-impls", nargs="+", default=list(d.attn_impls), choices=["sdpa", "varlen"])
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--width", type=int, default=d.width, help="every width of the narrow stand-in")
    parser.add_argument("--rounds", type=int, default=d.rounds, help="interleaved timing rounds (step time)")
    parser.add_argument("--steps-per-round", type=int, default=d.steps_per_round)
    parser.add_argument("--warmup", type=int, default=d.warmup, help="unmeasured steps per model first")
    parser.add_argument("--compile", action="store_true", help="also time the stand-in step under torch.compile (sdpa)")
    parser.add_argument("--compile-backend", default=d.compile_backend, help="torch.compile backend for --compile")
    parser.add_argument("--no-triton-path", action="store_true",
                        help="skip the count with every bus_kernels op on Triton (interpreter child)")
    parser.add_argument("--image-size", type=int, default=d.image_size,
                        help="image size of the stand-in (at most the config's; same op graph, fewer tokens)")
    parser.add_argument("--precisions", nargs="+", default=list(d.precisions), choices=["bf16", "fp32"],
                        help="stand-in steps timed with bf16 autocast and/or in fp32")
    parser.add_argument("--no-config-counts", action="store_true",
                        help="count only the narrow stand-ins, not the full-width configs")
    parser.add_argument("--op-rounds", type=int, default=d.op_rounds, help="interleaved timing rounds (per op)")
    parser.add_argument("--op-calls", type=int, default=d.op_calls, help="calls per timed block (per op)")
    parser.add_argument("--quick", action="store_true", help="bus-tiny, few rounds, no Triton-path count (smoke test)")
    parser.add_argument("--json", help="write the result as JSON here")
    parser.add_argument("--markdown", help="write the tables as Markdown here")


def settings_from_args(args) -> OverheadSettings:
    from bus_model import list_models

    if args.quick:
        settings = OverheadSettings.quick()
        settings.compile = args.compile
        settings.compile_backend = args.compile_backend
        settings.attn_impls = tuple(args.attn_impls)
        settings.precisions = tuple(args.precisions)
    else:
        settings = OverheadSettings(
            models=tuple(args.models), batch_size=args.batch_size, attn_impls=tuple(args.attn_impls), width=args.width,
            rounds=args.rounds, steps_per_round=args.steps_per_round, warmup=args.warmup, compile=args.compile,
            compile_backend=args.compile_backend, triton_path=not args.no_triton_path,
            image_size=args.image_size, precisions=tuple(args.precisions), op_rounds=args.op_rounds,
            op_calls=args.op_calls,
            count_configs=not args.no_config_counts)
    unknown = [m for m in settings.models if m not in list_models()]
    if unknown:
        raise SystemExit(f"bus bench overhead: error: --models: unknown model(s) {unknown}; available: {list_models()}")
    for name in ("batch_size", "width", "rounds", "steps_per_round", "op_rounds", "op_calls"):
        if getattr(settings, name) < 1:
            raise SystemExit(f"bus bench overhead: error: --{name.replace('_', '-')} must be >= 1")
    if settings.warmup < 0:
        raise SystemExit("bus bench overhead: error: --warmup must be >= 0")
    return settings


def main_from_args(args) -> int:
    settings = settings_from_args(args)
    result = run(settings, log=lambda msg: print(msg, file=sys.stderr))
    text = render(result)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(f"# bus bench overhead\n\nCommand: `{result['command']}` ({result['date']})\n\n{text}\n")
        print(f"wrote {args.markdown}", file=sys.stderr)
    return publish(result, text, args.json)


def main(argv: list[str] | None = None) -> int:
    """``python -m bus_benchmarks.overhead`` = ``bus bench overhead``; also the entry of its child processes."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        kind, raw = argv[1], json.loads(argv[2])
        settings = OverheadSettings(**{**raw, "models": tuple(raw["models"]), "attn_impls": tuple(raw["attn_impls"])})
        with contextlib.redirect_stdout(sys.stderr):  # only the result on stdout
            result = _op_host_child(settings) if kind == "op-host" else _triton_count_child(settings)
        print(json.dumps(result))
        return 0
    return run_standalone("overhead", __doc__, add_arguments, main_from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
