"""Running a recipe: load, apply stages, measure every variant the same way, write a run folder."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from slimkit import __version__, serialize
from slimkit.atomic import atomic_dir, write_json, write_text
from slimkit.compress.api import cluster_
from slimkit.config import SlimConfig
from slimkit.deploy.devices import estimates_for, load_profile
from slimkit.deploy.export import export
from slimkit.deploy.onnx_model import OnnxModel
from slimkit.errors import ConfigError
from slimkit.measure import energy as energy_mod
from slimkit.measure.latency import measure_latency
from slimkit.measure.memory import peak_rss
from slimkit.measure.runners import make_runner
from slimkit.measure.workload import Workload
from slimkit.measure.workloads import workload_for
from slimkit.parallel.config import ParallelConfig
from slimkit.parallel.world import launched
from slimkit.prune.api import prune_
from slimkit.quantize.api import quantize_, record_transform, transforms_of
from slimkit.recipe import Recipe
from slimkit.registry import handler_for
from slimkit.serialize import load_model
from slimkit.zoo.models import LoadedModel

METRICS_SCHEMA_VERSION = 1
BASELINE = "fp32"
# Methods whose chosen layers are stored in int8 (embedding tables among them).
INT8_STORAGE = {"int8_weight_only", "ort_dynamic_int8", "ort_static_int8", "pt2e_static_int8"}
LOW_PRECISION = {"dynamic_int8": "int8", "ort_dynamic_int8": "int8", "ort_static_int8": "int8",
                 "pt2e_static_int8": "int8", "low_precision": "fp16"}


def _low_precision(config: dict[str, Any]) -> str | None:
    # static_int8 for ONNX Runtime only records input ranges; the ort_static_int8 stage
    # after export is what computes in int8.
    if config["method"] == "static_int8":
        return "int8" if config.get("target") == "torch" else None
    return LOW_PRECISION.get(config["method"])


@dataclass
class Variant:
    name: str
    model: LoadedModel | OnnxModel
    configs: list[SlimConfig] = field(default_factory=list)
    is_output: bool = False
    folder: Path | None = None
    base: LoadedModel | None = None  # the float PyTorch model it computes (for counting MACs)
    training: list[dict[str, Any]] = field(default_factory=list)  # records of its distill stages
    pruning: list[dict[str, Any]] = field(default_factory=list)  # analyses its prune stages chose by

    @property
    def framework(self) -> str:
        return "onnx" if isinstance(self.model, OnnxModel) else "torch"

    @property
    def weights_file(self) -> Path:
        assert self.folder is not None
        return self.folder / ("model.onnx" if self.framework == "onnx" else "model.safetensors")

    @property
    def transforms(self) -> list[dict[str, Any]]:
        return transforms_of(self.model if isinstance(self.model, OnnxModel) else self.model.module)


# Stages worth keeping the result of, so that variants whose stages begin alike (a
# fine-tuned, pruned model exported twice, say) train and prune once.
SHARED_KINDS = {"train", "distill", "prune"}
# Train images the Taylor importance of a channel-pruning stage is computed on.
TAYLOR_IMAGES = 512


@dataclass
class StageContext:
    """What stages need from the run: the task, where to keep checkpoints, the baseline.

    Attributes:
        workload: the task's inputs, calibration and training data (train split only).
        calibration: the most calibration examples any stage asks for.
        checkpoints: the folder of resumable training checkpoints of this variant.
        baseline: the run's baseline model: the teacher of ``train: {teacher: baseline}``.
        memo: results of earlier variants' training and pruning, by the stages that made them.
        examples: calibration examples given directly, instead of drawn from ``workload``.
        batch_sizes: the batch sizes the run measures (an arena stage plans for them).
        parallel: how train and distill stages run: in this process, or in worker
            processes under a strategy of :mod:`slimkit.parallel`.
        task: the recipe's task (as JSON), from which parallel workers build their data.
        seq_len: the text length of the task's inputs.
        joined: the launch this run is part of, when a launcher started it on every
            process (:class:`slimkit.parallel.joined.JoinedLaunch`).
    """

    workload: Workload | None = None
    calibration: int = 128
    checkpoints: Path | None = None
    device: str = "cpu"
    progress: bool = False
    baseline: LoadedModel | None = None
    memo: dict[str, tuple] = field(default_factory=dict)
    examples: list[Any] | None = None
    batch_sizes: list[int] = field(default_factory=list)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    task: dict[str, Any] | None = None
    seq_len: int = 128
    joined: Any = None

    def calibration_for(self, framework: str) -> list[Any] | None:
        """Calibration examples in the form a ``framework`` (``onnx`` or ``torch``) model takes them."""
        if self.examples is not None or self.workload is None:
            return self.examples
        key = f"calibration:{framework}"
        if key not in self._drawn:
            self._drawn[key] = self.workload.calibration(self.calibration, framework)
        return self._drawn[key]

    def __post_init__(self) -> None:
        self._drawn: dict[str, list[Any]] = {}


def apply_stages(model: LoadedModel, configs: list[SlimConfig], workdir: Path, context: StageContext | None = None, *,
                 training: list[dict[str, Any]] | None = None, pruning: list[dict[str, Any]] | None = None,
                 ) -> tuple[LoadedModel | OnnxModel, LoadedModel]:
    """Apply ``configs`` in order to a copy of ``model``; an export stage turns it into ONNX.

    Returns the result, and the floating-point PyTorch architecture it computes (``model``,
    or the student of a distill stage), whose arithmetic the energy estimate counts.

    With no stages the model itself is returned: nothing will change it, and a copy of a
    large model costs its whole size in memory.

    A distill stage replaces the model by the student it trains (on the task's train
    texts unless the stage names a file), a train stage trains it on the task's train
    images; both keep resumable checkpoints under ``context.checkpoints`` and append their
    record to ``training``. A prune stage shrinks the model (scoring on calibration data
    from the train split where its importance or its budget's analysis needs it; the
    analysis is appended to ``pruning``), and the architecture returned is the pruned one.
    Results of train, distill and prune stages are kept in ``context.memo`` and reused by
    later calls whose stages begin the same way.
    """
    if not configs:
        return model, model
    context = context or StageContext()
    current: LoadedModel | OnnxModel = model.clone()
    source = current
    architecture = model
    first = _reuse(context.memo, model, configs, training, pruning)
    if first:
        current, architecture = (m.clone() for m in context.memo[_key(model, configs[:first])][:2])
        source = current
    for i, cfg in enumerate(configs[first:], start=first):
        folder = context.checkpoints / f"stage{i}" if context.checkpoints else None
        if cfg.kind == "export":
            _end_checkpointing(current)
            source = current
            current = export(current, cfg, workdir=workdir)
            record_transform(current, cfg, [])
        elif cfg.kind == "checkpoint":
            record = _checkpoint_stage(current, cfg, configs[i + 1:], context)
            if training is not None:
                training.append({"stage": i, "kind": "checkpoint", **record})
        elif cfg.kind == "arena":
            if "batch_buckets" not in cfg.model_fields_set and context.batch_sizes:
                cfg = cfg.model_copy(update={"batch_buckets": sorted(set(context.batch_sizes))})
            record_transform(current.module, cfg, [])
        elif cfg.kind in ("train", "distill") and context.parallel.distributed:
            if context.task is None:
                raise ConfigError(f"{cfg.kind}: parallel workers build the task's data; run the stage in a recipe")
            from slimkit.parallel.stage_job import train_in_workers

            # Beside the checkpoints, which outlive a failed run: the workers' log stays there.
            job = folder.with_name(f"{folder.name}.job") if folder else workdir / f"stage{i}.job"
            current, record = train_in_workers(cfg, current, job, context.parallel,
                                               task=context.task, seq_len=context.seq_len, checkpoint_dir=folder,
                                               progress=context.progress, baseline=context.baseline, original=model,
                                               joined=context.joined)
            record_transform(current.module, cfg, [])
            architecture = current
            if training is not None:
                training.append({"stage": i, **record})
        elif cfg.kind == "distill":
            from slimkit.distill.stage import run_distill_stage

            workload = context.workload
            current, record = run_distill_stage(
                current, cfg, getattr(workload, "train_texts", None), folder, context.device, context.progress,
                original=model, train_labels=getattr(workload, "train_labels", None), load=load_model)
            record_transform(current.module, cfg, [])
            architecture = current
            if training is not None:
                training.append({"stage": i, "kind": "distill", **record})
        elif cfg.kind == "train":
            from slimkit.train.stage import run_train_stage

            record = run_train_stage(current, cfg, context.workload, folder, context.device, context.progress,
                                     baseline=context.baseline)
            record_transform(current.module, cfg, [])
            architecture = current
            if training is not None:
                training.append({"stage": i, **record})
        elif cfg.kind == "prune":
            # Recipes put PyTorch-side stages before the export, so this is a LoadedModel.
            result = prune_(current.module, cfg, **_prune_context(cfg, context, current))
            if result.analysis is not None and pruning is not None:
                pruning.append({"stage": i, **result.analysis})
            architecture = current
        elif cfg.kind == "cluster":
            cluster_(current.module, cfg)
        elif cfg.kind == "convert":
            # It records what the layers became itself (replacing the qat_int8 record).
            handler_for(cfg)(current.module, cfg)
        else:
            onnx = isinstance(current, OnnxModel)
            # ``source``: the PyTorch model an ONNX stage came from, for methods that
            # score layers before choosing what to quantize.
            quantize_(current, cfg, calibration=context.calibration_for("onnx" if onnx else "torch"), source=source)
        if cfg.kind in SHARED_KINDS:
            context.memo[_key(model, configs[:i + 1])] = (current.clone(), current.clone(), list(training or []),
                                                          list(pruning or []))
        if architecture is current and i < len(configs) - 1:
            # Later stages change the model in place; the estimate needs it as it is now.
            architecture = current.clone()
    _end_checkpointing(current)
    return current, architecture


def _checkpoint_stage(current: LoadedModel, cfg: SlimConfig, later: list[SlimConfig], context: StageContext) -> dict:
    """Checkpoint ``current`` for the training stages in ``later``; planned on one of their batches."""
    from slimkit.memory.checkpoint import checkpoint_

    size = next((c.batch_size for c in later if c.kind in ("train", "distill")), None)
    if size is None:  # validation refuses this; a pipeline built in Python may not be validated
        raise ConfigError("checkpoint: no train or distill stage follows it, so there is no training to checkpoint")
    batch = loss = None
    if cfg.budget is not None:
        if context.workload is None:
            raise ConfigError("checkpoint: a budget is planned on a training batch of the task; run it in a recipe")
        batch, loss = context.workload.training_example(size)
    handle = checkpoint_(current.module, cfg, batch, loss)
    return {"blocks": handle.blocks, "autocast": handle.autocast, "batch_size": size,
            "plan": handle.plan.to_dict() if handle.plan else None}


def _end_checkpointing(model: LoadedModel | OnnxModel) -> None:
    # Checkpointing changes how training spends memory, not the model: exported, saved
    # and measured models run their plain forward.
    if isinstance(model, LoadedModel):
        from slimkit.memory.checkpoint import remove_checkpointing_

        remove_checkpointing_(model.module)


def _key(model: LoadedModel, configs: list[SlimConfig]) -> str:
    import json

    return json.dumps([id(model), *(c.to_dict() for c in configs)], sort_keys=True)


def _reuse(memo: dict[str, tuple], model: LoadedModel, configs: list[SlimConfig], training: list | None,
           pruning: list | None) -> int:
    """How many leading stages of ``configs`` an earlier call on ``model`` already ran (0:
    none); their training and pruning records are copied into ``training`` and ``pruning``."""
    for n in range(len(configs), 0, -1):
        found = memo.get(_key(model, configs[:n]))
        if found is not None:
            if training is not None:
                training.extend(found[2])
            if pruning is not None:
                pruning.extend(found[3])
            return n
    return 0


def _prune_context(cfg: SlimConfig, context: StageContext, current: LoadedModel) -> dict[str, Any]:
    """What a prune stage scores with: for an image model its example input, labelled train
    batches and a held-out evaluation; for a text model calibration sentences."""
    workload = context.workload
    if getattr(workload, "kind", None) != "image":
        return {"calibration": context.calibration_for("torch")}
    out: dict[str, Any] = {"example_input": workload.example_input()}
    if getattr(cfg, "importance", None) == "taylor":
        out.update(calibration=workload.labelled_batches(TAYLOR_IMAGES), loss_fn=workload.loss_fn)
    budget = getattr(cfg, "budget", None)
    if budget is not None and hasattr(budget, "images"):
        *_, vx, vy = workload.held_out(budget.images, budget.seed)
        score = workload.evaluator(vx, vy)
        out["evaluate"] = lambda m: score(m)["val_accuracy"]
    return out


def run(recipe: Recipe, output: str | Path | None = None, progress: bool = True) -> Path:
    """Run ``recipe`` and return the run folder.

    The folder is built under a temporary name and moved into place only when complete,
    so an interrupted run leaves no partial folder and can simply be run again. Training
    stages checkpoint into ``.NAME.checkpoints`` beside it, so running an interrupted
    recipe again resumes their training; the checkpoints are removed once the run is done.

    With a ``parallel`` strategy the training stages run in worker processes started with
    torchrun; in a process a launcher already started on every rank (torchrun, Slurm),
    rank 0 runs the recipe and the other ranks only train with it (the run folder, on
    storage they all see, is written by rank 0, and theirs return its path).
    """
    spec = recipe.spec
    out_dir = Path(output or spec.output or Path("runs") / spec.name)
    joined = None
    if spec.parallel.distributed and launched():
        # Started by torchrun or Slurm on every process: rank 0 runs the recipe and the
        # others train its training stages with it.
        from slimkit.parallel.joined import JoinedLaunch

        joined = JoinedLaunch(spec.parallel)
        if not joined.main:
            joined.serve()
            return out_dir
    try:
        return _run(recipe, out_dir, progress, joined)
    finally:
        if joined is not None:
            joined.close()


def _run(recipe: Recipe, out_dir: Path, progress: bool, joined: Any) -> Path:
    spec = recipe.spec
    checkpoints = out_dir.parent / f".{out_dir.name}.checkpoints"
    m = spec.measure
    device = ("cuda" if torch.cuda.is_available() else "cpu") if m.device == "auto" else m.device
    torch.set_num_threads(m.threads)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar, atomic_dir(out_dir) as tmp:
        step = bar.add_task("load model and task", total=2)
        model = load_model(spec.model)
        bar.advance(step)
        workload = workload_for(spec.task, model, m.seq_len)
        if workload.kind == "image":
            # Exported and traced at the size the task feeds it.
            model.example_inputs = (workload.example_input(),)
        bar.advance(step)
        all_stages = recipe.prepare + recipe.stages + [c for _, cs in recipe.compare for c in cs]
        wanted = [getattr(c, "calibration_samples", 0) or getattr(c, "calibration_batches", 0) for c in all_stages]
        context = StageContext(workload, max([128, *wanted]), None, device, progress, batch_sizes=list(m.batch_sizes),
                               parallel=spec.parallel, task=spec.task.model_dump(mode="json"), seq_len=m.seq_len,
                               joined=joined)

        step = bar.add_task("prepare the baseline", total=1)
        training: list[dict[str, Any]] = []
        pruning: list[dict[str, Any]] = []
        context.checkpoints = checkpoints / BASELINE
        baseline, base_architecture = apply_stages(model, recipe.prepare, tmp / "work", context,
                                                   training=training, pruning=pruning)
        if workload.kind == "image":
            workload.check_outputs(baseline.module)
        context.baseline = baseline
        bar.advance(step)

        plan = [(spec.variant, recipe.stages, True)] + [(n, c, False) for n, c in recipe.compare]
        step = bar.add_task("build variants", total=len(plan) + 1)
        variants = [Variant(BASELINE, baseline, list(recipe.prepare), False, tmp / "variants" / BASELINE,
                            base_architecture, training, pruning)]
        serialize.save(baseline, variants[0].folder)
        bar.advance(step)
        for name, configs, is_output in plan:
            folder = tmp / "variants" / name
            base = baseline
            if name in recipe.compare_models:
                base = load_model(recipe.compare_models[name])
                if workload.kind == "image":
                    base.example_inputs = model.example_inputs
            training, pruning = [], []
            context.checkpoints = checkpoints / name
            built, architecture = apply_stages(base, configs, folder / "work", context, training=training,
                                               pruning=pruning)
            v = Variant(name, built, configs, is_output, folder, architecture, training, pruning)
            serialize.save(v.model, folder)
            _remove_workdir(folder / "work")
            if isinstance(v.model, OnnxModel):
                v.model.path = v.weights_file
            variants.append(v)
            bar.advance(step)
        _remove_workdir(tmp / "work")
        context.memo.clear()

        feeds = {b: workload.timing_feed(b) for b in m.batch_sizes}
        example = workload.torch_inputs(feeds[min(feeds)], device)
        example = tuple(example.values()) if isinstance(example, dict) else example
        runners = {v.name: make_runner(v.model, m.threads, device, example) for v in variants}
        results: dict[str, dict[str, Any]] = {v.name: {"latency": {}} for v in variants}
        for b, feed in feeds.items():
            step = bar.add_task(f"latency, batch {b}", total=m.rounds)
            calls = {n: _call(r, feed) for n, r in runners.items()}
            lat = measure_latency(calls, BASELINE, b, m.rounds, m.iters, m.warmup,
                                  progress=lambda s=step: bar.advance(s), settle_s=m.settle_ms / 1000.0)
            for n, stats in lat.items():
                results[n]["latency"][str(b)] = stats

        if m.accuracy:
            def advance(description: str, total: int):
                task = bar.add_task(description, total=total)
                return lambda k: bar.advance(task, k)

            for name, acc in workload.accuracy(runners, BASELINE, advance).items():
                results[name]["accuracy"] = acc
        if m.memory:
            step = bar.add_task("peak memory (fresh processes)", total=len(variants))
            one = workload.serve_feed()
            for v in variants:
                results[v.name].update(peak_rss(v.folder, one, m.threads))
                bar.advance(step)
        if m.energy:
            _energy(variants, workload, results, runners, feeds, device, [load_profile(d) for d in m.devices])
        profiled = None
        if m.memory_profile:
            step = bar.add_task("memory profile of the baseline", total=1)
            profiled = _memory_profile(variants[0].model, spec.model, workload, feeds, m.seq_len, device)
            bar.advance(step)

        step = bar.add_task("write model, metrics and report", total=1)
        metrics = _metrics(recipe, variants, results, workload, device)
        if profiled is not None:
            metrics["memory_profile"] = profiled
        write_json(tmp / "metrics.json", metrics)
        write_text(tmp / "recipe.yaml", yaml.safe_dump(recipe.raw, sort_keys=False))
        output_variant = next(v for v in variants if v.is_output)
        serialize.save(output_variant.model, tmp)
        from slimkit.report import render_report

        render_report(metrics, tmp / "report.html")
        bar.advance(step)
    _remove_workdir(checkpoints)
    return out_dir


def _memory_profile(model: LoadedModel, name: str, workload: Workload, feeds: dict[int, dict[str, np.ndarray]],
                    seq_len: int, device: str) -> dict[str, Any]:
    """Where the memory of one forward pass of the fp32 baseline goes, on the harness's own
    input at its smallest batch (the report's memory-profile section)."""
    from slimkit.memory.profiler import profile

    feed = feeds[min(feeds)]
    shapes = {k: list(v.shape) for k, v in feed.items()}
    return {"model": name, "inputs": shapes, "seq_len": seq_len if workload.kind == "text" else None,
            **profile(model.module.to(device), workload.torch_inputs(feed, device)).to_dict()}


def _call(runner, feed: dict[str, np.ndarray]):
    inputs = tuple(feed.values())
    return lambda: runner(*inputs)


def _remove_workdir(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _energy(variants, workload: Workload, results, runners, feeds, device, profiles=()) -> None:
    count_inputs = workload.count_inputs(feeds[min(feeds)])
    # Only the rows of the sequence's tokens are read from an embedding table.
    tokens = count_inputs[0].shape[1] if workload.kind == "text" else 0
    counted: dict[int, tuple] = {}  # MACs of each distinct base model, counted once
    for v in variants:
        if id(v.base) not in counted:
            module = v.base.module
            counted[id(v.base)] = (
                *energy_mod.layer_macs(module, count_inputs),
                [(n, m.weight.numel(), m.embedding_dim) for n, m in module.named_modules() if isinstance(m, torch.nn.Embedding)],
            )
        per_layer, total, tables = counted[id(v.base)]
        low, int8_stored = {}, []
        for t in v.transforms:
            kind = _low_precision(t["config"])
            if kind:
                low.update({layer: kind for layer in t["layers"]})
            if t["config"]["method"] in INT8_STORAGE or (t["config"]["method"] == "static_int8" and kind):
                int8_stored += t["layers"]
        read = energy_mod.weight_bytes_read(v.weights_file.stat().st_size, tables, int8_stored, tokens)
        est = energy_mod.estimate(total, per_layer, low, read)
        batch = min(feeds)
        measured = energy_mod.measured_energy(_call(runners[v.name], feeds[batch]), device)
        if measured is not None:  # per example, as the estimate is
            measured["mj_per_inference"] /= batch
        est["measured"] = measured
        if profiles:
            est["devices"] = estimates_for(est, profiles)  # labelled estimates, beside what was measured here
        results[v.name]["energy"] = est


def machine_info(threads: int, device: str) -> dict[str, Any]:
    """Machine, thread count and versions, recorded with every measurement."""
    import onnxruntime
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "device": device,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "threads": threads,
        "versions": {"slimkit": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__,
                     "numpy": np.__version__},
    }


def _metrics(recipe: Recipe, variants: list[Variant], results: dict, workload: Workload, device: str) -> dict:
    m = recipe.spec.measure
    info = machine_info(m.threads, device)
    base = results[BASELINE]
    base_size = variants[0].weights_file.stat().st_size
    out_variants = []
    for v in variants:
        r = results[v.name]
        size = v.weights_file.stat().st_size
        rss = r.get("peak_rss_bytes")
        out_variants.append({
            "name": v.name,
            "framework": v.framework,
            "stages": [c.to_dict() for c in v.configs],
            "is_output": v.is_output,
            "size_bytes": size,
            "size_ratio": size / base_size,
            "latency": r["latency"],
            "peak_rss_bytes": rss,
            "rss_ratio": rss / base["peak_rss_bytes"] if rss and base.get("peak_rss_bytes") else None,
            "torch_imported": r.get("torch_imported"),
            "accuracy": r.get("accuracy"),
            "energy": r.get("energy"),
            "training": v.training or None,
            "pruning": v.pruning or None,
        })
    return {
        "schema_version": METRICS_SCHEMA_VERSION,
        "slimkit_version": __version__,
        "recipe": recipe.spec.name,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "harness": {"threads": m.threads, "seq_len": m.seq_len, "batch_sizes": m.batch_sizes, "rounds": m.rounds,
                    "iters": m.iters, "warmup": m.warmup, "settle_ms": m.settle_ms, "device": device,
                    "machine": info["machine"], "versions": info["versions"]},
        "task": workload.info(),
        "baseline": BASELINE,
        "variants": out_variants,
    }
