"""Resumable training checkpoints: tensors in safetensors, everything else in JSON.

A checkpoint holds the student (and projection) weights, the optimizer's state, the
random-number generators' states and the loop's counters, so that a run resumed from it
continues exactly as the uninterrupted run would have. Nothing is pickled.

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
from safetensors.torch import load_file, save_file

from slimkit.atomic import atomic_dir
from slimkit.errors import SlimkitError

STATE = "state.safetensors"
META = "state.json"
BEST = "best.safetensors"


def _flat_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            name = f"optim.{idx}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflat_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        if not name.startswith("optim."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _carry_over(folder: Path, new: Path) -> None:
    """Link (or copy) into ``new`` the files of ``folder`` that are not the checkpoint's own."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        # Hidden names are temporary files of interrupted atomic writes.
        if entry.name in (STATE, META, BEST) or entry.name.startswith(".") or not entry.is_file():
            continue
        try:
            os.link(entry, new / entry.name)  # a second name for the same data: no copy
        except OSError:
            shutil.copy2(entry, new / entry.name)


def save_checkpoint(folder: Path, trainable: torch.nn.Module, opt: torch.optim.Optimizer,
                    loop: dict[str, Any], best: dict[str, torch.Tensor] | None) -> None:
    """Write a checkpoint into ``folder``, replacing the previous one only when complete."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in trainable.state_dict().items()}
    opt_tensors, opt_meta = _flat_optimizer(opt)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    with atomic_dir(folder) as tmp:
        _carry_over(folder, tmp)
        save_file(tensors, str(tmp / STATE))
        if best is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in best.items()}, str(tmp / BEST))
        (tmp / META).write_text(json.dumps({"loop": loop, "optimizer": opt_meta}, indent=1))


def load_checkpoint(folder: Path, trainable: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore what :func:`save_checkpoint` wrote; return the loop state and best weights."""
    try:
        meta = json.loads((folder / META).read_text())
        tensors = load_file(str(folder / STATE))
    except (OSError, ValueError) as e:
        raise SlimkitError(f"{folder}: unreadable checkpoint ({e}); delete the folder to start over") from None
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    trainable.load_state_dict(model_sd)
    opt.load_state_dict(_unflat_optimizer(tensors, meta["optimizer"]))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    best = load_file(str(folder / BEST)) if (folder / BEST).exists() else None
    return meta["loop"], best
