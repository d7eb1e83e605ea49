"""The advisor's arithmetic, term by term, and its choice."""

from __future__ import annotations

import pytest

from slimkit.parallel import selfcheck as S
from slimkit.parallel.advisor import ModelFootprint, advise, render
from slimkit.parallel.footprint import measure_footprint

GB = 1e9
TOY = ModelFootprint(parameters=1_000_000, largest_unit=100_000, split=600_000, heads=(8, 8),
                     activations_per_example=2_000_000, checkpointed_per_example=500_000, split_activation_share=0.5)


def by_label(advice):
    return {e.label: e for e in advice.estimates}


def test_each_strategy_adds_its_terms():
    e = by_label(advise(TOY, devices=4, device_memory=1 * GB, batch=16))
    # 4 examples per device under data parallel, 16 under tensor parallel.
    assert e["ddp"].terms == {"parameters+gradients": 8e6, "optimizer_state": 8e6, "activations": 8e6}
    assert e["ddp+zero1"].terms["optimizer_state"] == 2e6
    assert e["fsdp"].terms == {"sharded_state": 4e6, "gathered": 12 * 100_000, "activations": 8e6}
    # tp over 4: the split 600k parameters / 4 plus the 400k others, at 16 B; half the
    # activations are divided by 4.
    assert e["tp"].terms == {"state": 16 * (150_000 + 400_000), "activations": 2e6 * 16 * (1 - 0.5 * 0.75)}
    # fsdp+tp: tp 2 inside, 2 data-parallel groups of 8 examples each.
    assert e["fsdp+tp"].tp_degree == 2 and e["fsdp+tp"].examples_per_device == 8
    assert e["fsdp+tp"].terms["sharded_state"] == 16 * (600_000 / 4 + 400_000 / 2)
    assert e["ddp + checkpointing"].terms["activations"] == 4 * 500_000
    # pipeline over 4 stages: 8 micro-batches of 2, at most 4 in flight under 1F1B, each
    # stage a quarter of the layers; the main process gathers the other three quarters.
    assert e["pipeline"].terms == {"stage_state": 4e6, "gathered_for_evaluation": 3e6, "activations": 2e6 * 2 * 4 / 4}
    assert all(abs(x.total - sum(x.terms.values())) < 1e-6 for x in e.values())


def test_the_first_strategy_that_fits_is_recommended():
    assert advise(TOY, devices=4, device_memory=1 * GB, batch=16).recommended.label == "ddp"
    # 24 MB fits 21.6 MB after headroom: DDP (24 MB) does not; ZeRO-1 (18 MB) does.
    assert advise(TOY, devices=4, device_memory=24e6, batch=16).recommended.label == "ddp+zero1"
    assert advise(TOY, devices=4, device_memory=15e6, batch=16).recommended.label == "fsdp"
    assert advise(TOY, devices=4, device_memory=8e6, batch=16).recommended.label == "fsdp + checkpointing"
    assert advise(TOY, devices=4, device_memory=1e6, batch=16).recommended is None


def test_strategies_the_model_or_batch_cannot_use_are_marked():
    e = by_label(advise(ModelFootprint(parameters=10, largest_unit=5), devices=2, device_memory=GB, batch=1))
    assert e["tp"].refused == "the model has no layers tensor parallel splits"
    assert e["ddp"].refused == "a batch of 1 does not split across 2 data-parallel devices"
    e = by_label(advise(TOY, devices=16, device_memory=GB, batch=64))
    assert e["tp"].refused == "16 does not divide the heads of every block (8)"
    assert not e["tp"].fits


def test_the_transformer_formula_counts_bert_base():
    bert = ModelFootprint.transformer(layers=12, hidden=768, heads=12, seq_len=512)
    assert bert.parameters == pytest.approx(109.5e6, rel=0.01)  # BERT-base without its pooler
    # Korthikanti et al.: s*h*(34 + 5*a*s/h) bytes per layer at 16 bits; twice in fp32.
    assert bert.activations_per_example == pytest.approx(12 * 512 * 768 * (34 + 5 * 12 * 512 / 768) * 2)
    assert bert.split_activation_share == pytest.approx((24 + 5 * 12 * 512 / 768) / (34 + 5 * 12 * 512 / 768))


def test_a_measured_footprint_of_a_tiny_bert():
    enc = S.Encoder()
    inputs = {k: v[:2] for k, v in S.text_data().inputs.items()}
    fp = measure_footprint(enc, inputs, examples=2)
    assert fp.parameters == sum(p.numel() for p in enc.parameters())
    assert fp.heads == (4, 4)
    # Per block: q, k, v (32x32 + 32), out (32x32; its bias is whole on every process),
    # the MLP (32x64 + 64, 64x32).
    assert fp.split == 2 * (3 * (32 * 32 + 32) + 32 * 32 + 32 * 64 + 64 + 64 * 32)
    assert 0 < fp.checkpointed_per_example < fp.activations_per_example
    assert 0 < fp.split_activation_share < 1
    text = render(advise(fp, devices=2, device_memory=GB, batch=8))
    assert "recommended: ddp" in text and "16 B x" in text


def test_fsdp_units_are_the_models_blocks():
    from tiny_models import PlainCNN

    from slimkit.parallel.fsdp import shard_units

    assert shard_units(S.Encoder(), "auto") == ["backbone.encoder.layer.0", "backbone.encoder.layer.1"]
    # No repeated layers of one type: the children with parameters of the largest container.
    assert shard_units(PlainCNN(), "auto") == ["features.0", "features.2"]
    assert shard_units(S.Encoder(), ["re:backbone\\.embeddings"]) == ["backbone.embeddings"]
