"""Text-guided patch scores (BUS TSPS, Sec. 3.2): how much a query (the caption's [CLS] projected by
a ViT layer's query projection; or the image [CLS] for EViT) attends to each patch.

``scores[b, n] = mean_h softmax_n(scale * <query[b, h], keys[b, n, h]>)``; each row sums to 1.

Triton path:
  * ``_tps_logits_kernel`` (one program per (row, head)): one pass over the keys computes the logits,
    stores them (B, H, N) fp32 (1/D of the key traffic) and keeps an online max / sum for the
    log-sum-exp (B, H).
  * ``_tps_combine_kernel`` (row x token block): averages ``exp(logit - lse)`` over heads.
  * ``_tps_bwd_kernel`` (one program per (row, head)): ``dlogit = p * (g - <p, g>) / H``; reads the
    saved logits for ``<p, g>``, then the keys once for ``dq`` and writes ``dk`` once.
Forward 2 launches, backward 1: the saved logits and lse carry no gradient (``tests/test_op_launches.py``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import reference
from .._direct import DirectOp
from .._validation import (
    check_dim_size, check_float, check_rank, check_same_device, check_tensor, is_number,
)
from ..backends import get_impl, register_impl, select_backend
from ._triton_utils import cdiv, next_pow2, on_device, tile_rows

TRITON_MAX_HEAD_DIM = 256


# N is ragged across pruning stages and batches: not specialised, so a
# change of its divisibility by 16 never recompiles (see bus_kernels/aot.py).
@triton.jit(do_not_specialize=["N"])
def _tps_logits_kernel(
    q_ptr, k_ptr, logits_ptr, lse_ptr,
    N, H, D, stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B * N * H * D may exceed 2**31
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=dmask, other=0.0).to(tl.float32) * scale
    m = tl.full((), float("-inf"), tl.float32)
    l = tl.zeros((), dtype=tl.float32)
    row = (b * H + h) * N
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        kt = tl.load(
            k_ptr + b * stride_kb + offs_n[:, None] * stride_kn + h * stride_kh + offs_d[None, :],
            mask=nmask[:, None] & dmask[None, :], other=0.0,
        ).to(tl.float32)
        z = tl.sum(kt * q[None, :], axis=1)
        z = tl.where(nmask, z, float("-inf"))
        tl.store(logits_ptr + row + offs_n, z, mask=nmask)
        m_new = tl.maximum(m, tl.max(z, axis=0))  # finite: every block has a valid token
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    tl.store(lse_ptr + b * H + h, m + tl.log(l))


@triton.jit(do_not_specialize=["N"])
def _tps_combine_kernel(logits_ptr, lse_ptr, out_ptr, N, H, inv_h, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for h in range(0, H):
        lse = tl.load(lse_ptr + b * H + h)
        z = tl.load(logits_ptr + (b * H + h) * N + offs_n, mask=nmask, other=float("-inf"))
        acc += tl.exp(z - lse)
    tl.store(out_ptr + b * N + offs_n, acc * inv_h, mask=nmask)


@triton.jit(do_not_specialize=["N"])
def _tps_bwd_kernel(
    q_ptr, k_ptr, logits_ptr, lse_ptr, g_ptr, dq_ptr, dk_ptr,
    N, H, D, stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, scale, inv_h,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B * N * H * D may exceed 2**31
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    row = (b * H + h) * N
    lse = tl.load(lse_ptr + b * H + h)
    # <p, g> over the row, from the saved logits
    pg = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        p = tl.exp(tl.load(logits_ptr + row + offs_n, mask=nmask, other=float("-inf")) - lse)
        pg += p * tl.load(g_ptr + b * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
    dot = tl.sum(pg, axis=0)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=dmask, other=0.0).to(tl.float32)
    dq = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        tile_mask = nmask[:, None] & dmask[None, :]
        p = tl.exp(tl.load(logits_ptr + row + offs_n, mask=nmask, other=float("-inf")) - lse)
        g = tl.load(g_ptr + b * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
        dz = p * (g - dot) * (inv_h * scale)  # d loss / d (q.k), per token
        kt = tl.load(
            k_ptr + b * stride_kb + offs_n[:, None] * stride_kn + h * stride_kh + offs_d[None, :],
            mask=tile_mask, other=0.0,
        ).to(tl.float32)
        dq += tl.sum(dz[:, None] * kt, axis=0)
        dk = dz[:, None] * q[None, :]
        tl.store(dk_ptr + ((b * N + offs_n[:, None]) * H + h) * D + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(dq_ptr + (b * H + h) * D + offs_d, dq.to(dq_ptr.dtype.element_ty), mask=dmask)


@functools.lru_cache(maxsize=None)  # a few head dims per model; asked on every call
def _blocks(D: int) -> tuple[int, int]:
    block_d = next_pow2(D)
    return tile_rows(block_d, budget=4096, max_rows=128), block_d


def _strides(query: torch.Tensor, keys: torch.Tensor) -> tuple[int, ...]:
    sq, sk = query.stride(), keys.stride()  # one call each: stride(i) costs as much as the whole tuple
    return sq[0], sq[1], sk[0], sk[1], sk[2]


def _tps_triton_body(query: torch.Tensor, keys: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query (B, H, D), keys (B, N, H, D), both with unit stride in D ->
    scores (B, N) fp32, logits (B, H, N) fp32, lse (B, H) fp32."""
    B, N, H, D = keys.shape
    out = keys.new_empty((B, N), dtype=torch.float32)
    logits = keys.new_empty((B, H, N), dtype=torch.float32)
    lse = keys.new_empty((B, H), dtype=torch.float32)
    if B == 0:
        return out, logits, lse
    block_n, block_d = _blocks(D)
    with on_device(keys):  # launch on the tensors' GPU, not the current one
        _tps_logits_kernel[(B, H)](query, keys, logits, lse, N, H, D, *_strides(query, keys), scale, BLOCK_N=block_n, BLOCK_D=block_d)
        combine_n = min(next_pow2(N), 1024)
        _tps_combine_kernel[(B, cdiv(N, combine_n))](logits, lse, out, N, H, 1.0 / H, BLOCK_N=combine_n)
    return out, logits, lse


