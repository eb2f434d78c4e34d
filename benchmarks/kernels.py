"""``bus bench kernels``: per-op time, bandwidth and memory traffic, on every backend that runs here.

Forward, backward and forward+backward time, achieved bandwidth (pruning ops) or TFLOP/s (attention),
and memory traffic against the floor.

* floor bytes: every input read once, every output written once (what a fused kernel can reach);
* unfused PyTorch bytes: the sum of the bytes every aten op of the reference chain reads and writes
  (``harness.ByteCounter``) — on a CPU machine this is how much traffic the fused kernels remove;
* attention: packed varlen vs padded SDPA (and flash-attn / xformers / torch varlen where installed),
  with the FLOPs that packing saves for the length distribution used.

Timing: CUDA events (``triton.testing.do_bench``) on GPU, ``torch.utils.benchmark`` on CPU. The Triton
interpreter is never timed (it is a correctness tool, thousands of times slower than a GPU).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

import torch

import bus_kernels as bk
from bus_kernels import reference
from bus_kernels.backends import TRITON_INTERPRET, get_backend
from bus_kernels.ops.varlen_attention import ATTENTION_LIMITS

from .command import run_standalone
from .harness import ByteCounter, default_device, environment, markdown_table, publish, time_op


@dataclass
class Case:
    op: str
    shape: str
    inputs: Callable[[], tuple]  # fresh leaf tensors requiring grad
    forward: Callable[[str, tuple], torch.Tensor]  # (backend, inputs) -> output to backprop through
    reference_forward: Callable[[tuple], torch.Tensor]  # the unfused PyTorch chain
    floor_fwd: int  # bytes
    floor_bwd: int
    flops_fwd: float | None = None  # for compute-bound ops


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def pruning_cases(B: int, N: int, C: int, H: int, D: int, keep: float, dtype, device) -> list[Case]:
    k = max(1, int(keep * N))

    def tps_inputs():
        return (torch.randn(B, H, D, dtype=dtype, device=device, requires_grad=True),
                torch.randn(B, N, H, D, dtype=dtype, device=device, requires_grad=True))

    q, keys = tps_inputs()
    scores = torch.empty(B, N, dtype=torch.float32, device=device)
    tps = Case(
        "text_patch_scores", f"B={B} N={N} H={H} D={D} {str(dtype)[6:]}", tps_inputs,
        lambda be, a: bk.text_patch_scores(*a, backend=be),
        lambda a: reference.text_patch_scores(*a, D**-0.5),
        floor_fwd=_nbytes(q, keys, scores), floor_bwd=_nbytes(scores, q, keys) * 2 - _nbytes(scores),
    )

    def gather_inputs():
        return (torch.randn(B, N, C, dtype=dtype, device=device, requires_grad=True),
                torch.rand(B, N, device=device, requires_grad=True))

    x, s = gather_inputs()
    tokens = torch.empty(B, k + 1, C, dtype=dtype, device=device)
    index = torch.empty(B, k, dtype=torch.int64, device=device)
    gather = Case(
        "topk_gather", f"B={B} N={N} C={C} k={k} {str(dtype)[6:]}", gather_inputs,
        lambda be, a: bk.topk_gather(*a, k, backend=be).tokens,
        lambda a: reference.topk_gather(*a, k)[0],
        floor_fwd=_nbytes(x, s, tokens, index), floor_bwd=_nbytes(tokens, x, s) + _nbytes(x, s),
    )
    return [tps, gather]


def attention_case(lengths: list[int], H: int, D: int, dtype, device) -> Case | None:
    if not hasattr(bk, "varlen_attention"):
        return None
    total = sum(lengths)
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    max_len = max(lengths)

    def inputs():
        return tuple(torch.randn(total, H, D, dtype=dtype, device=device, requires_grad=True) for _ in range(3))

    q, _, _ = inputs()
    flops = sum(4 * n * n * H * D for n in lengths)
    return Case(
        "varlen_attention", f"{len(lengths)} seqs, {total} tokens (max {max_len}) H={H} D={D} {str(dtype)[6:]}", inputs,
        lambda be, a: bk.varlen_attention(*a, cu, cu, max_len, max_len, backend=be),
        lambda a: bk.varlen_attention(*a, cu, cu, max_len, max_len, backend="torch"),
        floor_fwd=_nbytes(q) * 4, floor_bwd=_nbytes(q) * 8, flops_fwd=flops,  # bwd: q k v o dO read, dq dk dv written
    )


def padded_sdpa_row(lengths: list[int], H: int, D: int, dtype, device) -> dict:
    """The same attention run padded to the longest sequence with a key mask (what packing avoids)."""
    B, S = len(lengths), max(lengths)
    q = torch.randn(B, H, S, D, dtype=dtype, device=device, requires_grad=True)
    mask = (torch.arange(S, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None])[:, None, None, :]

    def fwd():
        return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)

    out = fwd()
    g = torch.randn_like(out)
    return {
        "op": "attention (padded SDPA)", "backend": "torch sdpa", "shape": f"{B}x{S} padded",
        "fwd_ms": time_op(fwd, device) * 1e3,
        "fwd_bwd_ms": time_op(lambda: torch.autograd.grad(fwd(), q, g), device) * 1e3,
        "padded_flops_fwd": 4 * B * S * S * H * D,
    }


def backends_for(op: str, device: torch.device) -> list[tuple[str, str | None]]:
    """(backend, reason it is skipped or None) for every registered backend implementing ``op``."""
    rows = []
    status = bk.backend_status(device.type)
    for name, why in status.items():
        if op not in get_backend(name).ops:
            continue
        if name == "triton" and device.type == "cpu" and TRITON_INTERPRET:
            why = "Triton interpreter: a correctness tool, not timed"
        limits = ATTENTION_LIMITS.get(name) if op == "varlen_attention" else None
        if why is None and limits is not None and limits.dense_only:  # the attention case here is ragged
            why = "dense batches only (every sequence full length); this case is ragged"
        rows.append((name, why))
    return rows


def measure(case: Case, backend: str, device: torch.device) -> dict:
    a = case.inputs()
    out = case.forward(backend, a)
    g = torch.randn_like(out)

    def fwd():
        with torch.no_grad():
            return case.forward(backend, a)

    def bwd_only():
        return torch.autograd.grad(out, a, g, retain_graph=True)

    def full():
        return torch.autograd.grad(case.forward(backend, a), a, g)

    t_fwd, t_bwd, t_full = time_op(fwd, device), time_op(bwd_only, device), time_op(full, device)
    row = {"op": case.op, "shape": case.shape, "backend": backend,
           "fwd_ms": t_fwd * 1e3, "bwd_ms": t_bwd * 1e3, "fwd_bwd_ms": t_full * 1e3,
           "floor_fwd_mb": case.floor_fwd / 1e6, "floor_bwd_mb": case.floor_bwd / 1e6,
           "fwd_gb_per_s_at_floor": case.floor_fwd / t_fwd / 1e9}
    if case.flops_fwd:
        row["fwd_tflop_per_s"] = case.flops_fwd / t_fwd / 1e12
    return row


def unfused_traffic(case: Case) -> dict:
    """Bytes the unfused PyTorch chain moves, forward and backward, vs the floor."""
    a = case.inputs()
    with ByteCounter() as fwd_counter:
        out = case.reference_forward(a)
    g = torch.randn_like(out)
    with ByteCounter() as bwd_counter:
        torch.autograd.grad(out, a, g)
    return {"op": case.op, "shape": case.shape,
            "unfused_fwd_mb": fwd_counter.total / 1e6, "floor_fwd_mb": case.floor_fwd / 1e6,
            "fwd_excess": fwd_counter.total / case.floor_fwd, "unfused_fwd_ops": len(fwd_counter.ops),
            "unfused_bwd_mb": bwd_counter.total / 1e6, "floor_bwd_mb": case.floor_bwd / 1e6,
            "bwd_excess": bwd_counter.total / case.floor_bwd}


def realistic_lengths(batch: int, n_max: int, seed: int = 0) -> list[int]:
    """Kept-token counts of ``keep_by_mass`` on peaked random scores: a ragged, realistic distribution."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, n_max, generator=gen) * torch.linspace(0.5, 3.0, batch)[:, None]
    k = bk.keep_by_mass(logits.softmax(-1), 0.9, 1, n_max)
    return [int(v) + 2 for v in k]  # + [CLS] + the fused token


