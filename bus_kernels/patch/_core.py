"""What every patch (timm, open_clip, Hugging Face) shares: per-model state, the pruning step, class swapping.

The pruning step is BUS's Text-Semantics-Aware Patch Selector (TSPS, arXiv 2307.08504, Sec. 3.2) and,
without a caption, EViT's image-[CLS] selection (arXiv 2202.07800, Sec. 3): a query (the caption
embedding through the layer's own query projection, or the image [CLS] query) attends over the
layer's patch keys (``text_patch_scores``); the best ``keep`` share of the patch tokens is kept and
the rest are fused into one score-weighted token (``topk_gather``).

Patching follows ToMe (``tome/patch/timm.py``): each pruning layer's class is swapped for a subclass
that calls the ORIGINAL ``forward`` and prunes its output, so nothing of the upstream layer is copied.
The layer's queries and keys are read with hooks on the attention's modules (``swap_layer``): forward
hooks store a module's output (a query/key projection, a q/k norm, a fused qkv projection), forward
pre-hooks store a module's positional inputs (``nn.MultiheadAttention``, whose projections are not
modules of their own).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from .._validation import check_dim_size, check_float, check_rank, check_tensor, is_number

POLICIES = ("evit", "text", "random", "tome")
SCORING = ("evit", "text")  # the policies that score patches with a query (and may fuse the dropped ones)

# Attribute names put on patched modules; ``unpatch`` removes exactly these.
STATE_ATTR = "_bus_patch_state"
LAYER_ATTRS = (
    "_bus_layer_index", "_bus_captured", "_bus_hooks", "_bus_patch_state", "_bus_original_class", "_bus_attention",
)


@dataclass(eq=False)
class PatchState:
    """One per patched model, shared by its pruning layers (ToMe's ``_tome_info``).

    ``keep[layer]`` is the share of the current patch tokens that layer keeps.
    """

    keep: dict[int, float]
    policy: str
    fuse: bool  # append the fused token (scoring policies only: random drops, tome merges)
    num_prefix_tokens: int  # [CLS] and register tokens at the front: never pruned, never scored
    embed_dim: int  # width a caption embedding must have
    backend: str | None
    layers: list = field(default_factory=list)  # the patched layer modules, in order
    hooks: list = field(default_factory=list)
    owners: list = field(default_factory=list)  # the modules holding this state (the model, a tower inside it)
    text_query: torch.Tensor | None = None
    # Each forward overwrites every entry (never clears or chains them during the forward), so gradient
    # checkpointing, which re-runs layers out of order in backward, leaves them consistent.
    first_positions: torch.Tensor | None = None  # (B, n) arange of the patches entering the first pruning layer
    selections: dict[int, torch.Tensor | None] = field(default_factory=dict)  # layer -> (B, k) index or None
    forward_text_queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> its last caption
    sizes: dict[int, torch.Tensor] = field(default_factory=dict)  # tome: layer -> (B, k) patches per output token


def keep_count(keep: float, n: int) -> int:
    """Patch tokens a layer keeps out of ``n``: ``round_half_up(keep * n)`` clamped to ``[1, n]``."""
    return min(n, max(1, math.floor(keep * n + 0.5)))


def check_options(layers, keep, policy, fuse, depth: int) -> dict[int, float]:
    """Validate the public patch arguments; returns layer -> keep ratio."""
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a sequence of layer indices (ints), got {type(layers).__name__}")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layers must hold ints, got {layer!r} ({type(layer).__name__})")
        if not 0 <= layer < depth:
            raise ValueError(f"layers: index {layer} is out of range for a model with {depth} layers (0..{depth - 1})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must not repeat an index, got {list(layers)}")
    if is_number(keep):
        keeps = [keep] * len(layers)
    elif isinstance(keep, Sequence) and not isinstance(keep, (str, bytes)):
        keeps = list(keep)
        if len(keeps) != len(layers):
            raise ValueError(f"keep has {len(keeps)} ratios but layers has {len(layers)} indices")
    else:
        raise TypeError(f"keep must be a float in (0, 1] or a sequence of them, got {type(keep).__name__}")
    for ratio in keeps:
        if not is_number(ratio):
            raise TypeError(f"keep must hold floats, got {ratio!r}")
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {ratio}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if policy == "tome" and min(keeps, default=1.0) < 0.5:
        raise ValueError(
            f"keep must be >= 0.5 with policy='tome': one bipartite matching merges at most half of the "
            f"tokens (ToMe, arXiv 2210.09461 Sec. 3), got {min(keeps)}"
        )
    if not isinstance(fuse, bool):
        raise TypeError(f"fuse must be a bool, got {type(fuse).__name__}")
    return {layer: float(ratio) for layer, ratio in zip(layers, keeps)}


def _subclass(cls: type, mixin: type) -> type:
    """``mixin`` + ``cls``, created once per original class (stable for isinstance and torch.compile)."""
    cache = mixin.__dict__.get("_bus_subclasses")
    if cache is None:
        cache = {}
        setattr(mixin, "_bus_subclasses", cache)
    if cls not in cache:
        cache[cls] = type(f"Pruning{cls.__name__}", (mixin, cls), {"__module__": mixin.__module__})
    return cache[cls]


class _Capture:
    """Forward hook storing its module's output under ``name`` in ``store`` (a plain object, not a
    closure, so ``copy.deepcopy`` of a patched model gives the copy its own store)."""

    def __init__(self, store: dict, name: str):
        self.store = store
        self.name = name

    def __call__(self, _module, _inputs, output):
        self.store[self.name] = output


class _CaptureInputs(_Capture):
    """Forward pre-hook storing its module's positional inputs (a tuple) under ``name``."""

    def __call__(self, _module, inputs):
        self.store[self.name] = inputs


