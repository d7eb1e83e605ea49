"""Weight sharing by k-means, as in Deep Compression (Han, Mao & Dally 2016).

Each chosen layer's non-zero weights are clustered into ``2**bits`` centroids; the layer
then keeps only the centroids (a trainable codebook) and one small integer code per
weight, code 0 meaning "pruned, exactly zero". Its weight is a parametrization
(:mod:`torch.nn.utils.parametrize`) computed as ``[0, *codebook][codes]``, so the layer
keeps its type and training moves each centroid by the summed gradients of its members,
the fine-tuning step of the paper. Pruned weights stay zero: they have no centroid.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field, PrivateAttr
from torch import nn
from torch.nn.utils import parametrize

from slimkit.config import LayerSelector, SlimConfig
from slimkit.errors import ConfigError, LayerSelectionError
from slimkit.layers import select_modules, select_names
from slimkit.prune.magnitude import (
    PRUNABLE,
    PruneMask,
    WeightParametrization,
    remove_parametrization,
    weight_parametrization,
)
from slimkit.registry import register

Bits = Annotated[int, Field(ge=1, le=8)]


class ClusterConfig(SlimConfig):
    """k-means weight sharing of Linear and Conv2d weights.

    Attributes:
        bits: centroids per layer are ``2**bits`` (codes of ``bits`` bits, plus zero).
        layer_bits: per-layer overrides, ``{qualified name or re:regex: bits}``; the first
            matching entry wins (e.g. 8 bits for convolutions, 5 for Linear layers).
        init: where the centroids start. ``linear`` spaces them evenly between the
            smallest and largest weight, which keeps centroids on the rare large weights
            (the paper's choice); ``density`` puts them at evenly spaced quantiles;
            ``random`` picks distinct weights at random (seeded by ``seed``).
        max_iter: Lloyd iterations at most; it stops earlier once no weight changes
            cluster. A cluster left empty is moved to the worst-fitted weight, so a layer
            with enough distinct weights uses all ``2**bits`` centroids.
        seed: seeds ``random`` initialisation.
        layers: which Linear and Conv2d layers to cluster.
    """

    kind = "cluster"
    method = "kmeans"
    bits: Bits = 5
    layer_bits: dict[str, Bits] = Field(default_factory=dict)
    init: Literal["linear", "density", "random"] = "linear"
    max_iter: int = Field(50, ge=0)
    seed: int = 0
    layers: LayerSelector = Field(default_factory=LayerSelector)
    # Set by replay_on only, never by a recipe: the layers get the shapes of the shared
    # weights and no clustering runs, as the saved codebooks and codes replace them anyway.
    _structure_only: bool = PrivateAttr(False)

    def replay_on(self, layers: list[str]) -> ClusterConfig:
        """The recorded layers as structure only: loading registers each layer's codebook
        and codes (zeros, of the recorded shapes) and runs no k-means."""
        replay = super().replay_on(layers)
        assert isinstance(replay, ClusterConfig)
        replay._structure_only = True
        return replay


class SharedWeights(WeightParametrization):
    """``weight = [0, *codebook][codes]``; code 0 is a pruned (zero) weight.

    The parametrization's ``original`` tensor is left empty and frozen: the codebook
    and the codes are the whole state.
    """

    def __init__(self, codebook: torch.Tensor, codes: torch.Tensor, weight_requires_grad: bool = True):
        super().__init__()
        self.codebook = nn.Parameter(codebook.detach().clone(), requires_grad=weight_requires_grad)
        self.register_buffer("codes", codes.to(code_dtype(len(codebook))))
        self.weight_requires_grad = weight_requires_grad

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        # Indexing sums the gradients of all weights sharing a centroid into it.
        return self.table()[self.codes.long()]

    def table(self) -> torch.Tensor:
        """``[0, *codebook]``: the value of each code."""
        return torch.cat([self.codebook.new_zeros(1), self.codebook])

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.new_empty(0)


def code_dtype(centroids: int) -> torch.dtype:
    """Smallest integer type holding codes 0 (zero) to ``centroids``."""
    return torch.uint8 if centroids < 256 else torch.int16


def kmeans_1d(values: np.ndarray, k: int, init: str = "linear", max_iter: int = 50, seed: int = 0) -> np.ndarray:
    """Lloyd's k-means on scalars; returns ``k`` sorted centroids (float64).

    Empty clusters are moved to the value that is fitted worst, so all ``k`` are used
    when there are at least ``k`` distinct values. With no values, all centroids are 0.
    """
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if len(x) == 0:
        return np.zeros(k)
    if init == "linear":
        c = np.linspace(x[0], x[-1], k)
    elif init == "density":
        c = np.quantile(x, np.linspace(0.0, 1.0, k))
    elif init == "random":
        distinct = np.unique(x)
        pick = np.random.default_rng(seed).choice(len(distinct), size=min(k, len(distinct)), replace=False)
        c = np.sort(np.concatenate([distinct[pick], np.full(k - len(pick), distinct[-1])]))
    else:
        raise ValueError(f"unknown init {init!r}; use linear, density or random")
    prev = None
    for _ in range(max_iter):
        assign = np.searchsorted((c[1:] + c[:-1]) / 2, x)
        count = np.bincount(assign, minlength=k)
        total = np.bincount(assign, weights=x, minlength=k)
        c = np.where(count > 0, total / np.maximum(count, 1), c)
        empty = np.flatnonzero(count == 0)
        if len(empty):
            err = (x - c[assign]) ** 2
            for e in empty:
                worst = int(np.argmax(err))
                if err[worst] == 0:
                    break  # fewer distinct values than clusters
                c[e], err[worst] = x[worst], 0.0
        c = np.sort(c)
        if prev is not None and len(empty) == 0 and np.array_equal(assign, prev):
            break
        prev = assign
    return c


def cluster_layer(module: nn.Module, bits: int, init: str = "linear", max_iter: int = 50, seed: int = 0) -> None:
    """Replace ``module.weight`` by ``2**bits`` shared values; zero weights stay zero."""
    _share(module, bits, cluster=True, init=init, max_iter=max_iter, seed=seed)


def share_structure(module: nn.Module, bits: int) -> None:
    """Give ``module.weight`` the weight sharing of :func:`cluster_layer` with a zero codebook
    and zero codes, clustering nothing: the shapes for loading saved shared weights into."""
    _share(module, bits, cluster=False)


def _share(module: nn.Module, bits: int, cluster: bool, init: str = "linear", max_iter: int = 50,
           seed: int = 0) -> None:
    if isinstance(weight_parametrization(module), PruneMask):
        remove_parametrization(module)  # the zero code now keeps pruned weights at zero
    weight = module.weight
    requires_grad = weight.requires_grad
    with torch.no_grad():
        w = weight.detach()
        if cluster:
            nonzero = w != 0
            x = w[nonzero].double().cpu().numpy()
            centroids = torch.as_tensor(kmeans_1d(x, 2**bits, init, max_iter, seed), dtype=w.dtype)
            # Assign with the centroids as stored (in the weight's dtype), to the nearest one.
            c = centroids.double().numpy()
            codes = np.zeros(w.numel(), dtype=np.int64)
            codes[nonzero.reshape(-1).cpu().numpy()] = np.searchsorted((c[1:] + c[:-1]) / 2, x) + 1
            codes_t = torch.as_tensor(codes).reshape(w.shape).to(w.device)
        else:
            centroids = torch.zeros(2**bits, dtype=w.dtype)
            codes_t = torch.zeros(w.shape, dtype=code_dtype(2**bits), device=w.device)
        shared = SharedWeights(centroids.to(w.device), codes_t, requires_grad)
    parametrize.register_parametrization(module, "weight", shared, unsafe=True)
    module.parametrizations.weight.original.requires_grad_(False)


def bits_per_layer(names: list[str], config: ClusterConfig) -> dict[str, int]:
    """Bits of each layer: its first matching ``layer_bits`` entry, else ``config.bits``.

    Raises:
        ConfigError: ``layer_bits`` keys that match no layer in ``names`` or are bad
            regexes, all of them listed.
    """
    out = {n: config.bits for n in names}
    claimed: set[str] = set()
    problems = []
    for pattern, bits in config.layer_bits.items():
        try:
            matched = select_names(names, LayerSelector(targets=[pattern]), "chosen layer")
        except LayerSelectionError as e:
            problems.append(f"layer_bits: {str(e).removeprefix('targets: ')}")
            continue
        for name in matched:
            if name not in claimed:
                out[name] = bits
                claimed.add(name)
    if problems:
        raise ConfigError(problems)
    return out


@register(ClusterConfig)
def _apply_kmeans(model: nn.Module, config: ClusterConfig, **_) -> list[str]:
    names = select_modules(model, config.layers, PRUNABLE)
    bits = bits_per_layer(names, config)
    shared = [n for n in names if isinstance(weight_parametrization(model.get_submodule(n)), SharedWeights)]
    if shared:
        raise ConfigError([f"{n}: its weights are already shared; make_permanent_ first to cluster again"
                           for n in shared])
    for name in names:
        if config._structure_only:
            share_structure(model.get_submodule(name), bits[name])
        else:
            cluster_layer(model.get_submodule(name), bits[name], config.init, config.max_iter, config.seed)
    return names


def shared_weights(module: nn.Module) -> SharedWeights | None:
    """The weight sharing of a clustered layer, or None."""
    p = weight_parametrization(module)
    return p if isinstance(p, SharedWeights) else None
