"""Dispatch budgets of a training step (issue 22): on a GPU a step costs about (dispatched ops) x (host time
per op) when its kernels are short, so the count is held here, exactly, on CPU.

Counted with ``bus_benchmarks.dispatch_count`` over one step of forward, backward and fused AdamW, batch 2,
bf16 autocast, after a warm-up step; a ``bus::`` op counts once (as its Triton or CUDA kernel call does on a
GPU: the pruning ops run through the native backend here, the kernels' stand-in). Before issue 22:
bus-small 7288, its baseline 6091 (BUS +1197 with this counter). Budgets: at most 4500 for bus-small and at
most 700 more for BUS than for its baseline. The count does not depend on the batch size.
"""

from __future__ import annotations

import pytest
import torch

from bus_benchmarks.dispatch_count import DispatchCounter, count_step_ops
from bus_benchmarks.train_speed import build_model_and_data
from bus_kernels.backends import backend_status

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEP_BUDGET = 4500
BUS_EXTRA_BUDGET = 700


def _kernel_backend() -> str:
    """A backend whose ops are one dispatch each, as on a GPU: native (C++), else Triton's interpreter."""
    status = backend_status("cpu")
    for name in ("native", "triton"):
        if status.get(name) is None:
            return name
    pytest.skip("neither the native build nor the Triton interpreter is available: the bus ops would decompose")


def _step_ops(name: str, batch_size: int = 2, **overrides) -> dict:
    overrides = {"kernel_backend": _kernel_backend(), **overrides}
    model, data = build_model_and_data(name, batch_size, 0, None, torch.device("cpu"), overrides)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return count_step_ops(model, data[0], amp=True, optimizer=optimizer)


@pytest.mark.slow
def test_bus_small_step_within_dispatch_budget():
    bus = _step_ops("bus-small")
    base = _step_ops("bus-small-baseline")
    detail = f"bus-small {bus['total']} {bus['by_part']}; baseline {base['total']} {base['by_part']}"
    assert bus["total"] <= STEP_BUDGET, detail
    assert bus["total"] - base["total"] <= BUS_EXTRA_BUDGET, detail
    # one attention call per layer and step: ViT 12, text 4 (clean and masked captions stacked), fusion 3 x 2
    # (the ITM triplet and MLM rows stacked), decoder 4 x 2, PAD 2 x 2 (BUS only)
    sdpa = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert bus["by_op"][sdpa] == 12 + 4 + 6 + 8 + 4 and base["by_op"][sdpa] == 12 + 4 + 6 + 8, detail


def test_stacked_passes_run_each_tower_once():
    """bus-tiny: the text encoder and the fusion encoder each run once per step (the stacked rows), so
    their forward calls are counted once; PAD once. Measured by forward hooks, not by totals."""
    model, data = build_model_and_data("bus-tiny", 3, 0, None, torch.device("cpu"))
    calls = {name: 0 for name in ("text_encoder", "fusion", "pad", "decoder")}
    for name in calls:
        getattr(model, name).register_forward_hook(lambda *_a, n=name: calls.__setitem__(n, calls[n] + 1))
    images, ids, mask, labels = data[0]
    out = model(images, ids, mask, labels)
    assert calls["text_encoder"] == 1 and calls["fusion"] == 1 and calls["pad"] == 1 and calls["decoder"] <= 1, calls
    assert {"itc", "itm", "mlm"} <= set(out.losses)


def test_step_count_is_the_same_at_another_batch_size():
    small = _step_ops("bus-tiny", batch_size=2)
    larger = _step_ops("bus-tiny", batch_size=5)
    assert small["total"] == larger["total"], (small["by_part"], larger["by_part"])


def test_counter_charges_backward_to_the_forward_part():
    model, data = build_model_and_data("bus-tiny", 2, 0, None, torch.device("cpu"))
    with DispatchCounter(model) as counter:
        model(*data[0]).loss.backward()
    parts = counter.by_part
    for part in ("ViT", "text tower", "fusion encoder", "PAD", "decoder", "losses", "selection"):
        assert parts[part] > 0, dict(parts)
    # every backward op of the ViT's linear layers is charged to it: mm calls come in forward + 2 backward
    vit_mm = counter.by_part_op["ViT", "aten::mm"] + counter.by_part_op["ViT", "aten::addmm"]
    assert vit_mm >= 3 * 4 * model.config.vision.depth, dict(counter.by_part_op)
