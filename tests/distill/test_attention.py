"""Attention-map losses (MiniLM) on tiny seeded BERTs running SDPA attention."""

import copy

import pytest
import torch
from pydantic import ValidationError
from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

from slimkit.distill import DistillConfig, DistillData, LossTerm, distill
from slimkit.distill import attention as A
from slimkit.distill.trainer import Distiller
from slimkit.errors import ConfigError, LayerSelectionError
from slimkit.zoo.models import TextEncoder

SELF = "backbone.encoder.layer.{}.attention.self"


def tiny_bert(seed: int, hidden: int = 32, heads: int = 4, layers: int = 2) -> TextEncoder:
    torch.manual_seed(seed)
    # A wide initialisation gives peaked attention; the default 0.02 leaves it nearly uniform.
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden, vocab_size=100, max_position_embeddings=32,
                     initializer_range=0.3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "sdpa"
    return TextEncoder(BertModel(cfg).eval()).eval()


LENGTHS = [7, 5, 3, 6]


def batch(seed: int = 0, pad_id: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (len(LENGTHS), max(LENGTHS)), generator=g)
    mask = (torch.arange(max(LENGTHS))[None] < torch.tensor(LENGTHS)[:, None]).long()
    return {"input_ids": torch.where(mask.bool(), ids, pad_id), "attention_mask": mask}


def term(kind="attention_kl", student=0, teacher=1, **kw) -> LossTerm:
    return LossTerm(kind=kind, layers={SELF.format(student): SELF.format(teacher)}, **kw)


def loss_of(teacher, student, t: LossTerm, inputs=None) -> torch.Tensor:
    inputs = inputs or batch()
    d = Distiller(teacher, student, DistillData(inputs), DistillConfig(losses=[t]), device="cpu", progress=False)
    return d.loss(inputs, None)[0]


def eager_attentions(model: TextEncoder, inputs) -> tuple[torch.Tensor, ...]:
    eager = copy.deepcopy(model)
    eager.backbone.config._attn_implementation = "eager"
    with torch.no_grad():
        return eager.backbone(**inputs, output_attentions=True).attentions


def reference_kl(teacher_probs: torch.Tensor, student_probs: torch.Tensor, lengths) -> torch.Tensor:
    """KL(teacher || student) over each example's real tokens only, averaged over heads and queries."""
    total, count = 0.0, 0
    for b, n in enumerate(lengths):
        t, s = teacher_probs[b, :, :n, :n].double(), student_probs[b, :, :n, :n].double()
        total += (t * (t.log() - s.log())).sum()
        count += t.shape[0] * n
    return (total / count).float()


@pytest.mark.parametrize("kind", ["attention_kl", "value_relation_kl"])
def test_zero_for_the_same_weights_and_positive_otherwise(kind):
    teacher = tiny_bert(0)
    assert loss_of(teacher, tiny_bert(0), term(kind, 1, 1)).item() == pytest.approx(0.0, abs=1e-6)
    assert loss_of(teacher, tiny_bert(1), term(kind, 1, 1)).item() > 0.05


def test_attention_kl_equals_kl_of_eager_attention_probabilities():
    teacher, student = tiny_bert(0), tiny_bert(1)
    inputs = batch()
    expected = reference_kl(eager_attentions(teacher, inputs)[1], eager_attentions(student, inputs)[0], LENGTHS)
    assert expected > 0.05
    torch.testing.assert_close(loss_of(teacher, student, term(), inputs), expected)


def test_value_relation_kl_matches_its_definition():
    teacher, student = tiny_bert(0), tiny_bert(1)
    inputs = batch()

    def value_relations(model, layer):
        with torch.no_grad():
            h = model.backbone(**inputs, output_hidden_states=True).hidden_states[layer]
            v = model.backbone.encoder.layer[layer].attention.self.value(h)
        v = v.reshape(*v.shape[:2], 4, -1).transpose(1, 2)  # 4 heads
        scores = v @ v.transpose(-1, -2) / v.shape[-1] ** 0.5
        return scores.masked_fill(inputs["attention_mask"][:, None, None, :] == 0, float("-inf")).softmax(-1)

    expected = reference_kl(value_relations(teacher, 1), value_relations(student, 0), LENGTHS)
    torch.testing.assert_close(loss_of(teacher, student, term("value_relation_kl")), expected)


def test_padding_does_not_change_the_loss():
    teacher, student = tiny_bert(0), tiny_bert(1)
    t = term()
    base = loss_of(teacher, student, t, batch(pad_id=0))
    torch.testing.assert_close(loss_of(teacher, student, t, batch(pad_id=57)), base)
    # Four more padding columns: more padded keys and query rows, the same loss.
    wider = {k: torch.cat([v, torch.zeros(len(LENGTHS), 4, dtype=v.dtype)], 1) for k, v in batch().items()}
    torch.testing.assert_close(loss_of(teacher, student, t, wider), base)


