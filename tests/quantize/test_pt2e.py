"""PT2E static int8: torchao's flow on tiny seeded models, saved without pickle, compiled."""

import json

import pytest
import torch
from tiny_models import randomise_bn, sqnr_db

from slimkit import serialize
from slimkit.errors import ConfigError, ModelLoadError
from slimkit.quantize import Pt2eInt8Module, Pt2eStaticInt8Config, quantize_
from slimkit.recipe import Recipe

LAYERS = ["stem.0", "block.0", "block.3", "head"]


def calibration(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 3, 16, 16, generator=g),) for _ in range(n)]


@pytest.fixture
def classifier():
    model = serialize.load_model("tiny_models:tiny_classifier")
    randomise_bn(model.module)
    return model


@pytest.fixture
def converted(classifier):
    ref = classifier.clone()
    quantize_(classifier, Pt2eStaticInt8Config(calibration_samples=32, compile=False), calibration=calibration())
    return ref, classifier


def test_every_conv_and_linear_computes_in_int8_close_to_float(converted):
    ref, model = converted
    assert isinstance(model.module, Pt2eInt8Module)
    assert model.module.quantized_layers == LAYERS
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = ref.module(x)
    out = model.module(x)
    assert out.shape == (5, 7)
    assert sqnr_db(expected, out) > 35
    state = model.module.state_dict()
    # Batch norm is folded into the convolutions, and only the int8 copies of the weights remain.
    assert sorted(v.numel() for k, v in state.items() if v.dtype == torch.int8) == [112, 432, 512, 4608]
    assert not [k for k, v in state.items() if v.is_floating_point() and v.dim() > 1]
    assert not [k for k in state if "running" in k]


def test_the_batch_axis_is_dynamic(converted):
    _, model = converted
    one = model.module(torch.ones(1, 3, 16, 16))
    many = model.module(torch.ones(6, 3, 16, 16))
    torch.testing.assert_close(many, one.expand(6, -1))


def test_a_saved_model_loads_with_the_same_outputs_and_no_float_weights(converted, tmp_path):
    _, model = converted
    meta = serialize.save(model, tmp_path)
    record = meta["transforms"][-1]
    assert record["config"]["method"] == "pt2e_static_int8" and record["layers"] == LAYERS
    assert len(record["config"]["activation_qparams"]) == 4
    assert record["config"]["inputs"] == [["float32", [1, 3, 16, 16]]]
    loaded = serialize.load(tmp_path)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loaded.module(x), model.module(x), rtol=0, atol=0)
    assert loaded.module.quantized_layers == LAYERS


def test_recorded_scales_that_do_not_fit_the_captured_graph_are_refused(converted, tmp_path):
    _, model = converted
    serialize.save(model, tmp_path)
    meta = json.loads((tmp_path / "slimkit.json").read_text())
    qparams = meta["transforms"][-1]["config"]["activation_qparams"]
    qparams.pop(next(iter(qparams)))
    (tmp_path / "slimkit.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="records 3 activation scales.*4 observers"):
        serialize.load(tmp_path)


def test_the_compiled_program_computes_what_the_reference_does(converted):
    _, model = converted
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    reference = model.module(x)
    model.module.compiled = True
    torch.testing.assert_close(model.module(x), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.module(x[:1]), reference[:1], rtol=1e-5, atol=1e-5)
    copy = model.clone()
    torch.testing.assert_close(copy.module(x), reference, rtol=1e-5, atol=1e-5)


def test_layers_left_out_stay_float(classifier):
    config = Pt2eStaticInt8Config(calibration_samples=8, compile=False, layers={"ignore": ["head"]})
    layers = quantize_(classifier, config, calibration=calibration(8))
    assert layers == LAYERS[:3]
    state = classifier.module.state_dict()
    assert state["program.head.weight"].dtype == torch.float32


def test_token_inputs_get_a_dynamic_sequence_axis():
    model = serialize.load_model("tiny_models:embed_mlp")
    ref = model.clone()
    # Calibrated on the lengths it is then run at: a mean over fewer tokens spreads wider.
    ids = [(torch.randint(0, 100, (1, 3 + i % 9), generator=torch.Generator().manual_seed(i)),) for i in range(32)]
    quantize_(model, Pt2eStaticInt8Config(calibration_samples=32, compile=False), calibration=ids)
    assert model.module.quantized_layers == ["head"]
    for shape in [(1, 3), (4, 11)]:
        x = torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            assert sqnr_db(ref.module(x), model.module(x)) > 35


def test_bad_input_is_refused_clearly(classifier):
    with pytest.raises(ConfigError, match="calibration_samples is 16 but 4 calibration examples"):
        quantize_(classifier, Pt2eStaticInt8Config(calibration_samples=16), calibration=calibration(4))
    with pytest.raises(ConfigError, match="give quantize_ the LoadedModel"):
        quantize_(classifier.module, Pt2eStaticInt8Config(), calibration=calibration(128))
    quantize_(classifier, Pt2eStaticInt8Config(calibration_samples=4, compile=False), calibration=calibration(4))
    with pytest.raises(ConfigError, match="only runs inference"):
        classifier.module.train()


def test_a_recipe_cannot_export_a_pt2e_model_to_onnx():
    data = {"name": "r", "model": "tiny_models:tiny_classifier", "variant": "v",
            "task": {"source": "unused", "image_size": 16},
            "stages": [{"quantize": {"method": "pt2e_static_int8"}}, {"export": {}}]}
    with pytest.raises(ConfigError, match="pt2e_static_int8.*no ONNX export.*ort_static_int8"):
        Recipe.from_dict(data)


def test_exporting_a_pt2e_model_to_onnx_says_what_to_do_instead(converted, tmp_path):
    from slimkit.deploy.export import export
    from slimkit.errors import SlimkitError

    _, model = converted
    with pytest.raises(SlimkitError, match="no ONNX export; export the float model.*ort_static_int8"):
        export(model, workdir=tmp_path)
    assert not list(tmp_path.iterdir())
