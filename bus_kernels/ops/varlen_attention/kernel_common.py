"""What the varlen attention kernels share (``kernel_fwd.py``, ``kernel_bwd.py``): ``@triton.jit`` helpers,
inlined into each kernel that calls them.

  * ``_block_sequence``: a program's block-table entry and the bounds of its sequence;
  * ``_key_end``: one past the last key a query block can see (causal: bottom-right aligned);
  * ``_bias_and_causal``: key_bias and the causal mask on a (query block x key block) tile of scores;
  * ``_load_keys`` / ``_load_queries``: the key-side (K, V) and query-side (Q, dO, lse, delta) rows of
    a block of one sequence and head.
"""

import triton
import triton.language as tl


@triton.jit
def _block_sequence(blk_start_ptr, cu_q_ptr, cu_k_ptr, seq):
    """The block of this program (axis 0) in sequence ``seq`` (its block-table entry, not a spare one):
    ``(start, q0, k0, len_q, len_k)``: the block's first row within the sequence (query or key rows, as
    the table was built), the sequence's first query and key rows in the packed tensors, its lengths."""
    start = tl.load(blk_start_ptr + tl.program_id(0))
    q0 = tl.load(cu_q_ptr + seq)
    k0 = tl.load(cu_k_ptr + seq)
    len_q = tl.load(cu_q_ptr + seq + 1) - q0
    len_k = tl.load(cu_k_ptr + seq + 1) - k0
    return start, q0, k0, len_q, len_k


@triton.jit
def _key_end(start_m, len_k, shift, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """One past the last key that the query rows ``start_m .. start_m + BLOCK_M - 1`` can see: all
    ``len_k`` keys, or (causal, row i sees key j iff ``j <= i + shift``) fewer."""
    end_n = len_k
    if CAUSAL:
        end_n = tl.minimum(len_k, start_m + BLOCK_M + shift)
    return end_n


@triton.jit
def _bias_and_causal(s, visible, bias_ptr, k0, rows, cols, nmask, shift, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A ``(BLOCK_M, BLOCK_N)`` tile of scores ``s`` (base-2 units) of query rows ``rows`` against key rows
    ``cols`` of one sequence, and where it is ``visible``: the natural-log ``key_bias`` of those keys
    converted and added; causal: key j visible to query i only if ``j <= i + shift`` (bottom-right)."""
    if HAS_BIAS:
        s += tl.load(bias_ptr + k0 + cols, mask=nmask, other=0.0)[None, :] * 1.4426950408889634
    if CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + shift)
    return s, visible


@triton.jit
def _load_keys(k_base, v_base, cols, nmask, offs_d, dmask, stride_kt, stride_vt):
    """K and V rows ``cols`` of one sequence and head (bases at its first row): two ``(BLOCK_N, BLOCK_D)``
    tiles, zeros past the sequence and the head dim."""
    kv_mask = nmask[:, None] & dmask[None, :]
    k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def _load_queries(q_base, do_base, lse_ptr, delta_ptr, rows, mmask, offs_d, dmask, stride_qt, stride_dot):
    """Q and dO rows ``rows`` of one sequence and head (bases at its first row): ``(BLOCK_M, BLOCK_D)``
    tiles, zeros past the sequence; and their lse and delta ``(BLOCK_M,)`` (``lse_ptr`` / ``delta_ptr``
    at the sequence's first row of this head), +inf and 0 past the sequence."""
    qd_mask = mmask[:, None] & dmask[None, :]
    q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :], mask=qd_mask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=mmask, other=float("inf"))
    delta = tl.load(delta_ptr + rows, mask=mmask, other=0.0)
    return q, do, lse, delta
