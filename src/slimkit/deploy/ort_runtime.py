"""Running an exported encoder with ONNX Runtime.

This module imports neither torch nor the rest of slimkit, so that a process serving an
ONNX variant carries only ONNX Runtime and numpy (what is measured for its memory).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


def session_options(threads: int) -> ort.SessionOptions:
    """Options fixed for fair measurement: ``threads`` intra-op threads, sequential graph."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def providers(device: str = "cpu") -> list[str]:
    """Execution providers for ``device``; CUDA falls back to CPU when unavailable."""
    available = ort.get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtEncoder:
    """Callable ONNX Runtime session taking token ids and masks as numpy arrays."""

    def __init__(self, path: str, threads: int = 1, device: str = "cpu"):
        self.session = ort.InferenceSession(str(path), session_options(threads), providers=providers(device))
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = token_type_ids if token_type_ids is not None else np.zeros_like(input_ids)
        feeds = {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in feeds.items() if k in self.input_names}
        return self.session.run(None, feeds)[0]
