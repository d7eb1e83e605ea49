"""The distillation loop: a frozen teacher, a student, weighted losses, resumable.

Shuffling is a fixed function of (seed, epoch), dropout draws from the saved generator
state, and checkpoints fall on optimizer-step boundaries: a run interrupted and resumed
from its last checkpoint ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

import slimkit.distill.attention as A
import slimkit.distill.losses as L
from slimkit.atomic import recover_dir
from slimkit.distill.cache import CACHE_FILE, cached_outputs, data_fingerprint, module_fingerprint
from slimkit.distill.checkpoint import META, load_checkpoint, save_checkpoint
from slimkit.distill.config import ATTENTION_KINDS, OUTPUT_KINDS, DistillConfig, LossTerm
from slimkit.errors import ConfigError, DataError, LayerSelectionError, SlimkitError
from slimkit.parallel.strategy import Single


@dataclass
class DistillData:
    """Training examples for distillation.

    Attributes:
        inputs: keyword inputs of both models, each a tensor whose first dimension
            indexes examples (e.g. ``{"x": images}`` or token ids and masks).
        labels: class labels, needed only by ``hard_ce`` terms.
        collate: optional function applied to each batch's inputs (e.g. to cut padding).
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None
    collate: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The examples ``idx``: their inputs (passed through ``collate`` if set) and their
        labels (None without labels), on ``device``."""
        inputs = {k: v[idx] for k, v in self.inputs.items()}
        if self.collate:
            inputs = self.collate(inputs)
        labels = None if self.labels is None else self.labels[idx].to(device)
        return {k: v.to(device) for k, v in inputs.items()}, labels


@dataclass
class DistillResult:
    """What a distillation run did: per-step losses, evaluations, and why it stopped."""

    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    stopped_early: bool = False
    seconds: float = 0.0  # training time, summed over resumed attempts


class NonFiniteLoss(SlimkitError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class _Capture:
    """Forward hooks that keep the output of named layers for one forward pass."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in names:
            module = model.get_submodule(name)
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(_module, _args, out):
            self.outputs[name] = out[0] if isinstance(out, (tuple, list)) else out
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _check_layers(model: nn.Module, names: list[str], which: str) -> None:
    known = [n for n, _ in model.named_modules() if n]
    for name in names:
        if name not in known:
            near = [k for k in known if k.split(".")[-1] == name.split(".")[-1]][:4] or known[:6]
            raise LayerSelectionError(
                f"layer map: the {which} has no layer {name!r}; its layers are named like: {', '.join(near)}"
            )


def _projection(student: torch.Tensor, teacher: torch.Tensor, term: int, s_name: str, t_name: str, allowed: bool) -> nn.Module | None:
    if student.shape == teacher.shape:
        return None
    feature_map = student.dim() == 4 and teacher.dim() == 4 and student.shape[2:] == teacher.shape[2:]
    same_but_width = student.shape[:-1] == teacher.shape[:-1]
    if not allowed or not (feature_map or same_but_width):
        hint = "set projection: true on the term" if (feature_map or same_but_width) else "map layers whose outputs have the same positions"
        raise ConfigError(
            f"losses[{term}]: student layer {s_name!r} gives shape {tuple(student.shape)} but teacher layer "
            f"{t_name!r} gives {tuple(teacher.shape)}; {hint}"
        )
    if feature_map:
        return nn.Conv2d(student.shape[1], teacher.shape[1], kernel_size=1, bias=False)
    return nn.Linear(student.shape[-1], teacher.shape[-1], bias=False)


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes under bfloat16 autocast: every CPU does (emulated where
    the instruction set lacks it), a CUDA card where it is native (Ampere and later)."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return False


def _key(term: int, s_name: str) -> str:
    return f"t{term}_" + re.sub(r"\W", "_", s_name)


def _captured(term: LossTerm, name: str) -> list[str]:
    """The layers whose outputs ``term`` reads for its mapped layer ``name``."""
    if term.kind not in ATTENTION_KINDS:
        return [name]
    return [f"{name}.{child}" for child in _attention_children(term)]


def _attention_children(term: LossTerm) -> list[str]:
    query, key, value = term.qkv
    return [query, key] if term.kind == "attention_kl" else [value]


def _width(module: nn.Module, child: str) -> int | None:
    return getattr(getattr(module, child, None), "out_features", None)


