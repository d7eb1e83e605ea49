"""Proof that every strategy trains what one process trains, on this machine's processes.

Each ``run_*`` trains a tiny seeded model a few optimizer steps through the one training
loop under a given strategy and returns the full parameters and last gradients. The
``*_job`` functions run in torchrun workers (:mod:`slimkit.parallel.launch`): several
strategies per launch, since each launch costs seconds of start-up; the main process
writes what they found to safetensors files in the job folder. :func:`check` launches
them and compares with one process: the test suite, the benchmark and a user checking a
new cluster all run the same code::

    python -m slimkit.parallel.selfcheck
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from slimkit.atomic import write_json
from slimkit.distill import DistillConfig, DistillData, LossTerm
from slimkit.distill.trainer import Distiller
from slimkit.parallel.config import ParallelConfig
from slimkit.parallel.memory import training_state_bytes
from slimkit.parallel.strategies import make_strategy

STEPS = 3


class Classifier(nn.Module):
    """10 -> 32 -> 32 -> 4 with LayerNorm; no dropout or batch norm, so that a batch split
    across processes computes exactly what the whole batch does."""

    def __init__(self, seed: int = 0, width: int = 32):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(10, width), nn.LayerNorm(width), nn.ReLU()),
                                     nn.Sequential(nn.Linear(width, 32), nn.LayerNorm(32), nn.ReLU())])
        self.head = nn.Linear(32, 4)
        self.unused = nn.Linear(3, 3)  # never called: data parallel must not wait for its gradient

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class Encoder(nn.Module):
    """A 2-layer BERT (4 heads of 8) whose output is the mean-pooled last hidden state."""

    def __init__(self, seed: int = 0, heads: int = 4):
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(seed)
        config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=heads,
                            intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        self.backbone = BertModel(config, add_pooling_layer=True)  # the pooler is never used

    def forward(self, input_ids, attention_mask):
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(out.dtype)
        return (out * mask).sum(1) / mask.sum(1)


def classifier_data(n: int = 40) -> DistillData:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 10, generator=g)
    return DistillData({"x": x}, labels=(x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long())


def text_data(n: int = 24) -> DistillData:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 50, (n, 12), generator=g)
    lengths = torch.randint(4, 13, (n,), generator=g)
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    return DistillData({"input_ids": ids * mask, "attention_mask": mask})


def classifier_config(optimizer: str = "adamw", kd: bool = False, **kw) -> DistillConfig:
    settings = {"lr": 1e-2, "max_steps": STEPS, "batch_size": 7, "grad_accum": 2, "max_grad_norm": 1.0, **kw}
    losses = [LossTerm(kind="hard_ce")] + ([LossTerm(kind="soft_kl", temperature=2.0)] if kd else [])
    return DistillConfig(losses=losses, optimizer=optimizer, **settings)


def text_config(**kw) -> DistillConfig:
    return DistillConfig(losses=[LossTerm(kind="output_cosine")], lr=1e-3, max_steps=STEPS, batch_size=6, **kw)


def full(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().cpu().clone()


def run_classifier(strategy=None, optimizer: str = "adamw", checkpoint_dir=None, on_step=None, width: int = 32,
                   examples: int = 40, kd: bool = False, **kw) -> dict[str, torch.Tensor]:
    """The classifier trained on labels (and, with ``kd``, a teacher classifier's soft labels)."""
    student = Classifier(width=width)
    teacher = Classifier(seed=3) if kd else None
    d = Distiller(teacher, student, classifier_data(examples), classifier_config(optimizer, kd, **kw), progress=False,
                  strategy=strategy, checkpoint_dir=checkpoint_dir, device="cpu" if strategy is None else None,
                  on_step=on_step)
    d.run()
    return _found(student, strategy)


def distill_text(strategy=None, heads: int = 4) -> Distiller:
    """The tiny BERT student distilled from a tiny BERT teacher; the finished loop."""
    teacher, student = Encoder(seed=5, heads=heads), Encoder(seed=0, heads=heads)
    d = Distiller(teacher, student, text_data(), text_config(), progress=False, strategy=strategy,
                  device="cpu" if strategy is None else None)
    d.run()
    return d


def run_text(strategy=None, heads: int = 4) -> dict[str, torch.Tensor]:
    return _found(distill_text(strategy, heads).student)


def _found(student: nn.Module, strategy=None) -> dict[str, torch.Tensor]:
    if strategy is not None and strategy.pipelined:
        return _found_in_stages(student, strategy)
    out = {}
    for name, p in student.named_parameters():
        out[f"param.{name}"] = full(p)
        g = full(p.grad)
        if g is not None:
            out[f"grad.{name}"] = g
    return out


def _found_in_stages(student: nn.Module, strategy) -> dict[str, torch.Tensor]:
    """Each stage's parameters and gradients, gathered on the main process."""
    import torch.distributed as dist

    local = {k: v for k, v in _found(student).items() if f"student.{k.split('.', 1)[1]}" in strategy.owned_names}
    parts = [None] * strategy.size if strategy.main else None
    dist.gather_object(local, parts, dst=0)
    if not strategy.main:
        return {}
    # Parameters no stage holds (never called) are as they were, as in one process.
    whole = {k: v for k, v in _found(student).items() if k.startswith("param.")}
    return {**whole, **{k: v for part in parts for k, v in part.items()}}


def _write(strategy, job_dir: Path, name: str, found: dict[str, torch.Tensor]) -> None:
    if strategy.main:
        save_file({k: v.contiguous() for k, v in found.items()}, str(job_dir / f"{name}.safetensors"))


def _other(strategy, name: str, **kw):
    return make_strategy(strategy.world, ParallelConfig(strategy=name, nproc=strategy.size, **kw))


def state_bytes(d: Distiller) -> dict[str, int]:
    """What this process holds for the student's training: parameters, gradients, optimizer state."""
    return training_state_bytes(d.trainable, d.opt)


def two_process_job(strategy, job_dir: Path) -> None:
    """Every 2-process strategy on the tiny models, in one launch."""
    write_json(job_dir / f"state.fsdp.{strategy.rank}.json", state_bytes(distill_text(_other(strategy, "fsdp"))))
    _write(strategy, job_dir, "ddp", run_classifier(strategy))
    # 15 examples in micro-batches of 7: the third has one, and rank 1 none of it.
    _write(strategy, job_dir, "ddp_tail", run_classifier(strategy, examples=15, grad_accum=1))
    _write(strategy, job_dir, "zero1", run_classifier(_other(strategy, "ddp", zero1=True)))
    _write(strategy, job_dir, "fsdp", run_classifier(_other(strategy, "fsdp")))
    _write(strategy, job_dir, "fsdp_bf16", run_classifier(_other(strategy, "fsdp", mixed_precision="bf16"), optimizer="sgd"))
    _write(strategy, job_dir, "ddp_distill", run_text(_other(strategy, "ddp")))
    _write(strategy, job_dir, "tp", run_text(_other(strategy, "tp")))
    # Micro-batches of 2 (7 examples padded to 8), cut between the classifier's two blocks.
    _write(strategy, job_dir, "pipeline_1f1b", run_classifier(_other(strategy, "pipeline")))
    _write(strategy, job_dir, "pipeline_gpipe_kd", run_classifier(_other(strategy, "pipeline", schedule="gpipe"), kd=True))


def four_process_job(strategy, job_dir: Path) -> None:
    """FSDP x TP on a 2 x 2 mesh."""
    _write(strategy, job_dir, "fsdp_tp", run_text(strategy))


def kill_at(step: int, rank: int = 1):
    """An ``on_step`` that kills this process (``kill -9``) at ``step`` if it is ``rank``."""
    def on_step(done: int, _model) -> None:
        if done == step and int(os.environ.get("RANK", "0")) == rank:
            os.kill(os.getpid(), signal.SIGKILL)
    return on_step


def checkpoint_job(strategy, job_dir: Path, kill: int | None = None) -> None:
    """The classifier under the job's strategy, checkpointing every step into ``job_dir/ckpt``;
    rank 1 is killed at step ``kill``, if given."""
    found = run_classifier(strategy, checkpoint_dir=job_dir / "ckpt", checkpoint_every=1,
                           on_step=kill_at(kill) if kill else None)
    _write(strategy, job_dir, "final", found)


def text_job(strategy, job_dir: Path) -> None:
    """The tiny BERT distillation under the job's strategy."""
    _write(strategy, job_dir, "text", run_text(strategy))


def crash_job(strategy, job_dir: Path) -> None:
    """Rank 1 fails at step 2 while rank 0 goes on into the next collective."""
    from slimkit.errors import DataError

    def fail(step, _model):
        if step == 2 and strategy.rank == 1:
            raise DataError("a bad batch on rank 1")
    run_classifier(strategy, on_step=fail)


def worst(found: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two runs' parameters and gradients."""
    if set(found) != set(reference):
        raise AssertionError(f"the runs differ in what they hold: {sorted(set(found) ^ set(reference))[:4]}")
    return max(float((found[k] - reference[k]).abs().max()) for k in reference)


# Each check: (job, file it writes, one-process reference, tolerance).
CHECKS = {
    "ddp": ("two", "adamw", 1e-5), "ddp_tail": ("two", "tail", 1e-5), "zero1": ("two", "adamw", 1e-5),
    "fsdp": ("two", "adamw", 1e-5),
    "fsdp_bf16": ("two", "sgd", 2e-3), "ddp_distill": ("two", "text", 1e-5), "tp": ("two", "text", 1e-5),
    "pipeline_1f1b": ("two", "adamw", 1e-5), "pipeline_gpipe_kd": ("two", "kd", 1e-5),
    "fsdp_tp": ("four", "text", 1e-5),
}


def check(folder: Path, four: bool = True, resume: bool = True) -> dict[str, float]:
    """Launch every check on this machine and compare with one process (``four``: FSDP x
    TP on 4 processes too; ``resume``: the killed and resumed run too).

    Returns the largest difference of each strategy (see :data:`CHECKS` for the
    tolerances), ``resume`` (a run whose rank 1 was killed at step 2, resumed, against
    an uninterrupted one) and ``fsdp_state_ratio`` (a process's parameters, gradients
    and optimizer state under FSDP on 2 processes over one process's).
    """
    from safetensors.torch import load_file

    from slimkit.parallel.launch import ParallelError, launch

    def job(name: str, function: str, config: ParallelConfig, **args) -> Path:
        launch(folder / name, f"{__name__}:{function}", config, args)
        return folder / name

    folders = {"two": job("two", "two_process_job", ParallelConfig(strategy="ddp", nproc=2))}
    if four:
        folders["four"] = job("four", "four_process_job", ParallelConfig(strategy="fsdp+tp", nproc=4))
    references = {"adamw": run_classifier(), "sgd": run_classifier(optimizer="sgd"), "text": run_text(),
                  "tail": run_classifier(examples=15, grad_accum=1), "kd": run_classifier(kd=True)}
    out = {name: worst(load_file(str(folders[where] / f"{name}.safetensors")), references[ref])
           for name, (where, ref, _) in CHECKS.items() if where in folders}
    if resume:
        fsdp = ParallelConfig(strategy="fsdp", nproc=2)
        try:
            job("killed", "checkpoint_job", fsdp, kill=2)
        except ParallelError:
            pass  # rank 1 was killed, as it should be
        resumed = load_file(str(job("killed", "checkpoint_job", fsdp) / "final.safetensors"))
        uninterrupted = load_file(str(job("uninterrupted", "checkpoint_job", fsdp) / "final.safetensors"))
        out["resume"] = worst(resumed, uninterrupted)
    single = state_bytes(distill_text())["total"]
    per_rank = [json.loads((folders["two"] / f"state.fsdp.{r}.json").read_text())["total"] for r in (0, 1)]
    out["fsdp_state_ratio"] = max(per_rank) / single
    return out


def main() -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        found = check(Path(tmp))
    bad = {k: v for k, v in found.items() if k in CHECKS and v > CHECKS[k][2]}
    for k, v in found.items():
        limit = f" (<= {CHECKS[k][2]:g})" if k in CHECKS else ""
        print(f"{k:<18} {v:.3g}{limit}")
    if bad or found.get("resume", 0) > 1e-6 or found["fsdp_state_ratio"] > 0.55:
        print("parallel self-check: FAILED")
        return 1
    print("parallel self-check: every strategy trains what one process trains")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
