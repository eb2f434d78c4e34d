"""Backward Triton kernels of varlen attention (FlashAttention-2, Dao 2023, Algorithm 2).

  * ``_attn_bwd_delta_kernel``: ``delta = rowsum(dO * O)`` per (row, head);
  * ``_attn_bwd_dkdv_kernel``: one key block x head, loops over the query blocks that see it; also
    the key_bias gradient per head;
  * ``_attn_bwd_dq_kernel``: one query block x head, loops over its visible key blocks.
Every output element is written by exactly one program: no atomics.
"""

import triton
import triton.language as tl

from .kernel_common import _bias_and_causal, _block_sequence, _key_end, _load_keys, _load_queries


# Ragged sizes are not specialised: their divisibility by 16 changes from batch to batch and would
# compile a second variant mid-run (they only index the (H, total) lse/delta rows). See bus_kernels/aot.py.
@triton.jit(do_not_specialize=["total_q"])
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


@triton.jit(do_not_specialize=["total_q", "total_k"])
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dbias_ptr,
    cu_q_ptr, cu_k_ptr, blk_seq_ptr, blk_start_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    total_q, total_k, H, qk_scale, sm_scale,
    D: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.load(blk_seq_ptr + tl.program_id(0))
    if seq < 0:  # spare entry of the block table
        return
    start_n, q0, k0, len_q, len_k = _block_sequence(blk_start_ptr, cu_q_ptr, cu_k_ptr, seq)
    h = tl.program_id(1)
    shift = len_k - len_q

    offs_m = tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = cols < len_k
    dmask = offs_d < D
    q_base = q_ptr + q0.to(tl.int64) * stride_qt + h * stride_qh
    do_base = dout_ptr + q0.to(tl.int64) * stride_dot + h * stride_doh
    row_base = h.to(tl.int64) * total_q + q0  # into lse and delta, (H, total_q)
    k, v = _load_keys(k_ptr + k0.to(tl.int64) * stride_kt + h * stride_kh,
                      v_ptr + k0.to(tl.int64) * stride_vt + h * stride_vh,
                      cols, nmask, offs_d, dmask, stride_kt, stride_vt)
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
        q, do, lse, delta = _load_queries(q_base, do_base, lse_ptr + row_base, delta_ptr + row_base, rows, mmask,
                                          offs_d, dmask, stride_qt, stride_dot)
        # transposed tiles (keys on rows): dK and dV accumulate without a transpose of P or dS
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
    kv_mask = nmask[:, None] & dmask[None, :]
    tl.store(dk_ptr + out_off, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)
    if HAS_BIAS:
        tl.store(dbias_ptr + h.to(tl.int64) * total_k + k0 + cols, dbias, mask=nmask)


@triton.jit(do_not_specialize=["total_q"])
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
    cu_q_ptr, cu_k_ptr, blk_seq_ptr, blk_start_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    total_q, H, qk_scale, sm_scale,
    D: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.load(blk_seq_ptr + tl.program_id(0))
    if seq < 0:  # spare entry of the block table
        return
    start_m, q0, k0, len_q, len_k = _block_sequence(blk_start_ptr, cu_q_ptr, cu_k_ptr, seq)
    h = tl.program_id(1)
    shift = len_k - len_q

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < len_q
    dmask = offs_d < D
    head_row = h.to(tl.int64) * total_q  # this head's row of lse and delta, (H, total_q)
    q, do, lse, delta = _load_queries(q_ptr + q0.to(tl.int64) * stride_qt + h * stride_qh,
                                      dout_ptr + q0.to(tl.int64) * stride_dot + h * stride_doh,
                                      lse_ptr + head_row + q0, delta_ptr + head_row + q0,
                                      offs_m, mmask, offs_d, dmask, stride_qt, stride_dot)
    k_base = k_ptr + k0.to(tl.int64) * stride_kt + h * stride_kh
    v_base = v_ptr + k0.to(tl.int64) * stride_vt + h * stride_vh
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    for start_n in range(0, _key_end(start_m, len_k, shift, BLOCK_M, CAUSAL), BLOCK_N):
        cols = start_n + offs_n
        nmask = cols < len_k
        k, v = _load_keys(k_base, v_base, cols, nmask, offs_d, dmask, stride_kt, stride_vt)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s, visible = _bias_and_causal(s, mmask[:, None] & nmask[None, :], bias_ptr, k0, offs_m, cols, nmask, shift,
                                      CAUSAL, HAS_BIAS)
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    tl.store(dq_ptr + (q0.to(tl.int64) * H + h) * D + offs_m[:, None] * (H * D) + offs_d[None, :],
             (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])