def swap_layer(
    layer: nn.Module, mixin: type, state: PatchState, index: int, taps: Sequence[tuple[nn.Module, str, str]]
) -> None:
    """Turn ``layer`` into a pruning layer: swap its class and hook its attention.

    ``taps``: ``(module, "output" | "inputs", name)``: each forward stores ``module``'s output (or its
    positional inputs) in ``layer._bus_captured[name]``.
    """
    captured: dict[str, object] = {}
    hooks = []
    for module, what, name in taps:
        if what == "output":
            hooks.append(module.register_forward_hook(_Capture(captured, name)))
        else:
            hooks.append(module.register_forward_pre_hook(_CaptureInputs(captured, name)))
    layer._bus_original_class = type(layer)
    layer._bus_layer_index = index
    layer._bus_captured = captured
    layer._bus_hooks = hooks
    layer._bus_patch_state = state
    layer.__class__ = _subclass(type(layer), mixin)
    state.layers.append(layer)
    state.hooks.extend(hooks)


def install(
    owners: Sequence[nn.Module],
    swaps: dict[int, tuple[nn.Module, type, Sequence[tuple[nn.Module, str, str]]]],
    *,
    keep: dict[int, float],
    policy: str,
    fuse: bool,
    backend: str | None,
    num_prefix_tokens: int,
    embed_dim: int,
) -> PatchState:
    """What every patch does once its checks passed: unpatch what ``owners[0]`` held before, create the
    ``PatchState``, turn each layer of ``swaps`` (layer index -> ``(layer, mixin, taps)``, see ``swap_layer``)
    into a pruning layer, and make the state reachable from every owner. Call it after every check, so
    that a rejected call leaves the model as it was."""
    unpatch_inside(owners[0])
    state = PatchState(
        keep=keep,
        policy=policy,
        fuse=fuse and policy in SCORING,
        num_prefix_tokens=num_prefix_tokens,
        embed_dim=embed_dim,
        backend=backend,
    )
    for index in sorted(swaps):
        layer, mixin, taps = swaps[index]
        swap_layer(layer, mixin, state, index, taps)
    attach(state, *owners)
    return state


def attach(state: PatchState, *owners: nn.Module) -> None:
    """Make ``state`` reachable from each of ``owners`` (``text_guidance``, ``kept_patches``, ``unpatch``)."""
    for owner in owners:
        if owner not in state.owners:
            state.owners.append(owner)
            owner.__dict__[STATE_ATTR] = state


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``bus_kernels.patch.timm`` / ``open_clip`` / ``hf_vision``: original classes, no hooks, no
    extra attributes (on the model and on any tower inside it that was patched with it).

    Args:
        model: a model patched by this package (a model that is not patched is returned unchanged).

    Returns:
        ``model`` itself, behaving exactly as before it was patched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        return model
    for hook in state.hooks:
        hook.remove()
    for layer in state.layers:
        layer.__class__ = layer._bus_original_class
        for name in LAYER_ATTRS:
            layer.__dict__.pop(name, None)
    for owner in state.owners or [model]:
        owner.__dict__.pop(STATE_ATTR, None)
    model.__dict__.pop(STATE_ATTR, None)
    return model