def run(quick: bool = False, device: torch.device | None = None, dtype=None) -> dict:
    device = device or default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    if quick:
        cases = pruning_cases(2, 50, 32, 2, 16, 0.7, dtype, device)
        lengths = realistic_lengths(3, 40)
        H, D = 2, 16
    else:
        cases = pruning_cases(32, 576, 768, 12, 64, 0.7, dtype, device)
        lengths = realistic_lengths(32, 576)
        H, D = 12, 64
    attn = attention_case(lengths, H, D, dtype, device)
    cases += [attn] if attn is not None else []

    timings, skipped, traffic = [], [], []
    for case in cases:
        traffic.append(unfused_traffic(case))
        for backend, why in backends_for(case.op, device):
            if why is None:
                timings.append(measure(case, backend, device))
            else:
                skipped.append({"op": case.op, "backend": backend, "reason": why})
    packing = None
    if attn is not None:
        padded = padded_sdpa_row(lengths, H, D, dtype, device)
        timings.append(padded)
        packing = {"lengths": lengths, "packed_flops_fwd": attn.flops_fwd, "padded_flops_fwd": padded["padded_flops_fwd"],
                   "flops_saved_fraction": 1 - attn.flops_fwd / padded["padded_flops_fwd"]}
    return {"benchmark": "kernels", "dtype": str(dtype), "timings": timings, "skipped": skipped,
            "traffic": traffic, "packing": packing, **environment(device)}


def render(result: dict) -> str:
    parts = [
        "**time per call**", markdown_table(result["timings"], [
            ("op", "op", ""), ("backend", "backend", ""), ("shape", "shape", ""), ("fwd_ms", "fwd (ms)", ".3f"),
            ("bwd_ms", "bwd (ms)", ".3f"), ("fwd_bwd_ms", "fwd+bwd (ms)", ".3f"),
            ("fwd_gb_per_s_at_floor", "fwd GB/s (floor bytes)", ".2f"), ("fwd_tflop_per_s", "fwd TFLOP/s", ".4f")]),
        "**memory traffic: unfused PyTorch chain vs floor** (each input read once, each output written once)",
        markdown_table(result["traffic"], [
            ("op", "op", ""), ("unfused_fwd_mb", "unfused fwd MB", ".2f"), ("floor_fwd_mb", "floor fwd MB", ".2f"),
            ("fwd_excess", "fwd x floor", ".2f"), ("unfused_bwd_mb", "unfused bwd MB", ".2f"),
            ("floor_bwd_mb", "floor bwd MB", ".2f"), ("bwd_excess", "bwd x floor", ".2f")]),
    ]
    if result["packing"]:
        p = result["packing"]
        parts.append(f"packing vs padding: {len(p['lengths'])} sequences, lengths {min(p['lengths'])}..{max(p['lengths'])}: "
                     f"packed attention needs {100 * p['flops_saved_fraction']:.1f}% fewer FLOPs than padded")
    if result["skipped"]:
        parts.append("skipped: " + "; ".join(f"{s['op']}/{s['backend']}: {s['reason']}" for s in result["skipped"]))
    parts.append(f"{result['device']}; torch {result['torch']}; commit {result['commit']}")
    return "\n\n".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--json")


def main_from_args(args) -> int:
    result = run(quick=args.quick, dtype=getattr(torch, args.dtype) if args.dtype else None)
    return publish(result, render(result), args.json)


def main(argv: list[str] | None = None) -> int:
    """``python -m bus_benchmarks.kernels`` = ``bus bench kernels``."""
    return run_standalone("kernels", __doc__, add_arguments, main_from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
