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


# ---------------------------------------------------------------------------------------------
# Optional varlen attention backends fail cleanly (issue 14, part 5)


def test_flash_attn_wheel_that_fails_to_import_falls_back_with_the_reason(tmp_path, monkeypatch):
    from bus_kernels import attention_backends

    package = tmp_path / "flash_attn"
    package.mkdir()
    # what a wheel built for another torch does on import
    (package / "__init__.py").write_text(
        "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    attention_backends._package_reason.cache_clear()
    try:
        why = bk.backend_status("cuda")["flash_attn"]
        assert why.startswith("flash_attn is installed but flash_attn.flash_attn_varlen_func fails to import")
        assert "undefined symbol" in why
        q = torch.randn(4, 2, 16, dtype=torch.float16)
        cu = torch.tensor([0, 4], dtype=torch.int32)
        with pytest.raises(BackendNotSupportedError, match="fails to import"):
            select_backend("varlen_attention", torch.device("cuda"), torch.float16, False, backend="flash_attn")
        assert bk.varlen_attention(q, q, q, cu, cu, 4, 4).shape == q.shape  # the dispatcher falls back
    finally:
        attention_backends._package_reason.cache_clear()


def _old_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None):
    raise AssertionError("never called")


def _new_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False):
    return {"scale": scale, "window_size": window_size, "max": (max_q, max_k)}


@pytest.mark.parametrize("fn, reason", [
    (_old_varlen_attn, "varlen_attn lacks scale, window_size"),
    (lambda query, key, *, scale=None, window_size=(-1, -1): None, "lacks 7 positional arguments (has 2)"),
    (_new_varlen_attn, None),
])
def test_torch_varlen_signature_is_checked_before_any_call(monkeypatch, fn, reason):
    from bus_kernels import attention_backends

    monkeypatch.setattr(attention_backends, "_torch_varlen_fn", lambda: fn)
    attention_backends._torch_varlen_reason.cache_clear()
    try:
        why = attention_backends._torch_varlen_reason()
        if reason is None:
            assert why is None
            # the call the adapter makes: scale and FlashAttention's bottom-right causal window
            out = attention_backends._torch_varlen_impl(*[None] * 5, 7, 9, 0.25, True)
            assert out == {"scale": 0.25, "window_size": (-1, 0), "max": (7, 9)}
            out = attention_backends._torch_varlen_impl(*[None] * 5, 7, 9, 0.25, False)
            assert out["window_size"] == (-1, -1)
        else:
            assert reason in why
            assert reason in bk.backend_status("cuda")["torch_varlen"]  # checked before the GPU
    finally:
        attention_backends._torch_varlen_reason.cache_clear()


def test_triton_launches_are_guarded_to_the_tensors_device():
    """Triton launches on the current CUDA device; the launchers switch to the tensors' device first."""
    import contextlib

    from bus_kernels.ops._triton_utils import on_device

    assert isinstance(on_device(torch.empty(1)), contextlib.nullcontext)
    guard = on_device(torch.empty(1, device="meta"))
    assert isinstance(guard, contextlib.nullcontext)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_on_a_gpu_that_is_not_the_current_one():
    available = bk.available_backends("cuda")
    x, s = torch.randn(3, 50, 24), torch.rand(3, 50)
    q, keys = torch.randn(3, 2, 16), torch.randn(3, 50, 2, 16)
    cu = torch.tensor([0, 20, 50], dtype=torch.int32)
    qkv = torch.randn(3, 50, 2, 16)
    torch.cuda.set_device(0)
    for backend in [b for b in ("triton", "native") if b in available]:
        results = []
        for device in ("cuda:0", "cuda:1"):
            tokens = bk.topk_gather(x.to(device), s.to(device), 7, backend=backend).tokens
            scores = bk.text_patch_scores(q.to(device), keys.to(device), backend=backend)
            assert tokens.device == torch.device(device) and scores.device == torch.device(device)
            results.append((tokens.cpu(), scores.cpu()))
        assert all(torch.equal(a, b) for a, b in zip(*results)), backend
    if "triton" in available:
        outs = []
        for device in ("cuda:0", "cuda:1"):
            t = qkv.to(device).requires_grad_(True)
            out = bk.varlen_attention(*t, cu.to(device), cu.to(device), 30, 30, causal=True, backend="triton")
            (grad,) = torch.autograd.grad(out.sum(), t)
            outs.append((out.detach().cpu(), grad.cpu()))
        assert all(torch.equal(a, b) for a, b in zip(*outs))
    assert torch.cuda.current_device() == 0