# Shapes of the forward op ``(query, keys, scale) -> (scores, logits, lse)`` and of its backward op
# ``(grad, query, keys, logits, lse, scale) -> (dq, dk)``; the Triton and native registrations share them.


def scores_fake(query, keys, scale):
    B, N, H, _ = keys.shape
    f32 = dict(dtype=torch.float32)
    return keys.new_empty(B, N, **f32), keys.new_empty(B, H, N, **f32), keys.new_empty(B, H, **f32)


def scores_backward_fake(grad, query, keys, logits, lse, scale):
    return query.new_empty(query.shape), keys.new_empty(keys.shape)


def scores_autograd(backward_op):
    """``(setup_context, backward)`` of a forward op of the shape above, whose gradient ``backward_op``
    computes (for ``torch.library.register_autograd`` and for the eager ``DirectOp``)."""

    def setup_context(ctx, inputs, output):
        query, keys, scale = inputs
        _scores, logits, lse = output
        # logits and lse are saved for backward, not results: no gradient, and no zero-filled one
        ctx.mark_non_differentiable(logits, lse)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(query, keys, logits, lse)
        ctx.scale = scale

    def backward(ctx, grad, _g_logits, _g_lse):
        query, keys, logits, lse = ctx.saved_tensors
        if grad is None:
            return None, None, None
        dq, dk = backward_op(grad, query, keys, logits, lse, ctx.scale)
        return dq, dk, None

    return setup_context, backward


def register_scores_autograd(op_name: str, backward_op) -> None:
    """Autograd (``scores_autograd``) of the registered forward op ``op_name``."""
    setup_context, backward = scores_autograd(backward_op)
    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


