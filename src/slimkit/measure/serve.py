"""Serve a saved variant for 20 inferences and report the process's peak memory.

Run as ``python -m slimkit.measure.serve MODEL_DIR INPUTS.npz`` (the model's inputs in
order: token ids, mask and types for a text encoder, images for an image model). An ONNX variant is served
through ONNX Runtime alone: this process then never imports torch, as in deployment.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import numpy as np


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory.

    VmHWM belongs to the process's own address space; ``getrusage``'s ru_maxrss would
    also carry the parent's peak across fork and exec, hiding the real difference.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    # Other systems: ru_maxrss (KiB on Linux, bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model_dir")
    p.add_argument("inputs")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    meta = json.loads((Path(args.model_dir) / "slimkit.json").read_text())
    feeds = dict(np.load(args.inputs))
    if meta["framework"] == "onnx":
        from slimkit.deploy.ort_runtime import OrtEncoder, OrtRunner

        cls = OrtEncoder if "input_ids" in feeds else OrtRunner
        run = cls(str(Path(args.model_dir) / meta["weights"]), threads=args.threads)
    else:
        import torch

        from slimkit.measure.runners import make_runner
        from slimkit.serialize import load

        example = tuple(torch.from_numpy(v) for v in feeds.values())
        run = make_runner(load(args.model_dir), threads=args.threads, example=example)
    for _ in range(args.runs):
        out = run(*feeds.values())
    peak = peak_rss_bytes()
    print(json.dumps({"peak_rss_bytes": peak, "torch_imported": "torch" in sys.modules,
                      "output_shape": list(np.asarray(out).shape)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