def _suggest_relation_heads(s_heads: int, t_heads: int, s_width: int | None, t_width: int | None) -> int:
    # MiniLMv2 uses the teacher's head count as relation heads when the student's width allows it.
    if s_width is None or t_width is None or s_width % t_heads == 0:
        return t_heads
    if t_width % s_heads == 0:
        return s_heads
    return math.gcd(s_width, t_width)


def _attention_shape_problems(i: int, term: LossTerm, s_name: str, t_name: str, s_out: dict, t_out: dict,
                              heads: int) -> list[str]:
    problems = []
    for child in _attention_children(term):
        s, t = s_out[f"{s_name}.{child}"], t_out[f"{t_name}.{child}"]
        if s.dim() != 3 or t.dim() != 3:
            problems.append(
                f"losses[{i}]: {child} of student layer {s_name!r} gives shape {tuple(s.shape)} and of teacher layer "
                f"{t_name!r} {tuple(t.shape)}; attention terms need [batch, sequence, width] projections"
            )
        elif s.shape[1] != t.shape[1]:
            problems.append(
                f"losses[{i}]: student layer {s_name!r} sees {s.shape[1]} positions but teacher layer {t_name!r} "
                f"{t.shape[1]}; both models must read the same tokens"
            )
        elif s.shape[-1] % heads or t.shape[-1] % heads:
            problems.append(
                f"losses[{i}]: {child} widths {s.shape[-1]} (student {s_name!r}) and {t.shape[-1]} (teacher "
                f"{t_name!r}) do not both split into {heads} heads; set relation_heads to a number dividing both"
            )
    return problems


