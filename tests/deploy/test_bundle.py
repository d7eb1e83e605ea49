"""Signed bundles: made, verified and installed; every kind of tampering refused by name."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch
from tiny_models import SPEC_MLP, inputs, mlp, signed_onnx_bundle

from slimkit.cli import main
from slimkit.deploy import bundle as B
from slimkit.deploy.ort_runtime import OrtRunner
from slimkit.serialize import save
from slimkit.zoo.models import LoadedModel


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A saved PyTorch model with a run's metrics, two signing keys, and a bundle of version 1.2.0."""
    root = tmp_path_factory.mktemp("bundle")
    module, example = mlp()
    save(LoadedModel(module, dict(SPEC_MLP), example_inputs=example), root / "model")
    (root / "model" / "metrics.json").write_text(json.dumps({"variants": []}))
    key, pub = B.generate_key(root / "signer")
    other, other_pub = B.generate_key(root / "other")
    manifest = B.create_bundle(root / "model", key, root / "m-1.2.0.slimkit", "1.2.0", name="mlp", target="raspberry-pi-5")
    return root, key, pub, other_pub, manifest


def test_the_private_key_is_readable_by_its_owner_only(made):
    root = made[0]
    assert (root / "signer").stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in (root / "signer").read_bytes() and b"PUBLIC KEY" in (root / "signer.pub").read_bytes()


def test_a_bundle_lists_every_file_with_its_hash_and_verifies(made):
    root, _, pub, _, manifest = made
    assert sorted(manifest["files"]) == ["metrics.json", "model.safetensors", "slimkit.json"]
    assert manifest["model"] == {"name": "mlp", "version": "1.2.0"} and manifest["target"] == "raspberry-pi-5"
    assert manifest["runtime"]["framework"] == "torch" and len(manifest["signer"]) == 64
    assert B.verify_bundle(root / "m-1.2.0.slimkit", pub) == manifest
    with tarfile.open(root / "m-1.2.0.slimkit") as tar:
        assert sorted(tar.getnames()) == ["manifest.json", "manifest.sig", "payload/metrics.json",
                                          "payload/model.safetensors", "payload/slimkit.json"]


def flipped(src, dest, member: str | None, offset: int = 0):
    """A copy of the bundle ``src`` with one byte flipped inside ``member``'s data (None:
    in the first tar header)."""
    data = bytearray(src.read_bytes())
    if member is None:
        at = 100  # the mode field of the first header: its checksum no longer matches
    else:
        with tarfile.open(src) as tar:
            at = tar.getmember(member).offset_data + offset
    data[at] ^= 0x01
    dest.write_bytes(bytes(data))
    return dest


@pytest.mark.parametrize(("member", "message"), [
    ("manifest.json", "the signature does not match the manifest"),
    ("manifest.sig", "the signature does not match the manifest"),
    ("payload/model.safetensors", "'payload/model.safetensors' does not match its SHA-256"),
    ("payload/slimkit.json", "'payload/slimkit.json' does not match its SHA-256"),
    ("payload/metrics.json", "'payload/metrics.json' does not match its SHA-256"),
    (None, "not a readable bundle"),
])
def test_one_flipped_byte_anywhere_is_refused(made, tmp_path, member, message):
    root, _, pub, _, _ = made
    bad = flipped(root / "m-1.2.0.slimkit", tmp_path / "bad.slimkit", member, offset=7)
    with pytest.raises(B.BundleError, match=message):
        B.verify_bundle(bad, pub)


def test_a_wrong_key_an_unsigned_bundle_and_a_truncated_one_are_refused(made, tmp_path):
    root, _, pub, other_pub, manifest = made
    with pytest.raises(B.BundleError, match=r"signed by another key \(fingerprint [0-9a-f]{16}\.\.\.\), not the given"):
        B.verify_bundle(root / "m-1.2.0.slimkit", other_pub)
    with tarfile.open(root / "m-1.2.0.slimkit") as src, tarfile.open(tmp_path / "unsigned.slimkit", "w") as dst:
        for m in src.getmembers():
            if m.name != "manifest.sig":
                dst.addfile(m, src.extractfile(m))
    with pytest.raises(B.BundleError, match=r"unsigned \(no manifest.sig\)"):
        B.verify_bundle(tmp_path / "unsigned.slimkit", pub)
    data = (root / "m-1.2.0.slimkit").read_bytes()
    (tmp_path / "short.slimkit").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(B.BundleError, match="truncated"):
        B.verify_bundle(tmp_path / "short.slimkit", pub)


