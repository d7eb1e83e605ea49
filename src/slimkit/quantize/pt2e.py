"""Static int8 in PyTorch itself: torchao's PT2E flow, compiled by Inductor.

The model is captured whole with ``torch.export`` (dynamic batch and sequence axes),
annotated by torchao's ``X86InductorQuantizer`` (uint8 activations with one calibrated
scale per tensor, int8 weights per output channel, batch norm folded into the
convolution before it), calibrated on train examples and converted. ``torch.compile``
with weight freezing then lowers each quantize -> conv/linear -> dequantize pattern to
oneDNN's int8 kernels on x86 CPUs. Elsewhere (CUDA, ARM) the converted program computes
the same int8 arithmetic as reference PyTorch operators: right, but not faster.

It is for users who stay in PyTorch. For ONNX Runtime and vendor toolchains export first
and use ``ort_static_int8``: the converted program has no ONNX export.

Saving needs no pickle: the program's tensors (int8 weights, their scales, folded biases)
go into safetensors and each activation's scale and zero point into ``slimkit.json``.
Loading captures the architecture again, puts the recorded scales in place of the
observers and converts, then loads the tensors.
"""

from __future__ import annotations

import copy
import importlib.metadata
import logging
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field
from torch import nn

from slimkit.config import LayerSelector, SlimConfig
from slimkit.errors import ConfigError, ModelLoadError
from slimkit.layers import select_modules
from slimkit.registry import register

QUANTIZABLE = (nn.Conv2d, nn.Linear)
ACTIVATION_DTYPES = (torch.uint8, torch.int8)


class Pt2eStaticInt8Config(SlimConfig):
    """Static int8 of a whole PyTorch model with torchao's PT2E flow.

    Attributes:
        calibration_samples: train examples the activation observers see.
        layers: the Conv2d and Linear layers to quantize (default: all of them); the
            others stay in float.
        compile: run the converted program through ``torch.compile`` (Inductor, weights
            frozen), compiled at the first call (and again for a new kind of input);
            False runs it as reference operators, which is slower than float.
        activation_qparams: written when the method runs, not by hand: each activation
            observer's ``[scale, zero_point]``, by node name, which loading puts back.
        inputs: written when the method runs: the dtype and shape of each input the
            program was captured with, which loading captures it with again.
        built_with: written when the method runs: the torch and torchao versions whose
            graph capture named those observers.
    """

    kind = "quantize"
    method = "pt2e_static_int8"
    calibration_samples: int = Field(128, gt=0)
    layers: LayerSelector = Field(default_factory=LayerSelector)
    compile: bool = True
    activation_qparams: dict[str, tuple[float, int]] | None = None
    inputs: list[tuple[str, list[int]]] | None = None
    built_with: dict[str, str] | None = None

    # It replaces the whole module (a captured program), so it takes the LoadedModel.
    replaces_module: ClassVar[bool] = True

    def replay_on(self, layers: list[str]) -> SlimConfig:
        # Loading rebuilds the program from the recorded scales; the layer list came from
        # the selector, which is kept as it was.
        return self


class Pt2eInt8Module(nn.Module):
    """A model converted by the PT2E flow: the program, and its compiled form.

    Attributes:
        program: the converted ``torch.fx.GraphModule``; its state dict holds the int8
            weights, their per-channel scales and the (batch-norm folded) biases.
        compiled: whether calls go through ``torch.compile``.
        quantized_layers: qualified names, in the original model, of the layers whose
            arithmetic is int8.
    """

    def __init__(self, program: torch.fx.GraphModule, compiled: bool, quantized_layers: list[str]):
        super().__init__()
        self.training = False
        self.program = program
        self.compiled = compiled
        self.quantized_layers = list(quantized_layers)
        self._compiled_program = None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if not self.compiled:
                return self.program(*inputs)
            if self._compiled_program is None:
                self._compiled_program = torch.compile(self.program, dynamic=True)
            import torch._inductor.config as inductor_config

            # Freezing turns the int8 weights into constants, which is what lets Inductor
            # prepack them for oneDNN; a graph compiled without it keeps the patterns in
            # float. Any call may compile (a new input kind, a batch of 1, another grad
            # mode), so every call has it on: about 20 us.
            with inductor_config.patch(freezing=True), warnings.catch_warnings():
                # Inductor's oneDNN lowering copy-constructs its zero points (a UserWarning
                # about its own code, not about the model).
                warnings.simplefilter("ignore", UserWarning)
                return self._compiled_program(*inputs)

    def train(self, mode: bool = True) -> Pt2eInt8Module:
        # A captured program has no train/eval switch (torch.export froze batch norm and
        # dropout as they were in eval mode); it only runs inference.
        if mode:
            raise ConfigError("a pt2e_static_int8 model only runs inference; train the float model before quantizing it")
        self.training = False
        return self

    def _apply(self, fn, recurse=True):
        # Moving the tensors (``.to(device)``) invalidates what was compiled for them.
        self._compiled_program = None
        return super()._apply(fn, recurse)

    def __deepcopy__(self, memo: dict) -> Pt2eInt8Module:
        return Pt2eInt8Module(copy.deepcopy(self.program, memo), self.compiled, self.quantized_layers)

    def extra_repr(self) -> str:
        return f"quantized_layers={len(self.quantized_layers)}, compiled={self.compiled}"


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "torchao": importlib.metadata.version("torchao")}


