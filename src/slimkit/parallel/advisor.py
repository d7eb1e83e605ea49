"""The strategy advisor: memory per device of every strategy, and the one to use.

For a model's footprint (its parameters, the largest block FSDP gathers at once, the
parameters tensor parallel splits, and the activations a training step keeps per
example), a device count, a device's memory and a global batch, each strategy's memory
per device is the sum of

- parameters, gradients and optimizer state: 4 + 4 + 8 bytes per parameter with AdamW
  in fp32 (4 with SGD's momentum), whole (``ddp``), the optimizer state divided by the
  devices (``zero1``), everything divided (``fsdp``; ``pipeline``, by stages, whose main
  process also gathers the whole model to evaluate it), or the split layers divided by
  the tensor-parallel degree (``tp``, ``fsdp+tp``);
- what FSDP gathers: two blocks' parameters in the compute dtype (the one computing and
  the one prefetched) and one block's unsharded gradients;
- activations: per example times the examples a device computes (the global batch over
  the data-parallel degree); under tensor parallel the share inside split layers is
  divided by the degree; a pipeline stage keeps its layers' share for the micro-batches
  in flight (``2 x devices`` micro-batches, at most ``devices`` in flight under 1F1B).
  With every block checkpointed, only block inputs and one block's recomputed
  activations stay.

A strategy fits when its total is within ``1 - headroom`` of the device's memory (the
allocator's fragmentation, workspaces and the runtime's own context take the rest). The
recommendation is the first that fits in the order of least communication: ``ddp``,
``ddp`` with ``zero1``, ``fsdp``, ``fsdp+tp``, ``pipeline`` (its stages idle while the
pipeline fills), ``tp``; then the same with checkpointing,
which costs about one more forward per step. On one device there is only ``none``, with
or without checkpointing.

Transformer activations follow Korthikanti et al., "Reducing Activation Recomputation in
Large Transformer Models" (2022): per layer and sequence, ``s*h*(10 + 24/t) + 5*a*s^2/t``
bytes with 16-bit activations (twice that in fp32) for hidden width ``h``, ``a`` heads,
``s`` tokens and tensor-parallel degree ``t`` (the MLP 4x wide;
:meth:`ModelFootprint.transformer` takes any width).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from slimkit.memory.timeline import format_bytes

OPTIMIZER_BYTES = {"adamw": 8, "sgd": 4}  # per fp32 parameter: two moments, or momentum
ORDER = ("ddp", "ddp+zero1", "fsdp", "fsdp+tp", "pipeline", "tp")
ONE_DEVICE = ("none",)


@dataclass(frozen=True)
class ModelFootprint:
    """What the advisor needs to know of a model.

    Attributes:
        parameters: trainable parameters.
        largest_unit: parameters of the largest repeated block (what FSDP gathers at once).
        split: parameters in the layers tensor parallel splits (0: none).
        heads: attention heads of each block (a tensor-parallel degree must divide each).
        activations_per_example: bytes a training step keeps alive per example at its
            peak, nothing checkpointed.
        checkpointed_per_example: the same with every block checkpointed.
        split_activation_share: share of the activations inside the split layers.
        source: ``measured`` (a profiled training step) or ``formula``.
        description: what the footprint is of, for the report.
    """

    parameters: int
    largest_unit: int
    split: int = 0
    heads: tuple[int, ...] = ()
    activations_per_example: float = 0.0
    checkpointed_per_example: float = 0.0
    split_activation_share: float = 0.0
    source: str = "formula"
    description: str = ""

    @classmethod
    def transformer(cls, layers: int, hidden: int, heads: int, intermediate: int | None = None, vocab: int = 30522,
                    seq_len: int = 512, positions: int = 512, activation_bytes: int = 4,
                    description: str = "") -> ModelFootprint:
        """A BERT-style encoder of ``layers`` blocks, from its shape alone.

        ``activation_bytes`` is 4 for fp32 training, 2 under bf16/fp16 mixed precision.
        """
        h, s, a = hidden, seq_len, heads
        i = intermediate or 4 * h
        per_layer = 4 * h * h + 2 * h * i + i + 9 * h  # q/k/v/out, the MLP, biases, two LayerNorms
        split_layer = 4 * h * h + 2 * h * i + i + 3 * h  # what column/row-wise splitting divides
        embeddings = (vocab + positions + 2) * h + 2 * h
        scale = activation_bytes / 2  # the formula counts bytes of 16-bit activations
        unsplit = 10 * s * h
        split = 8 * s * h + 4 * s * i + 5 * a * s * s
        per_layer_acts = (unsplit + split) * scale
        checkpointed = layers * s * h * activation_bytes + per_layer_acts  # block inputs, one block recomputed
        return cls(parameters=layers * per_layer + embeddings, largest_unit=max(per_layer, embeddings),
                   split=layers * split_layer, heads=(heads,) * layers,
                   activations_per_example=layers * per_layer_acts, checkpointed_per_example=checkpointed,
                   split_activation_share=split / (unsplit + split), source="formula",
                   description=description or f"{layers} layers x {hidden} wide, {heads} heads, {seq_len} tokens")


@dataclass
class Estimate:
    """One strategy's memory per device, term by term, with the arithmetic."""

    strategy: str
    checkpointing: bool
    devices: int
    tp_degree: int
    examples_per_device: int
    terms: dict[str, float]
    arithmetic: dict[str, str]
    total: float
    fits: bool
    refused: str | None = None

    @property
    def label(self) -> str:
        return self.strategy + (" + checkpointing" if self.checkpointing else "")


