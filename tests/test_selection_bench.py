"""``bus bench train --policy/--override``: the compared model gets the overrides, its baseline twin not."""

import argparse

import pytest
import torch

from bus_benchmarks import train_speed


def _args(*argv):
    parser = argparse.ArgumentParser()
    train_speed.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_policy_and_override_reach_only_the_compared_model():
    settings = train_speed.settings_from_args(_args("--quick", "--policy", "tome", "--override", "selection__tome_r=2"))
    assert settings.overrides == {"selection__policy": "tome", "selection__tome_r": 2}
    assert train_speed._overrides_for("bus-tiny-baseline", settings) == {}
    model, _ = train_speed.build_model_and_data("bus-tiny", 2, 0, None, torch.device("cpu"),
                                                train_speed._overrides_for("bus-tiny", settings))
    assert (model.config.selection.policy, model.config.selection.tome_r) == ("tome", 2)


def test_bad_overrides_are_clear_errors():
    with pytest.raises(SystemExit, match="--override"):
        train_speed.settings_from_args(_args("--quick", "--override", "novalue"))
    with pytest.raises(SystemExit, match="selection.policy"):
        train_speed.main_from_args(_args("--quick", "--policy", "flip"))
