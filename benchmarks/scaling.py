"""``bus bench scaling``: training step time vs image resolution, BUS and baseline.

How cost grows with the number of patches (BUS §4.3, higher resolution at the baseline's cost).

Each resolution is one ``bus bench train`` measurement (same interleaving, same harness)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from .command import run_standalone
from .harness import default_device, environment, markdown_table, plot_by_model, publish
from .train_speed import TrainBenchSettings
from .train_speed import run as run_train


def run(settings: TrainBenchSettings, resolutions, log=print) -> dict:
    rows = []
    for size in resolutions:
        result = run_train(replace(settings, image_size=size, memory=False), log=log)
        for name, m in result["models"].items():
            rows.append({"model": name, "image_size": size, "num_patches": (size // _patch_size(name)) ** 2,
                         "median_step_s": m["median_step_s"], "images_per_s": m["images_per_s"],
                         "gflops_per_sample": m["flops_per_sample"] / 1e9})
        rows[-2]["speedup"] = result["speedup"]
    return {"benchmark": "scaling", "settings": {**settings.__dict__, "resolutions": list(resolutions)},
            "rows": rows, **environment(default_device())}


def _patch_size(name: str) -> int:
    from bus_model import get_config

    return get_config(name).vision.patch_size


def render(result: dict) -> str:
    return markdown_table(result["rows"], [
        ("model", "model", ""), ("image_size", "px", "d"), ("num_patches", "patches", "d"),
        ("median_step_s", "median step (s)", ".3f"), ("images_per_s", "images/s", ".2f"),
        ("gflops_per_sample", "GFLOPs/sample", ".4g"), ("speedup", "speedup vs baseline", ".2f"),
    ]) + f"\n\n{result['device']}; torch {result['torch']}; commit {result['commit']}"


def plot(result: dict, path: str | None) -> str | None:
    return plot_by_model(result, path, "median_step_s", "median training step (s)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainBenchSettings()
    parser.add_argument("--model", default=d.model)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[224, 320, 384, 448])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="bus-tiny at 32 and 64 px, 1 step (smoke test)")
    parser.add_argument("--json")
    parser.add_argument("--plot")


def main_from_args(args) -> int:
    if args.quick:
        settings, sizes = replace(TrainBenchSettings.quick(), steps=1), [32, 64]
    else:
        settings = TrainBenchSettings(model=args.model, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup)
        sizes = args.resolutions
    result = run(settings, sizes, log=lambda msg: print(msg, file=sys.stderr))
    return publish(result, render(result), args.json, plot(result, args.plot))


def main(argv: list[str] | None = None) -> int:
    """``python -m bus_benchmarks.scaling`` = ``bus bench scaling``."""
    return run_standalone("scaling", __doc__, add_arguments, main_from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
