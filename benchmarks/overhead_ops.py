"""Host microseconds of one public ``bus_kernels`` call with its Triton kernels stubbed (``bus bench overhead``,
part 3; issue 23's per-call targets): the wrapper's own cost, the part a GPU cannot hide. Runs in a child
process under TRITON_INTERPRET=1 with ``BUS_KERNELS_BACKEND=triton`` (``overhead._run_child``)."""

from __future__ import annotations

import gc
import sys
import time

import torch

PUBLIC_OPS = ("text_patch_scores", "topk_gather", "topk_gather_varlen", "varlen_attention")
FWD_TARGET_US, FWD_BWD_TARGET_US = 15.0, 60.0  # issue 23, per public op, kernels stubbed


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated ``q`` quantile (0.25: lower quartile)."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


class _KernelStub:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` only counts the launch."""

    launches = 0

    def __init__(self, name: str):
        self.name = name

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        _KernelStub.launches += 1


def stub_triton_kernels() -> list[str]:
    """Replace every Triton kernel (``KernelInterface``) in the modules of ``bus_kernels.ops`` by a stub."""
    from triton.runtime.jit import KernelInterface

    import bus_kernels.ops  # noqa: F401  (imports every op module)

    stubbed = []
    for mod_name, module in list(sys.modules.items()):
        if not mod_name.startswith("bus_kernels.ops") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, KernelInterface):
                setattr(module, attr, _KernelStub(attr))
                stubbed.append(f"{mod_name}.{attr}")
    return sorted(stubbed)


_TRIVIAL_OP = None


def trivial_custom_op():
    """``bus_overhead::times_two``: ``x * 2`` as a ``torch.library`` custom op with fake and autograd."""
    global _TRIVIAL_OP
    if _TRIVIAL_OP is None:
        @torch.library.custom_op("bus_overhead::times_two", mutates_args=())
        def times_two(x: torch.Tensor) -> torch.Tensor:
            return x * 2

        times_two.register_fake(lambda x: torch.empty_like(x))
        torch.library.register_autograd("bus_overhead::times_two", lambda ctx, g: g * 2,
                                        setup_context=lambda ctx, inputs, output: None)
        _TRIVIAL_OP = times_two
    return _TRIVIAL_OP


def op_cases() -> dict:
    """name -> (make inputs(requires_grad), call(inputs) -> the output to differentiate). Tiny shapes."""
    import bus_kernels as bk

    B, N, H, D, C, k = 2, 16, 2, 16, 32, 8
    g = torch.Generator().manual_seed(0)

    def rand(*shape, rg):
        return torch.randn(*shape, generator=g).requires_grad_(rg)

    cu = torch.tensor([0, 16, 28], dtype=torch.int32)
    k_rows = torch.tensor([8, 5])
    times_two = trivial_custom_op()
    return {
        "text_patch_scores": (lambda rg: (rand(B, H, D, rg=rg), rand(B, N, H, D, rg=rg)),
                              lambda a: bk.text_patch_scores(*a)),
        "topk_gather": (lambda rg: (rand(B, N, C, rg=rg), torch.rand(B, N, generator=g).requires_grad_(rg)),
                        lambda a: bk.topk_gather(*a, k).tokens),
        "topk_gather_varlen": (lambda rg: (rand(B, N, C, rg=rg), torch.rand(B, N, generator=g).requires_grad_(rg)),
                               lambda a: bk.topk_gather_varlen(*a, k_rows).tokens),
        "varlen_attention": (lambda rg: (rand(28, H, D, rg=rg), rand(28, H, D, rg=rg), rand(28, H, D, rg=rg)),
                             lambda a: bk.varlen_attention(*a, cu, cu, 16, 16)),
        "x * 2": (lambda rg: (rand(B, N, C, rg=rg),), lambda a: a[0] * 2),
        "trivial custom op": (lambda rg: (rand(B, N, C, rg=rg),), lambda a: times_two(a[0])),
    }


def clock(fn, calls: int = 1) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) per call of ``fn``, over ``calls`` calls."""
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - wall) / calls, (time.thread_time() - cpu) / calls


def op_host_times(rounds: int, calls_per_round: int) -> dict:
    """In a TRITON_INTERPRET=1 process: host us per public call with every Triton kernel stubbed, over
    ``rounds`` interleaved rounds of ``calls_per_round`` calls (a quarter of them for forward+backward)."""
    from .dispatch_count import DispatchCounter

    torch.set_num_threads(1)
    stubbed = stub_triton_kernels()
    cases = op_cases()
    runs = {}
    for name, (make, call) in cases.items():
        plain, grad = make(False), make(True)
        out = call(grad)
        grad_out = torch.ones_like(out)

        def fwd_bwd(call=call, grad=grad, grad_out=grad_out):
            torch.autograd.grad(call(grad), grad, grad_out)

        runs[name] = {"fwd": lambda call=call, plain=plain: call(plain),
                      "fwd_grad": lambda call=call, grad=grad: call(grad), "fwd_bwd": fwd_bwd}
    kinds = ("fwd", "fwd_grad", "fwd_bwd")
    rows = {name: {"op": name, "launches": {}, "dispatched": {}, "times": {k: [] for k in kinds}} for name in cases}
    for name, fns in runs.items():  # counts, and warm-up
        for kind, fn in fns.items():
            fn()
            before = _KernelStub.launches
            with DispatchCounter() as counter:
                fn()
            rows[name]["launches"][kind] = _KernelStub.launches - before
            rows[name]["dispatched"][kind] = counter.total
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            names = list(runs) if r % 2 == 0 else list(runs)[::-1]
            for name in names:
                for kind, fn in runs[name].items():
                    calls = calls_per_round if kind != "fwd_bwd" else max(1, calls_per_round // 4)
                    rows[name]["times"][kind].append(clock(fn, calls))
    finally:
        if gc_was:
            gc.enable()
    out = []
    for row in rows.values():
        for kind, values in row.pop("times").items():
            wall = [w * 1e6 for w, _ in values]
            cpu = [c * 1e6 for _, c in values]
            row[f"{kind}_us"] = quantile(wall, 0.5)
            row[f"{kind}_us_p25"] = quantile(wall, 0.25)
            row[f"{kind}_cpu_us"] = quantile(cpu, 0.5)
        if row["op"] in PUBLIC_OPS:
            row["fwd_target_met"] = row["fwd_cpu_us"] <= FWD_TARGET_US
            row["fwd_bwd_target_met"] = row["fwd_bwd_cpu_us"] <= FWD_BWD_TARGET_US
        out.append(row)
    not_stubbed = [r["op"] for r in out if r["op"] in PUBLIC_OPS and r["launches"]["fwd"] == 0]
    return {"rows": out, "stubbed_kernels": stubbed, "ops_without_stubbed_launch": not_stubbed}
