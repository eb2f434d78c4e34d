"""What ``bus_kernels.patch`` saves per model family: tokens per block, FLOPs, step time.

For each family (timm, open_clip, HF CLIP, SigLIP; ``benchmarks/patch_families.py``: one ViT shape,
random init, no download) the unpatched model and the same model patched with text-guided pruning
(BUS TSPS, arXiv 2307.08504 Sec. 3.2; default: after blocks 3/6/9 keep 0.7 of the patch tokens, fuse
the rest) are measured on the same inputs:

* tokens entering each block;
* FLOPs per image of a forward and of a training step (forward + backward), counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls/convolutions/attention; elementwise ops are
  not counted by it);
* median wall time and process CPU time of a forward (no grad) and of a training step, the two
  models alternated in one run so that machine noise hits both (CPU time is the steadier figure
  when other processes share the machine).

Writes JSON (``--json``) and prints one Markdown table per family::

    python -m bus_benchmarks.patch_effect --json patch_effect.json
    python -m bus_benchmarks.patch_effect --families timm siglip --size small
    python -m bus_benchmarks.patch_effect --quick      # seconds: tiny sizes, for smoke tests
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

import bus_kernels.patch

from .command import run_standalone
from .harness import count_flops, environment, markdown_table, synchronize, write_json
from .patch_families import FAMILIES, SIZES, Family, library_version


def tokens_per_layer(family: Family, model, images, text_query) -> list[int]:
    lengths: list[int] = []
    hooks = [b.register_forward_pre_hook(lambda _m, a: lengths.append(a[0].shape[1])) for b in family.blocks(model)]
    try:
        with torch.no_grad():
            run(family, model, images, text_query)
    finally:
        for hook in hooks:
            hook.remove()
    return lengths


def run(family: Family, model, images, text_query):
    """Pooled image embedding ``(B, E)``; with a caption embedding ``text_query (B, C)`` (policy "text")
    in guidance."""
    if text_query is None:
        return family.embed(model, images)
    with bus_kernels.patch.text_guidance(model, text_query):
        return family.embed(model, images)


def train_step(family: Family, model, images, text_query):
    loss = run(family, model, images, text_query).float().logsumexp(-1).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def time_alternating(fns: dict, repeats: int, warmup: int, device) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds per call of each fn; the fns run in turn, ``repeats`` times, after
    ``warmup`` rounds. CPU time (all threads of this process) is the steadier figure on a shared machine."""
    times = {name: {"wall": [], "cpu": []} for name in fns}
    for round_index in range(warmup + repeats):
        for name, fn in fns.items():
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            synchronize(device)
            if round_index >= warmup:
                times[name]["wall"].append(time.perf_counter() - wall)
                times[name]["cpu"].append(time.process_time() - cpu)
    return times


TIMED = ("forward_ms", "forward_cpu_ms", "train_step_ms", "train_step_cpu_ms")


def measure_family(family: Family, args, device) -> list[dict]:
    width, heads = SIZES[args.size]
    torch.manual_seed(0)
    base = family.build(width, heads, args.img_size).to(device).train()
    patched = family.patch(
        copy.deepcopy(base), layers=args.layers, keep=args.keep, policy=args.policy, fuse=not args.no_fuse
    )
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    text_query = torch.randn(args.batch, width, device=device) if args.policy == "text" else None
    # variant -> (model, caption embedding it runs with)
    models = {"unpatched": (base, None), "patched": (patched, text_query)}
    rows = {}
    for variant, (model, query) in models.items():
        rows[variant] = dict(
            family=family.name,
            model=family.model_name(args.size),
            variant=variant,
            tokens_per_layer=tokens_per_layer(family, model, images, query),
            gflops_forward_per_image=count_flops(lambda m=model, q=query: run(family, m, images, q)) / args.batch / 1e9,
            gflops_train_step_per_image=count_flops(lambda m=model, q=query: train_step(family, m, images, q))
            / args.batch
            / 1e9,
        )

    def forward_no_grad(model, query):
        with torch.no_grad():
            run(family, model, images, query)

    fns = {}
    for variant, (model, query) in models.items():
        fns[f"{variant}/forward"] = lambda m=model, q=query: forward_no_grad(m, q)
        fns[f"{variant}/train_step"] = lambda m=model, q=query: train_step(family, m, images, q)
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
    """One table per family, a line per variant; the patched rows show their ratio to the unpatched ones."""
    families = list(dict.fromkeys(row.get("family", "timm") for row in rows))
    return "\n\n".join(
        f"**{family}**\n\n" + _table([row for row in rows if row.get("family", "timm") == family])
        for family in families
    )


