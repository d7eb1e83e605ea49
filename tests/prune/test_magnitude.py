"""Magnitude pruning: exact sparsities, N:M groups, masks through training, the schedule."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from tiny_models import assert_same_state, inputs
from torch import nn
from torch.nn.utils import parametrize

from slimkit.config import LayerSelector
from slimkit.distill import DistillConfig, DistillData, LossTerm, distill
from slimkit.errors import ConfigError
from slimkit.prune.api import prune_
from slimkit.prune.magnitude import (
    GradualPruner,
    GradualSchedule,
    MagnitudePruneConfig,
    layer_sparsity,
    make_permanent_,
    mask_of,
)
from slimkit.quantize.api import transforms_of
from slimkit.registry import config_from_dict
from slimkit.serialize import load, save
from slimkit.zoo.models import load_model


class Seq(nn.Sequential):
    """A Sequential called with ``x=`` as the distillation loop calls models."""

    def forward(self, x):
        for layer in self:
            x = layer(x)
        return x


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return Seq(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return Seq(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 12))


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def data(n: int = 64) -> DistillData:
    g = torch.Generator().manual_seed(1)
    return DistillData({"x": torch.randn(n, 64, generator=g)}, torch.randint(0, 32, (n,), generator=g))


def rounded(sparsity: float, n: int) -> float:
    """The sparsity actually reached: a whole number of weights, rounded to nearest."""
    return int(sparsity * n + 0.5) / n


def train(model, steps, **kw) -> None:
    config = DistillConfig(losses=[LossTerm(kind="hard_ce")], max_steps=steps, epochs=10, batch_size=16, lr=1e-2,
                           weight_decay=0.1, **kw.pop("config", {}))
    distill(None, model, data(), config, device="cpu", progress=False, **kw)


@pytest.mark.parametrize("factory", [mlp, cnn])
def test_per_layer_sparsity_is_exact_and_drops_the_smallest(factory):
    model = factory()
    before = weights(model)
    result = prune_(model, MagnitudePruneConfig(sparsity=0.7))
    assert result.layers == list(before)
    for name, w in weights(model).items():
        zeros = w == 0
        assert int(zeros.sum()) == int(0.7 * w.numel() + 0.5)
        # Every pruned weight was no larger than every kept one.
        assert before[name][zeros].abs().max() <= before[name][~zeros].abs().min()
        assert torch.equal(w[~zeros], before[name][~zeros])


def test_global_scope_ranks_across_layers():
    model = mlp()
    with torch.no_grad():
        model[2].weight.mul_(0.01)  # a layer of tiny weights
    before = weights(model)
    prune_(model, MagnitudePruneConfig(sparsity=0.5, scope="global"))
    after = weights(model)
    total = sum(w.numel() for w in after.values())
    assert sum(int((w == 0).sum()) for w in after.values()) == total // 2
    s = layer_sparsity(model)
    assert s["2"] == 1.0  # all 4096 tiny weights go first
    assert s["0"] == pytest.approx((total // 2 - 4096) / 8192)
    pruned = torch.cat([before[n][after[n] == 0].abs() for n in after])
    kept = torch.cat([before[n][after[n] != 0].abs() for n in after])
    assert pruned.max() <= kept.min()


@pytest.mark.parametrize("factory", [mlp, cnn])
def test_two_four_keeps_the_two_largest_of_each_group_of_four_inputs(factory):
    model = factory()
    before = weights(model)
    prune_(model, MagnitudePruneConfig(pattern="n:m", n=2, m=4))
    for name, w in weights(model).items():
        b = before[name]
        if w.dim() == 4:  # groups along input channels at each kernel position
            w, b = w.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1)
        groups, orig = w.reshape(-1, 4), b.reshape(-1, 4)
        assert ((groups == 0).sum(1) == 2).all()
        kept_min = orig.abs().masked_fill(groups == 0, float("inf")).min(1).values
        pruned_max = orig.abs().masked_fill(groups != 0, -1.0).max(1).values
        assert (pruned_max <= kept_min).all()
    assert layer_sparsity(model) == {"0": 0.5, "3": 0.5} if factory is cnn else {"0": 0.5, "2": 0.5}


def test_n_m_refuses_layers_whose_inputs_do_not_split_into_groups():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3), nn.ReLU(), nn.Linear(3, 4))
    with pytest.raises(ConfigError) as err:
        prune_(model, MagnitudePruneConfig(pattern="n:m"))
    assert len(err.value.problems) == 2  # "0" (6 inputs) and "4" (3 inputs), both at once
    assert "layers.ignore: ['0']" in str(err.value)
    assert mask_of(model[0]) is None  # nothing was pruned
    prune_(model, MagnitudePruneConfig(pattern="n:m", layers=LayerSelector(ignore=["0", "4"])))
    assert layer_sparsity(model)["2"] == 0.5


@pytest.mark.parametrize("bad, fix", [
    ({}, "exactly one of `sparsity`"),
    ({"sparsity": 0.5, "schedule": {"final": 0.5, "end_step": 10}}, "exactly one of `sparsity`"),
    ({"sparsity": 0.5, "n": 1}, "apply to pattern 'n:m' only"),
    ({"pattern": "n:m", "sparsity": 0.5}, "fixes the sparsity"),
    ({"pattern": "n:m", "scope": "global"}, "scope: 'per_layer'"),
    ({"pattern": "n:m", "n": 4, "m": 4}, "must be smaller than m"),
    ({"sparsity": 1.0}, "less than 1"),
    ({"sparsity": 0.5, "sparsty": 0.5}, "Extra inputs"),
])
def test_config_refuses_inconsistent_fields(bad, fix):
    with pytest.raises(ValidationError, match=fix):
        MagnitudePruneConfig(**bad)


@pytest.mark.parametrize("config", [
    MagnitudePruneConfig(sparsity=0.3, scope="global", layers=LayerSelector(ignore=["2"])),
    MagnitudePruneConfig(pattern="n:m", n=1, m=8),
    MagnitudePruneConfig(schedule=GradualSchedule(initial=0.1, final=0.8, begin_step=5, end_step=50, every=5)),
])
def test_configs_round_trip_through_the_registry(config):
    assert config_from_dict(config.to_dict()) == config


def test_schedule_follows_the_cubic_formula():
    s = GradualSchedule(initial=0.1, final=0.9, begin_step=10, end_step=110, every=20)
    assert s.sparsity_at(0) == 0.0 and s.sparsity_at(9) == 0.0  # dense before begin_step
    assert s.sparsity_at(10) == pytest.approx(0.1)
    # 0.9 + (0.1 - 0.9) * (1 - 20/100)**3 = 0.9 - 0.8 * 0.512
    assert s.sparsity_at(30) == pytest.approx(0.4904)
    assert s.sparsity_at(49) == pytest.approx(0.4904)  # held until the next update
    assert s.sparsity_at(50) == pytest.approx(0.7272)  # 0.9 - 0.8 * 0.6**3
    assert s.sparsity_at(90) == pytest.approx(0.8936)  # 0.9 - 0.8 * 0.2**3
    assert s.sparsity_at(110) == 0.9 and s.sparsity_at(10_000) == 0.9
    assert [t for t in range(200) if s.is_update(t)] == [10, 30, 50, 70, 90, 110]
    uneven = GradualSchedule(final=0.5, end_step=25, every=10)
    assert [t for t in range(40) if uneven.is_update(t)] == [0, 10, 20, 25]
    assert uneven.sparsity_at(20) == pytest.approx(0.5 - 0.5 * 0.2**3)
    with pytest.raises(ValidationError, match="must be after begin_step"):
        GradualSchedule(final=0.5, begin_step=5, end_step=5)
    with pytest.raises(ValidationError, match="must not exceed final"):
        GradualSchedule(initial=0.6, final=0.5, end_step=5)


def test_masks_keep_pruned_weights_zero_through_training():
    model = mlp()
    prune_(model, MagnitudePruneConfig(sparsity=0.8))
    before = weights(model)
    train(model, 10)  # AdamW with weight decay: momentum would revive plain zeroed weights
    after = weights(model)
    for name in before:
        assert torch.equal(after[name] == 0, before[name] == 0)
        assert not torch.equal(after[name], before[name])
        # Pruned weights get no gradient and never reach the layer.
        assert int((after[name] == 0).sum()) == int(0.8 * after[name].numel() + 0.5)


def test_gradual_pruning_reaches_each_scheduled_sparsity_while_training():
    model = mlp()
    schedule = GradualSchedule(initial=0.2, final=0.75, begin_step=0, end_step=8, every=2)
    pruner = GradualPruner(model, MagnitudePruneConfig(schedule=schedule))
    assert layer_sparsity(model) == {"0": rounded(0.2, 8192), "2": rounded(0.2, 4096)}
    seen = []

    def watch(step, student):
        pruner(step, student)
        seen.append((step, layer_sparsity(student)["0"]))

    train(model, 12, on_step=watch)
    assert [t for t, _ in seen] == list(range(1, 13))  # after every optimizer step, counted from 1
    expected = [rounded(schedule.sparsity_at(t), 8192) for t in range(1, 13)]
    assert [s for _, s in seen] == expected
    # Updates after steps 2, 4, 6, 8: 0.75 - 0.55 * (1 - t/8)**3, then 0.75 held.
    assert expected[:4] == [rounded(0.2, 8192)] + [rounded(0.75 - 0.55 * 0.75**3, 8192)] * 2 + [rounded(0.75 - 0.55 * 0.5**3, 8192)]
    assert expected[7:] == [0.75] * 5


def test_gradual_pruning_resumes_from_a_checkpoint_as_if_never_stopped(tmp_path):
    schedule = GradualSchedule(final=0.8, end_step=10, every=2)
    config = MagnitudePruneConfig(schedule=schedule)
    cfg = {"checkpoint_every": 3}

    straight = mlp()
    train(straight, 12, on_step=GradualPruner(straight, config), config=cfg)

    class Crash(Exception):
        pass

    first = mlp()
    pruner = GradualPruner(first, config)

    def crash_at_8(step, model):
        pruner(step, model)
        if step == 8:
            raise Crash

    with pytest.raises(Crash):
        train(first, 12, on_step=crash_at_8, checkpoint_dir=tmp_path / "ckpt", config=cfg)
    resumed = mlp()  # a new process: same model, same pruner, same folder
    train(resumed, 12, on_step=GradualPruner(resumed, config), checkpoint_dir=tmp_path / "ckpt", config=cfg)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert layer_sparsity(resumed) == {"0": rounded(0.8, 8192), "2": rounded(0.8, 4096)}


def test_pruning_again_never_revives_pruned_weights():
    model = mlp()
    prune_(model, MagnitudePruneConfig(sparsity=0.6))
    zeros = weights(model)["0"] == 0
    with torch.no_grad():  # make the pruned weights' stored values the largest
        model[0].parametrizations.weight.original[zeros] = 100.0
    prune_(model, MagnitudePruneConfig(sparsity=0.3))
    assert torch.equal(weights(model)["0"] == 0, zeros)


def test_make_permanent_leaves_plain_weights_with_the_same_zeros():
    model = mlp()
    prune_(model, MagnitudePruneConfig(sparsity=0.5))
    before = weights(model)
    assert make_permanent_(model) == ["0", "2"]
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert sorted(model.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    for name, w in weights(model).items():
        assert torch.equal(w, before[name])
        assert model.get_submodule(name).weight.requires_grad
    assert [t["config"]["method"] for t in transforms_of(model)] == ["magnitude", "make_permanent"]
    assert make_permanent_(model) == []  # nothing left to make permanent


@pytest.mark.parametrize("permanent", [False, True])
def test_a_pruned_model_saves_and_loads_with_or_without_its_masks(tmp_path, permanent):
    model = load_model("tiny_models:mlp")
    prune_(model.module, MagnitudePruneConfig(sparsity=0.9, scope="global"))
    if permanent:
        make_permanent_(model.module)
    save(model, tmp_path / "m")
    back = load(tmp_path / "m")
    assert_same_state(back.module, model.module)
    x = inputs(4)
    with torch.no_grad():
        assert torch.equal(back.module(x), model.module(x))
    assert (mask_of(back.module[0]) is None) == permanent
