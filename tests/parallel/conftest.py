"""Launching the scenarios of ``scenarios.py`` in torchrun workers."""

from __future__ import annotations

from pathlib import Path

from slimkit.parallel.config import ParallelConfig
from slimkit.parallel.launch import launch

HERE = Path(__file__).resolve().parent
SCENARIOS = HERE / "scenarios.py"


def run_job(job_dir: Path, function: str, config: ParallelConfig, **args) -> Path:
    """Run ``scenarios.py:function`` on ``config.nproc`` workers; the job folder."""
    # The workers import the tests' tiny models (tests/ is not a package).
    launch(job_dir, f"{SCENARIOS}:{function}", config, args, env={"PYTHONPATH": str(HERE.parent)})
    return job_dir
