"""Every strategy, on real worker processes, trains exactly what one process trains on the
same global batches: gradients and parameters after a few optimizer steps agree."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_job
from safetensors.torch import load_file

from slimkit.parallel import selfcheck as S
from slimkit.parallel.config import ParallelConfig

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return run_job(tmp_path_factory.mktemp("two"), "two_process_job", ParallelConfig(strategy="ddp", nproc=2))


@pytest.fixture(scope="module")
def references():
    return {"adamw": S.run_classifier(), "sgd": S.run_classifier(optimizer="sgd"), "text": S.run_text(),
            "tail": S.run_classifier(examples=15, grad_accum=1), "kd": S.run_classifier(kd=True)}


@pytest.mark.parametrize(("name", "reference", "tolerance"), [
    ("ddp", "adamw", 1e-5),          # 7 examples per micro-batch split 4 + 3, 2 micro-batches, clipping
    ("ddp_tail", "tail", 1e-5),      # a last micro-batch of one example: rank 1 computes it with weight 0
    ("zero1", "adamw", 1e-5),
    ("fsdp", "adamw", 1e-5),
    ("fsdp_bf16", "sgd", 2e-3),      # bf16 parameters and compute, fp32 reduction and optimizer
    ("ddp_distill", "text", 1e-5),   # distillation of a BERT student, padding masked per process
    ("tp", "text", 1e-5),            # heads and MLP units split column/row-wise
    ("pipeline_1f1b", "adamw", 1e-5),     # 2 stages, 4 micro-batches, the last one padding
    ("pipeline_gpipe_kd", "kd", 1e-5),    # a teacher's soft labels computed on the last stage
])
def test_two_processes_train_what_one_does(two, references, name, reference, tolerance):
    assert S.worst(load_file(str(two / f"{name}.safetensors")), references[reference]) <= tolerance


def test_parameters_move(references):
    # The comparison means something: three steps change every trained weight.
    start = S._found(S.Classifier())
    moved = [k for k in start if k.startswith("param.") and "unused" not in k
             and not torch.equal(start[k], references["adamw"][k])]
    assert len(moved) == len([k for k in start if k.startswith("param.") and "unused" not in k])


def test_fsdp_over_tensor_parallel_on_a_2x2_mesh(tmp_path, references):
    job = run_job(tmp_path, "four_process_job", ParallelConfig(strategy="fsdp+tp", nproc=4))
    assert S.worst(load_file(str(job / "fsdp_tp.safetensors")), references["text"]) <= 1e-5


def test_fsdp_holds_about_half_the_training_state_per_process(two):
    single = S.state_bytes(S.distill_text())
    for rank in (0, 1):
        per_rank = json.loads((two / f"state.fsdp.{rank}.json").read_text())
        # Parameters, gradients and AdamW's moments, each sharded in two (with padding).
        assert per_rank["total"] <= 0.55 * single["total"]
        for part in ("parameters", "gradients", "optimizer_state"):
            assert per_rank[part] < 0.6 * single[part], part
