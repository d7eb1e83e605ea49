"""The memory profiler: exact bytes on tiny seeded models, checked against hand counts."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from slimkit.errors import SlimkitError
from slimkit.memory.cuda_allocator import AllocatorWatch
from slimkit.memory.profiler import profile
from slimkit.memory.timeline import CATEGORIES, format_bytes

F32 = 4
# Linear(64, 128) -> ReLU -> Linear(128, 32): weights and biases, in bytes.
PARAMS = (64 * 128 + 128 + 128 * 32 + 32) * F32  # 49,792
INPUT = 4 * 64 * F32  # a [4, 64] batch: 1,024
HIDDEN = 4 * 128 * F32  # one [4, 128] activation: 2,048
OUT = 4 * 32 * F32  # the [4, 32] output: 512


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))


def batch() -> torch.Tensor:
    return torch.randn(4, 64, generator=torch.Generator().manual_seed(1))


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)  # no state and no temporaries: the peak is in backward


def nonzero(by_category: dict[str, int]) -> dict[str, int]:
    return {c: b for c, b in by_category.items() if b}


# -- a forward pass -----------------------------------------------------------------------


def test_forward_timeline_is_exact():
    p = profile(mlp(), batch())
    # (operator, module, activation bytes live after it). Linear runs as t (a view) and
    # addmm; the first Linear's output dies as soon as ReLU has read it.
    assert [(e.op, e.module, e.bytes["activations"]) for e in p.timeline] == [
        ("<start>", None, 0),
        ("aten.t", "0", 0),
        ("aten.addmm", "0", HIDDEN),
        ("aten.relu", "1", 2 * HIDDEN),
        ("aten.t", "2", HIDDEN),
        ("aten.addmm", "2", HIDDEN + OUT),
        ("<end>", None, 0),
    ]
    assert p.start == p.end == {**dict.fromkeys(CATEGORIES, 0), "parameters": PARAMS, "inputs": INPUT}


def test_forward_peak_operator_module_and_bytes():
    p = profile(mlp(), batch())
    assert (p.peak.op, p.peak.module, p.peak.phase, p.peak.index) == ("aten.relu", "1", "forward", 3)
    assert p.peak.bytes == PARAMS + INPUT + 2 * HIDDEN == 54_912
    assert nonzero(p.peak.by_category) == {"parameters": PARAMS, "inputs": INPUT, "activations": 2 * HIDDEN}


def test_largest_tensors_at_the_peak():
    p = profile(mlp(), batch(), top_k=4)
    rows = [(t.bytes, t.shape, t.category, t.op, t.module, t.name) for t in p.peak.tensors]
    assert rows == [
        (128 * 64 * F32, (128, 64), "parameters", "parameters", "0", "0.weight"),
        (32 * 128 * F32, (32, 128), "parameters", "parameters", "2", "2.weight"),
        (HIDDEN, (4, 128), "activations", "aten.addmm", "0", None),  # ties: the older first
        (HIDDEN, (4, 128), "activations", "aten.relu", "1", None),
    ]
    assert profile(mlp(), batch(), top_k=0).peak.tensors == []


def test_module_table_counts_each_modules_own_activations():
    p = profile(mlp(), batch())
    rows = [(m.module, m.tensors, m.allocated_bytes, m.peak_live_bytes, m.live_at_peak_bytes) for m in p.modules]
    assert rows == [
        ("0", 1, HIDDEN, HIDDEN, HIDDEN),
        ("1", 1, HIDDEN, HIDDEN, HIDDEN),
        ("2", 1, OUT, OUT, 0),  # runs after the peak
    ]


def test_forward_runs_in_eval_mode_without_grad_and_leaves_the_mode():
    model = nn.Sequential(nn.Linear(64, 64), nn.Dropout(0.5)).train()
    p = profile(model, batch())
    # Dropout in eval mode is the identity: no mask, no new tensor.
    assert [e.op for e in p.timeline if e.phase == "forward"] == ["aten.t", "aten.addmm"]
    assert model.training


def test_inputs_buffers_and_other_tensors_are_told_apart():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.register_buffer("shift", torch.zeros(8))
            self.scale = torch.ones(8)  # a plain attribute: neither parameter nor buffer

        def forward(self, x, *, gain):
            return self.lin(x) * self.scale + self.shift + gain

    x, gain = torch.randn(2, 8), torch.ones(8)
    p = profile(Scaled(), {"x": x, "gain": gain})
    assert nonzero(p.start) == {"parameters": (64 + 8) * F32, "buffers": 8 * F32,
                                "inputs": (16 + 8) * F32, "other": 8 * F32}
    assert p.end == p.start


def test_a_parameter_passed_as_input_stays_a_parameter():
    model = nn.Linear(4, 4)
    p = profile(model, model.weight)
    assert nonzero(p.start) == {"parameters": 20 * F32}


# -- a training step ------------------------------------------------------------------------


def test_training_step_categories_are_exact():
    p = profile(mlp(), batch(), train=True)  # AdamW by default
    # After the step: a gradient per parameter, Adam's two moments per parameter plus one
    # float32 step count per parameter tensor, and no activation or temporary left.
    assert nonzero(p.end) == {"parameters": PARAMS, "inputs": INPUT, "gradients": PARAMS,
                              "optimizer_state": 2 * PARAMS + 4 * F32}
    # At the end of the forward pass: the ReLU output (saved by ReLU and by the second
    # Linear) and the output; the first Linear's output is not saved.
    last_forward = [e for e in p.timeline if e.phase == "forward"][-1]
    assert last_forward.bytes["activations"] == HIDDEN + OUT
    assert [r["phase"] for r in p.phases()] == ["start", "forward", "loss", "backward", "optimizer", "end"]


def test_training_step_peak_with_sgd_is_exact():
    p = profile(mlp(), batch(), train=True, optimizer=sgd)
    # The peak is when the first Linear's bias gradient is made (sum over the batch): every
    # gradient exists, with the output, the loss, the gradient flowing into the first
    # Linear ([4, 128]) and the seed gradient of the loss (a scalar).
    assert (p.peak.op, p.peak.module, p.peak.phase) == ("aten.sum", "0", "backward")
    assert nonzero(p.peak.by_category) == {
        "parameters": PARAMS, "inputs": INPUT, "gradients": PARAMS,
        "activations": OUT + F32, "temporaries": HIDDEN + F32,
    }
    assert p.peak.bytes == 103_176
    assert p.end["optimizer_state"] == 0


def test_backward_operators_are_attributed_to_their_modules():
    p = profile(mlp(), batch(), train=True, optimizer=sgd)
    backward = [(e.op, e.module) for e in p.timeline if e.phase == "backward"]
    assert ("aten.threshold_backward", "1") in backward
    assert [m for op, m in backward if op == "aten.mm"] == ["2", "2", "0"]  # grad input, grad weight; grad weight
    assert all(e.module is None for e in p.timeline if e.phase in ("loss", "optimizer"))
    grads = {t.name: (t.category, t.module) for t in p.peak.tensors if t.category == "gradients"}
    assert grads["0.weight.grad"] == ("gradients", "0")


def test_checkpointing_shows_as_fewer_saved_activations():
    class Net(nn.Module):
        def __init__(self, checkpointed: bool):
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
            self.head = nn.Linear(128, 32)
            self.checkpointed = checkpointed

        def forward(self, x):
            h = checkpoint(self.body, x, use_reentrant=False) if self.checkpointed else self.body(x)
            return self.head(h)

    def saved(checkpointed: bool):
        p = profile(Net(checkpointed), batch(), train=True, optimizer=sgd)
        return [e for e in p.timeline if e.phase == "forward"][-1].bytes["activations"], p

    plain, _ = saved(False)
    kept, p = saved(True)
    assert plain == 2 * HIDDEN + OUT  # both ReLU outputs and the output
    assert kept == HIDDEN + OUT  # only the block's output and the output
    recomputed = [(e.op, e.module) for e in p.timeline if e.phase == "backward" and e.op in ("aten.addmm", "aten.relu")]
    assert recomputed == [("aten.addmm", "body.0"), ("aten.relu", "body.1"), ("aten.addmm", "body.2"), ("aten.relu", "body.3")]


def test_a_given_optimizers_state_counts_from_the_start():
    model = mlp()
    opt = torch.optim.Adam(model.parameters())
    model(batch()).sum().backward()
    opt.step()
    p = profile(model, batch(), train=True, optimizer=opt)
    assert p.start["optimizer_state"] == p.end["optimizer_state"] == 2 * PARAMS + 4 * F32
    assert p.start["gradients"] == 0  # the step starts as after zero_grad(set_to_none=True)


def test_training_leaves_model_optimizer_and_rng_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Dropout(0.5), nn.Linear(32, 8)).eval()
    opt = torch.optim.AdamW(model.parameters())
    model(batch()).sum().backward()
    opt.step()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad for p in model.parameters()]
    state = json.dumps({k: v.tolist() if torch.is_tensor(v) else v
                        for s in opt.state.values() for k, v in s.items()})
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)

    profile(model, batch(), train=True, optimizer=opt)

    assert torch.equal(torch.rand(3), expected_draw)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k  # running statistics included
    assert all(a is b for a, b in zip([p.grad for p in model.parameters()], grads, strict=True))
    assert not any(m.training for m in model.modules())
    assert json.dumps({k: v.tolist() if torch.is_tensor(v) else v
                       for s in opt.state.values() for k, v in s.items()}) == state


def test_training_needs_a_trainable_parameter():
    model = mlp().requires_grad_(False)
    with pytest.raises(SlimkitError, match="requires grad"):
        profile(model, batch(), train=True)


def test_a_bad_loss_is_refused_and_the_model_restored():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SlimkitError, match="scalar tensor"):
        profile(model, batch(), train=True, loss_fn=lambda out: out)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_custom_loss_is_used():
    p = profile(mlp(), batch(), train=True, optimizer=sgd, loss_fn=lambda out: (out**2).sum())
    assert [e.op for e in p.timeline if e.phase == "loss"] == ["aten.pow", "aten.sum"]


# -- the result ------------------------------------------------------------------------------


def test_to_dict_is_json_and_matches_the_profile():
    p = profile(mlp(), batch(), train=True)
    d = json.loads(json.dumps(p.to_dict(), allow_nan=False))
    n = len(p.timeline)
    assert d["categories"] == list(CATEGORIES)
    assert all(len(d["timeline"][k]) == n for k in ("op", "module", "phase"))
    totals = [sum(d["timeline"]["bytes"][c][i] for c in CATEGORIES) for i in range(n)]
    assert max(totals) == d["peak"]["bytes"] == p.peak.bytes
    assert totals.index(max(totals)) == d["peak"]["index"]
    assert d["end"] == p.end and d["largest"][0]["shape"] == [128, 64]
    assert [r["phase"] for r in d["phases"]][1:-1] == ["forward", "loss", "backward", "optimizer"]


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 999, 1_536, 999_999, 87_200_000, 5e9, None)] == [
        "0 B", "999 B", "1.5 kB", "1.0 MB", "87.2 MB", "5.0 GB", "—"]


def test_cuda_allocator_statistics_are_recorded(monkeypatch, tmp_path):
    """The CUDA path with the allocator's functions stubbed: there is no GPU here."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1_000)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: {
        "allocated_bytes.all.peak": 5_000, "reserved_bytes.all.peak": 8_192, "num_alloc_retries": 1, "num_ooms": 0})
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history",
                        lambda enabled="all", **kw: calls.append(("history", enabled)))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", lambda path: open(path, "wb").write(b"snapshot"))

    with AllocatorWatch(torch.device("cuda", 0), tmp_path / "snap.pickle") as watch:
        pass
    assert watch.stats == {
        "source": "torch.cuda.memory_stats", "allocated_before_bytes": 1_000, "peak_allocated_bytes": 5_000,
        "peak_above_start_bytes": 4_000, "peak_reserved_bytes": 8_192, "alloc_retries": 1, "ooms": 0,
        "snapshot": str(tmp_path / "snap.pickle"),
    }
    assert (tmp_path / "snap.pickle").read_bytes() == b"snapshot"
    assert calls == ["reset", ("history", "all"), ("history", None)]  # history is switched off again


def test_no_allocator_statistics_on_cpu():
    assert profile(mlp(), batch()).allocator is None
