"""The ``convert`` recipe stage: quantization-aware training's fake-quantized layers become real int8."""

from __future__ import annotations

from typing import Literal

from torch import nn

from slimkit.config import SlimConfig
from slimkit.registry import register


class ConvertConfig(SlimConfig):
    """Convert the layers a ``qat_int8`` stage prepared (and a ``train`` stage trained) for deployment.

    Attributes:
        target: ``onnxruntime``: plain layers with the trained weights and their trained
            input ranges recorded, for ``export`` then ``ort_static_int8`` (which uses those
            ranges) or ``ort_dynamic_int8``; ``torch``: slimkit's int8 PyTorch layers.
            Unset, each layer converts for the runtime it was prepared for.
    """

    kind = "convert"
    method = "qat"
    target: Literal["onnxruntime", "torch"] | None = None


@register(ConvertConfig)
def convert_(model: nn.Module, config: ConvertConfig, **_) -> list[str]:
    """:func:`slimkit.quantize.qat.convert_qat_` as a stage; returns the converted layers.

    The conversion records what the model now is (the int8 layers, or the trained ranges)
    itself, so loading a saved model never replays the conversion.
    """
    from slimkit.quantize.qat import convert_qat_

    return convert_qat_(model, config.target)
