"""Channel pruning of patterns it was not written against: each is pruned exactly, or refused.

Pruned means: the pruned model equals the original with the removed channels zeroed
where they are produced (``masked``), with exact shapes and parameter counts. Refused
means: the group is not prunable and its reason names the layer, or pruning raises an
error that names it. Never a model of a silently wrong shape.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from tiny_models import masked, n_params, randomise_bn
from torch import nn

from slimkit.errors import ConfigError
from slimkit.prune import ChannelGroup, channel_groups, channel_importance
from slimkit.prune.cnn import (
    ChannelPruneConfig,
    kept_channels,
    prunable_groups,
    prune_channels,
    top_channels,
)


def images(n=2, seed=1):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def roles(group: ChannelGroup) -> list[tuple[str, str, int]]:
    return [(m.module, m.role, m.offset) for m in group.members]


def group_of(groups: list[ChannelGroup], module: str, role: str = "out") -> ChannelGroup:
    return next(g for g in groups if any(m.module == module and m.role == role for m in g.members))


def prune_half_and_compare(model: nn.Module, x, **config) -> dict[str, int]:
    """Prune half of every prunable group as ``prune_`` does; the result equals the masked model."""
    groups = channel_groups(model, x, config.get("exclude", ()))
    keep = {g: top_channels(channel_importance(model, g, "l1"), kept_channels(g.size, 0.5)) for g in prunable_groups(groups)}
    reference = masked(model, keep)
    result = prune_channels(model, ChannelPruneConfig(ratio=0.5, **config), example_input=x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-6)
    return result.config.kept


# -- grouped convolutions: refused, the layer named; the rest still prunes ---------------------

class GroupedMiddle(nn.Module):
    def __init__(self, groups: int, width: int):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, width, 3, padding=1, groups=groups)
        self.mid = nn.Conv2d(width, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.mid(F.relu(self.grouped(F.relu(self.stem(x)))))))


@pytest.mark.parametrize(("groups", "width", "params"), [(2, 8, 363), (4, 16, 395), (8, 16, 251)])
def test_a_grouped_convolution_is_refused_by_name_and_the_rest_prunes(groups, width, params):
    torch.manual_seed(0)
    model, x = GroupedMiddle(groups, width), images()
    found = channel_groups(model, x)
    reason = (f"they pass the grouped convolution 'grouped' (groups={groups}), whose channels are not pruned",)
    assert group_of(found, "stem").reasons == reason and group_of(found, "grouped").reasons == reason
    assert group_of(found, "mid").prunable
    assert prune_half_and_compare(model, x) == {"head:in": 3, "mid:out": 3}
    # stem 3->8, grouped unchanged (8/groups inputs per filter), mid width->3, head 3->2
    assert n_params(model) == params
    with pytest.raises(ConfigError, match=r"'grouped' names group 'grouped', which cannot be pruned: they pass the grouped convolution 'grouped'"):
        prune_channels(model, ChannelPruneConfig(ratio={"grouped": 0.5}), example_input=x)


# -- concatenation: each branch at its offset into the consumer ----------------------------

class CatWithInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Conv2d(9, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([x, F.relu(self.a(x))], dim=1))


def test_a_branch_concatenated_after_the_input_prunes_at_its_offset():
    torch.manual_seed(0)
    model, x = CatWithInput(), images()
    found = channel_groups(model, x)
    assert roles(group_of(found, "a")) == [("a", "out", 0), ("head", "in", 3)]
    assert roles(found[0]) == [("a", "in", 0), ("head", "in", 0)] and not found[0].prunable
    assert prune_half_and_compare(model, x) == {"a:out": 3, "head:in": 6}
    assert model.head.weight.shape == (2, 6, 1, 1)
    assert n_params(model) == 3 * 3 * 9 + 3 + 2 * 6 + 2 == 98


class CatTwice(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(8 if dim == 1 else 4, 2, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        other = y if self.dim == 1 else F.relu(self.b(x))
        return self.head(torch.cat([y, other], dim=self.dim))


def test_a_tensor_concatenated_with_itself_is_sliced_at_both_offsets():
    torch.manual_seed(0)
    model, x = CatTwice(dim=1), images()
    assert roles(group_of(channel_groups(model, x), "a")) == [("a", "out", 0), ("head", "in", 0), ("head", "in", 4)]
    assert prune_half_and_compare(model, x) == {"a:out": 2, "head:in": 4}
    assert model.head.weight.shape == (2, 4, 1, 1)
    assert n_params(model) == (3 * 2 + 2) + (3 * 4 * 9 + 4) + (2 * 4 + 2) == 130  # b is unused


def test_concatenating_along_height_ties_the_branches_channel_for_channel():
    torch.manual_seed(0)
    model, x = CatTwice(dim=2), images()
    assert roles(group_of(channel_groups(model, x), "a")) == [("a", "out", 0), ("b", "out", 0), ("head", "in", 0)]
    assert prune_half_and_compare(model, x) == {"a:out": 2, "b:out": 2, "head:in": 2}
    assert n_params(model) == (3 * 2 + 2) + (3 * 2 * 9 + 2) + (2 * 2 + 2) == 70


class CatPlusConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(3, 10, 1)
        self.head = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1) + self.c(x))


def test_a_concatenation_added_to_a_whole_tensor_is_refused_naming_the_addition():
    found = channel_groups(CatPlusConv(), images())
    reason = ("add combines tensors whose channels were concatenated differently (4+6 and 10 channels)",)
    assert [group_of(found, m).reasons for m in "abc"] == [reason] * 3


# -- residual additions: one group for the whole stream ------------------------------------

class ResidualStream(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))
        self.c1, self.bn1 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.c2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        s = F.relu(self.stem(x))
        s = F.relu(s + self.bn1(self.c1(s)))
        s = F.relu(s + self.bn2(self.c2(s)))
        return self.head(s.mean((2, 3)))


def test_two_residual_blocks_on_one_stream_prune_as_one_group():
    torch.manual_seed(0)
    model, x = randomise_bn(ResidualStream()), images()
    stream = group_of(channel_groups(model, x), "stem.0")
    assert [m.module for m in stream.producers] == ["stem.0", "c1", "c2"] and stream.prunable
    assert prune_half_and_compare(model, x) == {
        "bn1:norm": 3, "bn2:norm": 3, "c1:in": 3, "c1:out": 3, "c2:in": 3, "c2:out": 3, "head:in": 3, "stem.0:out": 3, "stem.1:norm": 3,
    }
    # three 3x3 convolutions 3->3, three batch norms of 3, head 3->2
    assert n_params(model) == 3 * (3 * 3 * 9) + 3 * 6 + 3 * 2 + 2 == 269


class ResidualOnInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.offset = nn.Parameter(torch.zeros(1, 4, 1, 1))
        self.lift = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.lift(F.relu(self.conv(x)) + x) + self.offset)


def test_residuals_with_the_input_or_a_parameter_are_refused_with_the_reason():
    found = channel_groups(ResidualOnInput(), images())
    assert group_of(found, "conv").reasons == ("they are the model's input channels",)
    assert group_of(found, "lift").reasons == ("they flow into add with a tensor the analysis cannot follow (offset)",)


# -- squeeze-excitation: the gate joins the features, its bottleneck prunes alone ------------

class ConvSE(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.reduce = nn.Conv2d(8, 4, 1)
        self.expand = nn.Conv2d(4, 8, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = F.relu(self.conv(x))
        return self.out(x * torch.sigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1))))))


class LinearSE(nn.Module):
    """The squeeze-excitation of torchvision and timm, written four ways."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 4)
        self.fc2 = nn.Linear(4, 8)
        self.out = nn.Conv2d(8, 2, 1)

    def gate(self, y):
        return torch.sigmoid(self.fc2(F.relu(self.fc1(y))))

    def forward(self, x):
        x = F.relu(self.conv(x))
        b, c, _, _ = x.size()
        if self.how == "view":
            y = self.gate(F.adaptive_avg_pool2d(x, 1).view(b, c)).view(b, c, 1, 1)
            return self.out(x * y.expand_as(x))
        if self.how == "index":
            return self.out(x * self.gate(x.mean((2, 3)))[:, :, None, None])
        if self.how == "unsqueeze":
            return self.out(x * self.gate(F.adaptive_avg_pool2d(x, 1).flatten(1)).unsqueeze(-1).unsqueeze(-1))
        if self.how == "squeeze":
            y = self.gate(F.adaptive_avg_pool2d(x, 1).squeeze(-1).squeeze(-1))
            return self.out(x * y.reshape(x.shape[0], x.shape[1], 1, 1))
        if self.how == "literal":
            return self.out(x * self.gate(F.adaptive_avg_pool2d(x, 1).view(b, 8)).view(b, -1, 1, 1))
        return self.out(x * self.gate(F.adaptive_avg_pool2d(x, 1).squeeze()).view(b, -1, 1, 1))


