"""``bus selftest`` correctness section: every op x backend x dtype, forward and backward, against float64.

Each case draws random inputs on the CPU (odd sizes, zero-length sequences, cross-attention lengths),
rounds them to the dtype under test, runs the op through the public function with ``backend=name`` on
the device, and compares with the same public function run by the ``torch`` backend (the reference
twins of ``bus_kernels.reference``) on the CPU in float64 on the very same (rounded) values (the
pruning twins compute in float32 inside, far below every tolerance used here).

Tolerance, per compared tensor (``scale = max(1, max |reference|)``):
  * integer outputs (indices, offsets, keep counts) and the pure data movement ops (pad/unpad): exact;
  * float32: ``1e-4 * scale``;
  * float16/bfloat16: the larger of ``ulps * eps(dtype) * scale`` (4 ulps forward, 16 backward) and
    FlashAttention's criterion ``2 * err(torch backend in that dtype on the device) + eps * scale``
    (a kernel is never failed for being within twice what PyTorch itself loses in that precision).
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

import bus_kernels as bk
from bus_kernels.backends import get_backend, registered_backends
from bus_kernels.ops.varlen_attention.dense import dense_reasons
from bus_kernels.ops.varlen_attention.limits import ATTENTION_LIMITS

FWD_ULPS, BWD_ULPS = 4, 16
FP32_RTOL = 1e-4


@dataclass
class OpCase:
    """One op on one set of inputs. ``make(gen)`` returns CPU inputs by name (float ones in float32);
    ``run(inputs, backend)`` calls the public op and returns its outputs by name."""

    op: str  # the op's name in the selftest tables
    name: str  # what this case covers
    dispatch_op: str | None  # name under which the dispatcher registers backends (None: no backends)
    make: Callable[[torch.Generator], dict]
    cast: tuple[str, ...]  # float inputs rounded to the dtype under test (others stay as made)
    grad: tuple[str, ...]  # inputs the backward is checked for
    run: Callable[[dict, str | None], dict]
    needs: Callable[[str], list[str]] = lambda backend: []  # extra reasons a backend cannot take the case
    fixed: tuple[str, ...] = ()  # float inputs whose dtype the op fixes (never cast, even for the reference)


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lengths).cumsum(0).to(torch.int32)


def _attention_case(name: str, lens_q: list[int], lens_k: list[int], causal: bool, key_bias: bool,
                    H: int = 3, D: int = 64) -> OpCase:
    def make(gen):
        tq, tk = sum(lens_q), sum(lens_k)
        inputs = {"q": _randn(gen, tq, H, D), "k": _randn(gen, tk, H, D), "v": _randn(gen, tk, H, D),
                  "cu_q": _cu(lens_q), "cu_k": _cu(lens_k)}
        if key_bias:
            inputs["key_bias"] = torch.rand(tk, generator=gen).log()  # log(n_j)-like, float32 always
        return inputs

    def run(a, backend):
        out = bk.varlen_attention(a["q"], a["k"], a["v"], a["cu_q"], a["cu_k"], max(lens_q), max(lens_k),
                                  causal=causal, key_bias=a.get("key_bias"), backend=backend)
        return {"out": out}

    def needs(backend):
        limits = ATTENTION_LIMITS.get(backend)
        if limits is None:
            return []
        reasons = limits.reasons(D, key_bias)
        if limits.dense_only:  # the sdpa fast path: every sequence full length
            reasons += dense_reasons(len(lens_q), sum(lens_q), sum(lens_k), max(lens_q), max(lens_k), causal)
        return reasons

    grads = ("q", "k", "v") + (("key_bias",) if key_bias else ())
    return OpCase("varlen_attention", name, "varlen_attention", make, ("q", "k", "v"), grads, run, needs,
                  fixed=("key_bias",))


def cases(quick: bool = False) -> list[OpCase]:
    """The checked cases: small odd shapes; ``quick`` keeps three of the six attention cases."""
    B, N, H, D, C = 3, 37, 3, 24, 40

    def tps_make(gen):
        return {"query": _randn(gen, B, H, D), "keys": _randn(gen, B, N, H, D)}

    def gather_make(gen):
        return {"x": _randn(gen, B, N, C), "scores": torch.rand(B, N, generator=gen)}

    def gather_varlen_make(gen):
        return {**gather_make(gen), "k": torch.tensor([1, 17, N])}

    def mass_make(gen):
        return {"scores": (_randn(gen, B, N) * 2).softmax(-1)}

    def unpad_make(gen):
        mask = torch.rand(B, N, generator=gen) < 0.6
        mask[1] = False  # an empty row
        return {"x": _randn(gen, B, N, C), "mask": mask}

    def pad_make(gen):
        indices = unpad_make(gen)["mask"].flatten().nonzero().flatten()  # (total,) int64
        return {"x_packed": _randn(gen, indices.numel(), C), "indices": indices}

    def unpad_run(a, backend):
        return bk.unpad(a["x"], a["mask"])._asdict()

    lens = [1, 17, 0, 65]
    # the attention kernels first: they compile longest and matter most if the time budget runs out
    first = [
        _attention_case("self, lengths [1,17,0,65]", lens, lens, False, False),
        _attention_case("cross causal, q [5,0,17,33] k [9,4,20,40]", [5, 0, 17, 33], [9, 4, 20, 40], True, False),
        # every sequence full length: what backend=None sends to the sdpa fast path
        _attention_case("dense causal + key_bias, 2 x 19", [19, 19], [19, 19], True, True),
    ]
    attention = []
    if not quick:
        attention += [
            _attention_case("self causal", lens, lens, True, False),
            _attention_case("cross, q [5,0,33,17] k [9,4,20,40]", [5, 0, 33, 17], [9, 4, 20, 40], False, False),
            _attention_case("self + key_bias", lens, lens, False, True),
        ]
    return first + [
        OpCase("text_patch_scores", f"B={B} N={N} H={H} D={D}", "text_patch_scores", tps_make, ("query", "keys"),
               ("query", "keys"), lambda a, be: {"scores": bk.text_patch_scores(a["query"], a["keys"], backend=be)}),
        OpCase("topk_gather", f"B={B} N={N} C={C} k=23 fuse", "topk_gather", gather_make, ("x",), ("x", "scores"),
               lambda a, be: bk.topk_gather(a["x"], a["scores"], 23, backend=be)._asdict()),
        OpCase("topk_gather_varlen", f"B={B} N={N} C={C} k=[1,17,{N}] fuse", "topk_gather", gather_varlen_make, ("x",),
               ("x", "scores"), lambda a, be: bk.topk_gather_varlen(a["x"], a["scores"], a["k"], backend=be)._asdict()),
        OpCase("keep_by_mass", f"B={B} N={N} mass=0.9", None, mass_make, ("scores",), (),
               lambda a, be: {"k": bk.keep_by_mass(a["scores"], 0.9, 2, N - 3)}),
        OpCase("unpad", f"B={B} S={N} C={C}, one empty row", None, unpad_make, ("x",), ("x",), unpad_run),
        OpCase("pad", f"B={B} S={N} C={C}, one empty row", None, pad_make, ("x_packed",), ("x_packed",),
               lambda a, be: {"x": bk.pad(a["x_packed"], a["indices"], B, N)}),
    ] + attention


def backends_of(case: OpCase) -> list[str]:
    """Every registered backend implementing the case's op (``[None]`` for ops without backends)."""
    if case.dispatch_op is None:
        return [None]
    return [name for name, b in registered_backends().items() if case.dispatch_op in b.ops]


