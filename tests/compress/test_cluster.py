"""k-means weight sharing: shared values, kept zeros, centroid fine-tuning, save and load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from tiny_models import assert_same_state, inputs
from torch import nn

import slimkit.compress.cluster as cluster_module
from slimkit.compress import ClusterConfig, SharedWeights, cluster_, kmeans_1d, make_permanent_
from slimkit.compress.cluster import shared_weights
from slimkit.config import LayerSelector
from slimkit.distill import DistillConfig, DistillData, LossTerm, distill
from slimkit.errors import ConfigError, LayerSelectionError
from slimkit.prune.api import prune_
from slimkit.prune.magnitude import MagnitudePruneConfig, PruneMask, weight_parametrization
from slimkit.quantize.api import transforms_of
from slimkit.serialize import load, save
from slimkit.zoo.models import load_model


class Seq(nn.Sequential):
    def forward(self, x):
        for layer in self:
            x = layer(x)
        return x


def mlp(seed: int = 0) -> Seq:
    torch.manual_seed(seed)
    return Seq(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))


def pruned_mlp(sparsity: float = 0.8) -> Seq:
    model = mlp()
    prune_(model, MagnitudePruneConfig(sparsity=sparsity))
    return model


def test_each_layer_gets_exactly_two_to_the_bits_values_and_keeps_its_zeros():
    model = pruned_mlp(0.8)
    zeros = {n: model.get_submodule(n).weight.detach() == 0 for n in ("0", "2")}
    assert cluster_(model, ClusterConfig(bits=4)) == ["0", "2"]
    for name in ("0", "2"):
        module = model.get_submodule(name)
        assert isinstance(weight_parametrization(module), SharedWeights) and not isinstance(weight_parametrization(module), PruneMask)
        w = module.weight.detach()
        assert torch.equal(w == 0, zeros[name])  # pruned stay pruned, kept are never zero
        assert len(torch.unique(w[w != 0])) == 16
    assert [t["config"]["kind"] for t in transforms_of(model)] == ["prune", "cluster"]


def test_layer_bits_override_the_default_and_must_name_a_layer():
    model = mlp()
    cluster_(model, ClusterConfig(bits=5, layer_bits={"0": 2, "re:.*": 3}))
    assert len(torch.unique(model[0].weight.detach())) == 4  # first match wins
    assert len(torch.unique(model[2].weight.detach())) == 8
    with pytest.raises(ConfigError) as info:  # every key that names nothing, at once
        cluster_(mlp(), ClusterConfig(layer_bits={"fc9": 3, "0": 4, "re:conv.*": 5}))
    assert len(info.value.problems) == 2
    assert info.value.problems[0].startswith("layer_bits: 'fc9' matches no chosen layer")
    assert info.value.problems[1].startswith("layer_bits: 're:conv.*' matches no chosen layer")
    with pytest.raises(LayerSelectionError, match="'fc9'"):
        cluster_(mlp(), ClusterConfig(layers=LayerSelector(targets=["fc9"])))
    with pytest.raises(ValidationError):
        ClusterConfig(layer_bits={"0": 9})


def test_clustering_twice_is_refused():
    model = mlp()
    cluster_(model, ClusterConfig(bits=2))
    with pytest.raises(ConfigError, match="already shared"):
        cluster_(model, ClusterConfig(bits=2))
    with pytest.raises(ConfigError, match="prune before clustering"):
        prune_(model, MagnitudePruneConfig(sparsity=0.5))


@pytest.mark.parametrize("init", ["linear", "density"])
def test_kmeans_finds_well_separated_clusters(init):
    rng = np.random.default_rng(0)
    centres = np.array([-1.0, 0.5, 2.0])
    x = np.concatenate([c + 0.01 * rng.standard_normal(n) for c, n in zip(centres, (500, 100, 20), strict=True)])
    got = kmeans_1d(x, 3, init=init)
    np.testing.assert_allclose(got, centres, atol=0.01)


def test_random_init_is_seeded_and_ends_at_a_fixed_point():
    x = np.random.default_rng(0).standard_normal(3000)
    a, b = kmeans_1d(x, 8, init="random", seed=1), kmeans_1d(x, 8, init="random", seed=1)
    np.testing.assert_array_equal(a, b)
    assign = np.searchsorted((a[1:] + a[:-1]) / 2, x)
    means = np.bincount(assign, weights=x, minlength=8) / np.bincount(assign, minlength=8)
    np.testing.assert_allclose(a, means, atol=1e-12)  # each centroid is its members' mean


def test_kmeans_uses_every_cluster_and_handles_few_or_no_values():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(2000)
    x = x[np.abs(x) > 1.5]  # magnitude-pruned: nothing near zero, as after pruning
    c = kmeans_1d(x, 32, init="linear")
    assert len(np.unique(np.searchsorted((c[1:] + c[:-1]) / 2, x))) == 32
    few = kmeans_1d(np.array([1.0, 2.0, 2.0]), 4)  # fewer distinct values than clusters
    assert {1.0, 2.0} <= set(few)
    np.testing.assert_array_equal(kmeans_1d(np.array([]), 4), np.zeros(4))


def test_a_centroid_gets_the_summed_gradient_of_its_members():
    model = pruned_mlp(0.5)
    cluster_(model, ClusterConfig(bits=3))
    shared = shared_weights(model[0])
    g = torch.randn(128, 64, generator=torch.Generator().manual_seed(3))
    (model[0].weight * g).sum().backward()
    expected = torch.zeros(9).index_add_(0, shared.codes.long().reshape(-1), g.reshape(-1))[1:]
    torch.testing.assert_close(shared.codebook.grad, expected)
    assert model[0].parametrizations.weight.original.numel() == 0  # no dense copy kept


def test_fine_tuning_moves_centroids_and_lowers_the_loss():
    model = pruned_mlp(0.8)
    cluster_(model, ClusterConfig(bits=3))
    codebook = shared_weights(model[0]).codebook.detach().clone()
    zeros = model[0].weight.detach() == 0
    g = torch.Generator().manual_seed(1)
    data = DistillData({"x": torch.randn(64, 64, generator=g)}, torch.randint(0, 32, (64,), generator=g))

    def loss() -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(data.inputs["x"]), data.labels))

    start = loss()
    distill(None, model, data, DistillConfig(losses=[LossTerm(kind="hard_ce")], max_steps=30, epochs=30,
                                              batch_size=16, lr=1e-2), device="cpu", progress=False)
    assert loss() < start - 0.1
    assert not torch.allclose(shared_weights(model[0]).codebook, codebook)
    w = model[0].weight.detach()
    assert torch.equal(w == 0, zeros) and len(torch.unique(w[w != 0])) == 8


def test_make_permanent_gives_plain_weights_with_the_shared_values():
    model = pruned_mlp(0.5)
    cluster_(model, ClusterConfig(bits=2))
    before = model[0].weight.detach().clone()
    assert make_permanent_(model) == ["0", "2"]
    assert torch.equal(model[0].weight, before) and model[0].weight.requires_grad
    assert sorted(model.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]


@pytest.mark.parametrize("permanent", [False, True])
def test_a_clustered_model_saves_and_loads(tmp_path, permanent):
    model = load_model("tiny_models:mlp")
    prune_(model.module, MagnitudePruneConfig(sparsity=0.7))
    cluster_(model.module, ClusterConfig(bits=4, layer_bits={"2": 2}))
    if permanent:
        make_permanent_(model.module)
    save(model, tmp_path / "m")
    back = load(tmp_path / "m")
    assert_same_state(back.module, model.module)
    with torch.no_grad():
        assert torch.equal(back.module(inputs(4)), model.module(inputs(4)))


def test_loading_registers_the_shared_structure_without_running_kmeans(tmp_path, monkeypatch):
    model = load_model("tiny_models:mlp")
    prune_(model.module, MagnitudePruneConfig(sparsity=0.7))
    cluster_(model.module, ClusterConfig(bits=4, layer_bits={"2": 2}))
    save(model, tmp_path / "m")

    def no_kmeans(*args, **kwargs):
        raise AssertionError("loading ran k-means")

    monkeypatch.setattr(cluster_module, "kmeans_1d", no_kmeans)
    back = load(tmp_path / "m")
    for name, centroids in (("0", 16), ("2", 4)):
        shared = shared_weights(back.module.get_submodule(name))
        assert shared.codebook.shape == (centroids,) and shared.codes.dtype == torch.uint8
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, back.module.state_dict()[k]), k
    with torch.no_grad():
        assert torch.equal(back.module(inputs(4)), model.module(inputs(4)))
    assert transforms_of(back.module) == transforms_of(model.module)
    # The replayed config records like the original: the structure-only flag is not saved.
    replay = ClusterConfig(bits=4).replay_on(["0"])
    assert replay.to_dict() == ClusterConfig(bits=4, layers=LayerSelector(targets=["0"])).to_dict()


def test_config_round_trips_through_its_dict():
    cfg = ClusterConfig(bits=6, layer_bits={"re:conv.*": 8}, init="density")
    data = cfg.to_dict()
    assert (data["kind"], data["method"]) == ("cluster", "kmeans")
    assert ClusterConfig.model_validate({k: v for k, v in data.items() if k not in ("kind", "method")}) == cfg
