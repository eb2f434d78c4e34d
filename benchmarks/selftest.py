"""``bus selftest``: the first run on a new machine (on a GPU, run this first). One command, < 8 minutes.

    bus selftest [--out DIR] [--quick] [--strict] [--budget SECONDS]
    python -m bus_benchmarks.selftest ...        # the same
    python benchmarks/selftest.py ...            # the same, from a checkout

Sections, in order of value (each one's failure is recorded and the next one runs):
  environment  versions, device, which backends are available here and why not
  dispatch     the backend ``backend=None`` picks per op and dtype, and why the others were passed over
  kernels      every op x backend x dtype, forward and backward, against the float64 CPU reference
  syncs        host syncs of one bus-small training step (sdpa, varlen, keep-by-mass, baseline)
  training     one bus-small training step per pruning backend (+ varlen, + baseline): time, peak memory
  timing       each op against its peers (flash_attn, torch_varlen, xformers, padded SDPA, torch) at ViT shapes:
               whole-call, CUDA-graph and kernel-only time; achieved GB/s or TFLOP/s as a share of peak

Writes ``selftest.json`` and ``selftest.md`` into ``--out`` (default: a new ``selftest-<UTC time>``
folder, named on stdout), rewritten after every section so that a run cut short still leaves its
results. On a GPU the four measuring sections run in child processes, each killed at its share of
``--budget`` (a hung compile or a crashed CUDA context costs one section, not the run). Exit status 0
even when checks fail (the FAILED lines say which); ``--strict`` exits 1 then. Without a GPU it checks
the CPU backends (Triton through its interpreter) and says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

if __name__ == "__main__" and not __package__:
    # run as a file: load this directory as the package bus_benchmarks, with the checkout first on the path
    import importlib.util

    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]  # benchmarks/kernels.py would shadow `kernels`
    sys.path.insert(0, os.path.dirname(_here))
    _spec = importlib.util.spec_from_file_location("bus_benchmarks", os.path.join(_here, "__init__.py"),
                                                   submodule_search_locations=[_here])
    _pkg = importlib.util.module_from_spec(_spec)
    sys.modules["bus_benchmarks"] = _pkg
    _spec.loader.exec_module(_pkg)
    from bus_benchmarks.selftest import main as _main

    sys.exit(_main())

import torch

# Weight of each measuring section in the budget: a section may use the budget left when it starts times
# its weight over the weights of the requested sections still to run (the rest is for the ones after it).
# The full run gives timing more (on a GPU it measures three times per op: call, CUDA graph, kernels);
# --quick keeps the earlier split (on a CPU its timing section takes seconds).
SECTIONS = (("kernels", 0.40), ("syncs", 0.10), ("training", 0.18), ("timing", 0.30))
QUICK_SECTIONS = (("kernels", 0.45), ("syncs", 0.11), ("training", 0.22), ("timing", 0.22))
RESERVE = 0.02  # weight kept back for writing the report after the last section
ISOLATED = {name for name, _ in SECTIONS}
# full: 400 s of sections + child start-up and at most GRACE_S past a deadline: under 8 minutes on a GPU
DEFAULT_BUDGET_S = {"full": 400.0, "quick": 150.0}
GRACE_S = 20.0  # how long past its deadline a child section may run before it is killed


def log(message: str) -> None:
    print(message, flush=True)


def _prepare_environment(device_type: str) -> None:
    # Triton decides at kernel-definition time whether it runs on the GPU or in its CPU interpreter:
    # without CUDA the Triton backend can only be checked through the interpreter (set before import).
    if device_type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


# ---------------------------------------------------------------------------------------------
# sections (each returns a JSON-able dict; ``emit(partial)`` lets long ones save what they have)


def section_environment(device: torch.device, quick: bool, deadline: float, emit) -> dict:
    import bus_kernels
    from bus_kernels.backends import backend_status

    from .harness import environment

    env = environment(device)
    env["bus_kernels"] = bus_kernels.__version__
    env["cuda_available"] = torch.cuda.is_available()
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cuda":
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    for module in ("flash_attn", "xformers", "timm", "transformers"):
        try:
            env[module] = getattr(__import__(module), "__version__", "unknown")
        except Exception as e:  # a broken install is information, not an error
            env[module] = f"not available ({type(e).__name__}: {str(e)[:120]})"
    env["backends"] = {name: why or "available" for name, why in backend_status(device.type).items()}
    return env


def section_dispatch(device, quick, deadline, emit) -> dict:
    from .selftest_perf import dispatch_report

    return {"rows": dispatch_report(device)}


def section_kernels(device, quick, deadline, emit) -> dict:
    from .selftest_checks import run_checks

    rows: list[dict] = []

    def on_row(row):
        rows.append(row)
        log(f"  {_row_line(row)}")
        emit({"rows": rows})

    run_checks(device, quick, deadline, on_row)
    return {"rows": rows}


def _rows_section(fn_name: str):
    def section(device, quick, deadline, emit) -> dict:
        from . import selftest_perf

        rows: list[dict] = []

        def on_row(row):
            rows.append(row)
            log(f"  {json.dumps({k: v for k, v in row.items() if k != 'traceback'}, default=str)[:300]}")
            emit({"rows": rows})

        getattr(selftest_perf, fn_name)(device, quick, deadline, on_row)
        return {"rows": rows}

    return section


RUNNERS = {
    "environment": section_environment,
    "dispatch": section_dispatch,
    "kernels": section_kernels,
    "syncs": _rows_section("sync_rows"),
    "training": _rows_section("training_rows"),
    "timing": _rows_section("timing_rows"),
}


def _row_line(row: dict) -> str:
    head = f"{row['status']:7s} {row['op']} [{row['case']}] {row['backend']} {row['dtype']}"
    if row["status"] == "FAILED":
        if "exception" in row:
            return f"{head}: {row['exception'][:200]}"
        bad = [c for c in row["checks"] if not c["passed"]]
        return head + ": " + "; ".join(
            f"{c['output']} error {c['error']:.3g} > tolerance {c['tolerance']:.3g}" if c["error"] is not None
            else f"{c['output']}: {c.get('note')}" for c in bad)
    if row["status"] == "passed":
        w = row["worst"]
        return f"{head}: worst {w['output']} error {w['error']:.3g} (tolerance {w['tolerance']:.3g})"
    return f"{head}: {row.get('reason', '')}"


# ---------------------------------------------------------------------------------------------
# running sections in-process or in a child process


def _section_path(out: str, name: str) -> str:
    return os.path.join(out, "sections", f"{name}.json")


def _write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)


def run_section_here(name: str, device: torch.device, quick: bool, deadline: float, out: str) -> dict:
    """Run one section in this process; its result (or the exception) is also written to sections/NAME.json."""
    path = _section_path(out, name)
    start = time.time()

    def emit(partial: dict) -> None:
        _write_json(path, {"status": "running", **partial})

    try:
        result = {"status": "ok", **RUNNERS[name](device, quick, deadline, emit)}
    except Exception as e:  # a section's failure is recorded, the next section runs
        import traceback

        result = {"status": "error", "exception": f"{type(e).__name__}: {str(e)[:500]}",
                  "traceback": "".join(traceback.format_exc().strip().splitlines(keepends=True)[-8:])}
    result["seconds"] = time.time() - start
    _write_json(path, result)
    return result


def run_section_child(name: str, quick: bool, deadline: float, out: str) -> dict:
    """Run one section in a child process, killed ``GRACE_S`` after its deadline; read what it wrote."""
    path = _section_path(out, name)
    cmd = [sys.executable, os.path.abspath(__file__), "--_section", name, "--out", out, "--_deadline", str(deadline)]
    cmd += ["--quick"] if quick else []
    start = time.time()
    status = None
    try:
        proc = subprocess.run(cmd, timeout=max(10.0, deadline - time.time() + GRACE_S))
        status = proc.returncode
    except subprocess.TimeoutExpired:
        status = "killed (past its time budget)"
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError) as e:
        result = {"status": "error", "exception": f"the child process left no result ({e})"}
    if status != 0:
        result["child_exit"] = status
        if result.get("status") in ("running", "ok"):
            result["status"] = "incomplete" if result["status"] == "running" else result["status"]
    result["seconds"] = time.time() - start
    return result


# ---------------------------------------------------------------------------------------------
# the report


def failures(report: dict) -> list[str]:
    lines = []
    for name, section in report["sections"].items():
        if section.get("status") not in ("ok", "skipped", None):
            lines.append(f"FAILED section {name}: {section.get('status')} {section.get('exception', '')}".rstrip())
        for row in section.get("rows", []) if name == "kernels" else []:
            if row.get("status") == "FAILED":
                lines.append("FAILED " + _row_line(row)[len("FAILED  "):])
        for row in section.get("rows", []) if name == "syncs" else []:
            if row.get("status") == "over budget":
                lines.append(f"FAILED syncs: {row['variant']}: {row['total']} host syncs > budget {row['budget']} "
                             f"({json.dumps(row.get('by_op'))})")
        for row in section.get("rows", []) if name in ("training", "syncs", "timing") else []:
            if row.get("status") == "error":
                what = row.get("variant") or f"{row.get('op')} {row.get('backend')} {row.get('shape', '')}"
                lines.append(f"FAILED {name}: {what}: {row.get('exception')}")
    return lines


def render_markdown(report: dict) -> str:
    from .harness import markdown_table

    env = report["sections"].get("environment", {})
    s = report["sections"]
    parts = [f"# bus selftest ({report['mode']}, {report['device_type']})", "",
             f"{env.get('device', '?')}; torch {env.get('torch', '?')}; triton {env.get('triton', '?')}; "
             f"commit {env.get('commit', '?')}; {report['started']}; {report.get('seconds', 0):.0f} s", ""]
    if report["device_type"] != "cuda":
        parts += ["**No GPU was found**: only the CPU backends were checked (Triton through its interpreter).", ""]
    fails = failures(report)
    parts += ["## Result", "", f"{report['summary']}", ""] + [f"- {line}" for line in fails] + [""]
    if "backends" in env:
        parts += ["## Backends here", "", markdown_table(
            [{"backend": k, "status": v} for k, v in env["backends"].items()],
            [("backend", "backend", ""), ("status", "status", "")]), ""]
    if s.get("dispatch", {}).get("rows"):
        rows = [{"op": r["op"], "dtype": r["dtype"], "chosen": r["chosen"] or "none",
                 "passed over": "; ".join(f"{c['backend']}: {', '.join(c['reasons'])}" for c in r["preference"]
                                          if not c["usable"])} for r in s["dispatch"]["rows"]]
        parts += ["## Dispatch (inputs requiring grad; attention at head dim 64)", "",
                  markdown_table(rows, [("op", "op", ""), ("dtype", "dtype", ""), ("chosen", "picked", ""),
                                        ("passed over", "passed over (why)", "")]), ""]
    if s.get("kernels", {}).get("rows"):
        rows = [{**r, "result": _row_line(r).split(": ", 1)[-1] if r["status"] != "skipped" else r.get("reason", "")}
                for r in s["kernels"]["rows"]]
        parts += ["## Kernels against the float64 reference (forward and backward)", "",
                  markdown_table(rows, [("status", "status", ""), ("op", "op", ""), ("case", "case", ""),
                                        ("backend", "backend", ""), ("dtype", "dtype", ""), ("result", "worst / reason", "")]), ""]
    for name, title, columns in (
        ("syncs", "Host syncs of one forward + backward (batch 2)",
         [("variant", "variant", ""), ("status", "status", ""), ("total", "syncs (op counter)", ""), ("budget", "budget", ""),
          ("issue_metric", "_local_scalar_dense + nonzero", ""), ("cuda_sync_warnings", "CUDA sync warnings", ""),
          ("by_op", "by op", "")]),
        ("training", "One training step (forward, backward, AdamW)",
         [("variant", "variant", ""), ("status", "status", ""), ("batch_size", "batch", ""), ("step_ms", "step (ms)", ".1f"),
          ("peak_memory_mib", "peak memory (MiB)", ".0f"), ("reason", "note", "")]),
        ("timing", "Op timings (median ms): whole call, replayed from a CUDA graph, kernels only (cold L2)",
         [("op", "op", ""), ("shape", "shape", ""), ("backend", "backend", ""), ("status", "status", ""),
          ("fwd_ms", "fwd call", ".3f"), ("fwd_graph_ms", "fwd graph", ".3f"), ("fwd_kernel_ms", "fwd kernels", ".3f"),
          ("fwd_bwd_ms", "fwd+bwd call", ".3f"), ("fwd_bwd_graph_ms", "fwd+bwd graph", ".3f"),
          ("fwd_bwd_kernel_ms", "fwd+bwd kernels", ".3f"), ("achieved", "kernels achieve (fwd; fwd+bwd)", ""),
          ("reason", "note", "")]),
    ):
        rows = s.get(name, {}).get("rows")
        if name == "timing" and report["device_type"] != "cuda":  # CUDA graphs and the profiler's kernels: GPU only
            columns = [c for c in columns if not c[0].endswith(("_graph_ms", "_kernel_ms"))]
            columns = [(k, "work per call (fwd; fwd+bwd)" if k == "achieved" else t, f) for k, t, f in columns]
        if rows:
            rows = [{**r, "reason": r.get("reason") or r.get("exception", "") or r.get("timing_notes", ""),
                     "by_op": json.dumps(r.get("by_op", "")), "achieved": _achieved_text(r)} for r in rows]
            parts += [f"## {title}", "", markdown_table(rows, columns), ""]
    parts += ["Section times: " + ", ".join(f"{k} {v.get('seconds', 0):.0f} s" for k, v in s.items())]
    return "\n".join(parts) + "\n"


def _achieved_text(row: dict) -> str:
    """'2.1 TB/s = 44% of peak; ...' (or TFLOP/s) for the forward and forward + backward of a timing row; on a
    CPU the work per call (MB moved, GFLOP) instead."""
    parts = []
    for phase in ("fwd", "fwd_bwd"):
        if row.get(f"{phase}_gbps") is not None:
            text = f"{row[f'{phase}_gbps']:.0f} GB/s"
        elif row.get(f"{phase}_tflops") is not None:
            text = f"{row[f'{phase}_tflops']:.1f} TFLOP/s"
        elif row.get(f"{phase}_mb") is not None:
            text = f"{row[f'{phase}_mb']:.2f} MB"
        elif row.get(f"{phase}_gflop") is not None:
            text = f"{row[f'{phase}_gflop']:.3f} GFLOP"
        else:
            continue
        if row.get(f"{phase}_peak_pct") is not None:
            text += f" = {row[f'{phase}_peak_pct']:.0f}% of peak"
        if row.get(f"{phase}_call_over_kernel") is not None:
            text += f", call {row[f'{phase}_call_over_kernel']:.1f}x kernels"
        parts.append(text)
    return "; ".join(parts)


def _save(report: dict, out: str) -> None:
    report["summary"] = summary_line(report)
    _write_json(os.path.join(out, "selftest.json"), report)
    with open(os.path.join(out, "selftest.md"), "w") as f:
        f.write(render_markdown(report))


def summary_line(report: dict) -> str:
    rows = report["sections"].get("kernels", {}).get("rows", [])
    count = {k: sum(r["status"] == k for r in rows) for k in ("passed", "FAILED", "skipped")}
    n_fail = len(failures(report))
    gpu = "" if report["device_type"] == "cuda" else "NO GPU FOUND (CPU backends only). "
    skipped = [name for name, sec in report["sections"].items() if sec.get("status") == "skipped"]
    return (f"{gpu}kernel checks: {count['passed']} passed, {count['FAILED']} FAILED, {count['skipped']} skipped; "
            f"{'ALL OK' if n_fail == 0 else f'{n_fail} FAILED line(s)'}"
            + (f"; sections skipped (time budget): {', '.join(skipped)}" if skipped else ""))


# ---------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="output folder (default: ./selftest-<UTC time>)")
    parser.add_argument("--quick", action="store_true", help="fewer cases and shapes (seconds on a CPU)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any check failed")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default 400, --quick 150); "
                        "sections past it are skipped")
    parser.add_argument("--sections", help=f"comma-separated subset of {','.join(RUNNERS)} (default: all)")
    parser.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                        help="run the measuring sections in child processes (auto: on a GPU)")
    parser.add_argument("--_section", help=argparse.SUPPRESS)
    parser.add_argument("--_deadline", type=float, help=argparse.SUPPRESS)


def main_from_args(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _prepare_environment(device.type)
    if args._section:  # a child process running one section
        run_section_here(args._section, device, args.quick, args._deadline, args.out)
        return 0

    start = time.time()
    budget = args.budget or DEFAULT_BUDGET_S["quick" if args.quick else "full"]
    out = args.out or "selftest-" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    os.makedirs(out, exist_ok=True)
    wanted = list(RUNNERS) if not args.sections else [s.strip() for s in args.sections.split(",")]
    unknown = [s for s in wanted if s not in RUNNERS]
    if unknown:
        log(f"bus selftest: error: unknown section(s) {unknown}; known: {list(RUNNERS)}")
        return 2
    isolate = args.isolate == "yes" or (args.isolate == "auto" and device.type == "cuda")
    log(f"bus selftest: writing {os.path.join(out, 'selftest.json')} and selftest.md (budget {budget:.0f} s)")
    if device.type == "cuda":
        log(f"GPU: {torch.cuda.get_device_name(device)}")
    else:
        log("No GPU found (torch.cuda.is_available() is False): checking the CPU backends only "
            "(Triton through its interpreter).")
    report = {"mode": "quick" if args.quick else "full", "device_type": device.type, "out": os.path.abspath(out),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "budget_s": budget, "sections": {}}
    shares = dict(QUICK_SECTIONS if args.quick else SECTIONS)
    for n, name in enumerate(wanted):
        now = time.time()
        end = start + budget
        weight_left = sum(shares.get(later, 0.0) for later in wanted[n:]) + RESERVE
        deadline = now + (end - now) * (shares[name] / weight_left if name in shares else 1.0)
        log(f"[{now - start:5.0f} s] section {name}")
        if name in shares and now > end:
            result = {"status": "skipped", "reason": "time budget spent"}
        elif isolate and name in ISOLATED:
            result = run_section_child(name, args.quick, deadline, out)
        else:
            result = run_section_here(name, device, args.quick, deadline, out)
        report["sections"][name] = result
        report["seconds"] = time.time() - start
        _save(report, out)
        if result.get("status") not in ("ok",):
            log(f"  section {name}: {result.get('status')} {result.get('reason', '')}{result.get('exception', '')}")
    report["seconds"] = time.time() - start
    _save(report, out)
    log("")
    for line in failures(report):
        log(line)
    log(f"bus selftest: {report['summary']}")
    log(f"bus selftest: results in {os.path.abspath(out)}/selftest.md and selftest.json ({report['seconds']:.0f} s)")
    return 1 if args.strict and failures(report) else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bus_benchmarks.selftest`` = ``bus selftest``."""
    parser = argparse.ArgumentParser(prog="bus selftest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return main_from_args(parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
