"""The frozen teacher's outputs, cached on disk and reused by later runs.

The cache is one safetensors file holding the teacher's output for every example, in
dataset order. Its metadata records fingerprints of what produced it: the teacher's
weights (and class), the data (every input tensor and the collate function) and what
the cache holds (today the teacher's final outputs, which every output term reads). A
run reuses the file only if all three match and the data's digest checks out, so a
changed teacher, changed data, a truncated or altered file is reported with a
:class:`TeacherCacheWarning` and recomputed, never silently used.

The file is written atomically (complete or absent) and read memory-mapped: batches
are gathered from the mapped file, so the outputs of a large dataset cost no RAM.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from slimkit.atomic import write_with

CACHE_FILE = "teacher_outputs.safetensors"
FORMAT = "slimkit-teacher-cache/1"
_TENSOR = "outputs"
_PARTS = {"teacher": "the teacher's weights", "data": "the data", "contents": "what the cache holds"}


class TeacherCacheWarning(UserWarning):
    """A teacher cache on disk was stale or corrupt and is being recomputed."""


class _Unusable(Exception):
    """Why a cache file cannot be used."""


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _digest(chunks: Iterable[bytes | memoryview]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def tensors_fingerprint(named: Iterable[tuple[str, torch.Tensor]], extra: str = "") -> str:
    """Digest of names, dtypes, shapes and bytes of ``named`` tensors, plus ``extra``."""
    def chunks():
        yield extra.encode()
        for name, t in named:
            yield f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode()
            yield _tensor_bytes(t)
    return _digest(chunks())


def module_fingerprint(module: nn.Module) -> str:
    """Digest of a module's class and state (parameters and buffers)."""
    cls = type(module)
    return tensors_fingerprint(sorted(module.state_dict().items()), f"{cls.__module__}.{cls.__qualname__}")


def data_fingerprint(inputs: dict[str, torch.Tensor], collate: Callable | None) -> str:
    """Digest of the input tensors and the name of the collate function applied to them."""
    name = "none" if collate is None else f"{getattr(collate, '__module__', '')}.{getattr(collate, '__qualname__', repr(collate))}"
    return tensors_fingerprint(sorted(inputs.items()), name)


def _file_data_digest(path: Path) -> str:
    """Digest of the tensor bytes of a one-tensor safetensors file, read without mapping it."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        return _digest(iter(lambda: f.read(1 << 20), b""))


def _open(path: Path, key: dict[str, str], rows: int, check_digest: bool = True) -> torch.Tensor:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or _TENSOR not in f.keys():
                raise _Unusable("it is not a slimkit teacher cache")
            changed = [_PARTS[k] for k in _PARTS if meta.get(k) != key[k]]
            if changed:
                raise _Unusable(f"{' and '.join(changed)} changed since it was written")
            outputs = f.get_tensor(_TENSOR)  # a view of the mapped file, not a copy
    except (SafetensorError, OSError, ValueError) as e:
        raise _Unusable(f"it is unreadable ({e})") from None
    if outputs.shape[0] != rows:
        raise _Unusable(f"it holds {outputs.shape[0]} examples, the data has {rows}")
    if check_digest and _file_data_digest(path) != meta.get("digest"):
        raise _Unusable("its contents do not match their recorded digest (corrupt file)")
    return outputs


def cached_outputs(path: str | Path, key: dict[str, str], rows: int,
                   compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The teacher's outputs from the cache at ``path``, or computed by ``compute`` and cached.

    Args:
        path: the cache file.
        key: fingerprints ``{"teacher": ..., "data": ..., "contents": ...}`` the file must match.
        rows: the number of examples the outputs must cover.
        compute: returns the outputs, ``[rows, ...]``, when the cache cannot be used.

    Returns:
        A CPU tensor memory-mapped from the file.
    """
    path = Path(path)
    if path.exists():
        try:
            return _open(path, key, rows)
        except _Unusable as why:
            warnings.warn(f"{path}: teacher cache not used, {why}; recomputing the teacher's outputs",
                          TeacherCacheWarning, stacklevel=3)
    _write(path, key, compute())
    # Read back mapped: from here on the outputs live in the file, not in RAM.
    return _open(path, key, rows, check_digest=False)


def _write(path: Path, key: dict[str, str], outputs: torch.Tensor) -> None:
    outputs = outputs.detach().float().cpu().contiguous()
    meta = {"format": FORMAT, **key, "digest": _digest([_tensor_bytes(outputs)])}
    write_with(path, lambda tmp: save_file({_TENSOR: outputs}, str(tmp), metadata=meta))
