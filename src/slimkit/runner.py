"""Running a recipe: load, apply stages, measure every variant the same way, write a run folder."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Sequence
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
from slimkit.deploy.export import export
from slimkit.deploy.onnx_model import OnnxModel
from slimkit.errors import ConfigError
from slimkit.measure import energy as energy_mod
from slimkit.measure.inputs import fixed_length_batch
from slimkit.measure.latency import measure_latency
from slimkit.measure.memory import peak_rss
from slimkit.measure.runners import make_runner
from slimkit.measure.task import TokenizedTexts, embed, fit_head, nearest_neighbours, task_metrics
from slimkit.prune.api import prune_
from slimkit.quantize.api import quantize_, record_transform, transforms_of
from slimkit.recipe import Recipe
from slimkit.zoo.models import LoadedModel, load_model
from slimkit.zoo.tasks import TextClassificationData, load_task

METRICS_SCHEMA_VERSION = 1
BASELINE = "fp32"
# Methods whose chosen layers are stored in int8 (embedding tables among them).
INT8_STORAGE = {"int8_weight_only", "ort_dynamic_int8", "ort_static_int8"}
LOW_PRECISION = {"dynamic_int8": "int8", "ort_dynamic_int8": "int8", "ort_static_int8": "int8", "low_precision": "fp16"}


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


def apply_stages(model: LoadedModel, configs: list[SlimConfig], workdir: Path, calibration=None, *,
                 train_texts: list[str] | None = None, train_labels: Sequence[int] | None = None,
                 checkpoints: Path | None = None, device: str = "cpu", progress: bool = False,
                 training: list[dict[str, Any]] | None = None, pruning: list[dict[str, Any]] | None = None,
                 ) -> tuple[LoadedModel | OnnxModel, LoadedModel]:
    """Apply ``configs`` in order to a copy of ``model``; an export stage turns it into ONNX.

    Returns the result, and the floating-point PyTorch architecture it computes (``model``,
    or the student of a distill stage), whose arithmetic the energy estimate counts.

    With no stages the model itself is returned: nothing will change it, and a copy of a
    large model costs its whole size in memory.

    A distill stage replaces the model by the student it trains (on ``train_texts``
    unless the stage names a file; ``train_labels`` add the task metric to its
    evaluations), keeps resumable checkpoints under ``checkpoints``,
    and appends its training record to ``training``. A prune stage shrinks the model
    (scoring on ``calibration`` where its importance or its budget's sensitivity analysis
    needs data; the analysis is appended to ``pruning``), and the architecture returned
    is the pruned one.
    """
    if not configs:
        return model, model
    current: LoadedModel | OnnxModel = model.clone()
    source = current
    architecture = model
    for i, cfg in enumerate(configs):
        if cfg.kind == "export":
            source = current
            current = export(current, cfg, workdir=workdir)
            record_transform(current, cfg, [])
        elif cfg.kind == "distill":
            from slimkit.distill.stage import run_distill_stage

            folder = checkpoints / f"stage{i}" if checkpoints else None
            current, record = run_distill_stage(current, cfg, train_texts, folder, device, progress, original=model,
                                                train_labels=train_labels)
            record_transform(current.module, cfg, [])
            # Later stages change the student in place; the estimate needs it as trained.
            architecture = current.clone() if i < len(configs) - 1 else current
            if training is not None:
                training.append({"stage": i, **record})
        elif cfg.kind == "prune":
            # Recipes put PyTorch-side stages before the export, so this is a LoadedModel.
            # Importance from gradients scores on the calibration sentences (train split).
            result = prune_(current.module, cfg, calibration=calibration)
            if result.analysis is not None and pruning is not None:
                pruning.append({"stage": i, **result.analysis})
            # The model is smaller now: the energy estimate counts what it computes.
            architecture = current.clone() if i < len(configs) - 1 else current
        elif cfg.kind == "cluster":
            cluster_(current.module, cfg)
        else:
            target = current if isinstance(current, OnnxModel) else current.module
            # ``source``: the PyTorch model an ONNX stage came from, for methods that
            # score layers before choosing what to quantize.
            quantize_(target, cfg, calibration=calibration, source=source)
    return current, architecture


def run(recipe: Recipe, output: str | Path | None = None, progress: bool = True) -> Path:
    """Run ``recipe`` and return the run folder.

    The folder is built under a temporary name and moved into place only when complete,
    so an interrupted run leaves no partial folder and can simply be run again. Training
    stages checkpoint into ``.NAME.checkpoints`` beside it, so running an interrupted
    recipe again resumes their training; the checkpoints are removed once the run is done.
    """
    spec = recipe.spec
    out_dir = Path(output or spec.output or Path("runs") / spec.name)
    checkpoints = out_dir.parent / f".{out_dir.name}.checkpoints"
    m = spec.measure
    device = ("cuda" if torch.cuda.is_available() else "cpu") if m.device == "auto" else m.device
    torch.set_num_threads(m.threads)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar, atomic_dir(out_dir) as tmp:
        step = bar.add_task("load model and task", total=2)
        model = load_model(spec.model)
        if model.tokenizer is None:
            raise ConfigError(
                f"model: {spec.model!r} has no tokenizer, but task {spec.task.source!r} is a text "
                "task; give a Hugging Face model directory (with its tokenizer files)"
            )
        bar.advance(step)
        data = load_task(spec.task.source, spec.task.text_column, spec.task.label_column).limited(
            spec.task.train_limit, spec.task.test_limit
        )
        bar.advance(step)
        feeds = {b: fixed_length_batch(model.tokenizer, data.test_texts, b, m.seq_len, model.max_seq_len) for b in m.batch_sizes}
        wanted = [getattr(c, "calibration_samples", 0) or getattr(c, "calibration_batches", 0) for c in recipe.stages + [c for _, cs in recipe.compare for c in cs]]
        calibration = _calibration_feeds(model, data, max([128, *wanted]))

        plan = [(BASELINE, [], False), (spec.variant, recipe.stages, True)] + [(n, c, False) for n, c in recipe.compare]
        step = bar.add_task("build variants", total=len(plan))
        variants = []
        for name, configs, is_output in plan:
            folder = tmp / "variants" / name
            base = load_model(recipe.compare_models[name]) if name in recipe.compare_models else model
            training: list[dict[str, Any]] = []
            pruning: list[dict[str, Any]] = []
            built, architecture = apply_stages(
                base, configs, folder / "work", calibration, train_texts=data.train_texts, train_labels=data.train_labels,
                checkpoints=checkpoints / name, device=device, progress=progress, training=training,
                pruning=pruning)
            v = Variant(name, built, configs, is_output, folder, architecture, training, pruning)
            serialize.save(v.model, folder)
            _remove_workdir(folder / "work")
            if isinstance(v.model, OnnxModel):
                v.model.path = v.weights_file
            variants.append(v)
            bar.advance(step)

        runners = {v.name: make_runner(v.model, m.threads, device) for v in variants}
        results: dict[str, dict[str, Any]] = {v.name: {"latency": {}} for v in variants}
        for b, feed in feeds.items():
            step = bar.add_task(f"latency, batch {b}", total=m.rounds)
            calls = {n: _call(r, feed) for n, r in runners.items()}
            lat = measure_latency(calls, BASELINE, b, m.rounds, m.iters, m.warmup,
                                  progress=lambda s=step: bar.advance(s), settle_s=m.settle_ms / 1000.0)
            for n, stats in lat.items():
                results[n]["latency"][str(b)] = stats

        if m.accuracy:
            _accuracy(variants, runners, model, data, results, bar)
        if m.memory:
            step = bar.add_task("peak memory (fresh processes)", total=len(variants))
            one = fixed_length_batch(model.tokenizer, data.test_texts, 1, min(128, m.seq_len), model.max_seq_len)
            for v in variants:
                results[v.name].update(peak_rss(v.folder, one, m.threads))
                bar.advance(step)
        if m.energy:
            _energy(variants, m.seq_len, results, runners, feeds, device)
        profiled = None
        if m.memory_profile:
            step = bar.add_task("memory profile of the baseline", total=1)
            profiled = _memory_profile(variants[0].model, spec.model, feeds, m.seq_len, device)
            bar.advance(step)

        step = bar.add_task("write model, metrics and report", total=1)
        metrics = _metrics(recipe, variants, results, data, device)
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


def _memory_profile(model: LoadedModel, name: str, feeds: dict[int, dict[str, np.ndarray]], seq_len: int,
                    device: str) -> dict[str, Any]:
    """Where the memory of one forward pass of the fp32 baseline goes, on the harness's own
    input at its smallest batch (the report's memory-profile section)."""
    from slimkit.memory.profiler import profile

    feed = feeds[min(feeds)]
    inputs = {k: torch.from_numpy(v).to(device) for k, v in feed.items()}
    shapes = {k: list(v.shape) for k, v in inputs.items()}
    return {"model": name, "inputs": shapes, "seq_len": seq_len,
            **profile(model.module.to(device), inputs).to_dict()}


def _call(runner, feed: dict[str, np.ndarray]):
    return lambda: runner(feed["input_ids"], feed["attention_mask"], feed["token_type_ids"])


def _remove_workdir(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _calibration_feeds(model: LoadedModel, data: TextClassificationData, n: int) -> list[dict[str, np.ndarray]]:
    """Single sentences from the train split, as static quantization calibrates on them."""
    feeds = []
    for text in data.train_texts[:n]:
        enc = model.tokenizer(text, truncation=True, max_length=128, return_tensors="np")
        ids = enc["input_ids"].astype(np.int64)
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
    return feeds


def _accuracy(variants, runners, model, data, results, bar) -> None:
    train = TokenizedTexts(model.tokenizer, data.train_texts, 128)
    test = TokenizedTexts(model.tokenizer, data.test_texts, 128)
    ref_train = ref_test = head = ref_nn = base_acc = None
    for v in variants:
        step = bar.add_task(f"accuracy, {v.name}", total=len(train) + len(test))
        tr = embed(runners[v.name], train, progress=lambda k, s=step: bar.advance(s, k))
        te = embed(runners[v.name], test, progress=lambda k, s=step: bar.advance(s, k))
        if v.name == BASELINE:
            ref_train, ref_test = tr, te
            head = fit_head(ref_train, data.train_labels)
            ref_nn = nearest_neighbours(ref_test)
            base_acc = float((head.predict(te) == data.test_labels).mean())
        results[v.name]["accuracy"] = task_metrics(head, ref_test, ref_nn, te, data.test_labels, tr, data.train_labels, base_acc)


def _energy(variants, seq_len, results, runners, feeds, device) -> None:
    ids = torch.from_numpy(feeds[min(feeds)]["input_ids"][:1, :seq_len])
    counted: dict[int, tuple] = {}  # MACs of each distinct base model, counted once
    for v in variants:
        if id(v.base) not in counted:
            module = v.base.module
            counted[id(v.base)] = (
                *energy_mod.linear_macs(module, (ids, torch.ones_like(ids), torch.zeros_like(ids))),
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
        read = energy_mod.weight_bytes_read(v.weights_file.stat().st_size, tables, int8_stored, ids.shape[1])
        est = energy_mod.estimate(total, per_layer, low, read)
        batch = min(feeds)
        measured = energy_mod.measured_energy(_call(runners[v.name], feeds[batch]), device)
        if measured is not None:  # per sequence, as the estimate is
            measured["mj_per_inference"] /= batch
        est["measured"] = measured
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


def _metrics(recipe: Recipe, variants: list[Variant], results: dict, data: TextClassificationData, device: str) -> dict:
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
        "task": {"name": data.name, "train_size": len(data.train_texts), "test_size": len(data.test_texts)},
        "baseline": BASELINE,
        "variants": out_variants,
    }
