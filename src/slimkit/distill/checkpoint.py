"""Resumable training checkpoints: tensors in safetensors, everything else in JSON.

A checkpoint holds the student (and projection) weights, the optimizer's state, the
random-number generators' states and the loop's counters, so that a run resumed from it
continues exactly as the uninterrupted run would have. Nothing is pickled.

One process writes its tensors into ``state.safetensors``. A parallel run (see
:mod:`slimkit.parallel`) writes the same tensors, under the same names, with
``torch.distributed.checkpoint`` into ``dcp/``: each process writes the shards it holds,
and loading reads whatever shards the loading processes need, so a run resumes at another
number of processes (or in one process) and a single process resumes a parallel run.
Each process's random-number state goes into ``rng.RANK.safetensors``. The main process
writes ``state.json`` and moves the finished folder into place after every process has
written its part.

Other files in the folder (the teacher cache, by default) are not the checkpoint's: each
save carries them over into the new folder, so replacing the checkpoint keeps them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import _init_optim_state
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor, distribute_tensor

from slimkit.atomic import atomic_dir
from slimkit.errors import SlimkitError

STATE = "state.safetensors"
META = "state.json"
BEST = "best.safetensors"
SHARDED = "dcp"
RNG = "rng.{rank}.safetensors"
OPTIMIZER = "optimizer.{rank}.json"  # each process's optimizer settings (a pipeline stage has its own)


def _optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    if not isinstance(opt, ZeroRedundancyOptimizer):
        return opt.state_dict()
    # A ZeRO-1 process holds its partition's state only: it writes that, numbered as the
    # whole optimizer numbers its parameters, so any partition reads it back.
    index = opt._param_to_index
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]}
              for g in opt.param_groups]
    return {"state": {index[p]: s for p, s in opt.optim.state.items()}, "param_groups": groups}


def _flat_optimizer(opt: torch.optim.Optimizer, to_cpu: bool = True, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = _optimizer_state(opt)
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            name = f"optim.{prefix}{idx}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().cpu().contiguous() if to_cpu else value.detach()
            else:
                scalars[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflat_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    start = f"optim.{prefix}"
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        if not name.startswith(start) or not name[len(start):].split(".", 1)[0].isdigit():
            continue
        idx, key = name[len(start):].split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _carry_over(folder: Path, new: Path) -> None:
    """Link (or copy) into ``new`` the files of ``folder`` that are not the checkpoint's own."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        # Hidden names are temporary files of interrupted atomic writes.
        if entry.name in (STATE, META, BEST) or entry.name.startswith((".", "rng.", "optimizer.")) or not entry.is_file():
            continue
        try:
            os.link(entry, new / entry.name)  # a second name for the same data: no copy
        except OSError:
            shutil.copy2(entry, new / entry.name)


def save_checkpoint(folder: Path, trainable: torch.nn.Module, opt: torch.optim.Optimizer,
                    loop: dict[str, Any], best: dict[str, torch.Tensor] | None, strategy: Any = None) -> None:
    """Write a checkpoint into ``folder``, replacing the previous one only when complete.

    Under a parallel ``strategy`` every process calls it (see the module's docstring).
    """
    if strategy is not None and strategy.distributed:
        _save_sharded(folder, trainable, opt, loop, best, strategy)
        return
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in trainable.state_dict().items()}
    opt_tensors, opt_meta = _flat_optimizer(opt)
    tensors.update(opt_tensors)
    tensors.update(_rng_tensors())
    with atomic_dir(folder) as tmp:
        _carry_over(folder, tmp)
        save_file(tensors, str(tmp / STATE))
        if best is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in best.items()}, str(tmp / BEST))
        (tmp / META).write_text(json.dumps({"loop": loop, "optimizer": opt_meta}, indent=1))


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors


def _set_rng(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _save_sharded(folder: Path, trainable: torch.nn.Module, opt: torch.optim.Optimizer, loop: dict[str, Any],
                  best: dict[str, torch.Tensor] | None, strategy: Any) -> None:
    # Sharded tensors (DTensors) stay where they are; DCP writes each process's shards
    # and, of tensors every process holds whole, one copy.
    tensors = {f"model.{k}": v.detach() for k, v in trainable.state_dict().items() if strategy.owned(k)}
    opt_tensors, opt_meta = _flat_optimizer(opt, to_cpu=False, prefix=strategy.optimizer_prefix)
    tensors.update(opt_tensors)
    if best is not None:
        tensors.update({f"best.{k}": v for k, v in best.items() if strategy.owned(k)})

    def write_parts(tmp: Path) -> None:
        dcp.save(tensors, checkpoint_id=str(tmp / SHARDED))
        save_file(_rng_tensors(), str(tmp / RNG.format(rank=strategy.rank)))
        (tmp / OPTIMIZER.format(rank=strategy.rank)).write_text(json.dumps(opt_meta))
        strategy.barrier()  # every process's part is on disk

    if strategy.main:
        with atomic_dir(folder) as tmp:
            strategy.from_main(str(tmp))
            _carry_over(folder, tmp)
            write_parts(tmp)
            (tmp / META).write_text(json.dumps({"loop": loop, "optimizer": opt_meta, "processes": strategy.size,
                                                "layout": strategy.layout}, indent=1))
    else:
        write_parts(Path(strategy.from_main(None)))
    strategy.barrier()  # the folder is in place before anyone reads or replaces it


def _templates(trainable: torch.nn.Module, opt: torch.optim.Optimizer, strategy: Any) -> dict[str, torch.Tensor]:
    """This process's tensors under the checkpoint's names, shaped (and sharded) as it holds them."""
    _init_optim_state(opt)  # an optimizer that never stepped has no state to load into yet
    owned = {k: v for k, v in trainable.state_dict().items() if strategy is None or strategy.owned(k)}
    out = {f"model.{k}": v for k, v in owned.items()}
    out.update(_flat_optimizer(opt, to_cpu=False, prefix=getattr(strategy, "optimizer_prefix", ""))[0])
    out.update({f"best.{k}": v for k, v in owned.items()})
    return out


def _read_sharded(folder: Path, templates: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    path = str(folder / SHARDED)
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    wanted = {k: torch.empty_like(v) for k, v in templates.items() if k in saved}
    # Optimizer state exists only for parameters that have had a gradient, and best
    # weights only after an evaluation; every weight of the model must be there. (A
    # pipeline's stages number their optimizer state each on its own: the layout check
    # before this makes sure the cut is the same.)
    missing = [k for k in templates if k not in saved and k.startswith("model.")]
    # A DTensor's shape is the whole tensor's, as the checkpoint records it.
    resized = [f"{k} is {list(saved[k].size)} there, {list(v.shape)} here" for k, v in wanted.items()
               if list(getattr(saved[k], "size", v.shape)) != list(v.shape)]
    if missing or resized:
        what = f"no {', '.join(missing[:3])}" if missing else "; ".join(resized[:3])
        raise SlimkitError(f"{folder}: the checkpoint holds another model ({what}); "
                           "delete the folder or choose another one to start over")
    dcp.load(wanted, checkpoint_id=path)
    rng = folder / RNG.format(rank=rank)
    if rng.is_file():
        wanted.update(load_file(str(rng)))
    return wanted


def _like(value: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    # A whole tensor for a sharded one: this process keeps its shard of it.
    if isinstance(template, DTensor) and not isinstance(value, DTensor):
        return distribute_tensor(value.to(template.device), template.device_mesh, template.placements)
    return value


def load_checkpoint(folder: Path, trainable: torch.nn.Module, opt: torch.optim.Optimizer,
                    strategy: Any = None) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore what :func:`save_checkpoint` wrote; return the loop state and best weights.

    Either layout loads under any strategy: one process reads a parallel run's shards
    whole, and a parallel run takes its shards of a one-process checkpoint.
    """
    distributed = strategy is not None and strategy.distributed
    try:
        meta = json.loads((folder / META).read_text())
        layout = getattr(strategy, "layout", None)
        if meta.get("layout") != layout:
            def says(x):
                return f"a pipeline cut at {x['pipeline']}" if x else "a strategy without a pipeline"
            raise SlimkitError(f"{folder}: the checkpoint was written by {says(meta.get('layout'))}, and this run is "
                               f"{says(layout)}; resume with the same pipeline settings, or delete the folder to start over")
        if (folder / SHARDED).is_dir():
            rank = strategy.rank if distributed else 0
            tensors = _read_sharded(folder, _templates(trainable, opt, strategy), rank)
            own = folder / OPTIMIZER.format(rank=rank)
            if own.is_file() and distributed:
                meta["optimizer"] = json.loads(own.read_text())
        else:
            tensors = load_file(str(folder / STATE))
            if (folder / BEST).exists():
                tensors.update({f"best.{k}": v for k, v in load_file(str(folder / BEST)).items()})
            if distributed:
                templates = _templates(trainable, opt, strategy)
                tensors = {k: _like(v, templates[k]) if k in templates else v for k, v in tensors.items()}
    except (OSError, ValueError) as e:
        raise SlimkitError(f"{folder}: unreadable checkpoint ({e}); delete the folder to start over") from None
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        # A pipeline stage loads its own layers; every other process the whole model.
        trainable.load_state_dict(model_sd, strict=not (strategy is not None and strategy.pipelined))
    except RuntimeError as e:
        raise SlimkitError(f"{folder}: the checkpoint holds another model ({str(e).splitlines()[-1].strip()}); "
                           "delete the folder or choose another one to start over") from None
    opt.load_state_dict(_unflat_optimizer(tensors, meta["optimizer"], getattr(strategy, "optimizer_prefix", "")))
    _set_rng(tensors)
    best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")} or None
    return meta["loop"], best
