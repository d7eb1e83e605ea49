"""A recipe's training stage (``train`` or ``distill``) run by parallel workers.

The parent saves the model the recipe has reached (and the baseline or original model the
stage learns from) into the job folder, and launches the workers. Each loads them, builds
the task's training data itself, and runs the stage's own function under its strategy;
the main worker gathers the trained weights and saves the trained model and the stage's
record. The parent loads that model and goes on: it alone measures and writes the run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from slimkit import serialize
from slimkit.atomic import write_json
from slimkit.config import SlimConfig
from slimkit.memory.checkpoint.apply import checkpointing_of, reapply_checkpointing_
from slimkit.parallel.config import ParallelConfig
from slimkit.parallel.launch import launch
from slimkit.quantize.api import transforms_of
from slimkit.zoo.loaded import LoadedModel

TARGET = "slimkit.parallel.stage_job:train_stage"
TRAINED = "trained"
RECORD = "record.json"


def train_in_workers(config: SlimConfig, current: LoadedModel, job_dir: Path, parallel: ParallelConfig, *,
                     task: dict[str, Any], seq_len: int, checkpoint_dir: Path | None, progress: bool,
                     baseline: LoadedModel | None = None, original: LoadedModel | None = None,
                     joined: Any = None) -> tuple[LoadedModel, dict[str, Any]]:
    """Run the training stage ``config`` on ``current`` under ``parallel``; the trained model and the record.

    The workers are started with torchrun, or, in a launch that already runs this
    process on every rank (``joined``, a :class:`slimkit.parallel.joined.JoinedLaunch`),
    are the launch's other processes. ``current`` itself is not changed: the trained
    model is a new one (a distill stage's student, or ``current`` trained).
    """
    shutil.rmtree(job_dir, ignore_errors=True)
    job_dir.mkdir(parents=True)
    serialize.save(current, job_dir / "model")
    learns_from = {}
    if baseline is not None and getattr(config, "teacher", None) == "baseline":
        serialize.save(baseline, job_dir / "baseline")
        learns_from["baseline"] = "baseline"
    if original is not None and config.kind == "distill" and config.student.current:
        serialize.save(original, job_dir / "original")
        learns_from["original"] = "original"
    args = {"config": config.to_dict(), "task": task, "seq_len": seq_len, "progress": progress,
            "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None,
            "checkpointing": checkpointing_of(current.module), "models": learns_from}
    if joined is None:
        launch(job_dir, TARGET, parallel, args)
    else:
        joined.run(job_dir, args)
    trained = serialize.load(job_dir / TRAINED)
    trained.example_inputs = current.example_inputs
    # A checkpoint stage before this one goes on checkpointing later training stages.
    reapply_checkpointing_(trained.module, args["checkpointing"])
    record = json.loads((job_dir / RECORD).read_text())
    shutil.rmtree(job_dir, ignore_errors=True)
    return trained, {**record, "parallel": parallel.model_dump(mode="json")}


def train_stage(strategy: Any, job_dir: Path, *, config: dict[str, Any], task: dict[str, Any], seq_len: int,
                progress: bool, checkpoint_dir: str | None, checkpointing: dict[str, Any] | None,
                models: dict[str, str]) -> None:
    """In a worker: run the stage on this process's share and, on the main one, save the result."""
    from slimkit.distill.stage import run_distill_stage
    from slimkit.measure.workloads import workload_for
    from slimkit.recipe import TaskSpec
    from slimkit.stages import config_from_dict
    from slimkit.train.stage import run_train_stage

    cfg = config_from_dict(config)
    current = serialize.load(job_dir / "model")
    reapply_checkpointing_(current.module, checkpointing)
    others = {role: serialize.load(job_dir / folder) for role, folder in models.items()}
    workload = workload_for(TaskSpec.model_validate(task), current, seq_len)
    folder = Path(checkpoint_dir) if checkpoint_dir else None
    if cfg.kind == "train":
        record = run_train_stage(current, cfg, workload, folder, strategy.device, progress,
                                 baseline=others.get("baseline"), strategy=strategy)
        trained = current
    else:
        trained, record = run_distill_stage(
            current, cfg, getattr(workload, "train_texts", None), folder, strategy.device, progress,
            original=others.get("original"), train_labels=getattr(workload, "train_labels", None),
            load=serialize.load_model, strategy=strategy)
        record = {"kind": "distill", **record}
    weights = strategy.full_state_dict(trained.module)  # every process takes part in the gathers
    if strategy.main:
        clean = serialize.architecture(trained.spec, transforms_of(trained.module))
        clean.module.load_state_dict(weights, strict=True)
        clean.tokenizer, clean.max_seq_len = trained.tokenizer, trained.max_seq_len
        serialize.save(clean, job_dir / TRAINED)
        write_json(job_dir / RECORD, record)
