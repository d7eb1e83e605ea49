"""Quantization-aware training: fake quantization equals the deployed int8, and it trains."""

import numpy as np
import pytest
import torch
from torch import nn

from slimkit.deploy.export import ExportConfig, export
from slimkit.deploy.ort_runtime import OrtEncoder  # noqa: F401  (ORT import check)
from slimkit.distill import DistillConfig, DistillData, LossTerm, distill
from slimkit.quantize import OrtDynamicInt8Config, QATConfig, convert_qat_, quantize_
from slimkit.quantize.dynamic import DynamicInt8Linear
from slimkit.quantize.qat import FakeQuantLinear
from slimkit.zoo.models import LoadedModel


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)).eval()


def inputs(n=64, seed=1):
    return torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))


def test_prepare_swaps_linears_and_keeps_parameter_names():
    model = net()
    names = quantize_(model, QATConfig())
    assert names == ["0", "2"] and all(isinstance(model[i], FakeQuantLinear) for i in (0, 2))
    assert set(model.state_dict()) == set(net().state_dict())


def test_gradients_pass_straight_through_the_rounding():
    model = net()
    quantize_(model, QATConfig())
    model(inputs()).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_torch_conversion_matches_the_fake_quantized_model():
    model = net()
    quantize_(model, QATConfig(target="torch"))
    x = inputs()
    with torch.no_grad():
        fake = model(x)
        assert convert_qat_(model, "torch") == ["0", "2"]
        assert isinstance(model[0], DynamicInt8Linear)
        real = model(x)
    torch.testing.assert_close(real, fake, rtol=1e-4, atol=1e-4)


def test_onnxruntime_conversion_matches_the_fake_quantized_model(tmp_path):
    model = net()
    quantize_(model, QATConfig(target="onnxruntime"))
    x = inputs()
    with torch.no_grad():
        fake = model(x).numpy()
    convert_qat_(model, "onnxruntime")
    assert all(type(model[i]) is nn.Linear for i in (0, 2))
    onnx_model = export(LoadedModel(model, {"kind": "callable", "ref": "x:y"}, example_inputs=(x[:2],)),
                        ExportConfig(optimize="none"), workdir=tmp_path)
    quantize_(onnx_model, OrtDynamicInt8Config(per_channel=True))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_model.path), providers=["CPUExecutionProvider"])
    real = sess.run(None, {"input_0": x.numpy()})[0]
    np.testing.assert_allclose(real, fake, rtol=1e-4, atol=1e-4)


def outlier_net():
    """A ReLU net with one hidden unit 100x larger than the rest (its next layer scaled down to
    match): the same function, but per-tensor activation quantization of the hidden layer
    then loses the other units. Training through the rounding can rebalance them."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    with torch.no_grad():
        m[0].weight[0] *= 100
        m[0].bias[0] *= 100
        m[2].weight[:, 0] /= 100
    return m


def test_qat_recovers_what_quantization_lost():
    teacher = outlier_net()
    student = outlier_net()
    quantize_(student, QATConfig(target="torch"))
    x = inputs(512)

    def gap(m):
        with torch.no_grad():
            return float((m(x) - teacher(x)).pow(2).mean())

    before = gap(student)
    cfg = DistillConfig(losses=[LossTerm(kind="output_mse")], lr=1e-3, epochs=30, batch_size=64, seed=0)
    distill(teacher, student, DistillData({"input": x}), cfg, progress=False)
    after = gap(student)
    assert after < before / 2, (before, after)  # measured: 2.9x smaller


@pytest.mark.parametrize("target", ["torch", "onnxruntime"])
def test_saved_qat_model_reloads_exactly(tmp_path, target):
    from tiny_models import mlp  # tests/ helper: a seeded callable model

    from slimkit import serialize

    model, _ = mlp()
    quantize_(model, QATConfig(target=target))
    serialize.save(LoadedModel(model, {"kind": "callable", "ref": "tiny_models:mlp"}), tmp_path / "m")
    again = serialize.load(tmp_path / "m")
    assert all(m.levels == (127.0 if target == "torch" else 255.0)
               for m in again.module.modules() if isinstance(m, FakeQuantLinear))
    x = torch.randn(4, model[0].in_features)
    torch.testing.assert_close(again.module(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("target", ["torch", "onnxruntime"])
def test_converted_model_saves_as_what_it_became(tmp_path, target):
    from tiny_models import mlp

    from slimkit import serialize

    model, (x,) = mlp()
    quantize_(model, QATConfig(target=target))
    convert_qat_(model, target)
    serialize.save(LoadedModel(model, {"kind": "callable", "ref": "tiny_models:mlp"}), tmp_path / "m")
    again = serialize.load(tmp_path / "m")
    expected = DynamicInt8Linear if target == "torch" else nn.Linear
    assert all(type(again.module[i]) is expected for i in (0, 2))
    torch.testing.assert_close(again.module(x), model(x), rtol=0, atol=0)
