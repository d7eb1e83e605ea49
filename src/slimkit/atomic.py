"""Atomic writes: a file is either absent or complete, never half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp (and some writers that replace the file) leave it readable by its owner
        # only; give it the mode a plain write would have.
        tmp_path.chmod(0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Let ``writer`` write to a temporary path, then move it into place."""
    with atomic_path(path) as tmp:
        writer(tmp)


def recover_dir(path: str | os.PathLike) -> None:
    """Put back the previous directory :func:`atomic_dir` set aside, if a process was
    killed between moving it away and moving the new one in (``path`` is then missing
    and only ``.NAME.old`` remains). :func:`atomic_dir` calls it before writing; a reader
    that must find the last complete directory (the distillation trainer, looking for its
    checkpoint) calls it first."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():
        os.replace(old, path)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and move it into place on success.

    An existing directory at ``path`` is replaced only once the new one is complete, so
    an interrupted run leaves the previous result (or nothing), never a partial folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    # Leftovers of a run that was killed outright (no chance to clean up) are removed
    # here; two runs into the same folder at once are not supported. mkdtemp's random
    # part is 8 characters, so a sibling such as NAME.int8 is never matched.
    for stale in path.parent.glob(f".{path.name}.{'?' * 8}.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
