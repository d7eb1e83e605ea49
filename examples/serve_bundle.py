"""Serve a model from a verified bundle: the device side of an over-the-air update.

    python examples/serve_bundle.py MODEL.slimkit --key release.pub --dir /opt/models/m --port 8080
    curl -s localhost:8080/predict -d '{"inputs": [[[0.1, 0.2, ...]]]}'

On start it installs the bundle into ``--dir`` (verifying its signature, every file's
hash and that it is newer than what is installed; an older or the same version keeps the
installed model), then answers ``POST /predict`` with the model's output for the JSON
arrays it is given, one per model input, and ``GET /version`` with the model's name and
version. ONNX models are served by ONNX Runtime alone: this process never imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from slimkit.deploy import bundle
from slimkit.deploy.ort_runtime import OrtRunner


def install_or_keep(path: str, key: str, folder: str) -> dict[str, Any]:
    """Install ``path`` into ``folder`` if it is newer; the manifest of what is installed."""
    try:
        return bundle.install_bundle(path, key, folder)
    except bundle.BundleError as e:
        if "is not newer than the installed" not in str(e):
            raise
        return json.loads((Path(folder) / bundle.INSTALLED).read_text())


def make_server(path: str, key: str, folder: str, port: int = 0) -> ThreadingHTTPServer:
    """A server answering from the model of the verified bundle ``path`` (not started)."""
    manifest = install_or_keep(path, key, folder)
    if manifest["runtime"]["framework"] != "onnx":
        raise bundle.BundleError("this example serves ONNX bundles; export the model with slimkit export first")
    runner = OrtRunner(str(Path(folder) / "model.onnx"))
    about = json.dumps(manifest["model"]).encode()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 - the http.server hook
            self._send(200, about) if self.path == "/version" else self._send(404, b'{"error": "not found"}')

        def do_POST(self):  # noqa: N802
            if self.path != "/predict":
                return self._send(404, b'{"error": "not found"}')
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                arrays = [np.asarray(x, dtype=np.float32) for x in request["inputs"]]
                out = runner(*arrays)
            except (ValueError, KeyError, TypeError) as e:
                return self._send(400, json.dumps({"error": str(e)}).encode())
            self._send(200, json.dumps({"outputs": out.tolist(), "model": manifest["model"]}).encode())

        def log_message(self, *_):  # quiet: a device logs what it chooses
            pass

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--key", required=True, help="the signer's public key")
    parser.add_argument("--dir", required=True, help="where the model is installed")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    try:
        server = make_server(args.bundle, args.key, args.dir, args.port)
    except bundle.BundleError as e:
        print(f"serve_bundle: refused: {e}", file=sys.stderr)
        return 2
    print(f"serving on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
