"""Variable-length (packed) attention, FlashAttention-2 style, forward and backward in Triton.

Every attention of the BUS stack runs on packed sequences: after TSPS (Sec. 3.2) each image keeps its
own number of tokens, the PAD queries (Sec. 3.3) cross-attend to those kept tokens, and each caption
has its own length. The layout and semantics are flash-attn's ``flash_attn_varlen_func``
(Dao, "FlashAttention-2", 2023, Sec. 3.1 forward, Algorithm 2 backward):
``q (total_q, H, D)``, ``k, v (total_k, H, D)``, sequence b at rows ``cu_seqlens[b]:cu_seqlens[b+1]``;
the causal mask is aligned bottom-right (query i of a length-Lq sequence sees key j iff
``j <= i + Lk - Lq``), a query row that sees no key outputs zeros, zero-length sequences are allowed.

Optional ``key_bias (total_k,) float32`` is added to every score of its key, in natural-log units:
with ``key_bias = log(n_j)`` for a token that stands for ``n_j`` merged patches this is ToMe's
"proportional attention" (Bolya et al., 2023, Sec. 3). It gets a gradient like any input.

Triton path (programs never touch a padded row):
  * a block table, built on the device from ``cu_seqlens`` with no host sync, lists the (sequence,
    block start) pairs of every real block; programs run over (table entry, head);
  * ``_attn_fwd_kernel``: one query block x one head, online softmax in fp32 (exp2 domain), saves the
    base-2 log-sum-exp ``lse (H, total_q)`` (+inf for a row with no visible key);
  * backward: ``_attn_bwd_delta_kernel`` (rowsum(dO * O)), ``_attn_bwd_dkdv_kernel`` (one key block x
    head, loops over the query blocks that see it; also the key_bias gradient per head) and
    ``_attn_bwd_dq_kernel`` (one query block x head). Every output element is written by exactly one
    program: no atomics.
Head dims 1..256 of any size (80, 96, ...) run by masking the head dim to ``BLOCK_D = max(16, next_pow2(D))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .. import reference
from .._validation import (
    check_dim_size,
    check_dtype,
    check_float,
    check_int,
    check_rank,
    check_same_device,
    check_tensor,
)
from ..backends import TRITON_INTERPRET, get_impl, register_impl, select_backend
from ._triton_utils import next_pow2

TRITON_MIN_HEAD_DIM = 1
TRITON_MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, lse_ptr,
    cu_q_ptr, cu_k_ptr, blk_seq_ptr, blk_start_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    total_q, H, qk_scale,
    D: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(blk_seq_ptr + pid)
    if seq < 0:  # spare entry of the block table
        return
    start_m = tl.load(blk_start_ptr + pid)
    q0 = tl.load(cu_q_ptr + seq)
    k0 = tl.load(cu_k_ptr + seq)
    len_q = tl.load(cu_q_ptr + seq + 1) - q0
    len_k = tl.load(cu_k_ptr + seq + 1) - k0
    shift = len_k - len_q  # bottom-right causal: row i sees key j iff j <= i + shift

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < len_q
    dmask = offs_d < D
    # 64-bit sequence bases (total * H * D may exceed 2**31), 32-bit offsets within a sequence
    q_base = q_ptr + q0.to(tl.int64) * stride_qt + h * stride_qh
    k_base = k_ptr + k0.to(tl.int64) * stride_kt + h * stride_kh
    v_base = v_ptr + k0.to(tl.int64) * stride_vt + h * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    end_n = len_k
    if CAUSAL:
        end_n = tl.minimum(len_k, start_m + BLOCK_M + shift)
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + offs_n
        nmask = cols < len_k
        kt = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None],
                     mask=dmask[:, None] & nmask[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if HAS_BIAS:
            bias = tl.load(bias_ptr + k0 + cols, mask=nmask, other=0.0)
            s += bias[None, :] * 1.4426950408889634
        visible = nmask[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + shift)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    out_base = out_ptr + (q0.to(tl.int64) * H + h) * D
    tl.store(out_base + offs_m[:, None] * (H * D) + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + h.to(tl.int64) * total_q + q0 + offs_m, lse, mask=mmask)


@triton.jit
def _attn_bwd_delta_kernel(
    out_ptr, dout_ptr, delta_ptr, stride_dot, stride_doh, total_q, H,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < total_q)[:, None] & (offs_d < D)[None, :]
    rows = offs_m.to(tl.int64)
    o = tl.load(out_ptr + (rows[:, None] * H + h) * D + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(dout_ptr + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + h.to(tl.int64) * total_q + offs_m, delta, mask=offs_m < total_q)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dbias_ptr,
    cu_q_ptr, cu_k_ptr, blk_seq_ptr, blk_start_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    total_q, total_k, H, qk_scale, sm_scale,
    D: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(blk_seq_ptr + pid)
    if seq < 0:
        return
    start_n = tl.load(blk_start_ptr + pid)
    q0 = tl.load(cu_q_ptr + seq)
    k0 = tl.load(cu_k_ptr + seq)
    len_q = tl.load(cu_q_ptr + seq + 1) - q0
    len_k = tl.load(cu_k_ptr + seq + 1) - k0
    shift = len_k - len_q

    offs_m = tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = cols < len_k
    dmask = offs_d < D
    kv_mask = nmask[:, None] & dmask[None, :]
    q_base = q_ptr + q0.to(tl.int64) * stride_qt + h * stride_qh
    do_base = dout_ptr + q0.to(tl.int64) * stride_dot + h * stride_doh
    row_base = h.to(tl.int64) * total_q + q0  # into lse and delta, (H, total_q)
    k = tl.load(k_ptr + k0.to(tl.int64) * stride_kt + h * stride_kh + cols[:, None] * stride_kt + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + k0.to(tl.int64) * stride_vt + h * stride_vh + cols[:, None] * stride_vt + offs_d[None, :],
                mask=kv_mask, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + k0 + cols, mask=nmask, other=0.0) * 1.4426950408889634
        dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)

    start_m = 0
    if CAUSAL:  # the first query row that sees key start_n is start_n - shift
        start_m = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M
    for m0 in range(start_m, len_q, BLOCK_M):
        rows = m0 + offs_m
        mmask = rows < len_q
        qd_mask = mmask[:, None] & dmask[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :], mask=qd_mask, other=0.0)
        lse = tl.load(lse_ptr + row_base + rows, mask=mmask, other=float("inf"))
        delta = tl.load(delta_ptr + row_base + rows, mask=mmask, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        if HAS_BIAS:
            s_t += bias[:, None]
        visible = nmask[:, None] & mmask[None, :]
        if CAUSAL:
            visible = visible & (cols[:, None] <= rows[None, :] + shift)
        p_t = tl.where(visible, tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])  # d loss / d score (natural units)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
        if HAS_BIAS:
            dbias += tl.sum(ds_t, axis=1)

    out_off = (k0.to(tl.int64) * H + h) * D + cols[:, None] * (H * D) + offs_d[None, :]
    tl.store(dk_ptr + out_off, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)
    if HAS_BIAS:
        tl.store(dbias_ptr + h.to(tl.int64) * total_k + k0 + cols, dbias, mask=nmask)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
    cu_q_ptr, cu_k_ptr, blk_seq_ptr, blk_start_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    total_q, H, qk_scale, sm_scale,
    D: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(blk_seq_ptr + pid)
    if seq < 0:
        return
    start_m = tl.load(blk_start_ptr + pid)
    q0 = tl.load(cu_q_ptr + seq)
    k0 = tl.load(cu_k_ptr + seq)
    len_q = tl.load(cu_q_ptr + seq + 1) - q0
    len_k = tl.load(cu_k_ptr + seq + 1) - k0
    shift = len_k - len_q

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < len_q
    dmask = offs_d < D
    qd_mask = mmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + q0.to(tl.int64) * stride_qt + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=qd_mask, other=0.0)
    do = tl.load(dout_ptr + q0.to(tl.int64) * stride_dot + h * stride_doh + offs_m[:, None] * stride_dot
                 + offs_d[None, :], mask=qd_mask, other=0.0)
    lse = tl.load(lse_ptr + h.to(tl.int64) * total_q + q0 + offs_m, mask=mmask, other=float("inf"))
    delta = tl.load(delta_ptr + h.to(tl.int64) * total_q + q0 + offs_m, mask=mmask, other=0.0)
    k_base = k_ptr + k0.to(tl.int64) * stride_kt + h * stride_kh
    v_base = v_ptr + k0.to(tl.int64) * stride_vt + h * stride_vh
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    end_n = len_k
    if CAUSAL:
        end_n = tl.minimum(len_k, start_m + BLOCK_M + shift)
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + offs_n
        nmask = cols < len_k
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if HAS_BIAS:
            s += tl.load(bias_ptr + k0 + cols, mask=nmask, other=0.0)[None, :] * 1.4426950408889634
        visible = mmask[:, None] & nmask[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + shift)
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    tl.store(dq_ptr + (q0.to(tl.int64) * H + h) * D + offs_m[:, None] * (H * D) + offs_d[None, :], (dq * sm_scale).to(dq_ptr.dtype.element_ty),
             mask=qd_mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration


class _Config(NamedTuple):
    """Tile sizes of one kernel: rows of the query tile, rows of the key tile, warps, pipeline stages.
    (fwd and dq programs own a query tile and loop over key tiles; dkdv programs the other way round.)"""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (kernel, fp32 inputs?, BLOCK_D) -> tiles (BLOCK_M query rows, BLOCK_N key rows, warps, stages).
# Picked per head dim as the largest candidate that neither spills nor overflows shared memory on
# sm_80 and sm_90, both as `python -m bus_kernels.aot` compiles it (no alignment facts) and with the
# 16-byte divisibility the JIT infers for aligned tensors at run time. GPU timings not measured yet.
_GPU_CONFIGS = {
    ("fwd", False, 16): _Config(128, 64, 8, 3),
    ("fwd", False, 32): _Config(128, 64, 8, 3),
    ("fwd", False, 64): _Config(128, 64, 8, 3),
    ("fwd", False, 128): _Config(64, 32, 4, 2),
    ("fwd", False, 256): _Config(64, 32, 8, 1),
    ("dkdv", False, 16): _Config(64, 128, 8, 2),
    ("dkdv", False, 32): _Config(32, 64, 4, 2),
    ("dkdv", False, 64): _Config(64, 32, 4, 2),
    ("dkdv", False, 128): _Config(32, 32, 4, 1),
    ("dkdv", False, 256): _Config(16, 32, 8, 1),
    ("dq", False, 16): _Config(128, 64, 8, 2),
    ("dq", False, 32): _Config(128, 64, 8, 2),
    ("dq", False, 64): _Config(128, 64, 8, 2),
    ("dq", False, 128): _Config(64, 64, 8, 2),
    ("dq", False, 256): _Config(32, 32, 4, 1),
    ("fwd", True, 16): _Config(64, 64, 8, 2),
    ("fwd", True, 32): _Config(64, 64, 8, 2),
    ("fwd", True, 64): _Config(64, 32, 8, 2),
    ("fwd", True, 128): _Config(16, 16, 4, 1),
    ("fwd", True, 256): _Config(32, 16, 8, 1),
    ("dkdv", True, 16): _Config(64, 64, 8, 2),
    ("dkdv", True, 32): _Config(32, 32, 4, 1),
    ("dkdv", True, 64): _Config(32, 32, 4, 1),
    ("dkdv", True, 128): _Config(16, 16, 8, 1),
    ("dkdv", True, 256): _Config(16, 16, 8, 1),
    ("dq", True, 16): _Config(64, 64, 8, 2),
    ("dq", True, 32): _Config(32, 32, 4, 1),
    ("dq", True, 64): _Config(32, 32, 4, 1),
    ("dq", True, 128): _Config(16, 32, 8, 1),
    ("dq", True, 256): _Config(16, 16, 4, 1),
}
# The CPU interpreter runs one program at a time: small tiles keep the tests quick and make
# modest sequences span several blocks.
_INTERPRET_CONFIG = _Config(16, 16, 4, 1)


def _block_d(D: int) -> int:
    return max(16, next_pow2(D))  # tl.dot needs every block dim >= 16


def _config(kind: str, dtype: torch.dtype, D: int) -> _Config:
    if TRITON_INTERPRET:
        return _INTERPRET_CONFIG
    return _GPU_CONFIGS[(kind, dtype == torch.float32, _block_d(D))]


def _delta_rows(block_d: int) -> int:
    return max(16, min(128, 8192 // block_d))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (no TF32): whoever asks for fp32 attention asks for its accuracy.
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_table(cu_seqlens: torch.Tensor, total: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (sequence, first row) of every ``block``-row tile of every sequence, computed on the device.

    Returns two (n,) int32 tensors, ``n = total // block + B`` (an upper bound on
    ``sum_b ceil(len_b / block)`` known without reading ``cu_seqlens`` on the host); spare entries
    have sequence -1 and their programs exit at once.
    """
    B = cu_seqlens.shape[0] - 1
    n = total // block + B
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    blocks = (lengths + block - 1) // block  # (B,)
    ends = torch.cumsum(blocks, 0)  # (B,) table entries up to and including sequence b
    entry = torch.arange(n, device=cu_seqlens.device)
    seq = torch.searchsorted(ends, entry, right=True)  # (n,) first b with ends[b] > entry
    real = seq < B
    seq_c = seq.clamp(max=max(B - 1, 0))
    start = (entry - (ends[seq_c] - blocks[seq_c])) * block
    return torch.where(real, seq, -1).to(torch.int32), torch.where(real, start, 0).to(torch.int32)


