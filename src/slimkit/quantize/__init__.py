"""Quantization: ``quantize_(model, config)`` with one registered method per config type."""

from slimkit.quantize.api import quantize_
from slimkit.quantize.dynamic import DynamicInt8Config
from slimkit.quantize.lowp import LowPrecisionConfig
from slimkit.quantize.ort import OrtDynamicInt8Config, OrtStaticInt8Config
from slimkit.quantize.ort_fp16 import OrtFp16Config
from slimkit.quantize.pt2e import Pt2eInt8Module, Pt2eStaticInt8Config, pt2e_static_int8
from slimkit.quantize.qat import QATConfig, convert_qat_
from slimkit.quantize.weight_only import Int4WeightOnlyConfig, Int8WeightOnlyConfig

__all__ = [
    "quantize_",
    "DynamicInt8Config",
    "Int8WeightOnlyConfig",
    "Int4WeightOnlyConfig",
    "LowPrecisionConfig",
    "OrtDynamicInt8Config",
    "OrtFp16Config",
    "OrtStaticInt8Config",
    "Pt2eInt8Module",
    "Pt2eStaticInt8Config",
    "pt2e_static_int8",
    "QATConfig",
    "convert_qat_",
]
