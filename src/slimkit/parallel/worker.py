"""A worker process of a parallel job: ``python -m slimkit.parallel.worker JOB_DIR``.

Started by torchrun (see :mod:`slimkit.parallel.launch`), it joins the process group,
builds the strategy and runs the job's function; an exception is written to
``error.RANK.json`` for the parent to report.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from slimkit.atomic import write_json
from slimkit.errors import ConfigError, SlimkitError
from slimkit.parallel.config import ParallelConfig
from slimkit.parallel.launch import DONE, ERROR, JOB

# How long the process group may take to tear down once the work is written.
TEARDOWN_SECONDS = 10.0


def resolve(target: str) -> Callable[..., Any]:
    """The function ``package.module:function`` or ``path/to/file.py:function`` names."""
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise ConfigError(f"job target {target!r}: write it as package.module:function or file.py:function")
    if where.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        if spec is None or spec.loader is None:
            raise ConfigError(f"job target {target!r}: cannot import {where}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, name)


def main(job_dir: str) -> NoReturn:
    from slimkit.parallel.strategies import make_strategy
    from slimkit.parallel.world import join, leave

    folder = Path(job_dir)
    job = json.loads((folder / JOB).read_text())
    rank = int(os.environ.get("RANK", "-1"))
    try:
        config = ParallelConfig.model_validate(job["parallel"])
        torch.set_num_threads(int(job["threads"]))
        world = join(config)
        rank = world.rank
        strategy = make_strategy(world, config)
        resolve(job["target"])(strategy, folder, **job["args"])
        strategy.barrier()
        (folder / DONE.format(rank=rank)).touch()
    except BaseException as e:  # noqa: BLE001 - reported to the parent, then the process exits non-zero
        if isinstance(e, KeyboardInterrupt):
            raise
        message = str(e) if isinstance(e, SlimkitError) else f"{type(e).__name__}: {e}"
        write_json(folder / ERROR.format(rank=rank if rank >= 0 else "unknown"),
                   {"rank": rank, "type": type(e).__name__, "message": message, "traceback": traceback.format_exc()})
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        # Out at once: tearing the process group down would wait for peers that are
        # waiting in a collective for this process. torchrun sees the exit and stops them.
        os._exit(1)
    # The work is done and written. Tearing the process group down can hang in gloo once a
    # peer has gone (seen in CI: rank 0 waited in destroy_process_group after rank 1 had
    # exited), so it gets a few seconds, and then the process leaves regardless.
    teardown = threading.Thread(target=_leave_quietly, args=(leave,), daemon=True)
    teardown.start()
    teardown.join(TEARDOWN_SECONDS)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _leave_quietly(leave) -> None:
    try:
        leave()
    except Exception:  # noqa: BLE001 - a peer that left first can fail the teardown
        traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
