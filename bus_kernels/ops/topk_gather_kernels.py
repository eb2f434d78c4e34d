"""Triton kernels of ``topk_gather`` (BUS TSPS, Sec. 3.2): radix top-k selection, gather + fusion of the
dropped tokens, and their backward. The launchers, autograd and the public functions are in
``topk_gather.py``, which documents the algorithm.
"""

import triton
import triton.language as tl


# N (and the score row stride, = N) is ragged across pruning stages and batches: not specialised, so a
# change of its divisibility by 16 never recompiles (see bus_kernels/aot.py).
@triton.jit(do_not_specialize=["N", "stride_sb"])
def _topk_select_kernel(
    scores_ptr, k_ptr, cu_ptr, slot_ptr, index_ptr,
    N, stride_sb,
    NP: tl.constexpr, FUSE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    # the row offsets, computed here rather than by a cumsum launch: row b's kept tokens start at
    # sum_{j < b} k_j in the index and, with its fused token, at cu[b] = sum_{j < b} (k_j + FUSE) in the
    # tokens; cu (B + 1,) int32 is also the packed rows' cu_seqlens. O(B) per row: B is a batch size.
    index_base = tl.zeros((), dtype=tl.int32)
    for b0 in range(0, tl.program_id(0), 256):
        offs_b = b0 + tl.arange(0, 256)
        index_base += tl.sum(tl.load(k_ptr + offs_b, mask=offs_b < b, other=0).to(tl.int32), axis=0)
    out_base = index_base
    if FUSE:
        out_base += b.to(tl.int32)
    offs = tl.arange(0, NP)
    valid = offs < N
    s = tl.load(scores_ptr + b * stride_sb + offs, mask=valid, other=0.0).to(tl.float32) + 0.0  # -0.0 -> +0.0
    bits = s.to(tl.uint32, bitcast=True)
    # order-preserving map float -> uint32: negatives have all bits flipped, non-negatives the sign bit set;
    # NaN (either sign) gets key 0, below -inf: it ranks lowest (kept only when k forces it)
    key = tl.where((bits >> 31) == 1, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    key = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0, key)
    k = tl.load(k_ptr + b).to(tl.int32)

    # radix select, most significant bit first: the largest t with count(key >= t) >= k is the k-th largest key
    t = tl.zeros((), dtype=tl.uint32)
    for bit in range(31, -1, -1):
        cand = t | (tl.full((), 1, tl.uint32) << bit)
        enough = tl.sum((valid & (key >= cand)).to(tl.int32), axis=0) >= k
        t = tl.where(enough, cand, t)

    above = valid & (key > t)
    n_above = tl.sum(above.to(tl.int32), axis=0)
    tie = valid & (key == t)
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=0)  # 1-based rank among equal keys, by position
    keep = above | (tie & (tie_rank <= k - n_above))
    slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(slot_ptr + b * N + offs, tl.where(keep, slot, -1), mask=valid)
    tl.store(index_ptr + index_base + slot, offs.to(tl.int64), mask=keep)
    out_end = out_base + k
    if FUSE:
        out_end += 1
    tl.store(cu_ptr + b + 1, out_end)
    tl.store(cu_ptr, 0, mask=b == 0)


@triton.jit(do_not_specialize=["N", "stride_sb"])
def _topk_gather_fwd_kernel(
    x_ptr, scores_ptr, slot_ptr, k_ptr, cu_ptr,
    out_ptr, fused_ptr,
    N, C, stride_xb, stride_xn, stride_sb, eps,
    FUSE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B * N * C may exceed 2**31
    cb = tl.program_id(1)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    out_base = tl.load(cu_ptr + b).to(tl.int64)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    den = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        slot = tl.load(slot_ptr + b * N + offs_n, mask=nmask, other=-1)
        tile_mask = nmask[:, None] & cmask[None, :]
        xt = tl.load(x_ptr + b * stride_xb + offs_n[:, None] * stride_xn + offs_c[None, :], mask=tile_mask, other=0.0)
        rows = (out_base + slot).to(tl.int64)
        tl.store(out_ptr + rows[:, None] * C + offs_c[None, :], xt, mask=tile_mask & (slot >= 0)[:, None])
        if FUSE:
            s = tl.load(scores_ptr + b * stride_sb + offs_n, mask=nmask, other=0.0).to(tl.float32)
            w = tl.where(nmask & (slot < 0), s, 0.0)
            acc += tl.sum(w[:, None] * xt.to(tl.float32), axis=0)
            den += w
    if FUSE:
        total = tl.sum(den, axis=0)
        fused = acc / tl.maximum(total, eps)
        k = tl.load(k_ptr + b)
        tl.store(out_ptr + (out_base + k).to(tl.int64) * C + offs_c, fused.to(out_ptr.dtype.element_ty), mask=cmask)
        # fused_ptr: (B, C + 1) fp32, row b = the fused token then its weight sum (one buffer, one allocation)
        tl.store(fused_ptr + b * (C + 1) + offs_c, fused, mask=cmask)
        tl.store(fused_ptr + b * (C + 1) + C, total, mask=cb == 0)


@triton.jit(do_not_specialize=["N", "stride_sb"])
def _topk_gather_bwd_kernel(
    gout_ptr, x_ptr, scores_ptr, slot_ptr, k_ptr, cu_ptr, fused_ptr,
    gx_ptr, gs_ptr,
    N, C, stride_xb, stride_xn, stride_sb, eps,
    FUSE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    slot = tl.load(slot_ptr + b * N + offs_n, mask=nmask, other=-1)
    kept = slot >= 0
    dropped = nmask & (slot < 0)
    out_base = tl.load(cu_ptr + b).to(tl.int64)
    rows = (out_base + slot).to(tl.int64)
    if FUSE:
        total = tl.load(fused_ptr + b * (C + 1) + C)  # (B, C + 1): the fused token, then its weight sum
        denom = tl.maximum(total, eps)
        s = tl.load(scores_ptr + b * stride_sb + offs_n, mask=nmask, other=0.0).to(tl.float32)
        coef = tl.where(dropped, s / denom, 0.0)
        # d fused / d s_j = (x_j - fused) / denom while the sum is above eps, x_j / eps when clamped
        fused_scale = tl.where(total > eps, 1.0, 0.0)
        fused_row = (out_base + tl.load(k_ptr + b)).to(tl.int64)
    gs = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        tile_mask = nmask[:, None] & cmask[None, :]
        gx = tl.load(gout_ptr + rows[:, None] * C + offs_c[None, :], mask=tile_mask & kept[:, None], other=0.0)
        gx = gx.to(tl.float32)
        if FUSE:
            gf = tl.load(gout_ptr + fused_row * C + offs_c, mask=cmask, other=0.0).to(tl.float32)
            f = tl.load(fused_ptr + b * (C + 1) + offs_c, mask=cmask, other=0.0)
            gx += coef[:, None] * gf[None, :]
            drop_mask = tile_mask & dropped[:, None]
            xt = tl.load(x_ptr + b * stride_xb + offs_n[:, None] * stride_xn + offs_c[None, :], mask=drop_mask, other=0.0)
            diff = xt.to(tl.float32) - fused_scale * f[None, :]
            gs += tl.sum(tl.where(drop_mask, diff * gf[None, :], 0.0), axis=1)
        tl.store(gx_ptr + b * N * C + offs_n[:, None] * C + offs_c[None, :], gx.to(gx_ptr.dtype.element_ty), mask=tile_mask)
    if FUSE:
        gs = gs / denom
    tl.store(gs_ptr + b * N + offs_n, gs.to(gs_ptr.dtype.element_ty), mask=nmask)