def _torchao():
    # Importing torchao warns about its optional CUDA kernels (mxfp8, CUTLASS) that this
    # build lacks, and about its pytree registrations; neither concerns this method.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        from torchao.quantization.pt2e import quantize_pt2e
        from torchao.quantization.pt2e.observer import FixedQParamsObserver
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError as e:
        raise ConfigError(
            f"pt2e_static_int8 needs torchao ({e}); install it with `pip install 'slimkit[pt2e]'` "
            "(a torchao built for this torch), or use ort_static_int8 after an export stage"
        ) from None
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    return quantize_pt2e, FixedQParamsObserver, x86


def _quantizer(x86, module: nn.Module, layers: LayerSelector):
    class Quantizer(x86.X86InductorQuantizer):
        def _annotate_linear_unary(self, *args, **kwargs):
            # torchao 0.18 fails (IndexError) on a Linear followed by an activation module
            # whose partition has no output node, as in Hugging Face's BERT. The pairs
            # annotated before it keep their fused form; the remaining Linears are still
            # annotated, as plain linear patterns, by _annotate_linear.
            try:
                super()._annotate_linear_unary(*args, **kwargs)
            except IndexError:
                pass

    quantizer = Quantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
    chosen = set(select_modules(module, layers, QUANTIZABLE))
    for name, m in module.named_modules():
        if isinstance(m, QUANTIZABLE) and name and name not in chosen:
            quantizer.set_module_name_qconfig(name, None)
    return quantizer


def _as_tensors(example: Any) -> tuple[torch.Tensor, ...]:
    """A calibration example (a tuple of tensors, or a feed dict of arrays) as positional tensors."""
    values = example.values() if isinstance(example, dict) else example
    return tuple(torch.from_numpy(v) if isinstance(v, np.ndarray) else v for v in values)


def _capture(module: nn.Module, example: tuple[torch.Tensor, ...], max_seq_len: int | None):
    """``module`` exported with a dynamic batch axis, and a dynamic sequence axis on
    integer (token) inputs; the example is repeated to batch 2 so neither axis is
    specialised to 1."""
    example = tuple(x.expand(2, *x.shape[1:]).contiguous() if x.shape[0] == 1 else x for x in example)
    batch = torch.export.Dim("batch", min=1, max=65536)
    seq = torch.export.Dim("seq", min=1, max=max_seq_len or 4096)
    dynamic = []
    for x in example:
        dims = {0: batch}
        if not x.is_floating_point() and x.dim() == 2 and x.shape[1] > 1:
            dims[1] = seq
        dynamic.append(dims)
    try:
        return torch.export.export(module, example, dynamic_shapes=tuple(dynamic)).module()
    except Exception as e:  # torch.export raises many types; all mean "this model cannot be captured"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"pt2e_static_int8: torch.export cannot capture this model ({type(e).__name__}: {first}); "
            "use dynamic_int8, or export to ONNX and use ort_static_int8"
        ) from None


def _observers(prepared: torch.fx.GraphModule) -> dict[str, nn.Module]:
    """The per-tensor activation observers of a prepared program, by node name."""
    out = {}
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        m = prepared.get_submodule(node.target)
        if getattr(m, "qscheme", None) == torch.per_tensor_affine and getattr(m, "dtype", None) in ACTIVATION_DTYPES:
            out[node.target] = m
    return out


def _drop_unused_tensors(program: torch.fx.GraphModule) -> None:
    """Remove the float weights the converted graph no longer reads (it reads their int8
    copies): they would double the model's memory and its saved file."""
    used = {n.target for n in program.graph.nodes if n.op == "get_attr"}
    for name, _ in list(program.named_parameters()) + list(program.named_buffers()):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            parent = program.get_submodule(owner) if owner else program
            parent._parameters.pop(attr, None)
            parent._buffers.pop(attr, None)
    program.delete_all_unused_submodules()


