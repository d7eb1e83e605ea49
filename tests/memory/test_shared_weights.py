"""Memory-mapped weights: same outputs, read-only, one mapping per file, pages shared by processes."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from slimkit.errors import ModelLoadError
from slimkit.memory.shared_weights import (
    MappingPool,
    assign_weights_,
    empty_weights,
    load_shared,
    map_safetensors,
    mapped_file_memory,
    measure_together,
    pss_bytes,
    read_header,
    smaps_rollup,
)
from slimkit.serialize import load, save
from slimkit.zoo.models import LoadedModel, TextEncoder, load_model

SRC = Path(__file__).resolve().parents[2] / "src"
MiB = 1024 * 1024


def tiny_bert() -> LoadedModel:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    return LoadedModel(TextEncoder(BertModel(cfg)).eval(), {"kind": "hf", "hf_config": cfg.to_dict(), "pooling": "mean"},
                       None, 64, (ids, mask))


def test_bert_loaded_mapped_gives_the_same_outputs(tmp_path, one_thread):
    model = tiny_bert()
    save(model, tmp_path / "m")
    ref = load(tmp_path / "m")
    pool = MappingPool()
    mapped = load_shared(tmp_path / "m", pool=pool)
    ids, mask = model.example_inputs
    with torch.no_grad():
        torch.testing.assert_close(mapped.module(ids, mask), ref.module(ids, mask), rtol=0, atol=0)
        torch.testing.assert_close(mapped.module(ids, mask), model.module(ids, mask), rtol=0, atol=0)
    # Buffers the file does not hold (position ids) were built normally, not left on meta.
    assert all(b.device.type == "cpu" for b in mapped.module.buffers())
    assert not any(p.requires_grad for p in mapped.module.parameters())
    assert len(pool) == 1 and pool.mapped_bytes() == (tmp_path / "m" / "model.safetensors").stat().st_size


def test_empty_weights_allocates_no_parameters():
    with empty_weights():
        m = nn.Sequential(nn.Linear(4096, 4096), nn.LayerNorm(4096))
    assert {p.device.type for p in m.parameters()} == {"meta"}
    m2 = nn.Linear(3, 3)  # the patch is gone once the block ends
    assert m2.weight.device.type == "cpu"


def test_tied_parameters_stay_tied(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

    torch.manual_seed(0)
    src = Tied()
    save_file({"emb.weight": src.emb.weight.detach()}, tmp_path / "w.safetensors")  # stored once
    with empty_weights():
        dst = Tied()
    assign_weights_(dst, map_safetensors(tmp_path / "w.safetensors", pool=MappingPool()))
    assert dst.out.weight is dst.emb.weight
    torch.testing.assert_close(dst.emb.weight, src.emb.weight, rtol=0, atol=0)


def test_pool_gives_two_models_one_mapping(tmp_path):
    save(load_model("tiny_models:wide"), tmp_path / "m")
    pool = MappingPool()
    a = load_shared(tmp_path / "m", pool=pool)
    b = load_shared(tmp_path / "m", pool=pool)
    assert (pool.misses, pool.hits, len(pool)) == (1, 1, 1)
    for (name, pa), pb in zip(a.module.named_parameters(), b.module.parameters(), strict=True):
        assert pa.data_ptr() == pb.data_ptr(), name
    rss_of_file = mapped_file_memory("self", [tmp_path / "m"])["Rss"]
    assert rss_of_file <= (tmp_path / "m" / "model.safetensors").stat().st_size + 8192
    # Held weakly: the file is unmapped once no tensor uses it.
    del a, b, pa, pb
    gc.collect()
    assert len(pool) == 0 and mapped_file_memory("self", [tmp_path / "m"])["Rss"] == 0


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_writing_a_read_only_weight_stops_the_process_and_never_reaches_the_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(64, 64)}, path)
    before = path.read_bytes()
    proc = _run("""
        import sys
        from slimkit.memory.shared_weights import map_safetensors
        w = map_safetensors(sys.argv[1])["w"]
        print("mapped", float(w.sum()), flush=True)
        w.add_(1.0)
        print("wrote")
    """, str(path))
    assert "mapped" in proc.stdout and "wrote" not in proc.stdout
    assert proc.returncode == -signal.SIGSEGV
    assert path.read_bytes() == before


def test_copy_on_write_weights_change_only_in_this_model(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(64, 64)}, path)
    before = path.read_bytes()
    pool = MappingPool()
    shared = map_safetensors(path, pool=pool)["w"]
    private = map_safetensors(path, pool=pool, writable=True)["w"]
    private.add_(1.0)
    torch.testing.assert_close(private, shared + 1.0)
    assert path.read_bytes() == before and len(pool) == 1


def test_bad_files_raise_clear_errors(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(256), "b": torch.randn(256)}, path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelLoadError, match=r"cut\.safetensors.*run past the end"):
        map_safetensors(tmp_path / "cut.safetensors", pool=MappingPool())
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="header length"):
        read_header(tmp_path / "junk.safetensors")
    with pytest.raises(ModelLoadError, match="no such weights file"):
        map_safetensors(tmp_path / "missing.safetensors", pool=MappingPool())
    with empty_weights():
        wrong = nn.Linear(16, 16)
    with pytest.raises(ModelLoadError, match="do not match the model"):
        assign_weights_(wrong, map_safetensors(path, pool=MappingPool()))


def test_pss_helpers_read_this_process():
    m = smaps_rollup()
    assert m["Pss"] > 0 and m["Rss"] >= m["Pss"] and pss_bytes() > 0


WORKER = """
import gc, sys
import torch
from torch import nn
from safetensors.torch import load_file
from slimkit.memory.shared_weights import empty_weights, load_mapped_, ready_for_measurement
torch.set_num_threads(1)
mode, path = sys.argv[1], sys.argv[2]
if mode == "none":
    ready_for_measurement({})
    sys.exit(0)
