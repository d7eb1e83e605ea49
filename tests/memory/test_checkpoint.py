"""Activation checkpointing to a budget: equal gradients, budgets met, honest errors, undo."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from slimkit.errors import ConfigError, LayerSelectionError, SlimkitError
from slimkit.memory.checkpoint import (
    CheckpointConfig,
    CheckpointPlan,
    checkpoint_,
    checkpointed_blocks,
    plan_checkpointing,
    profile_checkpointing,
    remove_checkpointing_,
    resolve_blocks,
)
from slimkit.memory.peak import LiveStorageCounter, measure_activation_peak


class Block(nn.Module):
    """A residual MLP block with dropout and a LayerNorm, like a transformer's FFN half."""

    def __init__(self, d: int = 32, hidden: int = 128, relu_first: bool = False):
        super().__init__()
        self.relu_first = relu_first
        self.lin1, self.lin2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.drop, self.norm = nn.Dropout(0.1), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu_first:  # ReLU saves its output, not its input: the input dies early
            x = F.relu(x)
        return self.norm(x + self.drop(self.lin2(F.gelu(self.lin1(x)))))


class Net(nn.Module):
    def __init__(self, n: int = 4, relu_first: bool = False):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.layers = nn.ModuleList(Block(relu_first=relu_first) for _ in range(n))
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def net(n: int = 4, relu_first: bool = False) -> tuple[Net, torch.Tensor]:
    torch.manual_seed(0)
    model = Net(n, relu_first).train()
    x = torch.randn(8, 24, 16, generator=torch.Generator().manual_seed(1))
    return model, x


