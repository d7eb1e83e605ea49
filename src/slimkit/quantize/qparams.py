"""Symmetric and asymmetric integer quantization of weight tensors."""

from __future__ import annotations

import torch


def symmetric_int8(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values in [-127, 127] and float32 scales (one per row, or one in all)."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax().reshape(1)
    scale = (amax / 127.0).clamp(min=1e-12)
    q = torch.round(w / (scale[:, None] if per_channel else scale)).clamp(-127, 127)
    return q.to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * (scale[:, None] if scale.numel() > 1 else scale)


def groupwise_uint4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes (0..15) per group of ``group_size`` input columns.

    Returns packed codes (uint8, two per byte: low nibble first), and per-group float
    scales and zero points shaped ``[rows, groups]``.
    """
    rows, cols = w.shape
    g = w.detach().float().reshape(rows, cols // group_size, group_size)
    # The range always spans zero so that the zero point is a valid code (0..15) even for
    # a group whose weights are all positive, all negative or all equal.
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.round(g / scale[..., None] + zero[..., None]).clamp(0, 15).to(torch.uint8)
    q = q.reshape(rows, cols)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, scale, zero


def unpack_uint4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows = packed.shape[0]
    q = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(rows, -1)
    groups = scale.shape[1]
    q = q.reshape(rows, groups, -1).to(dtype)
    return ((q - zero[..., None].to(dtype)) * scale[..., None].to(dtype)).reshape(rows, -1)
