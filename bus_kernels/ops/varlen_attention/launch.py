"""The Triton backend of varlen attention: launchers registered as torch.library custom ops (so
torch.compile traces through them), their autograd formula, and the backend registration.

Launches per call once the block tables of the ``cu_seqlens`` objects exist (``tests/test_op_launches.py``):
forward 1 kernel; backward 3 (delta, dK/dV, dQ) into ``empty`` gradients, plus the head sum of the key-bias
gradient only when a key bias was given."""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ... import reference
from ..._direct import DirectOp
from ...backends import register_impl
from .kernel_bwd import _attn_bwd_dkdv_kernel, _attn_bwd_delta_kernel, _attn_bwd_dq_kernel
from .._triton_utils import cdiv, on_device
from . import autotune
from .kernel_fwd import _attn_fwd_kernel
from .tiles import _bias_arg, _block_d, _block_table, _config, _delta_rows, _precision

_LOG2E = 1.4426950408889634


def _row_head_strides(*tensors: torch.Tensor) -> tuple[int, ...]:
    """(row stride, head stride) of each (tokens, H, D) tensor, flattened: one ``stride()`` call per tensor
    (``stride(i)`` costs as much as the whole tuple)."""
    out = []
    for t in tensors:
        s = t.stride()
        out += (s[0], s[1])
    return tuple(out)


def _varlen_attention_triton_body(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    key_bias: Optional[torch.Tensor], softmax_scale: float, causal: bool, max_seqlen_q: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (total_q, H, D), k/v (total_k, H, D) with unit stride in D, cu_seqlens_* (B + 1,) int32,
    key_bias (total_k,) fp32 or None -> out (total_q, H, D) q.dtype, lse (H, total_q) fp32 (base 2).
    ``max_seqlen_q`` only picks the tiles (a small query tile for short sequences): the block table
    comes from ``cu_seqlens_q``, so an understated value costs speed, never correctness."""
    total_q, H, D = q.shape
    out = q.new_empty((total_q, H, D))
    lse = q.new_empty((H, total_q), dtype=torch.float32)
    cfg = _config("fwd", q.dtype, D, q.device, max_seqlen_q)
    blk_seq, blk_start = _block_table(cu_seqlens_q, total_q, cfg.block_m)
    if blk_seq.numel() == 0 or H == 0:
        return out, lse
    with on_device(q):  # launch on the tensors' GPU, not the current one
        autotune.launch(
            "fwd", _attn_fwd_kernel, (blk_seq.numel(), H), cfg,
            q, k, v, _bias_arg(key_bias, q), out, lse, cu_seqlens_q, cu_seqlens_k, blk_seq, blk_start,
            *_row_head_strides(q, k, v), total_q, H, softmax_scale * _LOG2E,
            D=D, CAUSAL=causal, HAS_BIAS=key_bias is not None, PRECISION=_precision(q.dtype), BLOCK_D=_block_d(D),
        )
    return out, lse


def _varlen_attention_triton_backward_body(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, key_bias: Optional[torch.Tensor],
    softmax_scale: float, causal: bool, max_seqlen_q: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dout (total_q, H, D) -> dq, dk, dv in the inputs' dtypes (contiguous) and dbias (total_k,) fp32
    ((0,) when key_bias is None: a custom op returns tensors)."""
    dq, dk, dv, dbias = _backward_grads(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, key_bias,
                                        softmax_scale, causal, max_seqlen_q)
    return dq, dk, dv, q.new_empty(0, dtype=torch.float32) if dbias is None else dbias


def _backward_grads(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, key_bias, softmax_scale, causal,
                    max_seqlen_q):
    """The backward: dq, dk, dv and dbias (None without a key bias; the eager path takes it as it is). The dq
    and dkdv kernels write every row of every sequence (zeros where a row sees nothing), as the forward writes
    ``out``: ``empty``, no fills."""
    total_q, H, D = q.shape
    total_k = k.shape[0]
    if dout.stride()[-1] != 1:
        dout = dout.contiguous()
    has_bias = key_bias is not None
    if H == 0 or D == 0:  # no kernel runs (only reachable by calling the op directly)
        return (q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape),
                q.new_zeros(total_k, dtype=torch.float32) if has_bias else None)
    dq = q.new_empty((total_q, H, D))
    dk = k.new_empty((total_k, H, D))
    dv = v.new_empty((total_k, H, D))
    # per head, summed below (a program owns one head: no atomics); nothing at all without a key bias
    dbias_heads = q.new_empty((H, total_k), dtype=torch.float32) if has_bias else None
    block_d = _block_d(D)
    delta = q.new_empty((H, total_q), dtype=torch.float32)
    with on_device(q):  # launch on the tensors' GPU, not the current one
        strides = _row_head_strides(q, k, v, dout)
        if total_q > 0:
            delta_rows = _delta_rows(block_d)
            _attn_bwd_delta_kernel[(cdiv(total_q, delta_rows), H)](
                out, dout, delta, strides[6], strides[7], total_q, H, D=D, BLOCK_M=delta_rows, BLOCK_D=block_d,
            )
        flags = dict(D=D, CAUSAL=causal, HAS_BIAS=has_bias, PRECISION=_precision(q.dtype), BLOCK_D=block_d)
        bias = _bias_arg(key_bias, q)
        cfg = _config("dkdv", q.dtype, D, q.device, max_seqlen_q)
        kv_seq, kv_start = _block_table(cu_seqlens_k, total_k, cfg.block_n)
        if kv_seq.numel() > 0:
            autotune.launch(
                "dkdv", _attn_bwd_dkdv_kernel, (kv_seq.numel(), H), cfg,
                q, k, v, bias, dout, lse, delta, dk, dv, dbias_heads if has_bias else bias,
                cu_seqlens_q, cu_seqlens_k, kv_seq, kv_start, *strides,
                total_q, total_k, H, softmax_scale * _LOG2E, softmax_scale, **flags,
            )
        cfg = _config("dq", q.dtype, D, q.device, max_seqlen_q)
        q_seq, q_start = _block_table(cu_seqlens_q, total_q, cfg.block_m)
        if q_seq.numel() > 0:
            autotune.launch(
                "dq", _attn_bwd_dq_kernel, (q_seq.numel(), H), cfg,
                q, k, v, bias, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, q_seq, q_start, *strides,
                total_q, H, softmax_scale * _LOG2E, softmax_scale, **flags,
            )
    return dq, dk, dv, dbias_heads.sum(0) if has_bias else None