def test_a_convolutional_squeeze_excitation_prunes_the_gated_channels_and_its_bottleneck():
    torch.manual_seed(0)
    model, x = ConvSE(), images()
    found = channel_groups(model, x)
    assert sorted(roles(group_of(found, "conv"))) == [("conv", "out", 0), ("expand", "out", 0), ("out", "in", 0), ("reduce", "in", 0)]
    assert roles(group_of(found, "reduce")) == [("reduce", "out", 0), ("expand", "in", 0)]
    assert prune_half_and_compare(model, x) == {
        "conv:out": 4, "expand:in": 2, "expand:out": 4, "out:in": 4, "reduce:in": 4, "reduce:out": 2,
    }
    assert n_params(model) == (3 * 4 * 9 + 4) + (4 * 2 + 2) + (2 * 4 + 4) + (4 * 2 + 2) == 144


@pytest.mark.parametrize("how", ["view", "index", "unsqueeze", "squeeze"])
def test_a_linear_squeeze_excitation_reshaped_by_the_channel_count_prunes(how):
    torch.manual_seed(0)
    model, x = LinearSE(how), images()
    found = channel_groups(model, x)
    assert sorted(roles(group_of(found, "conv"))) == [("conv", "out", 0), ("fc1", "in", 0), ("fc2", "out", 0), ("out", "in", 0)]
    assert roles(group_of(found, "fc1")) == [("fc1", "out", 0), ("fc2", "in", 0)]
    assert prune_half_and_compare(model, x) == {"conv:out": 4, "fc1:in": 4, "fc1:out": 2, "fc2:in": 2, "fc2:out": 4, "out:in": 4}
    assert n_params(model) == (3 * 4 * 9 + 4) + (4 * 2 + 2) + (2 * 4 + 4) + (4 * 2 + 2) == 144
    assert model(images(3, seed=2)).shape == (3, 2, 8, 8)


