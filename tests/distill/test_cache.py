"""The teacher's outputs cached on disk: reused while valid, recomputed (with a warning) when not."""

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from tiny_models import SeededMLP

from slimkit.distill import DistillConfig, DistillData, LossTerm, distill
from slimkit.distill.cache import CACHE_FILE, TeacherCacheWarning, cached_outputs
from slimkit.distill.trainer import Distiller
from slimkit.errors import ConfigError


def data(n=64, seed=1):
    return DistillData({"x": torch.randn(n, 10, generator=torch.Generator().manual_seed(seed))})


def config(**kw):
    return DistillConfig(losses=[LossTerm(kind="soft_kl", temperature=2.0)], epochs=3, batch_size=16, seed=5, **kw)


def disk(folder: Path) -> DistillConfig:
    return config(cache_teacher="disk", cache_dir=str(folder))


def trained(teacher, cfg, d=None, **kw) -> dict[str, torch.Tensor]:
    student = SeededMLP(8, 1, dropout=0.2)
    distill(teacher, student, d or data(), cfg, progress=False, **kw)
    return student.state_dict()


def assert_same(a, b, exact=False):
    for k, v in a.items():
        if exact:
            torch.testing.assert_close(b[k], v, rtol=0, atol=0)
        else:
            torch.testing.assert_close(b[k], v, rtol=1e-5, atol=1e-6)


def test_a_second_run_reuses_the_cache_without_running_the_teacher(tmp_path):
    teacher = SeededMLP(32, 0)
    plain = trained(teacher, config())
    teacher.calls = 0
    first = trained(teacher, disk(tmp_path))
    assert teacher.calls == 1 and (tmp_path / CACHE_FILE).is_file()  # 64 examples: one pass of up to 256
    teacher.calls = 0
    second = trained(teacher, disk(tmp_path))
    assert teacher.calls == 0
    assert_same(first, second, exact=True)
    assert_same(plain, second)


def test_a_changed_teacher_invalidates_the_cache(tmp_path):
    teacher = SeededMLP(32, 0)
    trained(teacher, disk(tmp_path))
    with torch.no_grad():
        teacher.head.bias.add_(0.5)
    teacher.calls = 0
    with pytest.warns(TeacherCacheWarning, match="the teacher's weights changed since it was written; recomputing"):
        cached = trained(teacher, disk(tmp_path))
    assert teacher.calls == 1
    assert_same(trained(teacher, config()), cached)


def test_changed_data_invalidates_the_cache(tmp_path):
    teacher = SeededMLP(32, 0)
    trained(teacher, disk(tmp_path))
    with pytest.warns(TeacherCacheWarning, match="the data changed"):
        cached = trained(teacher, disk(tmp_path), data(seed=2))
    assert_same(trained(teacher, config(), data(seed=2)), cached)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_file_is_detected_and_recomputed(tmp_path, damage):
    teacher = SeededMLP(32, 0)
    first = trained(teacher, disk(tmp_path))
    path = tmp_path / CACHE_FILE
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) - 100])
        why = "unreadable"
    else:
        raw[-3] ^= 0xFF  # one byte of the stored outputs, the file's size unchanged
        path.write_bytes(raw)
        why = "do not match their recorded digest"
    teacher.calls = 0
    with pytest.warns(TeacherCacheWarning, match=why):
        again = trained(teacher, disk(tmp_path))
    assert teacher.calls == 1
    assert_same(first, again, exact=True)
    teacher.calls = 0
    trained(teacher, disk(tmp_path))  # rewritten: used again, silently
    assert teacher.calls == 0


def test_the_cache_defaults_into_the_checkpoint_folder_and_survives_checkpoints(tmp_path):
    teacher = SeededMLP(32, 0)
    cfg = config(cache_teacher="disk", checkpoint_every=1)
    straight = trained(teacher, cfg, checkpoint_dir=tmp_path / "straight")

    class Crash(Exception):
        pass

    def crash_at_second_eval(m, calls=[]):  # noqa: B006 (counts calls across invocations)
        calls.append(1)
        if len(calls) == 2:
            raise Crash
        return {}

    with pytest.raises(Crash):
        trained(teacher, cfg, checkpoint_dir=tmp_path / "ck", evaluate=crash_at_second_eval)
    assert (tmp_path / "ck" / CACHE_FILE).is_file() and (tmp_path / "ck" / "state.json").is_file()
    teacher.calls = 0
    resumed = trained(teacher, cfg, checkpoint_dir=tmp_path / "ck")
    assert teacher.calls == 0
    assert_same(straight, resumed, exact=True)


def test_the_cache_is_memory_mapped(tmp_path):
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs Linux's /proc/self/maps")
    d = Distiller(SeededMLP(32, 0), SeededMLP(8, 1), data(), disk(tmp_path), device="cpu", progress=False)
    ptr = d.teacher_cache.data_ptr()
    mapped = [line.split()[0] for line in maps.read_text().splitlines() if line.endswith(str(tmp_path / CACHE_FILE))]
    assert any(int(lo, 16) <= ptr < int(hi, 16) for lo, hi in (r.split("-") for r in mapped))


def test_cached_outputs_primitive(tmp_path):
    path, key = tmp_path / "c.safetensors", {"teacher": "a", "data": "b", "contents": "outputs"}
    outputs = torch.arange(12.0).reshape(4, 3)
    torch.testing.assert_close(cached_outputs(path, key, 4, lambda: outputs), outputs)
    torch.testing.assert_close(cached_outputs(path, key, 4, lambda: pytest.fail("recomputed")), outputs)
    with pytest.warns(TeacherCacheWarning, match="it holds 4 examples, the data has 5"):
        cached_outputs(path, key, 5, lambda: torch.zeros(5, 3))


def test_disk_cache_needs_a_folder():
    with pytest.raises(ConfigError, match="cache_teacher='disk' needs a folder: set cache_dir, or give a checkpoint_dir"):
        Distiller(SeededMLP(32, 0), SeededMLP(8, 1), data(), config(cache_teacher="disk"), progress=False)


def test_cache_teacher_accepts_the_old_booleans():
    assert config(cache_teacher=True).cache_teacher == "memory"
    assert config(cache_teacher=False).cache_teacher == "none"
    on_disk = config(cache_teacher="disk", cache_dir="c")
    assert DistillConfig.model_validate(on_disk.model_dump(mode="json")) == on_disk
    with pytest.raises(ValidationError, match="cache_dir applies to cache_teacher='disk'"):
        config(cache_teacher="memory", cache_dir="c")
