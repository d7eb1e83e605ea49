"""Peak resident memory of a fresh process that loads a saved variant and serves it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from slimkit.errors import SlimkitError


def peak_rss(model_dir: str | Path, feeds: dict[str, np.ndarray], threads: int, runs: int = 20) -> dict:
    """Run :mod:`slimkit.measure.serve` in a subprocess; return its peak RSS and whether it imported torch."""
    with tempfile.TemporaryDirectory(prefix="slimkit-rss-") as tmp:
        inputs = Path(tmp) / "inputs.npz"
        np.savez(inputs, **feeds)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "slimkit.measure.serve", str(model_dir), str(inputs),
               "--runs", str(runs), "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise SlimkitError(f"serving {model_dir} for memory measurement failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
