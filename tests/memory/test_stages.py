"""The memory recipe stages: ``checkpoint`` planned to a budget on the task's batch, ``arena`` recorded."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.memory.checkpoint import checkpointed_blocks, profile_checkpointing
from slimkit.memory.stages import ArenaStageConfig, CheckpointStageConfig, arena_config
from slimkit.quantize.api import record_transform
from slimkit.runner import StageContext, _checkpoint_stage, _end_checkpointing
from slimkit.train import TrainConfig
from slimkit.zoo.models import LoadedModel


def _blocks(n: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
                           for _ in range(n)])


class _Workload:
    """The one thing the stage asks of a task's workload: a training batch of a given size."""

    def __init__(self):
        self.sizes: list[int] = []

    def training_example(self, batch_size: int):
        self.sizes.append(batch_size)
        torch.manual_seed(1)
        return (torch.randn(batch_size, 8, 12, 12),), lambda out: out.square().mean()


def test_a_budget_is_planned_on_a_batch_of_the_next_training_stage():
    model, workload = LoadedModel(_blocks(), {}), _Workload()
    x, loss = workload.training_example(4)
    profile = profile_checkpointing(model.module, x, loss)
    budget = (profile.min_peak_bytes + profile.max_peak_bytes) // 2
    cfg = CheckpointStageConfig(budget=budget)
    record = _checkpoint_stage(model, cfg, [TrainConfig(batch_size=4)], StageContext(workload))
    assert workload.sizes == [4, 4]
    assert record["batch_size"] == 4 and record["autocast"] == "none"
    assert 0 < len(record["blocks"]) < 6 and checkpointed_blocks(model.module) == record["blocks"]
    assert record["plan"]["budget_bytes"] == budget
    assert record["plan"]["measured_peak_bytes"] <= budget
    _end_checkpointing(model)
    assert checkpointed_blocks(model.module) == []


def test_blocks_without_a_budget_need_no_batch_and_training_must_follow():
    model = LoadedModel(_blocks(3), {})
    record = _checkpoint_stage(model, CheckpointStageConfig(blocks=["0", "2"]), [TrainConfig(batch_size=8)],
                               StageContext())
    assert record["blocks"] == ["0", "2"] and record["plan"] is None
    with pytest.raises(ConfigError, match="no train or distill stage follows it"):
        _checkpoint_stage(model, CheckpointStageConfig(), [], StageContext())
    with pytest.raises(ConfigError, match="a budget is planned on a training batch of the task"):
        _checkpoint_stage(model, CheckpointStageConfig(budget="1MiB"), [TrainConfig()], StageContext())


def test_the_arena_stage_is_read_back_from_the_model():
    model = _blocks(1)
    assert arena_config(model) is None
    record_transform(model, ArenaStageConfig(batch_buckets=[1, 4]), [])
    assert arena_config(model) == ArenaStageConfig(batch_buckets=[1, 4])
