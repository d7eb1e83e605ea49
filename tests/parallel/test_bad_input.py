"""Bad parallel settings are refused by name, and a failing process stops the job with its
message instead of leaving the others waiting."""

from __future__ import annotations

import socket
import time

import pytest
import torch
from conftest import run_job
from pydantic import ValidationError

from slimkit.errors import ConfigError
from slimkit.parallel import selfcheck as S
from slimkit.parallel.config import ParallelConfig
from slimkit.parallel.distributed import Distributed
from slimkit.parallel.launch import ParallelError, launch
from slimkit.parallel.tensor import tensor_plan
from slimkit.parallel.world import World


def test_a_crashing_process_stops_the_job_with_its_message(tmp_path):
    started = time.monotonic()
    with pytest.raises(ParallelError, match=r"ddp on 2 processes: rank 1 failed: a bad batch on rank 1"):
        run_job(tmp_path, "crash_job", ParallelConfig(strategy="ddp", nproc=2, timeout_seconds=60))
    assert time.monotonic() - started < 60  # stopped, not left to time out


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} is already in use"):
            launch(tmp_path, "slimkit.parallel.selfcheck:crash_job", ParallelConfig(strategy="ddp", nproc=2, port=port))
    assert not (tmp_path / "job.json").exists()


def test_more_processes_than_a_batch_splits_into_are_refused():
    strategy = Distributed(World(0, 8, 0, torch.device("cpu"), "gloo"), ParallelConfig(strategy="ddp", nproc=8))
    with pytest.raises(ConfigError, match="batch_size: 7 examples per micro-batch cannot be split across 8"):
        strategy.check_batch(7, 40)


def test_tensor_parallel_names_the_block_without_layers_it_splits():
    with pytest.raises(ConfigError, match=r"block 'layers.0' has none of the layers tensor parallel splits "
                                          r"\(its Linear layers: 0\)"):
        tensor_plan(S.Classifier(), 2)


def test_tensor_parallel_degree_must_divide_every_layers_heads():
    with pytest.raises(ConfigError) as err:
        tensor_plan(S.Encoder(heads=2), 4)
    assert "backbone.encoder.layer.0.attention.self: 2 attention heads do not split across 4 processes" in str(err.value)
    assert "backbone.encoder.layer.1.attention.self" in str(err.value)
    assert len(tensor_plan(S.Encoder(heads=4), 4)) == 2


@pytest.mark.parametrize(("fields", "message"), [
    ({"nproc": 2}, "nproc: 2 processes need a strategy"),
    ({"strategy": "fsdp", "zero1": True}, "zero1 shards the optimizer state of ddp; fsdp shards it already"),
    ({"strategy": "ddp", "mixed_precision": "bf16"}, "mixed_precision applies to fsdp"),
    ({"strategy": "fsdp+tp", "nproc": 3}, "nproc: 3 processes do not split into groups of tp_degree 2"),
    ({"strategy": "tp", "tp_degree": 2}, r"tp_degree applies to fsdp\+tp"),
    ({"strategy": "ddp", "schedule": "gpipe"}, "schedule applies to strategy: pipeline"),
    ({"strategy": "pipeline", "nproc": 3, "split_points": ["a"]}, "3 stages need 2 split point"),
])
def test_settings_that_do_not_fit_the_strategy_are_refused(fields, message):
    with pytest.raises(ValidationError, match=message):
        ParallelConfig(**fields)


def test_a_process_without_examples_computes_one_with_weight_zero():
    ranks = [Distributed(World(r, 4, r, torch.device("cpu"), "gloo"), ParallelConfig(strategy="ddp", nproc=4))
             for r in range(4)]
    shares = [s.shard(torch.tensor([5, 6, 7])) for s in ranks]
    assert [(t.tolist(), w) for t, w in shares] == [([5], 4 / 3), ([6], 4 / 3), ([7], 4 / 3), ([5], 0.0)]
    # Weighted, the processes' mean losses average to the micro-batch's mean loss.
    assert sum(w for _, w in shares) / 4 == 1.0


def test_a_pipeline_stage_cannot_read_the_models_input_again(tmp_path):
    # The encoder pools its output with the attention mask, an input of the model.
    with pytest.raises(ParallelError, match=r"pipeline stage 1 \(from 'backbone.encoder.layer.1'\) reads the "
                                            r"model's input 'attention_mask' directly"):
        run_job(tmp_path, "text_job", ParallelConfig(strategy="pipeline", nproc=2))


def test_tensor_parallel_refuses_terms_on_the_layers_it_splits():
    from slimkit.distill import DistillConfig, LossTerm
    from slimkit.parallel.tensor import refuse_split_terms

    on = lambda name: DistillConfig(losses=[LossTerm(kind="hidden_mse", layers={name: name})])  # noqa: E731
    with pytest.raises(ConfigError, match=r"splits the outputs of losses\[0\] \(hidden_mse\) on "
                                          r"'backbone.encoder.layer.0.attention.self.query'"):
        refuse_split_terms(on("backbone.encoder.layer.0.attention.self.query"), S.Encoder(), 2)
    refuse_split_terms(on("backbone.encoder.layer.0"), S.Encoder(), 2)  # a block's output is whole


def test_a_pipeline_refuses_inner_terms_bf16_and_a_wrong_number_of_split_points():
    from slimkit.distill import DistillConfig, LossTerm
    from slimkit.parallel.pipeline import PipelineParallel

    world = World(0, 2, 0, torch.device("cpu"), "gloo")
    pipe = PipelineParallel(world, ParallelConfig(strategy="pipeline", nproc=2))
    with pytest.raises(ConfigError, match=r"losses\[0\] \(hidden_mse\) read inner layers"):
        pipe.check_training(DistillConfig(losses=[LossTerm(kind="hidden_mse", layers={"head": "head"})]), S.Classifier())
    with pytest.raises(ConfigError, match="bf16: the pipeline's stages run in float32"):
        pipe.check_training(DistillConfig(losses=[LossTerm(kind="hard_ce")], bf16=True), S.Classifier())
    # nproc said 3 stages, the launch has 2 processes.
    pipe = PipelineParallel(world, ParallelConfig(strategy="pipeline", nproc=3, split_points=["layers.1", "head"]))
    with pytest.raises(ConfigError, match=r"2 processes make 2 stages, which need 1 split point\(s\), not 2"):
        pipe.check_training(DistillConfig(losses=[LossTerm(kind="hard_ce")]), S.Classifier())


def test_balanced_split_points_minimise_the_slowest_stage():
    from slimkit.parallel.pipeline import balanced_split

    assert balanced_split([1, 1, 1, 1], 2) == [2]
    assert balanced_split([5, 1, 1, 1, 1, 1], 2) == [1]
    assert balanced_split([1, 2, 3, 4, 5], 3) == [3, 4]  # 6 | 4 | 5
    with pytest.raises(ConfigError, match="3 stages but only 2 blocks"):
        balanced_split([1, 1], 3)