def dtypes_for(device: torch.device) -> list[torch.dtype]:
    if device.type == "cuda":
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32, torch.float16]  # the Triton interpreter gets bf16 wrong (tests/_bus_testing.py)


# ---------------------------------------------------------------------------------------------
# running one case


def _prepare(base: dict, case: OpCase, dtype, device, reference: bool = False) -> dict:
    """The case's inputs on ``device``: the ``cast`` ones rounded to ``dtype``; for the reference every
    float input then goes to float64 (the same values, exactly). Inputs in ``grad`` require grad."""
    out = {}
    for key, value in base.items():
        if isinstance(value, torch.Tensor):
            value = value.to(dtype) if key in case.cast else value
            if reference and value.dtype.is_floating_point and key not in case.fixed:
                value = value.double()
            value = value.to(device)
            if key in case.grad:
                value = value.detach().requires_grad_(True)
        out[key] = value
    return out


def _forward_backward(case: OpCase, inputs: dict, backend: str | None, grad_seed: int,
                      dtype: torch.dtype) -> tuple[dict, dict]:
    """Outputs and the gradients of ``sum(out * g)`` over the float outputs (g: seeded random, rounded to
    ``dtype``, the one under test, so that data-movement gradients are exact in every run)."""
    outputs = case.run(inputs, backend)
    grads = {}
    floats = [(k, v) for k, v in outputs.items() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point]
    wanted = [inputs[k] for k in case.grad]
    if wanted and any(v.requires_grad for _, v in floats):
        gen = torch.Generator().manual_seed(grad_seed)
        loss = sum((v.double() * torch.randn(v.shape, generator=gen).to(dtype).double().to(v.device)).sum()
                   for _, v in floats)
        got = torch.autograd.grad(loss, wanted, allow_unused=True)
        grads = {f"grad {k}": (g if g is not None else torch.zeros_like(inputs[k])) for k, g in zip(case.grad, got)}
    return outputs, grads


