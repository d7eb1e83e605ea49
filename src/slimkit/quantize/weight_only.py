"""Weight-only quantization: int8 per channel, or group-wise int4 packed two per byte.

Weights are stored small and dequantized on the fly to the activations' dtype, which cuts
memory and file size; the matmul itself stays in floating point.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimkit.config import LayerSelector, SlimConfig
from slimkit.layers import select_modules, set_module
from slimkit.quantize.int8_linear import Int8WeightLinear
from slimkit.quantize.qparams import dequantize_int8, groupwise_uint4, symmetric_int8, unpack_uint4
from slimkit.registry import register


class Int8WeightOnlyConfig(SlimConfig):
    """int8 weights with one scale per output channel (Linear rows, Embedding rows).

    Attributes:
        include_embeddings: also quantize ``nn.Embedding`` tables (often most of the file).
    """

    kind = "quantize"
    method = "int8_weight_only"
    include_embeddings: bool = True
    layers: LayerSelector = Field(default_factory=LayerSelector)


class Int4WeightOnlyConfig(SlimConfig):
    """Asymmetric 4-bit weights with a scale and zero point per group of input columns."""

    kind = "quantize"
    method = "int4_weight_only"
    group_size: Literal[32, 64, 128] = 64
    scale_dtype: Literal["float16", "float32"] = "float16"
    layers: LayerSelector = Field(default_factory=LayerSelector)



class Int8WeightOnlyLinear(Int8WeightLinear):
    """int8 weights (per output channel) dequantized to the input's dtype for the matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_int8(self.weight_int8, self.weight_scale).to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


class Int8WeightOnlyEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> Int8WeightOnlyEmbedding:
        m = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx)
        q, s = symmetric_int8(emb.weight, per_channel=True)
        m.weight_int8.copy_(q)
        m.weight_scale.copy_(s)
        return m.to(emb.weight.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Gather the int8 rows first, then dequantize only those: the table stays int8.
        rows = F.embedding(ids, self.weight_int8)
        return rows.float() * F.embedding(ids, self.weight_scale[:, None])


class Int4WeightOnlyLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int, scale_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight_uint4x2", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=scale_dtype))
        self.register_buffer("weight_zero", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, scale_dtype: torch.dtype) -> Int4WeightOnlyLinear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, scale_dtype)
        packed, scale, zero = groupwise_uint4(linear.weight, group_size)
        m.weight_uint4x2.copy_(packed)
        m.weight_scale.copy_(scale.to(scale_dtype))
        m.weight_zero.copy_(zero.to(torch.uint8))
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = unpack_uint4(self.weight_uint4x2, self.weight_scale.float(), self.weight_zero.float(), x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


@register(Int8WeightOnlyConfig)
def _apply_int8(model: nn.Module, config: Int8WeightOnlyConfig, **_) -> list[str]:
    types = (nn.Linear, nn.Embedding) if config.include_embeddings else (nn.Linear,)
    names = select_modules(model, config.layers, types)
    for name in names:
        old = model.get_submodule(name)
        if isinstance(old, nn.Embedding):
            set_module(model, name, Int8WeightOnlyEmbedding.from_embedding(old))
        else:
            set_module(model, name, Int8WeightOnlyLinear.from_linear(old))
    return names


@register(Int4WeightOnlyConfig)
def _apply_int4(model: nn.Module, config: Int4WeightOnlyConfig, **_) -> list[str]:
    names = select_modules(model, config.layers, (nn.Linear,))
    dtype = getattr(torch, config.scale_dtype)
    done = []
    for name in names:
        old = model.get_submodule(name)
        # A layer whose width is not a multiple of the group keeps its precision rather
        # than being padded: padding would change its shape in the saved file.
        if old.in_features % config.group_size:
            continue
        set_module(model, name, Int4WeightOnlyLinear.from_linear(old, config.group_size, dtype))
        done.append(name)
    return done
