"""Kernel variants of varlen attention compiled by ``python -m bus_kernels.aot``."""

from __future__ import annotations

import torch

from .kernel_bwd import _attn_bwd_dkdv_kernel, _attn_bwd_delta_kernel, _attn_bwd_dq_kernel
from .kernel_fwd import _attn_fwd_kernel
from .tiles import SHORT_Q, _block_d, _delta_rows, _precision, config_for

_INDEX = {"cu_q_ptr": "*i32", "cu_k_ptr": "*i32", "blk_seq_ptr": "*i32", "blk_start_ptr": "*i32"}
_STRIDES = {n: "i32" for n in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh")}
_DO_STRIDES = {"stride_dot": "i32", "stride_doh": "i32"}
_BLOCKS = {"BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
_FLAGS = {"D": "constexpr", "CAUSAL": "constexpr", "HAS_BIAS": "constexpr", "PRECISION": "constexpr"}
_DT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Strides the model's tensors have as multiples of 16 elements (head dims 16..256 in steps of 16, fused
# qkv rows of 3 * H * D): the JIT specialises them so, and so does the ahead-of-time compile.
_DIVISIBLE = tuple(_STRIDES)
_DIVISIBLE_DO = _DIVISIBLE + tuple(_DO_STRIDES)


def attention_specs(dtype: torch.dtype, D: int, causal: bool, has_bias: bool, major: int = 8,
                    max_seqlen_q: int | None = None, archs: tuple[int, ...] | None = None) -> list:
    """The fwd, dK/dV and dQ kernels of one (dtype, head dim, causal, key_bias) variant, with the tiles
    the launcher uses on a GPU of compute capability ``major`` (and for ``max_seqlen_q``)."""
    from ...aot import KernelSpec

    dt, bd = _DT[dtype], _block_d(D)
    tag = f"{dt} D={D}" + (" causal" if causal else "") + ("+bias" if has_bias else "")
    if max_seqlen_q is not None:
        tag += f" short(q<={max_seqlen_q})"
    fwd, dkdv, dq = (config_for(kind, dtype, D, major, max_seqlen_q) for kind in ("fwd", "dkdv", "dq"))
    flag_vals = {"D": D, "CAUSAL": causal, "HAS_BIAS": has_bias, "PRECISION": _precision(dtype)}
    qkv = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "bias_ptr": "*fp32"}
    return [
        KernelSpec(
            f"varlen_attn_fwd {tag}", _attn_fwd_kernel,
            {**qkv, "out_ptr": f"*{dt}", "lse_ptr": "*fp32", **_INDEX, **_STRIDES,
             "total_q": "i32", "H": "i32", "qk_scale": "fp32", **_FLAGS, **_BLOCKS},
            {**flag_vals, "BLOCK_M": fwd.block_m, "BLOCK_N": fwd.block_n, "BLOCK_D": bd},
            num_warps=fwd.num_warps, num_stages=fwd.num_stages, divisible=_DIVISIBLE, archs=archs,
        ),
        KernelSpec(
            f"varlen_attn_bwd_dkdv {tag}", _attn_bwd_dkdv_kernel,
            {**qkv, "dout_ptr": f"*{dt}", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "dk_ptr": f"*{dt}",
             "dv_ptr": f"*{dt}", "dbias_ptr": "*fp32", **_INDEX, **_STRIDES, **_DO_STRIDES,
             "total_q": "i32", "total_k": "i32", "H": "i32", "qk_scale": "fp32",
             "sm_scale": "fp32", **_FLAGS, **_BLOCKS},
            {**flag_vals, "BLOCK_M": dkdv.block_m, "BLOCK_N": dkdv.block_n, "BLOCK_D": bd},
            num_warps=dkdv.num_warps, num_stages=dkdv.num_stages, divisible=_DIVISIBLE_DO, archs=archs,
        ),
        KernelSpec(
            f"varlen_attn_bwd_dq {tag}", _attn_bwd_dq_kernel,
            {**qkv, "dout_ptr": f"*{dt}", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "dq_ptr": f"*{dt}",
             **_INDEX, **_STRIDES, **_DO_STRIDES, "total_q": "i32", "H": "i32",
             "qk_scale": "fp32", "sm_scale": "fp32", **_FLAGS, **_BLOCKS},
            {**flag_vals, "BLOCK_M": dq.block_m, "BLOCK_N": dq.block_n, "BLOCK_D": bd},
            num_warps=dq.num_warps, num_stages=dq.num_stages, divisible=_DIVISIBLE_DO, archs=archs,
        ),
    ]


def delta_spec(dtype: torch.dtype, D: int):
    from ...aot import KernelSpec

    dt, bd = _DT[dtype], _block_d(D)
    return KernelSpec(
        f"varlen_attn_bwd_delta {dt} D={D}", _attn_bwd_delta_kernel,
        {"out_ptr": f"*{dt}", "dout_ptr": f"*{dt}", "delta_ptr": "*fp32", **_DO_STRIDES,
         "total_q": "i32", "H": "i32", "D": "constexpr", "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"},
        {"D": D, "BLOCK_M": _delta_rows(bd), "BLOCK_D": bd}, divisible=tuple(_DO_STRIDES),
    )


# Every head dim the model configs use (16 and 32 in the small ones, 64, 128) in every dtype; fp16 also
# a masked one (80) and the largest (256).
AOT_HEAD_DIMS = {torch.float16: (16, 32, 64, 80, 128, 256), torch.bfloat16: (16, 32, 64, 128),
                 torch.float32: (16, 32, 64, 128)}


# Text towers (captions of <= 32 tokens, causal) at the text head dims: the small query tile.
SHORT_HEAD_DIMS = (32, 64)


def _per_target(dtype, D, causal, has_bias, max_seqlen_q=None) -> list:
    """One spec set for sm_80 and sm_90 when their tiles agree, else one for each."""
    sm80 = attention_specs(dtype, D, causal, has_bias, 8, max_seqlen_q, archs=(80,))
    sm90 = attention_specs(dtype, D, causal, has_bias, 9, max_seqlen_q, archs=(90,))
    if [s.constexprs for s in sm80] == [s.constexprs for s in sm90] and \
            [(s.num_warps, s.num_stages) for s in sm80] == [(s.num_warps, s.num_stages) for s in sm90]:
        return attention_specs(dtype, D, causal, has_bias, 8, max_seqlen_q)
    return sm80 + sm90


def aot_specs():
    """Kernel variants compiled by ``python -m bus_kernels.aot`` (names start with ``varlen_attn``)."""
    specs = []
    for dtype, head_dims in AOT_HEAD_DIMS.items():
        for D in head_dims:
            for causal, has_bias in ((False, False), (True, True)):
                specs += _per_target(dtype, D, causal, has_bias)
            specs.append(delta_spec(dtype, D))
        for D in SHORT_HEAD_DIMS:
            specs += _per_target(dtype, D, True, False, SHORT_Q)
    return specs