@dataclass
class Advice:
    """Every strategy's estimate, and the recommended one (None: nothing fits)."""

    footprint: ModelFootprint
    devices: int
    device_memory: float
    batch: int
    optimizer: str
    mixed_precision: str
    headroom: float
    estimates: list[Estimate] = field(default_factory=list)
    recommended: Estimate | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"footprint": asdict(self.footprint), "devices": self.devices, "device_memory": self.device_memory,
                "batch": self.batch, "optimizer": self.optimizer, "mixed_precision": self.mixed_precision,
                "headroom": self.headroom, "estimates": [asdict(e) for e in self.estimates],
                "recommended": self.recommended.label if self.recommended else None}


def _estimate(fp: ModelFootprint, strategy: str, checkpointing: bool, devices: int, tp: int, batch: int,
              opt_bytes: int, bf16: bool, budget: float) -> Estimate:
    P, U = fp.parameters, fp.largest_unit
    state = 8 + opt_bytes
    dp = 1 if strategy == "pipeline" else devices // tp
    per_device = math.ceil(batch / dp)
    acts = fp.checkpointed_per_example if checkpointing else fp.activations_per_example
    tp_factor = 1 - fp.split_activation_share * (1 - 1 / tp)
    terms: dict[str, float] = {}
    math_: dict[str, str] = {}
    g = 2 if bf16 and "fsdp" in strategy else 4
    if strategy in ("none", "ddp"):
        terms["parameters+gradients"], math_["parameters+gradients"] = 8 * P, f"8 B x {P:,}"
        terms["optimizer_state"], math_["optimizer_state"] = opt_bytes * P, f"{opt_bytes} B x {P:,}"
    elif strategy == "ddp+zero1":
        terms["parameters+gradients"], math_["parameters+gradients"] = 8 * P, f"8 B x {P:,}"
        terms["optimizer_state"] = opt_bytes * P / devices
        math_["optimizer_state"] = f"{opt_bytes} B x {P:,} / {devices}"
    elif strategy == "fsdp":
        terms["sharded_state"], math_["sharded_state"] = state * P / devices, f"{state} B x {P:,} / {devices}"
        terms["gathered"] = (2 * g + 4) * U
        math_["gathered"] = f"(2 x {g} B + 4 B) x {U:,} (two blocks gathered, one block's gradients)"
    elif strategy == "tp":
        rest = P - fp.split
        terms["state"] = state * (fp.split / tp + rest)
        math_["state"] = f"{state} B x ({fp.split:,} / {tp} + {rest:,})"
    elif strategy == "pipeline":
        terms["stage_state"], math_["stage_state"] = state * P / devices, f"{state} B x {P:,} / {devices} stages"
        terms["gathered_for_evaluation"] = 4 * P * (devices - 1) / devices
        math_["gathered_for_evaluation"] = f"4 B x {P:,} x {devices - 1}/{devices} (the main process, evaluating)"
    elif strategy == "fsdp+tp":
        rest = P - fp.split
        terms["sharded_state"] = state * (fp.split / devices + rest / dp)
        math_["sharded_state"] = f"{state} B x ({fp.split:,} / {devices} + {rest:,} / {dp})"
        terms["gathered"] = (2 * g + 4) * U / tp
        math_["gathered"] = f"(2 x {g} B + 4 B) x {U:,} / {tp}"
    if strategy == "pipeline":
        # Each stage keeps its 1/S of the layers' activations for the micro-batches in
        # flight: all of them under GPipe, at most S under 1F1B (the default).
        micro = 2 * devices
        size = math.ceil(batch / micro)
        flight = min(devices, micro)
        terms["activations"] = acts * size * flight / devices
        math_["activations"] = (f"{format_bytes(acts)} x {size} example(s) per micro-batch x {flight} in flight "
                                f"(1F1B) / {devices} stages")
    else:
        terms["activations"] = acts * per_device * tp_factor
        math_["activations"] = (f"{format_bytes(acts)} x {per_device} example(s)"
                                + (f" x {tp_factor:.3f} (split share / {tp})" if tp > 1 else ""))
    total = sum(terms.values())
    refused = None
    if tp > 1:
        bad = sorted({h for h in fp.heads if h % tp}) if fp.heads else None
        if not fp.split:
            refused = "the model has no layers tensor parallel splits"
        elif bad:
            refused = f"{tp} does not divide the heads of every block ({', '.join(map(str, bad))})"
    if batch < dp:
        refused = f"a batch of {batch} does not split across {dp} data-parallel devices"
    if strategy == "pipeline" and batch < 2 * devices:
        refused = f"a batch of {batch} does not fill {2 * devices} micro-batches"
    return Estimate(strategy, checkpointing, devices, tp, per_device, terms, math_, total,
                    refused is None and total <= budget, refused)


