"""``slimkit export``: any slimkit model to ONNX at a precision, checked against PyTorch.

A thin layer over the recipe stages: ``export`` then, by precision, ``ort_fp16``,
``ort_dynamic_int8`` or ``ort_static_int8`` (calibrated on the task's train split), then
:func:`slimkit.save`. Before anything is written, ONNX Runtime's outputs are compared
with the PyTorch model's on the task's inputs: fp32 must match within a max absolute
difference of 1e-4 and a cosine of 0.99999, fp16 within a cosine of 0.9999. Static int8
of a quantization-aware trained model is held to its PyTorch int8 twin (the same trained
ranges, cosine 0.9999); other int8 is compared with float PyTorch and its agreement
reported.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from slimkit import serialize
from slimkit.atomic import atomic_dir
from slimkit.deploy.export import ExportConfig
from slimkit.deploy.onnx_model import OnnxModel
from slimkit.errors import ConfigError, SlimkitError
from slimkit.measure.runners import make_runner
from slimkit.quantize import OrtDynamicInt8Config, OrtFp16Config, OrtStaticInt8Config

PRECISIONS: dict[str, list[Any]] = {
    "fp32": [],
    "fp16": [OrtFp16Config()],
    "int8-dynamic": [OrtDynamicInt8Config()],
    "int8-static": [OrtStaticInt8Config()],
}
# (largest absolute difference, smallest cosine) ONNX Runtime must keep to PyTorch's outputs.
TOLERANCES = {"fp32": (1e-4, 0.99999), "fp16": (None, 0.9999)}
# Static int8 of a quantization-aware trained model against its PyTorch int8 twin: the
# same rounding of the same inputs and weights, so only summation order differs.
TWIN_TOLERANCE = (None, 0.9999)


class ExportMismatch(SlimkitError):
    """ONNX Runtime's outputs differ from PyTorch's beyond the precision's tolerance."""


def run_recipe(folder: str | Path) -> Any:
    """The recipe of the run folder ``folder``, or None when it is not one."""
    from slimkit.recipe import Recipe

    path = Path(folder) / "recipe.yaml"
    return Recipe.from_file(path) if path.is_file() else None


def _source(source: str) -> tuple[Any, Any]:
    """The PyTorch model ``source`` names, and the recipe of the run it comes from (or None)."""
    path = Path(source)
    recipe = run_recipe(path)
    model = serialize.load(path) if (path / serialize.META).is_file() else serialize.load_model(source)
    if isinstance(model, OnnxModel):
        raise ConfigError(f"{source}: the model is already ONNX ({model.path.name}); export its PyTorch source, "
                          "such as the run's variants/fp32 folder")
    return model, recipe


def task_workload(model: Any, recipe: Any, recipe_file: str | None) -> Any:
    """The inputs ``model`` is checked or timed on: the task of ``recipe_file`` if given,
    else of ``recipe`` (a run's), else the offline sentence task for a text model; None
    for a model with neither."""
    from slimkit.measure.workloads import workload_for
    from slimkit.recipe import Recipe, TaskSpec

    if recipe_file:
        recipe = Recipe.from_file(recipe_file)
    if recipe is not None:
        return workload_for(recipe.spec.task, model, recipe.spec.measure.seq_len)
    if model.tokenizer is not None:
        return workload_for(TaskSpec(), model)  # real sentences of the offline text task
    return None


def int8_twin(model: Any) -> Any:
    """The PyTorch model that computes what static int8 under ONNX Runtime should, or None.

    A quantization-aware trained model converted for ONNX Runtime keeps float layers and
    records each one's trained input range; ``ort_static_int8`` puts those ranges into the
    graph. Its twin is the same model with those layers as PyTorch's static int8 layers
    (:class:`~slimkit.quantize.static_int8.StaticInt8Conv2d` and ``Linear``): inputs
    rounded to the trained uint8 grid, weights to per-channel int8, sums exact.
    """
    from slimkit.quantize import quantize_
    from slimkit.quantize.api import transforms_of
    from slimkit.registry import config_from_dict

    for t in transforms_of(model.module):
        config = t["config"]
        if config["method"] == "static_int8" and config.get("target") == "onnxruntime" and t["layers"]:
            twin = model.clone()
            quantize_(twin.module, config_from_dict(config).replay_on(t["layers"]).model_copy(update={"target": "torch"}))
            return twin
    return None