def test_an_added_file_is_refused(made, tmp_path):
    root, _, pub, _, _ = made
    with tarfile.open(root / "m-1.2.0.slimkit") as src, tarfile.open(tmp_path / "extra.slimkit", "w") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
        info = tarfile.TarInfo("payload/backdoor.py")
        info.size = 4
        dst.addfile(info, __import__("io").BytesIO(b"pass"))
    with pytest.raises(B.BundleError, match="'payload/backdoor.py' is not in the signed manifest"):
        B.verify_bundle(tmp_path / "extra.slimkit", pub)


def test_install_refuses_a_downgrade_and_keeps_what_was_installed(made, tmp_path):
    root, key, pub, _, _ = made
    dest = tmp_path / "device"
    B.install_bundle(root / "m-1.2.0.slimkit", pub, dest)
    assert B.installed_version(dest) == "1.2.0"
    B.create_bundle(root / "model", key, tmp_path / "m-1.10.slimkit", "1.10", name="mlp")
    B.create_bundle(root / "model", key, tmp_path / "m-1.1.9.slimkit", "1.1.9", name="mlp")
    with pytest.raises(B.BundleError, match="version 1.1.9 is not newer than the installed 1.2.0"):
        B.install_bundle(tmp_path / "m-1.1.9.slimkit", pub, dest)
    with pytest.raises(B.BundleError, match="version 1.2.0 is not newer than the installed 1.2.0"):
        B.install_bundle(root / "m-1.2.0.slimkit", pub, dest)
    # A tampered newer bundle leaves the installed model as it was.
    bad = flipped(tmp_path / "m-1.10.slimkit", tmp_path / "bad.slimkit", "payload/model.safetensors", 9)
    with pytest.raises(B.BundleError, match="does not match its SHA-256"):
        B.install_bundle(bad, pub, dest)
    assert B.installed_version(dest) == "1.2.0" and sorted(p.name for p in dest.iterdir()) == [
        "bundle-manifest.json", "metrics.json", "model.safetensors", "slimkit.json"]
    B.install_bundle(tmp_path / "m-1.10.slimkit", pub, dest)  # 1.10 is after 1.2.0
    assert B.installed_version(dest) == "1.10"


def test_a_verified_bundle_loads_and_answers_as_the_saved_model(made, tmp_path):
    root, _, pub, _, _ = made
    model = B.load_bundle(root / "m-1.2.0.slimkit", pub, tmp_path / "device")
    module, _ = mlp()
    x = inputs(3)
    torch.testing.assert_close(model.module(x), module(x))


def test_an_onnx_bundle_names_its_inputs_outputs_and_runtime(tmp_path):
    module, manifest, pub = signed_onnx_bundle(tmp_path, "2.0")
    assert manifest["runtime"]["framework"] == "onnx" and manifest["runtime"]["opset"] >= 17
    assert manifest["runtime"]["execution_provider"] == "CPUExecutionProvider"
    assert [i["name"] for i in manifest["io"]["inputs"]] and manifest["io"]["outputs"][0]["dtype"] == "float"
    model = B.load_bundle(tmp_path / "m.slimkit", pub, tmp_path / "device")
    x = inputs(2)
    np.testing.assert_allclose(OrtRunner(str(model.path))(x.numpy()), module(x).detach().numpy(), atol=1e-5)


