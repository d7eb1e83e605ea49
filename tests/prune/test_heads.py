"""Removing attention heads and FFN neurons from BERT-like encoders."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from pydantic import ValidationError
from tiny_models import mlp
from torch import nn
from transformers import BertConfig, BertModel

import slimkit
from slimkit.deploy.export import ExportConfig, export
from slimkit.errors import ConfigError
from slimkit.prune import LayerStructure, Pruned, TransformerPruneConfig, prune_
from slimkit.prune.heads import choose, encoder_layers, gradient_scores, magnitude_scores
from slimkit.quantize import DynamicInt8Config
from slimkit.quantize.api import transforms_of
from slimkit.recipe import Recipe
from slimkit.runner import StageContext, apply_stages
from slimkit.serialize import load, save
from slimkit.zoo.models import LoadedModel, TextEncoder

HIDDEN, HEADS, HEAD_SIZE, FFN = 32, 4, 8, 64
# One head: its Q, K and V rows with biases, and its output-projection columns.
PARAMS_PER_HEAD = 3 * (HIDDEN * HEAD_SIZE + HEAD_SIZE) + HIDDEN * HEAD_SIZE  # 1048
# One FFN neuron: its intermediate row and bias, and its output column.
PARAMS_PER_NEURON = HIDDEN + 1 + HIDDEN  # 65
# Different head counts and widths in every layer.
KEPT = {
    0: LayerStructure(heads=[0, 2], ffn=list(range(0, 64, 2))),
    1: LayerStructure(heads=[1, 2, 3], ffn=[5, 9, 40]),
    2: LayerStructure(heads=[3], ffn=None),
}


def tiny_bert(layers: int = 3, attn: str = "sdpa") -> LoadedModel:
    """A seeded 3-layer BERT whose attention is peaked, so that a head counted or sliced
    wrongly changes the output visibly (random init gives near-uniform attention)."""
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS, intermediate_size=FFN,
                     vocab_size=1024, max_position_embeddings=64)  # export traces with token id 1000
    cfg._attn_implementation = attn
    module = TextEncoder(BertModel(cfg).eval()).eval()
    with torch.no_grad():
        for layer in module.backbone.encoder.layer:
            layer.attention.self.query.weight.mul_(20)
            layer.attention.self.key.weight.mul_(20)
    spec = {"kind": "hf", "source": "test", "hf_config": cfg.to_dict(), "pooling": "mean"}
    ids = torch.tensor([[1] * 8])
    return LoadedModel(module, spec, None, 64, (ids, torch.ones_like(ids)))


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 100, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def calibration(n: int = 6) -> list[dict[str, np.ndarray]]:
    """Single sentences of numpy arrays, as the recipe runner passes them."""
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        ids = torch.randint(0, 100, (1, 6 + i), generator=g).numpy()
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
    return out


def run(module: nn.Module, b: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    with torch.no_grad():
        return module(**(b or batch()))


def masked(module: nn.Module, kept: dict[int, LayerStructure]) -> list:
    """Hooks that zero, in ``module``, every head's output and FFN activation not in ``kept``."""
    hooks = []
    for i, s in kept.items():
        layer = module.backbone.encoder.layer[i]
        if s.heads is not None:
            mask = torch.zeros(HEADS)
            mask[s.heads] = 1
            mask = mask.repeat_interleave(HEAD_SIZE)
            hooks.append(layer.attention.output.dense.register_forward_pre_hook(lambda m, a, k=mask: (a[0] * k,)))
        if s.ffn is not None:
            mask = torch.zeros(FFN)
            mask[s.ffn] = 1
            hooks.append(layer.output.dense.register_forward_pre_hook(lambda m, a, k=mask: (a[0] * k,)))
    return hooks


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def head_counts(module: nn.Module) -> list[int]:
    return [x.num_heads for x in encoder_layers(module)]


