"""Typed configuration of parallel training: which strategy, on how many processes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ParallelConfig(BaseModel):
    """How the training stages of a recipe (``train``, ``distill``) run across processes.

    Only training runs in the worker processes; the recipe's parent process prepares the
    model, measures it and writes the run folder alone.

    Attributes:
        strategy: ``none`` (one process), ``ddp`` (data parallel: every process holds the
            whole model and a share of each batch; gradients are averaged), ``fsdp``
            (FSDP2 ``fully_shard``, ZeRO-3: parameters, gradients and optimizer state are
            sharded across processes and gathered layer by layer), ``tp`` (tensor
            parallel: the attention and MLP projections of transformer blocks are split
            column- and row-wise; every process sees the same batch) or ``fsdp+tp`` (both,
            on a 2-D device mesh: ``nproc / tp_degree`` data-parallel groups of
            ``tp_degree`` processes) or ``pipeline`` (``torch.distributed.pipelining``:
            the model cut into ``nproc`` consecutive stages, one per process, each
            micro-batch flowing through them).
        nproc: processes on this host, one per device (per core group on CPU). When the
            command already runs inside a launch (torchrun, Slurm) the launch's world
            size is used; ``split_points`` and ``tp_degree`` are checked against it again
            when training starts.
        tp_degree: processes that split each layer under ``fsdp+tp`` (default 2); under
            ``tp`` it is ``nproc``. It must divide every split layer's head count.
        zero1: under ``ddp``, shard the optimizer state across processes (ZeRO stage 1,
            :class:`torch.distributed.optim.ZeroRedundancyOptimizer`).
        mixed_precision: under ``fsdp`` and ``fsdp+tp``, ``bf16`` gathers parameters and
            computes in bfloat16 while gradients are reduced and the optimizer steps in
            float32; ``fp32`` keeps everything in float32.
        cpu_offload: under ``fsdp``, keep the sharded parameters, gradients and optimizer
            state in CPU memory between uses (an accelerator is needed: on CPU there is
            nothing to offload from).
        shard: under ``fsdp``, the modules that become their own sharded units (qualified
            names, or ``re:`` patterns); ``auto`` takes the model's repeated blocks.
        schedule: under ``pipeline``, ``1f1b`` (each stage alternates forward and backward
            once the pipeline is full: at most ``nproc`` micro-batches of activations
            held) or ``gpipe`` (all forwards, then all backwards).
        microbatches: under ``pipeline``, micro-batches each batch is cut into (default:
            ``2 * nproc``); more fill the pipeline better.
        split_points: under ``pipeline``, the modules each stage after the first begins
            with (``nproc - 1`` qualified names, in order), or ``balanced``: cut between
            the model's blocks so that the stages' measured forward times are closest.
        backend: ``auto`` chooses nccl on CUDA and gloo on CPU.
        timeout_seconds: how long a process waits in a collective before it gives up; a
            crashed process then stops the others with an error instead of a hang.
        port: the rendezvous port; by default ``torchrun --standalone`` picks a free one,
            so concurrent jobs on one host never collide.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Literal["none", "ddp", "fsdp", "tp", "fsdp+tp", "pipeline"] = "none"
    nproc: int = Field(1, ge=1)
    tp_degree: int | None = Field(None, ge=1)
    zero1: bool = False
    mixed_precision: Literal["fp32", "bf16"] = "fp32"
    cpu_offload: bool = False
    shard: Literal["auto"] | list[str] = "auto"
    schedule: Literal["1f1b", "gpipe"] = "1f1b"
    microbatches: int | None = Field(None, ge=1)
    split_points: Literal["balanced"] | list[str] = "balanced"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_seconds: float = Field(600.0, gt=0)
    port: int | None = Field(None, ge=1, le=65535)

    @model_validator(mode="after")
    def _fits_the_strategy(self) -> ParallelConfig:
        s = self.strategy
        if s == "none" and self.nproc > 1:
            raise ValueError(f"nproc: {self.nproc} processes need a strategy; set strategy: ddp, fsdp, pipeline, tp "
                             "or fsdp+tp")
        if self.zero1 and s != "ddp":
            raise ValueError(f"zero1 shards the optimizer state of ddp; {s} {'shards it already' if 'fsdp' in s else 'does not use it'}")
        if self.mixed_precision != "fp32" and "fsdp" not in s:
            raise ValueError(f"mixed_precision applies to fsdp and fsdp+tp; under {s} use the stage's bf16: true")
        if self.cpu_offload and s != "fsdp":
            raise ValueError("cpu_offload applies to strategy: fsdp")
        if self.shard != "auto" and s != "fsdp":
            raise ValueError(f"shard names FSDP units under strategy: fsdp ({s} shards "
                             f"{'its tensor-parallel blocks' if s == 'fsdp+tp' else 'nothing'})")
        changed = [k for k, default in (("schedule", "1f1b"), ("microbatches", None), ("split_points", "balanced"))
                   if getattr(self, k) != default]
        if s != "pipeline" and changed:
            raise ValueError(f"{', '.join(changed)} applies to strategy: pipeline")
        if s == "pipeline" and isinstance(self.split_points, list) and len(self.split_points) != self.nproc - 1:
            raise ValueError(f"split_points: {self.nproc} stages need {self.nproc - 1} split point(s), "
                             f"got {len(self.split_points)}; or use split_points: balanced")
        if self.tp_degree is not None and s != "fsdp+tp":
            raise ValueError("tp_degree applies to fsdp+tp (under tp every process splits the layers: nproc)")
        if s == "fsdp+tp" and self.nproc % self.tensor_degree:
            raise ValueError(f"nproc: {self.nproc} processes do not split into groups of tp_degree "
                             f"{self.tensor_degree}; give a multiple of it")
        return self

    @property
    def tensor_degree(self) -> int:
        """Processes that split each layer: ``nproc`` under ``tp``, ``tp_degree`` under ``fsdp+tp``, else 1."""
        if self.strategy == "tp":
            return self.nproc
        if self.strategy == "fsdp+tp":
            return self.tp_degree or 2
        return 1

    @property
    def distributed(self) -> bool:
        return self.strategy != "none"
