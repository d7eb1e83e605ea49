"""Shallow transformer students and text data, on a tiny random BERT and on real MiniLM."""

import pytest
import torch
from transformers import BertConfig, BertModel

from slimkit import serialize
from slimkit.distill import DistillConfig, DistillData, LossTerm, distill
from slimkit.distill.students import narrow_cnn, shallow_transformer
from slimkit.distill.text import read_text_file, text_data
from slimkit.errors import ConfigError, DataError
from slimkit.prune import channel_groups, channel_importance
from slimkit.zoo.mobilenet import ConvBNReLU6, InvertedResidual, MobileNetV2
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


# -- narrower CNN students ---------------------------------------------------------------

class TinyCNN(torch.nn.Module):
    """Stem, a MobileNetV2 inverted residual (8 -> 16 -> 8), a strided conv, a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBNReLU6(1, 8)
        self.block = InvertedResidual(8, 8, stride=1, expansion=2)
        self.conv2 = ConvBNReLU6(8, 12, stride=2)
        self.fc = torch.nn.Linear(12, 10)

    def forward(self, x):
        x = self.conv2(self.block(self.stem(x)))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def tiny_cnn():
    torch.manual_seed(0)
    model = TinyCNN()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking batch-norm statistics, so that slicing them matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def images(n=2, seed=2):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_narrow_cnn_at_full_width_is_the_teacher():
    teacher, x = tiny_cnn(), images()
    student = narrow_cnn(teacher, 1.0, x)
    assert student is not teacher and n_params(student) == n_params(teacher) == 1586
    with torch.no_grad():
        torch.testing.assert_close(student(x), teacher(x), rtol=0, atol=0)


def test_narrow_cnn_halves_every_prunable_group_from_the_most_important_channels():
    teacher, x = tiny_cnn(), images()
    student = narrow_cnn(teacher, 0.5, x)
    before = channel_groups(teacher, x)
    after = channel_groups(student, x)
    assert [(g.size, g.prunable) for g in before] == [(1, False), (8, True), (16, True), (12, True), (10, False)]
    assert [g.size for g in after] == [1, 4, 8, 6, 10], "input channels and classes are kept"
    # stem 1->4 + bn, expand 4->8 + bn, depthwise 8 + bn, project 8->4 + bn, conv2 4->6 + bn, fc 6->10
    assert n_params(student) == 36 + 8 + 32 + 16 + 72 + 16 + 32 + 8 + 216 + 12 + 70 == 518
    hidden = before[2]
    top = channel_importance(teacher, hidden).argsort(descending=True)[:8].sort().values
    torch.testing.assert_close(student.block.conv[1][0].weight, teacher.block.conv[1][0].weight[top], rtol=0, atol=0)
    assert student.block.conv[1][0].groups == 8
    assert student(x).shape == (2, 10) and teacher.stem[0].out_channels == 8, "the teacher is untouched"


def test_narrow_cnn_rounds_halves_up_and_keeps_one_channel():
    teacher, x = tiny_cnn(), images()
    sizes = [g.size for g in channel_groups(narrow_cnn(teacher, 0.3, x), x)]
    assert sizes == [1, 2, 5, 4, 10]  # 2.4 -> 2, 4.8 -> 5, 3.6 -> 4
    sizes = [g.size for g in channel_groups(narrow_cnn(teacher, 0.01, x), x)]
    assert sizes == [1, 1, 1, 1, 1, 10]  # a one-channel depthwise conv is an ordinary conv: its in and out split


def test_narrow_cnn_refuses_bad_arguments_all_at_once():
    with pytest.raises(ConfigError) as err:
        narrow_cnn(tiny_cnn(), 1.5, images(), importance="taylor")
    assert len(err.value.problems) == 2
    assert "width: 1.5 must be a fraction" in err.value.problems[0]
    assert "importance: 'taylor' is not known; choose one of l1, l2" in err.value.problems[1]


def test_narrow_mobilenet_v2_runs(one_thread):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    student = narrow_cnn(MobileNetV2(num_classes=10).eval(), 0.5, x)
    assert n_params(student) == 587_178 and student(x).shape == (1, 10)


def test_narrow_cnn_student_learns_from_its_teacher_with_a_projected_feature_map(one_thread):
    teacher, x = tiny_cnn(), images(64, seed=3)
    student = narrow_cnn(teacher, 0.5, x[:2])
    cfg = DistillConfig(losses=[LossTerm(kind="soft_kl", temperature=2.0),
                                LossTerm(kind="hidden_mse", layers={"conv2": "conv2"}, projection=True)],
                        lr=1e-2, epochs=15, batch_size=16, seed=0)
    result = distill(teacher, student, DistillData({"x": x}), cfg, device="cpu", progress=False)
    assert result.steps == 60
    # Measured: the loss falls about 10x (0.167 -> 0.017, mean of the first and last four
    # steps), almost all of it the hidden term as the 1x1 projection is learned.
    first, last = result.history[:4], result.history[-4:]
    for key in ("loss", "1:hidden_mse"):
        before, after = sum(h[key] for h in first) / 4, sum(h[key] for h in last) / 4
        assert after < 0.2 * before, (key, before, after)
    # The student's conv2 has 6 channels, the teacher's 12: without the projection the
    # term cannot be computed.
    plain = DistillConfig(losses=[LossTerm(kind="hidden_mse", layers={"conv2": "conv2"})], max_steps=1)
    with pytest.raises(ConfigError, match=r"\(2, 6, 4, 4\) but teacher layer 'conv2' gives \(2, 12, 4, 4\); set projection: true"):
        distill(teacher, student, DistillData({"x": x}), plain, device="cpu", progress=False)
