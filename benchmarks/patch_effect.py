"""What ``bus_kernels.patch.timm`` saves on a timm ViT: tokens per layer, FLOPs, step time.

For each model (random init, no download) the unpatched ViT and the same ViT patched with
text-guided pruning (BUS TSPS, arXiv 2307.08504 Sec. 3.2; default: after layers 3/6/9 keep 0.7 of
the patch tokens, fuse the rest) are measured on the same inputs:

* tokens entering each block;
* FLOPs per image of a forward and of a training step (forward + backward), counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls/convolutions/attention; elementwise ops are
  not counted by it);
* median wall time and process CPU time of a forward (no grad) and of a training step, the two
  models alternated so that machine noise hits both (CPU time is the steadier figure when other
  processes share the machine).

Writes JSON (``--json``) and prints a Markdown table::

    python benchmarks/patch_effect.py --json patch_effect.json
    python benchmarks/patch_effect.py --quick          # seconds: tiny sizes, for smoke tests
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import bus_kernels.patch


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def tokens_per_layer(model, images, text_query) -> list[int]:
    lengths: list[int] = []
    hooks = [b.register_forward_pre_hook(lambda _m, a: lengths.append(a[0].shape[1])) for b in model.blocks]
    try:
        with torch.no_grad():
            run(model, images, text_query)
    finally:
        for hook in hooks:
            hook.remove()
    return lengths


def run(model, images, text_query):
    if text_query is None or bus_kernels.patch._core.STATE_ATTR not in vars(model):
        return model(images)
    with bus_kernels.patch.text_guidance(model, text_query):
        return model(images)


def train_step(model, images, text_query):
    loss = run(model, images, text_query).float().logsumexp(-1).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def count_flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(fns: dict, repeats: int, warmup: int, device) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds per call of each fn; the fns run in turn, ``repeats`` times, after
    ``warmup`` rounds. CPU time (all threads of this process) is the steadier figure on a shared machine."""
    times = {name: {"wall": [], "cpu": []} for name in fns}
    for round_index in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            if round_index >= warmup:
                times[name]["wall"].append(time.perf_counter() - wall)
                times[name]["cpu"].append(time.process_time() - cpu)
    return times


TIMED = ("forward_ms", "forward_cpu_ms", "train_step_ms", "train_step_cpu_ms")


def measure_model(name: str, args, device) -> list[dict]:
    import timm

    torch.manual_seed(0)
    base = timm.create_model(name, pretrained=False, img_size=args.img_size).to(device)
    patched = bus_kernels.patch.timm(
        copy.deepcopy(base), layers=args.layers, keep=args.keep, policy=args.policy, fuse=not args.no_fuse
    )
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    text_query = torch.randn(args.batch, base.embed_dim, device=device) if args.policy == "text" else None
    models = {"unpatched": base, "patched": patched}
    rows = {}
    for variant, model in models.items():
        model.train()
        rows[variant] = dict(
            model=name,
            variant=variant,
            tokens_per_layer=tokens_per_layer(model, images, text_query),
            gflops_forward_per_image=count_flops(lambda m=model: run(m, images, text_query)) / args.batch / 1e9,
            gflops_train_step_per_image=count_flops(lambda m=model: train_step(m, images, text_query))
            / args.batch
            / 1e9,
        )

    def forward_no_grad(model):
        with torch.no_grad():
            run(model, images, text_query)

    fns = {}
    for variant, model in models.items():
        fns[f"{variant}/forward"] = lambda m=model: forward_no_grad(m)
        fns[f"{variant}/train_step"] = lambda m=model: train_step(m, images, text_query)
    times = time_alternating(fns, args.repeats, args.warmup, device)
    for variant, row in rows.items():
        for what in ("forward", "train_step"):
            row[f"{what}_ms"] = 1e3 * statistics.median(times[f"{variant}/{what}"]["wall"])
            row[f"{what}_cpu_ms"] = 1e3 * statistics.median(times[f"{variant}/{what}"]["cpu"])
    base_row, patched_row = rows["unpatched"], rows["patched"]
    for key in TIMED + ("gflops_forward_per_image", "gflops_train_step_per_image"):
        patched_row[f"{key}_ratio"] = patched_row[key] / base_row[key]
    patched_row["train_step_speedup"] = base_row["train_step_ms"] / patched_row["train_step_ms"]
    patched_row["train_step_cpu_speedup"] = base_row["train_step_cpu_ms"] / patched_row["train_step_cpu_ms"]
    return [base_row, patched_row]


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | variant | tokens per layer | GFLOPs fwd / img | GFLOPs train / img "
        "| fwd ms (wall / CPU) | train step ms (wall / CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:

        def cell(key, digits):
            ratio = f" ({row[key + '_ratio']:.2f}x)" if key + "_ratio" in row else ""
            return f"{row[key]:.{digits}f}{ratio}"

        lines.append(
            f"| {row['model']} | {row['variant']} | {_runs(row['tokens_per_layer'])} "
            f"| {cell('gflops_forward_per_image', 3)} | {cell('gflops_train_step_per_image', 3)} "
            f"| {cell('forward_ms', 0)} / {cell('forward_cpu_ms', 0)} "
            f"| {cell('train_step_ms', 0)} / {cell('train_step_cpu_ms', 0)} |"
        )
    return "\n".join(lines)


def _runs(lengths: list[int]) -> str:
    """[197, 197, 139, 139] -> '197x2 139x2'."""
    parts, start = [], 0
    for i in range(1, len(lengths) + 1):
        if i == len(lengths) or lengths[i] != lengths[start]:
            parts.append(f"{lengths[start]}x{i - start}")
            start = i
    return " ".join(parts)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224", "vit_small_patch16_224"])
    parser.add_argument("--layers", nargs="+", type=int, default=[3, 6, 9], help="0-based pruning blocks")
    parser.add_argument("--keep", type=float, default=0.7, help="share of the patch tokens each layer keeps")
    parser.add_argument("--policy", choices=["text", "evit"], default="text")
    parser.add_argument("--no-fuse", action="store_true", help="drop the pruned tokens instead of fusing them")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); default: torch's choice")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="write the rows and the machine description here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (vit_tiny, 64 px, batch 2, 1 repeat)")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.img_size, args.batch, args.repeats, args.warmup = ["vit_tiny_patch16_224"], 64, 2, 1, 0
        args.layers = [layer for layer in args.layers if layer < 12] or [3]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    import timm

    rows = [row for name in args.models for row in measure_model(name, args, device)]
    result = dict(
        benchmark="patch_effect",
        command="python benchmarks/patch_effect.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        device=_device_name(device),
        torch=torch.__version__,
        timm=timm.__version__,
        commit=_git_commit(),
        config=dict(
            layers=args.layers, keep=args.keep, policy=args.policy, fuse=not args.no_fuse,
            batch=args.batch, img_size=args.img_size, repeats=args.repeats, warmup=args.warmup,
        ),
        rows=rows,
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"device: {result['device']}; torch {result['torch']}, timm {result['timm']}; commit {result['commit'][:10]}")
    print(f"pruning: layers {args.layers}, keep {args.keep}, policy {args.policy}, fuse {not args.no_fuse}; "
          f"batch {args.batch} at {args.img_size} px; median of {args.repeats}")
    print(markdown(rows))
    return result


if __name__ == "__main__":
    main()
