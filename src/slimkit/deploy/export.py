"""Export to ONNX, with ONNX Runtime's transformer fusions where the model allows them."""

from __future__ import annotations

import re
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch

from slimkit.config import SlimConfig
from slimkit.deploy.onnx_model import OnnxModel, external_tensors, one_data_file
from slimkit.errors import SlimkitError
from slimkit.registry import register
from slimkit.zoo.models import LoadedModel, TextEncoder

FUSABLE_MODEL_TYPES = {"bert", "roberta", "distilbert", "xlm-roberta", "electra"}


class ExportConfig(SlimConfig):
    """Export a PyTorch model to ONNX.

    Attributes:
        opset: ONNX opset version.
        optimize: ``auto`` fuses attention, GELU and the embeddings with ONNX Runtime's
            transformer optimizer when the model is a BERT-family encoder; ``none`` keeps
            the exported graph. The residual additions stay apart from their layer norms
            (see :data:`slimkit.deploy.ort_runtime.DISABLED_FUSIONS`).
    """

    kind = "export"
    method = "onnx"
    opset: int = 17
    optimize: Literal["auto", "none"] = "auto"


@contextmanager
def _eager_attention(module: torch.nn.Module):
    """Trace Hugging Face attention in its eager form (matmul, softmax, matmul), the
    pattern ONNX Runtime fuses into one Attention kernel; restore the module afterwards."""
    backbone = getattr(module, "backbone", None)
    before = getattr(getattr(backbone, "config", None), "_attn_implementation", None)
    if before is None or before == "eager" or not hasattr(backbone, "set_attn_implementation"):
        yield
        return
    backbone.set_attn_implementation("eager")
    try:
        yield
    finally:
        backbone.set_attn_implementation(before)


@register(ExportConfig)
def export(model: LoadedModel, config: ExportConfig | None = None, workdir: Path | None = None, **_) -> OnnxModel:
    """Export ``model`` to an ONNX file under ``workdir`` and return it as an :class:`OnnxModel`."""
    config = config or ExportConfig()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="slimkit-onnx-"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "model.export.onnx"
    module = model.module.eval()
    from slimkit.quantize.pt2e import Pt2eInt8Module

    if isinstance(module, Pt2eInt8Module):
        raise SlimkitError("a pt2e_static_int8 model is a captured PyTorch program, which has no ONNX export; "
                           "export the float model and quantize it with ort_static_int8")
    if isinstance(module, TextEncoder):
        ids = torch.full((1, 16), 1000, dtype=torch.long)
        args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
        names = ["input_ids", "attention_mask", "token_type_ids"]
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
        axes["embedding"] = {0: "batch"}
        outputs = ["embedding"]
    else:
        args = tuple(model.example_inputs)
        if not args:
            raise SlimkitError("the model has no example inputs; return (module, example_inputs) from its loader")
        names = [f"input_{i}" for i in range(len(args))]
        axes = {n: {0: "batch"} for n in names}
        outputs = ["output"]
    with warnings.catch_warnings(), torch.no_grad(), _eager_attention(module):
        warnings.simplefilter("ignore")
        try:
            # The TorchScript exporter names nodes by module path and produces the attention
            # pattern that ONNX Runtime's optimizer fuses; the dynamo exporter does neither yet.
            torch.onnx.export(
                module, args, str(path), input_names=names, output_names=outputs,
                dynamic_axes=axes, opset_version=config.opset, dynamo=False,
            )
        except torch.onnx.errors.UnsupportedOperatorError as e:
            path.unlink(missing_ok=True)
            found = re.search(r"'(\w+)::([\w.]+)'", str(e))
            op = found.group(2) if found else None
            layer = _layer_calling(module, args, op) if op else None
            where = f" in layer {layer[0]!r} ({layer[1]})" if layer else ""
            raise SlimkitError(
                f"operator {found.group(0) if found else e}{where} has no ONNX export at opset {config.opset}; "
                "rewrite the layer with operators ONNX has, register a symbolic for it "
                "(torch.onnx.register_custom_op_symbolic), or try a higher export.opset") from None
    import onnx

    # Over 2 GB the exporter writes each weight to its own file; keep one beside the model.
    external = bool(external_tensors(onnx.load(str(path), load_external_data=False)))
    if external:
        one_data_file(path)
    hf = model.spec.get("hf_config", {})
    if config.optimize == "auto" and hf.get("model_type") in FUSABLE_MODEL_TYPES:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        fusions = FusionOptions("bert")
        # Add + LayerNormalization runs faster than the fused SkipLayerNormalization
        # kernel on CPU; ort_runtime.DISABLED_FUSIONS says why and by how much.
        fusions.enable_skip_layer_norm = fusions.enable_bias_skip_layer_norm = False
        opt = optimize_model(
            str(path), model_type="bert", num_heads=hf["num_attention_heads"], hidden_size=hf["hidden_size"],
            optimization_options=fusions,
        )
        _per_layer_heads(opt.model.graph, hf["hidden_size"] // hf["num_attention_heads"])
        fused = workdir / "model.fused.onnx"
        opt.save_model_to_file(str(fused), use_external_data_format=external)
        path.unlink()
        path.with_name(f"{path.name}.data").unlink(missing_ok=True)
        path = fused
    return OnnxModel(path, dict(model.spec), model.tokenizer, model.max_seq_len, workdir)


def _layer_calling(module: torch.nn.Module, args: tuple, op: str) -> tuple[str, str] | None:
    """The qualified name and type of the innermost layer whose forward calls ATen ``op``."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.module_tracker import ModuleTracker

    root = type(module).__name__
    found: list[str] = []
    with ModuleTracker() as tracker:
        class Spy(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not found and func.__name__.split(".")[0] == op:
                    found.append(max(tracker.parents, key=len))
                return func(*args, **(kwargs or {}))

        try:
            with torch.no_grad(), Spy():
                module(*args)
        except Exception:  # noqa: BLE001 - naming the layer is a courtesy; the export error stands
            return None
    if not found or found[0] in ("Global", root):
        return None
    name = found[0].removeprefix(f"{root}.")
    return name, type(module.get_submodule(name)).__name__


def _per_layer_heads(graph, head_size: int) -> None:
    """Give each fused Attention node its own layer's head count.

    The optimizer stamps every node with the model-wide count; a layer whose heads were
    pruned has fewer, read here from the width of its query projection.
    """
    weights = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "Attention" or len(node.input) < 2 or node.input[1] not in weights:
            continue
        sizes = next((list(a.ints) for a in node.attribute if a.name == "qkv_hidden_sizes"), None)
        q_width = sizes[0] if sizes else weights[node.input[1]].dims[1] // 3
        for a in node.attribute:
            if a.name == "num_heads":
                a.i = q_width // head_size