def widths(module: nn.Module) -> list[int]:
    return [x.width for x in encoder_layers(module)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_removing_heads_and_neurons_equals_masking_them(attn):
    model = tiny_bert(attn=attn)
    reference = copy.deepcopy(model.module)
    hooks = masked(reference, KEPT)
    expected = run(reference)
    result = prune_(model.module, TransformerPruneConfig(kept=KEPT))
    assert head_counts(model.module) == [2, 3, 1] and widths(model.module) == [32, 3, 64]
    assert result.layers == [f"backbone.encoder.layer.{i}" for i in range(3)]
    torch.testing.assert_close(run(model.module), expected, rtol=0, atol=2e-6)
    # Masking really changes the output: the comparison is not trivially true.
    for h in hooks:
        h.remove()
    assert (run(reference) - expected).abs().max() > 1e-2


def test_the_attention_modules_report_their_new_head_counts():
    model = tiny_bert()
    prune_(model.module, TransformerPruneConfig(kept=KEPT))
    for layer, n in zip(model.module.backbone.encoder.layer, [2, 3, 1], strict=True):
        assert layer.attention.self.num_attention_heads == n
        assert layer.attention.self.all_head_size == n * HEAD_SIZE
        assert layer.attention.self.query.out_features == n * HEAD_SIZE
        assert layer.attention.output.dense.in_features == n * HEAD_SIZE


def test_pruned_model_runs_under_sdpa_and_eager_alike():
    model = tiny_bert()
    prune_(model.module, TransformerPruneConfig(kept=KEPT))
    sdpa = run(model.module)
    model.module.backbone.set_attn_implementation("eager")
    torch.testing.assert_close(run(model.module), sdpa, rtol=0, atol=2e-6)


def test_exact_parameter_counts():
    model = tiny_bert()
    before = n_params(model.module)
    prune_(model.module, TransformerPruneConfig(heads=0.5, ffn=0.25))
    # Per layer: 2 of 4 heads and 16 of 64 neurons.
    assert head_counts(model.module) == [2, 2, 2] and widths(model.module) == [48, 48, 48]
    assert before - n_params(model.module) == 3 * (2 * PARAMS_PER_HEAD + 16 * PARAMS_PER_NEURON) == 9408


def test_explicit_structure_removes_exactly_what_it_says():
    model = tiny_bert()
    before = n_params(model.module)
    prune_(model.module, TransformerPruneConfig(kept=KEPT))
    heads_removed, neurons_removed = 2 + 1 + 3, 32 + 61
    assert before - n_params(model.module) == heads_removed * PARAMS_PER_HEAD + neurons_removed * PARAMS_PER_NEURON == 12333


def test_recorded_config_carries_the_kept_structure():
    model = tiny_bert()
    result = prune_(model.module, TransformerPruneConfig(kept=KEPT, heads=0.2))
    assert isinstance(result, Pruned)
    (record,) = model.module._slimkit_transforms
    assert record["layers"] == result.layers
    kept = record["config"]["kept"]
    # Head indices are recorded; neurons by their number.
    assert kept == {"0": {"heads": [0, 2], "ffn": 32}, "1": {"heads": [1, 2, 3], "ffn": 3}, "2": {"heads": [3], "ffn": None}}
    assert record["config"]["heads"] == 0.2


def test_a_config_that_removes_nothing_changes_and_records_no_layer():
    model = tiny_bert()
    before = run(model.module)
    result = prune_(model.module, TransformerPruneConfig())
    assert result.layers == [] and result.config.kept == {}
    torch.testing.assert_close(run(model.module), before, rtol=0, atol=0)


def test_save_and_load_are_bit_exact_and_replay_without_calibration(tmp_path):
    model = tiny_bert()
    prune_(model.module, TransformerPruneConfig(heads=0.5, ffn=0.5, importance="taylor", scope="global"),
           calibration=calibration())
    # A second pruning on top of the first: both transforms replay in order.
    prune_(model.module, TransformerPruneConfig(kept={1: LayerStructure(ffn=10)}))
    counts, sizes = head_counts(model.module), widths(model.module)
    save(model, tmp_path)
    meta = json.loads((tmp_path / "slimkit.json").read_text())
    assert [t["config"]["method"] for t in meta["transforms"]] == ["transformer_structured"] * 2
    back = load(tmp_path)
    assert head_counts(back.module) == counts and widths(back.module) == sizes and sizes[1] == 10
    original, loaded = model.module.state_dict(), back.module.state_dict()
    assert original.keys() == loaded.keys()
    for k in original:
        assert torch.equal(original[k], loaded[k]), k
    assert torch.equal(run(back.module), run(model.module))


def test_replay_is_structural():
    config = TransformerPruneConfig(heads=0.5, importance="michel",
                                    kept={0: LayerStructure(heads=[1, 3], ffn=5), 2: LayerStructure(heads=2)})
    replay = config.replay_on(["backbone.encoder.layer.0", "backbone.encoder.layer.2"])
    assert replay.kept == {0: LayerStructure(heads=[1, 3], ffn=[0, 1, 2, 3, 4]), 2: LayerStructure(heads=[0, 1])}
    model = tiny_bert()
    prune_(model.module, replay)  # michel without calibration: nothing is scored
    assert head_counts(model.module) == [2, 4, 2] and widths(model.module) == [5, 64, 64]


# ONNX Runtime's optimizer gives every fused Attention node the model-wide head count.


@pytest.mark.parametrize("optimize", ["none", "auto"])
def test_exported_pruned_model_matches_pytorch_under_onnx_runtime(tmp_path, optimize):
    model = tiny_bert()
    prune_(model.module, TransformerPruneConfig(kept=KEPT))
    onnx_model = export(model, ExportConfig(optimize=optimize), workdir=tmp_path)
    session = ort.InferenceSession(str(onnx_model.path), providers=["CPUExecutionProvider"])
    b = batch()
    (out,) = session.run(None, {k: v.numpy() for k, v in b.items()})
    torch.testing.assert_close(torch.from_numpy(out), run(model.module, b), rtol=0, atol=1e-5)
    assert head_counts(model.module) == [2, 3, 1], "export leaves the model as it was"
    if optimize == "auto":  # attention fused per layer; residual adds kept apart from their layer norms
        ops = [n.op_type for n in onnx.load(str(onnx_model.path)).graph.node]
        assert ops.count("Attention") == 3 and ops.count("LayerNormalization") == 6
        assert "SkipLayerNormalization" not in ops


def test_per_layer_and_global_scope_choose_differently():
    scores = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([0.1, 0.1, 1.0, 1.0])]
    assert choose(scores, 0.25, "per_layer", 1, True) == [[1, 2, 3], [1, 2, 3]]
    # Globally, the two weak heads of the second layer go, whatever their layer.
    assert choose(scores, 0.25, "global", 1, True) == [[0, 1, 2, 3], [2, 3]]
    # Without normalizing, a layer with larger scores keeps everything.
    loud = [torch.tensor([10.0, 10.0, 10.0, 10.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])]
    assert choose(loud, 0.25, "global", 1, False) == [[0, 1, 2, 3], [2, 3]]
    assert choose(loud, 0.375, "global", 1, False) == [[0, 1, 2, 3], [3]]
    # Normalized by each layer's L2 norm the scores are 0.5 x 4 and 0.18, 0.37, 0.55, 0.73.
    assert choose(loud, 0.375, "global", 1, True) == [[1, 2, 3], [2, 3]]
    # Per-layer fractions; layers not named keep all.
    assert choose(scores, {1: 0.5}, "per_layer", 1, True) == [[0, 1, 2, 3], [2, 3]]


