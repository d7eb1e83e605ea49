"""Atomic writes: the target is absent or complete, temporary files never stay behind."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest

from slimkit.atomic import (
    atomic_dir,
    atomic_path,
    recover_dir,
    write_bytes,
    write_json,
    write_text,
    write_with,
)


class Boom(Exception):
    pass


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_path_success_leaves_only_the_target(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        assert not target.exists()
        tmp.write_bytes(b"complete")
    assert target.read_bytes() == b"complete"
    assert listing(tmp_path) == ["out.bin"]


def test_atomic_path_exception_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise Boom
    assert listing(tmp_path) == []


def test_atomic_path_exception_keeps_the_previous_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old and complete")
    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_bytes(b"new but partial")
        raise Boom
    assert target.read_bytes() == b"old and complete"
    assert listing(tmp_path) == ["out.bin"]


def test_atomic_path_creates_parent_dirs(tmp_path):
    target = tmp_path / "a" / "b" / "c.txt"
    write_text(target, "héllo")
    assert target.read_text(encoding="utf-8") == "héllo"
    assert listing(target.parent) == ["c.txt"]


def test_write_bytes_replaces(tmp_path):
    target = tmp_path / "f"
    write_bytes(target, b"1")
    write_bytes(target, b"22")
    assert target.read_bytes() == b"22"
    assert listing(tmp_path) == ["f"]


def test_write_json_round_trips(tmp_path):
    target = tmp_path / "m.json"
    obj = {"b": [1, 2.5, None], "a": {"x": "y"}}
    write_json(target, obj)
    text = target.read_text()
    assert text.endswith("\n")
    assert json.loads(text) == obj
    assert list(json.loads(text)) == ["b", "a"]  # key order kept
    assert listing(tmp_path) == ["m.json"]


def test_write_json_refuses_nan_and_leaves_no_partial_file(tmp_path):
    target = tmp_path / "m.json"
    target.write_text('{"old": true}\n')
    with pytest.raises(ValueError):
        write_json(target, {"x": math.nan})
    assert json.loads(target.read_text()) == {"old": True}
    assert listing(tmp_path) == ["m.json"]


def test_write_json_unserialisable_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_json(tmp_path / "m.json", {"x": object()})
    assert listing(tmp_path) == []


def test_write_with_partial_writer_leaves_nothing(tmp_path):
    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(b"partial")
            raise Boom

    with pytest.raises(Boom):
        write_with(tmp_path / "w.bin", writer)
    assert listing(tmp_path) == []


def test_write_with_success(tmp_path):
    write_with(tmp_path / "w.bin", lambda tmp: tmp.write_bytes(b"ok"))
    assert (tmp_path / "w.bin").read_bytes() == b"ok"
    assert listing(tmp_path) == ["w.bin"]


def test_atomic_dir_new(tmp_path):
    target = tmp_path / "run"
    with atomic_dir(target) as tmp:
        assert tmp != target and tmp.parent == tmp_path
        (tmp / "metrics.json").write_text("{}")
        assert not target.exists()
    assert listing(target) == ["metrics.json"]
    assert listing(tmp_path) == ["run"]


def test_atomic_dir_replaces_existing_only_on_success(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
        # Until the body finishes, the previous result is intact.
        assert listing(target) == ["old.txt"]
    assert listing(target) == ["new.txt"]
    assert (target / "new.txt").read_text() == "new"
    assert listing(tmp_path) == ["run"]


def test_atomic_dir_keeps_old_dir_when_body_raises(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(Boom), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("partial")
        raise Boom
    assert listing(target) == ["old.txt"]
    assert (target / "old.txt").read_text() == "old"
    assert listing(tmp_path) == ["run"]


def test_atomic_dir_leaves_nothing_when_body_raises_and_no_old_dir(tmp_path):
    with pytest.raises(Boom), atomic_dir(tmp_path / "run") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_text("x")
        raise Boom
    assert listing(tmp_path) == []


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_get_the_usual_mode(tmp_path, umask_022):
    write_text(tmp_path / "f.txt", "x")
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644


def test_atomic_dir_gets_the_usual_mode(tmp_path, umask_022):
    with atomic_dir(tmp_path / "run") as tmp:
        (tmp / "a").write_text("a")
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o755


def test_atomic_dir_removes_leftovers_of_a_killed_run(tmp_path):
    stale = tmp_path / ".run.k1ll3d00.partial"
    stale.mkdir()
    (stale / "half.json").write_text("{")
    with atomic_dir(tmp_path / "run") as tmp:
        (tmp / "done").write_text("ok")
    assert listing(tmp_path) == ["run"]


def test_atomic_dir_leaves_a_sibling_run_in_progress_alone(tmp_path):
    with atomic_dir(tmp_path / "run.v2") as sibling:
        (sibling / "metrics.json").write_text("{}")
        with atomic_dir(tmp_path / "run") as tmp:
            (tmp / "done").write_text("ok")
        sibling_survived = sibling.is_dir()
        if not sibling_survived:
            sibling.mkdir()  # let the outer block finish cleanly
    assert sibling_survived


def test_files_get_the_usual_mode_even_when_the_writer_replaces_them(tmp_path):
    import os

    def writer(tmp):  # like safetensors: write elsewhere, then move over the given path
        other = tmp.with_name("other")
        other.write_text("x")
        other.chmod(0o600)
        os.replace(other, tmp)

    write_with(tmp_path / "f", writer)
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_replace_killed_between_its_two_renames_is_recovered(tmp_path):
    target, aside = tmp_path / "run", tmp_path / ".run.old"
    aside.mkdir()
    (aside / "old.txt").write_text("old")  # the previous result, set aside; the new one never moved in
    recover_dir(target)
    assert listing(tmp_path) == ["run"] and (target / "old.txt").read_text() == "old"
    recover_dir(target)  # nothing to do once it is back
    assert listing(target) == ["old.txt"]
    aside.mkdir()
    (aside / "stale.txt").write_text("x")
    recover_dir(target)  # the directory exists: what is aside is not brought back over it
    assert listing(target) == ["old.txt"]
