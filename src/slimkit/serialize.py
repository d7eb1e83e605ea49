"""Saving and loading models as safetensors (or ONNX) plus ``slimkit.json``.

``slimkit.json`` says how to rebuild the architecture (the model spec) and which
transforms were applied, in order, to which layers. Loading rebuilds the architecture,
replays the transforms on it to get the right module types and shapes, then loads the
weights: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors

from slimkit import __version__
from slimkit.atomic import write_json, write_with
from slimkit.deploy.onnx_model import OnnxModel
from slimkit.errors import ModelLoadError
from slimkit.quantize.api import TRANSFORMS_ATTR, transforms_of
from slimkit.stages import config_class, config_from_dict, handler_for
from slimkit.zoo.models import LoadedModel, build_from_spec
from slimkit.zoo.models import load_model as load_pretrained

FORMAT = "slimkit.model"
FORMAT_VERSION = 1
META = "slimkit.json"


def save(model: LoadedModel | OnnxModel, folder: str | Path) -> dict[str, Any]:
    """Write ``model`` into ``folder`` (each file atomically) and return its description."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(model, OnnxModel):
        framework, weights, transforms = "onnx", "model.onnx", list(model._slimkit_transforms)
        model.save(folder / weights)
    else:
        framework, weights, transforms = "torch", "model.safetensors", transforms_of(model.module)
        write_with(folder / weights, lambda tmp: save_safetensors(model.module, str(tmp)))
    if model.tokenizer is not None:
        tok_dir = folder / "tokenizer"
        shutil.rmtree(tok_dir, ignore_errors=True)
        model.tokenizer.save_pretrained(str(tok_dir))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "slimkit_version": __version__,
        "framework": framework,
        "weights": weights,
        "spec": model.spec,
        "max_seq_len": model.max_seq_len,
        "transforms": transforms,
        "tokenizer": "tokenizer" if model.tokenizer is not None else None,
    }
    write_json(folder / META, meta)
    return meta


def read_meta(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    try:
        meta = json.loads((folder / META).read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{folder}: no {META}; this is not a model saved by slimkit") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{folder / META}: corrupt JSON ({e}); save the model again") from None
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise ModelLoadError(
            f"{folder / META}: format {meta.get('format')!r} v{meta.get('format_version')} is not "
            f"one this slimkit ({__version__}) reads; upgrade slimkit"
        )
    if not (folder / meta["weights"]).is_file():
        raise ModelLoadError(f"{folder}: weights file {meta['weights']!r} is missing")
    return meta


def load(folder: str | Path) -> LoadedModel | OnnxModel:
    """Load a model saved by :func:`save`; it gives the same outputs as when saved."""
    folder = Path(folder)
    meta = read_meta(folder)
    tok_dir = folder / meta["tokenizer"] if meta.get("tokenizer") else None
    if meta["framework"] == "onnx":
        tokenizer = None
        if tok_dir is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        m = OnnxModel(folder / meta["weights"], meta["spec"], tokenizer, meta.get("max_seq_len"), folder)
        m._slimkit_transforms = meta["transforms"]
        return m
    model = architecture(meta["spec"], meta["transforms"], tok_dir)
    try:
        load_safetensors(model.module, str(folder / meta["weights"]), strict=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise ModelLoadError(
            f"{folder / meta['weights']}: cannot load the weights ({str(e).splitlines()[0]}); "
            "the file is corrupt or does not match slimkit.json"
        ) from None
    model.module.eval()
    return model


def architecture(spec: dict[str, Any], transforms: list[dict[str, Any]], tokenizer_dir: Path | None = None) -> LoadedModel:
    """The model ``spec`` describes with ``transforms`` replayed on it (the module types and
    shapes of the saved model), its weights zero: ready for a state dict."""
    model = build_from_spec(spec, tokenizer_dir)
    with torch.no_grad():
        for p in model.module.parameters():
            p.zero_()
    replay_transforms(model, transforms)
    return model


def changes_structure(transform: dict[str, Any]) -> bool:
    """Whether replaying a recorded transform changes module types or shapes."""
    return bool(transform["layers"]) or getattr(config_class(transform["config"]["kind"], transform["config"]["method"]),
                                                "replaces_module", False)


def replay_transforms(model: LoadedModel, transforms: list[dict[str, Any]]) -> None:
    """Replay ``transforms`` on ``model`` (in place): the module types and shapes they gave."""
    for t in transforms:
        if not changes_structure(t):
            continue
        config = config_from_dict(t["config"]).replay_on(t["layers"])
        if getattr(config, "replaces_module", False):
            handler_for(config)(model, config)  # it puts its program in model.module
        else:
            handler_for(config)(model.module, config)
    object.__setattr__(model.module, TRANSFORMS_ATTR, list(transforms))


def load_model(source: str) -> LoadedModel:
    """Load a PyTorch model from any source a recipe's ``model:`` names.

    Args:
        source: a folder saved by :func:`save`, or what
            :func:`slimkit.zoo.load_model` takes: a zoo name (``minilm-l6``,
            ``mobilenet-v2``), a local Hugging Face model directory, or
            ``package.module:function`` naming a callable that returns an ``nn.Module``
            or a ``(module, example_inputs)`` pair.

    Raises:
        ModelLoadError: the source does not exist, its files are missing or corrupt, or
            it holds an ONNX model.
    """
    path = Path(source)
    if not (path.is_dir() and (path / "slimkit.json").is_file()):
        return load_pretrained(source)
    saved = load(path)
    if not isinstance(saved, LoadedModel):
        raise ModelLoadError(f"{path} holds an ONNX model; give the PyTorch model it came from")
    return saved
