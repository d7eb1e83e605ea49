"""The content-addressed weight store: dedup, round trips, corruption found by hash, concurrent writers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from slimkit.errors import ModelLoadError
from slimkit.memory.shared_weights import MappingPool, empty_weights
from slimkit.memory.store import MARKER, CorruptObjectError, StoreError, WeightStore
from slimkit.zoo.models import load_model

SRC = Path(__file__).resolve().parents[2] / "src"
HEADS = {"a": 2, "b": 3, "c": 5}


class TaskModel(nn.Module):
    """A frozen encoder shared by every task and a task's own head."""

    def __init__(self, classes: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128))
        self.head = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def task_models() -> dict[str, TaskModel]:
    torch.manual_seed(0)
    encoder = TaskModel(1).encoder.state_dict()
    out = {}
    for i, (name, k) in enumerate(HEADS.items()):
        torch.manual_seed(10 + i)
        m = TaskModel(k).eval()
        m.encoder.load_state_dict(encoder)
        out[name] = m
    return out


def skeleton(classes: int) -> TaskModel:
    with empty_weights():
        return TaskModel(classes).eval()


X = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))


def test_three_heads_over_one_encoder_store_the_encoder_once(tmp_path):
    store = WeightStore(tmp_path / "store", pool=MappingPool())
    reports = [store.put(name, m, meta={"classes": HEADS[name]}) for name, m in task_models().items()]
    # Encoder: 2 weights + 2 biases; each head: a weight and a bias.
    assert [(r.objects_written, r.objects_reused) for r in reports] == [(6, 0), (2, 4), (2, 4)]
    enc = (64 * 128 + 128 + 128 * 128 + 128) * 4
    heads = sum((128 * k + k) * 4 for k in HEADS.values())
    s = store.stats()
    assert (s.models, s.objects, s.unreferenced_objects) == (3, 10, 0)
    assert s.logical_bytes == 3 * enc + heads and s.unique_bytes == enc + heads
    assert s.dedup_ratio == pytest.approx((3 * enc + heads) / (enc + heads))
    assert enc + heads <= s.stored_bytes <= enc + heads + 3 * 4096  # plus three small manifests
    assert store.models() == ["a", "b", "c"] and store.manifest("b")["meta"] == {"classes": 3}


def test_round_trip_is_exact_and_shared_objects_map_to_the_same_memory(tmp_path):
    pool = MappingPool()
    store = WeightStore(tmp_path / "store", pool=pool)
    models = task_models()
    for name, m in models.items():
        store.put(name, m)
    loaded = {name: store.load_into(name, skeleton(k)) for name, k in HEADS.items()}
    with torch.no_grad():
        for name, m in loaded.items():
            torch.testing.assert_close(m(X), models[name](X), rtol=0, atol=0)
    a, b, c = loaded.values()
    assert a.encoder[0].weight.data_ptr() == b.encoder[0].weight.data_ptr() == c.encoder[0].weight.data_ptr()
    assert a.head.weight.data_ptr() != b.head.weight.data_ptr()
    assert len(pool) == 10 and pool.misses == 10  # one mapping per object, not per model


def test_a_loaded_model_is_rebuilt_from_its_spec(tmp_path):
    model = load_model("tiny_models:mlp")
    store = WeightStore(tmp_path / "store", pool=MappingPool())
    store.put("mlp", model)
    back = store.load("mlp")
    x = model.example_inputs[0]
    with torch.no_grad():
        torch.testing.assert_close(back.module(x), model.module(x), rtol=0, atol=0)
    assert back.spec == model.spec
    store.put("plain", nn.Linear(2, 2))
    with pytest.raises(StoreError, match="plain nn.Module; build it and use load_into"):
        store.load("plain")


def _object_of(store: WeightStore, model: str, tensor: str) -> Path:
    digest = store.manifest(model)["tensors"][tensor]["hash"]
    path = store.root / "objects" / digest[:2] / digest
    path.chmod(0o644)  # objects are stored read-only
    return path


