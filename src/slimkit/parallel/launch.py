"""Starting worker processes with torchrun, and reporting why they stopped.

A job is a folder: ``job.json`` names the function every worker runs (``module:function``
or ``path/to/file.py:function``), its keyword arguments and the parallel settings. Each
worker that fails writes ``error.RANK.json``; the parent turns the first of them into a
:class:`ParallelError`, and a worker that died without a word (killed, out of memory)
into one that says so.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from slimkit.atomic import write_json
from slimkit.errors import ConfigError, SlimkitError
from slimkit.parallel.config import ParallelConfig

JOB = "job.json"
LOG = "workers.log"
ERROR = "error.{rank}.json"
DONE = "done.{rank}"  # a worker that finished its part
# What a process says when a peer vanished under it.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote process exited",
             "NCCL communicator was aborted")


class ParallelError(SlimkitError):
    """A worker process of a parallel job failed, or the job could not start."""


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something on this host already listens on ``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def threads_per_process(nproc: int) -> int:
    """CPU threads each of ``nproc`` processes gets, so that together they use every core once."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // nproc)


def torchrun_command(config: ParallelConfig, job_dir: Path) -> list[str]:
    """The torchrun command line that starts ``config.nproc`` workers of the job in ``job_dir``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={config.nproc}",
           "--max-restarts=0"]
    if config.port is None:
        # torchrun picks a free port itself, so concurrent jobs never fight over one.
        cmd.append("--standalone")
    else:
        cmd += ["--master-addr=127.0.0.1", f"--master-port={config.port}"]
    return [*cmd, "-m", "slimkit.parallel.worker", str(job_dir)]


def launch(job_dir: str | Path, target: str, config: ParallelConfig, args: dict[str, Any] | None = None,
           threads: int | None = None, env: dict[str, str] | None = None) -> None:
    """Run ``target(strategy, job_dir, **args)`` on ``config.nproc`` processes and wait for them.

    Args:
        job_dir: the job's folder (created); workers write what they produce into it.
        target: ``package.module:function`` or ``path/to/file.py:function``.
        config: the strategy and process count.
        args: JSON-ready keyword arguments of ``target``.
        threads: CPU threads per process (default: the cores shared out evenly).
        env: extra environment variables of the workers.

    Raises:
        ConfigError: ``config.port`` is taken.
        ParallelError: a worker failed (its message, rank and log are named) or was killed.
    """
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    if config.port is not None and port_in_use(config.port):
        raise ConfigError(f"parallel.port: port {config.port} is already in use on this host; choose another "
                          "or remove port (torchrun --standalone then picks a free one)")
    for stale in [*job_dir.glob("error.*.json"), *job_dir.glob("done.*")]:
        stale.unlink()
    write_json(job_dir / JOB, {"target": target, "args": args or {}, "parallel": config.model_dump(mode="json"),
                               "threads": threads or threads_per_process(config.nproc)})
    worker_env = {**os.environ, **(env or {})}
    # The workers import slimkit from wherever this process did.
    src = str(Path(__file__).resolve().parents[2])
    worker_env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, worker_env.get("PYTHONPATH")]))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        worker_env.pop(var, None)
    log = job_dir / LOG
    with open(log, "wb") as out:
        code = subprocess.run(torchrun_command(config, job_dir), env=worker_env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL).returncode
    # Every worker finished its part: a failure after that (tearing the process group
    # down while a peer is already gone) loses nothing.
    if code == 0 or all((job_dir / DONE.format(rank=r)).exists() for r in range(config.nproc)):
        return
    raise ParallelError(_why_it_stopped(job_dir, config, code))


def _why_it_stopped(job_dir: Path, config: ParallelConfig, code: int) -> str:
    """The first failure, or the process that vanished (a peer's "connection closed" is the
    consequence of a process that died without a word, not the cause)."""
    log = job_dir / LOG
    where = f"{config.strategy} on {config.nproc} processes"
    errors = [json.loads(p.read_text()) for p in sorted(job_dir.glob("error.*.json"), key=lambda p: p.stat().st_mtime)]
    reported = {e["rank"] for e in errors}
    silent = [r for r in range(config.nproc) if r not in reported and not (job_dir / DONE.format(rank=r)).exists()]
    first = errors[0] if errors else None
    if first is not None and not (silent and any(m in first["message"] for m in PEER_LOST)):
        others = f"; {len(errors) - 1} other process(es) stopped after it" if len(errors) > 1 else ""
        return f"{where}: rank {first['rank']} failed: {first['message']}{others} (worker log: {log})"
    who = f"rank {silent[0]} reported no error, so it was" if len(silent) == 1 else \
        f"ranks {', '.join(map(str, silent))} reported no error, so one of them was"
    return (f"{where}: the workers stopped (torchrun exit code {code}); {who} killed "
            f"(a signal, or out of memory); run the recipe again to resume from its last checkpoint (worker log: {log})")