def mse(out: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()


def grads_of(model: nn.Module, batch, loss_fn, bf16: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same dropout masks in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    loss = loss_fn(out)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    model = transformers.BertModel(cfg, add_pooling_layer=False).train()
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    return model, {"input_ids": torch.randint(0, 100, (2, 16), generator=g), "attention_mask": mask}


def hidden_sq(out) -> torch.Tensor:
    return out.last_hidden_state.float().pow(2).mean()


@pytest.fixture(scope="module")
def profiled():
    model, x = net(6)
    return model, x, profile_checkpointing(model, x, mse, CheckpointConfig(repeats=1))


# -- gradients -----------------------------------------------------------------------------


def test_checkpointing_gradients_equal_mlp():
    model, x = net(4)
    loss_ref, ref = grads_of(model, x, mse)
    handle = checkpoint_(model, CheckpointConfig())
    assert handle.blocks == [f"layers.{i}" for i in range(4)]
    loss_ck, got = grads_of(model, x, mse)
    assert loss_ck == loss_ref
    assert ref.keys() == got.keys() and len(ref) == 4 * 6 + 4
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("autocast", ["none", "bf16"])
def test_checkpointing_gradients_equal_bert(autocast):
    model, batch = tiny_bert()
    # The reference runs under the same autocast, without checkpointing.
    loss_ref, ref = grads_of(model, batch, hidden_sq, bf16=autocast == "bf16")
    checkpoint_(model, CheckpointConfig(autocast=autocast))
    assert checkpointed_blocks(model) == ["encoder.layer.0", "encoder.layer.1"]
    loss_ck, got = grads_of(model, batch, hidden_sq)
    assert loss_ck == pytest.approx(loss_ref, rel=1e-6)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


class MatmulCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts addmm calls by the width they contract."""

    def __init__(self):
        super().__init__()
        self.by_inner: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.addmm.default:
            k = args[1].shape[-1]
            self.by_inner[k] = self.by_inner.get(k, 0) + 1
        return func(*args, **(kwargs or {}))


def test_selective_policy_keeps_wide_contractions_and_gradients_equal():
    model, x = net(4)
    loss_ref, ref = grads_of(model, x, mse)
    checkpoint_(model, CheckpointConfig(policy="selective"))
    with MatmulCounter() as counted:
        loss_ck, got = grads_of(model, x, mse)
    assert loss_ck == loss_ref
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-7, msg=name)
    # lin1 (32 -> 128) runs again in each block's backward; lin2 (128 -> 32) does not:
    # its output was kept. inp (16 -> 32) and the head (32 -> 4) are outside the blocks.
    assert counted.by_inner == {16: 1, 32: 2 * 4 + 1, 128: 4}


def test_selective_policy_costs_memory_between_full_and_none():
    model, x = net(6)
    params = list(model.parameters())

    def step():
        mse(model(x)).backward()

    none = measure_activation_peak(step, params).peak_bytes
    peaks = {}
    for policy in ("full", "selective"):
        handle = checkpoint_(model, CheckpointConfig(policy=policy))
        peaks[policy] = measure_activation_peak(step, params).peak_bytes
        handle.remove()
    kept = 6 * 8 * 24 * 32 * 4  # every block's lin2 output, fp32
    assert peaks["full"] < peaks["selective"] <= peaks["full"] + kept
    assert peaks["selective"] < none


def test_selective_policy_with_bert_gives_equal_gradients():
    model, batch = tiny_bert()
    loss_ref, ref = grads_of(model, batch, hidden_sq)
    checkpoint_(model, CheckpointConfig(policy="selective"))
    loss_ck, got = grads_of(model, batch, hidden_sq)
    assert loss_ck == pytest.approx(loss_ref, rel=1e-6)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_planning_to_a_budget_needs_full_recomputation(profiled):
    model, x, prof = profiled
    with pytest.raises(ConfigError, match="policy='selective': planning to a budget predicts full recomputation"):
        plan_checkpointing(model, x, mse, prof.max_peak_bytes, config=CheckpointConfig(policy="selective"),
                           profile=prof)


def test_bf16_autocast_runs_matmuls_in_bf16():
    model, x = net(2)
    seen = []
    model.layers[0].lin1.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    handle = checkpoint_(model, CheckpointConfig(autocast="bf16"))
    model(x).float().pow(2).mean().backward()
    assert seen == [torch.bfloat16, torch.bfloat16]  # the forward and its recompute
    handle.remove()
    model(x)
    assert seen[-1] == torch.float32


def test_inference_under_no_grad_is_unchanged():
    model, x = net(3)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        checkpoint_(model)
        got = model(x)
    assert torch.equal(got, ref)


# -- memory --------------------------------------------------------------------------------


def test_storage_tracker_counts_live_bytes():
    w = torch.randn(10, 10)
    with LiveStorageCounter() as t:
        a = torch.empty(1000)  # 4000 bytes
        view = a.view(10, 100)  # shares a's storage: nothing new
        b = torch.empty(500)  # 2000
        del a, view
        c = torch.empty(250)  # 1000
        w.mul_(2.0)  # in place on a tensor from before: not counted
        assert (t.live_bytes, t.peak_bytes) == (3000, 6000)
    del b, c


def test_measured_activation_peak_drops_with_checkpointing():
    model, x = net(6)

    def step():
        mse(model(x)).backward()

    params = list(model.parameters())
    none = measure_activation_peak(step, params).peak_bytes
    handle = checkpoint_(model)
    every = measure_activation_peak(step, params).peak_bytes
    handle.remove()
    assert every <= 0.4 * none
    assert all(p.grad is None for p in params)  # the measurement leaves no gradients behind


def test_profile_predicts_measured_peaks(profiled):
    model, x, profile = profiled
    assert len(profile.blocks) == 6 and profile.measure_method == "storages"
    assert profile.min_peak_bytes < 0.4 * profile.max_peak_bytes
    assert profile.predict_peak([]) == profile.max_peak_bytes
    params = list(model.parameters())
    for chosen in (["layers.0"], ["layers.1", "layers.4"], profile.names):
        with torch.random.fork_rng():
            handle = checkpoint_(model, CheckpointConfig(blocks=chosen))
            measured = measure_activation_peak(lambda: mse(model(x)).backward(), params).peak_bytes
            handle.remove()
        assert profile.predict_peak(chosen) == pytest.approx(measured, rel=0.02), chosen


def test_profile_counts_inputs_a_checkpoint_keeps():
    model, x = net(4, relu_first=True)
    profile = profile_checkpointing(model, x, mse, CheckpointConfig(repeats=1))
    # Each block's input dies in its ReLU without checkpointing; a checkpoint keeps it.
    assert [b.boundary_bytes for b in profile.blocks] == [8 * 24 * 32 * 4] * 4
    with torch.random.fork_rng():
        checkpoint_(model)
        measured = measure_activation_peak(lambda: mse(model(x)).backward(), list(model.parameters())).peak_bytes
    assert profile.predict_peak(profile.names) == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_plan_meets_budgets_between_min_and_max(profiled, fraction):
    model, x, profile = profiled
    budget = int(profile.min_peak_bytes + fraction * (profile.max_peak_bytes - profile.min_peak_bytes))
    plan = plan_checkpointing(model, x, mse, budget, profile=profile)
    assert plan.meets_budget and plan.measured_peak_bytes <= budget
    assert 0 < len(plan.chosen) < 6 or fraction == 0.1
    with torch.random.fork_rng():
        handle = checkpoint_(model, plan)
        measured = measure_activation_peak(lambda: mse(model(x)).backward(), list(model.parameters())).peak_bytes
        handle.remove()
    assert measured <= budget
    assert plan.predicted_extra_seconds == pytest.approx(
        sum(b.forward_seconds for b in profile.blocks if b.name in plan.chosen))
    assert plan.predicted_time_ratio > 1.0


def test_tighter_budgets_cost_more_recompute(profiled):
    model, x, profile = profiled
    span = profile.max_peak_bytes - profile.min_peak_bytes
    plans = [plan_checkpointing(model, x, mse, int(profile.min_peak_bytes + f * span), profile=profile,
                                config=CheckpointConfig(verify=False)) for f in (0.9, 0.5, 0.1)]
    assert [len(p.chosen) for p in plans] == sorted(len(p.chosen) for p in plans)
    assert plans[0].predicted_extra_seconds <= plans[1].predicted_extra_seconds <= plans[2].predicted_extra_seconds
    assert plan_checkpointing(model, x, mse, profile.max_peak_bytes, profile=profile).chosen == []


def test_exact_and_greedy_both_meet_the_predicted_budget(profiled):
    _, _, profile = profiled
    budget = (profile.min_peak_bytes + profile.max_peak_bytes) // 2
    exact, greedy = profile.choose(budget, "exact"), profile.choose(budget, "greedy")
    assert profile.predict_peak(exact) <= budget and profile.predict_peak(greedy) <= budget
    assert profile.predict_extra_seconds(exact) <= profile.predict_extra_seconds(greedy) + 1e-12
    frontier = profile.frontier()
    assert [len(f["blocks"]) for f in frontier] == list(range(7))
    assert frontier[0]["predicted_peak_bytes"] == profile.max_peak_bytes


def test_budget_below_minimum_says_what_the_minimum_is_and_how_to_lower_it(profiled):
    model, x, profile = profiled
    with pytest.raises(ConfigError) as err:
        plan_checkpointing(model, x, mse, profile.min_peak_bytes // 2, profile=profile)
    text = str(err.value)
    minimum = f"{profile.min_peak_bytes / 1024:.2f} KiB"
    assert minimum in text and "least peak" in text
    assert "smaller batch" in text and "[8, 24, 16]" in text and "bf16" in text and "finer blocks" in text


def test_checkpoint_with_a_budget_plans_first():
    model, x = net(4)
    with pytest.raises(ConfigError, match="example_batch and loss_fn"):
        checkpoint_(model, CheckpointConfig(budget="1MiB"))
    handle = checkpoint_(model, CheckpointConfig(budget=10**9, repeats=1), x, mse)
    assert isinstance(handle.plan, CheckpointPlan) and handle.blocks == []  # 1 GB: nothing to do


# -- state and undo ------------------------------------------------------------------------


def test_undo_restores_the_model():
    model, x = net(3)
    torch.manual_seed(5)
    ref = model(x)
    handle = checkpoint_(model, CheckpointConfig(autocast="bf16"))
    assert checkpointed_blocks(model) == ["layers.0", "layers.1", "layers.2"]
    checkpoint_(model, CheckpointConfig(blocks=["layers.1"]))  # replaces, does not stack
    assert checkpointed_blocks(model) == ["layers.1"] and "forward" not in model.__dict__
    handle.remove()
    assert checkpointed_blocks(model) == []
    assert all("forward" not in m.__dict__ for m in model.modules())
    torch.manual_seed(5)
    assert torch.equal(model(x), ref)


def test_deepcopy_of_a_checkpointed_model_recomputes_its_own_blocks():
    model, x = net(2)
    checkpoint_(model)
    twin = copy.deepcopy(model)
    assert twin.layers[0].forward.module is twin.layers[0]
    _, a = grads_of(model, x, mse)
    _, b = grads_of(twin, x, mse)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_profiling_leaves_grads_rng_and_checkpointing_as_they_were():
    model, x = net(3)
    checkpoint_(model, CheckpointConfig(blocks=["layers.2"]))
    mse(model(x)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    profile_checkpointing(model, x, mse, CheckpointConfig(repeats=1))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert checkpointed_blocks(model) == ["layers.2"]


# -- choosing blocks and bad input ---------------------------------------------------------


def test_blocks_auto_finds_the_repeated_layers():
    model, _ = tiny_bert()
    assert resolve_blocks(model) == ["encoder.layer.0", "encoder.layer.1"]
    assert resolve_blocks(model, ["re:encoder\\.layer\\.\\d+\\.attention"]) == [
        "encoder.layer.0.attention", "encoder.layer.1.attention"]
    with pytest.raises(ConfigError, match="found no repeated layers"):
        resolve_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with pytest.raises(LayerSelectionError, match="matches no module"):
        resolve_blocks(model, ["encoder.layers.0"])
    with pytest.raises(ConfigError, match="is inside"):
        resolve_blocks(model, ["encoder.layer.0", "encoder.layer.0.output"])


def test_config_parses_budgets_and_refuses_typos():
    assert CheckpointConfig(budget="1.5GiB").budget == 3 * 2**29
    assert CheckpointConfig(budget=1000).budget == 1000
    assert CheckpointConfig(blocks="re:layers\\.\\d+").blocks.targets == ["re:layers\\.\\d+"]
    for bad in ({"budget": 0}, {"budget": "lots"}, {"autocast": "fp16"}, {"budjet": 5}, {"repeats": 0}):
        with pytest.raises(ValidationError):
            CheckpointConfig(**bad)
    again = CheckpointConfig.model_validate(CheckpointConfig(budget="2MiB", autocast="bf16").model_dump())
    assert again.budget == 2 * 2**20 and again.autocast == "bf16"


def test_blocks_that_do_not_run_or_a_bad_loss_are_reported():
    model, x = net(2)
    model.unused = Block()
    with pytest.raises(ConfigError, match="did not run"):
        profile_checkpointing(model, x, mse, CheckpointConfig(blocks=["layers.0", "unused"], repeats=1))
    with pytest.raises(SlimkitError, match="scalar tensor"):
        profile_checkpointing(model, x, lambda out: out, CheckpointConfig(repeats=1))



def test_remove_checkpointing_without_a_handle():
    model, _ = net(2)
    checkpoint_(model, CheckpointConfig(autocast="bf16"))
    remove_checkpointing_(model)
    assert checkpointed_blocks(model) == [] and "forward" not in model.__dict__


class EmbedNet(nn.Module):
    """A big embedding table before small blocks: its dense gradient is the step's peak."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20_000, 32)
        self.layers = nn.ModuleList(Block() for _ in range(3))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for layer in self.layers:
            h = layer(h)
        return h


def test_below_minimum_says_when_checkpointing_cannot_help():
    torch.manual_seed(0)
    model, ids = EmbedNet().train(), torch.randint(0, 20_000, (4, 8))
    profile = profile_checkpointing(model, ids, mse, CheckpointConfig(repeats=1))
    assert profile.min_peak_bytes >= 20_000 * 32 * 4  # the embedding gradient, before .grad += it
    with pytest.raises(ConfigError, match="checkpointing more cannot lower it") as err:
        plan_checkpointing(model, ids, mse, profile.min_peak_bytes - 1, profile=profile)
    assert "the backward after layers.0" in str(err.value) and "finer blocks" not in str(err.value)


def test_a_block_that_runs_twice_per_step_is_refused_by_the_planner():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])
            self.inp, self.head = nn.Linear(16, 32), nn.Linear(32, 4)

        def forward(self, x):
            h = self.inp(x)
            h = self.layers[0](self.layers[0](h))  # shared weights: one module, two calls
            return self.head(self.layers[1](h))

    torch.manual_seed(0)
    model = Twice().train()
    x = torch.randn(4, 8, 16)
    with pytest.raises(ConfigError, match=r"\['layers.0'\] do not run exactly once per step \(layers.0 2 times in 1 steps"):
        profile_checkpointing(model, x, mse, CheckpointConfig(repeats=1))


def test_checkpointed_batch_norms_update_their_running_statistics_once_per_step():
    from tiny_models import assert_same_state, tiny_classifier

    plain, _ = tiny_classifier()
    ckpt = copy.deepcopy(plain)
    checkpoint_(ckpt, CheckpointConfig(blocks=["stem", "block"]))
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for model in (plain.train(), ckpt.train()):
        for _ in range(2):
            model.zero_grad()
            model(x).logsumexp(1).mean().backward()
    # The recompute in the backward runs each block's forward again; its batch norms must
    # not count that batch twice.
    assert_same_state(plain, ckpt)
    for a, b in zip(plain.parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
