"""Kernel variants of varlen attention compiled by ``python -m bus_kernels.aot``."""

from __future__ import annotations

import torch

from .kernel_bwd import _attn_bwd_dkdv_kernel, _attn_bwd_delta_kernel, _attn_bwd_dq_kernel
from .kernel_fwd import _attn_fwd_kernel
from .tiles import _GPU_CONFIGS, _block_d, _delta_rows, _precision

_INDEX = {"cu_q_ptr": "*i32", "cu_k_ptr": "*i32", "blk_seq_ptr": "*i32", "blk_start_ptr": "*i32"}
_STRIDES = {n: "i32" for n in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh")}
_DO_STRIDES = {"stride_dot": "i32", "stride_doh": "i32"}
_BLOCKS = {"BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
_FLAGS = {"D": "constexpr", "CAUSAL": "constexpr", "HAS_BIAS": "constexpr", "PRECISION": "constexpr"}
_DT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def attention_specs(dtype: torch.dtype, D: int, causal: bool, has_bias: bool) -> list:
    """The fwd, dK/dV and dQ kernels of one (dtype, head dim, causal, key_bias) variant, with the tiles
    the launcher uses on a GPU."""
    from ...aot import KernelSpec

    dt, bd = _DT[dtype], _block_d(D)
    tag = f"{dt} D={D}" + (" causal" if causal else "") + ("+bias" if has_bias else "")
    fp32 = dtype == torch.float32
    fwd, dkdv, dq = (_GPU_CONFIGS[(kind, fp32, bd)] for kind in ("fwd", "dkdv", "dq"))
    flag_vals = {"D": D, "CAUSAL": causal, "HAS_BIAS": has_bias, "PRECISION": _precision(dtype)}
    qkv = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "bias_ptr": "*fp32"}
    return [
        KernelSpec(
            f"varlen_attn_fwd {tag}", _attn_fwd_kernel,
            {**qkv, "out_ptr": f"*{dt}", "lse_ptr": "*fp32", **_INDEX, **_STRIDES,
             "total_q": "i32", "H": "i32", "qk_scale": "fp32", **_FLAGS, **_BLOCKS},
            {**flag_vals, "BLOCK_M": fwd.block_m, "BLOCK_N": fwd.block_n, "BLOCK_D": bd},
            num_warps=fwd.num_warps, num_stages=fwd.num_stages,
        ),
        KernelSpec(
            f"varlen_attn_bwd_dkdv {tag}", _attn_bwd_dkdv_kernel,
            {**qkv, "dout_ptr": f"*{dt}", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "dk_ptr": f"*{dt}",
             "dv_ptr": f"*{dt}", "dbias_ptr": "*fp32", **_INDEX, **_STRIDES, **_DO_STRIDES,
             "total_q": "i32", "total_k": "i32", "H": "i32", "qk_scale": "fp32",
             "sm_scale": "fp32", **_FLAGS, **_BLOCKS},
            {**flag_vals, "BLOCK_M": dkdv.block_m, "BLOCK_N": dkdv.block_n, "BLOCK_D": bd},
            num_warps=dkdv.num_warps, num_stages=dkdv.num_stages,
        ),
        KernelSpec(
            f"varlen_attn_bwd_dq {tag}", _attn_bwd_dq_kernel,
            {**qkv, "dout_ptr": f"*{dt}", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "dq_ptr": f"*{dt}",
             **_INDEX, **_STRIDES, **_DO_STRIDES, "total_q": "i32", "H": "i32",
             "qk_scale": "fp32", "sm_scale": "fp32", **_FLAGS, **_BLOCKS},
            {**flag_vals, "BLOCK_M": dq.block_m, "BLOCK_N": dq.block_n, "BLOCK_D": bd},
            num_warps=dq.num_warps, num_stages=dq.num_stages,
        ),
    ]


def delta_spec(dtype: torch.dtype, D: int):
    from ...aot import KernelSpec

    dt, bd = _DT[dtype], _block_d(D)
    return KernelSpec(
        f"varlen_attn_bwd_delta {dt} D={D}", _attn_bwd_delta_kernel,
        {"out_ptr": f"*{dt}", "dout_ptr": f"*{dt}", "delta_ptr": "*fp32", **_DO_STRIDES,
         "total_q": "i32", "H": "i32", "D": "constexpr", "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"},
        {"D": D, "BLOCK_M": _delta_rows(bd), "BLOCK_D": bd},
    )


# fp16: the common head dims, a masked one (80) and the largest; bf16 shares fp16's tiles; fp32 is the
# accuracy path. (Every entry of _GPU_CONFIGS was checked spill-free while tuning.)
AOT_HEAD_DIMS = {torch.float16: (64, 80, 128, 256), torch.bfloat16: (64, 128), torch.float32: (64,)}


def aot_specs():
    """Kernel variants compiled by ``python -m bus_kernels.aot`` (names start with ``varlen_attn``)."""
    specs = []
    for dtype, head_dims in AOT_HEAD_DIMS.items():
        for D in head_dims:
            for causal, has_bias in ((False, False), (True, True)):
                specs += attention_specs(dtype, D, causal, has_bias)
            specs.append(delta_spec(dtype, D))
    return specs