def _quantized_layers(program: torch.fx.GraphModule) -> list[str]:
    """Qualified names of the layers whose weights the converted graph reads as int8."""
    names = []
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default):
            continue
        weight = node.args[1]
        if isinstance(weight, torch.fx.Node) and weight.target == torch.ops.quantized_decomposed.dequantize_per_channel.default:
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                path = list(stack.values())[-1][0]
                names.append(path.removeprefix("L['self']."))
    return names


def pt2e_static_int8(module: nn.Module, config: Pt2eStaticInt8Config, calibration: Sequence[Any] | None = None, *,
                     example: tuple[torch.Tensor, ...] | None = None,
                     max_seq_len: int | None = None) -> tuple[Pt2eInt8Module, Pt2eStaticInt8Config]:
    """Convert ``module`` to static int8 with the PT2E flow.

    Args:
        module: the float model, in eval mode; it is not changed.
        config: what to quantize. With ``activation_qparams`` set (a saved model being
            loaded) nothing is calibrated: those scales are used.
        calibration: train examples (tuples of tensors, or feed dicts of arrays in the
            model's argument order); at least ``calibration_samples`` of them.
        example: inputs to capture the graph with (default: the first calibration example).
        max_seq_len: the longest sequence a text model takes (the sequence axis's bound).

    Returns:
        The converted model, and ``config`` with the observed scales recorded in it.

    Raises:
        ConfigError: torchao is missing, the calibration set is too small, the model
            cannot be captured, or recorded scales do not fit this torch build's graph.
    """
    quantize_pt2e, fixed_observer, x86 = _torchao()
    replay = config.activation_qparams is not None
    if not replay:
        if calibration is None or len(calibration) < config.calibration_samples:
            got = 0 if calibration is None else len(calibration)
            raise ConfigError(
                f"pt2e_static_int8: calibration_samples is {config.calibration_samples} but {got} calibration "
                "examples were given; give more train examples or lower calibration_samples"
            )
        calibration = list(calibration)[:config.calibration_samples]
    if example is None and replay and config.inputs:
        example = tuple(torch.zeros(shape, dtype=getattr(torch, dtype)) for dtype, shape in config.inputs)
    if example is None:
        if not calibration:
            raise ConfigError("pt2e_static_int8: give example inputs to capture the model with")
        example = _as_tensors(calibration[0])
    module = module.eval()
    with torch.no_grad():
        captured = _capture(module, example, max_seq_len)
        prepared = quantize_pt2e.prepare_pt2e(captured, _quantizer(x86, module, config.layers))
        observers = _observers(prepared)
        if replay:
            _restore(prepared, observers, config, fixed_observer)
            # The weight observers size their per-channel scales when they first run;
            # their values come with the saved tensors.
            prepared(*example)
        else:
            for ex in calibration:
                prepared(*_as_tensors(ex))
            qparams = {}
            for name, obs in observers.items():
                scale, zero_point = obs.calculate_qparams()
                qparams[name] = (float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0]))
            inputs = [(str(x.dtype).removeprefix("torch."), list(x.shape)) for x in example]
            config = config.model_copy(update={"activation_qparams": qparams, "inputs": inputs,
                                               "built_with": _versions()})
        program = quantize_pt2e.convert_pt2e(prepared)
    _drop_unused_tensors(program)
    return Pt2eInt8Module(program, config.compile, _quantized_layers(program)), config


def _restore(prepared: torch.fx.GraphModule, observers: dict[str, nn.Module], config: Pt2eStaticInt8Config,
             fixed_observer) -> None:
    recorded = config.activation_qparams or {}
    if set(recorded) != set(observers):
        raise ModelLoadError(
            f"pt2e_static_int8: the saved model records {len(recorded)} activation scales, but this torch "
            f"({torch.__version__}) captures the architecture with {len(observers)} observers "
            f"(saved with {config.built_with}); quantize the float model again with this version"
        )
    for name, obs in observers.items():
        scale, zero_point = recorded[name]
        setattr(prepared, name, fixed_observer(scale, zero_point, dtype=obs.dtype, qscheme=obs.qscheme,
                                               quant_min=obs.quant_min, quant_max=obs.quant_max))


@register(Pt2eStaticInt8Config)
def _apply(model, config: Pt2eStaticInt8Config, calibration=None, **_) -> tuple[list[str], Pt2eStaticInt8Config]:
    """Replace ``model.module`` (a :class:`slimkit.zoo.models.LoadedModel`) by its converted program."""
    converted, recorded = pt2e_static_int8(model.module, config, calibration, max_seq_len=model.max_seq_len)
    model.module = converted
    return converted.quantized_layers, recorded
