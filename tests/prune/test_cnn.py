"""Channel pruning of CNNs: ratios, scopes, rounding, exclusion, saving and ONNX export.

A tiny CNN holds every kind of tie: a residual stream, an inverted block with a depthwise
convolution, and a concatenation feeding a batch norm and a Linear head.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from tiny_models import (
    FULL_PARAMS,
    DataDependent,
    TinyCNN,
    images,
    kept,
    masked,
    n_params,
    tiny_cnn,
)
from torch import nn

import slimkit.prune.cnn  # noqa: F401  (registers ChannelPruneConfig)
from slimkit import serialize
from slimkit.config import validate_config
from slimkit.errors import ConfigError
from slimkit.prune import UntraceableModel, channel_groups, channel_importance
from slimkit.prune.api import prune_
from slimkit.prune.cnn import (
    ChannelPruneConfig,
    group_key,
    kept_channels,
    prune_channels,
    top_channels,
)
from slimkit.quantize.api import transforms_of
from slimkit.registry import handler_for
from slimkit.zoo.mobilenet import MobileNetV2, mobilenet_v2
from slimkit.zoo.models import LoadedModel


def test_the_tiny_cnn_has_the_four_prunable_groups():
    model = tiny_cnn()
    groups = [g for g in channel_groups(model, images()) if g.prunable]
    assert [(group_key(g), g.size) for g in groups] == [("stem.0", 8), ("expand.0", 16), ("branch_a", 4), ("branch_b", 6)]
    assert n_params(model) == FULL_PARAMS


def test_per_group_ratio_keeps_the_highest_l1_channels_and_equals_the_masked_model():
    model, x = tiny_cnn(), images()
    groups = [g for g in channel_groups(model, x) if g.prunable]
    keep = {g: top_channels(channel_importance(model, g, "l1"), kept_channels(g.size, 0.5)) for g in groups}
    reference = masked(model, keep)
    result = handler_for(ChannelPruneConfig())(model, ChannelPruneConfig(ratio=0.5), example_input=x)
    assert kept(model) == {"stem.0": 4, "expand.0": 8, "branch_a": 2, "branch_b": 3}
    # stem 108 + 8, expand 32 + 16, dw 72 + 16, project 32 + 8, a 10, b 111, bn 10, head 30
    assert n_params(model) == 453
    assert model.dw[0].groups == model.dw[0].in_channels == 8 and model.bn.num_features == 5
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-6)
    kept_sizes = result.config.kept
    assert (kept_sizes["dw.0:depthwise"], kept_sizes["head:in"], kept_sizes["stem.1:norm"], kept_sizes["bn:norm"]) == (8, 5, 4, 5)
    # residual stream 7 module dimensions, hidden 5, branches 2 + 2, shared bn and head inputs 2
    assert len(kept_sizes) == 16
    assert result.layers == ["bn", "branch_a", "branch_b", "dw.0", "dw.1", "expand.0", "expand.1", "head",
                             "project.0", "project.1", "stem.0", "stem.1"]


def test_global_scope_cuts_the_group_with_many_weak_channels_hardest():
    model, x = tiny_cnn(), images()
    with torch.no_grad():  # 4 strong hidden channels and 12 nearly dead ones
        for m in (model.expand[0], model.dw[0]):
            m.weight[4:] *= 1e-3
    per_group = copy.deepcopy(model)
    prune_channels(per_group, ChannelPruneConfig(ratio=0.5), example_input=x)
    prune_channels(model, ChannelPruneConfig(ratio=0.5, scope="global"), example_input=x)
    assert kept(per_group)["expand.0"] == 8
    counts = kept(model)
    # 34 channels, floor(0.5 * 34) = 17 removed: the 12 weak hidden ones and 5 others.
    assert counts["expand.0"] == 4 and sum(counts.values()) == 17
    assert all(n >= 1 for n in counts.values())


def test_ratio_per_group_by_any_producer_name():
    model, x = tiny_cnn(), images()
    prune_channels(model, ChannelPruneConfig(ratio={"project.0": 0.5, "re:branch_.*": 0.25}), example_input=x)
    # project.0 writes the residual stream, named stem.0; branch_b loses floor(1.5) = 1
    assert kept(model) == {"stem.0": 4, "expand.0": 16, "branch_a": 3, "branch_b": 5}


def test_ratio_keys_that_name_nothing_or_a_fixed_group_are_all_reported():
    model, x = tiny_cnn(), images()
    with pytest.raises(ConfigError) as err:
        prune_channels(model, ChannelPruneConfig(ratio={"nope": 0.5, "head": 0.5}), example_input=x)
    assert len(err.value.problems) == 2
    assert "'nope' produces no channel group; prunable groups are named like: stem.0, expand.0" in err.value.problems[0]
    assert "'head' names group 'head', which cannot be pruned: they reach the model's output" in err.value.problems[1]
    assert n_params(model) == FULL_PARAMS


def test_round_to_and_min_channels():
    model, x = tiny_cnn(), images()
    prune_channels(model, ChannelPruneConfig(ratio=0.5, round_to=4), example_input=x)
    # 8 -> 4, 16 -> 8, 4 -> 2 rounded up to 4 (whole), 6 -> 3 rounded up to 4
    assert kept(model) == {"stem.0": 4, "expand.0": 8, "branch_a": 4, "branch_b": 4}
    model = tiny_cnn()
    prune_channels(model, ChannelPruneConfig(ratio=0.9, min_channels=3), example_input=x)
    assert kept(model) == {"stem.0": 3, "expand.0": 3, "branch_a": 3, "branch_b": 3}
    # 24 * 0.3 removes 7 of 24: 17 rounds up to 24; 10 of 12 rounds up past 12, so 12
    counts = [kept_channels(24, 0.5, 8), kept_channels(24, 0.3, 8), kept_channels(12, 0.5, 8), kept_channels(12, 0.2, 8), kept_channels(10, 0.95)]
    assert counts == [16, 24, 8, 12, 1]


def test_mobilenet_v2_with_round_to_8_keeps_multiples_of_8():
    model = MobileNetV2(num_classes=10).eval()
    sizes = prune_channels(model, ChannelPruneConfig(ratio=0.4, round_to=8), example_input=images(1, 32)).config.kept
    assert len(sizes) == 136 and all(s % 8 == 0 for s in sizes.values())
    assert model.features[0][0].out_channels == 24 and model.classifier[1].in_features == 768


def test_exclude_leaves_modules_and_their_channels_whole():
    model, x = tiny_cnn(), images()
    prune_channels(model, ChannelPruneConfig(ratio=0.5, exclude=["branch_b"]), example_input=x)
    # branch_b reads the residual stream and writes the second half of the concatenation
    assert kept(model) == {"stem.0": 8, "expand.0": 8, "branch_a": 2, "branch_b": 6}


class HasUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.block = DataDependent()
        self.head = nn.Conv2d(4, 6, 1)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(F.relu(self.head(self.block(self.stem(x)))))


def test_an_untraceable_module_is_named_and_can_be_excluded():
    model, x = HasUntraceable(), images(1, 4)
    with pytest.raises(UntraceableModel, match=r"module 'block' \(DataDependent\).*exclude=\['block'\]"):
        prune_channels(model, ChannelPruneConfig(ratio=0.5), example_input=x)
    result = prune_channels(model, ChannelPruneConfig(ratio=0.5, exclude=["block"]), example_input=x)
    assert result.layers == ["head", "out"] and result.config.kept == {"head:out": 3, "out:in": 3}
    assert model.stem.out_channels == 4


def test_example_input_shape_stands_in_for_the_example_input():
    model = tiny_cnn()
    prune_channels(model, ChannelPruneConfig(ratio=0.5, example_input_shape=[1, 3, 6, 6]))
    assert n_params(model) == 453
    with pytest.raises(ConfigError, match="pass example_input=... or set example_input_shape"):
        prune_channels(tiny_cnn(), ChannelPruneConfig(ratio=0.5))


def test_taylor_scope_prunes_with_calibration_and_a_task_loss():
    model, x = tiny_cnn(), images()
    batches = [(images(4, seed=s), torch.tensor([0, 1, 2, 3])) for s in range(3)]

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    prune_channels(model, ChannelPruneConfig(ratio=0.5, importance="taylor"), example_input=x,
                   calibration=batches, loss_fn=loss_fn)
    assert n_params(model) == 453
    with pytest.raises(ConfigError, match="importance 'taylor' needs calibration batches"):
        prune_channels(tiny_cnn(), ChannelPruneConfig(ratio=0.5, importance="taylor"), example_input=x)


def test_config_validation_reports_every_problem():
    with pytest.raises(ConfigError) as err:
        validate_config(ChannelPruneConfig, {"ratio": 1.2, "importance": "l3", "round_to": 0, "exclud": []})
    assert len(err.value.problems) == 4
    with pytest.raises(ValidationError, match="scope 'global' takes one ratio"):
        ChannelPruneConfig(ratio={"stem.0": 0.5}, scope="global")
    with pytest.raises(ValidationError, match="bad regex"):
        ChannelPruneConfig(ratio={"re:(": 0.5})


# -- saving ---------------------------------------------------------------------------------

def test_a_pruned_tiny_cnn_saves_and_loads_bit_identically(tmp_path):
    model, x = tiny_cnn(), images()
    prune_(model, ChannelPruneConfig(ratio={"stem.0": 0.5, "expand.0": 0.75, "branch_b": 0.5}), example_input=x)
    (record,) = transforms_of(model)
    assert record["config"]["kept"]["expand.0:out"] == 4 and "expand.0" in record["layers"]
    serialize.save(LoadedModel(model, {"kind": "callable", "ref": "tiny_models:tiny_cnn"}, example_inputs=(x,)), tmp_path)
    back = serialize.load(tmp_path)
    assert n_params(back.module) == n_params(model) < FULL_PARAMS
    with torch.no_grad():
        assert torch.equal(back.module(x), model(x))


def test_a_pruned_mobilenet_v2_saves_and_loads_bit_identically(tmp_path):
    torch.manual_seed(0)
    model, x = mobilenet_v2(pretrained=False, num_classes=10), images(2, 32)
    prune_(model, ChannelPruneConfig(ratio=0.5, round_to=8, importance="l2"), example_input=x)
    # A second stage, on the pruned model, is replayed after the first.
    second = prune_(model, ChannelPruneConfig(ratio={"features.1.conv.1": 0.5}), example_input=x)
    assert second.config.kept == {"features.1.conv.1:out": 4, "features.1.conv.2:norm": 4, "features.2.conv.0.0:in": 4}
    serialize.save(LoadedModel(model, model.spec, example_inputs=(x,)), tmp_path)
    back = serialize.load(tmp_path)
    # 588,250 after the first stage; the second removes 16 * 4 + 2 * 4 + 4 * 48 = 264
    assert n_params(back.module) == n_params(model) == 587_986
    with torch.no_grad():
        assert torch.equal(back.module(x), model(x))


def test_replay_resizes_without_tracing_or_scoring():
    model, x = tiny_cnn(), images()
    result = prune_channels(model, ChannelPruneConfig(ratio=0.5), example_input=x)
    fresh = HasNoForward()  # the same modules, but its forward cannot run
    config = result.config.replay_on(result.layers)
    assert prune_channels(fresh, config).layers == result.layers
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        prune_channels(tiny_cnn(), ChannelPruneConfig(kept={"nope:out": 2, "stem.0:out": 9, "stem:out": 2}))
    assert err.value.problems == [
        "'nope': the saved record names a module this model does not have",
        "stem.0:out=9: cannot resize Conv2d 'stem.0' to that",
        "stem:out=2: cannot resize Sequential 'stem' to that",
    ]
    with pytest.raises(ConfigError, match="has no `kept` structure"):
        ChannelPruneConfig().replay_on(["stem.0"])
    with pytest.raises(ValidationError, match="keys are 'module:role'"):
        ChannelPruneConfig(kept={"stem.0": 2})


class HasNoForward(TinyCNN):
    def forward(self, x):
        raise AssertionError("replay must not run the model")


# -- ONNX -----------------------------------------------------------------------------------

def test_a_pruned_mobilenet_v2_exports_to_onnx_and_matches_under_onnx_runtime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from slimkit.deploy.export import ExportConfig, export

    torch.manual_seed(0)
    model, x = mobilenet_v2(pretrained=False, num_classes=10), images(1, 64)
    prune_channels(model, ChannelPruneConfig(ratio=0.5, round_to=8), example_input=x)
    onnx_model = export(LoadedModel(model, model.spec, example_inputs=(x,)), ExportConfig(), workdir=tmp_path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_model.path), options, providers=["CPUExecutionProvider"])
    batch = images(3, 64, seed=2)  # another batch size: the batch axis is dynamic
    (out,) = session.run(None, {"input_0": batch.numpy()})
    with torch.no_grad():
        expected = model(batch)
    # float32 kernels differ in summation order; logits are O(1)
    torch.testing.assert_close(torch.from_numpy(np.asarray(out)), expected, rtol=1e-4, atol=1e-4)
