"""The one harness every benchmark shares: environment record, timing, FLOP and byte counting, and the
JSON / Markdown / PNG writers. Numbers are only ever produced by running things; nothing is typed in."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


# ---------------------------------------------------------------------------------------------
# where the numbers come from


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {cpu} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    """Device, versions and commit: recorded with every result."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
    }


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Peak dense bf16 tensor-core FLOP/s by GPU name (vendor data sheets, without 2:4 sparsity), for MFU.
# More specific names first: "H100 PCIe" must match before "H100".
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
)


def peak_bf16_flops(device: torch.device) -> tuple[float | None, str | None]:
    """(peak dense bf16 FLOP/s, the table entry that matched) of ``device``; (None, None) on CPU or an
    unlisted GPU (MFU is then not reported)."""
    if torch.device(device).type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS:
        if key in name:
            return peak, key
    return None, None


def peak_memory_bandwidth(device: torch.device) -> tuple[float | None, str | None]:
    """(peak DRAM bytes/s, how it was found) of ``device``, from what the GPU reports: double data rate x
    memory clock x bus width (H100 SXM: 2 x 2619 MHz x 5120 bit = 3.35 TB/s, the data sheet's figure);
    (None, None) on CPU or when the device reports no clock."""
    if torch.device(device).type != "cuda":
        return None, None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None, None
    return 2 * clock_khz * 1e3 * bus_bits / 8, f"2 x {clock_khz / 1e3:.0f} MHz x {bus_bits} bit (device properties)"


# ---------------------------------------------------------------------------------------------
# timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call, synchronised on GPU."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def time_op(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.2) -> float:
    """Median seconds per call: CUDA events via triton.testing.do_bench on GPU, torch.utils.benchmark on CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median") * 1e-3
    import torch.utils.benchmark as tb

    return tb.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


# ---------------------------------------------------------------------------------------------
# counting


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs of the aten ops ``fn`` runs (torch.utils.flop_counter; matmuls, convolutions, SDPA)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


class ByteCounter(TorchDispatchMode):
    """Sums the bytes each aten op reads (tensor inputs) and writes (tensor outputs).

    For an unfused PyTorch chain this is the memory traffic with no reuse between ops: each op reads
    its inputs from memory and writes its outputs back. Views move no data and are not counted.
    """

    def __init__(self):
        super().__init__()
        self.read = 0
        self.written = 0
        self.ops: list[tuple[str, int, int]] = []

    @staticmethod
    def _bytes(tree) -> int:
        leaves = tree if isinstance(tree, (list, tuple)) else [tree]
        total = 0
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                total += leaf.numel() * leaf.element_size()
            elif isinstance(leaf, (list, tuple)):
                total += ByteCounter._bytes(leaf)
        return total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _is_view(func):  # aliases its input: no data moves
            return out
        read = self._bytes(list(args) + list(kwargs.values()))
        written = self._bytes(out)
        self.read += read
        self.written += written
        self.ops.append((str(func.overloadpacket.__name__), read, written))
        return out

    @property
    def total(self) -> int:
        return self.read + self.written


def _is_view(func) -> bool:
    return any(a.alias_info is not None and not a.alias_info.is_write for a in func._schema.returns)


# ---------------------------------------------------------------------------------------------
# writers


def parse_overrides(items: Sequence[str], prog: str) -> dict:
    """``["losses__momentum=0", ...]`` (``--override``, repeatable) -> flat ``section__field`` overrides; values
    are JSON, else strings. A malformed item exits with ``PROG: error: ...``."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{prog}: error: --override must be SECTION__FIELD=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format spec) — e.g. ("images_per_s", "images/s", ".1f")."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("n/a" if value is None else format(value, fmt) if fmt else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def publish(result: dict, text: str, json_path: str | None, plot_message: str | None = None) -> int:
    """The end of every benchmark: the table on stdout, the JSON to ``json_path``; on stderr a line for each
    file written (the plot's line is ``plot_message``, from ``save_plot``)."""
    print(text)
    write_json(json_path, result)
    if json_path:
        print(f"wrote {json_path}", file=sys.stderr)
    if plot_message:
        print(plot_message, file=sys.stderr)
    return 0


def save_plot(path: str | None, draw: Callable[[object], None]) -> str | None:
    """Draw with matplotlib into ``path`` (PNG). Returns the line to print: ``wrote PATH``, or why there is
    no plot (matplotlib absent); None without a path."""
    if not path:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib not installed (pip install -e '.[bench]')"
    fig, ax = plt.subplots(figsize=(7, 4))
    draw(ax)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


def plot_by_model(result: dict, path: str | None, y_key: str, ylabel: str) -> str | None:
    """One line per model of ``result["rows"]``: ``y_key`` against image size (PNG at ``path``)."""
    def draw(ax):
        for name in dict.fromkeys(r["model"] for r in result["rows"]):
            pts = [(r["image_size"], r[y_key]) for r in result["rows"] if r["model"] == name]
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xlabel("image size (px)")
        ax.set_ylabel(ylabel)
        ax.legend()

    return save_plot(path, draw)
