"""``slimkit run`` started by a launcher (torchrun, Slurm) on every process.

Rank 0 runs the recipe, as the parent of :mod:`slimkit.parallel.stage_job` does; at each
training stage it hands the job (a folder on storage every process sees) to the other
processes and trains its own share in the same process. The other processes do nothing
but serve those jobs, so the stages around training run once and the run folder is
written once.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from slimkit.errors import SlimkitError
from slimkit.parallel.config import ParallelConfig
from slimkit.parallel.world import join, leave


class JoinedLaunch:
    """This process's part in a launch that was there before slimkit."""

    def __init__(self, config: ParallelConfig):
        self.config = config
        self.world = join(config)
        self.main = self.world.main
        self._device = self.world.device if self.world.backend == "nccl" else torch.device("cpu")

    def _broadcast(self, job: dict[str, Any] | None) -> dict[str, Any] | None:
        box = [job]
        dist.broadcast_object_list(box, src=0, device=self._device)
        return box[0]

    def _train(self, job: dict[str, Any]) -> None:
        from slimkit.parallel.stage_job import train_stage
        from slimkit.parallel.strategies import make_strategy

        try:
            strategy = make_strategy(self.world, self.config)
            train_stage(strategy, Path(job["job_dir"]), **job["args"])
            strategy.barrier()
        except BaseException as e:  # noqa: BLE001 - said, then the process leaves at once
            message = str(e) if isinstance(e, SlimkitError) else f"{type(e).__name__}: {e}"
            print(f"slimkit: error: rank {self.world.rank}: {message}", file=sys.stderr, flush=True)
            traceback.print_exc()
            sys.stderr.flush()
            # The other processes wait in a collective for this one: tearing down or
            # returning would leave them there until the timeout. The launcher sees the
            # exit and stops them.
            os._exit(2)

    def run(self, job_dir: Path, args: dict[str, Any]) -> None:
        """On rank 0: every process trains the job in ``job_dir``."""
        job = {"job_dir": str(job_dir), "args": args}
        self._broadcast(job)
        self._train(job)

    def serve(self) -> int:
        """On the other ranks: train each job rank 0 hands out until it says it is done; how many."""
        served = 0
        try:
            while (job := self._broadcast(None)) is not None:
                self._train(job)
                served += 1
        finally:
            leave()
        return served

    def close(self) -> None:
        """On rank 0: tell the other processes there is nothing more to train."""
        try:
            self._broadcast(None)
        finally:
            leave()
