"""The distill recipe stage: its config, the student it builds, and a short real run."""

import numpy as np
import pytest
import torch

from slimkit.distill.config import LossTerm
from slimkit.distill.stage import DistillStageConfig, StudentSpec, build_student, run_distill_stage
from slimkit.errors import ConfigError, DataError
from slimkit.recipe import Recipe


def stage(**kw) -> DistillStageConfig:
    return DistillStageConfig(**{"student": {"layers": [0, 2]}, **kw})


def test_shallow_student_gets_a_hidden_term_per_kept_layer():
    cfg = stage(hidden_weight=0.5).training_config()
    assert [t.kind for t in cfg.losses] == ["output_cosine", "hidden_cosine"]
    assert cfg.losses[1].weight == 0.5
    assert cfg.losses[1].layers == {"backbone.encoder.layer.0": "backbone.encoder.layer.0",
                                    "backbone.encoder.layer.1": "backbone.encoder.layer.2"}
    assert [t.kind for t in stage(hidden_weight=0).training_config().losses] == ["output_cosine"]
    other = DistillStageConfig(student={"model": "minilm-l6"}).training_config()
    assert [t.kind for t in other.losses] == ["output_cosine"], "no layer map for a student of another model"


@pytest.mark.parametrize("kw, message", [
    ({"student": {"layers": [0], "model": "minilm-l6"}}, "one of `layers`"),
    ({"student": {}}, "one of `layers`"),
    ({"student": {"layers": [0], "init": "zeros"}}, "init"),
    ({"validation_texts": 0}, "validation_texts > 0"),
    ({"early_stopping": {"metric": "accuracy"}}, "val_cosine"),
    ({"cache_teacher": True}, "hidden"),
])
def test_bad_stage_configs_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        stage(**kw)


def test_recipe_stage_is_parsed_and_must_come_before_export():
    recipe = Recipe.from_dict({"name": "d", "model": "minilm-l6", "stages": [
        {"distill": {"student": {"layers": [1, 3, 5]}, "epochs": 2, "lr": 3e-4}}, {"export": {}}, {"quantize": {}}]})
    assert isinstance(recipe.stages[0], DistillStageConfig) and recipe.stages[0].epochs == 2
    with pytest.raises(ConfigError, match="already exported"):
        Recipe.from_dict({"name": "d", "model": "minilm-l6", "stages": [
            {"export": {}}, {"distill": {"student": {"layers": [0]}}}]})


def test_random_init_student_starts_from_new_weights():
    from test_students import tiny_bert

    teacher = tiny_bert()
    kept = build_student(teacher, StudentSpec(layers=[1]), seed=0)
    fresh = build_student(teacher, StudentSpec(layers=[1], init="random"), seed=0)
    t_w = teacher.module.backbone.encoder.layer[1].output.dense.weight
    torch.testing.assert_close(kept.module.backbone.encoder.layer[0].output.dense.weight, t_w)
    assert not torch.allclose(fresh.module.backbone.encoder.layer[0].output.dense.weight, t_w)
    again = build_student(teacher, StudentSpec(layers=[1], init="random"), seed=0)
    torch.testing.assert_close(again.module.backbone.encoder.layer[0].output.dense.weight,
                               fresh.module.backbone.encoder.layer[0].output.dense.weight)


def test_too_few_texts_is_a_clear_error():
    from test_students import tiny_bert

    teacher = tiny_bert()
    teacher.tokenizer = object()  # never reached
    with pytest.raises(DataError, match="validation_texts is 500"):
        run_distill_stage(teacher, stage(), ["a text"] * 10, progress=False)


@pytest.mark.integration
def test_stage_distils_minilm_and_a_rerun_resumes_from_its_checkpoint(tmp_path):
    from slimkit.zoo.models import load_model
    from slimkit.zoo.tasks import load_task

    teacher = load_model("minilm-l6")
    task = load_task("rt-polarity")
    texts, labels = task.train_texts[:80], task.train_labels[:80]
    cfg = stage(student={"layers": [5]}, texts={"limit": 80}, validation_texts=16, epochs=2, batch_size=16, lr=5e-4,
                max_len=48, losses=[LossTerm(kind="output_cosine")])
    student, record = run_distill_stage(teacher, cfg, texts, tmp_path / "ckpt", progress=False, train_labels=labels)
    assert len(student.module.backbone.encoder.layer) == 1
    assert record["train_texts"] == 64 and record["validation_texts"] == 16 and record["steps"] == 8
    assert record["best"]["value"] > record["before"]["val_cosine"] + 0.01, record
    # With labels, every evaluation also scores the task on the 16 held-out texts (a head on the 64 others).
    assert record["head_texts"] == 64 and len(record["evals"]) == 2
    # Recomputed here: a head on the teacher's embeddings of the 64 training texts, scoring
    # the trained student (the best evaluation's weights) on the 16 held-out ones.
    from slimkit.distill.stage import _batches, _embed
    from slimkit.measure.task import fit_head

    device = torch.device("cpu")
    head = fit_head(_embed(teacher.module, _batches(teacher.tokenizer, texts[:64], 48), device).numpy(), np.asarray(labels[:64]))
    held_out = _embed(student.module, _batches(teacher.tokenizer, texts[64:], 48), device).numpy()
    best = next(e for e in record["evals"] if e["step"] == record["best"]["step"])
    assert best["val_accuracy"] == float((head.predict(held_out) == np.asarray(labels[64:])).mean())
    assert record["parameters"]["student"] < record["parameters"]["teacher"]
    # The same stage again finds the finished checkpoint: no step is repeated, same weights.
    again, record2 = run_distill_stage(teacher, cfg, texts, tmp_path / "ckpt", progress=False)
    assert record2["steps"] == 8 and record2["history"] == record["history"]
    assert record2["head_texts"] == 0 and "val_accuracy" not in record2["before"]  # no labels given this time
    for (name, a), b in zip(student.module.state_dict().items(), again.module.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_current_student_is_exclusive_and_keeps_its_weights():
    assert DistillStageConfig(student={"current": True}).student.current
    with pytest.raises(ValueError, match="one of `layers`"):
        stage(student={"current": True, "layers": [0]})
    with pytest.raises(ValueError, match="init: random"):
        stage(student={"current": True, "init": "random"})


@pytest.mark.integration
def test_pruned_model_recovers_towards_the_original(tmp_path):
    from slimkit.prune import TransformerPruneConfig, prune_
    from slimkit.zoo.models import load_model
    from slimkit.zoo.tasks import load_task

    original = load_model("minilm-l6")
    pruned = original.clone()
    prune_(pruned.module, TransformerPruneConfig(heads=0.5, ffn=0.5, importance="l1"))
    texts = load_task("rt-polarity").train_texts[:80]
    cfg = DistillStageConfig(student={"current": True}, validation_texts=16, epochs=2, batch_size=16, lr=5e-4,
                             max_len=48)
    student, record = run_distill_stage(pruned, cfg, texts, tmp_path / "ckpt", progress=False, original=original)
    assert student is pruned, "the compressed model itself learns; nothing is rebuilt"
    assert student.module.backbone.encoder.layer[0].attention.self.num_attention_heads == 6
    assert record["best"]["value"] > record["before"]["val_cosine"] + 0.02, record
    assert record["parameters"]["student"] < record["parameters"]["teacher"]
    with pytest.raises(ConfigError, match="original model"):
        run_distill_stage(pruned, cfg, texts, progress=False)