def test_a_corrupt_object_is_named_with_its_users_and_other_models_still_load(tmp_path):
    store = WeightStore(tmp_path / "store", pool=MappingPool())
    for name, m in task_models().items():
        store.put(name, m)
    obj = _object_of(store, "b", "head.weight")
    data = bytearray(obj.read_bytes())
    data[10] ^= 0xFF
    obj.write_bytes(bytes(data))
    with pytest.raises(CorruptObjectError) as err:
        store.load_into("b", skeleton(3))
    msg = str(err.value)
    assert obj.name[:16] in msg and "hash to" in msg and "b: head.weight" in msg
    assert "put an affected model again" in msg.lower()
    assert [p.digest for p in err.value.problems] == [obj.name]
    for name in ("a", "c"):
        store.load_into(name, skeleton(HEADS[name]))
    report = store.verify()
    assert not report.ok and [p.digest for p in report.problems] == [obj.name]
    assert report.objects_checked == 10
    # Putting the model again rewrites the bad object.
    assert store.put("b", task_models()["b"]).objects_repaired == 1
    assert store.verify().ok
    with torch.no_grad():
        torch.testing.assert_close(store.load_into("b", skeleton(3))(X), task_models()["b"](X), rtol=0, atol=0)


def test_a_truncated_or_missing_object_is_reported_before_hashing(tmp_path):
    store = WeightStore(tmp_path / "store", pool=MappingPool())
    for name, m in task_models().items():
        store.put(name, m)
    cut = _object_of(store, "c", "head.weight")
    size = cut.stat().st_size
    os.truncate(cut, 100)
    gone = _object_of(store, "c", "head.bias")
    gone.unlink()
    with pytest.raises(CorruptObjectError, match=rf"truncated: 100 of {size} bytes; used by c: head.weight") as err:
        store.load_into("c", skeleton(5))
    assert {p.problem for p in err.value.problems} == {f"truncated: 100 of {size} bytes", "missing"}
    store.load_into("a", skeleton(2))
    assert len(store.verify().problems) == 2


def test_a_shared_object_that_changes_on_disk_is_caught_even_when_already_mapped(tmp_path):
    store = WeightStore(tmp_path / "store", pool=MappingPool())
    for name, m in task_models().items():
        store.put(name, m)
    keep = store.load_into("a", skeleton(2), verify="once")  # holds the mapping
    obj = _object_of(store, "a", "encoder.0.weight")
    st = obj.stat()
    with open(obj, "r+b") as f:  # in place: the mapping sees the change
        f.seek(0)
        f.write(b"\x00\x00\x00\x00")
    os.utime(obj, ns=(st.st_atime_ns, st.st_mtime_ns))  # and hide it from the file's identity
    store.load_into("b", skeleton(3), verify="once")  # trusted: this process checked it already
    with pytest.raises(CorruptObjectError, match="a: encoder.0.weight") as err:
        store.load_into("b", skeleton(3))  # verify="full" is the default
    assert {u.split(":")[0] for u in err.value.problems[0].used_by} == {"a", "b", "c"}
    del keep


def test_gc_removes_only_what_no_model_uses(tmp_path):
    store = WeightStore(tmp_path / "store", pool=MappingPool())
    for name, m in task_models().items():
        store.put(name, m)
    store.remove("c")
    assert store.stats().unreferenced_objects == 2
    report = store.gc()
    assert report.objects_removed == 2 and report.bytes_freed == (128 * 5 + 5) * 4
    assert store.verify().ok and store.stats().objects == 8
    with pytest.raises(ModelLoadError, match="has no model 'c'; it has: a, b"):
        store.manifest("c")


