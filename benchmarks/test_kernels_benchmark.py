"""pytest-benchmark suite for the kernels: ``pytest benchmarks/ --benchmark-only`` (not part of the test run).

Same cases and backends as ``bus bench kernels`` (shared harness); each (op, backend) is timed
forward-only and forward+backward. Backends that cannot run here are skipped with their reason.
"""

from __future__ import annotations

import pytest
import torch

from bus_benchmarks.harness import default_device, synchronize
from bus_benchmarks.kernels import attention_case, backends_for, pruning_cases, realistic_lengths

DEVICE = default_device()
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = pruning_cases(8, 576, 768, 12, 64, 0.7, DTYPE, DEVICE)
_attention = attention_case(realistic_lengths(8, 576), 12, 64, DTYPE, DEVICE)
CASES += [_attention] if _attention is not None else []

PARAMS = [
    pytest.param(case, backend, id=f"{case.op}-{backend}",
                 marks=[pytest.mark.skip(reason=why)] if why is not None else [])
    for case in CASES
    for backend, why in backends_for(case.op, DEVICE)
]


def _synced(fn):
    def run():
        out = fn()
        synchronize(DEVICE)
        return out

    return run


@pytest.mark.parametrize("case,backend", PARAMS)
def test_forward(benchmark, case, backend):
    inputs = case.inputs()
    with torch.no_grad():
        benchmark(_synced(lambda: case.forward(backend, inputs)))


@pytest.mark.parametrize("case,backend", PARAMS)
def test_forward_backward(benchmark, case, backend):
    inputs = case.inputs()
    grad = torch.randn_like(case.forward(backend, inputs))
    benchmark(_synced(lambda: torch.autograd.grad(case.forward(backend, inputs), inputs, grad)))
