"""Shallow transformer students and text data, on a tiny random BERT and on real MiniLM."""

import pytest
import torch
from transformers import BertConfig, BertModel

from slimkit import serialize
from slimkit.distill import DistillConfig, LossTerm, distill
from slimkit.distill.students import shallow_transformer
from slimkit.distill.text import read_text_file, text_data
from slimkit.errors import ConfigError, DataError
from slimkit.zoo.models import LoadedModel, TextEncoder


def tiny_bert(layers=4):
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    module = TextEncoder(BertModel(cfg).eval()).eval()
    spec = {"kind": "hf", "source": "test", "hf_config": cfg.to_dict(), "pooling": "mean"}
    return LoadedModel(module, spec, None, 64)


def test_student_keeps_the_chosen_layers_with_their_weights():
    teacher = tiny_bert()
    student = shallow_transformer(teacher, [0, 2])
    layers = student.module.backbone.encoder.layer
    assert len(layers) == 2 and student.spec["hf_config"]["num_hidden_layers"] == 2
    for new, old in ((0, 0), (1, 2)):
        torch.testing.assert_close(layers[new].output.dense.weight, teacher.module.backbone.encoder.layer[old].output.dense.weight)
        assert layers[new].attention.self.layer_idx == new
    assert len(teacher.module.backbone.encoder.layer) == 4, "the teacher is untouched"
    n_params = sum(p.numel() for p in student.module.parameters())
    per_layer = sum(p.numel() for p in teacher.module.backbone.encoder.layer[0].parameters())
    assert n_params == sum(p.numel() for p in teacher.module.parameters()) - 2 * per_layer


def test_student_with_all_layers_equals_the_teacher():
    teacher = tiny_bert()
    student = shallow_transformer(teacher, [0, 1, 2, 3])
    ids = torch.randint(0, 100, (2, 9))
    torch.testing.assert_close(student.module(ids, torch.ones_like(ids)), teacher.module(ids, torch.ones_like(ids)))


@pytest.mark.parametrize("layers", [[], [4], [1, 1], [-1]])
def test_bad_layer_indices(layers):
    with pytest.raises(ConfigError, match="distinct indices between 0 and 3"):
        shallow_transformer(tiny_bert(), layers)


def test_empty_text_is_refused(tmp_path):
    with pytest.raises(DataError, match="no text"):
        text_data(None, ["", "  "])
    with pytest.raises(DataError, match="no such text file"):
        read_text_file(tmp_path / "absent.txt")
    (tmp_path / "t.txt").write_text("one\n\n two \n")
    assert read_text_file(tmp_path / "t.txt") == ["one", "two"]


@pytest.mark.integration
def test_one_layer_minilm_student_learns_on_real_text(tmp_path):
    from slimkit.zoo.models import load_model
    from slimkit.zoo.tasks import load_task

    teacher = load_model("minilm-l6")
    student = shallow_transformer(teacher, [5])
    texts = load_task("rt-polarity").train_texts[:64]
    data = text_data(teacher.tokenizer, texts, max_len=64)
    cfg = DistillConfig(losses=[LossTerm(kind="output_cosine"),
                                LossTerm(kind="hidden_mse", weight=0.1, layers={"backbone.encoder.layer.0": "backbone.encoder.layer.5"})],
                        lr=5e-4, epochs=3, batch_size=16, seed=0)
    result = distill(teacher.module, student.module, data, cfg, device="cpu", progress=False)
    first = sum(h["loss"] for h in result.history[:4]) / 4
    last = sum(h["loss"] for h in result.history[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    serialize.save(student, tmp_path / "student")
    again = serialize.load(tmp_path / "student")
    batch = data.batch(torch.arange(4), torch.device("cpu"))[0]
    torch.testing.assert_close(again.module(**batch), student.module(**batch), rtol=0, atol=0)
