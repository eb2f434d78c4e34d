"""Top-k token selection + gather + fusion of the dropped tokens (BUS TSPS, Sec. 3.2; EViT's
"inattentive token fusion"; ELIP's score-weighted merge).

Per row b of ``x (B, N, C)`` with scores ``s (B, N)``: keep the k highest-scoring tokens (ties to the
lower position) in ascending position order, then, if ``fuse``, append one token
``sum_{j dropped} s_j x_j / max(sum_{j dropped} s_j, eps)``.

Triton path, three kernels:
  * ``_topk_select_kernel`` (one program per row): the row's scores are mapped to order-preserving
    integer keys on-chip, a 32-step radix select finds the k-th largest key, ties are broken by a
    prefix sum, and a second prefix sum gives each kept token its output slot. Writes ``index``, a
    (B, N) int32 slot map (-1 = dropped) and the rows' offsets in the packed output (``cu_seqlens``,
    summed from ``k`` in the kernel: no cumsum launches). No sort, no global scratch beyond the slot map.
  * ``_topk_gather_fwd_kernel`` (row x channel block): one pass over x, each element read once; kept
    rows are stored to their slot, dropped rows accumulate into the fused token in fp32.
  * ``_topk_gather_bwd_kernel`` (row x token block): grad_x written once per element without atomics;
    grad_scores (through the fused token only) reduced over channels in the same program.

The same kernels serve the fixed-k op (all rows keep k) and the ragged ``topk_gather_varlen``
(per-row k, packed output with ``cu_seqlens``). A fixed-k forward launches 3 kernels (a ``full`` for
the row counts and the two above), its backward 1 (``tests/test_op_launches.py``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .. import reference
from .._capture import refuse_capture
from .._direct import DirectOp
from .._validation import (
    FLOAT_DTYPES,
    check_dim_size, check_float, check_int, check_rank, check_same_device, check_tensor, is_number,
)
from ..backends import get_impl, register_impl, select_backend
from ..reference.pruning import FUSE_EPS
from ._triton_utils import cdiv, constant, next_pow2, on_device, tile_rows

# Largest N the on-chip selection takes (the row's scores live in registers as one tile).
TRITON_MAX_N = 16384


class TopkGatherOutput(NamedTuple):
    """tokens: (B, k + fuse, C), x's dtype. index: (B, k) int64, ascending kept positions."""

    tokens: torch.Tensor
    index: torch.Tensor


class TopkGatherVarlenOutput(NamedTuple):
    """tokens: (total, C), x's dtype, row b at ``tokens[cu_seqlens[b]:cu_seqlens[b+1]]`` (kept, then fused).
    index: (sum k,) int64, row b's kept positions (ascending) at ``index[cu_seqlens[b] - b*fuse :
    cu_seqlens[b+1] - (b+1)*fuse]``. cu_seqlens: (B + 1,) int32. max_seqlen: int, longest row."""

    tokens: torch.Tensor
    index: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int


# Triton kernels: topk_gather_kernels.py (imported here so the launchers and aot find them).
from .topk_gather_kernels import _topk_gather_bwd_kernel, _topk_gather_fwd_kernel, _topk_select_kernel  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Launchers, registered as torch.library custom ops so torch.compile traces through them.


# Tiles of at most 2048 elements over 8 warps keep the gather kernels spill-free (see python -m bus_kernels.aot).
GATHER_WARPS = 8


@functools.lru_cache(maxsize=None)  # a few channel counts per model; asked on every call
def _gather_blocks(C: int) -> tuple[int, int]:
    block_c = min(next_pow2(C), 128)
    return tile_rows(block_c, budget=2048, max_rows=32), block_c


def _select_warps(NP: int) -> int:
    return 4 if NP <= 1024 else 16 if NP <= 4096 else 8


