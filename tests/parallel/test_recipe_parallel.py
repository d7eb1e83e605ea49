"""``slimkit run`` with a ``parallel:`` section: the training stages run in torchrun
workers, and the run folder holds what one process would have trained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_models import write_image_folder

from slimkit import serialize
from slimkit.errors import ConfigError
from slimkit.recipe import Recipe
from slimkit.runner import run

pytestmark = pytest.mark.multiprocess

TESTS_DIR = Path(__file__).resolve().parents[1]
TRAIN = {"max_steps": 8, "batch_size": 12, "lr": 5e-2, "optimizer": "sgd", "validation": 24, "eval_every": 4, "patience": 2,
         "grad_accum": 2}


def recipe(images: Path, checkpointing: bool = True, **parallel) -> dict:
    raw = {
        "name": "tiny-parallel",
        "model": "tiny_models:plain_cnn",
        "task": {"source": str(images), "image_size": 16, "normalize": "none"},
        "prepare": [{"train": TRAIN}],
        "stages": [{"checkpoint": {"blocks": ["features"]}}] * checkpointing
                  + [{"train": {**TRAIN, "teacher": "baseline", "max_steps": 4}}],
        "measure": {"batch_sizes": [1], "rounds": 1, "iters": 1, "warmup": 0, "threads": 1, "memory": False,
                    "energy": False, "memory_profile": False},
    }
    if parallel:
        raw["parallel"] = parallel
    return raw


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    images = write_image_folder(tmp_path_factory.mktemp("images"))
    out = tmp_path_factory.mktemp("runs")
    before = os.environ.get("PYTHONPATH")
    # The workers (and the model's factory) import tests/tiny_models.py.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), before]))
    try:
        one = run(Recipe.from_dict(recipe(images)), out / "one", progress=False)
        two = run(Recipe.from_dict(recipe(images, strategy="ddp", nproc=2)), out / "ddp", progress=False)
        alone = run(Recipe.from_dict(recipe(images, checkpointing=False)), out / "alone", progress=False)
        piped = run(Recipe.from_dict(recipe(images, checkpointing=False, strategy="pipeline", nproc=2)), out / "pipe",
                    progress=False)
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
    return one, two, alone, piped


@pytest.mark.parametrize("pair", [(0, 1), (2, 3)], ids=["ddp", "pipeline"])
def test_the_workers_train_what_one_process_trains(runs, pair):
    # SGD: Adam divides by the root of tiny second moments, which magnifies summation-order
    # differences over a dozen steps (2e-5 measured) beyond what they are. The pipeline
    # evaluates (early stopping) on the whole student its main process gathers.
    one, two = (serialize.load(runs[i]).module.state_dict() for i in pair)
    assert one.keys() == two.keys()
    assert max(float((one[k].float() - two[k].float()).abs().max()) for k in one) <= 1e-5


def test_the_training_records_say_how_they_ran(runs):
    metrics = json.loads((runs[1] / "metrics.json").read_text())
    records = [t for v in metrics["variants"] for t in v.get("training", []) if t["kind"] == "train"]
    assert len(records) == 2 and all(r["parallel"]["strategy"] == "ddp" and r["parallel"]["nproc"] == 2 for r in records)
    single = json.loads((runs[0] / "metrics.json").read_text())
    steps = [t["steps"] for v in single["variants"] for t in v.get("training", []) if t["kind"] == "train"]
    assert [r["steps"] for r in records] == steps


def test_validate_refuses_a_parallel_section_without_training(tmp_path):
    raw = recipe(tmp_path, strategy="ddp", nproc=2)
    raw["prepare"], raw["stages"] = [], [{"export": {}}]
    with pytest.raises(ConfigError, match="parallel.strategy: ddp runs train and distill stages"):
        Recipe.from_dict(raw)


def test_processes_without_a_strategy_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="nproc: 2 processes need a strategy"):
        Recipe.from_dict(recipe(tmp_path, nproc=2))


def test_slimkit_run_under_torchrun_trains_with_every_process(runs, tmp_path):
    images = tmp_path / "images"
    write_image_folder(images)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe(images, strategy="ddp", nproc=2)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "slimkit.cli",
           "run", str(recipe_file), "-o", str(tmp_path / "run"), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    joined = serialize.load(tmp_path / "run").module.state_dict()
    one = serialize.load(runs[0]).module.state_dict()
    assert max(float((one[k].float() - joined[k].float()).abs().max()) for k in one) <= 1e-5
