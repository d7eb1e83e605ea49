"""Recipes: a model, a task, stages and what to measure, validated before anything runs.

Every mistake in a recipe is reported at once, each with its key path and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slimkit.config import SlimConfig, format_validation_error
from slimkit.errors import ConfigError
from slimkit.parallel.config import ParallelConfig
from slimkit.stages import config_class, kinds, methods

RECIPE_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskSpec(_Strict):
    """The task, text or images; limits take the first examples of each split.

    Text: ``rt-polarity`` or a CSV with ``text_column`` and ``label_column``. Images:
    ``fashion-mnist``, a folder laid out ``train/<class>/*.png`` and ``test/<class>/*.png``,
    or a CSV of image paths (``image_column``) and labels (``label_column``), split 80/20
    by a fixed seed. Images are fed to the model at ``image_size`` with ``channels``
    channels and ``normalize`` applied (see :class:`slimkit.zoo.images.ImageInput`).
    """

    source: str = "rt-polarity"
    text_column: str = "text"
    label_column: str = "label"
    image_column: str | None = None
    image_size: int | Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=2, max_length=2)] | None = None
    channels: Literal[1, 3] = 3
    normalize: Literal["imagenet", "none"] = "imagenet"
    color: Literal["grey", "rgb"] = "grey"
    train_limit: int | None = Field(None, ge=2)
    test_limit: int | None = Field(None, ge=1)

    @field_validator("image_size")
    @classmethod
    def _positive(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("image_size: give a positive side, or [height, width]")
        return v


class MeasureSpec(_Strict):
    """Harness settings, the same for every variant."""

    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 8], min_length=1)
    seq_len: int = Field(128, ge=4)
    threads: int = Field(2, ge=1)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    rounds: int = Field(7, ge=1)
    iters: int = Field(10, ge=1)
    warmup: int = Field(3, ge=0)
    settle_ms: float = Field(50.0, ge=0)
    accuracy: bool = True
    memory: bool = True
    memory_profile: bool = True
    energy: bool = True
    # Device profiles (shipped names or YAML files) each variant's latency and energy are
    # estimated on, from its counted operations and bytes (see slimkit.deploy.devices).
    devices: list[str] = Field(default_factory=list)


class VariantSpec(_Strict):
    """A variant measured beside the output: its own stages, on the recipe's model unless
    ``model`` names another (a distilled student, say), measured against the same baseline."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: str | None = None
    stages: list[Any] = Field(default_factory=list)


class RecipeSpec(_Strict):
    version: int = RECIPE_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: str
    task: TaskSpec = Field(default_factory=TaskSpec)
    # Stages that make the baseline every variant is measured against, such as fine-tuning
    # a pretrained backbone on the task; PyTorch stages only.
    prepare: list[Any] = Field(default_factory=list)
    variant: str = Field("output", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    stages: list[Any] = Field(min_length=1)
    compare: list[VariantSpec] = Field(default_factory=list)
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    # How the train and distill stages run: one process, or workers under a strategy.
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    output: str | None = None


class Recipe:
    """A validated recipe: its raw spec and the typed configs of every stage.

    Attributes:
        spec: the validated recipe fields.
        prepare: typed configs of the stages that make the baseline.
        stages: typed configs of the output pipeline, in order.
        compare: ``(name, [configs])`` of each variant measured beside it.
        compare_models: variant name -> model source, for variants of another model.
        raw: the recipe as a plain dict (with overrides applied), saved in the run folder.
    """

    def __init__(self, spec: RecipeSpec, stages: list[SlimConfig], compare: list[tuple[str, list[SlimConfig]]], raw: dict,
                 compare_models: dict[str, str] | None = None, prepare: list[SlimConfig] | None = None):
        self.spec, self.stages, self.compare, self.raw = spec, stages, compare, raw
        self.compare_models = compare_models or {}
        self.prepare = prepare or []

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Recipe:
        problems: list[str] = []
        if not isinstance(raw, dict):
            raise ConfigError(f"a recipe is a mapping of keys to values, not {type(raw).__name__}")
        if raw.get("version", RECIPE_VERSION) != RECIPE_VERSION:
            problems.append(f"version: {raw.get('version')!r} is not supported; use version: {RECIPE_VERSION}")
        try:
            spec = RecipeSpec.model_validate(raw)
        except ValidationError as err:
            problems += format_validation_error(err)
            spec = None
        prepare = parse_stages(raw.get("prepare") or [], "prepare", problems)
        for i, cfg in enumerate(prepare):
            if cfg.kind == "export" or cfg.method.startswith("ort_"):
                problems.append(f"prepare[{i}]: the baseline stays a PyTorch model; move {cfg.kind} "
                                f"{cfg.method!r} into stages")
        stages = parse_stages(raw.get("stages") or [], "stages", problems)
        compare = []
        if raw.get("variant") == "fp32":
            problems.append("variant: 'fp32' is the name of the baseline; give the output variant another name")
        names = {raw.get("variant", "output"), "fp32"}
        for i, v in enumerate(raw.get("compare") or []):
            if isinstance(v, dict):
                if v.get("name") in names:
                    problems.append(f"compare[{i}].name: {v.get('name')!r} is used twice (fp32 is the baseline); give each variant its own name")
                names.add(v.get("name"))
                compare.append((v.get("name"), parse_stages(v.get("stages") or [], f"compare[{i}].stages", problems)))
        if spec is not None:
            from slimkit.deploy.devices import load_profile

            for i, name in enumerate(spec.measure.devices):
                try:
                    load_profile(name)
                except ConfigError as e:
                    problems += [f"measure.devices[{i}]: {p}" for p in e.problems]
            if spec.measure.devices and not spec.measure.energy:
                problems.append("measure.devices: device estimates come from the energy count; set measure.energy: true")
        if spec is not None and spec.parallel.distributed:
            training = [c for c in prepare + stages + [c for _, cs in compare for c in cs] if c.kind in ("train", "distill")]
            if not training:
                problems.append(f"parallel.strategy: {spec.parallel.strategy} runs train and distill stages, and the "
                                "recipe has none; remove the parallel section or add a training stage")
        if problems:
            raise ConfigError(problems)
        models = {v.name: v.model for v in spec.compare if v.model}
        return cls(spec, stages, compare, raw, models, prepare)

    @classmethod
    def from_file(cls, path: str | Path, overrides: list[str] | None = None) -> Recipe:
        """Read a YAML recipe and apply ``key.path=value`` overrides before validating."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such recipe file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        raw = raw or {}
        for item in overrides or []:
            apply_override(raw, item)
        return cls.from_dict(raw)


def apply_override(raw: dict, item: str) -> None:
    """Set ``a.b.c=value`` in ``raw``; the value is read as YAML (``3``, ``true``, ``[1, 8]``).

    A number in the path indexes a list: ``stages.1.train.max_steps=100`` changes the
    second stage.
    """
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: write it as key.path=value, e.g. measure.rounds=3")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
    node: Any = raw
    parts = key.split(".")
    for depth, p in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                where = ".".join(parts[:depth]) or "the recipe"
                raise ConfigError(f"override {item!r}: {where} is a list of {len(node)}; index it with 0 to {len(node) - 1}")
            if last:
                node[int(p)] = parsed
            else:
                node = node[int(p)]
        elif isinstance(node, dict):
            if last:
                node[p] = parsed
            else:
                node = node.setdefault(p, {})
        else:
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth])} is a value, not a mapping or list")


def parse_stages(stages: list, where: str, problems: list[str]) -> list[SlimConfig]:
    """Typed configs for ``stages``; mistakes are appended to ``problems``."""
    out: list[SlimConfig] = []
    exported = False
    unexportable: list[tuple[int, SlimConfig]] = []
    prepared: int | None = None  # the qat_int8 stage not yet converted
    checkpointing: int | None = None  # a checkpoint stage no training has followed yet
    arena: int | None = None
    for i, stage in enumerate(stages):
        path = f"{where}[{i}]"
        if not isinstance(stage, dict) or len(stage) != 1:
            problems.append(f"{path}: a stage is a mapping with one key, the stage kind ({', '.join(kinds())}), e.g. `- quantize: {{method: dynamic_int8}}`")
            continue
        kind, body = next(iter(stage.items()))
        if body is not None and not isinstance(body, dict):
            problems.append(f"{path}.{kind}: expected a mapping such as {{method: ...}}, got {body!r}")
            continue
        body = dict(body or {})
        if kind not in kinds():
            problems.append(f"{path}: unknown stage {kind!r}; known stages: {', '.join(kinds())}")
            continue
        method = body.pop("method", None) or _default_method(kind, exported)
        if kind == "export":
            if exported:
                problems.append(f"{path}: the model is already exported; keep one export stage")
            # Counted even when its fields are wrong, so later stages are judged in the
            # right place and the user is not told to add an export they already have.
            exported = True
        cls = config_class(kind, method) if method else None
        if cls is None and method is None:
            # A stage kind with several methods and no default for where the model is
            # (prune: channels for CNNs, transformer_structured for encoders).
            problems.append(f"{path}.{kind}.method: required for a {kind} stage; choose one of {', '.join(methods(kind))}")
            continue
        if cls is None:
            problems.append(f"{path}.{kind}.method: unknown method {method!r}; choose one of {', '.join(methods(kind))}")
            continue
        try:
            cfg = cls.model_validate(body)
        except ValidationError as err:
            problems += format_validation_error(err, f"{path}.{kind}")
            continue
        onnx_method = method.startswith("ort_")
        if kind != "export" and onnx_method and not exported:
            problems.append(f"{path}.{kind}: method {method!r} works on an ONNX model; put an `export` stage before it")
        elif kind != "export" and exported and not onnx_method:
            problems.append(f"{path}.{kind}: method {method!r} works on a PyTorch model but the model is already exported; move it before the export stage or use an ort_* method")
        if kind == "quantize" and method == "qat_int8":
            prepared = i
        elif kind == "convert":
            if prepared is None:
                problems.append(f"{path}.convert: nothing to convert; put a `quantize: {{method: qat_int8}}` stage "
                                "(and a train stage) before it")
            prepared = None
        if kind == "checkpoint":
            checkpointing = i
        elif kind in ("train", "distill"):
            checkpointing = None
        elif kind == "arena":
            arena = i
        if kind == "export" and arena is not None:
            problems.append(f"{where}[{arena}].arena: the arena serves a PyTorch model, but {path} exports it to "
                            "ONNX Runtime; keep one of the two")
        if kind == "export" and prepared is not None:
            problems.append(f"{where}[{prepared}].quantize: the fake-quantized layers of qat_int8 must be converted "
                            f"before {path}.export; add a `convert: {{}}` stage after its training")
        if kind == "export":
            for j, earlier in unexportable:
                problems.append(
                    f"{where}[{j}].quantize: method {earlier.method!r} computes with {NOT_EXPORTABLE[earlier.method]}, "
                    f"which has no ONNX export, so {path}.export would fail on every layer it quantized "
                    f"(targets {list(earlier.layers.targets)}, ignore {list(earlier.layers.ignore)}); "
                    f"export first and quantize the ONNX model with {ONNX_INSTEAD[earlier.method]}")
            unexportable.clear()
        elif kind == "quantize" and method in NOT_EXPORTABLE and not exported:
            unexportable.append((i, cfg))
        out.append(cfg)
    if checkpointing is not None:
        problems.append(f"{where}[{checkpointing}].checkpoint: no train or distill stage follows it; put it before "
                        "the training it is for")
    return out


# PyTorch quantization methods whose layers ONNX cannot express, with the operator that
# stops the export and the ONNX Runtime method that computes the same thing.
NOT_EXPORTABLE = {
    "dynamic_int8": "the operator quantized::linear_dynamic (fbgemm's packed int8 GEMM)",
    "int4_weight_only": "packed uint4 weights unpacked by bit shifts at every call (ONNX would hold float "
                        "weights rebuilt per call, not MatMulNBits)",
    "pt2e_static_int8": "a captured program of torchao's quantize/dequantize operators lowered by Inductor",
}
ONNX_INSTEAD = {"dynamic_int8": "ort_dynamic_int8", "int4_weight_only": "ort_dynamic_int8 or ort_static_int8",
                "pt2e_static_int8": "ort_static_int8"}

# Without a method, a stage takes the fastest faithful one for where the model is: on an
# exported model ONNX Runtime's dynamic int8, on a PyTorch model PyTorch's.
DEFAULT_METHODS = {("quantize", False): "dynamic_int8", ("quantize", True): "ort_dynamic_int8"}


def _default_method(kind: str, exported: bool) -> str | None:
    options = methods(kind)
    if len(options) == 1:
        return options[0]
    return DEFAULT_METHODS.get((kind, exported))
