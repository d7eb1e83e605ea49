"""examples/serve_bundle.py answers from a verified bundle, and refuses a tampered one."""

from __future__ import annotations

import importlib.util
import json
import tarfile
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from tiny_models import inputs, signed_onnx_bundle

from slimkit.deploy import bundle

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "serve_bundle.py"


def example():
    spec = importlib.util.spec_from_file_location("serve_bundle", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_serves_a_verified_bundle(tmp_path):
    module, _, pub = signed_onnx_bundle(tmp_path)
    server = example().make_server(str(tmp_path / "m.slimkit"), str(pub), str(tmp_path / "device"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        x = inputs(2)
        request = urllib.request.Request(f"{url}/predict", data=json.dumps({"inputs": [x.tolist()]}).encode())
        answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
        np.testing.assert_allclose(np.asarray(answer["outputs"]), module(x).detach().numpy(), atol=1e-5)
        assert json.loads(urllib.request.urlopen(f"{url}/version", timeout=30).read()) == {"name": "mlp", "version": "1.0"}
    finally:
        server.shutdown()
        server.server_close()
    # A tampered bundle is refused before anything is served.
    data = bytearray((tmp_path / "m.slimkit").read_bytes())
    with tarfile.open(tmp_path / "m.slimkit") as tar:
        data[tar.getmember("payload/model.onnx").offset_data + 100] ^= 1
    (tmp_path / "bad.slimkit").write_bytes(bytes(data))
    with pytest.raises(bundle.BundleError, match="'payload/model.onnx' does not match its SHA-256"):
        example().make_server(str(tmp_path / "bad.slimkit"), str(pub), str(tmp_path / "device2"))
