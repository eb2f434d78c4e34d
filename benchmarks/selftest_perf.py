"""``bus selftest`` measuring sections: dispatch choices, op timings against their peers, one training
step per pruning backend, and the host syncs of a step.

Op timing, three numbers per op, backend and phase (forward; forward + backward) on a GPU:
  * whole call: ``triton.testing.do_bench`` (CUDA events, median; host work included, so a host-bound
    call is timed at its host cost);
  * CUDA graph: ``triton.testing.do_bench_cudagraph`` (the call replayed from a graph: what it costs once
    the host is out of the way; warm L2);
  * kernel only: the device time of the call's kernels in ``torch.profiler``, L2 flushed before each call
    (cold, as inside a training step) -- the basis of the achieved bandwidth (text_patch_scores,
    topk_gather: the bytes they cannot avoid moving, over the device's peak from its memory clock and
    bus width) and TFLOP/s (attention: useful FLOPs, over the peak dense bf16 FLOP/s of ``harness``).
On a CPU the Triton interpreter is never timed, the other backends get a plain median of wall-clock runs
(a CPU number is not a GPU result), and only the work counts (MB, GFLOP) are reported beside them. Every
measurement first checks the section's deadline and is skipped, with that reason, past it.
"""

from __future__ import annotations

import time
import traceback
from typing import Callable

import torch

import bus_kernels as bk
from bus_kernels.backends import (
    BackendNotSupportedError,
    TRITON_INTERPRET,
    get_backend,
    registered_backends,
    registered_ops,
    select_backend,
)
from bus_kernels.ops.varlen_attention.dense import dense_reasons
from bus_kernels.ops.varlen_attention.limits import ATTENTION_LIMITS

from .host_syncs import step_sync_counts
from .selftest_checks import dtypes_for

ATTENTION_HEAD_DIM = 64  # the head dim the dispatch report and the timings use (ViT-B/16)


def _error(e: BaseException) -> dict:
    return {"exception": f"{type(e).__name__}: {str(e)[:500]}",
            "traceback": "".join(traceback.format_exc().strip().splitlines(keepends=True)[-6:])}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# dispatch


# self-attention sequence lengths the dispatch report asks about: a dense batch and a ragged one
DISPATCH_LENGTHS = {True: [197] * 4, False: [197, 120, 150, 33]}


def _attention_reasons(name: str, lengths: list[int]) -> list[str]:
    """Why attention backend ``name`` cannot take head dim 64 without key_bias for self-attention over
    sequences of these ``lengths``."""
    limits = ATTENTION_LIMITS.get(name)
    if limits is None:
        return []
    reasons = limits.reasons(ATTENTION_HEAD_DIM, False)
    if limits.dense_only:
        reasons += dense_reasons(len(lengths), sum(lengths), sum(lengths), max(lengths), max(lengths), False)
    return reasons


def dispatch_report(device: torch.device) -> list[dict]:
    """Per op and dtype (inputs requiring grad): the backend ``backend=None`` picks and why the ones
    before it in the preference list were passed over. Attention is asked at head dim 64, no key_bias,
    for a ragged batch (op ``varlen_attention``) and a dense one (``varlen_attention dense``)."""
    rows = []
    ops = [(op, op, False) for op in sorted(registered_ops())]
    ops.insert([o for o, _, _ in ops].index("varlen_attention") + 1, ("varlen_attention dense", "varlen_attention", True))
    for label, op, dense in ops:
        prefs = registered_ops()[op]
        for dtype in dtypes_for(device):
            def extra(name, op=op, dense=dense):
                return _attention_reasons(name, DISPATCH_LENGTHS[dense]) if op == "varlen_attention" else []

            try:
                chosen = select_backend(op, device, dtype, True, None, extra)
            except BackendNotSupportedError as e:
                chosen, note = None, str(e)
            else:
                note = None
            considered = []
            for name in prefs.get(device.type, []):
                reasons = get_backend(name).not_supported_reasons(op, device.type, dtype, True) or extra(name)
                considered.append({"backend": name, "usable": not reasons, "reasons": reasons})
            rows.append({"op": label, "dtype": str(dtype).replace("torch.", ""), "chosen": chosen,
                         "preference": considered, **({"error": note} if note else {})})
    return rows


# ---------------------------------------------------------------------------------------------
# op timings


