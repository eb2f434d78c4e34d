"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed), without spills."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


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
    kernels = {r["name"].split()[0] for r in rows}
    assert {"topk_select", "topk_gather_fwd", "topk_gather_bwd", "tps_logits", "tps_bwd", "tps_combine"} <= kernels
    dtypes = {r["name"].split()[1] for r in rows}
    assert {"fp16", "bf16", "fp32"} <= dtypes


def test_aot_refuses_to_run_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "bus_kernels.aot"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and "unset TRITON_INTERPRET" in result.stderr