def test_bad_names_and_folders_are_refused(tmp_path):
    store = WeightStore(tmp_path / "store")
    with pytest.raises(StoreError, match="model name '../x'"):
        store.put("../x", nn.Linear(2, 2))
    outside = tmp_path / "x.json"
    outside.write_text("{}")
    with pytest.raises(StoreError, match="model name '../x'"):
        store.remove("../x")
    assert outside.read_text() == "{}"  # nothing outside the store is touched
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    with pytest.raises(StoreError, match="not a weight store"):
        WeightStore(tmp_path / "other")
    with pytest.raises(StoreError, match="verify='lazy'"):
        store.state_dict("x", verify="lazy")


def test_a_manifest_whose_shape_disagrees_with_its_bytes_is_refused(tmp_path):
    import json

    store = WeightStore(tmp_path / "store")
    store.put("a", task_models()["a"])
    path = tmp_path / "store" / "models" / "a.json"
    doc = json.loads(path.read_text())
    doc["tensors"]["head.weight"]["shape"] = [2, 256]
    path.write_text(json.dumps(doc))
    with pytest.raises(ModelLoadError, match=r"head.weight is \[2, 256\] F32 \(2048 bytes\) but its object holds 1024"):
        store.state_dict("a")


WRITER = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from test_store import task_models, HEADS
from slimkit.memory.store import WeightStore
store, go = Path(sys.argv[1]), Path(sys.argv[2])
models = task_models()
Path(f"{go}.ready.{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.005)
written = repaired = 0
for _ in range(3):
    for name, m in models.items():
        r = WeightStore(store).put(name, m, meta={"classes": HEADS[name]})
        written, repaired = written + r.objects_written, repaired + r.objects_repaired
print(written, repaired)
"""


def test_a_store_another_process_just_created_is_opened_not_refused(tmp_path, monkeypatch):
    root = tmp_path / "store"
    WeightStore(root, pool=MappingPool())  # the other process: its marker and subfolders are there
    looks = []
    real = Path.is_file

    def late(path):  # our first look came just before the other creator's marker landed
        if path.name == MARKER and not looks:
            looks.append(path)
            return False
        return real(path)

    monkeypatch.setattr(Path, "is_file", late)
    store = WeightStore(root, pool=MappingPool())
    assert looks == [root / MARKER] and store.root == root and sorted(p.name for p in root.iterdir()) == [
        "models", "objects", MARKER, "tmp"]


def test_two_concurrent_writers_leave_no_corrupt_object(tmp_path):
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER), str(tmp_path / "store"), str(go),
                               str(Path(__file__).parent)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("go.ready.*"))) < 2 and all(p.poll() is None for p in procs):
        assert time.monotonic() < deadline, "the writers did not get ready"
        time.sleep(0.02)
    go.touch()  # both start putting the same models into a store neither has created yet
    counts = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        counts.append([int(x) for x in out.split()])
    # Each object was written once in all: the second writer found it, or lost the link race.
    assert sum(c[0] for c in counts) == 10 and sum(c[1] for c in counts) == 0
    store = WeightStore(tmp_path / "store", pool=MappingPool())
    report = store.verify()
    assert report.ok and report.objects_checked == 10 and not report.unreferenced
    assert list((store.root / "tmp").iterdir()) == []
    with torch.no_grad():
        for name, m in task_models().items():
            torch.testing.assert_close(store.load_into(name, skeleton(HEADS[name]))(X), m(X), rtol=0, atol=0)


@pytest.mark.integration
def test_minilm_with_its_tokenizer_round_trips_through_the_store(tmp_path, one_thread):
    model = load_model("minilm-l6")
    store = WeightStore(tmp_path / "store", pool=MappingPool())
    report = store.put("minilm", model)
    assert report.objects_written == len(store.manifest("minilm")["tensors"]) + len(store.manifest("minilm")["files"])
    back = store.load("minilm")
    batch = back.tokenizer(["a frozen encoder, stored once"], return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        torch.testing.assert_close(back.module(ids, mask), model.module(ids, mask), rtol=1e-5, atol=1e-6)
    assert batch["input_ids"].tolist() == model.tokenizer(["a frozen encoder, stored once"])["input_ids"]