def _time_ms(fn: Callable[[], object], device: torch.device, quick: bool) -> float:
    """Whole-call time: host work included (a host-bound call is timed at its host cost)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10 if quick else 20, rep=30 if quick else 50,
                                             return_mode="median"))
    fn()  # warm-up
    times = []
    for _ in range(3 if quick else 10):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def _graph_ms(fn: Callable[[], object]) -> tuple[float | None, str | None]:
    """Time per call replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``): no host work, warm
    L2. (None, why) when the call cannot be captured (e.g. a peer that reads sequence lengths on the host)."""
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")), None
    except Exception as e:  # noqa: BLE001 - a capture failure is a finding, not a crash
        torch.cuda.synchronize()
        return None, f"not capturable: {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"


# flushed between profiled calls so that every call reads its inputs from DRAM (H200 L2: 50 MB)
_FLUSH_BYTES = 256 * 2**20


def _kernel_ms(fn: Callable[[], object], device: torch.device, iters: int) -> tuple[float | None, str | None]:
    """Kernel-only time per call, L2 flushed before each: the device time of every kernel, memset and memcpy
    the profiler sees in ``iters`` calls (forward and backward threads alike), less the flushes' own kernels,
    over ``iters``. (None, why) when the profiler sees no device work."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    flush = torch.empty(_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            with record_function("bus_selftest_flush"):
                flush.zero_()
            fn()
        torch.cuda.synchronize(device)
    events = prof.events()
    # device-side events: kernels, memsets, memcopies -- not the GPU spans of the record_function ranges
    device_us = sum(e.time_range.elapsed_us() for e in events
                    if e.device_type == DeviceType.CUDA and not e.is_user_annotation
                    and e.activity_type != "gpu_user_annotation" and e.name != "bus_selftest_flush")
    flush_us = sum(e.device_time_total for e in events
                   if e.name == "bus_selftest_flush" and e.device_type == DeviceType.CPU)
    if device_us <= 0:
        return None, "the profiler saw no device work"
    return max(device_us - flush_us, 0.0) / iters / 1e3, None


def _timeable(op: str, device: torch.device, dtype: torch.dtype,
              lengths: list[int] | None = None) -> list[tuple[str, str | None]]:
    """(backend, reason not timed or None) for every backend implementing ``op`` (attention: for
    self-attention over sequences of these ``lengths``)."""
    out = []
    for name, backend in registered_backends().items():
        if op not in backend.ops:
            continue
        why = "; ".join(backend.not_supported_reasons(op, device.type, dtype, True)) or None
        if why is None and name == "triton" and device.type == "cpu" and TRITON_INTERPRET:
            why = "Triton interpreter: a correctness tool, not timed"
        if why is None and op == "varlen_attention":
            why = "; ".join(_attention_reasons(name, lengths)) or None
        out.append((name, why))
    return out


# backends whose call reads device values on the host (not capturable in a CUDA graph): not even tried
NOT_CAPTURABLE = {"xformers": "reads the sequence lengths on the host (BlockDiagonalMask.from_seqlens)"}


def _fwd_and_full(make_inputs: Callable[[], tuple], forward: Callable[[tuple], torch.Tensor], device, quick,
                  not_capturable: str | None = None) -> dict:
    """Forward and forward + backward: whole-call ms; on a GPU also ms replayed from a CUDA graph and kernel-only
    ms (profiler, cold L2), with the reason where one could not be measured."""
    a = make_inputs()
    out = forward(a)
    g = torch.randn_like(out)
    leaves = [t for t in a if isinstance(t, torch.Tensor) and t.requires_grad]

    def fwd():
        with torch.no_grad():
            forward(a)

    def full():
        torch.autograd.grad(forward(a), leaves, g)

    row = {"fwd_ms": _time_ms(fwd, device, quick), "fwd_bwd_ms": _time_ms(full, device, quick)}
    if device.type == "cuda":
        notes = []
        for name, fn in (("fwd", fwd), ("fwd_bwd", full)):
            row[f"{name}_graph_ms"], why = (None, f"not capturable: {not_capturable}") if not_capturable else _graph_ms(fn)
            if why:
                notes.append(f"{name} graph: {why}")
            try:
                row[f"{name}_kernel_ms"], why = _kernel_ms(fn, device, 5 if quick else 10)
            except Exception as e:  # noqa: BLE001 - the profiler failing costs this column only
                row[f"{name}_kernel_ms"], why = None, f"{type(e).__name__}: {str(e)[:150]}"
            if why:
                notes.append(f"{name} kernel: {why}")
        if notes:
            row["timing_notes"] = "; ".join(notes)
    return row