_varlen_attention_triton = torch.library.custom_op(
    "bus::varlen_attention_triton", _varlen_attention_triton_body, mutates_args=())
_varlen_attention_triton_backward = torch.library.custom_op(
    "bus::varlen_attention_triton_backward", _varlen_attention_triton_backward_body, mutates_args=())


@_varlen_attention_triton.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, key_bias, softmax_scale, causal, max_seqlen_q):
    total_q, H, D = q.shape
    return q.new_empty(total_q, H, D), q.new_empty(H, total_q, dtype=torch.float32)


@_varlen_attention_triton_backward.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, key_bias, softmax_scale, causal, max_seqlen_q):
    total_k = k.shape[0] if key_bias is not None else 0
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(total_k, dtype=torch.float32))


def varlen_autograd(backward_op):
    """``(setup_context, backward)`` of the forward op, whose gradient ``backward_op`` computes (for
    ``torch.library.register_autograd`` and for the eager ``DirectOp``)."""
    return _setup_context, functools.partial(_backward, backward_op)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, key_bias, softmax_scale, causal, max_seqlen_q = inputs
    out, lse = output
    # lse is saved for backward, not a result: no gradient, and no zero-filled one
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, key_bias)
    ctx.softmax_scale = softmax_scale
    ctx.causal = causal
    ctx.max_seqlen_q = max_seqlen_q


def _backward(backward_op, ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, key_bias = ctx.saved_tensors
    if dout is None:
        return (None,) * 9
    dq, dk, dv, dbias = backward_op(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, key_bias, ctx.softmax_scale, ctx.causal,
        ctx.max_seqlen_q,
    )
    if key_bias is None:
        dbias = None
    return dq, dk, dv, None, None, dbias, None, None, None


_setup, _grad = varlen_autograd(_varlen_attention_triton_backward)
torch.library.register_autograd("bus::varlen_attention_triton", _grad, setup_context=_setup)
# eager calls on plain tensors skip the dispatcher (bus_kernels/_direct.py)
_varlen_attention_triton_direct = DirectOp(
    "VarlenAttentionTriton", _varlen_attention_triton, _varlen_attention_triton_body, varlen_autograd,
    _varlen_attention_triton_backward, _backward_grads)


def _varlen_attention_triton_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  softmax_scale, causal, key_bias=None):
    # the block table is sized from the token counts; max_seqlen_q only picks the tiles
    if q.stride()[-1] != 1:
        q = q.contiguous()
    if k.stride()[-1] != 1:
        k = k.contiguous()
    if v.stride()[-1] != 1:
        v = v.contiguous()
    if key_bias is not None and not key_bias.is_contiguous():
        key_bias = key_bias.contiguous()
    return _varlen_attention_triton_direct(q, k, v, cu_seqlens_q, cu_seqlens_k, key_bias, softmax_scale, causal,
                                    max_seqlen_q)[0]


register_impl("varlen_attention", "torch", reference.varlen_attention)
register_impl("varlen_attention", "triton", _varlen_attention_triton_impl)