def test_global_scope_on_a_model_removes_the_global_fraction():
    model = tiny_bert()
    with torch.no_grad():  # layer 1's heads are much weaker than the others
        for name in ("query", "key", "value"):
            getattr(model.module.backbone.encoder.layer[1].attention.self, name).weight.mul_(0.01)
        model.module.backbone.encoder.layer[1].attention.output.dense.weight.mul_(0.01)
    per_layer = copy.deepcopy(model.module)
    prune_(per_layer, TransformerPruneConfig(heads=0.25))
    assert head_counts(per_layer) == [3, 3, 3]
    prune_(model.module, TransformerPruneConfig(heads=0.25, scope="global", normalize=False))
    assert head_counts(model.module) == [4, 1, 4]


def zeroed_model() -> LoadedModel:
    """Head 1 of layer 0 and FFN neuron 5 of layer 1 have all-zero weights."""
    model = tiny_bert()
    d = HEAD_SIZE
    with torch.no_grad():
        attn = model.module.backbone.encoder.layer[0].attention
        for lin in (attn.self.query, attn.self.key, attn.self.value):
            lin.weight[d:2 * d] = 0
            lin.bias[d:2 * d] = 0
        attn.output.dense.weight[:, d:2 * d] = 0
        layer = model.module.backbone.encoder.layer[1]
        layer.intermediate.dense.weight[5] = 0
        layer.intermediate.dense.bias[5] = 0
        layer.output.dense.weight[:, 5] = 0
    return model


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor", "michel"])
def test_each_importance_ranks_a_zeroed_head_and_neuron_last(importance):
    model = zeroed_model()
    layers = encoder_layers(model.module)
    if importance in ("l1", "l2"):
        heads, neurons = magnitude_scores(layers, importance)
    else:
        batches = [{k: torch.from_numpy(v) for k, v in b.items()} for b in calibration()]
        heads, neurons = gradient_scores(model.module, layers, importance, batches)
    assert heads[0][1] == 0 and heads[0].argmin() == 1
    assert sorted(heads[0].tolist())[1] > 0
    assert neurons[1][5] == 0 and neurons[1].argmin() == 5
    assert sorted(neurons[1].tolist())[1] > 0
    # End to end: keeping 3 heads and 63 neurons drops exactly the zeroed ones.
    result = prune_(model.module, TransformerPruneConfig(importance=importance, kept={0: LayerStructure(heads=3), 1: LayerStructure(ffn=63)}),
                    calibration=calibration())
    assert result.config.kept[0].heads == [0, 2, 3]
    assert not (model.module.backbone.encoder.layer[1].intermediate.dense.weight == 0).all(1).any()