# ---------------------------------------------------------------------------------------------
# work per call (the floor each kernel is judged against)


def attention_flops(lengths_q: list[int], lengths_k: list[int], H: int, D: int, causal: bool = False) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of attention over these sequences: 4 H D Lq Lk forward (two
    matmuls), 2.5x that backward (FlashAttention-2's count); causal halves it. Useful work only: what
    padding would add is not counted, so padded and packed runs of the same batch compare directly."""
    fwd = 4.0 * H * D * sum(lq * lk for lq, lk in zip(lengths_q, lengths_k)) * (0.5 if causal else 1.0)
    return fwd, 3.5 * fwd


def tps_bytes(B: int, N: int, H: int, D: int, esize: int) -> tuple[float, float]:
    """(forward, forward + backward) DRAM bytes text_patch_scores cannot avoid: read the keys and query, write
    the (B, N) fp32 scores; backward reads them and the (B, N) gradient again and writes their gradients."""
    keys, query, scores = B * N * H * D * esize, B * H * D * esize, B * N * 4
    fwd = keys + query + scores
    bwd = keys + query + scores + keys + query  # read keys, query, grad; write dkeys, dquery
    return float(fwd), float(fwd + bwd)


def topk_gather_bytes(B: int, N: int, C: int, k: int, esize: int, fuse: bool = True) -> tuple[float, float]:
    """(forward, forward + backward) DRAM bytes topk_gather cannot avoid: read x and the fp32 scores, write the
    kept (+ fused) tokens and the int64 index; backward reads the tokens' gradient, the dropped rows of x and
    the scores, and writes grad_x and grad_scores."""
    rows_out = k + int(fuse)
    fwd = B * N * C * esize + B * N * 4 + B * rows_out * C * esize + B * k * 8
    bwd = B * rows_out * C * esize + B * (N - k) * C * esize * int(fuse) + B * N * 4 + B * N * C * esize + B * N * 4
    return float(fwd), float(fwd + bwd)


def achieved(row: dict, device: torch.device, *, flops: tuple[float, float] | None = None,
             bytes_moved: tuple[float, float] | None = None) -> dict:
    """The work counts of a timed row and, on a GPU, what its kernel-only times achieve: TFLOP/s (attention)
    or GB/s (memory-bound ops), each as a share of the device's peak, and whole-call / kernel time."""
    from .harness import peak_bf16_flops, peak_memory_bandwidth

    # (work per phase, its count key and scale, its rate key and scale, the device's peak rate)
    kinds = [kind for kind in ((flops, "gflop", 1e9, "tflops", 1e12, peak_bf16_flops),
                               (bytes_moved, "mb", 1e6, "gbps", 1e9, peak_memory_bandwidth)) if kind[0] is not None]
    out = {}
    for i, phase in enumerate(("fwd", "fwd_bwd")):
        for work, count, count_scale, *_ in kinds:
            out[f"{phase}_{count}"] = work[i] / count_scale
        kernel_ms = row.get(f"{phase}_kernel_ms") or row.get(f"{phase}_graph_ms")
        if device.type != "cuda" or not kernel_ms:
            continue
        out[f"{phase}_time_basis"] = "kernel" if row.get(f"{phase}_kernel_ms") else "graph"
        if row.get(f"{phase}_ms"):
            out[f"{phase}_call_over_kernel"] = row[f"{phase}_ms"] / kernel_ms
        for work, _, _, rate, rate_scale, peak_of in kinds:
            per_s = work[i] / (kernel_ms * 1e-3)
            out[f"{phase}_{rate}"] = per_s / rate_scale
            peak, _ = peak_of(device)
            if peak:
                out[f"{phase}_peak_pct"] = 100.0 * per_s / peak
    return out


def timing_rows(device: torch.device, quick: bool, deadline: float, on_row: Callable[[dict], None]) -> list[dict]:
    """Each op on each backend that runs here, and the attention peers, at ViT shapes: whole-call time, and on a
    GPU the time replayed from a CUDA graph and the kernel-only time, with the bandwidth (text_patch_scores,
    topk_gather) or TFLOP/s (attention) the kernels achieve as a share of the device's peak."""
    from .kernels import realistic_lengths

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    esize = torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        B, H, D, C = 32, 12, ATTENTION_HEAD_DIM, 768
        token_counts = (197,) if quick else (197, 577)
    else:
        B, H, D, C = 4, 4, ATTENTION_HEAD_DIM, 256
        token_counts = (65,)
    rows: list[dict] = []

    def add(row):
        rows.append(row)
        on_row(row)

    def measure(op, shape, backend, make_inputs, forward, **work):
        row = {"op": op, "shape": shape, "backend": backend, "dtype": str(dtype).replace("torch.", "")}
        if time.time() > deadline:
            return add({**row, "status": "skipped", "reason": "time budget spent"})
        try:
            timed = _fwd_and_full(make_inputs, forward, device, quick, NOT_CAPTURABLE.get(backend))
            add({**row, "status": "ok", **timed, **achieved(timed, device, **work)})
        except Exception as e:  # a failing peer never stops the section
            add({**row, "status": "error", **_error(e)})

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, device=device, dtype=dt, requires_grad=True)

    for N in token_counts:
        k = int(0.7 * N)
        for name, why in _timeable("text_patch_scores", device, dtype):
            if why:
                add({"op": "text_patch_scores", "backend": name, "status": "skipped", "reason": why})
                continue
            measure("text_patch_scores", f"B={B} N={N} H={H} D={D}", name, lambda: (randn(B, H, D), randn(B, N, H, D)),
                    lambda a, name=name: bk.text_patch_scores(*a, backend=name),
                    bytes_moved=tps_bytes(B, N, H, D, esize))
        for name, why in _timeable("topk_gather", device, dtype):
            if why:
                add({"op": "topk_gather", "backend": name, "status": "skipped", "reason": why})
                continue
            measure("topk_gather", f"B={B} N={N} C={C} k={k}", name, lambda: (randn(B, N, C), torch.rand(B, N, device=device, requires_grad=True)),
                    lambda a, name=name, k=k: bk.topk_gather(a[0], a[1], k, backend=name).tokens,
                    bytes_moved=topk_gather_bytes(B, N, C, k, esize))
        for label, lengths in (("dense", [N] * B), ("ragged", realistic_lengths(B, N - 2))):
            total, max_len = sum(lengths), max(lengths)
            cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
            shape = f"{label}: B={B} N<={max_len} ({total} tokens) H={H} D={D}"
            flops = attention_flops(lengths, lengths, H, D)
            qkv = lambda total=total: (randn(total, H, D), randn(total, H, D), randn(total, H, D))  # noqa: E731
            for name, why in _timeable("varlen_attention", device, dtype, lengths):
                if why:
                    add({"op": "varlen_attention", "backend": name, "status": "skipped", "reason": why})
                    continue
                measure("varlen_attention", shape, name, qkv,
                        lambda a, name=name, cu=cu, m=max_len: bk.varlen_attention(*a, cu, cu, m, m, check_seqlens=False,
                                                                                   backend=name), flops=flops)
            mask = (torch.arange(max_len, device=device)[None] < torch.tensor(lengths, device=device)[:, None])
            measure("varlen_attention", shape, "padded SDPA" + (" (no mask)" if label == "dense" else " + key mask"),
                    lambda: (randn(B, H, max_len, D), randn(B, H, max_len, D), randn(B, H, max_len, D)),
                    lambda a, mask=mask, dense=label == "dense": torch.nn.functional.scaled_dot_product_attention(
                        *a, attn_mask=None if dense else mask[:, None, None, :]), flops=flops)
    return rows