def _err(a, b) -> float:
    if isinstance(a, torch.Tensor):
        if a.numel() == 0:
            return 0.0
        return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item()
    return float(abs(a - b))


def _compare(name: str, actual, expected, low, dtype, backward: bool) -> dict:
    """One tensor's check: error vs float64, the tolerance and pass/fail."""
    if isinstance(actual, torch.Tensor) and tuple(actual.shape) != tuple(expected.shape):
        return {"output": name, "passed": False, "error": None, "tolerance": None,
                "note": f"shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"}
    exact = not isinstance(actual, torch.Tensor) or not actual.dtype.is_floating_point or low is None
    err = _err(actual, expected)
    if exact:
        tol = 0.0
    else:
        scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
        if dtype == torch.float32:
            tol = FP32_RTOL * scale
        else:
            eps = torch.finfo(dtype).eps
            tol = max((BWD_ULPS if backward else FWD_ULPS) * eps * scale, 2 * _err(low, expected) + eps * scale)
    passed = err <= tol and (not isinstance(err, float) or err == err)  # NaN fails
    return {"output": name, "passed": bool(passed), "error": err, "tolerance": tol}


def check_case(case: OpCase, backend: str | None, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """Run one (case, backend, dtype) on ``device``; never raises (an exception is a failed check)."""
    row = {"op": case.op, "case": case.name, "backend": backend or "-", "dtype": str(dtype).replace("torch.", ""),
           "device": device.type}
    if backend is not None:
        reasons = get_backend(backend).not_supported_reasons(case.dispatch_op, device.type, dtype, bool(case.grad))
        reasons = reasons or case.needs(backend)
        if reasons:
            return {**row, "status": "skipped", "reason": "; ".join(reasons)}
    start = time.perf_counter()
    try:
        base = case.make(torch.Generator().manual_seed(seed))
        ref_out, ref_grads = _forward_backward(case, _prepare(base, case, dtype, torch.device("cpu"), reference=True),
                                               "torch" if backend is not None else None, seed + 1, dtype)
        # the low-precision bar: the torch backend in the same dtype on the same device
        low_out = low_grads = {}
        if backend is not None and dtype != torch.float32:
            low_out, low_grads = _forward_backward(case, _prepare(base, case, dtype, device), "torch", seed + 1, dtype)
        out, grads = _forward_backward(case, _prepare(base, case, dtype, device), backend, seed + 1, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        checks = [_compare(k, out[k], ref_out[k], low_out.get(k, None if backend is None else ref_out[k]), dtype, False)
                  for k in ref_out]
        checks += [_compare(k, grads[k], ref_grads[k], low_grads.get(k, None if backend is None else ref_grads[k]),
                            dtype, True) for k in ref_grads]
    except Exception as e:  # one failing case never stops the run
        return {**row, "status": "FAILED", "seconds": time.perf_counter() - start,
                "exception": f"{type(e).__name__}: {str(e)[:500]}", "traceback": _short_traceback()}
    failed = [c for c in checks if not c["passed"]]
    return {**row, "status": "FAILED" if failed else "passed", "seconds": time.perf_counter() - start,
            "checks": checks, "worst": _worst(checks)}


def _worst(checks: list[dict]) -> dict:
    """The check closest to (or furthest past) its tolerance."""
    def ratio(c):
        if c["error"] is None:
            return float("inf")
        return c["error"] / c["tolerance"] if c["tolerance"] else (0.0 if c["error"] == 0 else float("inf"))
    worst = max(checks, key=ratio)
    return {"output": worst["output"], "error": worst["error"], "tolerance": worst["tolerance"]}


def _short_traceback(lines: int = 6) -> str:
    return "".join(traceback.format_exc().strip().splitlines(keepends=True)[-lines:])


def run_checks(device: torch.device, quick: bool = False, deadline: float | None = None,
               on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Every case x backend x dtype on ``device``. Rows past ``deadline`` (time.time()) are skipped."""
    rows = []
    for case in cases(quick):
        for backend in backends_of(case):
            for dtype in dtypes_for(device):
                if deadline is not None and time.time() > deadline:
                    row = {"op": case.op, "case": case.name, "backend": backend or "-",
                           "dtype": str(dtype).replace("torch.", ""), "device": device.type,
                           "status": "skipped", "reason": "time budget of the section spent"}
                else:
                    row = check_case(case, backend, dtype, device)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows
