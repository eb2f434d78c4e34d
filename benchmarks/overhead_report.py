"""The Markdown report of ``bus bench overhead`` (``overhead.render``): ops per step by part, host ms per
step, host us per public op call."""

from __future__ import annotations

from .harness import markdown_table
from .overhead_ops import FWD_BWD_TARGET_US, FWD_TARGET_US


PART_COLUMNS = ("ViT", "selection", "PAD", "text tower", "fusion encoder", "decoder", "losses",
                "model glue (heads, stacking)", "optimizer")


def _bus_extra(rows: list[dict], key: str) -> list[str]:
    """'bus-small - bus-small-baseline: +N (impl)' for each BUS config measured with its twin."""
    out = []
    by_key = {(r["model"], r["attn_impl"]): r for r in rows}
    for (name, impl), r in by_key.items():
        twin = by_key.get((f"{name}-baseline", impl))
        if twin is not None and r.get(key) is not None and twin.get(key) is not None:
            out.append(f"{name} {impl}: {r[key] - twin[key]:+d}")
    return out


def render(result: dict) -> str:
    s = result["settings"]
    rows = result["ops_per_step"]
    table_rows = []
    for r in rows:
        row = {"model": r["model"], "attn_impl": r["attn_impl"], "total": r["total"],
               "triton_path_total": r.get("triton_path_total"), **r.get("by_phase", {})}
        row.update({p: r["by_part"].get(p, 0) for p in PART_COLUMNS})
        table_rows.append(row)
    parts = ["Dispatched ops per training step (CPU count; forward + backward + fused AdamW, batch "
             f"{s['batch_size']}, bf16 autocast). Backends here: "
             + ", ".join(f"{k} {v}" for k, v in result["kernel_backends"].items())
             + "; \"Triton path\": every bus_kernels op on its Triton custom op, as on a GPU.", "",
             markdown_table(table_rows, [
                 ("model", "model", ""), ("attn_impl", "attn", ""), ("total", "ops (CPU backends)", "d"),
                 ("triton_path_total", "ops (Triton path)", "d"), ("forward", "fwd", "d"), ("backward", "bwd", "d"),
                 ("optimizer", "optim", "d"),
                 *[(p, p.split(" (")[0], "d") for p in PART_COLUMNS if p != "optimizer"]])]
    extra = _bus_extra(rows, "total") + [x + " (Triton path)" for x in _bus_extra(rows, "triton_path_total")]
    if extra:
        parts += ["", "BUS minus its baseline: " + "; ".join(extra)]
    same = [r.get("same_op_graph") for r in rows if "same_op_graph" in r]
    parts += ["", f"Stand-in (width {s['width']}, images at most {s['image_size']} px) op counts equal the configs': "
              f"{all(same) if same else 'not checked'}"]

    steps = [dict(r) for r in result["host_ms_per_step"]]
    for r in steps:
        r["compute_pct"] = 100 * r["compute_share"] if "compute_share" in r else None
        r["note"] = "; ".join(x for x in (
            f"compile {r['compile_s']:.1f} s, fullgraph={r['fullgraph']}, {r.get('graphs')} graph(s)"
            if "compile_s" in r else "",
            f"fullgraph failed: {r['fullgraph_error'][:120]}" if "fullgraph_error" in r else "",
            f"failed: {r['error'][:160]}" if "error" in r else "") if x)
    parts += ["", f"Host milliseconds per training step on CPU, narrow stand-in (every width {s['width']}, "
              f"images at most {s['image_size']} px), "
              f"{s['rounds']} interleaved rounds x {s['steps_per_round']} steps:", "",
              markdown_table(steps, [("model", "model", ""), ("attn_impl", "attn", ""), ("precision", "precision", ""),
                                     ("mode", "mode", ""),
                                     ("median_ms", "wall ms median", ".1f"),
                                     ("p25_ms", "wall ms lower quartile", ".1f"),
                                     ("cpu_median_ms", "thread CPU ms median", ".1f"), ("ops", "ops (eager)", "d"),
                                     ("cpu_us_per_op", "thread CPU us per op", ".1f"),
                                     ("compute_pct", "compute share %", ".0f"), ("note", "note", "")])]

    ops = result["op_host_us"]
    if "rows" in ops:
        op_rows = []
        for r in ops["rows"]:
            met = ""
            if "fwd_target_met" in r:
                met = f"{'yes' if r['fwd_target_met'] else 'no'} / {'yes' if r['fwd_bwd_target_met'] else 'no'}"
            op_rows.append({**r, "met": met, "launch": f"{r['launches']['fwd']} / {r['launches']['fwd_bwd']}",
                            "dispatched_ops": f"{r['dispatched']['fwd']} / {r['dispatched']['fwd_bwd']}"})
        parts += ["", "Host microseconds per public call on CPU, Triton backend with its kernels stubbed (the "
                  "wrapper's own cost): wall-clock median of interleaved blocks [lower quartile] and thread CPU "
                  f"median. Targets (issue 23, judged on thread CPU time): fwd <= {FWD_TARGET_US:g} us, "
                  f"fwd+bwd <= {FWD_BWD_TARGET_US:g} us.", ""]
        for r in op_rows:
            for kind in ("fwd", "fwd_grad", "fwd_bwd"):
                r[f"{kind}_cell"] = f"{r[f'{kind}_us']:.1f} [{r[f'{kind}_us_p25']:.1f}]; {r[f'{kind}_cpu_us']:.1f}"
        parts.append(markdown_table(op_rows, [
            ("op", "op", ""), ("fwd_cell", "fwd us, no grad (wall [p25]; CPU)", ""),
            ("fwd_grad_cell", "fwd us, recording grad", ""), ("fwd_bwd_cell", "fwd+bwd us", ""),
            ("met", "targets met fwd / fwd+bwd", ""), ("launch", "Triton launches fwd / fwd+bwd", ""),
            ("dispatched_ops", "dispatched ops fwd / fwd+bwd", "")]))
        if ops.get("ops_without_stubbed_launch"):
            parts.append(f"\nWARNING: no stubbed launch seen for {ops['ops_without_stubbed_launch']}")
    else:
        parts += ["", f"Per-op host time: {ops.get('error', 'not measured')}"]
    parts += ["", f"{result['device']}; torch {result['torch']}; commit {result['commit']}"]
    return "\n".join(parts)
