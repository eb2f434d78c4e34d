"""Host syncs of a training step (issue 14 part 3), counted on CPU with ``bus_benchmarks.host_syncs.SyncCounter``.

Budgets per forward + backward of bus-small (batch 2, fresh batch tensors, after a warm-up step):
fixed-ratio selection with sdpa 0 (baseline too); ``attn_impl="varlen"`` at most 2 (the packed sizes
of the text masks: one read for the caption and decoder masks, one for the ITM batch of mined
negatives); ``keep_mode="mass"`` at most one per selection layer (the ragged kept counts size the
packed tokens), plus the 2 of varlen when both are on. Before this work the same counter read 12 / 64
/ 36 / 117 (sdpa / varlen / mass / mass+varlen).
"""

from __future__ import annotations

import pytest
import torch

from bus_benchmarks.host_syncs import SyncCounter, step_sync_counts
from bus_kernels.backends import backend_status
from bus_model import create_model, get_config
from bus_model.packing import packing, prepack, register_host_lengths

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# the counter itself


def test_counter_sees_every_kind_of_host_read():
    x = torch.arange(6.0)
    with SyncCounter() as c:
        x.sum().item()
        int(x.max())
        bool(x[0] > 1)
        x.tolist()
        x.nonzero()
        x[x > 2]
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 0, 2]))
    assert c.counts["_local_scalar_dense"] == 3  # item, int, bool (+ the repeats' sizes below are not reads)
    assert c.counts["Tensor.tolist"] == 1
    assert c.counts["nonzero"] == 1
    assert c.counts["index"] == 1  # boolean-mask indexing
    assert c.counts["repeat_interleave"] == 1
    assert c.total == 7 and c.issue_metric == 4


def test_counter_ignores_ops_that_do_not_sync_and_restores_tolist():
    x = torch.randn(4, 5)
    before = torch.Tensor.tolist
    with SyncCounter() as c:
        y = torch.sort(x, dim=1, stable=True).indices
        torch.repeat_interleave(torch.arange(2), torch.tensor([2, 1]), output_size=3)
        x.masked_fill(x > 0, 0.0).sum(1).cumsum(0)
        x[torch.tensor([0, 2])]  # integer indexing: output size known
        y.index_select(0, torch.tensor([1]))
    assert c.total == 0, c.counts
    assert torch.Tensor.tolist is before and "tolist" not in torch.Tensor.__dict__
    assert x.tolist()  # still works after the counter


# ---------------------------------------------------------------------------------------------
# packing: one host read per mask, none when the sizes are registered, results equal nonzero's


def _reference_packing(mask):
    lengths = mask.sum(1)
    cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return mask.reshape(-1).nonzero().squeeze(1), cu, int(lengths.max())


