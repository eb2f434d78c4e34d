"""Backward Triton kernels of varlen attention (FlashAttention-2, Dao 2023, Algorithm 2).

  * ``_attn_bwd_delta_kernel``: ``delta = rowsum(dO * O)`` per (row, head);
  * ``_attn_bwd_dkdv_kernel``: one key block x head, loops over the query blocks that see it; also
    the key_bias gradient per head;
  * ``_attn_bwd_dq_kernel``: one query block x head, loops over its visible key blocks.
Every output element is written by exactly one program: no atomics.
"""

import triton
import triton.language as tl


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


@triton.jit(do_not_specialize=["total_q"])
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

