"""Sensitivity of channel groups, exact cost polynomials, and ratios chosen for a budget.

(Named test_channel_sensitivity.py: tests/quantize/test_sensitivity.py already takes the
module name test_sensitivity, and the test folders are not packages.)
"""

from __future__ import annotations

import base64

import pytest
import torch
from tiny_models import FULL_PARAMS, KEYS, images, kept, n_params, tiny_cnn

import slimkit.prune.cnn  # noqa: F401  (registers ChannelPruneConfig)
from slimkit.errors import ConfigError
from slimkit.prune.cnn import ChannelPruneConfig, prune_channels
from slimkit.prune.sensitivity import channel_costs, channel_sensitivity, cost_of, ratios_for_budget
from slimkit.report.sensitivity import sensitivity_plot

RATIOS = (0.25, 0.5, 0.75)


def positive_cnn():
    """The tiny CNN with every weight, shift and input non-negative, so that every
    activation is positive and removing more channels can only move the output further:
    its sensitivity curves must fall strictly."""
    model = tiny_cnn()
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.zero_()
    return model


def fidelity():
    """A deterministic metric: minus the mean squared distance to the unpruned outputs."""
    x = torch.rand(8, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = positive_cnn()(x)

    def evaluate(model):
        with torch.no_grad():
            return -float((model(x) - reference).square().mean())

    return evaluate


@pytest.fixture(scope="module")
def sensitivity():
    return channel_sensitivity(positive_cnn(), images(), fidelity(), RATIOS)


def test_sensitivity_has_one_curve_per_group_and_falls_as_the_ratio_rises(sensitivity):
    s = sensitivity
    assert s["baseline"] == 0.0 and s["ratios"] == list(RATIOS) and s["higher_is_better"]
    assert list(s["groups"]) == KEYS
    assert {k: (g["size"], g["kept"]) for k, g in s["groups"].items()} == {
        "stem.0": (8, [6, 4, 2]), "expand.0": (16, [12, 8, 4]), "branch_a": (4, [3, 2, 1]), "branch_b": (6, [5, 3, 2]),
    }
    for g in s["groups"].values():
        m = g["metric"]
        assert len(m) == 3 and 0 > m[0] > m[1] > m[2], m


def test_sensitivity_leaves_the_model_alone_and_measures_only_chosen_groups():
    model = tiny_cnn()
    calls = []

    def evaluate(m):
        calls.append(n_params(m))
        return 1.0

    s = channel_sensitivity(model, images(), evaluate, (0.1, 0.2, 0.5), groups=["branch_b"])
    assert list(s["groups"]) == ["branch_b"] and s["groups"]["branch_b"]["kept"] == [6, 5, 3]
    # baseline, then 5 and 3 channels; ratio 0.1 removes floor(0.6) = 0 channels and is not evaluated
    assert calls == [FULL_PARAMS, FULL_PARAMS - 8 * 9 - 1 - 2 - 5, FULL_PARAMS - 3 * (8 * 9 + 1 + 2 + 5)]
    assert n_params(model) == FULL_PARAMS
    with pytest.raises(ConfigError) as err:
        channel_sensitivity(model, images(), evaluate, (0.0, 1.0), groups=["head"], importance="l3")
    assert len(err.value.problems) == 3


def test_costs_are_exact_polynomials_of_the_kept_channels():
    model, x = tiny_cnn(), images()
    params = channel_costs(model, x)
    macs = channel_costs(model, x, "macs")
    assert params["total"] == FULL_PARAMS and params["sizes"] == {"stem.0": 8, "expand.0": 16, "branch_a": 4, "branch_b": 6}
    # per 6x6 example: stem 3*8*9*36, expand 8*16*36, dw 16*9*36, project 16*8*36, a 8*4*36, b 8*6*9*36, head 10*5
    assert macs["total"] == 7776 + 4608 + 5184 + 4608 + 1152 + 15552 + 50 == 38930
    half = {"stem.0": 4, "expand.0": 8, "branch_a": 2, "branch_b": 3}
    assert cost_of(params, half) == 453
    assert cost_of(macs, half) == 3888 + 1152 + 2592 + 1152 + 288 + 3888 + 25 == 12985
    prune_channels(model, ChannelPruneConfig(ratio={"stem.0": 0.5, "branch_b": 0.5}), example_input=x)
    assert n_params(model) == cost_of(params, {"stem.0": 4, "branch_b": 3}) == 645


@pytest.mark.parametrize("target", [0.8, 0.6, 0.35])
def test_ratios_for_budget_meet_the_parameter_target_exactly(sensitivity, target):
    model, x = tiny_cnn(), images()
    costs = channel_costs(model, x)
    plan = ratios_for_budget(sensitivity, costs, target)
    assert plan["total"] == FULL_PARAMS and plan["budget"] == target * FULL_PARAMS
    assert plan["cost"] <= plan["budget"]
    prune_channels(model, ChannelPruneConfig(ratio=plan["ratios"]), example_input=x)
    assert kept(model) == plan["kept"]
    assert n_params(model) == plan["cost"]
    # As close as channel granularity allows: keeping one more channel of any pruned
    # group would exceed the budget.
    for key, n in plan["kept"].items():
        if key in plan["ratios"]:
            assert cost_of(costs, {**plan["kept"], key: n + 1}) > plan["budget"]


def test_ratios_for_budget_pick_the_cheapest_losses_and_refuse_the_impossible(sensitivity):
    costs = channel_costs(tiny_cnn(), images())
    plan = ratios_for_budget(sensitivity, costs, 0.8)
    # 253 of 1261 parameters must go. A quarter of the residual stream (2 channels of 121
    # parameters each) and one channel of branch_a (16) lose the least metric; halving the
    # hidden layer instead would save 232 for a larger loss.
    assert plan["kept"] == {"stem.0": 6, "expand.0": 16, "branch_a": 3, "branch_b": 6}
    assert plan["cost"] == 1261 - 2 * 121 - 16 + 2 == 1005  # the two channels meet in branch_a's weight
    groups = sensitivity["groups"]
    assert plan["metric_loss"] == pytest.approx(-groups["stem.0"]["metric"][0] - groups["branch_a"]["metric"][0])
    with pytest.raises(ConfigError, match=r"target: 0.05 cannot be met by the measured ratios; the most they remove leaves 0\.\d+ of the params"):
        ratios_for_budget(sensitivity, costs, 0.05)
    with pytest.raises(ConfigError, match="in \\(0, 1\\]"):
        ratios_for_budget(sensitivity, costs, 1.5)


def test_the_sensitivity_plot_is_a_png_data_uri(sensitivity):
    uri = sensitivity_plot(sensitivity, highlight=2)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert sensitivity_plot({"groups": {}, "ratios": []}).startswith("data:image/png;base64,")
