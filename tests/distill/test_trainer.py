"""The distillation loop on tiny seeded models."""

import pytest
import torch
from pydantic import ValidationError
from tiny_models import SeededMLP
from torch import nn

from slimkit.distill import (
    DistillConfig,
    DistillData,
    EarlyStopping,
    LossTerm,
    NonFiniteLoss,
    distill,
)
from slimkit.errors import ConfigError, DataError, LayerSelectionError


def data(n=64, labels=True):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 10, generator=g)
    return DistillData({"x": x}, torch.randint(0, 4, (n,), generator=g) if labels else None)


KD = [LossTerm(kind="soft_kl", temperature=2.0)]


def params(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_only_the_student_learns():
    teacher, student = SeededMLP(32, 0), SeededMLP(8, 1)
    before_t, before_s = params(teacher), params(student)
    distill(teacher, student, data(), DistillConfig(losses=KD, max_steps=3, batch_size=16), progress=False)
    for k, v in params(teacher).items():
        torch.testing.assert_close(v, before_t[k], rtol=0, atol=0)
    assert all(p.grad is None for p in teacher.parameters())
    assert any(not torch.equal(v, before_s[k]) for k, v in params(student).items())


def test_a_tiny_student_learns_from_a_tiny_teacher():
    teacher, student = SeededMLP(32, 0), SeededMLP(16, 1)
    result = distill(teacher, student, data(), DistillConfig(losses=KD, lr=1e-2, epochs=5, batch_size=16), progress=False)
    assert len(result.history) == 20
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    assert last < first / 5, (first, last)  # measured: 7.7x lower after 20 steps


def test_gradient_accumulation_equals_the_larger_batch():
    runs = []
    for batch, accum in [(16, 1), (8, 2)]:
        student = SeededMLP(8, 1)
        distill(SeededMLP(32, 0), student, data(), DistillConfig(losses=KD, lr=1e-2, epochs=2, batch_size=batch, grad_accum=accum),
                progress=False)
        runs.append(params(student))
    for k, v in runs[0].items():
        torch.testing.assert_close(runs[1][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule,warmup,expected", [
    ("constant", 0, [1.0, 1.0, 1.0]),
    ("linear", 0, [1.0, 0.5, 0.0]),
    ("cosine", 0, [1.0, 0.5, 0.0]),
    ("cosine", 4, [0.25, 1.0, 0.0]),
])
def test_learning_rate_schedules(schedule, warmup, expected):
    from slimkit.distill.trainer import Distiller
    cfg = DistillConfig(losses=KD, schedule=schedule, warmup_steps=warmup, epochs=3, batch_size=8)  # 24 steps
    d = Distiller(SeededMLP(32, 0), SeededMLP(8, 1), data(n=64), cfg, progress=False)
    steps = [0, 12, 24] if warmup == 0 else [0, 3, 24]
    got = [d._lr_factor(s) for s in steps]
    assert got == pytest.approx(expected, abs=1e-6), got


def test_bf16_autocast_trains_where_supported():
    from slimkit.distill.trainer import bf16_supported
    assert bf16_supported(torch.device("cpu")) and not bf16_supported(torch.device("meta"))
    runs = {}
    for bf16 in (False, True):
        student = SeededMLP(16, 1)
        cfg = DistillConfig(losses=KD, lr=1e-2, epochs=5, batch_size=16, bf16=bf16)
        runs[bf16] = [h["loss"] for h in distill(SeededMLP(32, 0), student, data(), cfg, device="cpu", progress=False).history]
    assert runs[True][-1] < runs[True][0] / 3
    # bf16 rounding shows in every step's loss (a run that ignored bf16 would repeat fp32's
    # exactly), yet tracks the float32 run.
    assert all(a != b for a, b in zip(runs[True], runs[False], strict=True))
    assert runs[True] == pytest.approx(runs[False], rel=0.1)
    assert all(p.dtype == torch.float32 for p in student.parameters())  # autocast computes in bf16, keeps fp32 weights


@pytest.mark.parametrize("kind", ["soft_kl", "output_mse", "output_cosine"])
@pytest.mark.parametrize("width", [3, 1])  # 1 would broadcast against the teacher's 4 outputs
def test_outputs_of_other_shapes_are_refused(kind, width):
    student = SeededMLP(8, 1)
    student.head = nn.Linear(8, width)
    term = LossTerm(kind=kind, temperature=2.0) if kind == "soft_kl" else LossTerm(kind=kind)
    with pytest.raises(ConfigError, match=rf"losses\[0\] \({kind}\): the student's output has shape \(2, {width}\) "
                                          r"but the teacher's \(2, 4\); give the student the teacher's output size"):
        distill(SeededMLP(32, 0), student, data(), DistillConfig(losses=[term], max_steps=1), progress=False)


def config_for_resume():
    return DistillConfig(losses=[*KD, LossTerm(kind="hard_ce", weight=0.5)], lr=5e-3, epochs=5, batch_size=16,
                         checkpoint_every=5, eval_every=4, seed=3)


# mid_replace: the process was killed between setting the previous checkpoint aside and
# moving the new one in, so only .ck.old is left.
@pytest.mark.parametrize("mid_replace", [False, True])
def test_resume_after_interrupt_reproduces_the_uninterrupted_run(tmp_path, mid_replace):
    evaluate = lambda m: {"acc": 0.0}  # noqa: E731
    teacher = SeededMLP(32, 0)
    straight = SeededMLP(8, 1, dropout=0.3)
    distill(teacher, straight, data(), config_for_resume(), evaluate=evaluate, progress=False)

    class Crash(Exception):
        pass

    def crash_at_12(m, calls=[]):  # noqa: B006 (counts calls across invocations)
        calls.append(1)
        if len(calls) == 3:  # the evaluation at step 12; the last checkpoint is step 10
            raise Crash
        return {"acc": 0.0}

    resumed = SeededMLP(8, 1, dropout=0.3)
    with pytest.raises(Crash):
        distill(teacher, resumed, data(), config_for_resume(), evaluate=crash_at_12, checkpoint_dir=tmp_path / "ck", progress=False)
    if mid_replace:
        (tmp_path / "ck").rename(tmp_path / ".ck.old")
    again = SeededMLP(8, 99, dropout=0.3)  # different initial weights: everything must come from the checkpoint
    result = distill(teacher, again, data(), config_for_resume(), evaluate=evaluate, checkpoint_dir=tmp_path / "ck", progress=False)
    assert result.steps == 20
    for k, v in params(straight).items():
        torch.testing.assert_close(params(again)[k], v, rtol=0, atol=0)


def test_a_checkpoint_from_another_config_is_refused(tmp_path):
    teacher = SeededMLP(32, 0)
    distill(teacher, SeededMLP(8, 1), data(), DistillConfig(losses=KD, max_steps=2, batch_size=16), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="different distillation config"):
        distill(teacher, SeededMLP(8, 1), data(), DistillConfig(losses=KD, max_steps=3, batch_size=16), checkpoint_dir=tmp_path, progress=False)


def test_hidden_loss_with_projection_between_widths():
    teacher, student = SeededMLP(32, 0), SeededMLP(8, 1)
    term = LossTerm(kind="hidden_mse", layers={"body.1": "body.1"}, projection=True)
    result = distill(teacher, student, data(), DistillConfig(losses=[term], lr=1e-2, epochs=10, batch_size=16), progress=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"] / 2


def test_mismatched_widths_without_projection_are_explained():
    term = LossTerm(kind="hidden_cosine", layers={"body.1": "body.1"})
    with pytest.raises(ConfigError, match=r"shape \(2, 8\) but teacher layer 'body.1' gives \(2, 32\); set projection: true"):
        distill(SeededMLP(32, 0), SeededMLP(8, 1), data(), DistillConfig(losses=[term], max_steps=1), progress=False)


def test_layer_map_with_unknown_layer():
    term = LossTerm(kind="hidden_mse", layers={"body.7": "body.1"})
    with pytest.raises(LayerSelectionError, match="student has no layer 'body.7'"):
        distill(SeededMLP(32, 0), SeededMLP(32, 1), data(), DistillConfig(losses=[term], max_steps=1), progress=False)


@pytest.mark.parametrize("t", [0.0, -1.0])
def test_temperature_must_be_positive(t):
    with pytest.raises(ValidationError, match="temperature"):
        LossTerm(kind="soft_kl", temperature=t)


def test_empty_data_and_missing_labels():
    with pytest.raises(DataError, match="empty"):
        distill(SeededMLP(32, 0), SeededMLP(8, 1), DistillData({"x": torch.zeros(0, 10)}), DistillConfig(losses=KD), progress=False)
    with pytest.raises(DataError, match="needs labels"):
        distill(SeededMLP(32, 0), SeededMLP(8, 1), data(labels=False), DistillConfig(losses=[LossTerm(kind="hard_ce")]), progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    import json
    import re

    # A learning rate this large makes the student diverge to inf/NaN within a few steps.
    cfg = DistillConfig(losses=[LossTerm(kind="output_mse")], optimizer="sgd", lr=1e4, momentum=0.0,
                        epochs=50, batch_size=16, checkpoint_every=1)
    with pytest.raises(NonFiniteLoss) as err:
        distill(SeededMLP(32, 0), SeededMLP(8, 1), data(), cfg, checkpoint_dir=tmp_path, progress=False)
    bad_step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    assert bad_step > 1 and str(tmp_path) in str(err.value)
    saved = json.loads((tmp_path / "state.json").read_text())["loop"]
    assert saved["step"] == bad_step - 1
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in saved["history"])


def test_early_stopping_restores_the_best_weights():
    scores = iter([0.5, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    snapshots = []

    def evaluate(m):
        snapshots.append(params(m))
        return {"acc": next(scores)}

    student = SeededMLP(8, 1)
    cfg = DistillConfig(losses=KD, epochs=7, batch_size=64, early_stopping=EarlyStopping(metric="acc", patience=2))
    result = distill(SeededMLP(32, 0), student, data(), cfg, evaluate=evaluate, progress=False)
    assert result.stopped_early and result.steps == 4
    assert result.best == {"step": 2, "value": 0.9}
    for k, v in snapshots[1].items():
        torch.testing.assert_close(params(student)[k], v, rtol=0, atol=0)


def test_early_stopping_needs_an_evaluation():
    cfg = DistillConfig(losses=KD, early_stopping=EarlyStopping(metric="acc"))
    with pytest.raises(ConfigError, match="evaluation function"):
        distill(SeededMLP(32, 0), SeededMLP(8, 1), data(), cfg, progress=False)


def test_cached_teacher_outputs_give_the_same_run():
    teacher = SeededMLP(32, 0)
    a, b = SeededMLP(8, 1, dropout=0.2), SeededMLP(8, 1, dropout=0.2)
    cfg = DistillConfig(losses=KD, epochs=3, batch_size=16, seed=5)
    distill(teacher, a, data(), cfg, progress=False)
    distill(teacher, b, data(), cfg.model_copy(update={"cache_teacher": True}), progress=False)
    for k, v in params(a).items():
        torch.testing.assert_close(params(b)[k], v, rtol=1e-5, atol=1e-6)


def test_cache_teacher_refuses_hidden_terms():
    with pytest.raises(ValidationError, match="cache_teacher"):
        DistillConfig(losses=[LossTerm(kind="hidden_mse", layers={"a": "b"})], cache_teacher=True)


class ConvNet(nn.Module):
    def __init__(self, channels: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3))

    def forward(self, x):
        return self.head(self.features(x))


def test_feature_map_loss_projects_narrower_cnn_channels():
    teacher, student = ConvNet(16, 0), ConvNet(4, 1)
    images = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    term = LossTerm(kind="hidden_mse", layers={"features.1": "features.1"}, projection=True)
    cfg = DistillConfig(losses=[term, LossTerm(kind="soft_kl", temperature=2.0)], lr=1e-2, epochs=20, batch_size=8)
    result = distill(teacher, student, DistillData({"x": images}), cfg, progress=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"] / 3
    with pytest.raises(ConfigError, match=r"gives shape \(2, 4, 8, 8\) but teacher layer 'features.1' gives \(2, 16, 8, 8\)"):
        distill(teacher, ConvNet(4, 1), DistillData({"x": images}),
                DistillConfig(losses=[LossTerm(kind="hidden_mse", layers={"features.1": "features.1"})]), progress=False)
