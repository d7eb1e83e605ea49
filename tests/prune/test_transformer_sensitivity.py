"""Per-layer sensitivity of heads and FFN neurons, exact costs, and ratios for a budget."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import BertConfig, BertModel

from slimkit.errors import ConfigError
from slimkit.prune import heads, prune_
from slimkit.prune.heads import LayerStructure, TransformerPruneConfig, encoder_layers
from slimkit.prune.sensitivity import cost_of, ratios_for_budget
from slimkit.prune.transformer_sensitivity import (
    config_for_budget,
    transformer_costs,
    transformer_sensitivity,
)
from slimkit.report.sensitivity import sensitivity_plot

HIDDEN, HEADS, HEAD_SIZE, FFN, LAYERS = 32, 4, 8, 64, 3


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                     vocab_size=128, max_position_embeddings=32)
    return BertModel(cfg, add_pooling_layer=False).eval()


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def cosine_to(reference: BertModel):
    b = batch()
    with torch.no_grad():
        ref = reference(**b).last_hidden_state.mean(1)

    def evaluate(model) -> float:
        with torch.no_grad():
            out = model(**b).last_hidden_state.mean(1)
        return float(torch.nn.functional.cosine_similarity(out, ref).mean())
    return evaluate


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_sensitivity_prunes_one_group_at_a_time_and_leaves_the_model_whole():
    model = tiny_bert()
    before = n_params(model)
    sens = transformer_sensitivity(model, cosine_to(tiny_bert()), ratios=[0.25, 0.5, 0.75])
    assert n_params(model) == before
    assert sens["baseline"] == pytest.approx(1.0, abs=1e-6)
    assert list(sens["groups"]) == [f"layer{i}.{p}" for i in range(LAYERS) for p in ("heads", "ffn")]
    assert (sens["groups"]["layer1.heads"]["size"], sens["groups"]["layer1.heads"]["kept"]) == (HEADS, [3, 2, 1])
    assert sens["groups"]["layer2.ffn"]["kept"] == [48, 32, 16]
    for g in sens["groups"].values():
        assert all(m < 1.0 - 1e-6 for m in g["metric"])  # every cut changes the output
        assert g["metric"][-1] <= g["metric"][0] + 0.05  # and more cuts do not help much


def test_a_zeroed_head_costs_nothing():
    model = tiny_bert()
    layer = encoder_layers(model)[0]
    with torch.no_grad():  # head 2 of layer 0 contributes nothing to the output
        layer.attn_out.weight[:, 2 * HEAD_SIZE:3 * HEAD_SIZE] = 0
    sens = transformer_sensitivity(model, cosine_to(model), ratios=[0.25], layers=[0], parts=["heads"])
    assert sens["groups"] == {"layer0.heads": {"size": HEADS, "kept": [3], "metric": [pytest.approx(1.0, abs=1e-6)]}}


def test_costs_are_exact_for_any_structure():
    model = tiny_bert()
    params = transformer_costs(model, "params")
    assert params["total"] == n_params(model)
    kept = {"layer0.heads": 2, "layer0.ffn": 10, "layer2.heads": 1}
    pruned = tiny_bert()
    prune_(pruned, TransformerPruneConfig(kept={0: LayerStructure(heads=2, ffn=10), 2: LayerStructure(heads=1)}))
    assert cost_of(params, kept) == n_params(pruned)
    macs = transformer_costs(model, "macs", seq_len=16)
    per_layer = 16 * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN) + 2 * 16 * 16 * HIDDEN
    assert macs["total"] == LAYERS * per_layer
    assert cost_of(macs, {"layer1.heads": 0}) == macs["total"] - (16 * 4 * HIDDEN * HIDDEN + 2 * 16 * 16 * HIDDEN)


def test_ratios_for_a_budget_give_a_config_that_meets_it():
    model = tiny_bert()
    sens = transformer_sensitivity(model, cosine_to(tiny_bert()), ratios=[0.25, 0.5, 0.75])
    costs = transformer_costs(model, "macs", seq_len=16)
    choice = ratios_for_budget(sens, costs, 0.6)
    assert choice["cost"] <= 0.6 * costs["total"]
    config = config_for_budget(choice, importance="l2")
    pruned = tiny_bert()
    prune_(pruned, config)
    kept = {f"layer{i}.heads": x.num_heads for i, x in enumerate(encoder_layers(pruned))}
    kept |= {f"layer{i}.ffn": x.width for i, x in enumerate(encoder_layers(pruned))}
    assert kept == choice["kept"]
    assert cost_of(costs, kept) == choice["cost"]
    assert sensitivity_plot(sens).startswith("data:image/png;base64,")


def test_gradient_importance_needs_calibration():
    with pytest.raises(ConfigError, match="calibration"):
        transformer_sensitivity(tiny_bert(), lambda m: 1.0, importance="taylor")
    sens = transformer_sensitivity(tiny_bert(), cosine_to(tiny_bert()), ratios=[0.5], layers=[1], parts=["ffn"],
                                   importance="taylor", calibration=[batch()])
    assert sens["groups"]["layer1.ffn"]["kept"] == [32]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ratios": [1.0]}, r"ratios: 1.0 must be a fraction"),
    ({"layers": [3]}, r"layers: 3 does not exist; the model has layers 0..2"),
    ({"parts": ["mlp"]}, r"parts: 'mlp' is not known"),
    ({"importance": "random"}, r"importance: 'random' is not known"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        transformer_sensitivity(tiny_bert(), lambda m: 1.0, **kwargs)


def test_prune_to_a_budget_chooses_per_layer_amounts_from_the_sensitivity():
    model = tiny_bert()
    costs = transformer_costs(model)
    cfg = TransformerPruneConfig(budget={"keep": 0.8, "ratios": [0.25, 0.5, 0.75], "batches": 1})
    result = prune_(model, cfg, calibration=[batch()])
    # The model keeps at most 80% of its parameters, exactly what the choice predicted.
    assert n_params(model) <= 0.8 * costs["total"]
    assert n_params(model) == result.analysis["choice"]["cost"]
    kept = result.config.kept
    layers = encoder_layers(model)
    for i, x in enumerate(layers):
        s = kept.get(i)
        assert x.num_heads == (len(s.heads) if s and s.heads is not None else HEADS)
        assert x.width == (s.ffn if s and s.ffn is not None else FFN)
    sens = result.analysis["sensitivity"]
    assert sens["baseline"] == pytest.approx(1.0, abs=1e-6) and len(sens["groups"]) == 2 * LAYERS
    assert sensitivity_plot(sens).startswith("data:image/png;base64,")
    # Saved, the config replays the chosen structure without analysing again.
    again = tiny_bert()
    prune_(again, result.config.replay_on(result.layers))
    assert [(x.num_heads, x.width) for x in encoder_layers(again)] == [(x.num_heads, x.width) for x in layers]


def test_a_budget_with_a_gradient_importance_scores_once_and_keeps_the_best(monkeypatch):
    # Counted wherever it is called from (slimkit.prune exports a function named like the
    # sensitivity module, hence sys.modules).
    calls = []
    real = heads.gradient_scores
    for module in (heads, sys.modules[transformer_sensitivity.__module__]):
        monkeypatch.setattr(module, "gradient_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_bert()
    cfg = TransformerPruneConfig(budget={"keep": 0.8, "ratios": [0.25, 0.5, 0.75], "batches": 1}, importance="taylor")
    result = prune_(model, cfg, calibration=[batch()])
    assert len(calls) == 1  # one backward pass per calibration batch, not one for the analysis and another to prune
    # The heads kept are the best-ranked of each layer: the same as asking for their counts.
    counts = {i: LayerStructure(heads=len(s.heads) if s.heads is not None else None, ffn=s.ffn)
              for i, s in result.config.kept.items()}
    again = tiny_bert()
    replay = prune_(again, TransformerPruneConfig(kept=counts, importance="taylor"), calibration=[batch()])
    assert replay.config.kept == result.config.kept
    torch.testing.assert_close(again(**batch()).last_hidden_state, model(**batch()).last_hidden_state, rtol=0, atol=0)


def test_a_budget_needs_calibration_and_excludes_fractions():
    with pytest.raises(ConfigError, match="a pruning budget needs calibration data"):
        prune_(tiny_bert(), TransformerPruneConfig(budget={"keep": 0.8}))
    with pytest.raises(ValueError, match="give a budget .* or the fractions heads/ffn, not both"):
        TransformerPruneConfig(heads=0.5, budget={"keep": 0.8})
    with pytest.raises(ValueError, match=r"\[1.5\]: each ratio is a fraction of a group removed"):
        TransformerPruneConfig(budget={"keep": 0.8, "ratios": [0.5, 1.5]})
