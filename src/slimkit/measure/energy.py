"""Energy per inference: an analytical estimate, and a real counter where one exists.

The estimate counts multiply-accumulates by data type and the bytes of weights read from
DRAM, priced with the 45 nm figures of M. Horowitz, "Computing's energy problem (and what
we can do about it)", ISSCC 2014. It is an estimate of arithmetic and weight traffic only,
useful to compare variants, not a measurement of this machine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

SOURCE = "Horowitz, ISSCC 2014, 45 nm (estimate: MACs by type + weight bytes read from DRAM)"
# Energy in picojoules.
PJ_PER_MAC = {
    "fp32": 3.7 + 0.9,   # fp32 multiply + add
    "fp16": 1.1 + 0.4,   # fp16 multiply + add (bf16 priced the same)
    "int8": 0.2 + 0.1,   # int8 multiply + int32 add
}
PJ_PER_DRAM_BYTE = 1950.0 / 8  # 1.3-2.6 nJ per 64-bit DRAM access, midpoint


CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    """MACs of one call of a Linear or convolution layer that produced ``out``."""
    if isinstance(module, CONV_TYPES):
        # Each output value sums over its group's input channels and the kernel window;
        # a depthwise convolution (groups == channels) sums over the window alone.
        return out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    return out.numel() * module.in_features


def layer_macs(model: nn.Module, inputs: tuple,
               layer_types: tuple[type, ...] = (nn.Linear, *CONV_TYPES)) -> tuple[dict[str, int], int]:
    """MACs of each Linear and convolution layer, and of the whole forward pass, for ``inputs``.

    The per-layer counts are what precision changes: a layer computed in int8 is priced
    at the int8 rate in :func:`estimate`.
    """
    from torch.utils.flop_counter import FlopCounterMode

    per_layer: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, layer_types):
            def hook(mod, args, out, name=name):
                per_layer[name] = per_layer.get(name, 0) + _layer_macs(mod, out)
            hooks.append(m.register_forward_hook(hook))
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return per_layer, counter.get_total_flops() // 2


def linear_macs(model: nn.Module, inputs: tuple, linear_types: tuple[type, ...] = (nn.Linear,)) -> tuple[dict[str, int], int]:
    """MACs of each Linear layer, and of the whole forward pass, for ``inputs``."""
    return layer_macs(model, inputs, linear_types)


def estimate(total_macs: int, per_layer_macs: dict[str, int], low_layers: dict[str, str], weight_bytes: int) -> dict:
    """Estimated millijoules per inference.

    Args:
        total_macs: MACs of the fp32 forward pass.
        per_layer_macs: MACs of each Linear and convolution layer.
        low_layers: qualified name (or prefix) of each layer computed in a lower precision
            mapped to ``"int8"`` or ``"fp16"``.
        weight_bytes: bytes of weights read once per inference.
    """
    by_type = {"fp32": total_macs, "int8": 0, "fp16": 0}
    for name, macs in per_layer_macs.items():
        for prefix, kind in low_layers.items():
            if _covered(name, [prefix]):
                by_type[kind] += macs
                by_type["fp32"] -= macs
                break
    pj = sum(by_type[k] * PJ_PER_MAC[k] for k in by_type) + weight_bytes * PJ_PER_DRAM_BYTE
    return {
        "estimate_mj": pj * 1e-9,
        "macs": int(total_macs),
        "int8_mac_fraction": by_type["int8"] / total_macs if total_macs else 0.0,
        "bytes_moved": int(weight_bytes),
        "source": SOURCE,
    }


def _covered(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def weight_bytes_read(file_bytes: int, tables: list[tuple[str, int, int]], int8_layers: list[str], tokens: int) -> int:
    """Bytes of weights read for one sequence of ``tokens`` tokens.

    Every weight in the file is read, except embedding tables, of which only the rows of
    the sequence's tokens are.

    Args:
        file_bytes: size of the weights file.
        tables: ``(qualified name, number of elements, row width)`` of each fp32 embedding table.
        int8_layers: layers (or prefixes) stored in int8; other tables count 4 bytes a value.
        tokens: the sequence length.
    """
    total = file_bytes
    for name, numel, dim in tables:
        per_value = 1 if _covered(name, int8_layers) else 4
        total -= numel * per_value
        total += min(tokens, numel // dim) * dim * per_value
    return max(total, 0)


RAPL = Path("/sys/class/powercap/intel-rapl:0/energy_uj")


def energy_counter(device: str = "cpu") -> tuple[str, Callable[[], float]] | None:
    """A cumulative energy counter in millijoules for ``device``, or None if there is none.

    NVIDIA GPUs: NVML's total energy (needs the ``pynvml`` package). CPUs: Linux RAPL's
    package counter, where the kernel exposes it and it is readable.
    """
    if device.startswith("cuda"):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            return "NVML total energy (whole GPU)", lambda: float(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        except Exception:  # no pynvml, no permission, or an unsupported GPU
            return None
    try:
        int(RAPL.read_text())
    except (OSError, ValueError):
        return None
    return "RAPL package (whole CPU, includes idle and other load)", lambda: int(RAPL.read_text()) / 1000.0


def measured_energy(call: Callable[[], object], device: str = "cpu", seconds: float = 3.0) -> dict | None:
    """Millijoules per call read from a real counter, or None where none is readable."""
    counter = energy_counter(device)
    if counter is None:
        return None
    name, read = counter
    start = read()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        call()
        n += 1
    end = read()
    if end < start:  # the counter wrapped
        return None
    return {"mj_per_inference": (end - start) / n, "counter": name}
