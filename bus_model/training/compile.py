"""``--compile MODE``: the training step's forward and backward under ``torch.compile`` (issue 22).

Measured on one H200 (README, GPU section), an eager bus-small step is bound by the host's dispatch of
its thousands of ops (about 7000 then), not by its FLOPs; a compiled step launches a few fused kernels
instead, and ``reduce-overhead`` replays them as CUDA graphs. What the model guarantees for that
(DESIGN.md, "The step on a GPU"):

* ``fullgraph=True``: one graph for forward + backward, no graph breaks (``bus_model/packing.py``
  bypasses its identity-keyed cache while tracing). The ``bus_kernels`` ops stay opaque custom ops in
  the graph (``torch.library`` registrations with fake implementations).
* static shapes: captions padded to ``config.max_text_len`` (``Collator(pad_to_max_length=True)``),
  fixed keep ratios (``keep_mode="ratio"``), padded SDPA attention (``attn_impl="sdpa"``); so a batch
  whose captions have other lengths reuses the graph (``dynamic=False``: a new batch size is a new,
  still static, graph).
* randomness from torch's RNG only (MLM masking, ITM negatives, random-policy masks: ``torch.rand``,
  ``randint`` inside the graph), which CUDA-graph capture accepts; no host-side numpy / Python draws.

The optimizer step stays outside the graph: fused AdamW (``training/optim.py``) dispatches 4 ops per
step for bus-small's 408 parameters (one ``_fused_adamw_`` and one ``_foreach_add_`` of the step counts
per parameter group; counted on CPU), each a multi-tensor kernel: a handful of launches on CUDA
against the model step's thousands, so compiling it saves almost nothing. A compiled optimizer would
also recompile whenever the schedule's Python-float learning rate changed (unless made a tensor),
add its own compile time, and pull the momentum EMA hook and gradient clipping into the graph.
Gradients leave the backward graph into ``.grad`` as in eager, so DDP's bucketed all-reduce,
clipping and checkpoints are unchanged.

Not compiled (refused with one clear error): ``keep_mode="mass"`` (per-image keep counts make the
token count ragged: data-dependent shapes), ``attn_impl="varlen"`` (packs the valid tokens: the packed
size is data-dependent and read on the host), ``--fsdp`` (FSDP2's per-block hooks need compiled
autograd; DDP is supported), and ``reduce-overhead`` with ``--accum-steps > 1`` (a CUDA graph replay
overwrites the gradient buffers the previous micro-batch left in ``.grad``). A batch of another size
(e.g. a short last batch) compiles one more static graph, once.
"""

from __future__ import annotations

import torch

# torch.compile's modes; "none" runs eager
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
# "inductor" generates kernels (the GPU choice); "aot_eager" traces forward + backward with AOTAutograd
# and runs them with eager aten ops (fast to build: CPU tests); "eager" only runs dynamo's graph capture
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")

COMPILE_HELP = ("torch.compile the training forward + backward with fullgraph=True (captions padded to the "
                "config's max_text_len, so shapes are static): none (eager), default, reduce-overhead (CUDA "
                "graphs: the least host overhead on a GPU), max-autotune (slowest to compile). Needs "
                "keep_mode='ratio' and attn_impl='sdpa'. Default: none")
BACKEND_HELP = ("torch.compile backend for --compile: inductor (default; generated kernels), aot_eager (traces "
                "forward + backward, runs eager ops: quick to build, for CPU tests), eager (graph capture only)")


def check_compile_mode(mode: str, backend: str = "inductor", *, flag: str = "--compile") -> None:
    """Raise ``ValueError`` naming ``flag`` for an unknown mode or backend."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"{flag}: unknown mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"{flag}-backend: unknown backend {backend!r}; choose one of {', '.join(COMPILE_BACKENDS)}")
    if mode in ("reduce-overhead", "max-autotune") and backend != "inductor":
        raise ValueError(f"{flag} {mode} is an inductor mode: it needs {flag}-backend inductor, got {backend!r}")


def compile_problems(config) -> list[str]:
    """Why ``config`` (a ``BusConfig``) cannot run as one static-shape graph; empty when it can."""
    problems = []
    if config.selection.keep_mode != "ratio":
        problems.append(f'selection.keep_mode="{config.selection.keep_mode}" keeps a different number of tokens per '
                        'image (ragged, data-dependent shapes); compiling supports keep_mode="ratio" (a fixed '
                        "keep ratio per selection layer)")
    if config.attn_impl != "sdpa":
        problems.append(f'attn_impl="{config.attn_impl}" packs the valid tokens into a data-dependent length read on '
                        'the host, which fullgraph compile cannot trace; compiling supports attn_impl="sdpa" (padded '
                        "attention with key masks)")
    return problems


def check_compile_config(config, mode: str, *, flag: str = "--compile") -> None:
    """Raise ``ValueError`` naming ``flag`` when ``mode`` is not "none" and ``config`` cannot compile."""
    if mode == "none":
        return
    problems = compile_problems(config)
    if problems:
        raise ValueError(f"{flag} {mode}: " + "; ".join(problems))


def compile_model(model: torch.nn.Module, mode: str, backend: str = "inductor") -> torch.nn.Module:
    """Compile ``model``'s forward (and so its backward) in place for training (``fullgraph=True``,
    ``dynamic=False``) and return it; mode "none" leaves it eager.

    In place (``nn.Module.compile``), not ``torch.compile(model)``: the module keeps its own state dict
    keys (no ``_orig_mod.`` prefix in checkpoints), and under DDP the wrapper stays outside the graph:
    wrap the compiled module with ``DistributedDataParallel`` afterwards and dynamo's DDP optimizer
    splits the graph at DDP's gradient buckets, so the all-reduce overlaps the backward as in eager.
    (Compiling the DDP wrapper itself with ``fullgraph=True`` fails: its ``_pre_forward`` cannot be traced.)
    """
    check_compile_mode(mode, backend)
    if mode == "none":
        return model
    kwargs = {"backend": backend, "fullgraph": True, "dynamic": False}
    if backend == "inductor" and mode != "default":
        kwargs["mode"] = mode
    model.compile(**kwargs)
    return model


def uses_cuda_graphs(mode: str, backend: str, device: torch.device) -> bool:
    return mode == "reduce-overhead" and backend == "inductor" and torch.device(device).type == "cuda"


def step_begin(mode: str, backend: str, device: torch.device) -> None:
    """Call before each training step's forward: with CUDA graphs, tells cudagraph trees that the
    previous step's outputs are no longer needed (a new iteration begins), so replays never wait on
    or overwrite tensors still in use."""
    if uses_cuda_graphs(mode, backend, device):
        torch.compiler.cudagraph_mark_step_begin()


def count_graph_breaks(fn, *args, **kwargs) -> tuple[int, int, list[str]]:
    """(graphs, graph breaks, break reasons) of ``fn(*args, **kwargs)`` traced by ``torch._dynamo.explain``."""
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    return explained.graph_count, explained.graph_break_count, [b.reason for b in explained.break_reasons]