def advise(footprint: ModelFootprint, devices: int, device_memory: float, batch: int, *, optimizer: str = "adamw",
           mixed_precision: str = "fp32", tp_degree: int | None = None, headroom: float = 0.1) -> Advice:
    """Estimate every strategy's memory per device and recommend one.

    Args:
        footprint: the model (:meth:`ModelFootprint.transformer`, or measured by
            :func:`slimkit.parallel.footprint.measure_footprint`).
        devices: devices available.
        device_memory: bytes per device.
        batch: the global batch (examples per optimizer step, over all devices).
        optimizer: ``adamw`` or ``sgd``.
        mixed_precision: ``bf16`` gathers FSDP parameters in bf16. Activations are the
            footprint's own: measured as profiled, or in the formula's
            ``activation_bytes`` (2 for bf16 training).
        tp_degree: the tensor-parallel degree of ``fsdp+tp`` (default: the largest of 8,
            4 and 2 that divides the devices and leaves at least two groups).
        headroom: the share of memory left for the allocator and the runtime.
    """
    opt_bytes = OPTIMIZER_BYTES[optimizer]
    bf16 = mixed_precision == "bf16"
    budget = device_memory * (1 - headroom)
    inner = tp_degree or next((t for t in (8, 4, 2) if devices % t == 0 and devices > t), 1)
    advice = Advice(footprint, devices, device_memory, batch, optimizer, mixed_precision, headroom)
    for checkpointing in (False, True):
        for strategy in ORDER if devices > 1 else ONE_DEVICE:
            tp = devices if strategy == "tp" else inner if strategy == "fsdp+tp" else 1
            if tp == 1 and strategy in ("tp", "fsdp+tp"):
                continue  # one device, or no inner degree: nothing to split
            advice.estimates.append(_estimate(footprint, strategy, checkpointing, devices, tp, batch, opt_bytes,
                                              bf16, budget))
    advice.recommended = next((e for e in advice.estimates if e.fits), None)
    return advice


def render(advice: Advice) -> str:
    """The estimates as text: one line per strategy, its terms, and the recommendation."""
    fp = advice.footprint
    lines = [f"{fp.description or 'model'}: {fp.parameters:,} trainable parameters ({fp.source} activations: "
             f"{format_bytes(fp.activations_per_example)} per example, {format_bytes(fp.checkpointed_per_example)} "
             "checkpointed)",
             f"{advice.devices} device(s) of {format_bytes(advice.device_memory)}, global batch {advice.batch}, "
             f"{advice.optimizer}, {advice.mixed_precision}; a strategy fits within "
             f"{format_bytes(advice.device_memory * (1 - advice.headroom))} ({advice.headroom:.0%} headroom)", ""]
    for e in advice.estimates:
        verdict = f"cannot: {e.refused}" if e.refused else ("fits" if e.fits else "too big")
        tp = f", tp {e.tp_degree}" if e.tp_degree > 1 else ""
        lines.append(f"{e.label:<28} {format_bytes(e.total):>10} per device  [{verdict}; "
                     f"{e.examples_per_device} example(s) per device{tp}]")
        for k, v in e.terms.items():
            lines.append(f"    {k:<22} {format_bytes(v):>10}  = {e.arithmetic[k]}")
    lines.append("")
    lines.append(f"recommended: {advice.recommended.label}" if advice.recommended else
                 "recommended: nothing fits; add devices, lower the batch (with gradient accumulation) or use bf16")
    return "\n".join(lines)
