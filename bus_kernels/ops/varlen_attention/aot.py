"""Kernel variants of varlen attention compiled by ``python -m bus_kernels.aot``."""

from __future__ import annotations

import torch

from .kernel_bwd import _attn_bwd_dkdv_kernel, _attn_bwd_delta_kernel, _attn_bwd_dq_kernel
from .kernel_fwd import _attn_fwd_kernel
from .tiles import _GPU_CONFIGS, _block_d, _delta_rows, _precision


def aot_specs():
    """Kernel variants compiled by ``python -m bus_kernels.aot`` (names start with ``varlen_attn``)."""
    from ...aot import TRITON_DTYPES, KernelSpec

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
