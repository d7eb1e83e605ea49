"""The process group a worker belongs to: who launched it, which device it owns, its meshes.

A worker is started by torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` set) or by Slurm (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID``), whose variables are translated to torchrun's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from slimkit.errors import ConfigError
from slimkit.parallel.config import ParallelConfig


def launched() -> bool:
    """Whether this process already belongs to a launch that names its rank (torchrun or Slurm)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return True
    return "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and "MASTER_ADDR" in os.environ


def _from_slurm() -> None:
    # Slurm names the task; the rendezvous address and port come from the job script.
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        env.setdefault("MASTER_PORT", "29500")


@dataclass
class World:
    """This process's place in the job: its rank, the world size, its device and backend."""

    rank: int
    size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes what is written once."""
        return self.rank == 0


def join(config: ParallelConfig) -> World:
    """Join the launch this process belongs to: initialise the default process group.

    CUDA processes take the device of their local rank and nccl; CPU processes gloo.
    Collectives time out after ``config.timeout_seconds``, so a crashed peer ends the job
    with an error instead of a hang.
    """
    _from_slurm()
    if not launched():
        raise ConfigError("parallel: this process was not started by torchrun or Slurm (RANK and WORLD_SIZE "
                          "are not set); run the recipe with slimkit run, which launches the workers")
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    backend = config.backend if config.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("parallel.backend: nccl needs CUDA devices, and this machine has none; use gloo or auto")
    if cuda:
        if local >= torch.cuda.device_count():
            raise ConfigError(f"parallel: local rank {local} has no GPU ({torch.cuda.device_count()} visible); "
                              "lower nproc to the number of GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=size,
                                timeout=timedelta(seconds=config.timeout_seconds),
                                device_id=device if backend == "nccl" else None)
    return World(rank, size, local, device, backend)


def leave() -> None:
    """Destroy the default process group, if there is one."""
    if dist.is_initialized():
        dist.destroy_process_group()