def compare(reference: np.ndarray, found: np.ndarray) -> dict[str, float]:
    """Largest absolute difference and cosine similarity of two outputs."""
    a, b = reference.astype(np.float64).ravel(), found.astype(np.float64).ravel()
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) or 1.0))
    return {"max_abs_diff": float(np.abs(a - b).max()), "cosine": cos}


def export_model(source: str, precision: str, out: str | Path, recipe: str | None = None,
                 calibration_samples: int = 128, threads: int = 1) -> dict[str, Any]:
    """Export ``source`` to ONNX at ``precision`` into ``out``, after checking it against PyTorch.

    Args:
        source: a run folder (its output model, its recipe's task), a saved model folder,
            or any ``model:`` source of a recipe.
        precision: ``fp32``, ``fp16``, ``int8-dynamic`` or ``int8-static``.
        out: the folder to write (``model.onnx`` + ``slimkit.json``), atomically.
        recipe: a recipe whose task gives the inputs and the calibration data (a run
            folder brings its own).
        calibration_samples: train-split examples for ``int8-static``.

    Returns:
        ``{"precision", "max_abs_diff", "cosine", "reference", "output"}``; ``reference``
        is ``int8-twin`` when static int8 was checked against :func:`int8_twin`, else
        ``pytorch``.

    Raises:
        ConfigError: an unknown precision, a model already in ONNX, or static int8
            without a task to calibrate on.
        ExportMismatch: ONNX Runtime's outputs differ from PyTorch's beyond the tolerance;
            nothing is written.
    """
    from slimkit.runner import StageContext, apply_stages

    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    model, run_recipe = _source(source)
    workload = task_workload(model, run_recipe, recipe)
    if precision == "int8-static" and workload is None:
        raise ConfigError("int8-static calibrates on the task's train split: export a run folder, or give --recipe "
                          "with the task")
    stages = [ExportConfig()] + [c.model_copy(update={"calibration_samples": calibration_samples})
                                 if isinstance(c, OrtStaticInt8Config) else c for c in PRECISIONS[precision]]
    if workload is not None:
        feed = workload.timing_feed(4)
        inputs = tuple(feed.values())
        if workload.kind == "image":
            model.example_inputs = (workload.example_input(),)
    elif model.example_inputs:
        inputs = tuple(t.detach().numpy() for t in model.example_inputs)
    else:
        raise ConfigError(f"{source}: no task and no example inputs to check the export with; give --recipe")
    with tempfile.TemporaryDirectory(prefix="slimkit-export-") as work:
        context = StageContext(workload, calibration_samples)
        onnx_model, _ = apply_stages(model, stages, Path(work), context)
        twin = int8_twin(model) if precision == "int8-static" else None
        reference = make_runner(twin or model, threads)(*inputs)
        found = make_runner(onnx_model, threads)(*inputs)
        agreement = compare(reference, found)
        limit_abs, limit_cos = TWIN_TOLERANCE if twin is not None else TOLERANCES.get(precision, (None, None))
        against = "its PyTorch int8 twin's (trained ranges)" if twin is not None else "PyTorch's"
        if (limit_abs is not None and agreement["max_abs_diff"] > limit_abs) or (
                limit_cos is not None and agreement["cosine"] < limit_cos):
            raise ExportMismatch(
                f"{precision}: ONNX Runtime's outputs differ from {against} (max abs diff "
                f"{agreement['max_abs_diff']:.3g}, cosine {agreement['cosine']:.6f}; allowed {limit_abs} and "
                f"{limit_cos}); nothing written. An operator may export with other semantics: check the model's "
                "custom layers")
        with atomic_dir(out) as tmp:
            serialize.save(onnx_model, tmp)
    return {"precision": precision, **agreement, "reference": "int8-twin" if twin is not None else "pytorch",
            "output": str(out)}