def test_the_command_line_makes_verifies_and_installs(made, tmp_path, capsys):
    root, _, _, _, _ = made
    assert main(["bundle", "keygen", str(tmp_path / "k")]) == 0
    assert main(["bundle", "keygen", str(tmp_path / "k")]) == 2  # never overwritten
    assert "already exists" in capsys.readouterr().err
    assert main(["bundle", "create", str(root / "model"), "--key", str(tmp_path / "k"), "--version", "3.0",
                 "-o", str(tmp_path / "b.slimkit")]) == 0
    assert main(["bundle", "verify", str(tmp_path / "b.slimkit"), "--key", str(tmp_path / "k.pub")]) == 0
    assert main(["bundle", "verify", str(tmp_path / "b.slimkit"), "--key", str(tmp_path / "k.pub"),
                 "--installed", "3.0"]) == 2
    assert "not newer than the installed 3.0" in capsys.readouterr().err
    assert main(["bundle", "install", str(tmp_path / "b.slimkit"), str(tmp_path / "dev"), "--key",
                 str(tmp_path / "k.pub")]) == 0
    assert main(["bundle", "create", str(root / "model"), "--key", str(tmp_path / "k"), "--version", "v3",
                 "-o", str(tmp_path / "c.slimkit")]) == 2
    assert "version 'v3': write it as numbers with dots" in capsys.readouterr().err
    assert not (tmp_path / "c.slimkit").exists()


def test_a_device_without_the_runtime_the_model_needs_refuses_it(tmp_path, monkeypatch):
    import onnxruntime

    _, manifest, pub = signed_onnx_bundle(tmp_path, "2.0")
    assert manifest["runtime"]["custom_ops"] == []  # a plain exported graph: standard operators only
    B.check_runtime(manifest)  # this machine built it: it can run it
    newer = {**manifest, "runtime": {**manifest["runtime"], "onnxruntime": "99.1.0", "custom_ops": ["com.microsoft:QAttention"]}}
    with pytest.raises(B.BundleError, match=r"needs onnxruntime >= 99.1.0 \(opset \d+, com.microsoft:QAttention\); "
                                            r"this device has"):
        B.check_runtime(newer)
    gpu = {**manifest, "runtime": {**manifest["runtime"], "execution_provider": "TensorrtExecutionProvider"}}
    with pytest.raises(B.BundleError, match="built for TensorrtExecutionProvider, which this device's ONNX Runtime "
                                            "does not have \\(it has .*CPUExecutionProvider"):
        B.check_runtime(gpu)
    # Installing on an older ONNX Runtime is refused, and nothing is installed.
    monkeypatch.setattr(onnxruntime, "__version__", "1.0.0")
    with pytest.raises(B.BundleError, match="this device has 1.0.0"):
        B.install_bundle(tmp_path / "m.slimkit", pub, tmp_path / "device")
    assert not (tmp_path / "device").exists()


def test_a_pt2e_bundle_needs_the_torch_it_was_captured_with_and_torchao(tmp_path, monkeypatch):
    import importlib.metadata

    from slimkit.quantize import Pt2eStaticInt8Config, quantize_
    from slimkit.serialize import load_model

    model = load_model("tiny_models:tiny_classifier")
    g = torch.Generator().manual_seed(0)
    quantize_(model, Pt2eStaticInt8Config(calibration_samples=8, compile=False),
              calibration=[(torch.randn(1, 3, 16, 16, generator=g),) for _ in range(8)])
    save(model, tmp_path / "model")
    key, pub = B.generate_key(tmp_path / "signer")
    manifest = B.create_bundle(tmp_path / "model", key, tmp_path / "m.slimkit", "1.0.0")
    runtime = manifest["runtime"]
    assert runtime["captured_program"] is True and runtime["torchao"] == importlib.metadata.version("torchao")
    x = torch.randn(2, 3, 16, 16, generator=g)
    loaded = B.load_bundle(tmp_path / "m.slimkit", pub, tmp_path / "device")
    torch.testing.assert_close(loaded.module(x), model.module(x), rtol=0, atol=0)
    major, minor = torch.__version__.split(".")[:2]
    other = {**manifest, "runtime": {**runtime, "torch": f"{major}.{int(minor) - 1}.0"}}
    with pytest.raises(B.BundleError, match=rf"captured with torch {major}.{int(minor) - 1}.0.*install torch "
                                            rf"{major}.{int(minor) - 1}"):
        B.check_runtime(other)
    real_version = importlib.metadata.version

    def without_torchao(name):
        if name == "torchao":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", without_torchao)
    with pytest.raises(B.BundleError, match="needs torchao >= .*does not have torchao"):
        B.install_bundle(tmp_path / "m.slimkit", pub, tmp_path / "device2")
    assert not (tmp_path / "device2").exists()