def _topk_gather_triton_body(
    x: torch.Tensor, scores: torch.Tensor, k: torch.Tensor, total_kept: int, fuse: bool, fixed_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, N, C) with unit channel stride, scores (B, N), k (B,) int64, total_kept = sum(k) ->
    tokens (total_kept + B*fuse, C), index (total_kept,) int64, slot (B, N) int32, fused (B, C + 1) fp32
    (row b: the fused token in fp32, then its weight sum, the backward's divisor), cu_seqlens (B + 1,)
    int32 (row b of tokens at cu_seqlens[b]:cu_seqlens[b + 1]).
    ``fixed_k >= 0``: every row keeps that many, and tokens / index come shaped (B, fixed_k + fuse, C) /
    (B, fixed_k) (the same memory; no views to make afterwards). -1: ragged rows.
    Every output is written whole by the kernels (``empty``, no fills); fused only with fuse, the only
    case the backward reads it."""
    B, N, C = x.shape
    if fixed_k >= 0:
        tokens = x.new_empty((B, fixed_k + int(fuse), C))
        index = x.new_empty((B, fixed_k), dtype=torch.int64)
    else:
        tokens = x.new_empty((total_kept + B * int(fuse), C))
        index = x.new_empty((total_kept,), dtype=torch.int64)
    slot = x.new_empty((B, N), dtype=torch.int32)
    # no gather kernel runs when C == 0; the weight sum is then the backward's (0,)-channel divisor: any
    # finite value
    fused = (x.new_zeros if C == 0 else x.new_empty)((B, C + 1), dtype=torch.float32)
    if B == 0:
        return tokens, index, slot, fused, torch.zeros(1, dtype=torch.int32, device=x.device)
    cu_seqlens = x.new_empty((B + 1,), dtype=torch.int32)
    stride_xb, stride_xn, _ = x.stride()
    stride_sb = scores.stride()[0]
    NP = next_pow2(N)
    with on_device(x):  # launch on the tensors' GPU, not the current one
        _topk_select_kernel[(B,)](
            scores, k, cu_seqlens, slot, index, N, stride_sb, NP=NP, FUSE=fuse, num_warps=_select_warps(NP),
        )
        if C > 0:  # N == 0 still runs: it writes the (zero) fused tokens
            block_n, block_c = _gather_blocks(C)
            _topk_gather_fwd_kernel[(B, cdiv(C, block_c))](
                x, scores, slot, k, cu_seqlens, tokens, fused,
                N, C, stride_xb, stride_xn, stride_sb, FUSE_EPS,
                FUSE=fuse, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=GATHER_WARPS,
            )
    return tokens, index, slot, fused, cu_seqlens


# Shapes of the native forward op ``(x, scores, k, total_kept, fuse) -> (tokens, index, slot, fused, den)`` and
# of its backward op ``(grad_tokens, x, scores, k, slot, fused, den, fuse) -> (grad_x, grad_scores)``. The
# Triton op keeps the fused token and its weight sum in one (B, C + 1) buffer, adds ``cu_seqlens`` to its
# outputs and ``fixed_k`` to its inputs (``gather_autograd`` takes both kinds).


def gather_fake(x, scores, k, total_kept, fuse):
    B, N, C = x.shape
    return (
        x.new_empty(total_kept + B * int(fuse), C),
        x.new_empty(total_kept, dtype=torch.int64),
        x.new_empty(B, N, dtype=torch.int32),
        x.new_empty(B, C, dtype=torch.float32),
        x.new_empty(B, dtype=torch.float32),
    )


def gather_backward_fake(grad_tokens, x, scores, k, slot, fused, den, fuse):
    return x.new_empty(x.shape), scores.new_empty(scores.shape)


def gather_autograd(backward_op):
    """``(setup_context, backward)`` of a forward op of the shape above, whose gradient ``backward_op``
    computes: ``backward_op(grad_tokens, x, scores, k, *outputs[2:], fuse)`` (the op's saved outputs after
    tokens and index, whatever their number; the Triton op's extra ``fixed_k`` input gets no gradient);
    for ``torch.library.register_autograd`` and ``DirectOp``."""

    def setup_context(ctx, inputs, output):
        x, scores, k, _total_kept, fuse = inputs[:5]
        ctx.no_grads = (None,) * (len(inputs) - 2)
        # only tokens carries a gradient: the others (index, slot, cu_seqlens are integers) get none,
        # and no zero gradients are built for them in backward
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, scores, k, *output[2:])
        ctx.fuse = fuse

    def backward(ctx, grad_tokens, *_no_grads):
        if grad_tokens is None:
            return None, None, *ctx.no_grads
        grad_x, grad_scores = backward_op(grad_tokens, *ctx.saved_tensors, ctx.fuse)
        return grad_x, grad_scores, *ctx.no_grads

    return setup_context, backward


def register_gather_autograd(op_name: str, backward_op) -> None:
    """Autograd (``gather_autograd``) of the registered forward op ``op_name``."""
    setup_context, backward = gather_autograd(backward_op)
    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


def _topk_gather_triton_backward_body(
    grad_tokens: torch.Tensor, x: torch.Tensor, scores: torch.Tensor, k: torch.Tensor,
    slot: torch.Tensor, fused: torch.Tensor, cu_seqlens: torch.Tensor, fuse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_tokens (total, C) or (B, k + fuse, C) -> grad_x (B, N, C) in x's dtype, grad_scores (B, N) in
    scores' dtype (the forward's saved slot map, fused buffer and row offsets ``cu_seqlens``)."""
    B, N, C = x.shape
    grad_tokens = grad_tokens.contiguous()
    grad_x = x.new_empty((B, N, C))
    grad_scores = scores.new_empty((B, N))
    if B == 0 or N == 0:
        return grad_x, grad_scores
    block_n, block_c = _gather_blocks(C)
    with on_device(x):  # launch on the tensors' GPU, not the current one
        _topk_gather_bwd_kernel[(B, cdiv(N, block_n))](
            grad_tokens, x, scores, slot, k, cu_seqlens, fused, grad_x, grad_scores,
            N, C, *x.stride()[:2], scores.stride()[0], FUSE_EPS,
            FUSE=fuse, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=GATHER_WARPS,
        )
    return grad_x, grad_scores


_topk_gather_triton = torch.library.custom_op("bus::topk_gather_triton", _topk_gather_triton_body, mutates_args=())
_topk_gather_triton_backward = torch.library.custom_op(
    "bus::topk_gather_triton_backward", _topk_gather_triton_backward_body, mutates_args=())


@_topk_gather_triton.register_fake
def _(x, scores, k, total_kept, fuse, fixed_k):
    B, N, C = x.shape
    if fixed_k >= 0:
        tokens, index = x.new_empty(B, fixed_k + int(fuse), C), x.new_empty(B, fixed_k, dtype=torch.int64)
    else:
        tokens, index = x.new_empty(total_kept + B * int(fuse), C), x.new_empty(total_kept, dtype=torch.int64)
    return (tokens, index, x.new_empty(B, N, dtype=torch.int32), x.new_empty(B, C + 1, dtype=torch.float32),
            x.new_empty(B + 1, dtype=torch.int32))


@_topk_gather_triton_backward.register_fake
def _(grad_tokens, x, scores, k, slot, fused, cu_seqlens, fuse):
    return x.new_empty(x.shape), scores.new_empty(scores.shape)


register_gather_autograd("bus::topk_gather_triton", _topk_gather_triton_backward)
# eager calls on plain tensors skip the dispatcher (bus_kernels/_direct.py)
_topk_gather_triton_direct = DirectOp("TopkGatherTriton", _topk_gather_triton, _topk_gather_triton_body,
                                      gather_autograd, _topk_gather_triton_backward, _topk_gather_triton_backward_body)


def _prepare_triton(x: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x and scores with a unit stride in their last dim, as the kernels read them (copies only if not)."""
    if x.stride()[-1] != 1:
        x = x.contiguous()
    if scores.stride()[-1] != 1:
        scores = scores.contiguous()
    return x, scores


def _topk_gather_triton_impl(x, scores, k: int, fuse: bool):
    B, N, C = x.shape
    x, scores = _prepare_triton(x, scores)
    k_rows = constant((B,), k, torch.int64, x)  # every row keeps k
    tokens, index, *_ = _topk_gather_triton_direct(x, scores, k_rows, B * k, fuse, k)
    return tokens, index


def _topk_gather_varlen_triton_impl(x, scores, k: torch.Tensor, fuse: bool, counts: list[int] | None):
    x, scores = _prepare_triton(x, scores)
    total_kept, max_seqlen = kept_totals(k, fuse, counts)
    tokens, index, *_, cu_seqlens = _topk_gather_triton_direct(x, scores, k, total_kept, fuse, -1)
    return tokens, index, cu_seqlens, max_seqlen


def _cu_seqlens(k: torch.Tensor, fuse: bool) -> torch.Tensor:
    cu = torch.zeros(k.shape[0] + 1, dtype=torch.int32, device=k.device)
    cu[1:] = torch.cumsum(k + int(fuse), 0)
    return cu


def kept_totals(k: torch.Tensor, fuse: bool, counts: list[int] | None = None) -> tuple[int, int]:
    """(sum k, longest row = max k + fuse): the output sizes, in one host read (one sync on CUDA;
    the (B,) counts themselves, summed on the host: no reduction kernels); none when the caller has
    already read them (``counts``, the values of ``k``)."""
    if counts is None:
        counts = k.tolist()
    return sum(counts), max(counts, default=-int(fuse)) + int(fuse)


register_impl("topk_gather", "torch", reference.topk_gather)
register_impl("topk_gather", "triton", _topk_gather_triton_impl)
# impls of topk_gather_varlen take (x, scores, k, fuse, counts): counts = k's values when the public
# function has read them already (check_k), else None
register_impl("topk_gather_varlen", "torch",
              lambda x, scores, k, fuse, counts: reference.topk_gather_varlen(x, scores, k, fuse))
register_impl("topk_gather_varlen", "triton", _topk_gather_varlen_triton_impl)


# ---------------------------------------------------------------------------------------------
# Public functions


def _check_x_scores(x, scores) -> tuple[int, int, int]:
    # the common valid case in a few comparisons; anything else goes through the named checks below,
    # which raise with the argument's name (this condition implies every one of them passes)
    if (isinstance(x, torch.Tensor) and isinstance(scores, torch.Tensor) and x.dim() == 3 and scores.dim() == 2
            and x.dtype in FLOAT_DTYPES and scores.dtype in FLOAT_DTYPES):
        B, N, C = x.shape
        if scores.shape == (B, N) and x.device == scores.device:
            return B, N, C
    check_tensor("x", x)
    check_tensor("scores", scores)
    check_rank("x", x, 3, "(B, N, C)")
    check_rank("scores", scores, 2, "(B, N)")
    check_float("x", x)
    check_float("scores", scores)
    B, N, C = x.shape
    check_dim_size("scores", scores, 0, B, "batch size B of x")
    check_dim_size("scores", scores, 1, N, "token count N of x")
    check_same_device([("x", x), ("scores", scores)])
    return B, N, C


def _pick_backend(x: torch.Tensor, scores: torch.Tensor, N: int, backend: str | None) -> str:
    requires_grad = torch.is_grad_enabled() and (x.requires_grad or scores.requires_grad)
    extra = None
    if N > TRITON_MAX_N:  # the only case with a reason of its own
        def extra(name: str) -> list[str]:
            return [f"N={N} exceeds the on-chip selection limit {TRITON_MAX_N}"] if name == "triton" else []

    # both ops dispatch under the one name "topk_gather"
    return select_backend("topk_gather", x.device, x.dtype, requires_grad, backend, extra, extra_key=N > TRITON_MAX_N)


def topk_gather(
    x: torch.Tensor, scores: torch.Tensor, k: int, *, fuse: bool = True, backend: str | None = None
) -> TopkGatherOutput:
    """Keep the ``k`` best-scoring tokens of each row and (optionally) fuse the rest into one.

    Args:
        x: ``(B, N, C)`` float16/bfloat16/float32 (float64: torch backend) tokens.
        scores: ``(B, N)`` floating, same device; higher is kept first, equal scores go to the lower
            position. Non-negative scores (e.g. ``text_patch_scores``) make the fused token a weighted mean.
            Non-finite scores, the same on every backend and device: ``+inf`` ranks above every finite
            score, ``-inf`` below, and NaN lowest of all -- a NaN-scored token is kept only when k
            forces it (among NaNs, the lower position first). A dropped token with a non-finite score
            makes the fused token non-finite (its weight is), so bad scores are never silently averaged.
        k: ``1 <= k <= N`` tokens kept per row.
        fuse: append the fused token ``sum_{j dropped} s_j x_j / max(sum_{j dropped} s_j, 1e-6)``
            (all zeros when nothing is dropped).
        backend: ``"triton"``, ``"native"``, ``"torch"`` or ``None`` (best available; env ``BUS_KERNELS_BACKEND``).

    Returns:
        ``TopkGatherOutput(tokens (B, k + fuse, C) in x's dtype, index (B, k) int64)`` with the kept
        positions in ascending order. Differentiable in ``x`` and ``scores`` (the latter through the
        fused token only).
    """
    B, N, C = _check_x_scores(x, scores)
    if N == 0:
        raise ValueError("x must have at least one token (N >= 1), got N=0")
    if type(k) is not int or not 1 <= k <= N:
        k = check_int("k", k, 1, N)
    if not isinstance(fuse, bool):
        raise TypeError(f"fuse must be a bool, got {type(fuse).__name__}")
    name = _pick_backend(x, scores, N, backend)
    tokens, index = get_impl("topk_gather", name)(x, scores, k, fuse)
    return TopkGatherOutput(tokens, index)


def topk_gather_varlen(
    x: torch.Tensor, scores: torch.Tensor, k: torch.Tensor, *, fuse: bool = True, backend: str | None = None,
    check_k: bool = True,
) -> TopkGatherVarlenOutput:
    """``topk_gather`` with a different ``k`` per row; the result is packed (flash-attn varlen layout).

    Args:
        x: ``(B, N, C)`` floating tokens. scores: ``(B, N)`` floating.
        k: ``(B,)`` integer tensor on x's device, ``0 <= k[b] <= N`` (e.g. from ``keep_by_mass``).
        fuse, backend: as in ``topk_gather`` (so is the ranking of NaN and infinite scores).
        check_k: read ``k`` on the host to check its range (a device sync on CUDA); pass False for
            counts valid by construction (e.g. ``keep_by_mass``). The output sizes are read once anyway,
            so this op cannot run inside a CUDA graph capture (``CaptureError``; ``topk_gather`` can).

    Returns:
        ``TopkGatherVarlenOutput(tokens (total, C), index (sum k,) int64, cu_seqlens (B + 1,) int32,
        max_seqlen int)`` where ``total = sum(k) + B * fuse``; row b's kept tokens (ascending position)
        then its fused token are ``tokens[cu_seqlens[b]:cu_seqlens[b + 1]]``.
    """
    B, N, C = _check_x_scores(x, scores)
    if not (isinstance(k, torch.Tensor) and k.dtype in (torch.int64, torch.int32) and k.dim() == 1
            and k.shape[0] == B and k.device == x.device):  # else the named checks, which raise
        check_tensor("k", k)
        if k.dtype.is_floating_point or k.dtype == torch.bool or k.is_complex():
            raise TypeError(f"k must be an integer tensor, got {k.dtype}")
        check_rank("k", k, 1, "(B,)")
        check_dim_size("k", k, 0, B, "batch size B of x")
        check_same_device([("x", x), ("k", k)])
    if not isinstance(fuse, bool):
        raise TypeError(f"fuse must be a bool, got {type(fuse).__name__}")
    if not isinstance(check_k, bool):
        raise TypeError(f"check_k must be a bool, got {type(check_k).__name__}")
    refuse_capture(x, "topk_gather_varlen")
    if k.dtype != torch.int64:
        k = k.to(torch.int64)
    counts = None
    if check_k and B > 0:
        counts = k.tolist()  # one host read (a sync on CUDA), no reduction kernels; the output sizes reuse it
        k_min, k_max = min(counts), max(counts)
        if k_min < 0 or k_max > N:
            raise ValueError(f"k must be in [0, N={N}] for every row, got values in [{k_min}, {k_max}]")
    name = _pick_backend(x, scores, N, backend)
    return TopkGatherVarlenOutput(*get_impl("topk_gather_varlen", name)(x, scores, k, fuse, counts))


def keep_by_mass(scores: torch.Tensor, mass: float, min_keep: int, max_keep: int) -> torch.Tensor:
    """Per row, the smallest k whose k highest scores hold at least ``mass`` of the row's total score.

    Args:
        scores: ``(B, N)`` non-negative floating scores (e.g. ``text_patch_scores``, rows summing to 1).
        mass: fraction in ``(0, 1]``.
        min_keep, max_keep: clamp, ``1 <= min_keep <= max_keep <= N``.

    Returns:
        ``(B,)`` int64 keep counts (no gradient), ready for ``topk_gather_varlen``.
    """
    check_tensor("scores", scores)
    check_rank("scores", scores, 2, "(B, N)")
    check_float("scores", scores)
    N = scores.shape[1]
    if not is_number(mass):
        raise TypeError(f"mass must be a float, got {type(mass).__name__}")
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    min_keep = check_int("min_keep", min_keep, 1, N)
    max_keep = check_int("max_keep", max_keep, min_keep, N)
    with torch.no_grad():
        s = scores.float()
        top = torch.sort(s, dim=1, descending=True).values.cumsum(dim=1)  # (B, N)
        target = mass * top[:, -1:]
        # prefixes are non-decreasing, so the ones still below the target come first
        k = (top < target).sum(dim=1) + 1
        return k.clamp(min_keep, max_keep).to(torch.int64)


def aot_specs():
    """Kernel variants compiled by ``python -m bus_kernels.aot``: the selection at every tile size the
    launcher can pick (NP = next_pow2(N) up to ``TRITON_MAX_N``) for fp32 scores, the model's case (text-patch
    scores are fp32), and the largest tiles for low-precision scores; the gather with tokens of every dtype
    and fp32 scores (and scores of the tokens' dtype), at a small and the model's channel counts."""
    from ..aot import TRITON_DTYPES, KernelSpec

    def select(score_dt: str, NP: int) -> KernelSpec:
        return KernelSpec(
            f"topk_select scores={score_dt} NP={NP}", _topk_select_kernel,
            {"scores_ptr": f"*{score_dt}", "k_ptr": "*i64", "cu_ptr": "*i32", "slot_ptr": "*i32",
             "index_ptr": "*i64", "N": "i32", "stride_sb": "i32", "NP": "constexpr", "FUSE": "constexpr"},
            {"NP": NP, "FUSE": True}, num_warps=_select_warps(NP),
        )

    specs = [select("fp32", 2**e) for e in range(15) if 2**e <= TRITON_MAX_N]
    specs += [select(dt, NP) for dt in ("fp16", "bf16") for NP in (1024, 4096, TRITON_MAX_N)]
    scalars = {"N": "i32", "C": "i32", "stride_xb": "i32", "stride_xn": "i32", "stride_sb": "i32",
               "eps": "fp32", "FUSE": "constexpr", "BLOCK_N": "constexpr", "BLOCK_C": "constexpr"}
    for dt in TRITON_DTYPES.values():
        for score_dt in sorted({"fp32", dt}):
            for C in (64, 384, 768):
                block_n, block_c = _gather_blocks(C)
                common = {"x_ptr": f"*{dt}", "scores_ptr": f"*{score_dt}", "slot_ptr": "*i32", "k_ptr": "*i64",
                          "cu_ptr": "*i32"}
                consts = {"FUSE": True, "BLOCK_N": block_n, "BLOCK_C": block_c}
                divisible = ("C", "stride_xb", "stride_xn")  # channel counts of the model are multiples of 16
                tag = f"{dt} scores={score_dt} C={C}"
                specs.append(KernelSpec(
                    f"topk_gather_fwd {tag}", _topk_gather_fwd_kernel,
                    {**common, "out_ptr": f"*{dt}", "fused_ptr": "*fp32", **scalars}, consts,
                    num_warps=GATHER_WARPS, divisible=divisible,
                ))
                specs.append(KernelSpec(
                    f"topk_gather_bwd {tag}", _topk_gather_bwd_kernel,
                    {"gout_ptr": f"*{dt}", **common, "fused_ptr": "*fp32",
                     "gx_ptr": f"*{dt}", "gs_ptr": f"*{score_dt}", **scalars}, consts,
                    num_warps=GATHER_WARPS, divisible=divisible,
                ))
    return specs
