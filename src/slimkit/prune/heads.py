"""Structured pruning of transformer encoders: whole attention heads and FFN neurons.

Removing head ``h`` of a layer takes out its rows of the query, key and value projections
(weights and biases) and its columns of the attention output projection; removing FFN
neuron ``j`` takes out row ``j`` of the intermediate projection and column ``j`` of the
output projection. The result is an ordinary dense model whose layers have their own head
counts and widths; it computes exactly what the original computes with those heads and
neurons masked to zero.

The layout is the Hugging Face BERT one (BERT, RoBERTa, ELECTRA, MiniLM, ...): a
``ModuleList`` called ``encoder.layer`` whose layers have ``attention.self.query``,
``.key``, ``.value``, ``attention.output.dense``, ``intermediate.dense`` and
``output.dense``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from slimkit.config import SlimConfig
from slimkit.errors import ConfigError
from slimkit.modes import eval_mode

Importance = Literal["l1", "l2", "taylor", "michel"]
GRADIENT_METHODS = ("taylor", "michel")
LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
# Relative size of the random nudge given to the reference embedding (see _nudged_cosine).
NUDGE = 0.1


class LayerStructure(BaseModel):
    """What one encoder layer keeps.

    Each field is the sorted indices to keep, a number to keep (the most important ones),
    or None (keep all).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    heads: list[int] | int | None = None
    ffn: list[int] | int | None = None

    @field_validator("heads", "ffn")
    @classmethod
    def _at_least_one(cls, v: list[int] | int | None, info) -> list[int] | int | None:
        what = "head" if info.field_name == "heads" else "FFN neuron"
        if isinstance(v, int) and v < 1:
            raise ValueError(f"a layer must keep at least one {what}; got {v}")
        if isinstance(v, list):
            if not v:
                raise ValueError(f"a layer must keep at least one {what}; got an empty list")
            if any(i < 0 for i in v) or len(set(v)) != len(v):
                raise ValueError(f"{what} indices must be distinct and >= 0; got {v}")
            v = sorted(v)
        return v


Ratio = float | dict[int, float]