def _bias_arg(key_bias: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Kernels take a pointer even when HAS_BIAS is off: any fp32 tensor does."""
    return key_bias if key_bias is not None else like.new_empty(1, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Launchers, registered as torch.library custom ops so torch.compile traces through them.


@torch.library.custom_op("bus::varlen_attention_triton", mutates_args=())
def _varlen_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    key_bias: Optional[torch.Tensor], softmax_scale: float, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (total_q, H, D), k/v (total_k, H, D) with unit stride in D, cu_seqlens_* (B + 1,) int32,
    key_bias (total_k,) fp32 or None -> out (total_q, H, D) q.dtype, lse (H, total_q) fp32 (base 2)."""
    total_q, H, D = q.shape
    out = torch.empty(total_q, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(H, total_q, dtype=torch.float32, device=q.device)
    cfg = _config("fwd", q.dtype, D)
    blk_seq, blk_start = _block_table(cu_seqlens_q, total_q, cfg.block_m)
    if blk_seq.numel() == 0 or H == 0:
        return out, lse
    _attn_fwd_kernel[(blk_seq.numel(), H)](
        q, k, v, _bias_arg(key_bias, q), out, lse, cu_seqlens_q, cu_seqlens_k, blk_seq, blk_start,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        total_q, H, softmax_scale * _LOG2E,
        D=D, CAUSAL=causal, HAS_BIAS=key_bias is not None, PRECISION=_precision(q.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=_block_d(D),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


@_varlen_attention_triton.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, key_bias, softmax_scale, causal):
    total_q, H, D = q.shape
    return q.new_empty(total_q, H, D), q.new_empty(H, total_q, dtype=torch.float32)


@torch.library.custom_op("bus::varlen_attention_triton_backward", mutates_args=())
def _varlen_attention_triton_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, key_bias: Optional[torch.Tensor],
    softmax_scale: float, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dout (total_q, H, D) -> dq, dk, dv in the inputs' dtypes (contiguous) and dbias (total_k,) fp32
    ((0,) when key_bias is None)."""
    total_q, H, D = q.shape
    total_k = k.shape[0]
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq = torch.zeros(total_q, H, D, dtype=q.dtype, device=q.device)
    dk = torch.zeros(total_k, H, D, dtype=k.dtype, device=k.device)
    dv = torch.zeros(total_k, H, D, dtype=v.dtype, device=v.device)
    has_bias = key_bias is not None
    dbias_heads = torch.zeros(H if has_bias else 0, total_k, dtype=torch.float32, device=q.device)
    if H == 0 or D == 0:
        return dq, dk, dv, dbias_heads.sum(0)
    block_d = _block_d(D)
    delta = torch.empty(H, total_q, dtype=torch.float32, device=q.device)
    if total_q > 0:
        delta_rows = _delta_rows(block_d)
        _attn_bwd_delta_kernel[(triton.cdiv(total_q, delta_rows), H)](
            out, dout, delta, dout.stride(0), dout.stride(1), total_q, H, D=D, BLOCK_M=delta_rows, BLOCK_D=block_d,
        )
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               dout.stride(0), dout.stride(1))
    flags = dict(D=D, CAUSAL=causal, HAS_BIAS=has_bias, PRECISION=_precision(q.dtype), BLOCK_D=block_d)
    bias = _bias_arg(key_bias, q)
    cfg = _config("dkdv", q.dtype, D)
    kv_seq, kv_start = _block_table(cu_seqlens_k, total_k, cfg.block_n)
    if kv_seq.numel() > 0:
        _attn_bwd_dkdv_kernel[(kv_seq.numel(), H)](
            q, k, v, bias, dout, lse, delta, dk, dv, dbias_heads if has_bias else bias,
            cu_seqlens_q, cu_seqlens_k, kv_seq, kv_start, *strides,
            total_q, total_k, H, softmax_scale * _LOG2E, softmax_scale, **flags,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    cfg = _config("dq", q.dtype, D)
    q_seq, q_start = _block_table(cu_seqlens_q, total_q, cfg.block_m)
    if q_seq.numel() > 0:
        _attn_bwd_dq_kernel[(q_seq.numel(), H)](
            q, k, v, bias, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, q_seq, q_start, *strides,
            total_q, H, softmax_scale * _LOG2E, softmax_scale, **flags,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return dq, dk, dv, dbias_heads.sum(0)


@_varlen_attention_triton_backward.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, key_bias, softmax_scale, causal):
    total_k = k.shape[0] if key_bias is not None else 0
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(total_k, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, key_bias, softmax_scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, key_bias)
    ctx.softmax_scale = softmax_scale
    ctx.causal = causal


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, key_bias = ctx.saved_tensors
    if dout is None:
        return (None,) * 8
    dq, dk, dv, dbias = _varlen_attention_triton_backward(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, key_bias, ctx.softmax_scale, ctx.causal
    )
    if key_bias is None:
        dbias = None
    return dq, dk, dv, None, None, dbias, None, None


torch.library.register_autograd("bus::varlen_attention_triton", _backward, setup_context=_setup_context)


def _varlen_attention_triton_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  softmax_scale, causal, key_bias=None):
    # max_seqlen_* are not needed: the block table is sized from the token counts.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if key_bias is not None and not key_bias.is_contiguous():
        key_bias = key_bias.contiguous()
    return _varlen_attention_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, key_bias, softmax_scale, causal)[0]


register_impl("varlen_attention", "torch", reference.varlen_attention)
register_impl("varlen_attention", "triton", _varlen_attention_triton_impl)


# ---------------------------------------------------------------------------------------------
# What each backend can take beyond device/dtype (head dims, key_bias), stated as data.


@dataclass(frozen=True)
class AttentionLimits:
    """Head dims a backend takes (``min_head_dim <= D <= max_head_dim``, ``D % head_dim_multiple == 0``)
    and whether it takes ``key_bias``."""

    min_head_dim: int
    max_head_dim: int | None
    head_dim_multiple: int
    key_bias: bool

    def reasons(self, head_dim: int, has_key_bias: bool) -> list[str]:
        reasons = []
        if head_dim < self.min_head_dim or (self.max_head_dim is not None and head_dim > self.max_head_dim):
            reasons.append(f"head dim {head_dim} outside [{self.min_head_dim}, {self.max_head_dim}]")
        if head_dim % self.head_dim_multiple:
            reasons.append(f"head dim {head_dim} is not a multiple of {self.head_dim_multiple}")
        if has_key_bias and not self.key_bias:
            reasons.append("key_bias is not supported")
        return reasons


ATTENTION_LIMITS: dict[str, AttentionLimits] = {
    "torch": AttentionLimits(1, None, 1, key_bias=True),
    "triton": AttentionLimits(TRITON_MIN_HEAD_DIM, TRITON_MAX_HEAD_DIM, 1, key_bias=True),
}


def register_attention_limits(backend: str, limits: AttentionLimits) -> None:
    """Declare the head dims / features ``backend`` takes for ``varlen_attention``."""
    ATTENTION_LIMITS[backend] = limits


# ---------------------------------------------------------------------------------------------
# Public function


def _check_cu_seqlens(name: str, values: list[int], total: int, max_name: str, max_seqlen: int) -> None:
    """Value checks of offsets read on the host: start at 0, non-decreasing, end at ``total``, lengths <= max."""
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values[:-1], values[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of packed tokens {total}, got {values[-1]}")
    longest = max(lengths, default=0)
    if longest > max_seqlen:
        raise ValueError(f"{max_name}={max_seqlen} is smaller than the longest sequence of {name} ({longest})")


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    key_bias: torch.Tensor | None = None,
    check_seqlens: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention over packed variable-length sequences (flash-attn ``flash_attn_varlen_func`` semantics).

    Sequence b has queries ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]`` and keys/values
    ``k, v[cu_seqlens_k[b]:cu_seqlens_k[b+1]]``; its queries attend to its keys only.

    Args:
        q: ``(total_q, H, D)`` float16/bfloat16/float32 (float64: torch backend); any strides with
            a unit stride in D are used as they are (e.g. a slice of a fused qkv tensor).
        k, v: ``(total_k, H, D)``, q's dtype and device.
        cu_seqlens_q, cu_seqlens_k: ``(B + 1,)`` int32 offsets, ``0 = cu[0] <= cu[1] <= ... <= cu[B]
            = total``; zero-length sequences allowed; q and k lengths may differ (cross-attention).
        max_seqlen_q, max_seqlen_k: int, at least the longest q / k sequence.
        softmax_scale: default ``D ** -0.5``.
        causal: mask aligned bottom-right: query i of a length-Lq sequence sees key j iff
            ``j <= i + Lk - Lq``. A query row that sees no key outputs zeros (and gets zero grads).
        key_bias: optional ``(total_k,)`` float32 added to every score of its key (natural-log units;
            ``log(n_j)`` gives proportional attention for a token standing for ``n_j`` patches).
            Differentiable. Supported by the triton and torch backends.
        check_seqlens: read ``cu_seqlens_*`` on the host to check their values (a device sync on
            CUDA). Skipped automatically while ``torch.compile`` traces.
        backend: ``"triton"``, ``"torch"``, ``"flash_attn"``, ``"xformers"``, ``"torch_varlen"`` or
            ``None`` (best available; env ``BUS_KERNELS_BACKEND``).

    Returns:
        ``(total_q, H, D)`` in q's dtype. Differentiable in q, k, v (and key_bias).
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, t)
    check_rank("q", q, 3, "(total_q, H, D)")
    check_rank("k", k, 3, "(total_k, H, D)")
    check_rank("v", v, 3, "(total_k, H, D)")
    check_float("q", q)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    total_q, H, D = q.shape
    total_k = k.shape[0]
    if H == 0 or D == 0:
        raise ValueError(f"q must have H >= 1 heads of D >= 1 dims, got shape {tuple(q.shape)}")
    check_dim_size("k", k, 1, H, "head count H of q")
    check_dim_size("k", k, 2, D, "head dim D of q")
    check_dim_size("v", v, 0, total_k, "token count total_k of k")
    check_dim_size("v", v, 1, H, "head count H of q")
    check_dim_size("v", v, 2, D, "head dim D of q")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_dtype(name, cu, torch.int32)
        check_rank(name, cu, 1, "(B + 1,)")
        if cu.shape[0] == 0:
            raise ValueError(f"{name} must have B + 1 >= 1 entries, got 0")
    check_dim_size("cu_seqlens_k", cu_seqlens_k, 0, cu_seqlens_q.shape[0], "B + 1 entries of cu_seqlens_q")
    max_seqlen_q = check_int("max_seqlen_q", max_seqlen_q, 0)
    max_seqlen_k = check_int("max_seqlen_k", max_seqlen_k, 0)
    named = [("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)]
    if key_bias is not None:
        check_tensor("key_bias", key_bias)
        check_dtype("key_bias", key_bias, torch.float32)
        check_rank("key_bias", key_bias, 1, "(total_k,)")
        check_dim_size("key_bias", key_bias, 0, total_k, "token count total_k of k")
        named.append(("key_bias", key_bias))
    check_same_device(named)
    if softmax_scale is None:
        softmax_scale = D**-0.5
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    softmax_scale = float(softmax_scale)
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if check_seqlens and not torch.compiler.is_compiling():
        offsets = torch.cat([cu_seqlens_q, cu_seqlens_k]).tolist()  # one host read (one sync on CUDA)
        n = cu_seqlens_q.shape[0]
        _check_cu_seqlens("cu_seqlens_q", offsets[:n], total_q, "max_seqlen_q", max_seqlen_q)
        _check_cu_seqlens("cu_seqlens_k", offsets[n:], total_k, "max_seqlen_k", max_seqlen_k)

    requires_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, key_bias)
    )

    def extra(name: str) -> list[str]:
        limits = ATTENTION_LIMITS.get(name)
        return limits.reasons(D, key_bias is not None) if limits is not None else []

    name = select_backend("varlen_attention", q.device, q.dtype, requires_grad, backend, extra)
    impl = get_impl("varlen_attention", name)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal)
    return impl(*args, key_bias) if key_bias is not None else impl(*args)


def aot_specs():
    """Kernel variants compiled by ``python -m bus_kernels.aot`` (names start with ``varlen_attn``)."""
    from ..aot import TRITON_DTYPES, KernelSpec

    index = {"cu_q_ptr": "*i32", "cu_k_ptr": "*i32", "blk_seq_ptr": "*i32", "blk_start_ptr": "*i32"}
    strides = {n: "i32" for n in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh")}
    do_strides = {"stride_dot": "i32", "stride_doh": "i32"}
    blocks = {"BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
    flags = {"D": "constexpr", "CAUSAL": "constexpr", "HAS_BIAS": "constexpr", "PRECISION": "constexpr"}
    specs = []
    for torch_dt, dt in TRITON_DTYPES.items():
        dtype = getattr(torch, torch_dt)
        # fp16: the common head dims, a masked one (80) and the largest; bf16 shares fp16's tiles; fp32 is
        # the accuracy path. (Every entry of _GPU_CONFIGS was checked spill-free while tuning.)
        head_dims = {torch.float16: (64, 80, 128, 256), torch.bfloat16: (64, 128), torch.float32: (64,)}[dtype]
        for D in head_dims:
            bd = _block_d(D)
            for causal, has_bias in ((False, False), (True, True)):
                tag = f"{dt} D={D}" + (" causal+bias" if causal else "")
                fwd = _GPU_CONFIGS[("fwd", dtype == torch.float32, bd)]
                dkdv = _GPU_CONFIGS[("dkdv", dtype == torch.float32, bd)]
                dq = _GPU_CONFIGS[("dq", dtype == torch.float32, bd)]
                flag_vals = {"D": D, "CAUSAL": causal, "HAS_BIAS": has_bias, "PRECISION": _precision(dtype)}
                qkv = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "bias_ptr": "*fp32"}
                specs.append(KernelSpec(
                    f"varlen_attn_fwd {tag}", _attn_fwd_kernel,
                    {**qkv, "out_ptr": f"*{dt}", "lse_ptr": "*fp32", **index, **strides,
                     "total_q": "i32", "H": "i32", "qk_scale": "fp32", **flags, **blocks},
                    {**flag_vals, "BLOCK_M": fwd.block_m, "BLOCK_N": fwd.block_n, "BLOCK_D": bd},
                    num_warps=fwd.num_warps, num_stages=fwd.num_stages,
                ))
                specs.append(KernelSpec(
                    f"varlen_attn_bwd_dkdv {tag}", _attn_bwd_dkdv_kernel,
                    {**qkv, "dout_ptr": f"*{dt}", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "dk_ptr": f"*{dt}",
                     "dv_ptr": f"*{dt}", "dbias_ptr": "*fp32", **index, **strides, **do_strides,
                     "total_q": "i32", "total_k": "i32", "H": "i32", "qk_scale": "fp32",
                     "sm_scale": "fp32", **flags, **blocks},
                    {**flag_vals, "BLOCK_M": dkdv.block_m, "BLOCK_N": dkdv.block_n, "BLOCK_D": bd},
                    num_warps=dkdv.num_warps, num_stages=dkdv.num_stages,
                ))
                specs.append(KernelSpec(
                    f"varlen_attn_bwd_dq {tag}", _attn_bwd_dq_kernel,
                    {**qkv, "dout_ptr": f"*{dt}", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "dq_ptr": f"*{dt}",
                     **index, **strides, **do_strides, "total_q": "i32", "H": "i32",
                     "qk_scale": "fp32", "sm_scale": "fp32", **flags, **blocks},
                    {**flag_vals, "BLOCK_M": dq.block_m, "BLOCK_N": dq.block_n, "BLOCK_D": bd},
                    num_warps=dq.num_warps, num_stages=dq.num_stages,
                ))
            delta_rows = _delta_rows(bd)
            specs.append(KernelSpec(
                f"varlen_attn_bwd_delta {dt} D={D}", _attn_bwd_delta_kernel,
                {"out_ptr": f"*{dt}", "dout_ptr": f"*{dt}", "delta_ptr": "*fp32", **do_strides,
                 "total_q": "i32", "H": "i32", "D": "constexpr", "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"},
                {"D": D, "BLOCK_M": delta_rows, "BLOCK_D": bd},
            ))
    return specs
