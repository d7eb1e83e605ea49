"""Pipeline parallel: ``torch.distributed.pipelining``, one stage per process.

The student is traced (``torch.export``) and cut before the modules named as split
points, or, with ``split_points: balanced``, between its blocks so that the stages'
measured forward times are closest. Each process keeps only its stage's parameters,
gradients and optimizer state. Every batch is cut into micro-batches of one fixed size
(the traced stages exchange activations of that shape): a batch that does not fill the
last micro-batch is padded with examples whose loss weight is 0. The loss runs on the
last stage, on the student's output: the output terms (``hard_ce``, ``soft_kl``,
``output_mse``, ``output_cosine``); terms on inner layers need every layer in one
process and are refused. The parameters of other stages are released from each
process; the main process gathers the whole student for evaluations and at the end.

Each micro-batch's loss is weighted by its share of the batch's examples, so the
gradients summed over micro-batches are those of the batch's mean loss, as in one
process.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, SplitPoint, pipeline

from slimkit.errors import ConfigError
from slimkit.parallel.distributed import Distributed
from slimkit.parallel.fsdp import shard_units
from slimkit.parallel.world import World

SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}
PAD = -1  # the index of a padding example


def balanced_split(costs: list[float], stages: int) -> list[int]:
    """Where ``stages`` contiguous groups of items with ``costs`` begin (after the first),
    chosen so that the most expensive group costs least."""
    n = len(costs)
    if stages > n:
        raise ConfigError(f"split_points: {stages} stages but only {n} blocks to split between; "
                          "lower nproc or name the split points")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[k][i]: the least largest group cost splitting the first i items into k groups.
    best = [[math.inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    starts, i = [], n
    for k in range(stages, 1, -1):
        i = cut[k][i]
        starts.append(i)
    return sorted(starts)


def _forward_times(model: nn.Module, units: list[str], inputs: dict[str, torch.Tensor], repeats: int = 3) -> list[float]:
    """Seconds each of ``units`` spends in ``repeats`` forwards of ``model`` (in eval mode:
    timing must not move batch-norm statistics)."""
    spent = dict.fromkeys(units, 0.0)
    started: dict[str, float] = {}
    handles = []
    for name in units:
        m = model.get_submodule(name)
        handles.append(m.register_forward_pre_hook(lambda _m, _a, n=name: started.__setitem__(n, time.perf_counter())))
        handles.append(m.register_forward_hook(
            lambda _m, _a, _o, n=name: spent.__setitem__(n, spent[n] + time.perf_counter() - started[n])))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(repeats):
                model(**inputs)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return [spent[n] for n in units]


def _contiguous(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Stages send and receive contiguous tensors (a channels-last batch would reach the
    # next stage as a strided view the transport refuses).
    return {k: v.contiguous() for k, v in inputs.items()}


def _refuse_root_inputs_after_the_first_stage(pipe: Any, names: list[str]) -> None:
    # A stage takes only what the stage before it sends: a model input read again later
    # (an attention mask pooling the output, say) cannot reach it.
    for node in pipe.split_gm.graph.nodes:
        match = re.fullmatch(r"submod_(?:pp_)?(\d+)", str(node.target)) if node.op == "call_module" else None
        if match:
            stage = int(match.group(1))
            roots = [a.name for a in node.all_input_nodes if a.op == "placeholder"]
            if stage > 0 and roots:
                raise ConfigError(
                    f"parallel.strategy: pipeline stage {stage} (from {names[stage - 1]!r}) reads the model's input "
                    f"{', '.join(map(repr, roots))} directly, but a stage receives only the previous stage's outputs; "
                    "use ddp, fsdp or tp for this model, or a model that carries that input through its layers")


class PipelineParallel(Distributed):
    """``strategy: pipeline``."""

    name = "pipeline"
    pipelined = True

    def __init__(self, world: World, config: Any):
        super().__init__(world, config)
        self.dp_rank, self.dp_size = 0, 1  # every stage sees every example
        self.microbatches = config.microbatches or 2 * world.size
        self.last = world.size - 1

    def check_batch(self, batch_size: int, n_examples: int) -> None:
        if batch_size < self.microbatches:
            raise ConfigError(f"batch_size: {batch_size} examples cannot be cut into {self.microbatches} "
                              "micro-batches; raise batch_size or lower parallel.microbatches")

    # -- building the stages ------------------------------------------------------------
    def split_points(self, student: nn.Module, example: dict[str, torch.Tensor]) -> list[str]:
        if isinstance(self.config.split_points, list):
            return list(self.config.split_points)
        units = shard_units(student, "auto")
        costs = _forward_times(student, units, example)
        # Every process measured; the main process's split is the one all use.
        return self.from_main([units[i] for i in balanced_split(costs, self.size)])

    def check_training(self, config: Any, student: nn.Module) -> None:
        layered = [f"losses[{i}] ({t.kind})" for i, t in enumerate(config.losses) if t.layers]
        if layered:
            raise ConfigError(f"parallel.strategy: pipeline computes the loss on the last stage from the student's "
                              f"output; {', '.join(layered)} read inner layers that live on other processes; use "
                              "output terms (hard_ce, soft_kl, output_mse, output_cosine) or another strategy")
        if config.bf16:
            raise ConfigError("bf16: the pipeline's stages run in float32; remove bf16 from the stage, or use "
                              "fsdp with mixed_precision: bf16")
        if isinstance(self.config.split_points, list) and len(self.config.split_points) != self.size - 1:
            raise ConfigError(f"parallel.split_points: {self.size} processes make {self.size} stages, which need "
                              f"{self.size - 1} split point(s), not {len(self.config.split_points)}")

    def build(self, distiller: Any) -> None:
        """Trace ``distiller``'s student and keep this process's stage."""
        self.distiller = distiller
        self.mb = math.ceil(distiller.config.batch_size / self.microbatches)
        idx = torch.arange(self.mb) % len(distiller.data)
        example = _contiguous(distiller.data.batch(idx, self.device)[0])
        student = distiller.student
        # Stages send activations as contiguous tensors: with channels-last weights (the
        # train stage's choice for CPU convolutions) every activation would be strided.
        student.to(memory_format=torch.contiguous_format)
        names = self.split_points(student, example)
        known = {n for n, _ in student.named_modules()}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"split_points: the model has no module {unknown[0]!r}")
        # Traced as it trains: the export fixes dropout and batch-norm behaviour.
        student.train()
        try:
            pipe = pipeline(student, mb_args=(), mb_kwargs=example,
                            split_spec={n: SplitPoint.BEGINNING for n in names})
        except Exception as e:  # noqa: BLE001 - tracing fails in many ways; the message names the model's part
            raise ConfigError(f"parallel.strategy: pipeline could not trace the model to cut it at {names} "
                              f"({type(e).__name__}: {str(e).splitlines()[0]}); use ddp or fsdp") from None
        _refuse_root_inputs_after_the_first_stage(pipe, names)
        if pipe.num_stages != self.size:
            raise ConfigError(f"split_points {names} cut the model into {pipe.num_stages} stages, not {self.size} "
                              "(a split point the forward never calls, or one inside another)")
        try:
            self.stage = pipe.build_stage(self.rank, self.device)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"parallel.strategy: pipeline stage {self.rank} cannot be built: "
                              f"{str(e).splitlines()[0]}") from None
        # A checkpoint of this pipeline numbers each stage's optimizer state on its own: it
        # resumes with the same cut only.
        self.layout = {"pipeline": names}
        local = pipe.get_stage_module(self.rank)
        self.local_ids = {id(p) for p in local.parameters()}
        self.owned_names = {f"student.{n}" for n, _ in [*local.named_parameters(), *local.named_buffers()]}
        self.optimizer_prefix = f"stage{self.rank}."  # each stage's optimizer counts its own parameters from 0
        self.schedule = SCHEDULES[self.config.schedule](self.stage, n_microbatches=self.microbatches,
                                                         loss_fn=self._loss, scale_grads=False)
        # Other stages' parameters leave this process: it holds its own stage only.
        self.elsewhere = [p for i in range(pipe.num_stages) if i != self.rank
                          for p in pipe.get_stage_module(i).parameters() if id(p) not in self.local_ids]
        self._release()

    def _release(self) -> None:
        for p in self.elsewhere:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def optimizer(self, factory, params):
        # This stage's parameters only: the others never get a gradient here.
        return factory([p for p in params if id(p) in self.local_ids])

    def owned(self, name: str) -> bool:
        """Whether this process holds ``name`` (a key of the loop's trainable state)."""
        return name in self.owned_names or not name.startswith("student.")

    # -- one micro-batch of the loop ----------------------------------------------------
    def forward_backward(self, idx: torch.Tensor, grad_accum: int) -> tuple[float, dict[str, float]]:
        """Run the examples ``idx`` through the pipeline forward and backward; the loss and
        each term's value (every process gets them from the last stage)."""
        d = self.distiller
        padded = torch.full((self.mb * self.microbatches,), PAD, dtype=torch.long)
        padded[: len(idx)] = idx
        self._examples, self._accum = len(idx), grad_accum
        self._parts: dict[str, float] = {}
        self._total = 0.0
        kwargs: dict[str, Any] = {}
        if self.rank == 0:
            inputs, _ = d.data.batch(torch.where(padded >= 0, padded, idx[0]), self.device)
            kwargs.update(_contiguous(inputs))
        if self.rank == self.last:
            kwargs.update(target=padded.to(self.device), losses=[])
        self.schedule.step(**kwargs)
        values = torch.zeros(1 + len(d.config.losses), dtype=torch.float64, device=self._comm_device)
        if self.rank == self.last:
            values[0] = self._total
            values[1:] = torch.tensor(list(self._parts.values()), dtype=torch.float64)
        dist.broadcast(values, src=self.last)
        names = [f"{i}:{t.kind}" for i, t in enumerate(d.config.losses)]
        return float(values[0]), dict(zip(names, values[1:].tolist(), strict=True))

    def _loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        d = self.distiller
        real = target >= 0
        n = int(real.sum())
        if n == 0:
            return out.sum() * 0.0  # a micro-batch of padding: no gradient, but a backward
        idx = target[real].cpu()
        share = n / self._examples
        labels = None if d.data.labels is None else d.data.labels[idx].to(self.device)
        t_out = None
        if d.teacher_cache is not None:
            t_out = d.teacher_cache[idx.to(d.teacher_cache.device)].to(self.device)
        elif d.needs_teacher:
            # Only the teacher needs the examples themselves here (collating images resizes them).
            inputs, _ = d.data.batch(idx, self.device)
            with torch.no_grad():
                t_out = d.teacher(**inputs)
        s_out = out[real]
        total = torch.zeros((), device=out.device)
        for i, term in enumerate(d.config.losses):
            # Output terms only (check_training refuses the others): no attention mask needed.
            value = d._term(i, term, s_out, t_out, {}, {}, labels, None)
            self._parts[f"{i}:{term.kind}"] = self._parts.get(f"{i}:{term.kind}", 0.0) + float(value.detach()) * share
            total = total + term.weight * value
        self._total += float(total.detach()) * share
        return total * (share / self._accum)

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> None:
        # Each stage holds different parameters: the squares add up across processes.
        sq = sum(float(torch.linalg.vector_norm(p.grad.float()) ** 2) for p in params if p.grad is not None)
        total = torch.tensor([sq], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(total)
        scale = min(1.0, max_norm / (math.sqrt(float(total)) + 1e-6))
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)

    # -- whole-model views --------------------------------------------------------------
    def _gather_to_main(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Every stage's parameters and buffers, gathered into the main process's ``module``
        (whole there until :meth:`_release`); the whole state dict on the main process."""
        mine = {k: v.detach().cpu() for k, v in module.state_dict().items() if f"student.{k}" in self.owned_names}
        parts: list[Any] = [None] * self.size if self.main else None
        dist.gather_object(mine, parts, dst=0)
        if not self.main:
            return {}
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        for part in parts[1:]:
            for name, value in part.items():
                tensors[name].data = value.to(tensors[name].device)
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    def agree(self, compute: Callable[[], Any]) -> Any:
        # The evaluation needs the whole student: the main process gathers it for the time
        # of the evaluation.
        self._gather_to_main(self.distiller.student)
        try:
            result = compute() if self.main else None
        finally:
            self._release()
        return self.from_main(result)

    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return self._gather_to_main(module)