@pytest.mark.parametrize("shape", [(3, 7), (5, 1), (1, 33)])
def test_packing_matches_nonzero_and_reads_the_host_once(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(*shape, generator=gen) < 0.6
    mask[0, 0] = True
    with SyncCounter() as c:
        flat, cu, max_len = packing(mask, *shape, mask.device)
        again = packing(mask, *shape, mask.device)  # the same mask object: cached
    ref_flat, ref_cu, ref_max = _reference_packing(mask)
    assert torch.equal(flat, ref_flat) and torch.equal(cu, ref_cu) and max_len == ref_max
    assert again[0] is flat and c.total == 1
    mask[0, 0] = False  # an in-place change invalidates the cached packing
    assert torch.equal(packing(mask, *shape, mask.device)[0], _reference_packing(mask)[0])


def test_registered_and_prepacked_sizes_need_no_read():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    other = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    third = torch.tensor([[1, 1, 1]], dtype=torch.bool)
    register_host_lengths(mask, 5, 3)
    with SyncCounter() as c:
        flat, cu, max_len = packing(mask, 2, 4, mask.device)
    assert c.total == 0 and max_len == 3 and flat.tolist() == [0, 1, 4, 5, 6] and cu.tolist() == [0, 2, 5]
    with SyncCounter() as c:
        prepack(other, third, None)
        packing(other, 2, 2, other.device)
        packing(third, 1, 3, third.device)
    assert c.total == 1
    assert packing(other, 2, 2, other.device)[2] == 2 and packing(third, 1, 3, third.device)[0].tolist() == [0, 1, 2]


def test_dense_rows_are_not_gathered():
    flat, cu, max_len = packing(None, 3, 4, torch.device("cpu"))
    assert flat is None and cu.tolist() == [0, 4, 8, 12] and max_len == 4


# ---------------------------------------------------------------------------------------------
# the model's budgets


def _native_or_skip():
    why = backend_status("cpu")["native"]
    if why is not None:
        pytest.skip(f"the mass budget is for the compiled kernels (native on CPU, triton on GPU): native: {why}")


def _syncs(name: str, **overrides) -> dict:
    from bus_benchmarks.selftest_perf import _build

    model, data = _build(name, overrides, 2, torch.device("cpu"))
    return step_sync_counts(model, data[0])


SELECTION_LAYERS = len(get_config("bus-small").selection.layers)


@pytest.mark.slow
@pytest.mark.parametrize("name,overrides,budget", [
    ("bus-small", {}, 0),
    ("bus-small-baseline", {}, 0),
    ("bus-small", {"attn_impl": "varlen"}, 2),
    ("bus-small-baseline", {"attn_impl": "varlen"}, 2),
    ("bus-small", {"selection": {"keep_mode": "mass"}, "kernel_backend": "native"}, SELECTION_LAYERS),
    # + 1: with the caption-free ITC pass stacked onto the guided rows (losses.itc_image="text_free"), the guided
    # half's mask is a slice of the stacked one, whose packed size PAD reads once
    ("bus-small", {"selection": {"keep_mode": "mass"}, "attn_impl": "varlen", "kernel_backend": "native"},
     SELECTION_LAYERS + 3),
], ids=["sdpa", "baseline", "varlen", "baseline-varlen", "mass", "mass-varlen"])
def test_training_step_sync_budget(name, overrides, budget):
    if overrides.get("kernel_backend") == "native":
        _native_or_skip()
    counts = _syncs(name, **overrides)
    assert counts["total"] <= budget, counts["by_op"]


def test_input_value_checks_are_opt_in_and_one_read():
    model = create_model("bus-tiny", kernel_backend="torch")
    ids = torch.randint(5, 100, (2, 8))
    ids[:, 0] = model.config.text.cls_token_id
    mask = torch.ones(2, 8, dtype=torch.int64)
    with SyncCounter() as c:
        model._check_text(ids, mask, 2)
    assert c.total == 0
    model.check_input_values = True
    with SyncCounter() as c:
        model._check_text(ids, mask, 2)
    assert c.total == 1
    bad = mask.clone()
    bad[1, 0] = 0
    with pytest.raises(ValueError, match=r"position 0"):
        model._check_text(ids, bad, 2)
    with pytest.raises(ValueError, match="only 0 and 1"):
        model._check_text(ids, mask * 2, 2)


def test_topk_gather_varlen_range_check_is_one_read_and_can_be_skipped():
    import bus_kernels

    x, scores, k = torch.randn(3, 9, 4), torch.rand(3, 9), torch.tensor([2, 0, 9])
    with SyncCounter() as checked:
        out = bus_kernels.topk_gather_varlen(x, scores, k, backend="torch")
    with SyncCounter() as unchecked:
        same = bus_kernels.topk_gather_varlen(x, scores, k, backend="torch", check_k=False)
    assert torch.equal(out.tokens, same.tokens) and out.max_seqlen == same.max_seqlen == 10
    assert checked.counts["Tensor.tolist"] == unchecked.counts["Tensor.tolist"] + 1
    with pytest.raises(ValueError, match="k must be in"):
        bus_kernels.topk_gather_varlen(x, scores, torch.tensor([2, -1, 3]))
    with pytest.raises(TypeError, match="check_k"):
        bus_kernels.topk_gather_varlen(x, scores, k, check_k=1)


def test_block_table_is_built_once_per_offsets_tensor():
    from bus_kernels.ops.varlen_attention import tiles

    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    first = tiles._block_table(cu, 12, 4)
    assert tiles._block_table(cu, 12, 4) is first  # cached
    expected = tiles._build_block_table(cu.clone(), 12, 4)
    assert all(torch.equal(a, b) for a, b in zip(first, expected))
    cu[2] = 7  # changed in place: rebuilt
    rebuilt = tiles._block_table(cu, 12, 4)
    assert rebuilt is not first and all(torch.equal(a, b) for a, b in zip(rebuilt, tiles._build_block_table(cu, 12, 4)))
    assert tiles._block_table(cu, 12, 8) is not rebuilt  # another tile size: its own table
    key = id(cu)
    del cu, first, rebuilt, expected
    assert key not in tiles._OFFSETS  # the entry dies with its offsets


def test_dense_offsets_are_shared():
    a = packing(None, 4, 9, torch.device("cpu"))[1]
    assert packing(None, 4, 9, torch.device("cpu"))[1] is a and a.tolist() == [0, 9, 18, 27, 36]