class SensitivityBudget(BaseModel):
    """Prune to a size or speed budget, per-layer amounts chosen by a sensitivity analysis.

    Each layer's heads, then its FFN neurons, are pruned alone at each of ``ratios`` and
    the copy is scored by the mean cosine of its sentence embeddings to the unpruned
    model's on ``batches`` calibration batches (train data, no labels). The groups whose
    removal costs the least cosine per parameter (or MAC) saved are pruned until the model
    keeps at most ``keep`` of ``cost``
    (:func:`slimkit.prune.sensitivity.ratios_for_budget`).

    Attributes:
        cost: ``params`` (every parameter of the model) or ``macs`` (the encoder's
            multiply-accumulates per example of ``seq_len`` tokens).
        keep: the fraction of the cost to keep, in ``(0, 1]``.
        ratios: fractions of a group removed in the analysis, each in ``(0, 1)``.
        batches: calibration batches each pruned copy is scored on (a recipe's are
            single train sentences).
        seq_len: sequence length the MACs are counted at.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    cost: Literal["params", "macs"] = "params"
    keep: float = Field(gt=0, le=1)
    ratios: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 0.9], min_length=1)
    batches: int = Field(32, ge=1)
    seq_len: int = Field(128, ge=1)

    @field_validator("ratios")
    @classmethod
    def _in_range(cls, v: list[float]) -> list[float]:
        bad = [r for r in v if not 0 < r < 1]
        if bad:
            raise ValueError(f"{bad}: each ratio is a fraction of a group removed, in (0, 1)")
        return sorted(set(v))


class TransformerPruneConfig(SlimConfig):
    """Remove whole attention heads and FFN neurons from a BERT-like encoder.

    Attributes:
        heads: the fraction of attention heads removed, in ``[0, 1)``: one number for
            every layer, or ``{layer index: fraction}`` (layers not named keep all).
        ffn: the same for feed-forward (intermediate) neurons.
        scope: ``per_layer`` removes the fraction from each layer; ``global`` removes it
            from the whole model, taking the least important heads (neurons) wherever
            they are, so layers end up with different counts.
        importance: how heads and neurons are ranked. ``l1``/``l2``: the norm of their
            weights (query/key/value rows with biases and output-projection columns for
            a head; intermediate row with bias and output column for a neuron).
            ``taylor``: ``|sum of weight x gradient|`` over those weights, the
            first-order change of the loss when they are removed, summed over the
            calibration batches (Molchanov et al. 2019). ``michel``: ``|dL/d mask|`` of a mask on each head's
            output (on each neuron's activation for the FFN), summed over the
            calibration batches (Michel et al., "Are Sixteen Heads Really Better than
            One?", 2019).
        min_heads_per_layer: no layer keeps fewer heads than this (nor fewer than one
            FFN neuron).
        calibration_batches: batches of the calibration data used by ``taylor`` and
            ``michel``.
        normalize: with ``global`` scope, divide each layer's scores by their L2 norm
            before ranking across layers (as Michel et al. do), so that layers whose
            weights or gradients are larger do not keep everything.
        seed: seeds the random nudge of the label-free loss (see :func:`gradient_scores`).
        budget: instead of ``heads`` and ``ffn``, prune to a parameter or MAC budget with
            per-layer amounts chosen by a sensitivity analysis on the calibration data
            (see :class:`SensitivityBudget`); the analysis is recorded with the result.
        kept: the structure each layer keeps, by layer index. :func:`slimkit.prune_`
            fills it in when it records the transform, so that loading rebuilds the same
            shapes. Given by hand, it decides alone (``heads``, ``ffn`` and ``scope``
            are then only a record of how it was chosen); where it gives a count rather
            than indices, ``importance`` picks which ones.
    """

    kind = "prune"
    method = "transformer_structured"
    heads: Ratio = 0.0
    ffn: Ratio = 0.0
    scope: Literal["per_layer", "global"] = "per_layer"
    importance: Importance = "l1"
    min_heads_per_layer: int = Field(1, ge=1)
    calibration_batches: int = Field(32, ge=1)
    normalize: bool = True
    seed: int = 0
    budget: SensitivityBudget | None = None
    kept: dict[int, LayerStructure] | None = None

    @field_validator("heads", "ffn")
    @classmethod
    def _fractions(cls, v: Ratio, info) -> Ratio:
        what = "head" if info.field_name == "heads" else "FFN neuron"
        for layer, r in v.items() if isinstance(v, dict) else [(None, v)]:
            where = f"layer {layer}: " if layer is not None else ""
            if layer is not None and layer < 0:
                raise ValueError(f"layer indices start at 0; got {layer}")
            if not 0 <= r < 1:
                raise ValueError(
                    f"{where}{r} is not a fraction to remove in [0, 1); 1 would remove every {what} "
                    f"(at least min_heads_per_layer heads and one FFN neuron are always kept)"
                )
        return v

    @field_validator("kept")
    @classmethod
    def _kept_layers(cls, v: dict[int, LayerStructure] | None) -> dict[int, LayerStructure] | None:
        # Too large an index is checked against the model; a negative one never fits.
        bad = sorted(i for i in v or {} if i < 0)
        if bad:
            raise ValueError(f"layer indices start at 0; got {', '.join(map(str, bad))}")
        return v

    @model_validator(mode="after")
    def _global_needs_one_ratio(self) -> TransformerPruneConfig:
        if self.scope == "global" and (isinstance(self.heads, dict) or isinstance(self.ffn, dict)):
            raise ValueError("scope 'global' takes one fraction for the whole model; give per-layer "
                             "fractions ({layer: fraction}) with scope 'per_layer'")
        if self.budget is not None and (self.heads or self.ffn):
            raise ValueError("give a budget (the analysis chooses how much each layer loses) or the fractions "
                             "heads/ffn, not both")
        return self

    def replay_on(self, layers: list[str]) -> TransformerPruneConfig:
        """The recorded structure as exact indices: loading only reshapes, it scores nothing."""
        if self.kept is None:
            raise ConfigError("a recorded transformer_structured transform has no `kept` structure; "
                              "save the model again with this version of slimkit")
        exact = {
            i: LayerStructure(
                heads=list(range(s.heads)) if isinstance(s.heads, int) else s.heads,
                ffn=list(range(s.ffn)) if isinstance(s.ffn, int) else s.ffn,
            )
            for i, s in self.kept.items()
        }
        return self.model_copy(update={"kept": exact})


@dataclass
class EncoderLayer:
    """The projections of one BERT-like encoder layer that pruning reshapes."""

    name: str
    attention: nn.Module  # ``attention.self``: holds the head count the forward uses
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attn_out: nn.Linear
    up: nn.Linear  # intermediate.dense
    down: nn.Linear  # output.dense
    head_size: int

    @property
    def num_heads(self) -> int:
        """The attention heads the layer has now: the query projection's outputs over
        ``head_size`` (it drops as heads are removed)."""
        return self.query.out_features // self.head_size

    @property
    def width(self) -> int:
        """The FFN neurons the layer has now: the outputs of ``intermediate.dense``."""
        return self.up.out_features


LAYOUT = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attn_out": "attention.output.dense",
    "up": "intermediate.dense",
    "down": "output.dense",
}


def encoder_layers(model: nn.Module) -> list[EncoderLayer]:
    """The encoder layers of a BERT-like ``model``, in order.

    Raises:
        ConfigError: the model does not have that layout; the message names every part
            that is missing.
    """
    lists = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and (n == "encoder.layer" or n.endswith(".encoder.layer"))]
    if len(lists) != 1:
        found = ", ".join(n for n, _ in lists) or "none"
        children = ", ".join(n for n, _ in model.named_children()) or "none"
        raise ConfigError(
            f"transformer_structured pruning needs one BERT-like encoder, a ModuleList named "
            f"`encoder.layer` (as in Hugging Face BertModel); {type(model).__name__} has {len(lists)} "
            f"(found: {found}; its top-level modules: {children})"
        )
    prefix, layer_list = lists[0]
    problems, out = [], []
    for i, layer in enumerate(layer_list):
        name = f"{prefix}.{i}"
        parts: dict[str, Any] = {}
        for key, path in LAYOUT.items():
            try:
                sub = layer.get_submodule(path)
            except AttributeError:
                problems.append(f"{name}.{path}: missing; the layer has {', '.join(n for n, _ in layer.named_children())}")
                continue
            if type(sub) is not nn.Linear:
                problems.append(f"{name}.{path}: is a {type(sub).__name__}, not an nn.Linear; prune before quantizing")
                continue
            parts[key] = sub
        attention = layer.get_submodule("attention.self") if "query" in parts else None
        head_size = getattr(attention, "attention_head_size", None)
        if attention is not None and not isinstance(head_size, int):
            problems.append(f"{name}.attention.self: has no integer `attention_head_size`, so its heads cannot be told apart")
        elif len(parts) == len(LAYOUT):
            if parts["query"].out_features % head_size or {parts[k].out_features for k in ("query", "key", "value")} != {parts["attn_out"].in_features}:
                problems.append(f"{name}.attention: query/key/value widths and the output projection do not agree "
                                f"on whole heads of size {head_size}")
            elif parts["up"].out_features != parts["down"].in_features:
                problems.append(f"{name}: intermediate.dense has {parts['up'].out_features} outputs but "
                                f"output.dense has {parts['down'].in_features} inputs")
            else:
                out.append(EncoderLayer(name, attention, head_size=head_size, **parts))
    if problems:
        raise ConfigError(problems)
    return out


# ----------------------------------------------------------------------------- scores


def _per_head(layer: EncoderLayer, values: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Sum of ``values(param)`` over each head's weights: QKV rows and biases, output columns."""
    h, d = layer.num_heads, layer.head_size
    s = torch.zeros(h, dtype=torch.float64)
    for lin in (layer.query, layer.key, layer.value):
        s += values(lin.weight).reshape(h, -1).sum(1).double().cpu()
        if lin.bias is not None:
            s += values(lin.bias).reshape(h, d).sum(1).double().cpu()
    s += values(layer.attn_out.weight).reshape(-1, h, d).sum((0, 2)).double().cpu()
    return s


def _per_neuron(layer: EncoderLayer, values: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Sum of ``values(param)`` over each neuron's weights: intermediate row and bias, output column."""
    s = values(layer.up.weight).sum(1).double().cpu()
    if layer.up.bias is not None:
        s += values(layer.up.bias).double().cpu()
    return s + values(layer.down.weight).sum(0).double().cpu()


def magnitude_scores(layers: list[EncoderLayer], norm: Literal["l1", "l2"]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the L1 or L2 norm of each head's and each FFN neuron's weights."""
    with torch.no_grad():
        if norm == "l1":
            return ([_per_head(x, torch.abs) for x in layers], [_per_neuron(x, torch.abs) for x in layers])
        square = torch.square
        return ([_per_head(x, square).sqrt() for x in layers], [_per_neuron(x, square).sqrt() for x in layers])


def _as_tensors(batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: (torch.from_numpy(np.asarray(v)) if not isinstance(v, torch.Tensor) else v).to(device)
            for k, v in batch.items()}


def sentence_embedding(output: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The sentence embedding in ``output``: a ``[batch, dim]`` tensor as is (a
    :class:`~slimkit.zoo.models.TextEncoder` pools already), else the attention-masked mean
    of the last hidden state."""
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        hidden = output[0] if isinstance(output, (tuple, list)) else output
    if hidden.dim() == 2:
        return hidden
    mask = batch.get("attention_mask")
    mask = torch.ones(hidden.shape[:2], device=hidden.device) if mask is None else mask
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def gradient_scores(model: nn.Module, layers: list[EncoderLayer], importance: Literal["taylor", "michel"],
                    batches: list[dict[str, torch.Tensor]], loss_fn: LossFn | None = None,
                    reference: nn.Module | None = None, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the gradient-based importance of each head and each FFN neuron.

    Without ``loss_fn``, the loss of a batch is the cosine distance between the model's
    sentence embeddings and the reference's (``reference``, else the model as it is now,
    which is the unpruned model: scoring changes no weight, so no copy is needed), with
    the reference nudged in a random direction. The nudge matters: unnudged, the distance
    is at its minimum, zero, with a zero gradient, before anything is removed. Nudged, the
    gradient is the embedding's Jacobian applied to a random direction across the
    embedding, so ``|gradient|`` summed over batches measures how far each head or neuron
    can turn the embedding (an estimate of the distance's curvature, scaled by
    :data:`NUDGE`, which does not change the ranking).

    Args:
        model: the model to score; its weights, gradients, ``requires_grad`` flags and
            train/eval mode are as before when this returns.
        layers: its encoder layers (:func:`encoder_layers`).
        importance: ``taylor`` (``|sum of w * dL/dw|`` over a head's or neuron's weights:
            the first-order change of the loss when they are zeroed, Molchanov et al.
            2019) or ``michel`` (``|dL/d mask|`` of a mask on each head's output and each
            neuron's activation).
        batches: input dicts the model is called with (``model(**batch)``).
        loss_fn: ``loss_fn(model, batch) -> scalar``, for a task with labels, say.
        reference: the model whose embeddings the label-free loss compares with.
        seed: seeds the random nudge.
    """
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    flags = [p.requires_grad for p in params]
    head_masks = [torch.ones(x.num_heads, device=device, requires_grad=True) for x in layers]
    neuron_masks = [torch.ones(x.width, device=device, requires_grad=True) for x in layers]
    hooks = []
    if importance == "michel":
        for x, hm, nm in zip(layers, head_masks, neuron_masks, strict=True):
            hooks.append(x.attn_out.register_forward_pre_hook(_mask_hook(hm, x.head_size)))
            hooks.append(x.down.register_forward_pre_hook(_mask_hook(nm, 1)))
        wrt = head_masks + neuron_masks
    else:
        wrt = [p for x in layers for lin in (x.query, x.key, x.value, x.attn_out, x.up, x.down)
               for p in (lin.weight, lin.bias) if p is not None]
    heads = [torch.zeros(x.num_heads, dtype=torch.float64) for x in layers]
    neurons = [torch.zeros(x.width, dtype=torch.float64) for x in layers]
    generator = torch.Generator().manual_seed(seed)
    with eval_mode(model):
        try:
            for p in params:
                p.requires_grad_(False)
            refs: list[torch.Tensor | None] = [None] * len(batches)
            if loss_fn is None:
                with torch.no_grad():
                    source = reference if reference is not None else model
                    refs = [sentence_embedding(source(**b), b).float() for b in batches]
            for p in wrt:
                if isinstance(p, nn.Parameter):
                    p.requires_grad_(True)
            for b, ref in zip(batches, refs, strict=True):
                if loss_fn is not None:
                    value = loss_fn(model, b)
                else:
                    value = _nudged_cosine(sentence_embedding(model(**b), b).float(), ref, generator)
                grads = dict(zip(map(id, wrt), torch.autograd.grad(value, wrt, allow_unused=True), strict=True))
                with torch.no_grad():
                    if importance == "michel":
                        for i in range(len(layers)):
                            heads[i] += _abs(grads[id(head_masks[i])], head_masks[i])
                            neurons[i] += _abs(grads[id(neuron_masks[i])], neuron_masks[i])
                    else:
                        taylor = _times_gradient(grads)
                        for i, x in enumerate(layers):
                            heads[i] += _per_head(x, taylor).abs()
                            neurons[i] += _per_neuron(x, taylor).abs()
        finally:
            for h in hooks:
                h.remove()
            for p, f in zip(params, flags, strict=True):
                p.requires_grad_(f)
    return heads, neurons


def _times_gradient(grads: dict[int, torch.Tensor | None]) -> Callable[[torch.Tensor], torch.Tensor]:
    def times(p: torch.Tensor) -> torch.Tensor:
        g = grads[id(p)]
        return torch.zeros_like(p) if g is None else p * g

    return times


def _abs(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(like.shape, dtype=torch.float64) if grad is None else grad.detach().abs().double().cpu()


def _mask_hook(mask: torch.Tensor, size: int):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (x * mask.repeat_interleave(size).to(x.dtype), *args[1:])

    return hook


def _nudged_cosine(emb: torch.Tensor, ref: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Summed cosine distance between ``emb`` and ``ref`` turned slightly in a random direction."""
    direction = F.normalize(torch.randn(ref.shape, generator=generator), dim=-1).to(ref.device)
    target = F.normalize(ref, dim=-1) + NUDGE * direction
    return (1 - F.cosine_similarity(emb, target, dim=-1)).sum()


# ----------------------------------------------------------------------------- choice


def _remove_count(ratio: float, n: int) -> int:
    return math.floor(ratio * n + 0.5)


def _keep_best(scores: torch.Tensor, keep: int) -> list[int]:
    # Stable ascending sort: among equal scores the lower index is removed first, so the
    # choice is the same on every run. This is not slimkit.prune.cnn.top_channels, which
    # keeps the lower index on ties: heads follow the tie rule of the global ranking in
    # choose(), which removes in (score, layer, index) order.
    order = torch.argsort(scores, stable=True).tolist()
    return sorted(order[len(order) - keep:])


def choose(scores: list[torch.Tensor], ratio: Ratio, scope: str, minimum: int, normalize: bool) -> list[list[int]]:
    """Per layer, the sorted indices to keep.

    Args:
        scores: per layer, one score per head (neuron); higher is more important.
        ratio: fraction removed, one for all or ``{layer: fraction}``.
        scope: ``per_layer`` or ``global``.
        minimum: each layer keeps at least this many (or all it has, if fewer).
        normalize: with ``global`` scope, rank ``scores / ||scores||`` of each layer.
    """
    sizes = [len(s) for s in scores]
    floor = [min(minimum, n) for n in sizes]
    if scope == "per_layer":
        out = []
        for i, s in enumerate(scores):
            r = ratio.get(i, 0.0) if isinstance(ratio, dict) else ratio
            remove = min(_remove_count(r, sizes[i]), sizes[i] - floor[i])
            out.append(_keep_best(s, sizes[i] - remove))
        return out
    assert isinstance(ratio, float | int)
    ranked = []
    for i, s in enumerate(scores):
        norm = float(s.norm()) if normalize else 0.0
        ranked += [(float(v) / norm if norm > 0 else float(v), i, j) for j, v in enumerate(s.tolist())]
    ranked.sort()
    target = _remove_count(ratio, sum(sizes))
    left = list(sizes)
    removed: list[set[int]] = [set() for _ in scores]
    for _, i, j in ranked:
        if target == 0:
            break
        if left[i] > floor[i]:
            removed[i].add(j)
            left[i] -= 1
            target -= 1
    return [[j for j in range(n) if j not in removed[i]] for i, n in enumerate(sizes)]


# ----------------------------------------------------------------------------- surgery


def _slice_(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep ``index`` along the weight's ``dim`` (0: outputs, with the bias; 1: inputs)."""
    index = index.to(linear.weight.device)
    with torch.no_grad():
        linear.weight = nn.Parameter(linear.weight.index_select(dim, index).clone(),
                                     requires_grad=linear.weight.requires_grad)
        if dim == 0:
            if linear.bias is not None:
                linear.bias = nn.Parameter(linear.bias[index].clone(), requires_grad=linear.bias.requires_grad)
            linear.out_features = len(index)
        else:
            linear.in_features = len(index)


def remove_heads_(layer: EncoderLayer, keep: list[int]) -> None:
    """Keep only heads ``keep`` of ``layer``: slice Q/K/V rows and output-projection columns,
    and set the head count the attention module reports."""
    d = layer.head_size
    rows = torch.tensor([h * d + j for h in keep for j in range(d)], dtype=torch.long)
    for lin in (layer.query, layer.key, layer.value):
        _slice_(lin, rows, 0)
    _slice_(layer.attn_out, rows, 1)
    # Hugging Face attention infers the head count from the projection width in its
    # forward (view(..., -1, head_size)); these attributes are for code that reads them.
    if hasattr(layer.attention, "num_attention_heads"):
        layer.attention.num_attention_heads = len(keep)
    if hasattr(layer.attention, "all_head_size"):
        layer.attention.all_head_size = len(keep) * d


def remove_neurons_(layer: EncoderLayer, keep: list[int]) -> None:
    """Keep only FFN neurons ``keep`` of ``layer``: intermediate rows, output columns."""
    index = torch.tensor(keep, dtype=torch.long)
    _slice_(layer.up, index, 0)
    _slice_(layer.down, index, 1)


def _plan(model: nn.Module, layers: list[EncoderLayer], config: TransformerPruneConfig, calibration, loss_fn,
          reference) -> tuple[list[list[int]], list[list[int]]]:
    """Per layer, the heads and the neurons to keep."""
    problems = []
    if config.kept is not None:
        specs = {"heads": {i: s.heads for i, s in config.kept.items()}, "ffn": {i: s.ffn for i, s in config.kept.items()}}
    else:
        specs = {"heads": config.heads, "ffn": config.ffn}
    named = {"kept": config.kept} if config.kept is not None else specs
    for field, spec in named.items():
        bad = sorted(i for i in spec if i >= len(layers)) if isinstance(spec, dict) else []
        if bad:
            problems.append(f"{field}: layer(s) {bad} do not exist; the model has layers 0..{len(layers) - 1}")
    if problems:
        raise ConfigError(problems)
    sizes = {"heads": [x.num_heads for x in layers], "ffn": [x.width for x in layers]}
    if config.kept is not None:
        for field in ("heads", "ffn"):
            for i, v in specs[field].items():
                n = sizes[field][i]
                if isinstance(v, list) and v[-1] >= n:
                    problems.append(f"kept.{i}.{field}: index {v[-1]} is out of range; layer {i} has {n}")
                elif isinstance(v, int) and v > n:
                    problems.append(f"kept.{i}.{field}: {v} is more than the {n} layer {i} has")
        if problems:
            raise ConfigError(problems)
        needs_scores = any(isinstance(v, int) for spec in specs.values() for v in spec.values())
    else:
        needs_scores = any(v > 0 for spec in specs.values() for v in (spec.values() if isinstance(spec, dict) else [spec]))
    if not needs_scores:
        head_scores = [torch.zeros(n) for n in sizes["heads"]]
        neuron_scores = [torch.zeros(n) for n in sizes["ffn"]]
    elif config.importance in GRADIENT_METHODS:
        batches = _calibration_batches(model, calibration, config)
        head_scores, neuron_scores = gradient_scores(model, layers, config.importance, batches, loss_fn, reference, config.seed)
    else:
        head_scores, neuron_scores = magnitude_scores(layers, config.importance)

    if config.kept is None:
        return (choose(head_scores, config.heads, config.scope, config.min_heads_per_layer, config.normalize),
                choose(neuron_scores, config.ffn, config.scope, 1, config.normalize))
    out = []
    for field, scores in (("heads", head_scores), ("ffn", neuron_scores)):
        plan = []
        for i, n in enumerate(sizes[field]):
            v = specs[field].get(i)
            plan.append(list(range(n)) if v is None else v if isinstance(v, list) else _keep_best(scores[i], v))
        out.append(plan)
    return out[0], out[1]


def _calibration_batches(model: nn.Module, calibration, config: TransformerPruneConfig) -> list[dict[str, torch.Tensor]]:
    if calibration is None:
        raise ConfigError(f"importance {config.importance!r} needs calibration data: pass calibration=[input dicts, ...] "
                          "to prune_, or use importance 'l1' or 'l2'")
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    batches = [_as_tensors(b, device) for b in itertools.islice(calibration, config.calibration_batches)]
    if not batches:
        raise ConfigError(f"importance {config.importance!r} needs calibration data, but the calibration iterable is empty")
    return batches