# ---------------------------------------------------------------------------------------------
# the model: one training step per pruning backend, and the host syncs of a step


def _build(name: str, overrides: dict, batch_size: int, device: torch.device):
    from bus_model import create_model, get_config
    from bus_model.data import build_synthetic_tokenizer
    from bus_model.data.tokenizer import text_config_overrides

    from .train_speed import SyntheticBatches

    config = get_config(name, **overrides)
    tokenizer = build_synthetic_tokenizer(model_max_length=config.max_text_len)
    torch.manual_seed(0)
    model = create_model(name, **overrides, text=text_config_overrides(tokenizer)).to(device)
    return model, SyntheticBatches(model.config, tokenizer, batch_size, 0, device)


def model_variants(device: torch.device, quick: bool) -> list[tuple[str, str, dict]]:
    """(label, config name, overrides): bus-small with each pruning backend that runs here, with varlen
    attention, with ragged keep-by-mass selection, and the baseline twin."""
    model = "bus-tiny" if quick and device.type == "cpu" else "bus-small"
    variants = []
    for name, backend in registered_backends().items():
        if "topk_gather" not in backend.ops:
            continue
        why = backend.not_supported_reasons("topk_gather", device.type, torch.float32, True)
        if not why and not (name == "triton" and device.type == "cpu"):  # the interpreter: too slow for a model
            variants.append((f"{model} kernel_backend={name}", model, {"kernel_backend": name}))
    variants.append((f"{model} attn_impl=varlen", model, {"attn_impl": "varlen"}))
    variants.append((f"{model} keep_mode=mass attn_impl=varlen", model,
                     {"attn_impl": "varlen", "selection": {"keep_mode": "mass"}}))
    variants.append((f"{model}-baseline", f"{model}-baseline", {}))
    return variants


