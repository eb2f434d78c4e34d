"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed), without spills."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.slow
def test_aot_compiles_every_kernel_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    result = subprocess.run(
        [sys.executable, "-m", "bus_kernels.aot", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=1200,
    )
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["arch"] for r in rows} == {80, 90}
    assert all(r["ok"] and r["local_bytes"] == 0 and r["registers"] <= 255 for r in rows)
    assert not any(r["over_shared_limit"] for r in rows)
    kernels = {r["name"].split()[0] for r in rows}
    assert {"topk_select", "topk_gather_fwd", "topk_gather_bwd", "tps_logits", "tps_bwd", "tps_combine"} <= kernels
    dtypes = {r["name"].split()[1] for r in rows}
    assert {"fp16", "bf16", "fp32"} <= dtypes
    names = {r["name"] for r in rows}
    # every variant the model launches: its head dims, bf16 tokens with fp32 scores, every selection tile
    for D in (16, 32, 64, 128):
        assert f"varlen_attn_fwd bf16 D={D}" in names and f"varlen_attn_bwd_dq fp16 D={D} causal+bias" in names
    assert "topk_gather_fwd bf16 scores=fp32 C=768" in names and "topk_gather_bwd bf16 scores=fp32 C=384" in names
    assert {f"topk_select scores=fp32 NP={2**e}" for e in range(15)} <= names
    assert any("short(q<=32)" in n for n in names)


def test_runtime_attrs_and_shared_memory_limits():
    """The compile sees what the JIT sees: pointers and the listed integers 16-divisible; a variant over
    the target's shared memory is flagged (and fails the run)."""
    from bus_kernels import aot
    from bus_kernels.ops.varlen_attention.aot import attention_specs

    spec = attention_specs(torch.float16, 64, True, True)[0]
    attrs = aot.runtime_attrs(spec)
    names = spec.fn.arg_names
    hinted = {names[i] for (i,) in attrs}
    assert {"q_ptr", "out_ptr", "cu_q_ptr", "stride_qt", "stride_kh"} <= hinted
    assert not {"total_q", "H", "qk_scale"} & hinted
    assert all(v == [["tt.divisibility", 16]] for v in attrs.values())
    r = aot.AotResult("k", 80, True, registers=64, local_bytes=0, static_shared=1024, dynamic_shared=163 * 1024)
    assert r.over_shared_limit and not aot.AotResult("k", 90, True, static_shared=1024,
                                                     dynamic_shared=163 * 1024).over_shared_limit
    assert "OVER LIMIT" in aot.format_table([r])


def test_aot_refuses_to_run_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "bus_kernels.aot"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and "unset TRITON_INTERPRET" in result.stderr


def test_ragged_sizes_are_not_specialised():
    """total_q / total_k / N never trigger a recompile when their divisibility by 16 changes (checked on
    the compiled kernels: the interpreter of the test process has no specialisation)."""
    code = (
        "import importlib\n"
        "mods = {m: importlib.import_module(m) for m in ('bus_kernels.ops.varlen_attention.kernel_fwd',"
        " 'bus_kernels.ops.varlen_attention.kernel_bwd', 'bus_kernels.ops.topk_gather', 'bus_kernels.ops.text_patch_scores')}\n"
        "for mod in mods.values():\n"
        "    for name in dir(mod):\n"
        "        fn = getattr(mod, name)\n"
        "        if hasattr(fn, 'params') and name.startswith('_') and name.endswith('_kernel'):\n"
        "            print(name, *[p.name for p in fn.params if p.do_not_specialize])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=True)
    ragged = {line.split()[0]: set(line.split()[1:]) for line in out.stdout.splitlines()}
    assert {"total_q"} <= ragged["_attn_fwd_kernel"] and {"total_q", "total_k"} <= ragged["_attn_bwd_dkdv_kernel"]
    assert {"total_q"} <= ragged["_attn_bwd_dq_kernel"] and {"total_q"} <= ragged["_attn_bwd_delta_kernel"]
    for kernel in ("_topk_select_kernel", "_topk_gather_fwd_kernel", "_topk_gather_bwd_kernel",
                   "_tps_logits_kernel", "_tps_combine_kernel", "_tps_bwd_kernel"):
        assert "N" in ragged[kernel], kernel
