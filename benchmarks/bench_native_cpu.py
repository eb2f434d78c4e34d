"""CPU benchmark of the native (csrc/) pruning kernels against the torch reference backend.

    python benchmarks/bench_native_cpu.py [--out benchmarks/results] [--dtype float32] [--min-run-time 1.0]

Shapes of BUS TSPS on ViT-B/16 at 384 px (Sec. 3.2): B=32 images, N=576 patches, C=768 channels,
H=12 heads of D=64, keep k = 0.7 N and fuse the rest. For each op, forward and forward+backward, the
median time of each backend (torch.utils.benchmark, blocked_autorange) and the ratio torch / native.
Writes ``native_cpu.json`` (rows + machine, versions, commit) and ``native_cpu.md`` (a table).
Builds the CPU extension first if needed (cached).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils import benchmark

import bus_kernels as bk
from bus_kernels.build import ensure_built

B, N, C, H, D = 32, 576, 768, 12, 64
KEEP = int(0.7 * N)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def _cases(dtype: torch.dtype):
    """(op, pass, make_inputs() -> tuple, run(inputs, backend)) for each measured case."""
    def topk_inputs(grad: bool):
        x = torch.randn(B, N, C, dtype=dtype, requires_grad=grad)
        s = torch.rand(B, N, requires_grad=grad)
        g = torch.randn(B, KEEP + 1, C, dtype=dtype)
        return x, s, g

    def topk_fwd(inp, backend):
        x, s, _ = inp
        return bk.topk_gather(x, s, KEEP, backend=backend)

    def topk_fwd_bwd(inp, backend):
        x, s, g = inp
        tokens, _ = bk.topk_gather(x, s, KEEP, backend=backend)
        torch.autograd.grad(tokens, (x, s), g)

    def tps_inputs(grad: bool):
        q = torch.randn(B, H, D, dtype=dtype, requires_grad=grad)
        k = torch.randn(B, N, H, D, dtype=dtype, requires_grad=grad)
        return q, k, torch.randn(B, N)

    def tps_fwd(inp, backend):
        q, k, _ = inp
        return bk.text_patch_scores(q, k, backend=backend)

    def tps_fwd_bwd(inp, backend):
        q, k, g = inp
        out = bk.text_patch_scores(q, k, backend=backend)
        torch.autograd.grad(out, (q, k), g)

    return [
        ("topk_gather", "forward", lambda: topk_inputs(False), topk_fwd),
        ("topk_gather", "forward+backward", lambda: topk_inputs(True), topk_fwd_bwd),
        ("text_patch_scores", "forward", lambda: tps_inputs(False), tps_fwd),
        ("text_patch_scores", "forward+backward", lambda: tps_inputs(True), tps_fwd_bwd),
    ]


def measure(dtype: torch.dtype, min_run_time: float) -> list[dict]:
    rows = []
    for op, which, make, run in _cases(dtype):
        inputs = make()
        times = {}
        for backend in ("torch", "native"):
            timer = benchmark.Timer(stmt="run(inputs, backend)", globals=dict(run=run, inputs=inputs, backend=backend),
                                    num_threads=torch.get_num_threads())
            times[backend] = timer.blocked_autorange(min_run_time=min_run_time).median
        rows.append(dict(op=op, which=which, dtype=str(dtype).replace("torch.", ""), B=B, N=N, C=C, H=H, D=D, k=KEEP,
                         torch_ms=times["torch"] * 1e3, native_ms=times["native"] * 1e3,
                         speedup=times["torch"] / times["native"]))
        print(f"{op:18s} {which:17s} torch {times['torch'] * 1e3:8.2f} ms  native {times['native'] * 1e3:8.2f} ms  "
              f"x{times['torch'] / times['native']:.2f}", flush=True)
    return rows


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"CPU: {meta['cpu']}, {meta['threads']} threads (load average {meta['loadavg_1min']:.1f} when measured), "
             f"torch {meta['torch']}, commit {meta['commit']}", "",
             "| op | pass | dtype | torch (ms) | native (ms) | torch / native |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['which']} | {r['dtype']} | {r['torch_ms']:.2f} | {r['native_ms']:.2f} | "
                     f"{r['speedup']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--min-run-time", type=float, default=1.0)
    args = parser.parse_args(argv)
    why = ensure_built(cpu_only=True)
    if why is not None:
        print(f"native backend unavailable: {why}", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    rows = measure(getattr(torch, args.dtype), args.min_run_time)
    meta = dict(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                cpu_count=os.cpu_count(), loadavg_1min=os.getloadavg()[0], torch=torch.__version__, python=platform.python_version(), commit=_commit())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"native_cpu_{args.dtype}"
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (out / f"{stem}.md").write_text(to_markdown(rows, meta))
    print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
