"""Tiny seeded models for tests, importable as ``tiny_models:<function>`` model specs.

Every factory returns ``(module, example_inputs)`` as slimkit's callable loader expects,
or the module alone (:func:`tiny_cnn`), which the loader accepts too.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SPEC_MLP = {"kind": "callable", "ref": "tiny_models:mlp"}


def mlp() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """``Linear(64, 128) -> ReLU -> Linear(128, 32)``, seeded; input ``[4, 64]``."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
    return module, (inputs(4),)


def inputs(batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 64, generator=g)


class EmbedMLP(nn.Module):
    """Token ids -> Embedding(100, 64) -> mean over tokens -> Linear(64, 16)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 64)
        self.head = nn.Linear(64, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(1))


def embed_mlp() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    ids = torch.arange(24).reshape(3, 8) % 100
    return EmbedMLP().eval(), (ids,)


def ragged_mlp() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The middle Linear has 48 inputs, not a multiple of 32: int4 leaves it in fp32."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 8))
    return module.eval(), (inputs(4),)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """10 log10(signal power / error power) in dB."""
    ref, out = ref.detach().double(), out.detach().double()
    return 10.0 * math.log10(float((ref**2).sum()) / float(((ref - out) ** 2).sum()))


def min_cosine(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(ref.double(), out.double(), dim=-1).min())


def wide() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Two ``Linear(256, 256)`` layers: big enough that a file's size is its weights."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).eval()
    return module, (torch.randn(2, 256, generator=torch.Generator().manual_seed(1)),)


def mlp_seq() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The same MLP with a ``[2, 5, 64]`` input: exported Linears become MatMul + Add."""
    module, _ = mlp()
    return module, (torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)),)


# -- a tiny CNN with every kind of channel tie, for channel pruning ---------------------


class TinyCNN(nn.Module):
    """stem -> (expand, depthwise, project) + residual -> cat(a, b) -> bn -> Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.branch_a = nn.Conv2d(8, 4, 1)
        self.branch_b = nn.Conv2d(8, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.head = nn.Linear(10, 5)

    def forward(self, x):
        s = self.stem(x)
        y = F.relu(s + self.project(self.dw(self.expand(s))))
        z = F.relu(self.bn(torch.cat([self.branch_a(y), self.branch_b(y)], dim=1)))
        return self.head(z.mean((2, 3)))


# stem 216 + 16, expand 128 + 32, dw 144 + 32, project 128 + 16, a 36, b 438, bn 20, head 55
FULL_PARAMS = 1261
KEYS = ["stem.0", "expand.0", "branch_a", "branch_b"]  # residual stream, hidden, the two branches


def tiny_cnn() -> nn.Module:
    """A seeded TinyCNN with non-trivial batch norms (also the saved spec's factory)."""
    torch.manual_seed(0)
    return randomise_bn(TinyCNN(), seed=1)


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial batch-norm statistics and affine parameters, so slicing them is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def images(n=2, size=6, seed=1):
    """Seeded ``[n, 3, size, size]`` inputs for the tiny CNN."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def masked(model: nn.Module, keep) -> nn.Module:
    """A copy of ``model`` whose channels not in ``keep[group]`` are zeroed where they are
    produced: filters, biases and batch-norm scale and shift, so that a zeroed channel is
    zero at the batch norm's output too. Removing them must give exactly its outputs."""
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    with torch.no_grad():
        for group, idx in keep.items():
            drop = torch.ones(group.size, dtype=torch.bool)
            drop[idx] = False
            for m in group.members:
                if m.role != "in":
                    for attr in ("weight", "bias"):
                        p = getattr(modules[m.module], attr, None)
                        if p is not None:
                            p[m.offset : m.offset + group.size][drop] = 0
    return out


def kept(model: nn.Module) -> dict[str, int]:
    """The channels the tiny CNN's four prunable groups have, by :data:`KEYS`."""
    m = model
    return {"stem.0": m.stem[0].out_channels, "expand.0": m.expand[0].out_channels,
            "branch_a": m.branch_a.out_channels, "branch_b": m.branch_b.out_channels}


def assert_same_state(model: nn.Module, other: nn.Module) -> None:
    """The two modules hold the same tensors under the same names, bit for bit."""
    a, b = model.state_dict(), other.state_dict()
    assert sorted(a) == sorted(b)
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


class DataDependent(nn.Module):
    """A block torch.fx cannot trace: its forward branches on a tensor's value."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else x


class SeededMLP(nn.Module):
    """10 -> width -> 4 classifier for the distillation tests; counts its forward calls."""

    def __init__(self, width: int, seed: int, dropout: float = 0.0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(10, width), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(width, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.head(self.body(x))


class TinyClassifier(nn.Module):
    """A small image classifier: a stem, a residual block, global pooling and a Linear head."""

    def __init__(self, classes: int = 7):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                   nn.Conv2d(32, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(x.mean((2, 3)))


def tiny_classifier() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A seeded :class:`TinyClassifier` with 7 outputs (a task with other classes gets a new head)."""
    torch.manual_seed(0)
    return TinyClassifier(), (torch.zeros(1, 3, 16, 16),)


class PlainCNN(nn.Module):
    """Convolutions, ReLU, pooling and a Linear head, without batch norm: a batch split
    across data-parallel processes computes exactly what the whole batch does."""

    def __init__(self, classes: int = 7):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(16, classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def plain_cnn() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A seeded :class:`PlainCNN` with 7 outputs."""
    torch.manual_seed(0)
    return PlainCNN(), (torch.zeros(1, 3, 16, 16),)


def write_image_folder(root, classes: int = 3, train: int = 40, test: int = 12, side: int = 12, seed: int = 0):
    """``root/{train,test}/<class>/*.png``: grey images whose class is where a bright bar is
    (top, middle, bottom ...), with noise, so a tiny CNN learns them in a few steps."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.uniform(0, 0.3, (side, side))
                band = side // classes
                img[c * band:(c + 1) * band] += 0.6
                Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8), mode="L").save(folder / f"{i}.png")
    return root


def signed_onnx_bundle(folder, version: str = "1.0", name: str = "mlp"):
    """The :func:`mlp` exported to ONNX and saved in ``folder/model``, a signing key pair in
    ``folder/k`` and ``folder/k.pub``, and its bundle ``folder/m.slimkit``: the module, the
    manifest and the public key."""
    from slimkit.deploy import bundle
    from slimkit.deploy.export import ExportConfig, export
    from slimkit.serialize import save
    from slimkit.zoo.models import LoadedModel

    module, example = mlp()
    onnx = export(LoadedModel(module, dict(SPEC_MLP), example_inputs=example), ExportConfig(optimize="none"),
                  workdir=folder / "work")
    save(onnx, folder / "model")
    key, pub = bundle.generate_key(folder / "k")
    manifest = bundle.create_bundle(folder / "model", key, folder / "m.slimkit", version, name=name)
    return module, manifest, pub