def test_gradient_scoring_leaves_the_model_as_it_was():
    model = tiny_bert()
    model.module.backbone.encoder.layer[0].output.dense.weight.requires_grad_(False)
    model.module.train()
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    flags = [p.requires_grad for p in model.module.parameters()]
    batches = [{k: torch.from_numpy(v) for k, v in b.items()} for b in calibration(2)]
    for importance in ("taylor", "michel"):
        gradient_scores(model.module, encoder_layers(model.module), importance, batches)
    assert model.module.training
    assert [p.requires_grad for p in model.module.parameters()] == flags
    assert all(p.grad is None for p in model.module.parameters())
    assert all(torch.equal(state[k], v) for k, v in model.module.state_dict().items())
    assert not model.module.backbone.encoder.layer[0].attention.output.dense._forward_pre_hooks


def test_gradient_scoring_gives_each_module_its_own_mode_back():
    model = tiny_bert()
    model.module.train()
    model.module.backbone.embeddings.eval()  # frozen inside a training model
    before = [m.training for m in model.module.modules()]
    assert before.count(False) == 6  # the embeddings module and its five children
    batches = [{k: torch.from_numpy(v) for k, v in b.items()} for b in calibration(2)]
    gradient_scores(model.module, encoder_layers(model.module), "taylor", batches)
    assert [m.training for m in model.module.modules()] == before


