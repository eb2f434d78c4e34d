"""``bus bench flops``: training FLOPs per sample, BUS vs baseline, paper scale, several resolutions.

BUS §4.3: the saving lets BUS train at a higher resolution for the baseline's cost.

Counted with ``torch.utils.flop_counter`` over forward + backward of one batch of 2 (the ITM loss mines
its negatives inside the batch), on meta tensors: shapes only, nothing is computed, so paper-scale
models are counted in seconds on a laptop. A model that cannot run on meta tensors is counted on
the CPU instead (the JSON says which).
"""

from __future__ import annotations

import argparse
import sys

import torch

from .command import run_standalone
from .harness import count_flops, environment, markdown_table, plot_by_model, publish

BATCH = 2


def model_inputs(config, batch: int, device: torch.device, text_len: int = 24):
    """Synthetic-shaped inputs for ``BusModel.forward``: images, ids ([CLS] ... [SEP]), mask, PTM labels."""
    v, t = config.vision, config.text
    images = torch.randn(batch, v.in_chans, v.image_size, v.image_size, device=device)
    ids = torch.randint(max(t.mask_token_id, t.sep_token_id, t.cls_token_id) + 1, t.vocab_size, (batch, text_len), device=device)
    ids[:, 0], ids[:, -1] = t.cls_token_id, t.sep_token_id
    mask = torch.ones(batch, text_len, dtype=torch.int64, device=device)
    labels = (torch.rand(batch, (v.image_size // v.patch_size) ** 2, device=device) > 0.7).float()
    return images, ids, mask, labels


def training_flops(name: str, image_size: int, device: str = "meta") -> tuple[float, str]:
    """(FLOPs per sample of forward + backward, device it was counted on)."""
    from bus_model import create_model

    try:
        dev = torch.device(device)
        torch.manual_seed(0)
        with dev:
            model = create_model(name, vision={"image_size": image_size})
        batch = model_inputs(model.config, BATCH, dev)
        total = count_flops(lambda: model(*batch).loss.backward())
        return total / BATCH, device
    except (NotImplementedError, RuntimeError) as e:
        if device != "meta":
            raise
        print(f"{name} @ {image_size}px: meta run failed ({type(e).__name__}: {str(e)[:120]}); counting on CPU", file=sys.stderr)
        return training_flops(name, image_size, "cpu")


def run(model: str = "bus-base", resolutions=(224, 384, 512)) -> dict:
    rows = []
    for size in resolutions:
        for name in (model, f"{model}-baseline"):
            flops, counted_on = training_flops(name, size)
            rows.append({"model": name, "image_size": size, "flops_per_sample": flops, "counted_on": counted_on})
    by_key = {(r["model"], r["image_size"]): r for r in rows}
    base_224 = by_key[(f"{model}-baseline", resolutions[0])]["flops_per_sample"]
    for r in rows:
        r["gflops_per_sample"] = r["flops_per_sample"] / 1e9
        r["relative_to_baseline_same_size"] = r["flops_per_sample"] / by_key[(f"{model}-baseline", r["image_size"])]["flops_per_sample"]
        r["relative_to_baseline_smallest"] = r["flops_per_sample"] / base_224
    return {"benchmark": "flops", "model": model, "batch": BATCH, "rows": rows, **environment(torch.device("cpu"))}


def render(result: dict) -> str:
    return markdown_table(result["rows"], [
        ("model", "model", ""), ("image_size", "px", "d"), ("gflops_per_sample", "GFLOPs/sample (fwd+bwd)", ".4g"),
        ("relative_to_baseline_same_size", "vs baseline, same px", ".2f"),
        ("relative_to_baseline_smallest", f"vs baseline @ {result['rows'][0]['image_size']}px", ".2f"),
    ])


def plot(result: dict, path: str | None) -> str | None:
    return plot_by_model(result, path, "gflops_per_sample", "training GFLOPs / sample")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="bus-base", help="BUS config; its -baseline twin is the reference")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[224, 384, 512])
    parser.add_argument("--quick", action="store_true", help="bus-tiny at two small sizes (smoke test)")
    parser.add_argument("--json")
    parser.add_argument("--plot")


def main_from_args(args) -> int:
    model, sizes = ("bus-tiny", [32, 64]) if args.quick else (args.model, args.resolutions)
    result = run(model, tuple(sizes))
    return publish(result, render(result), args.json, plot(result, args.plot))


def main(argv: list[str] | None = None) -> int:
    """``python -m bus_benchmarks.flops`` = ``bus bench flops``."""
    return run_standalone("flops", __doc__, add_arguments, main_from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
