"""Sensitivity scoring finds the layer whose quantization hurts, and fallback keeps it fp32."""

import numpy as np
import torch
from torch import nn

from slimkit.quantize import DynamicInt8Config, quantize_
from slimkit.quantize.dynamic import DynamicInt8Linear
from slimkit.quantize.sensitivity import linear_sensitivity, most_sensitive


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)
        self.c = nn.Linear(32, 8)
        with torch.no_grad():
            # One huge row in b sets its per-tensor int8 step far above its other weights;
            # the row's output is switched off by the ReLU, so activations stay tame.
            self.b.weight[0] = 100.0
            self.b.bias[0] = -1e5

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def calibration(n=8):
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((4, 32)).astype(np.float32)} for _ in range(n)]


def test_the_outlier_layer_is_the_most_sensitive():
    net = Net().eval()
    scores = linear_sensitivity(net, ["a", "b", "c"], calibration(), per_channel=False)
    assert most_sensitive(scores, 1) == ["b"]
    assert scores["b"] > 10 * max(scores["a"], scores["c"])
    assert all(isinstance(m, nn.Linear) for m in (net.a, net.b, net.c)), "scoring leaves the model unchanged"


def test_fallback_keeps_the_sensitive_layer_in_fp32():
    net = Net().eval()
    x = torch.from_numpy(calibration(1)[0]["x"])
    ref = net(x)
    quantized = quantize_(net, DynamicInt8Config(granularity="per_tensor", fallback_layers=1), calibration=calibration())
    assert quantized == ["a", "c"]
    assert isinstance(net.b, nn.Linear) and isinstance(net.a, DynamicInt8Linear)
    assert torch.nn.functional.cosine_similarity(net(x), ref).min() > 0.999