def training_rows(device: torch.device, quick: bool, deadline: float, on_row: Callable[[dict], None]) -> list[dict]:
    """Time and peak memory of one training step (forward, backward, fused AdamW; bf16 autocast on CUDA)."""
    from .train_speed import make_step

    amp = device.type == "cuda"
    batch_size = 32 if device.type == "cuda" else 2
    warmup, steps = (2, 3) if device.type == "cuda" else (1, 1)
    rows = []
    for label, name, overrides in model_variants(device, quick):
        row = {"variant": label, "batch_size": batch_size, "amp_bf16": amp}
        if time.time() > deadline:
            row.update(status="skipped", reason="time budget spent")
        else:
            try:
                model, data = _build(name, overrides, batch_size, device)
                step = make_step(model, 1e-4, amp, device)
                batch = data[0]
                for _ in range(warmup):
                    step(batch)
                _sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times = []
                for _ in range(steps):
                    start = time.perf_counter()
                    loss = step(batch)
                    _sync(device)
                    times.append(time.perf_counter() - start)
                row.update(status="ok", step_ms=sorted(times)[len(times) // 2] * 1e3, loss=float(loss),
                           peak_memory_mib=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None)
                del model, step
            except Exception as e:
                row.update(status="error", **_error(e))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        on_row(row)
    return rows


def sync_budgets(model: str, device: torch.device) -> dict[str, int | None]:
    """Host syncs a forward + backward may make (tests/test_host_syncs.py holds them on CPU): none with
    sdpa, 2 with varlen (the text masks' packed sizes), one per selection layer with keep_mode="mass" (the
    ragged kept counts), when the ragged pruning op runs compiled (not the torch reference); with both, one
    more when the caption-free ITC rows are stacked onto the guided ones (losses.itc_image="text_free": the
    guided half's mask is packed once for PAD)."""
    from bus_model import get_config

    config = get_config(model)
    layers = len(config.selection.layers)
    stacked = int(config.losses.itc_image == "text_free")
    compiled = select_backend("topk_gather", device, torch.float32, True) != "torch"
    return {"sdpa": 0, "varlen": 2, "mass": layers if compiled else None,
            "mass+varlen": layers + 2 + stacked if compiled else None, "baseline": 0}


def sync_rows(device: torch.device, quick: bool, deadline: float, on_row: Callable[[dict], None]) -> list[dict]:
    """Host syncs of one forward + backward (batch 2, after a warm-up step) per model variant, against
    ``sync_budgets`` (op counter; on CUDA the sync-debug-mode count is reported beside it)."""
    rows = []
    model = "bus-tiny" if quick and device.type == "cpu" else "bus-small"
    budgets = sync_budgets(model, device)
    variants = [("sdpa", f"{model} attn_impl=sdpa", model, {}),
                ("varlen", f"{model} attn_impl=varlen", model, {"attn_impl": "varlen"}),
                ("mass", f"{model} keep_mode=mass", model, {"selection": {"keep_mode": "mass"}}),
                ("mass+varlen", f"{model} keep_mode=mass attn_impl=varlen", model,
                 {"attn_impl": "varlen", "selection": {"keep_mode": "mass"}}),
                ("baseline", f"{model}-baseline", f"{model}-baseline", {})]
    for kind, label, name, overrides in variants:
        row = {"variant": label, "budget": budgets[kind]}
        if time.time() > deadline:
            row.update(status="skipped", reason="time budget spent")
        else:
            try:
                model_obj, data = _build(name, overrides, 2, device)
                row.update(status="ok", **step_sync_counts(model_obj, data[0], amp=device.type == "cuda"))
                if row["budget"] is not None and row["total"] > row["budget"]:
                    row["status"] = "over budget"
                del model_obj
            except Exception as e:
                row.update(status="error", **_error(e))
        rows.append(row)
        on_row(row)
    return rows
