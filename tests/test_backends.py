"""Dispatch: explicit backend, BUS_KERNELS_BACKEND, preference order, and the rejection reasons."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import bus_kernels as bk
from bus_kernels.backends import BackendNotSupportedError, registered_ops, select_backend

CPU = torch.device("cpu")


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"backend must be one of .*'torch'.*got 'cuda_magic'"):
        bk.topk_gather(torch.randn(1, 4, 2), torch.rand(1, 4), 2, backend="cuda_magic")


def test_backend_must_be_a_string():
    with pytest.raises(TypeError, match="backend must be a str or None"):
        select_backend("topk_gather", CPU, torch.float32, False, backend=3)


def test_requested_backend_that_cannot_take_the_inputs_says_why():
    with pytest.raises(BackendNotSupportedError, match=r"backend 'triton' cannot run topk_gather.*dtype torch.float64"):
        bk.topk_gather(torch.randn(1, 4, 2, dtype=torch.float64), torch.rand(1, 4), 2, backend="triton")


def test_no_backend_error_lists_every_rejection():
    with pytest.raises(BackendNotSupportedError, match=r"no backend can run topk_gather on xpu"):
        select_backend("topk_gather", torch.device("xpu"), torch.float32, False)


def test_meta_tensors_run_on_the_torch_backend():
    """Shape-only runs (FLOP counting of paper-scale models) dispatch to the reference."""
    x, scores = torch.empty(2, 197, 768, device="meta"), torch.empty(2, 197, device="meta")
    tokens, index = bk.topk_gather(x, scores, 137)
    assert tokens.shape == (2, 138, 768) and tokens.device.type == "meta" and index.shape == (2, 137)


def test_default_on_cpu_is_the_first_available_and_never_the_interpreter():
    for op in ("topk_gather", "text_patch_scores"):
        chosen = select_backend(op, CPU, torch.float32, True)
        assert chosen != "triton" and chosen in bk.available_backends("cpu")
        preference = registered_ops()[op]["cpu"]
        assert all(n not in bk.available_backends("cpu") for n in preference[: preference.index(chosen)])
    assert select_backend("text_patch_scores", CPU, torch.float64, False) == "torch"  # only torch takes fp64


def test_env_var_overrides_the_default(monkeypatch):
    if "triton" not in bk.available_backends("cpu"):
        pytest.skip("triton backend unavailable on CPU (needs TRITON_INTERPRET=1)")
    monkeypatch.setenv("BUS_KERNELS_BACKEND", "triton")
    assert select_backend("topk_gather", CPU, torch.float32, True) == "triton"
    # an explicit argument still wins
    assert select_backend("topk_gather", CPU, torch.float32, True, backend="torch") == "torch"


def test_env_var_unknown_name_is_an_error(monkeypatch):
    monkeypatch.setenv("BUS_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        bk.topk_gather(torch.randn(1, 4, 2), torch.rand(1, 4), 2)


def test_available_backends_and_status():
    assert "torch" in bk.available_backends("cpu")
    status = bk.backend_status("cpu")
    assert status["torch"] is None
    assert all(why is None or isinstance(why, str) and why for why in status.values())


def _run(code_or_module: list[str], env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra)
    return subprocess.run([sys.executable, *code_or_module], capture_output=True, text=True, env=env, timeout=300)


def test_triton_on_cpu_without_interpreter_is_rejected_with_reason():
    code = (
        "import torch, bus_kernels as bk\n"
        "try:\n"
        "    bk.topk_gather(torch.randn(1, 4, 2), torch.rand(1, 4), 2, backend='triton')\n"
        "except bk.BackendNotSupportedError as e:\n"
        "    print('REJECTED', e)\n"
    )
    result = _run(["-c", code], {})
    assert "REJECTED" in result.stdout and "TRITON_INTERPRET=1" in result.stdout, result.stderr


def test_info_reports_every_backend():
    result = _run(["-m", "bus_kernels.info"], {"TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr
    for name in bk.backend_status("cpu"):
        assert f"  {name}:" in result.stdout
    assert "topk_gather: cpu: " in result.stdout and "varlen_attention: cpu: " in result.stdout