@pytest.mark.parametrize(("how", "reason"), [
    ("literal", "they flow into view to [getitem, 8] (write x.flatten(1) or x.view(x.size(0), -1), or size the channel "
                "axis by -1 or x.size(1), so the shape follows the channels)"),
    ("squeeze_all", "they flow into squeeze without a dim (name the dimensions to squeeze)"),
])
def test_a_squeeze_excitation_that_fixes_the_channel_count_is_refused_by_name(how, reason):
    found = channel_groups(LinearSE(how), images())
    assert group_of(found, "conv").reasons == (reason,)
    assert group_of(found, "fc1").prunable, "the bottleneck does not depend on it"


# -- tied weights: refused, naming both uses -----------------------------------------------

class TiedLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(F.relu(self.b(F.relu(self.a(x)))))


def test_two_linears_sharing_a_weight_are_refused_naming_both():
    model, x = TiedLinears(), torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    found = channel_groups(model, x)
    a_is_b = "tied weights: 'a.weight' is the same tensor as 'b.weight'; slicing it for these channels would untie or break the other use"
    b_is_a = "tied weights: 'b.weight' is the same tensor as 'a.weight'; slicing it for these channels would untie or break the other use"
    assert group_of(found, "a").reasons == (a_is_b, b_is_a)
    assert group_of(found, "b").reasons == (b_is_a,)
    assert prune_channels(model, ChannelPruneConfig(ratio=0.5), example_input=x).layers == []
    assert model.b.weight is model.a.weight and model.a.weight.shape == (6, 6)


class TiedEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.h, self.p = nn.Linear(6, 5), nn.Linear(5, 6)
        self.lm = nn.Linear(6, 10, bias=False)
        self.lm.weight = self.emb.weight

    def forward(self, ids):
        return self.lm(self.p(F.relu(self.h(self.emb(ids)))))


def test_a_head_tied_to_the_embedding_is_refused_and_the_rest_prunes():
    torch.manual_seed(0)
    model, ids = TiedEmbedding(), torch.arange(10).reshape(2, 5)
    tied = group_of(channel_groups(model, ids), "p")
    assert roles(tied) == [("p", "out", 0), ("lm", "in", 0)]
    assert tied.reasons == ("tied weights: 'lm.weight' is the same tensor as 'emb.weight'; slicing it for these channels "
                            "would untie or break the other use",)
    assert prune_half_and_compare(model, ids) == {"h:out": 3, "p:in": 3}
    assert model.lm.weight is model.emb.weight and model.emb.weight.shape == (10, 6)
    assert n_params(model) == 10 * 6 + (6 * 3 + 3) + (3 * 6 + 6) == 105


