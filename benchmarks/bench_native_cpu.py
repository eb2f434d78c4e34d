"""Native (csrc/ C++) pruning kernels vs the torch reference on CPU: time per call and the ratio.

    python -m bus_benchmarks.bench_native_cpu [--dtype float32] [--json PATH] [--md PATH] [--quick]

Shapes of BUS TSPS on ViT-B/16 at 384 px (Sec. 3.2): B=32 images, N=576 patches, C=768 channels,
H=12 heads of D=64, keep k = 0.7 N and fuse the rest. The cases and the timing are the shared
harness's (``bus bench kernels``: forward, backward alone, forward+backward, median of
torch.utils.benchmark runs); this adds the torch / native ratio per pass. Builds the CPU extension
first if needed (cached). Defaults write ``benchmarks/results/native_cpu_<dtype>.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from bus_benchmarks.harness import environment, markdown_table, write_json
from bus_benchmarks.kernels import measure, pruning_cases
from bus_kernels.build import ensure_built

SHAPES = {"full": (32, 576, 768, 12, 64), "quick": (2, 50, 32, 2, 16)}  # B, N, C, H, D
KEEP = 0.7
PASSES = (("fwd_ms", "forward"), ("bwd_ms", "backward"), ("fwd_bwd_ms", "forward+backward"))
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run(dtype: torch.dtype, quick: bool = False) -> dict:
    device = torch.device("cpu")
    torch.manual_seed(0)
    rows = []
    for case in pruning_cases(*SHAPES["quick" if quick else "full"], KEEP, dtype, device):
        timed = {backend: measure(case, backend, device) for backend in ("torch", "native")}
        for key, name in PASSES:
            t, n = timed["torch"][key], timed["native"][key]
            rows.append({"op": case.op, "shape": case.shape, "pass": name, "torch_ms": t, "native_ms": n,
                         "speedup": t / n})
    return {"benchmark": "native_cpu", "dtype": str(dtype), "rows": rows,
            "loadavg_1min": os.getloadavg()[0], **environment(device)}


def render(result: dict) -> str:
    table = markdown_table(result["rows"], [
        ("op", "op", ""), ("shape", "shape", ""), ("pass", "pass", ""), ("torch_ms", "torch (ms)", ".2f"),
        ("native_ms", "native (ms)", ".2f"), ("speedup", "torch / native", ".2f"),
    ])
    return (f"{result['device']}, load average {result['loadavg_1min']:.1f} while measuring; "
            f"torch {result['torch']}, commit {result['commit'][:12]}\n\n{table}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", help="default: benchmarks/results/native_cpu_<dtype>.json")
    parser.add_argument("--md", help="default: benchmarks/results/native_cpu_<dtype>.md")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    args = parser.parse_args(argv)
    why = ensure_built(cpu_only=True)
    if why is not None:
        print(f"native backend unavailable: {why}", file=sys.stderr)
        return 1
    result = run(getattr(torch, args.dtype), quick=args.quick)
    text = render(result)
    print(text)
    write_json(args.json or os.path.join(RESULTS, f"native_cpu_{args.dtype}.json"), result)
    md = args.md or os.path.join(RESULTS, f"native_cpu_{args.dtype}.md")
    os.makedirs(os.path.dirname(os.path.abspath(md)), exist_ok=True)
    with open(md, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