class Distiller:
    """Runs :class:`DistillConfig` on a teacher and a student; see :func:`slimkit.distill.distill`."""

    def __init__(self, teacher: nn.Module | None, student: nn.Module, data: DistillData, config: DistillConfig,
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
                 checkpoint_dir: str | Path | None = None, device: str | torch.device | None = None,
                 progress: bool = True, on_step: Callable[[int, nn.Module], None] | None = None,
                 strategy: Single | None = None):
        if len(data) == 0:
            raise DataError("distillation data is empty; give at least one training example")
        if any(t.kind == "hard_ce" for t in config.losses) and data.labels is None:
            raise DataError("a hard_ce loss term needs labels; the data has none (use soft or hidden terms)")
        if config.early_stopping and evaluate is None:
            raise ConfigError("early_stopping needs an evaluation function (evaluate=...)")
        if config.teacher_cache_mode == "disk" and not (config.cache_dir or checkpoint_dir):
            raise ConfigError("cache_teacher='disk' needs a folder: set cache_dir, or give a checkpoint_dir "
                              "(the cache then goes into it)")
        self.config, self.data, self.evaluate, self.on_step = config, data, evaluate, on_step
        self.needs_teacher = any(t.kind != "hard_ce" for t in config.losses)
        if teacher is None:
            if self.needs_teacher:
                raise ConfigError("only hard_ce terms train without a teacher; give a teacher model")
            teacher = nn.Identity()  # plain supervised training through the same loop
        # Where this process computes and which share of each batch: one process unless a
        # parallel strategy (slimkit.parallel) says otherwise.
        self.strategy = strategy or Single(device)
        self.device = self.strategy.device
        self.strategy.check_batch(config.batch_size, len(data))
        self.strategy.check_training(config, student)
        self.teacher = teacher.to(self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.student = student.to(self.device)
        self.bf16 = config.bf16 and bf16_supported(self.device)
        if config.bf16 and not self.bf16:
            warnings.warn(f"bf16: {self.device} has no bfloat16 autocast; training in float32", stacklevel=3)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        if self.checkpoint_dir and self.strategy.main:
            recover_dir(self.checkpoint_dir)  # a kill mid-replace leaves the previous checkpoint aside
        self.strategy.barrier()
        self._refuse_checkpoint_of_another_config()
        self.progress = progress
        _check_layers(self.teacher, sorted({t for term in config.losses for t in term.layers.values()}), "teacher")
        _check_layers(self.student, sorted({s for term in config.losses for s in term.layers}), "student")
        self.attention_heads = self._check_attention()
        self.t_layers = sorted({c for term in config.losses for t in term.layers.values() for c in _captured(term, t)})
        self.s_layers = sorted({c for term in config.losses for s in term.layers for c in _captured(term, s)})
        self._epoch: int | None = None
        self._epoch_batches: tuple[torch.Tensor, ...] = ()
        self.teacher_cache: torch.Tensor | None = None
        if config.teacher_cache_mode != "none" and self.needs_teacher:
            if config.teacher_cache_mode == "memory":
                self.teacher_cache = self._teacher_outputs()
            else:
                # The main process writes the disk cache; the others then read it.
                if self.strategy.main:
                    self.teacher_cache = self._disk_cache()
                self.strategy.barrier()
                if not self.strategy.main:
                    self.teacher_cache = self._disk_cache()
        torch.manual_seed(config.seed)  # initialises the projections
        self.projections = self._check_shapes()
        # The loss runs the student through this; the strategy's probe of the loss (to see
        # which parameters it reaches) runs before the wrapper exists.
        self._student_call: Callable[..., Any] = self.student
        if self.strategy.pipelined:
            self.strategy.build(self)  # the pipeline runs the student itself
        else:
            self._student_call = self.strategy.wrap(self.student, self.projections, self._probe_loss)
        self.trainable = nn.ModuleDict({"student": self.student, "projections": self.projections})
        params = [p for p in self.trainable.parameters() if p.requires_grad]
        self.opt = self.strategy.optimizer(self._optimizer, params)
        micro = math.ceil(len(data) / config.batch_size)
        self.steps_per_epoch = max(1, micro // config.grad_accum)
        total = self.steps_per_epoch * config.epochs
        self.total_steps = min(total, config.max_steps) if config.max_steps else total

    # -- set-up -------------------------------------------------------------------------
    def _optimizer(self, params) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def _probe_loss(self) -> torch.Tensor:
        """The loss of the first two examples, through the unwrapped student."""
        idx = torch.arange(min(2, len(self.data)))
        inputs, labels = self.data.batch(idx, self.device)
        return self.loss(inputs, labels, idx)[0]

    def _forward(self, model: nn.Module, inputs, layers, call: Callable[..., Any] | None = None):
        # Hooks go on ``model``'s layers by name; ``call`` runs it (a parallel wrapper).
        cap = _Capture(model, layers)
        try:
            out = (call or model)(**inputs)
        finally:
            cap.close()
        return out, cap.outputs

    def _refuse_checkpoint_of_another_config(self) -> None:
        # Checked here as well as when resuming, so that a mistake costs no teacher pass.
        meta = self.checkpoint_dir / META if self.checkpoint_dir else None
        if meta is None or not meta.exists():
            return
        try:
            saved = json.loads(meta.read_text())["loop"]["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            return  # unreadable: load_checkpoint reports it when the run starts
        if saved != self._fingerprint():
            raise self._another_config_error()

    def _another_config_error(self) -> ConfigError:
        return ConfigError(
            f"{self.checkpoint_dir}: the checkpoint was written by a different distillation "
            "config; delete the folder or choose another one to start over"
        )

    def _check_attention(self) -> dict[str, int]:
        """Heads to compare for each attention layer pair; every problem is reported at once."""
        heads: dict[str, int] = {}
        problems = []
        for i, term in enumerate(self.config.losses):
            if term.kind not in ATTENTION_KINDS:
                continue
            children = _attention_children(term)
            for s_name, t_name in term.layers.items():
                s_mod, t_mod = self.student.get_submodule(s_name), self.teacher.get_submodule(t_name)
                for which, name, module in (("student", s_name, s_mod), ("teacher", t_name, t_mod)):
                    missing = [c for c in children if not isinstance(getattr(module, c, None), nn.Module)]
                    if missing:
                        has = ", ".join(n for n, _ in module.named_children()) or "none"
                        problems.append(
                            f"losses[{i}]: the {which}'s {name!r} has no {' / '.join(missing)} child (its children: "
                            f"{has}); map attention modules with query/key/value projections, such as "
                            "backbone.encoder.layer.0.attention.self, or set qkv to their projections' names"
                        )
                if term.relation_heads:
                    heads[_key(i, s_name)] = term.relation_heads
                    continue
                s_heads, t_heads = A.head_count(s_mod), A.head_count(t_mod)
                if s_heads is None or t_heads is None:
                    name = s_name if s_heads is None else t_name
                    problems.append(
                        f"losses[{i}]: cannot tell how many attention heads {name!r} has (it has no "
                        f"{' / '.join(A.HEAD_COUNT_ATTRIBUTES)} attribute); set relation_heads"
                    )
                elif s_heads != t_heads:
                    q = children[0]
                    r = _suggest_relation_heads(s_heads, t_heads, _width(s_mod, q), _width(t_mod, q))
                    problems.append(
                        f"losses[{i}]: student layer {s_name!r} has {s_heads} attention heads but teacher layer "
                        f"{t_name!r} has {t_heads}; set relation_heads (e.g. {r}) to compare that many relation "
                        "heads, a number dividing both layers' widths (MiniLMv2)"
                    )
                else:
                    heads[_key(i, s_name)] = s_heads
        if problems:
            raise ConfigError(problems)
        return heads

    def _check_shapes(self) -> nn.ModuleDict:
        """Run both models on two examples before training and return the projections.

        Output terms need the student's output shaped as the teacher's (a mismatch would
        otherwise fail at the first step or, where it broadcasts, train on nonsense); layer
        terms get their projections sized and their attention shapes checked.
        """
        layered = [(i, t) for i, t in enumerate(self.config.losses) if t.layers]
        on_outputs = [(i, t) for i, t in enumerate(self.config.losses) if t.kind in OUTPUT_KINDS]
        proj = nn.ModuleDict()
        if not layered and not on_outputs:
            return proj
        idx = torch.arange(min(2, len(self.data)))
        inputs, _ = self.data.batch(idx, self.device)
        with torch.no_grad():
            if self.teacher_cache is not None:  # not run again (a cache allows output terms only)
                t_final, t_out = self.teacher_cache[idx.to(self.teacher_cache.device)], {}
            else:
                t_final, t_out = self._forward(self.teacher, inputs, self.t_layers)
            was = self.student.training
            self.student.eval()
            s_final, s_out = self._forward(self.student, inputs, self.s_layers)
            self.student.train(was)
        problems = [
            f"losses[{i}] ({term.kind}): the student's output has shape {tuple(s_final.shape)} but the teacher's "
            f"{tuple(t_final.shape)}; give the student the teacher's output size, or distil hidden states "
            "(hidden_mse / hidden_cosine with projection: true)"
            for i, term in on_outputs if s_final.shape != t_final.shape
        ]
        for i, term in layered:
            for s_name, t_name in term.layers.items():
                if term.kind in ATTENTION_KINDS:
                    heads = self.attention_heads[_key(i, s_name)]
                    problems += _attention_shape_problems(i, term, s_name, t_name, s_out, t_out, heads)
                    continue
                p = _projection(s_out[s_name], t_out[t_name], i, s_name, t_name, term.projection)
                if p is not None:
                    proj[_key(i, s_name)] = p.to(self.device)
        if problems:
            raise ConfigError(problems)
        return proj

    def _teacher_outputs(self) -> torch.Tensor:
        """The teacher's output for every example, in dataset order (it is frozen in eval mode)."""
        outs = []
        with torch.no_grad():
            for idx in torch.arange(len(self.data)).split(max(self.config.batch_size, 256)):
                inputs, _ = self.data.batch(idx, self.device)
                outs.append(self.teacher(**inputs).float())
        return torch.cat(outs)

    def _disk_cache(self) -> torch.Tensor:
        """The teacher's outputs from the disk cache, computed and written there if it is missing or stale."""
        folder = Path(self.config.cache_dir) if self.config.cache_dir else self.checkpoint_dir
        key = {"teacher": module_fingerprint(self.teacher),
               "data": data_fingerprint(self.data.inputs, self.data.collate),
               # What the cache holds: the final outputs, all that output terms read.
               "contents": "outputs"}
        return cached_outputs(folder / CACHE_FILE, key, len(self.data), self._teacher_outputs)

    def _fingerprint(self) -> str:
        # Where the teacher cache lives does not change the run; moving it must not void checkpoints.
        described = {k: v for k, v in self.config.to_dict().items() if k != "cache_dir"}
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]

    # -- loss ---------------------------------------------------------------------------
    def loss(self, inputs, labels, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted loss of one batch (examples ``idx`` of the data), and each term's value."""
        if self.teacher_cache is not None and idx is not None:
            t_out, t_hidden = self.teacher_cache[idx.to(self.teacher_cache.device)].to(self.device), {}
        elif self.needs_teacher:
            with torch.no_grad():
                t_out, t_hidden = self._forward(self.teacher, inputs, self.t_layers)
        else:
            t_out, t_hidden = None, {}
        s_out, s_hidden = self._forward(self.student, inputs, self.s_layers, self._student_call)
        mask = inputs.get("attention_mask")
        total = torch.zeros((), device=self.device)
        parts = {}
        for i, term in enumerate(self.config.losses):
            value = self._term(i, term, s_out, t_out, s_hidden, t_hidden, labels, mask)
            parts[f"{i}:{term.kind}"] = float(value.detach())
            total = total + term.weight * value
        return total, parts

    def _term(self, i: int, term: LossTerm, s_out, t_out, s_hidden, t_hidden, labels, mask) -> torch.Tensor:
        if term.kind == "soft_kl":
            return L.soft_kl(s_out, t_out, term.temperature)
        if term.kind == "hard_ce":
            return L.hard_ce(s_out, labels)
        if term.kind == "output_mse":
            return L.mse(s_out, t_out)
        if term.kind == "output_cosine":
            return L.cosine(s_out, t_out)
        if term.kind in ATTENTION_KINDS:
            return self._attention_term(i, term, s_hidden, t_hidden, mask)
        fn = L.mse if term.kind == "hidden_mse" else L.cosine
        values = []
        for s_name, t_name in term.layers.items():
            s = s_hidden[s_name]
            key = _key(i, s_name)
            if key in self.projections:
                p = self.projections[key]
                s = p(s) if isinstance(p, nn.Conv2d) else p(s.float())
            values.append(fn(s, t_hidden[t_name], mask if s.dim() == 3 else None))
        return torch.stack(values).mean()

    def _attention_term(self, i: int, term: LossTerm, s_hidden, t_hidden, mask) -> torch.Tensor:
        query, key, value = term.qkv
        values = []
        for s_name, t_name in term.layers.items():
            heads = self.attention_heads[_key(i, s_name)]
            if term.kind == "attention_kl":
                values.append(A.attention_kl(s_hidden[f"{s_name}.{query}"], s_hidden[f"{s_name}.{key}"],
                                             t_hidden[f"{t_name}.{query}"], t_hidden[f"{t_name}.{key}"], heads, mask))
            else:
                values.append(A.value_relation_kl(s_hidden[f"{s_name}.{value}"], t_hidden[f"{t_name}.{value}"], heads, mask))
        return torch.stack(values).mean()

    # -- schedule -----------------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if c.schedule == "constant":
            return 1.0
        done = (step - c.warmup_steps) / max(1, self.total_steps - c.warmup_steps)
        if c.schedule == "linear":
            return max(0.0, 1.0 - done)
        return 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))

    # -- loop ---------------------------------------------------------------------------
    def run(self) -> DistillResult:
        c = self.config
        loop: dict[str, Any] = {"step": 0, "fingerprint": self._fingerprint(), "history": [], "evals": [],
                                "best": None, "bad_evals": 0, "stopped_early": False}
        best_weights = None
        if self.checkpoint_dir and (self.checkpoint_dir / META).exists():
            saved, best_weights = load_checkpoint(self.checkpoint_dir, self.trainable, self.opt, self.strategy)
            if saved.get("fingerprint") != loop["fingerprint"]:
                raise self._another_config_error()
            loop = saved
        columns = [TextColumn("distill"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn()]
        with Progress(*columns, disable=not (self.progress and self.strategy.main)) as bar:
            task = bar.add_task("distill", total=self.total_steps, completed=loop["step"], loss="-")
            while loop["step"] < self.total_steps and not loop["stopped_early"]:
                started = time.perf_counter()
                step = loop["step"]
                epoch, in_epoch = divmod(step, self.steps_per_epoch)
                loss, parts = self._step(epoch, in_epoch, step)
                loop["step"] = step = step + 1
                if self.on_step is not None:
                    # Before evaluation and checkpointing, so that both see what it changed
                    # (a gradual pruning mask) and a resumed run continues from the same state.
                    self.on_step(step, self.student)
                loop["history"].append({"step": step, "epoch": epoch, "loss": loss, **parts})
                bar.update(task, completed=step, loss=f"{loss:.4f}")
                end_of_epoch = step % self.steps_per_epoch == 0
                if self.evaluate and ((c.eval_every and step % c.eval_every == 0) or (not c.eval_every and end_of_epoch) or step == self.total_steps):
                    best_weights = self._eval(loop, step, epoch, best_weights)
                loop["seconds"] = loop.get("seconds", 0.0) + time.perf_counter() - started
                if self.checkpoint_dir and ((c.checkpoint_every and step % c.checkpoint_every == 0) or (not c.checkpoint_every and end_of_epoch) or step == self.total_steps or loop["stopped_early"]):
                    save_checkpoint(self.checkpoint_dir, self.trainable, self.opt, loop, best_weights, self.strategy)
        if best_weights is not None:
            # A pipeline stage's best weights are its own layers'.
            self.trainable.load_state_dict(best_weights, strict=not self.strategy.pipelined)
        self.student.eval()
        return DistillResult(loop["step"], loop["history"], loop["evals"], loop["best"], loop["stopped_early"],
                             loop.get("seconds", 0.0))

    def _batches(self, epoch: int) -> tuple[torch.Tensor, ...]:
        """This epoch's shuffled batches: a function of (seed, epoch) only, made once per epoch."""
        if self._epoch != epoch:
            order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.config.seed * 100_003 + epoch))
            self._epoch, self._epoch_batches = epoch, order.split(self.config.batch_size)
        return self._epoch_batches

    def _step(self, epoch: int, in_epoch: int, step: int) -> tuple[float, dict[str, float]]:
        c = self.config
        self.student.train()
        self.projections.train()
        batches = self._batches(epoch)
        for group in self.opt.param_groups:
            group["lr"] = c.lr * self._lr_factor(step)
        self.opt.zero_grad(set_to_none=True)
        total, parts_sum = 0.0, {}
        for k in range(c.grad_accum):
            idx = batches[(in_epoch * c.grad_accum + k) % len(batches)]
            if self.strategy.pipelined:
                loss_value, parts = self.strategy.forward_backward(idx, c.grad_accum)
                total += loss_value / c.grad_accum
                for name, v in parts.items():
                    parts_sum[name] = parts_sum.get(name, 0.0) + v / c.grad_accum
                continue
            # This process's share of the micro-batch, weighted so that the gradients the
            # strategy averages are those of the whole micro-batch's mean loss.
            local, weight = self.strategy.shard(idx)
            inputs, labels = self.data.batch(local, self.device)
            with self.strategy.accumulating(last=k == c.grad_accum - 1):
                with ExitStack() as stack:
                    if self.bf16:
                        stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
                    loss, parts = self.loss(inputs, labels, local)
                if not self.strategy.distributed and not torch.isfinite(loss):
                    raise self._non_finite(float(loss.detach()), step)
                (loss * weight / c.grad_accum).backward()
            total += float(loss.detach()) * weight / c.grad_accum
            for name, v in parts.items():
                parts_sum[name] = parts_sum.get(name, 0.0) + v * weight / c.grad_accum
        if self.strategy.distributed:
            # Every process learns the global values, so all of them stop together on a NaN.
            total, *values = self.strategy.mean([total, *parts_sum.values()])
            parts_sum = dict(zip(parts_sum, values, strict=True))
            if not math.isfinite(total):
                raise self._non_finite(total, step)
        if c.max_grad_norm:
            self.strategy.clip_grad_norm([p for p in self.trainable.parameters() if p.grad is not None], c.max_grad_norm)
        self.opt.step()
        return total, parts_sum

    def _non_finite(self, value: float, step: int) -> NonFiniteLoss:
        where = f" (last good checkpoint kept in {self.checkpoint_dir})" if self.checkpoint_dir else ""
        return NonFiniteLoss(f"the loss became {value} at step {step + 1}{where}; lower the learning rate "
                             "or check the data for NaN/inf")

    def _eval(self, loop, step, epoch, best_weights):
        c = self.config
        self.student.eval()
        with torch.no_grad():
            # Computed once where the model is whole on every process, on every process
            # where it is sharded; the main process's result is the one all act on.
            metrics = self.strategy.agree(lambda: {k: float(v) for k, v in self.evaluate(self.student).items()})
        loop["evals"].append({"step": step, "epoch": epoch, **metrics})
        es = c.early_stopping
        if es is None:
            return best_weights
        if es.metric not in metrics:
            raise ConfigError(f"early_stopping.metric: {es.metric!r} is not among the evaluation's metrics {sorted(metrics)}")
        value = metrics[es.metric]
        best = loop["best"]
        better = best is None or (value > best["value"] if es.mode == "max" else value < best["value"])
        if better:
            loop["best"] = {"step": step, "value": value}
            loop["bad_evals"] = 0
            return {k: v.detach().clone() for k, v in self.trainable.state_dict().items()}
        loop["bad_evals"] += 1
        if loop["bad_evals"] >= es.patience:
            loop["stopped_early"] = True
        return best_weights
