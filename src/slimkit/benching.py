"""``slimkit bench``: a model, or every variant of a run, across backends, threads and batches.

The foundation's harness measures all of it: interleaved rounds, warm-up, medians, ratios
taken within a round against the first variant's first backend at the same thread count
and batch. A PyTorch model is measured in eager PyTorch (``torch``), through
``torch.compile`` (``compiled``: Inductor, compiled in the warm-up) and, exported, under
ONNX Runtime (``ort``); an ONNX model under ONNX Runtime. A PT2E int8 model is a
compiled program already and has no ONNX export, so it is measured as ``torch`` only. The inputs are the task's (a run folder's
recipe, ``--recipe``, or the offline sentence task for a text model).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from slimkit import serialize
from slimkit.deploy.export import ExportConfig
from slimkit.deploy.onnx_model import OnnxModel
from slimkit.errors import ConfigError
from slimkit.exporting import run_recipe, task_workload
from slimkit.measure.latency import measure_latency
from slimkit.measure.runners import make_runner
from slimkit.quantize.pt2e import Pt2eInt8Module
from slimkit.zoo.loaded import LoadedModel

BACKENDS = ("torch", "compiled", "ort")


def _models(source: str) -> tuple[dict[str, Any], Any]:
    """Name -> model of ``source`` (a run folder's variants, or one model), and the run's recipe."""
    path = Path(source)
    recipe = run_recipe(path)
    if (path / "variants").is_dir():
        found = {p.name: serialize.load(p) for p in sorted((path / "variants").iterdir()) if (p / serialize.META).is_file()}
        baseline = found.pop("fp32", None)  # the baseline first: ratios are to it
        models = ({"fp32": baseline} if baseline is not None else {}) | found
    elif (path / serialize.META).is_file():
        models = {path.name: serialize.load(path)}
    else:
        models = {source: serialize.load_model(source)}
    if not models:
        raise ConfigError(f"{source}: no saved model or run variants to measure")
    return models, recipe


def compiled(model: LoadedModel) -> LoadedModel:
    """``model`` with its module through ``torch.compile`` (Inductor; a dynamic batch axis),
    compiled at its first call."""
    import torch

    return LoadedModel(torch.compile(model.module.eval(), dynamic=True), model.spec, model.tokenizer,
                       model.max_seq_len, model.example_inputs)


def bench(source: str, threads: list[int], batch_sizes: list[int], backends: list[str], recipe: str | None = None,
          rounds: int = 5, iters: int = 10, warmup: int = 3) -> dict[str, Any]:
    """Measure ``source`` at each thread count and batch size under each backend.

    Returns:
        ``{"rows": [{"variant", "backend", "threads", "batch", "median_ms", "p10_ms",
        "p90_ms", "throughput_per_s", "ratio_to_reference"}], "reference", ...}``.
    """
    from slimkit.runner import StageContext, apply_stages

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise ConfigError(f"--backends {','.join(backends)}: choose among {', '.join(BACKENDS)}")
    if not threads or min(threads) < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError("--threads and --batch-sizes take positive numbers, e.g. --threads 1,2 --batch-sizes 1,8")
    models, recipe_of_run = _models(source)
    workload = task_workload(next(iter(models.values())), recipe_of_run, recipe)
    if workload is None:
        raise ConfigError(f"{source}: an image model needs its task's inputs; bench a run folder or give --recipe")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="slimkit-bench-") as work:
        variants: dict[str, Any] = {}
        for name, model in models.items():
            if isinstance(model, OnnxModel):
                if "ort" in backends:
                    variants[f"{name}/ort"] = model
                continue
            if workload.kind == "image":
                model.example_inputs = (workload.example_input(),)
            if "torch" in backends:
                variants[f"{name}/torch"] = model
            if isinstance(model.module, Pt2eInt8Module):
                continue
            if "compiled" in backends:
                variants[f"{name}/compiled"] = compiled(model)
            if "ort" in backends:
                variants[f"{name}/ort"], _ = apply_stages(model, [ExportConfig()], Path(work) / name, StageContext(workload))
        if not variants:
            raise ConfigError(f"{source}: nothing to measure with backends {','.join(backends)}")
        reference = next(iter(variants))
        for t in threads:
            runners = {n: make_runner(m, t) for n, m in variants.items()}
            for b in batch_sizes:
                inputs = tuple(workload.timing_feed(b).values())
                calls = {n: (lambda r=r, x=inputs: r(*x)) for n, r in runners.items()}
                for n, stats in measure_latency(calls, reference, b, rounds, iters, warmup).items():
                    variant, backend = n.rsplit("/", 1)
                    rows.append({"variant": variant, "backend": backend, "threads": t, "batch": b,
                                 "median_ms": stats["median_ms"], "p10_ms": stats["p10_ms"], "p90_ms": stats["p90_ms"],
                                 "throughput_per_s": stats["throughput_per_s"],
                                 "ratio_to_reference": stats["ratio_to_baseline"]})
    return {"source": source, "reference": reference, "rounds": rounds, "iters": iters, "warmup": warmup, "rows": rows}


def write_into_run(folder: str | Path, result: dict[str, Any]) -> Path | None:
    """Keep ``result`` in the run folder ``folder`` (``bench.json``) and render the run's
    report again with a section on backends; None when ``folder`` is not a run folder."""
    import json

    from slimkit.atomic import write_json
    from slimkit.report import render_report

    folder = Path(folder)
    if not (folder / "metrics.json").is_file():
        return None
    write_json(folder / "bench.json", result)
    metrics = json.loads((folder / "metrics.json").read_text())
    render_report({**metrics, "bench": result}, folder / "report.html")
    return folder / "report.html"


def table(result: dict[str, Any]) -> str:
    """The rows as a fixed-width text table."""
    head = f"{'variant':<24} {'backend':<7} {'threads':>7} {'batch':>5} {'median ms':>10} {'items/s':>10} {'ratio':>7}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['variant'][:24]:<24} {r['backend']:<7} {r['threads']:>7} {r['batch']:>5} "
                     f"{r['median_ms']:>10.3f} {r['throughput_per_s']:>10.1f} {r['ratio_to_reference']:>7.3f}")
    lines.append(f"ratio: to {result['reference']} at the same threads and batch, within each round")
    return "\n".join(lines)