class FunctionalReuse(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.c, self.head = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = F.relu(self.stem(x))
        return self.head(torch.cat([self.c(y), F.conv2d(y, self.c.weight, self.c.bias)], dim=1))


def test_a_weight_forward_reads_directly_is_refused_naming_the_read():
    found = channel_groups(FunctionalReuse(), images())
    assert group_of(found, "c").reasons == (
        "tied weights: 'c.weight' is also read directly in forward by conv2d; slicing it for these channels would untie or break the other use",
        "tied weights: 'c.bias' is also read directly in forward by conv2d; slicing it for these channels would untie or break the other use",
    )


class WeightNormed(nn.Module):
    def __init__(self):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the old weight_norm is deprecated, not gone
            self.a = nn.utils.weight_norm(nn.Conv2d(3, 6, 1))
        self.b = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


class SharedWithExcluded(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.c = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 1)
        self.block = nn.Sequential(self.c, nn.ReLU())
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(self.block(F.relu(self.c(self.stem(x)))))


def test_a_weight_rebuilt_in_forward_or_a_module_shared_with_an_excluded_one_is_refused():
    assert group_of(channel_groups(WeightNormed(), images()), "a").reasons == (
        "module 'a' has tensors channel pruning does not slice: weight_g, weight_v",
    )
    found = channel_groups(SharedWithExcluded(), images(), exclude=["block"])
    assert group_of(found, "stem").reasons == ("module 'c' is also used inside the excluded module 'block'",)


# -- one convolution called at two places ---------------------------------------------------

class ConvTwice(nn.Module):
    def __init__(self, split: bool = False):
        super().__init__()
        self.split = split
        self.a = nn.Conv2d(3, 3 if split else 6, 1)
        self.b = nn.Conv2d(3, 3 if split else 6, 3, padding=1)
        self.d = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(6, 4, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        if self.split:
            first = self.c(torch.cat([self.a(x), self.b(x)], dim=1))
            return self.head(torch.cat([F.relu(first), F.relu(self.c(self.d(x)))], dim=1))
        return self.head(torch.cat([F.relu(self.c(F.relu(self.a(x)))), F.relu(self.c(F.relu(self.b(x))))], dim=1))


def test_a_convolution_called_on_two_branches_ties_them_and_prunes():
    torch.manual_seed(0)
    model, x = ConvTwice(), images()
    found = channel_groups(model, x)
    assert roles(group_of(found, "a")) == [("a", "out", 0), ("c", "in", 0), ("b", "out", 0)]
    assert roles(group_of(found, "c")) == [("c", "out", 0), ("head", "in", 0), ("head", "in", 4)]
    assert prune_half_and_compare(model, x) == {"a:out": 3, "b:out": 3, "c:in": 3, "c:out": 2, "head:in": 4}
    # a 3->3, b 3->3 (3x3), d unused 3->6, c 3->2, head 4->2
    assert n_params(model) == (3 * 3 + 3) + (3 * 3 * 9 + 3) + (3 * 6 + 6) + (3 * 2 + 2) + (4 * 2 + 2) == 138


def test_a_convolution_called_on_inputs_concatenated_differently_is_refused():
    found = channel_groups(ConvTwice(split=True), images())
    reason = "c is called on inputs split differently (3+3 and 6 channels)"
    assert [group_of(found, m).reasons for m in "abd"] == [(reason,)] * 3
    assert group_of(found, "c").prunable


# -- the shape check: a dependency the analysis cannot see leaves the model as it was -------

class SizeDependent(nn.Module):
    """Its forward branches on a module's size, which the trace freezes at the original's."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.stem, self.pool = nn.Conv2d(3, 8, 1), nn.AdaptiveAvgPool2d(1)
        self.head, self.extra = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = F.relu(self.stem(x))
        if self.stem.out_channels != 8:
            if self.mode == "cat":
                y = torch.cat([y, y], dim=1)
            elif self.mode == "extra":
                return self.extra(y)
            else:
                return self.head(self.pool(y)).repeat(1, 2, 1, 1)
        return self.head(self.pool(y))


@pytest.mark.parametrize(("mode", "problem"), [
    ("cat", "module 'pool' (AdaptiveAvgPool2d) receives [2, 8, 8, 8] from relu where [2, 4, 8, 8] was expected"),
    ("extra", "the pruned model fails in module 'extra' (Conv2d) (RuntimeError: Given groups=1, weight of size [2, 8, 1, 1], "
              "expected input[2, 4, 8, 8] to have 8 channels, but got 4 channels instead)"),
    ("output", "the pruned model's output has shape [2, 4, 1, 1] where the original's is [2, 2, 1, 1]"),
])
def test_a_wrong_shape_after_shrinking_names_the_module_and_restores_the_model(mode, problem):
    torch.manual_seed(0)
    model, x = SizeDependent(mode), images()
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        prune_channels(model, ChannelPruneConfig(ratio=0.5), example_input=x)
    assert err.value.problems == [
        f"channel pruning would leave a wrong shape: {problem}. The channel analysis missed a dependency there, so the "
        "model is left as it was; exclude the modules around it (exclude=[...]) to prune the rest"
    ]
    assert (model.stem.out_channels, model.head.in_channels) == (8, 8)
    assert all(p is params[k] for k, p in model.named_parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