with empty_weights() if mode == "shared" else torch.no_grad():
    model = nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 2048))
if mode == "shared":
    load_mapped_(model, path)
else:
    model.load_state_dict(load_file(path))  # copies into the module's own memory
    gc.collect()
with torch.no_grad():
    out = model(torch.ones(1, 2048))
    touched = sum(float(p.sum()) for p in model.parameters())  # every page resident
ready_for_measurement({"out": float(out.sum()), "touched": touched})
"""


@pytest.mark.integration
def test_two_processes_share_the_weights_pages(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "w.safetensors"
    model = nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 2048))
    save_file({k: v.detach() for k, v in model.state_dict().items()}, path)
    weights = path.stat().st_size  # 32 MiB
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    runs = {mode: measure_together([[sys.executable, "-c", WORKER, mode, str(path)]] * 2, env=env, files=[path])
            for mode in ("shared", "private", "none")}
    # Same weights; the sum may round differently (a mapped tensor is 8-byte, not 64-byte, aligned).
    assert runs["shared"][0].info["out"] == pytest.approx(runs["private"][0].info["out"], rel=1e-5)
    # Each shared process has the whole file resident; their shares add up to one copy.
    for m in runs["shared"]:
        assert m.files["Rss"] >= weights - 8192
    assert abs(sum(m.files["Pss"] for m in runs["shared"]) - weights) <= 64 * 1024
    # Only figures of these processes' own pages: total PSS also moves with whatever else
    # on the machine maps the same libraries. A private copy is private memory (USS) of
    # each process; a shared mapping adds none.
    idle = max(m.uss for m in runs["none"])
    extra = {mode: [(m.uss - idle) / weights for m in r] for mode, r in runs.items()}
    assert all(x >= 0.9 for x in extra["private"]), extra
    assert all(x <= 0.25 for x in extra["shared"]), extra
    assert all(m.files["Pss"] == 0 for m in runs["private"])