def summary(rows: list[dict]) -> str:
    """One line per family: what the patch changed (patched / unpatched)."""
    shown = [
        dict(
            model=row["model"],
            tokens=_runs(row["tokens_per_layer"]),
            train_flops=f"{row['gflops_train_step_per_image_ratio']:.2f}x",
            train_cpu=f"{row['train_step_cpu_ms_ratio']:.2f}x",
            train_wall=f"{row['train_step_ms_ratio']:.2f}x",
            fwd_cpu=f"{row['forward_cpu_ms_ratio']:.2f}x",
        )
        for row in rows
        if row["variant"] == "patched"
    ]
    columns = [
        ("model", "model", ""), ("tokens", "tokens entering each block (patched)", ""),
        ("train_flops", "train-step FLOPs", ""), ("train_cpu", "train-step CPU time", ""),
        ("train_wall", "train-step wall time", ""), ("fwd_cpu", "forward CPU time", ""),
    ]
    return markdown_table(shown, columns)


def render(result: dict) -> str:
    """The README's view of a recorded run: the per-family summary, then each family's table."""
    config = result["config"]
    head = (
        f"Pruning after blocks {config['layers']}, keep {config['keep']}, policy {config['policy']}, fuse "
        f"{config['fuse']}; {config.get('size', 'tiny')} ViTs (12 blocks), batch {config['batch']} at "
        f"{config['img_size']} px; median of {config['repeats']} interleaved runs. Ratios are patched / unpatched."
    )
    return f"{head}\n\n{summary(result['rows'])}\n\n{markdown(result['rows'])}"


def _table(rows: list[dict]) -> str:

    def cell(row, key, digits):
        ratio = f" ({row[key + '_ratio']:.2f}x)" if key + "_ratio" in row else ""
        return f"{row[key]:.{digits}f}{ratio}"

    shown = [
        dict(
            model=row["model"],
            variant=row["variant"],
            tokens=_runs(row["tokens_per_layer"]),
            fwd_flops=cell(row, "gflops_forward_per_image", 3),
            train_flops=cell(row, "gflops_train_step_per_image", 3),
            fwd_ms=f"{cell(row, 'forward_ms', 0)} / {cell(row, 'forward_cpu_ms', 0)}",
            train_ms=f"{cell(row, 'train_step_ms', 0)} / {cell(row, 'train_step_cpu_ms', 0)}",
        )
        for row in rows
    ]
    columns = [
        ("model", "model", ""), ("variant", "variant", ""), ("tokens", "tokens entering each block", ""),
        ("fwd_flops", "GFLOPs fwd / img", ""), ("train_flops", "GFLOPs train step / img", ""),
        ("fwd_ms", "fwd ms (wall / CPU)", ""), ("train_ms", "train step ms (wall / CPU)", ""),
    ]
    return markdown_table(shown, columns)


def _runs(lengths: list[int]) -> str:
    """[197, 197, 139, 139] -> '197x2 139x2'."""
    parts, start = [], 0
    for i in range(1, len(lengths) + 1):
        if i == len(lengths) or lengths[i] != lengths[start]:
            parts.append(f"{lengths[start]}x{i - start}")
            start = i
    return " ".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--size", choices=list(SIZES), default="tiny", help="tiny: width 192; small: width 384")
    parser.add_argument("--layers", nargs="+", type=int, default=[3, 6, 9], help="0-based pruning blocks")
    parser.add_argument("--keep", type=float, default=0.7, help="share of the patch tokens each layer keeps")
    parser.add_argument("--policy", choices=["text", "evit", "random", "tome"], default="text")
    parser.add_argument("--no-fuse", action="store_true", help="drop the pruned tokens instead of fusing them")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); default: torch's choice")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the rows and the environment here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (64 px, batch 2, 1 repeat)")


def main_from_args(args: argparse.Namespace) -> int:
    if args.quick:
        args.size, args.img_size, args.batch, args.repeats, args.warmup = "tiny", 64, 2, 1, 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    families = [FAMILIES[name] for name in args.families]
    rows = [row for family in families for row in measure_family(family, args, device)]
    config = dict(
        families=args.families, size=args.size, layers=args.layers, keep=args.keep, policy=args.policy,
        fuse=not args.no_fuse, batch=args.batch, img_size=args.img_size, repeats=args.repeats, warmup=args.warmup,
        threads=torch.get_num_threads(),
    )
    versions = {family.library: library_version(family.library) for family in families}
    result = dict(benchmark="patch", **environment(device), versions=versions, config=config, rows=rows)
    write_json(args.json, result)
    print(f"{result['device']}; torch {result['torch']}, {versions}; commit {result['commit'][:16]}")
    print(render(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bus_benchmarks.patch_effect`` = ``bus bench patch``."""
    return run_standalone("patch", __doc__, add_arguments, main_from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
