"""Launching the jobs of :mod:`slimkit.parallel.selfcheck` in torchrun workers."""

from __future__ import annotations

from pathlib import Path

from slimkit.parallel.config import ParallelConfig
from slimkit.parallel.launch import launch


def run_job(job_dir: Path, function: str, config: ParallelConfig, **args) -> Path:
    """Run ``selfcheck.function`` on ``config.nproc`` workers; the job folder."""
    launch(job_dir, f"slimkit.parallel.selfcheck:{function}", config, args)
    return job_dir
