"""Forward Triton kernel of varlen attention (FlashAttention-2, Dao 2023, Sec. 3.1).

One program = one query block x one head, found through the block table (see ``tiles.py``); online
softmax in fp32 in the exp2 domain; saves the base-2 log-sum-exp ``lse (H, total_q)`` (+inf for a
row with no visible key) for the backward.
"""

import triton
import triton.language as tl

from .kernel_common import _bias_and_causal, _block_sequence, _key_end


# Ragged sizes are not specialised: their divisibility by 16 changes from batch to batch and would
# compile a second variant mid-run (they only index the (H, total) lse/delta rows). See bus_kernels/aot.py.
@triton.jit(do_not_specialize=["total_q"])
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, lse_ptr,
    cu_q_ptr, cu_k_ptr, blk_seq_ptr, blk_start_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    total_q, H, qk_scale,
    D: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.load(blk_seq_ptr + tl.program_id(0))
    if seq < 0:  # spare entry of the block table
        return
    start_m, q0, k0, len_q, len_k = _block_sequence(blk_start_ptr, cu_q_ptr, cu_k_ptr, seq)
    h = tl.program_id(1)
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
    for start_n in range(0, _key_end(start_m, len_k, shift, BLOCK_M, CAUSAL), BLOCK_N):
        cols = start_n + offs_n
        nmask = cols < len_k
        kt = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None],
                     mask=dmask[:, None] & nmask[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        s, visible = _bias_and_causal(s, nmask[None, :], bias_ptr, k0, offs_m, cols, nmask, shift, CAUSAL, HAS_BIAS)
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

