"""Quantization-aware training: fake quantization equals the deployed int8, and it trains."""

import numpy as np
import pytest
import torch
from torch import nn

from slimkit.config import validate_config
from slimkit.deploy.export import ExportConfig, export
from slimkit.deploy.ort_runtime import OrtEncoder  # noqa: F401  (ORT import check)
from slimkit.distill import DistillConfig, DistillData, LossTerm, distill
from slimkit.errors import ConfigError
from slimkit.quantize import (
    OrtDynamicInt8Config,
    OrtStaticInt8Config,
    QATConfig,
    convert_qat_,
    quantize_,
)
from slimkit.quantize.api import transforms_of
from slimkit.quantize.dynamic import DynamicInt8Linear
from slimkit.quantize.qat import FakeQuantConv2d, FakeQuantLinear, fake_quant_static, static_qparams
from slimkit.quantize.static_int8 import StaticInt8Conv2d, StaticInt8Linear
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


# -- fixed activation ranges (observed / learned) and Conv2d ----------------------------

STATIC = ["observed", "learned"]
CONV = {"kind": "callable", "ref": "test_qat:convnet"}


def convnet(seed=0):
    """Padded, strided and grouped convolutions, then a Linear head; input ``[N, 3, 8, 8]``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.Flatten(), nn.Linear(72, 10),
    ).eval()


def images(n=32, seed=1):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def build(kind):
    return (net(), inputs) if kind == "mlp" else (convnet(), images)


def prepare(kind, target, activations):
    model, data = build(kind)
    quantize_(model, QATConfig(target=target, activations=activations, modules=["linear", "conv2d"]))
    return model, data


def train_a_little(model, data, steps=4):
    """A few Adam steps towards the outputs of an unrelated seed's fp32 model, so that the
    weights and learned ranges move away from where they started."""
    far = (net if data is inputs else convnet)(seed=3)
    x = data(seed=50)
    with torch.no_grad():
        target = far(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        loss = (model(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_config_refuses_freezing_a_range_it_does_not_observe():
    with pytest.raises(ConfigError, match="freeze_ranges_after applies to activations='observed'"):
        validate_config(QATConfig, {"activations": "learned", "freeze_ranges_after": 10})
    assert QATConfig(activations="observed", freeze_ranges_after=10).freeze_ranges_after == 10
    assert QATConfig().modules == ["linear"]  # Conv2d layers only when asked


def test_observed_range_is_a_running_min_max_frozen_in_eval():
    model = net()
    quantize_(model, QATConfig(activations="observed", range_momentum=0.25, freeze_ranges_after=2))
    layer = model[0]
    assert set(model.state_dict()) - set(net().state_dict()) == {
        f"{i}.{b}" for i in (0, 2) for b in ("input_min", "input_max", "input_observed")}
    a, b, c = inputs(8, seed=1), inputs(8, seed=2) * 3, inputs(8, seed=3) * 10
    model.train()
    model(a)
    assert float(layer.input_min) == float(a.min()) and float(layer.input_max) == float(a.max())
    model(b)
    # EMA: each new batch moves the range a quarter of the way to its own min and max.
    assert float(layer.input_min) == pytest.approx(float(a.min()) + 0.25 * (float(b.min()) - float(a.min())), rel=1e-6)
    assert float(layer.input_max) == pytest.approx(float(a.max()) + 0.25 * (float(b.max()) - float(a.max())), rel=1e-6)
    frozen = (float(layer.input_min), float(layer.input_max))
    model(c)  # a third training batch: past freeze_ranges_after=2
    assert (float(layer.input_min), float(layer.input_max)) == frozen and int(layer.input_observed) == 3
    model.eval()
    model(c)
    assert (float(layer.input_min), float(layer.input_max)) == frozen and int(layer.input_observed) == 3


def test_zero_is_exactly_representable():
    for lo, hi in [(-1.3, 2.7), (0.2, 5.0), (-4.0, -0.5), (-0.003, 100.0)]:
        scale, zero = static_qparams(torch.tensor(lo), torch.tensor(hi))
        assert float(zero) == round(float(zero)) and 0 <= float(zero) <= 255
        assert float(fake_quant_static(torch.zeros(()), scale, zero)) == 0.0
    # A ReLU output's range starts at 0: zero point 0, and zeros stay zeros.
    model = nn.Sequential(nn.ReLU(), nn.Linear(4, 2))
    quantize_(model, QATConfig(activations="observed"))
    model.train()(torch.randn(16, 4))
    assert int(model[1].input_qparams()[1]) == 0


def test_learned_range_starts_at_the_first_batch_and_trains():
    model = net()
    quantize_(model, QATConfig(activations="learned"))
    layer = model[0]
    assert {n for n, _ in model.named_parameters()} >= {"0.input_min", "0.input_max", "2.input_min", "2.input_max"}
    x = inputs(32, seed=5)
    model.train()
    out = model(x)
    assert float(layer.input_min.detach()) == float(x.min()) and float(layer.input_max.detach()) == float(x.max())
    out.pow(2).mean().backward()
    assert layer.input_min.grad is not None and float(layer.input_min.grad) != 0
    assert layer.input_max.grad is not None and float(layer.input_max.grad) != 0
    start = (float(layer.input_min.detach()), float(layer.input_max.detach()))
    train_a_little(model, inputs, steps=5)
    moved = abs(float(layer.input_min.detach()) - start[0]) + abs(float(layer.input_max.detach()) - start[1])
    assert moved > 1e-3, moved  # Adam at lr 1e-3 moves each end ~1e-3 per step
    assert int(layer.input_observed) == 6  # only the first batch initialised it


@pytest.mark.parametrize("activations", STATIC)
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_gradients_reach_the_weights_through_the_rounding(kind, activations):
    model, data = prepare(kind, "onnxruntime", activations)
    assert any(isinstance(m, FakeQuantConv2d) for m in model.modules()) == (kind == "conv")
    model.train()(data()).pow(2).mean().backward()
    weights = [p for n, p in model.named_parameters() if n.endswith(("weight", "bias"))]
    assert weights and all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)


# Conversion tolerances. Weights, input codes and (for ONNX Runtime's Gemm and Conv) the
# int32 bias land on identical integer grids: fake quantization computes the same roundings
# in the same float32 operations. What remains is the order of summation (PyTorch's float
# GEMM against an exact integer one), measured at most 2.4e-7 on outputs below 1. A rounding
# that came out differently anywhere would move an output by at least one activation step
# times a weight (~1e-3 here), so 1e-5 also proves that every code agrees.
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize("activations", STATIC)
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_torch_static_conversion_matches_the_fake_quantized_model(kind, activations):
    model, data = prepare(kind, "torch", activations)
    train_a_little(model, data)
    x = data()
    with torch.no_grad():
        fake = model(x)
        names = convert_qat_(model)
        real = model(x)
    assert names and all(isinstance(model.get_submodule(n), (StaticInt8Linear, StaticInt8Conv2d)) for n in names)
    torch.testing.assert_close(real, fake, **TOL)
    assert [t["config"]["method"] for t in transforms_of(model)] == ["static_int8"]


@pytest.mark.parametrize("activations", STATIC)
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_onnxruntime_static_conversion_matches_the_fake_quantized_model(tmp_path, kind, activations):
    import onnxruntime as ort

    model, data = prepare(kind, "onnxruntime", activations)
    train_a_little(model, data)
    x = data()
    with torch.no_grad():
        fake = model(x).numpy()
    names = convert_qat_(model)
    assert all(type(model.get_submodule(n)) in (nn.Linear, nn.Conv2d) for n in names)
    (record,) = transforms_of(model)
    assert record["config"]["target"] == "onnxruntime" and sorted(record["config"]["input_ranges"]) == sorted(names)
    onnx_model = export(LoadedModel(model, {"kind": "callable", "ref": "x:y"}, example_inputs=(x[:2],)),
                        ExportConfig(optimize="none"), workdir=tmp_path)
    # No calibration data: every range was trained.
    quantize_(onnx_model, OrtStaticInt8Config(activation_ranges="trained"), source=model)
    sess = ort.InferenceSession(str(onnx_model.path), providers=["CPUExecutionProvider"])
    real = sess.run(None, {"input_0": x.numpy()})[0]
    np.testing.assert_allclose(real, fake, **TOL)


def test_qat_with_learned_ranges_beats_post_training_static_int8():
    teacher = outlier_net()
    x, held_out = inputs(512), inputs(256, seed=7)

    def gap(m):
        with torch.no_grad():
            return float((m(held_out) - teacher(held_out)).pow(2).mean())

    # Post-training: the ranges are the calibration data's min and max, weights untouched.
    ptq = outlier_net()
    quantize_(ptq, QATConfig(target="torch", activations="observed"))
    with torch.no_grad():
        ptq.train()(x)
    convert_qat_(ptq.eval())
    student = outlier_net()
    quantize_(student, QATConfig(target="torch", activations="learned"))
    cfg = DistillConfig(losses=[LossTerm(kind="output_mse")], lr=1e-3, epochs=15, batch_size=64, seed=0)
    distill(teacher, student, DistillData({"input": x}), cfg, progress=False)
    convert_qat_(student)
    before, after = gap(ptq), gap(student)
    assert after < before / 1.3, (before, after)  # measured: 3.4e-3 -> 2.1e-3, 1.6x smaller


def test_distill_checkpoint_keeps_the_ranges(tmp_path):
    teacher, x = net(), inputs(64)
    cfg = DistillConfig(losses=[LossTerm(kind="output_mse")], lr=1e-3, epochs=2, batch_size=32, seed=0)
    first = net()
    quantize_(first, QATConfig(activations="learned"))
    distill(teacher, first, DistillData({"input": x}), cfg, checkpoint_dir=tmp_path / "ckpt", progress=False)
    # A fresh student resumes from the finished run's checkpoint, ranges included.
    again = net()
    quantize_(again, QATConfig(activations="learned"))
    distill(teacher, again, DistillData({"input": x}), cfg, checkpoint_dir=tmp_path / "ckpt", progress=False)
    for name in ("0.input_min", "0.input_max", "2.input_observed"):
        assert torch.equal(again.state_dict()[name], first.state_dict()[name]), name
    assert int(again[2].input_observed) == 4


@pytest.mark.parametrize("activations", STATIC)
@pytest.mark.parametrize("stage", ["prepared", "torch", "onnxruntime"])
def test_saved_static_qat_model_reloads_exactly(tmp_path, monkeypatch, stage, activations):
    from pathlib import Path

    from slimkit import serialize

    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # CONV's ref: this module
    target = "torch" if stage == "prepared" else stage
    model, data = prepare("conv", target, activations)
    train_a_little(model, data, steps=2)
    if stage != "prepared":
        convert_qat_(model)
    serialize.save(LoadedModel(model, CONV), tmp_path / "m")
    again = serialize.load(tmp_path / "m")
    assert [type(m) for m in again.module] == [type(m) for m in model]
    x = data()
    with torch.no_grad():
        torch.testing.assert_close(again.module(x), model(x), rtol=0, atol=0)
    assert transforms_of(again.module) == transforms_of(model)


def test_converting_before_any_range_names_the_layer_and_the_fix():
    model = net()
    quantize_(model, QATConfig(activations="observed"))
    with torch.no_grad():
        model(inputs())  # eval mode: rounds over the call's own range, records nothing
    assert int(model[0].input_observed) == 0
    with pytest.raises(ConfigError) as info:
        convert_qat_(model)
    assert "layer '0' has no input range yet" in str(info.value) and "train it first" in str(info.value)
    assert "layer '2'" in str(info.value)  # every such layer, at once
    assert isinstance(model[0], FakeQuantLinear)  # nothing was converted


def test_converting_for_another_runtime_is_refused():
    model = net()
    quantize_(model, QATConfig(target="torch"))
    with pytest.raises(ConfigError, match="layer '0' was trained for torch's int8 arithmetic; convert it with target='torch'"):
        convert_qat_(model, "onnxruntime")


def test_dynamic_conv_is_refused_before_training():
    model = convnet()
    with pytest.raises(ConfigError) as info:
        quantize_(model, QATConfig(modules=["conv2d"]))
    assert "layer '0' is a Conv2d with dynamic activations" in str(info.value)
    assert "activations='observed' or 'learned'" in str(info.value) and "layer '4'" in str(info.value)
    assert not any(isinstance(m, FakeQuantConv2d) for m in model.modules())