def unpatch_inside(model: nn.Module) -> None:
    """Unpatch ``model`` and every module inside it that was patched on its own (a tower patched
    before its wrapper), so that no layer is swapped twice."""
    for module in list(model.modules()):
        if STATE_ATTR in module.__dict__:
            unpatch(module)


def scoring_query(state: PatchState, q: torch.Tensor) -> torch.Tensor:
    """EViT's query from a layer's queries ``q`` ``(B, N, H, D)``: the image [CLS] query ``q[:, 0]``;
    with no prefix token (SigLIP) the mean query over all tokens, which is the query of the mean
    normalised token because the query projection is affine (``(B, H, D)``)."""
    return q[:, 0] if state.num_prefix_tokens else q.mean(dim=1)


def get_state(model: nn.Module) -> PatchState:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        raise ValueError(
            f"model ({type(model).__name__}) is not patched: call bus_kernels.patch.timm(...), open_clip(...) "
            "or hf_vision(...) first"
        )
    return state


@contextlib.contextmanager
def text_guidance(model: nn.Module, text_query: torch.Tensor) -> Iterator[None]:
    """Score patches against a caption while inside the ``with`` block (models patched with ``policy="text"``).

    Args:
        model: a model patched with ``policy="text"``.
        text_query: ``(B, C)`` floating caption embedding (e.g. the text encoder's [CLS]), already in the
            ViT's width ``C``; ``B`` must equal the image batch size. Each pruning layer maps it through
            its own query projection (and query norm, if the model has one).

    Nesting is allowed; the previous caption is restored on exit.
    """
    state = get_state(model)
    if state.policy != "text":
        raise ValueError(f"text_guidance needs a model patched with policy='text'; this one uses {state.policy!r}")
    check_tensor("text_query", text_query)
    check_rank("text_query", text_query, 2, "(B, C)")
    check_float("text_query", text_query)
    check_dim_size("text_query", text_query, 1, state.embed_dim, "the ViT's embedding width")
    previous = state.text_query
    state.text_query = text_query
    try:
        yield
    finally:
        state.text_query = previous


def kept_patches(model: nn.Module) -> dict[int, torch.Tensor]:
    """Which patches the last forward kept: pruning layer -> ``(B, k + fuse)`` int64 patch positions.

    Positions index the patch tokens (``0 .. num_patches - 1``, the patch grid row-major) as they
    entered the first pruning layer, in the order the tokens now have; ``-1`` marks a fused token.
    A layer whose ``keep`` left every token in place lists the positions it received.
    """
    state = get_state(model)
    result: dict[int, torch.Tensor] = {}
    positions = state.first_positions
    for layer in sorted(state.selections):
        index = state.selections[layer]
        if index is not None:
            positions = torch.gather(positions, 1, index)  # (B, k)
            if state.fuse:
                positions = torch.cat([positions, positions.new_full((positions.shape[0], 1), -1)], dim=1)
        result[layer] = positions
    return result


def text_query_for(state: PatchState, batch: int, layer: int) -> torch.Tensor:
    """The active caption embedding of pruning layer ``layer``, checked against the image batch.

    Gradient checkpointing re-runs a layer's forward inside backward, after the ``text_guidance``
    block has exited: there the layer reuses the caption of its last forward (so run backward before
    the next forward, as training loops do).
    """
    text_query = state.text_query
    if text_query is None and torch._C._current_graph_task_id() != -1:  # inside backward: a recomputation
        text_query = state.forward_text_queries.get(layer)
    if text_query is None:
        raise ValueError(
            "this model was patched with policy='text' and needs a caption embedding: run it inside "
            "`with bus_kernels.patch.text_guidance(model, text_query):`"
        )
    if text_query.shape[0] != batch:
        raise ValueError(f"text_query has batch size {text_query.shape[0]} but the images have {batch}")
    state.forward_text_queries[layer] = text_query
    return text_query