def _tps_triton_backward_body(
    grad: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad (B, N) -> grad_query (B, H, D), grad_keys (B, N, H, D), in the inputs' dtypes."""
    B, N, H, D = keys.shape
    grad = grad.contiguous()
    dq = query.new_empty((B, H, D))
    dk = keys.new_empty((B, N, H, D))
    if B == 0:
        return dq, dk
    block_n, block_d = _blocks(D)
    with on_device(keys):  # launch on the tensors' GPU, not the current one
        _tps_bwd_kernel[(B, H)](
            query, keys, logits, lse, grad, dq, dk, N, H, D, *_strides(query, keys), scale, 1.0 / H,
            BLOCK_N=block_n, BLOCK_D=block_d,
        )
    return dq, dk


_tps_triton = torch.library.custom_op("bus::text_patch_scores_triton", _tps_triton_body, mutates_args=())
_tps_triton.register_fake(scores_fake)
_tps_triton_backward = torch.library.custom_op(
    "bus::text_patch_scores_triton_backward", _tps_triton_backward_body, mutates_args=())
_tps_triton_backward.register_fake(scores_backward_fake)
register_scores_autograd("bus::text_patch_scores_triton", _tps_triton_backward)
# eager calls on plain tensors skip the dispatcher (bus_kernels/_direct.py)
_tps_triton_direct = DirectOp("TextPatchScoresTriton", _tps_triton, _tps_triton_body, scores_autograd,
                              _tps_triton_backward, _tps_triton_backward_body)


def _tps_triton_impl(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    if query.stride()[-1] != 1:
        query = query.contiguous()
    if keys.stride()[-1] != 1:
        keys = keys.contiguous()
    return _tps_triton_direct(query, keys, scale)[0]


register_impl("text_patch_scores", "torch", reference.text_patch_scores)
register_impl("text_patch_scores", "triton", _tps_triton_impl)


def text_patch_scores(
    query: torch.Tensor, keys: torch.Tensor, *, scale: float | None = None, backend: str | None = None
) -> torch.Tensor:
    """Relevance of each patch to a query: mean over heads of the query's attention over the patches.

    Args:
        query: ``(B, H, D)`` floating (float16/bfloat16/float32; float64 with the torch backend),
            e.g. the text [CLS] through a ViT layer's query projection, split into heads.
        keys: ``(B, N, H, D)`` same dtype and device, ``N >= 1``: that layer's keys of the N candidate
            tokens (strided views such as a slice of a fused qkv tensor are fine).
        scale: softmax temperature; default ``D ** -0.5``.
        backend: ``"triton"``, ``"native"``, ``"torch"`` or ``None`` (best available; env ``BUS_KERNELS_BACKEND``).

    Returns:
        ``(B, N)`` float32; each row sums to 1. Differentiable in ``query`` and ``keys``.
    """
    check_tensor("query", query)
    check_tensor("keys", keys)
    check_rank("query", query, 3, "(B, H, D)")
    check_rank("keys", keys, 4, "(B, N, H, D)")
    check_float("query", query)
    check_float("keys", keys)
    if query.dtype != keys.dtype:
        raise TypeError(f"keys must have query's dtype {query.dtype}, got {keys.dtype}")
    B, H, D = query.shape
    check_dim_size("keys", keys, 0, B, "batch size B of query")
    check_dim_size("keys", keys, 2, H, "head count H of query")
    check_dim_size("keys", keys, 3, D, "head dim D of query")
    if keys.shape[1] == 0:
        raise ValueError("keys must hold at least one token (N >= 1), got N=0")
    if H == 0 or D == 0:
        raise ValueError(f"query must have H >= 1 heads of D >= 1 dims, got shape {tuple(query.shape)}")
    check_same_device([("query", query), ("keys", keys)])
    if scale is None:
        scale = D**-0.5
    elif not is_number(scale):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    requires_grad = torch.is_grad_enabled() and (query.requires_grad or keys.requires_grad)

    def extra(name: str) -> list[str]:
        if name == "triton" and D > TRITON_MAX_HEAD_DIM:
            return [f"head dim {D} > {TRITON_MAX_HEAD_DIM}"]
        return []

    name = select_backend("text_patch_scores", query.device, query.dtype, requires_grad, backend, extra,
                          extra_key=D > TRITON_MAX_HEAD_DIM)
    return get_impl("text_patch_scores", name)(query, keys, scale)


def aot_specs():
    """Kernel variants compiled by ``python -m bus_kernels.aot``."""
    from ..aot import TRITON_DTYPES, KernelSpec

    strides = {n: "i32" for n in ("N", "H", "D", "stride_qb", "stride_qh", "stride_kb", "stride_kn", "stride_kh")}
    specs = []
    for dt in TRITON_DTYPES.values():
        for D in (16, 32, 64, 128, 256):  # the model's head dims and the largest
            block_n, block_d = _blocks(D)
            consts = {"BLOCK_N": block_n, "BLOCK_D": block_d}
            divisible = ("D", "stride_qb", "stride_qh", "stride_kb", "stride_kn", "stride_kh")
            specs.append(KernelSpec(
                f"tps_logits {dt} D={D}", _tps_logits_kernel,
                {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "logits_ptr": "*fp32", "lse_ptr": "*fp32", **strides,
                 "scale": "fp32", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}, consts, divisible=divisible,
            ))
            specs.append(KernelSpec(
                f"tps_bwd {dt} D={D}", _tps_bwd_kernel,
                {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "logits_ptr": "*fp32", "lse_ptr": "*fp32", "g_ptr": "*fp32",
                 "dq_ptr": f"*{dt}", "dk_ptr": f"*{dt}", **strides, "scale": "fp32", "inv_h": "fp32",
                 "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}, consts, divisible=divisible,
            ))
    specs.append(KernelSpec(
        "tps_combine fp32 BLOCK_N=1024", _tps_combine_kernel,
        {"logits_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*fp32", "N": "i32", "H": "i32", "inv_h": "fp32",
         "BLOCK_N": "constexpr"}, {"BLOCK_N": 1024},
    ))
    return specs
