"""Every bad input to the pruning ops raises TypeError/ValueError naming the argument, on every backend."""

from __future__ import annotations

import pytest
import torch

import bus_kernels as bk
from _bus_testing import cpu_backends


def tps_call(backend, **override):
    args = dict(query=torch.randn(2, 3, 8), keys=torch.randn(2, 5, 3, 8))
    args.update(override)
    return bk.text_patch_scores(args.pop("query"), args.pop("keys"), backend=backend, **args)


@pytest.mark.parametrize("backend", cpu_backends("text_patch_scores"))
@pytest.mark.parametrize(
    "override,error,match",
    [
        (dict(query=torch.randn(2, 24)), ValueError, r"query must have shape \(B, H, D\)"),
        (dict(keys=torch.randn(2, 5, 24)), ValueError, r"keys must have shape \(B, N, H, D\)"),
        (dict(keys=torch.randn(3, 5, 3, 8)), ValueError, r"keys has size 3 in dim 0"),
        (dict(keys=torch.randn(2, 5, 4, 8)), ValueError, r"keys has size 4 in dim 2"),
        (dict(keys=torch.randn(2, 5, 3, 9)), ValueError, r"keys has size 9 in dim 3"),
        (dict(keys=torch.randn(2, 0, 3, 8)), ValueError, r"keys must hold at least one token"),
        (dict(query=torch.ones(2, 3, 8, dtype=torch.int64)), TypeError, r"query must have a floating dtype"),
        (dict(keys=torch.randn(2, 5, 3, 8, dtype=torch.float64)), TypeError, r"keys must have query's dtype"),
        (dict(query=[1.0]), TypeError, r"query must be a torch.Tensor"),
        (dict(keys=torch.randn(2, 5, 3, 8, device="meta")), ValueError, r"keys is on meta but query is on cpu"),
        (dict(scale="big"), TypeError, r"scale must be a float"),
    ],
)
def test_text_patch_scores_bad_inputs(backend, override, error, match):
    with pytest.raises(error, match=match):
        tps_call(backend, **override)


def topk_call(backend, **override):
    args = dict(x=torch.randn(2, 6, 4), scores=torch.rand(2, 6), k=3)
    args.update(override)
    return bk.topk_gather(args.pop("x"), args.pop("scores"), args.pop("k"), backend=backend, **args)


@pytest.mark.parametrize("backend", cpu_backends("topk_gather"))
@pytest.mark.parametrize(
    "override,error,match",
    [
        (dict(x=torch.randn(6, 4)), ValueError, r"x must have shape \(B, N, C\)"),
        (dict(scores=torch.rand(2, 6, 1)), ValueError, r"scores must have shape \(B, N\)"),
        (dict(scores=torch.rand(3, 6)), ValueError, r"scores has size 3 in dim 0"),
        (dict(scores=torch.rand(2, 5)), ValueError, r"scores has size 5 in dim 1"),
        (dict(k=0), ValueError, r"k must be in \[1, 6\], got 0"),
        (dict(k=7), ValueError, r"k must be in \[1, 6\], got 7"),
        (dict(k=2.0), TypeError, r"k must be an int"),
        (dict(x=torch.ones(2, 6, 4, dtype=torch.int32)), TypeError, r"x must have a floating dtype"),
        (dict(scores=torch.ones(2, 6, dtype=torch.int64)), TypeError, r"scores must have a floating dtype"),
        (dict(scores=torch.rand(2, 6, device="meta")), ValueError, r"scores is on meta but x is on cpu"),
        (dict(x=torch.randn(2, 0, 4), scores=torch.rand(2, 0)), ValueError, r"at least one token"),
        (dict(fuse=1), TypeError, r"fuse must be a bool"),
        (dict(x="tokens"), TypeError, r"x must be a torch.Tensor"),
    ],
)
def test_topk_gather_bad_inputs(backend, override, error, match):
    with pytest.raises(error, match=match):
        topk_call(backend, **override)


@pytest.mark.parametrize(
    "k,error,match",
    [
        (torch.tensor([1, 7]), ValueError, r"k must be in \[0, N=6\]"),
        (torch.tensor([-1, 2]), ValueError, r"k must be in \[0, N=6\]"),
        (torch.tensor([1.0, 2.0]), TypeError, r"k must be an integer tensor"),
        (torch.tensor([1, 2, 3]), ValueError, r"k has size 3 in dim 0"),
        (torch.tensor([[1, 2]]), ValueError, r"k must have shape \(B,\)"),
        (3, TypeError, r"k must be a torch.Tensor"),
    ],
)
def test_topk_gather_varlen_bad_k(k, error, match):
    with pytest.raises(error, match=match):
        bk.topk_gather_varlen(torch.randn(2, 6, 4), torch.rand(2, 6), k)


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((torch.rand(2, 6), 0.0, 1, 6), ValueError, r"mass must be in \(0, 1\]"),
        ((torch.rand(2, 6), 1.5, 1, 6), ValueError, r"mass must be in \(0, 1\]"),
        ((torch.rand(2, 6), 0.5, 0, 6), ValueError, r"min_keep must be in \[1, 6\]"),
        ((torch.rand(2, 6), 0.5, 4, 3), ValueError, r"max_keep must be in \[4, 6\]"),
        ((torch.rand(6), 0.5, 1, 6), ValueError, r"scores must have shape \(B, N\)"),
        ((torch.ones(2, 6, dtype=torch.int64), 0.5, 1, 6), TypeError, r"scores must have a floating dtype"),
        ((torch.rand(2, 6), "half", 1, 6), TypeError, r"mass must be a float"),
    ],
)
def test_keep_by_mass_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        bk.keep_by_mass(*args)


def test_is_number_is_the_one_int_or_float_not_bool_check():
    """Issue 25: one predicate (``bus_kernels._validation.is_number``) serves the ops, the patches, the
    model configs, the data and the benchmarks; each still rejects a bool where it wants a number."""
    import numpy as np

    import bus_kernels.patch
    from bus_kernels._validation import is_number
    from bus_model import BusConfig, SelectionConfig
    from bus_model.data.health import ReadMonitor
    from bus_model.data.synthetic_stats import random_keep_loss
    from bus_model.momentum import MomentumModel
    from bus_benchmarks.quality_metrics import time_to_target

    assert [is_number(v) for v in (1, 0.5, np.float64(0.5), -3)] == [True] * 4
    assert [is_number(v) for v in (True, False, None, "1", torch.tensor(1.0), [1])] == [False] * 6
    with pytest.raises(TypeError, match="scale must be a float"):
        tps_call("torch", scale=True)
    with pytest.raises(TypeError, match="mass must be a float"):
        bk.keep_by_mass(torch.rand(2, 5).softmax(1), True, 1, 5)
    with pytest.raises(TypeError, match="keep must"):
        bus_kernels.patch._core.check_options([0], True, "evit", True, 2)
    with pytest.raises(ValueError, match=r"selection\.keep_ratios"):
        BusConfig(selection=SelectionConfig(keep_ratios=(True, 0.7, 0.7))).validate()
    with pytest.raises(ValueError, match="max_skip_share"):
        ReadMonitor(8, max_skip_share=True)
    with pytest.raises(ValueError, match="momentum"):
        MomentumModel(torch.nn.Linear(2, 2), True)
    with pytest.raises(ValueError, match="target"):
        time_to_target([], True)
    with pytest.raises(ValueError, match="keep_ratio"):
        random_keep_loss(4, keep_ratio=True)
