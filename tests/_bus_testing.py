"""Shared test parametrisation: every backend registered for an op, skipped with the reason where it
cannot run here, on CPU and -- when this machine has CUDA -- on the GPU. Test files import this instead
of listing backends themselves, so a backend that registers later (e.g. "native") is covered by the
same tests.

On a CUDA machine the op tests also run every Triton and native kernel on the GPU (marked ``cuda``) in
fp32, fp16 and bf16 against the float64 CPU reference. Low-precision results are judged as
FlashAttention's tests judge them: the kernel's error against float64 may be at most twice the error
of the same math run by PyTorch in that precision, plus one unit in the last place at the result's
scale (``assert_low_precision_close``). On a CPU-only machine the tests and their ids are unchanged.
"""

from __future__ import annotations

import pytest
import torch

from bus_kernels.backends import backend_status, registered_backends

HAS_CUDA = torch.cuda.is_available()
# Kernels that run on the GPU (the "torch" backend is the reference, not a kernel under test).
CUDA_KERNEL_BACKENDS = ("triton", "native")
# dtypes of the op tests: bf16 only where it runs compiled (the Triton interpreter gets bf16 wrong;
# native bf16 on CPU has its own tests in test_native.py)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
LOW_DTYPES = [torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def cpu_backends(op: str) -> list:
    """pytest params, one per backend implementing ``op``; unavailable ones skip with their reason."""
    status = backend_status("cpu")
    params = []
    for name, backend in registered_backends().items():
        if op not in backend.ops:
            continue
        why = status[name]
        marks = [pytest.mark.skip(reason=f"{name}: {why}")] if why is not None else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def device_backends(op: str) -> list:
    """pytest params ``(backend, device)``: the CPU backends of ``cpu_backends`` (same ids), then, on a
    machine with CUDA, each Triton/native kernel on ``"cuda"`` (id ``"<name>-cuda"``, marked ``cuda``),
    skipped with the reason when it cannot run there (e.g. the native extension was not built)."""
    params = [pytest.param((p.values[0], "cpu"), id=p.id, marks=p.marks) for p in cpu_backends(op)]
    if HAS_CUDA:
        status = backend_status("cuda")
        for name in CUDA_KERNEL_BACKENDS:
            backend = registered_backends().get(name)
            if backend is None or op not in backend.ops:
                continue
            marks = [pytest.mark.cuda]
            if status[name] is not None:
                marks.append(pytest.mark.skip(reason=f"{name} on cuda: {status[name]}"))
            params.append(pytest.param((name, "cuda"), id=f"{name}-cuda", marks=marks))
    return params


def skip_unless_supported(backend: str, device: str, dtype: torch.dtype) -> None:
    """Skip a (backend, device, dtype) combination the backend does not take or that is not tested here."""
    if dtype not in registered_backends()[backend].dtypes:
        pytest.skip(f"{backend} does not take {dtype}")
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 is tested on CUDA (and for the native CPU kernels in test_native.py)")


def backend_dtypes(name: str, candidates=(torch.float32, torch.float16)) -> list[torch.dtype]:
    return [d for d in candidates if d in registered_backends()[name].dtypes]


def tolerance(dtype: torch.dtype) -> dict:
    return {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
            torch.float64: dict(atol=1e-10, rtol=1e-9)}[dtype]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, compared on the CPU in float64 (0 for empty tensors)."""
    return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item() if a.numel() else 0.0


def assert_low_precision_close(actual: torch.Tensor, expected64: torch.Tensor, low: torch.Tensor,
                               dtype: torch.dtype, what: str = "", ulps: float = 1.0) -> None:
    """FlashAttention's criterion: ``|actual - ref| <= 2 |low - ref| + ulps * eps(dtype) * scale``.

    ``expected64`` is the float64 reference, ``low`` the same math run by PyTorch in ``dtype`` (its
    error is what that precision costs anyway), ``scale = max(1, max |ref|)``.
    """
    assert actual.shape == expected64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    err, low_err = max_err(actual, expected64), max_err(low, expected64)
    scale = max(1.0, expected64.abs().max().item()) if expected64.numel() else 1.0
    bound = 2 * low_err + ulps * torch.finfo(dtype).eps * scale
    assert err <= bound, f"{what}: error {err:.3g} > 2 x {low_err:.3g} (torch in {dtype}) + {ulps} ulp x {scale:.3g}"