def test_gradients_reach_the_student_only():
    teacher, student = tiny_bert(0), tiny_bert(1)
    loss_of(teacher, student, term("attention_kl", 1, 1)).backward()
    assert all(p.grad is None for p in teacher.parameters())
    attn = student.backbone.encoder.layer[1].attention.self
    assert attn.query.weight.grad.abs().sum() > 0 and attn.key.weight.grad.abs().sum() > 0


def test_bf16_autocast_still_compares_in_float32():
    teacher, student = tiny_bert(0), tiny_bert(1)
    inputs = batch()
    d = Distiller(teacher, student, DistillData(inputs), DistillConfig(losses=[term()]), device="cpu", progress=False)
    full = d.loss(inputs, None)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = d.loss(inputs, None)[0]
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, rtol=0.02, atol=0)  # bf16 projections only: measured 0.07% apart


def test_relation_heads_compare_models_with_different_head_counts():
    teacher, student = tiny_bert(0, hidden=32, heads=4), tiny_bert(1, hidden=16, heads=2)
    with pytest.raises(ConfigError, match=r"student layer '.*layer.0.attention.self' has 2 attention heads but "
                                          r"teacher layer '.*layer.1.attention.self' has 4; set relation_heads \(e.g. 4\)"):
        loss_of(teacher, student, term())
    assert loss_of(teacher, student, term(relation_heads=4)).item() > 0.05
    assert loss_of(teacher, tiny_bert(0), term(student=1, relation_heads=8)).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match="do not both split into 3 heads"):
        loss_of(teacher, student, term(relation_heads=3))


def test_relation_heads_resplit_the_concatenated_heads():
    inputs = batch()
    g = torch.Generator().manual_seed(2)
    sq, sk = torch.randn(4, 7, 16, generator=g), torch.randn(4, 7, 16, generator=g)
    tq, tk = torch.randn(4, 7, 32, generator=g), torch.randn(4, 7, 32, generator=g)

    def probs(q, k, r):
        q, k = q.reshape(4, 7, r, -1).transpose(1, 2), k.reshape(4, 7, r, -1).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        return scores.masked_fill(inputs["attention_mask"][:, None, None, :] == 0, float("-inf")).softmax(-1)

    expected = reference_kl(probs(tq, tk, 4), probs(sq, sk, 4), LENGTHS)
    torch.testing.assert_close(A.attention_kl(sq, sk, tq, tk, 4, inputs["attention_mask"]), expected)


def test_a_student_learns_the_teachers_attention():
    teacher, student = tiny_bert(0, layers=2), tiny_bert(1, layers=1)
    inputs = {k: v.repeat(8, 1) for k, v in batch().items()}
    inputs["input_ids"] = torch.where(inputs["attention_mask"].bool(),
                                      torch.randint(1, 100, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(3)), 0)
    losses = [term("attention_kl", 0, 1), term("value_relation_kl", 0, 1)]
    result = distill(teacher, student, DistillData(inputs), DistillConfig(losses=losses, lr=1e-2, epochs=15, batch_size=8),
                     device="cpu", progress=False)
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    assert last < first / 5, (first, last)  # measured: 5.9 -> 0.42, about 14x lower


def test_unknown_or_unsuitable_modules_are_named():
    teacher, student = tiny_bert(0), tiny_bert(1)
    with pytest.raises(LayerSelectionError, match="student has no layer 'backbone.encoder.layer.9.attention.self'"):
        loss_of(teacher, student, term(student=9))
    bad = LossTerm(kind="attention_kl", layers={"backbone.encoder.layer.0.attention": SELF.format(1)})
    with pytest.raises(ConfigError, match=r"the student's 'backbone.encoder.layer.0.attention' has no query / key child "
                                          r"\(its children: self, output\).*set qkv"):
        loss_of(teacher, student, bad)


def test_config_refuses_attention_fields_elsewhere_and_the_teacher_cache():
    with pytest.raises(ValidationError, match="needs `layers`"):
        LossTerm(kind="attention_kl")
    with pytest.raises(ValidationError, match="relation_heads"):
        LossTerm(kind="output_mse", relation_heads=4)
    with pytest.raises(ValidationError, match="projection"):
        term(projection=True)
    with pytest.raises(ValidationError, match="cannot serve hidden_\\* or attention terms"):
        DistillConfig(losses=[term()], cache_teacher="memory")


def test_projection_names_are_configurable_distilbert():
    def tiny_distilbert(seed):
        torch.manual_seed(seed)
        cfg = DistilBertConfig(dim=32, n_layers=1, n_heads=4, hidden_dim=64, vocab_size=100, max_position_embeddings=32,
                               initializer_range=0.3, dropout=0.0, attention_dropout=0.0)
        cfg._attn_implementation = "sdpa"
        return DistilBertModel(cfg).eval()

    teacher = tiny_distilbert(0)
    name = "transformer.layer.0.attention"
    t = LossTerm(kind="attention_kl", layers={name: name}, qkv=("q_lin", "k_lin", "v_lin"))
    assert loss_of(teacher, tiny_distilbert(0), t).item() == pytest.approx(0.0, abs=1e-6)
    assert loss_of(teacher, tiny_distilbert(1), t).item() > 0.05
