"""Channel groups and shrinking, on tiny seeded CNNs.

The strongest check is masking equivalence: removing channels must give exactly the
outputs of the original model with those channels zeroed (their producing filters,
biases and batch-norm affine parameters set to zero), for every kind of tie.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import DataDependent, masked, randomise_bn
from torch import nn

from slimkit.errors import ConfigError, LayerSelectionError
from slimkit.prune import ChannelGroup, Member, UntraceableModel, channel_groups, shrink_
from slimkit.zoo.mobilenet import InvertedResidual, MobileNetV2


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_masking_equivalence(model, x, keep, atol=1e-6):
    reference = masked(model, keep)
    shrink_(model, keep)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=atol)


def roles(group: ChannelGroup) -> list[tuple[str, str, int]]:
    return [(m.module, m.role, m.offset) for m in group.members]


def seeded_input(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- a plain conv-bn-relu chain ----------------------------------------------------------

def chain():
    torch.manual_seed(0)
    return randomise_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(16, 10),
    ))


def test_chain_groups_tie_conv_outputs_to_bn_and_the_next_inputs():
    groups = channel_groups(chain(), seeded_input(2, 3, 8, 8))
    assert [g.size for g in groups] == [3, 8, 16, 10]
    assert [g.prunable for g in groups] == [False, True, True, False]
    assert roles(groups[1]) == [("0", "out", 0), ("1", "norm", 0), ("3", "in", 0)]
    assert roles(groups[2]) == [("3", "out", 0), ("4", "norm", 0), ("9", "in", 0)]
    assert groups[0].reasons == ("they are the model's input channels",)
    assert groups[3].reasons == ("they reach the model's output",)
    assert groups[1].members[0] == Member("0", "out", 0, 1, 8)


def test_keeping_every_channel_changes_nothing():
    model, x = chain(), seeded_input(2, 3, 8, 8)
    before = model(x)
    groups = channel_groups(model, x)
    assert shrink_(model, {g: torch.arange(g.size) for g in groups if g.prunable}) == []
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_chain_shrinks_to_a_dense_model_equal_to_the_masked_one():
    model, x = chain(), seeded_input(2, 3, 8, 8)
    groups = channel_groups(model, x)
    keep = {groups[1]: torch.tensor([7, 0, 2, 3]), groups[2]: torch.arange(1, 11)}
    assert_masking_equivalence(model, x, keep)
    # conv 3->4 with bias, bn 4, conv 4->10, bn 10, linear 10->10
    assert n_params(model) == (3 * 4 * 9 + 4) + 2 * 4 + 4 * 10 * 9 + 2 * 10 + (10 * 10 + 10) == 610
    assert (model[0].out_channels, model[1].num_features, model[3].in_channels, model[9].in_features) == (4, 4, 4, 10)
    assert model[1].running_mean.shape == (4,) and model[4].running_var.shape == (10,)


def test_analysis_leaves_the_model_untouched():
    model = chain().train()
    stats = model[1].running_mean.clone()
    channel_groups(model, seeded_input(4, 3, 8, 8))
    assert model.training and model[1].training
    torch.testing.assert_close(model[1].running_mean, stats, rtol=0, atol=0)
    assert int(model[1].num_batches_tracked) == 0


# -- a residual block ----------------------------------------------------------------------

class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out = F.relu(out + x)
        return self.head(out.mean((2, 3)))


def test_residual_addition_ties_both_producers_into_one_group():
    torch.manual_seed(0)
    model, x = randomise_bn(Residual()), seeded_input(2, 3, 6, 6)
    groups = channel_groups(model, x)
    stream = next(g for g in groups if ("stem.0", "out", 0) in roles(g))
    assert sorted(roles(stream)) == sorted([
        ("stem.0", "out", 0), ("stem.1", "norm", 0), ("conv1", "in", 0), ("conv2", "out", 0), ("bn2", "norm", 0), ("head", "in", 0),
    ])
    inner = next(g for g in groups if any(m.module == "conv1" and m.role == "out" for m in g.members))
    assert (stream.size, inner.size, stream.prunable, inner.prunable) == (8, 12, True, True)
    keep = {stream: torch.tensor([1, 2, 5]), inner: torch.tensor([0, 3, 4, 6, 11])}
    assert_masking_equivalence(model, x, keep)
    # stem 3->3 + bn, conv1 3->5 + bn, conv2 5->3 + bn, head 3->5
    assert n_params(model) == 3 * 3 * 9 + 6 + 3 * 5 * 9 + 10 + 5 * 3 * 9 + 6 + 3 * 5 + 5 == 393


# -- MobileNetV2's inverted residual: depthwise-separable --------------------------------

class InvertedBlockNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.block = InvertedResidual(8, 8, stride=1, expansion=4)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.block(self.stem(x)), 1), 1))


def test_depthwise_convolution_passes_its_channels_through():
    torch.manual_seed(0)
    model, x = randomise_bn(InvertedBlockNet()), seeded_input(2, 3, 6, 6)
    groups = channel_groups(model, x)
    hidden = next(g for g in groups if g.size == 32)
    assert roles(hidden) == [
        ("block.conv.0.0", "out", 0), ("block.conv.0.1", "norm", 0), ("block.conv.1.0", "depthwise", 0),
        ("block.conv.1.1", "norm", 0), ("block.conv.2", "in", 0),
    ]
    stream = next(g for g in groups if g.size == 8)
    assert {m.module for m in stream.members} == {"stem.0", "stem.1", "block.conv.0.0", "block.conv.2", "block.conv.3", "head"}
    keep = {hidden: torch.arange(0, 32, 4), stream: torch.tensor([0, 1, 2, 3, 4, 6])}
    assert_masking_equivalence(model, x, keep)
    dw = model.block.conv[1][0]
    assert (dw.in_channels, dw.out_channels, dw.groups, tuple(dw.weight.shape)) == (8, 8, 8, (8, 1, 3, 3))
    # stem 3->6 + bn, expand 6->8 + bn, depthwise 8 + bn, project 8->6 + bn, head 6->4
    assert n_params(model) == 3 * 6 * 9 + 12 + 6 * 8 + 16 + 8 * 9 + 16 + 8 * 6 + 12 + 6 * 4 + 4 == 414


# -- concatenation --------------------------------------------------------------------------

class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        return self.c(F.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1))))


def test_concatenation_gives_each_branch_an_offset_into_the_consumer():
    torch.manual_seed(0)
    model, x = randomise_bn(Concat()), seeded_input(2, 3, 5, 5)
    groups = channel_groups(model, x)
    a = next(g for g in groups if ("a", "out", 0) in roles(g))
    b = next(g for g in groups if ("b", "out", 0) in roles(g))
    assert roles(a) == [("a", "out", 0), ("bn", "norm", 0), ("c", "in", 0)]
    assert roles(b) == [("b", "out", 0), ("bn", "norm", 4), ("c", "in", 4)]
    assert_masking_equivalence(model, x, {a: torch.tensor([3]), b: torch.tensor([0, 2, 5])})
    assert model.c.weight.shape == (5, 4, 1, 1) and model.bn.num_features == 4
    # a 3->1, b 3->3 (3x3), bn 4, c 4->5
    assert n_params(model) == 3 + 1 + 27 * 3 + 3 + 8 + 20 + 5 == 121


# -- flatten before a Linear ----------------------------------------------------------------

class FlattenHead(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 3 * 3, 7)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)  # [N, 4, 3, 3]
        if self.how == "flatten":
            x = torch.flatten(x, 1)
        elif self.how == "view":
            x = x.view(x.size(0), -1)
        else:
            x = x.view(-1, 36)
        return self.fc(x)


@pytest.mark.parametrize("how", ["flatten", "view"])
def test_flatten_maps_each_channel_to_a_block_of_features(how):
    torch.manual_seed(0)
    model, x = FlattenHead(how), seeded_input(2, 3, 8, 8)
    groups = channel_groups(model, x)
    conv = groups[1]
    assert conv.members == (Member("conv", "out", 0, 1, 4), Member("fc", "in", 0, 9, 36))
    assert_masking_equivalence(model, x, {conv: torch.tensor([0, 3])})
    assert model.fc.weight.shape == (7, 18)
    assert n_params(model) == 2 * 27 + 2 + 7 * 18 + 7 == 189


def test_a_literal_reshape_size_is_not_pruned_and_says_how_to_write_it():
    groups = channel_groups(FlattenHead("literal"), seeded_input(2, 3, 8, 8))
    assert not groups[1].prunable
    assert "write x.flatten(1) or x.view(x.size(0), -1)" in groups[1].reasons[0]


# -- ties through a reused module, and a squeeze-excitation product -------------------------

class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(self.c(F.relu(self.c(self.stem(x)))))


def test_a_module_called_twice_ties_its_input_and_output_channels():
    torch.manual_seed(0)
    model, x = Reused(), seeded_input(1, 3, 5, 5)
    groups = channel_groups(model, x)
    tied = [g for g in groups if g.prunable]
    assert len(tied) == 1 and sorted(roles(tied[0])) == [("c", "in", 0), ("c", "out", 0), ("head", "in", 0), ("stem", "out", 0)]
    assert_masking_equivalence(model, x, {tied[0]: torch.tensor([1, 4])})
    assert model.c.weight.shape == (2, 2, 3, 3)


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.reduce = nn.Conv2d(8, 2, 1)
        self.expand = nn.Conv2d(2, 8, 1)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x = F.relu(self.conv(x))
        scale = torch.sigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))
        return self.out(x * scale)


def test_a_channel_wise_product_ties_the_gate_to_the_features():
    torch.manual_seed(0)
    model, x = SqueezeExcite(), seeded_input(2, 3, 4, 4)
    groups = channel_groups(model, x)
    features = next(g for g in groups if ("conv", "out", 0) in roles(g))
    assert sorted(roles(features)) == [("conv", "out", 0), ("expand", "out", 0), ("out", "in", 0), ("reduce", "in", 0)]
    # A zeroed gate channel is sigmoid(0) = 0.5, not 0, but the feature it scales is 0.
    assert_masking_equivalence(model, x, {features: torch.tensor([0, 5, 6])})
    assert n_params(model) == 3 * 3 * 9 + 3 + 3 * 2 + 2 + 2 * 3 + 3 + 3 * 3 + 3 == 113


# -- what is left alone, and why -----------------------------------------------------------

class Awkward(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.split_src = nn.Conv2d(8, 6, 1)
        self.scaled = nn.Conv2d(3, 4, 1)
        self.scale = nn.Parameter(torch.ones(1, 4, 1, 1))
        self.tail = nn.Conv2d(3 + 4, 2, 1)

    def forward(self, x):
        y = self.split_src(self.grouped(self.stem(x)))
        a, _ = torch.chunk(y, 2, dim=1)
        z = self.scaled(x) * self.scale
        return self.tail(torch.cat([a, z], dim=1))


def test_grouped_convolutions_unknown_ops_and_untracked_operands_fix_their_groups():
    torch.manual_seed(0)
    groups = channel_groups(Awkward(), seeded_input(1, 3, 4, 4))
    by_producer = {m.module: g for g in groups for m in g.members if m.role == "out"}
    assert by_producer["stem"].reasons == ("they pass the grouped convolution 'grouped' (groups=2), whose channels are not pruned",)
    assert by_producer["grouped"].reasons == by_producer["stem"].reasons
    assert by_producer["split_src"].reasons == ("they flow into chunk, which the channel analysis does not follow",)
    assert "with a tensor the analysis cannot follow (scale)" in by_producer["scaled"].reasons[0]
    assert not any(g.prunable for g in groups)


def test_shrinking_a_fixed_group_or_bad_indices_reports_every_problem():
    model, x = chain(), seeded_input(2, 3, 8, 8)
    groups = channel_groups(model, x)
    with pytest.raises(ConfigError) as err:
        shrink_(model, {groups[0]: [0], groups[1]: [0, 0], groups[2]: [], groups[3]: [2]})
    assert len(err.value.problems) == 4
    assert "group #0 (3 channels) cannot be shrunk: they are the model's input channels" in err.value.problems[0]
    assert "distinct and between 0 and 7" in err.value.problems[1]
    assert "at least one integer channel index" in err.value.problems[2]
    assert model[0].out_channels == 8, "nothing is changed when a problem is found"


def test_groups_from_an_older_analysis_are_refused():
    model, x = chain(), seeded_input(2, 3, 8, 8)
    groups = channel_groups(model, x)
    shrink_(model, {groups[1]: [0, 1]})
    with pytest.raises(ConfigError, match="no longer has 8 outputs; .* run channel_groups again"):
        shrink_(model, {groups[1]: [0]})


# -- tracing failures and excluded modules -------------------------------------------------

class HasUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.block = DataDependent()
        self.head = nn.Conv2d(4, 2, 1)
        self.other = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.other(self.head(self.block(self.stem(x))))


def test_an_untraceable_module_is_named_with_the_way_to_exclude_it():
    model, x = HasUntraceable(), seeded_input(1, 3, 4, 4)
    with pytest.raises(UntraceableModel, match=r"module 'block' \(DataDependent\).*exclude=\['block'\]"):
        channel_groups(model, x)
    groups = channel_groups(model, x, exclude=["block"])
    by_producer = {m.module: g for g in groups for m in g.members if m.role == "out"}
    assert by_producer["stem"].reasons == ("they flow into the excluded module 'block'",)
    assert by_producer["head"].prunable and roles(by_producer["head"]) == [("head", "out", 0), ("other", "in", 0)]
    with pytest.raises(LayerSelectionError, match="'blok' matches no module"):
        channel_groups(model, x, exclude=["blok"])


def test_a_model_failing_on_the_example_input_names_the_original_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).train()
    model[1].eval()
    with pytest.raises(ConfigError, match=r"example_input: the model fails on it \(RuntimeError: .*channels") as info:
        channel_groups(model, seeded_input(1, 5, 4, 4))  # 5 channels where the model takes 3
    assert isinstance(info.value.__cause__, RuntimeError)
    assert [m.training for m in model.modules()] == [True, True, False, True], "each module's own mode back"


def test_an_excluded_convolution_keeps_its_shapes():
    groups = channel_groups(chain(), seeded_input(2, 3, 8, 8), exclude=["re:3"])
    assert [(g.size, g.prunable) for g in groups] == [(3, False), (8, False), (10, False)]
    assert groups[1].reasons == ("they flow into the excluded module '3'",)
    assert roles(groups[2]) == [("9", "out", 0)], "the Linear's inputs come from an opaque module"


# -- MobileNetV2 -------------------------------------------------------------------------------

def test_mobilenet_v2_is_analysed_and_shrunk_and_still_runs():
    torch.manual_seed(0)
    model, x = MobileNetV2(num_classes=10).eval(), seeded_input(2, 3, 32, 32)
    groups = channel_groups(model, x)
    # input, stem, 16 expansion groups, 7 stage outputs, the last conv, the classes
    assert len(groups) == 27 and sum(g.prunable for g in groups) == 25
    # A stage of n blocks joined by residual additions is one group with n producers.
    streams = [(g.size, len(g.producers)) for g in groups if len(g.producers) > 1 and all(m.role != "depthwise" for m in g.members)]
    assert streams == [(24, 2), (32, 3), (64, 4), (96, 3), (160, 3)]
    keep = {g: torch.arange(0, g.size, 2) for g in groups if g.prunable}
    assert_masking_equivalence(model, x, keep, atol=1e-5)
    assert n_params(model) == 587_178
    assert model(x).shape == (2, 10)
