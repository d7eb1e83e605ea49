"""Running an exported encoder with ONNX Runtime.

This module imports neither torch nor the rest of slimkit (its errors only), so that a
process serving an ONNX variant carries only ONNX Runtime and numpy (what is measured
for its memory).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from slimkit.errors import SlimkitError

# Graph fusions ONNX Runtime would apply when it loads a model, left out on CPU because
# they make it slower there (exported files keep the unfused form, so a GPU session
# still fuses). SkipLayerNormalization (residual add and layer norm in one kernel) took
# about 320 us on a 128 x 384 input on one CPU thread with ONNX Runtime 1.32, against
# 45 us for Add followed by LayerNormalization: at batch 1, sequence 128 that was a
# sixth of an int8 MiniLM's time, and a third once half its heads and 70% of its FFN
# neurons were pruned.
DISABLED_FUSIONS = ("SkipLayerNormFusion",)


def session_options(threads: int, device: str = "cpu") -> ort.SessionOptions:
    """Options fixed for fair measurement: ``threads`` intra-op threads, sequential graph,
    and on CPU the slower fusions of :data:`DISABLED_FUSIONS` left out."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if not device.startswith("cuda"):
        so.add_session_config_entry("optimization.disable_specified_optimizers", ",".join(DISABLED_FUSIONS))
    return so


# What each device asks of ONNX Runtime, in order of preference; the CPU provider runs
# whatever a device provider does not.
EXECUTION_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    "openvino": ["OpenVINOExecutionProvider", "CPUExecutionProvider"],
}


def providers(device: str = "cpu") -> list[str]:
    """ONNX Runtime's execution providers for ``device`` (``cpu``, ``cuda`` or ``cuda:N``,
    ``tensorrt``, ``openvino``).

    Raises:
        SlimkitError: the device is unknown, or its provider is not in this ONNX Runtime
            (the message lists the ones that are): asking for a GPU and measuring on the
            CPU without a word would be a wrong result, not a fallback.
    """
    kind = device.split(":")[0]
    if kind not in EXECUTION_PROVIDERS:
        raise SlimkitError(f"device {device!r}: ONNX Runtime devices are {', '.join(EXECUTION_PROVIDERS)}")
    wanted = EXECUTION_PROVIDERS[kind]
    available = ort.get_available_providers()
    if wanted[0] not in available:
        package = {"cuda": "onnxruntime-gpu", "tensorrt": "onnxruntime-gpu (with TensorRT)",
                   "openvino": "onnxruntime-openvino"}.get(kind, "onnxruntime")
        raise SlimkitError(f"device {device!r} needs ONNX Runtime's {wanted[0]}, which this installation does not "
                           f"have (it has {', '.join(available)}); install {package}, or measure on device cpu")
    return [p for p in wanted if p in available]


class OrtEncoder:
    """Callable ONNX Runtime session taking token ids and masks as numpy arrays."""

    def __init__(self, path: str, threads: int = 1, device: str = "cpu"):
        self.session = ort.InferenceSession(str(path), session_options(threads, device), providers=providers(device))
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = token_type_ids if token_type_ids is not None else np.zeros_like(input_ids)
        feeds = {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in feeds.items() if k in self.input_names}
        return self.session.run(None, feeds)[0]


class OrtRunner:
    """Callable ONNX Runtime session for any exported model: positional numpy inputs in
    the graph's input order, the first output returned."""

    def __init__(self, path: str, threads: int = 1, device: str = "cpu"):
        self.session = ort.InferenceSession(str(path), session_options(threads, device), providers=providers(device))
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"the model takes {len(self.input_names)} input(s) {self.input_names}, got {len(inputs)}")
        return self.session.run(None, {n: np.ascontiguousarray(x) for n, x in zip(self.input_names, inputs, strict=True)})[0]