def test_gradient_scores_are_seeded_and_not_zero():
    batches = [{k: torch.from_numpy(v) for k, v in b.items()} for b in calibration(3)]
    model = tiny_bert()
    layers = encoder_layers(model.module)
    first, _ = gradient_scores(model.module, layers, "michel", batches, seed=1)
    again, _ = gradient_scores(model.module, layers, "michel", batches, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # The nudge is what makes them informative: an unnudged cosine distance has zero gradient.
    assert min(float(s.min()) for s in first) > 0


def test_a_user_loss_replaces_the_label_free_one():
    calls = []

    def loss_fn(module, b):
        calls.append(b["input_ids"].shape)
        return module(**b)[:, 0].sum()

    model = tiny_bert()
    prune_(model.module, TransformerPruneConfig(heads=0.5, importance="taylor", calibration_batches=4),
           calibration=calibration(6), loss_fn=loss_fn)
    assert [s[1] for s in calls] == [6, 7, 8, 9], "the first calibration_batches batches, as tensors"
    assert head_counts(model.module) == [2, 2, 2]


def test_min_heads_per_layer_is_respected():
    model = tiny_bert()
    prune_(model.module, TransformerPruneConfig(heads=0.9, ffn=0.99, min_heads_per_layer=2))
    assert head_counts(model.module) == [2, 2, 2] and widths(model.module) == [1, 1, 1]
    model = tiny_bert()
    prune_(model.module, TransformerPruneConfig(heads=0.9, scope="global", min_heads_per_layer=3))
    assert head_counts(model.module) == [3, 3, 3]
    model = tiny_bert()
    prune_(model.module, TransformerPruneConfig(heads=0.5, min_heads_per_layer=8))
    assert head_counts(model.module) == [4, 4, 4], "a layer with fewer heads than the minimum keeps them all"


@pytest.mark.parametrize("fields, message", [
    ({"heads": 1.0}, "would remove every head"),
    ({"ffn": {0: 1.5}}, "layer 0: 1.5 is not a fraction"),
    ({"heads": -0.1}, "not a fraction"),
    ({"heads": {-1: 0.5}}, "layer indices start at 0"),
    ({"heads": {0: 0.5}, "scope": "global"}, "scope 'global' takes one fraction"),
    ({"min_heads_per_layer": 0}, "greater than or equal to 1"),
    ({"importance": "fisher"}, "'l1', 'l2', 'taylor' or 'michel'"),
    ({"kept": {0: {"heads": []}}}, "at least one head"),
    ({"kept": {0: {"ffn": 0}}}, "at least one FFN neuron"),
    ({"kept": {0: {"heads": [1, 1]}}}, "distinct"),
    ({"kept": {-1: {"heads": 1}, 0: {"ffn": 3}, -3: {"ffn": 2}}}, "layer indices start at 0; got -3, -1"),
    ({"amount": 0.5}, "Extra inputs"),
])
def test_bad_configs_are_refused(fields, message):
    with pytest.raises(ValidationError, match=message):
        TransformerPruneConfig(**fields)


def test_bad_configs_in_a_recipe_are_all_reported():
    with pytest.raises(ConfigError) as info:
        Recipe.from_dict({"name": "p", "model": "minilm-l6", "stages": [
            {"prune": {"method": "transformer_structured", "heads": 1.0}},
            {"prune": {"method": "transformer_structured", "ffn": {"0": 0.5}, "scope": "global"}},
        ]})
    assert len(info.value.problems) == 2
    assert info.value.problems[0].startswith("stages[0].prune.heads: ")


@pytest.mark.parametrize("config, message", [
    (TransformerPruneConfig(heads={3: 0.5, 7: 0.5}), r"heads: layer\(s\) \[3, 7\] do not exist; the model has layers 0..2"),
    (TransformerPruneConfig(kept={0: LayerStructure(heads=[4])}), "kept.0.heads: index 4 is out of range; layer 0 has 4"),
    (TransformerPruneConfig(kept={3: LayerStructure(heads=1)}), r"1 problem\(s\) found:\n  - kept: layer\(s\) \[3\] do not exist"),
    (TransformerPruneConfig(kept={1: LayerStructure(ffn=65)}), "kept.1.ffn: 65 is more than the 64"),
    (TransformerPruneConfig(heads=0.5, importance="taylor"), "needs calibration data: pass calibration="),
])
def test_configs_that_do_not_fit_the_model(config, message):
    model = tiny_bert()
    with pytest.raises(ConfigError, match=message):
        prune_(model.module, config)
    assert head_counts(model.module) == [4, 4, 4], "nothing changed"


def test_empty_calibration_is_an_error():
    with pytest.raises(ConfigError, match="calibration iterable is empty"):
        prune_(tiny_bert().module, TransformerPruneConfig(heads=0.5, importance="michel"), calibration=[])


def test_a_model_without_a_bert_encoder_is_named_in_the_error():
    module, _ = mlp()
    with pytest.raises(ConfigError, match=r"ModuleList named `encoder.layer`.*Sequential has 0 \(found: none; its top-level modules: 0, 1, 2\)"):
        prune_(module, TransformerPruneConfig(heads=0.5))


def test_a_layer_missing_a_projection_is_named_in_the_error():
    model = tiny_bert()
    layers = model.module.backbone.encoder.layer
    layers[1].intermediate.dense = nn.Identity()
    del layers[2].attention.self.key
    with pytest.raises(ConfigError) as info:
        prune_(model.module, TransformerPruneConfig(heads=0.5))
    assert info.value.problems == [
        "backbone.encoder.layer.1.intermediate.dense: is a Identity, not an nn.Linear; prune before quantizing",
        "backbone.encoder.layer.2.attention.self.key: missing; the layer has attention, intermediate, output",
    ]


def test_pruning_a_quantized_model_says_to_prune_first():
    model = tiny_bert()
    slimkit.quantize_(model.module, DynamicInt8Config())
    with pytest.raises(ConfigError, match="not an nn.Linear; prune before quantizing"):
        prune_(model.module, TransformerPruneConfig(heads=0.5))


def test_prune_refuses_a_config_of_another_kind():
    with pytest.raises(ConfigError, match="prune_ takes a prune config, not DynamicInt8Config"):
        slimkit.prune_(tiny_bert().module, DynamicInt8Config())


def test_a_bare_bert_model_is_pruned_too():
    model = tiny_bert()
    backbone = model.module.backbone
    b = batch()
    prune_(backbone, TransformerPruneConfig(heads=0.5, importance="michel"), calibration=[b])
    assert [x.name for x in encoder_layers(backbone)] == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    assert head_counts(backbone) == [2, 2, 2]


def test_the_recipe_stage_prunes_with_calibration_and_reports_the_pruned_architecture(tmp_path):
    model = tiny_bert()
    before = n_params(model.module)
    configs = [TransformerPruneConfig(heads=0.5, ffn=0.5, importance="taylor"), DynamicInt8Config()]
    built, architecture = apply_stages(model, configs, tmp_path, StageContext(examples=calibration()))
    assert n_params(model.module) == before, "the recipe's model is untouched"
    assert head_counts(architecture.module) == [2, 2, 2] and widths(architecture.module) == [32, 32, 32]
    assert [t["config"]["method"] for t in transforms_of(built.module)] == ["transformer_structured", "dynamic_int8"]


@pytest.mark.integration
@pytest.mark.parametrize("optimize", ["none", "auto"])
def test_minilm_pruned_by_half_saves_loads_and_exports(tmp_path, optimize):
    from slimkit.zoo.models import load_model

    model = load_model("minilm-l6")
    texts = ["a gripping, beautifully shot film", "the plot never recovers from its slow start",
             "an actor at the top of his game", "dull"]
    feeds = [{k: v for k, v in model.tokenizer(t, return_tensors="np").items()} for t in texts]
    params = n_params(model.module)
    prune_(model.module, TransformerPruneConfig(heads=0.5, ffn=0.5, importance="taylor"), calibration=feeds)
    assert head_counts(model.module) == [6] * 6 and widths(model.module) == [768] * 6
    # 6 layers x (6 heads of size 32 x (4 x 384 weights + 3 biases) + 768 neurons x (2 x 384 + 1))
    assert params - n_params(model.module) == 6 * (6 * 32 * (4 * 384 + 3) + 768 * 769) == 5316480
    save(model, tmp_path / "saved")
    back = load(tmp_path / "saved")
    enc = model.tokenizer(texts, padding=True, return_tensors="pt")
    b = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "token_type_ids": torch.zeros_like(enc["input_ids"])}
    expected = run(model.module, b)
    assert torch.equal(run(back.module, b), expected)
    onnx_model = export(back, ExportConfig(optimize=optimize), workdir=tmp_path / "onnx")
    session = ort.InferenceSession(str(onnx_model.path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {k: v.numpy() for k, v in b.items()})
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=0, atol=1e-4)
