"""Weights memory-mapped from safetensors, shared by every process and model that loads them.

A safetensors file is an 8-byte little-endian header length, a JSON header giving each
tensor's dtype, shape and byte range, then the raw bytes. :func:`map_safetensors` maps
the file read-only and makes each tensor a view of the mapping, so its bytes live in
the page cache: four processes serving one model hold one copy of the weights, and a
page is read from disk only when it is first used. ``safetensors.safe_open(...,
framework="pt")`` copies every tensor into private memory, which is why the header is
parsed here.

Within one process a :class:`MappingPool` keeps one mapping per file (or per content
hash, for :mod:`slimkit.memory.store`), so two models loaded from the same file share
the very same mapping. The pool holds mappings weakly: once no tensor uses a file, it
is unmapped.

The PSS helpers at the end read ``/proc`` (Linux): proportional set size counts a page
shared by N processes as 1/N in each, so the sum over processes is the memory really
used.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.errors import ModelLoadError, SlimkitError

# safetensors dtype codes; those this torch lacks are left out.
_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64",
}
DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _DTYPE_NAMES.items() if hasattr(torch, name)
}
DTYPE_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
_NOT_WRITABLE = "The given buffer is not writable"


class MappingPool:
    """One mapping per weight file (or content hash) in a process, held weakly.

    Pass a pool explicitly to keep a group of models apart from the rest of the process;
    functions given ``pool=None`` use :func:`default_pool`.
    """

    def __init__(self) -> None:
        self._maps: weakref.WeakValueDictionary[Hashable, mmap.mmap] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self._verified: set[Hashable] = set()
        self.hits = 0
        self.misses = 0

    def map(self, path: str | os.PathLike, key: Hashable | None = None) -> mmap.mmap:
        """A read-only mapping of the whole of ``path``; the same one for the same key.

        ``key`` defaults to the file's identity (device, inode, size, modification time),
        so a file replaced on disk gets a new mapping while the old one stays valid for
        the tensors that use it.
        """
        path = Path(path)
        if key is None:
            st = path.stat()
            key = ("file", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            found = self._maps.get(key)
            if found is not None:
                self.hits += 1
                return found
            mm = _map_file(path, mmap.ACCESS_READ)
            self._maps[key] = mm
            self._verified.discard(key)  # a new mapping has not been checked yet
            self.misses += 1
            return mm

    def is_verified(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._verified and key in self._maps

    def mark_verified(self, key: Hashable) -> None:
        with self._lock:
            self._verified.add(key)

    def __len__(self) -> int:
        return len(self._maps)

    def mapped_bytes(self) -> int:
        """Virtual size of the live mappings (resident memory is at most this)."""
        return sum(len(m) for m in list(self._maps.values()))


_DEFAULT_POOL = MappingPool()


def default_pool() -> MappingPool:
    """The process-wide pool used when no pool is given."""
    return _DEFAULT_POOL


def _map_file(path: Path, access: int) -> mmap.mmap:
    try:
        with open(path, "rb") as f:
            # The mapping stays valid after the file is closed (and after it is deleted
            # or replaced on disk: the inode lives as long as the mapping).
            return mmap.mmap(f.fileno(), 0, access=access)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such weights file") from None
    except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
        raise ModelLoadError(f"{path}: cannot memory-map it ({e})") from None


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file (offsets from the start of the file)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse a safetensors header: each tensor's dtype, shape and byte range, and the metadata.

    Raises:
        ModelLoadError: the file is missing, truncated or its header is malformed.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise ModelLoadError(f"{path}: {size} bytes is too short for a safetensors file")
            n = int.from_bytes(head, "little")
            if n > min(_MAX_HEADER, size - 8):
                raise ModelLoadError(f"{path}: header length {n} exceeds the file ({size} bytes); "
                                     "the file is truncated or not safetensors")
            raw = f.read(n)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such weights file") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    entries, problems = {}, []
    for name, info in header.items():
        try:
            code, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            dtype = DTYPES[code]
            shape = tuple(int(s) for s in shape)
            numel = 1
            for s in shape:
                numel *= s
            if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != numel * dtype.itemsize:
                raise ValueError(f"shape {list(shape)} of {code} does not fill bytes [{begin}, {end})")
        except KeyError as e:
            problems.append(f"{name}: unknown dtype or missing field {e}")
            continue
        except (TypeError, ValueError) as e:
            problems.append(f"{name}: {e}")
            continue
        if base + end > size:
            problems.append(f"{name}: bytes [{begin}, {end}) run past the end of the file ({size - base} data bytes)")
            continue
        entries[name] = TensorEntry(dtype, shape, base + begin, base + end)
    if problems:
        raise ModelLoadError(f"{path}: {len(problems)} bad tensor entr{'y' if len(problems) == 1 else 'ies'} "
                             f"(truncated or corrupt file): " + "; ".join(problems[:5]))
    return entries, metadata


def tensor_from_mapping(mm: mmap.mmap, dtype: torch.dtype, shape: Sequence[int], offset: int = 0) -> torch.Tensor:
    """A tensor viewing ``mm[offset:]`` (no copy).

    A read-only mapping gives a tensor that torch believes writable: torch has no
    read-only tensors. Writing into it (``p.add_(1)``, ``copy_``) stops the process
    with SIGSEGV; nothing ever reaches the file. Load with ``writable=True`` for
    copy-on-write weights that can be changed in place.
    """
    numel = 1
    for s in shape:
        numel *= int(s)
    if numel == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    if sys.byteorder != "little":
        raise ModelLoadError("memory-mapped weights are little-endian; this machine is big-endian")
    if offset % dtype.itemsize:
        # An unaligned tensor (never written by safetensors itself, which sorts tensors
        # by alignment) is copied rather than viewed at an address kernels may not accept.
        raw = _frombuffer(mm, torch.uint8, numel * dtype.itemsize, offset)
        return raw.clone().view(dtype).reshape(tuple(shape))
    return _frombuffer(mm, dtype, numel, offset).view(tuple(shape))


def _frombuffer(mm: mmap.mmap, dtype: torch.dtype, count: int, offset: int) -> torch.Tensor:
    with warnings.catch_warnings():
        # Expected for a read-only mapping: see tensor_from_mapping.
        warnings.filterwarnings("ignore", message=_NOT_WRITABLE, category=UserWarning)
        return torch.frombuffer(mm, dtype=dtype, count=count, offset=offset)


def map_safetensors(
    path: str | os.PathLike, *, pool: MappingPool | None = None, writable: bool = False
) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, each a view of one memory mapping of the file.

    Args:
        path: a ``.safetensors`` file.
        pool: where the read-only mapping is shared (``None``: the process-wide pool).
        writable: map copy-on-write instead of read-only: a page written by this
            process becomes a private copy (the file and other processes never see
            the change). Such mappings are never pooled.

    Raises:
        ModelLoadError: the file is missing, truncated or malformed.
    """
    entries, _ = read_header(path)
    if writable:
        mm = _map_file(Path(path), mmap.ACCESS_COPY)
    else:
        mm = (_DEFAULT_POOL if pool is None else pool).map(path)
    return {name: tensor_from_mapping(mm, e.dtype, e.shape, e.start) for name, e in entries.items()}


@contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules whose parameters live on the meta device (no memory, no init cost).

    Buffers are built as usual, so those a weights file does not hold (BERT's
    ``position_ids``) are right. Assign the real weights with :func:`assign_weights_`.
    Not thread-safe: it swaps ``nn.Module.register_parameter`` while it is open.
    """
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta" and type(param) is nn.Parameter:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def assign_weights_(
    module: nn.Module, tensors: Mapping[str, torch.Tensor], *, strict: bool = True, requires_grad: bool = False
) -> nn.Module:
    """Make ``tensors`` the module's parameters and buffers without copying them.

    Tied parameters (one ``nn.Parameter`` under several names) stay tied; a weights
    file that stores a tied tensor once fills all its names.

    Args:
        module: the module, typically built under :func:`empty_weights`.
        tensors: state-dict names to tensors, e.g. from :func:`map_safetensors`.
        strict: every state-dict entry must be given, and nothing else.
        requires_grad: set on every parameter; memory-mapped weights are for inference.

    Raises:
        ModelLoadError: names or shapes do not match (every mismatch is listed).
    """
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    tied = [names for names in groups.values() if len(names) > 1]
    given = dict(tensors)
    for names in tied:
        have = next((n for n in names if n in given), None)
        if have is not None:
            for n in names:
                given.setdefault(n, given[have])
    try:
        module.load_state_dict(given, strict=strict, assign=True)
    except RuntimeError as e:
        raise ModelLoadError(f"the weights do not match the model: {str(e).strip()[:2000]}") from None
    for names in tied:
        first = module.get_parameter(names[0])
        for n in names[1:]:
            owner, _, attr = n.rpartition(".")
            setattr(module.get_submodule(owner), attr, first)
    for p in module.parameters():
        p.requires_grad_(requires_grad)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ModelLoadError(f"{len(left)} tensors have no weights: {', '.join(left[:10])}")
    return module


def load_mapped_(module: nn.Module, path: str | os.PathLike, *, pool: MappingPool | None = None,
                 writable: bool = False, strict: bool = True) -> nn.Module:
    """Assign the weights of a safetensors file to ``module``, memory-mapped (see :func:`map_safetensors`)."""
    tensors = map_safetensors(path, pool=pool, writable=writable)
    return assign_weights_(module, tensors, strict=strict)


def build_skeleton(meta: Mapping[str, Any], tokenizer_dir: Path | None = None):
    """Rebuild the architecture described by a ``slimkit.json`` with no weights in it.

    Returns a :class:`slimkit.zoo.models.LoadedModel` whose parameters are on the meta
    device, ready for :func:`assign_weights_`. Transforms (quantization, pruning) are
    replayed on a model built normally: their handlers read the weights' values.
    """
    from slimkit.quantize.api import TRANSFORMS_ATTR
    from slimkit.serialize import changes_structure, replay_transforms
    from slimkit.zoo.models import build_from_spec

    transforms = list(meta.get("transforms", []))
    if not any(changes_structure(t) for t in transforms):
        with empty_weights():
            model = build_from_spec(dict(meta["spec"]), tokenizer_dir)
        object.__setattr__(model.module, TRANSFORMS_ATTR, transforms)
    else:
        model = build_from_spec(dict(meta["spec"]), tokenizer_dir)
        with torch.no_grad():
            for p in model.module.parameters():
                p.zero_()
        replay_transforms(model, transforms)
    return model


def load_shared(folder: str | os.PathLike, *, pool: MappingPool | None = None, writable: bool = False):
    """Load a model saved by :func:`slimkit.save` with memory-mapped weights.

    It gives the same outputs as :func:`slimkit.load`, but its weights are views of the
    page cache: processes and models that load the same folder share them.

    Args:
        folder: a folder written by :func:`slimkit.save` (PyTorch, not ONNX).
        pool: the mapping pool (``None``: the process-wide one).
        writable: copy-on-write weights (see :func:`map_safetensors`); by default they
            are read-only and an in-place change stops the process.

    Raises:
        ModelLoadError: the folder is not a PyTorch model saved by slimkit, or its
            weights are missing, corrupt or do not match ``slimkit.json``.
    """
    from slimkit.serialize import read_meta

    folder = Path(folder)
    meta = read_meta(folder)
    if meta["framework"] != "torch":
        raise ModelLoadError(f"{folder} holds an {meta['framework']} model; ONNX Runtime maps its own "
                             "weights, load it with slimkit.load")
    tok_dir = folder / meta["tokenizer"] if meta.get("tokenizer") else None
    model = build_skeleton(meta, tok_dir)
    try:
        load_mapped_(model.module, folder / meta["weights"], pool=pool, writable=writable)
    except ModelLoadError as e:
        raise ModelLoadError(f"{folder / meta['weights']}: {e}; the file is corrupt or does not match "
                             "slimkit.json") from None
    model.module.eval()
    return model


# -- proportional set size (Linux /proc) ----------------------------------------------------


def smaps_rollup(pid: int | str = "self") -> dict[str, int]:
    """Memory totals of a process from ``/proc/PID/smaps_rollup``, in bytes.

    Keys as the kernel names them: ``Rss``, ``Pss``, ``Pss_Anon``, ``Pss_File``,
    ``Shared_Clean``, ``Private_Dirty``, ``Swap``, ...

    Raises:
        SlimkitError: not on Linux, or the process is gone.
    """
    rollup = Path(f"/proc/{pid}/smaps_rollup")
    try:
        text = rollup.read_text()
    except FileNotFoundError:
        if not Path("/proc/self/smaps").exists():
            raise SlimkitError("proportional set size needs Linux /proc/PID/smaps") from None
        try:
            text = Path(f"/proc/{pid}/smaps").read_text()  # kernels before 4.14: sum the mappings
        except FileNotFoundError:
            raise SlimkitError(f"process {pid} is gone; no memory to read") from None
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and len(parts) == 2 and parts[1] == "kB" and " " not in key:
            out[key] = out.get(key, 0) + int(parts[0]) * 1024
    return out


def pss_bytes(pid: int | str = "self") -> int:
    """Proportional set size of a process: its private pages plus its share of shared ones."""
    return smaps_rollup(pid)["Pss"]


def mapped_file_memory(pid: int | str, paths: Iterable[str | os.PathLike]) -> dict[str, int]:
    """``Rss`` and ``Pss`` (bytes) of a process's mappings of the given files or folders.

    A folder counts every file under it. Use it to see how much of a weights file is
    resident, and that N processes' shares of it add up to one copy.
    """
    roots = [os.path.realpath(p) for p in paths]
    total = {"Rss": 0, "Pss": 0}
    counting = False
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except FileNotFoundError:
        raise SlimkitError(f"cannot read /proc/{pid}/smaps (not Linux, or the process is gone)") from None
    for line in text.splitlines():
        first = line.split(None, 1)[0] if line else ""
        if "-" in first and ":" not in first:  # a mapping header: "start-end perms offset dev inode [path]"
            fields = line.split(None, 5)
            target = fields[5].removesuffix(" (deleted)") if len(fields) == 6 else ""
            counting = bool(target) and any(target == r or target.startswith(r + os.sep) for r in roots)
        elif counting and first in ("Rss:", "Pss:"):
            total[first[:-1]] += int(line.split()[1]) * 1024
    return total


READY = "slimkit-ready "


def ready_for_measurement(info: Mapping[str, Any] | None = None) -> None:
    """In a child of :func:`measure_together`: report ready, then wait to be measured."""
    sys.stdout.write(READY + json.dumps(dict(info or {})) + "\n")
    sys.stdout.flush()
    sys.stdin.readline()


@dataclass
class ProcessMemory:
    """One process's memory, read while every process of its group was alive and idle."""

    pid: int
    pss: int
    rss: int
    uss: int  # private pages only: what ending this process alone would free
    files: dict[str, int] = field(default_factory=dict)  # Rss/Pss of the mappings of ``files``
    info: dict[str, Any] = field(default_factory=dict)  # what the child reported


def measure_together(
    commands: Sequence[Sequence[str]],
    *,
    env: Mapping[str, str] | None = None,
    files: Iterable[str | os.PathLike] = (),
    timeout: float = 900.0,
) -> list[ProcessMemory]:
    """Start the commands at once; measure all of them when all are ready; let them exit.

    Each command is a process that loads what it serves, runs it, then calls
    :func:`ready_for_measurement` (it prints a line starting ``slimkit-ready`` and
    blocks on stdin). Measuring only when every process is alive is what makes shared
    pages show as shared.

    Raises:
        SlimkitError: a process failed or was not ready within ``timeout`` seconds
            (every process is then stopped).
    """
    files = list(files)
    procs, logs, infos = [], [], [None] * len(commands)
    try:
        for cmd in commands:
            log = tempfile.TemporaryFile(mode="w+")
            logs.append(log)
            procs.append(subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                          text=True, env=None if env is None else dict(env)))

        def wait_ready(i: int) -> None:
            for line in procs[i].stdout:
                if line.startswith(READY):
                    infos[i] = json.loads(line[len(READY):])
                    return

        readers = [threading.Thread(target=wait_ready, args=(i,), daemon=True) for i in range(len(procs))]
        deadline = time.monotonic() + timeout
        for t in readers:
            t.start()
        for t in readers:
            t.join(max(0.0, deadline - time.monotonic()))
        failed = [i for i, info in enumerate(infos) if info is None]
        if failed:
            i = failed[0]
            procs[i].poll()
            logs[i].seek(0)
            tail = logs[i].read()[-3000:]
            state = f"exited with {procs[i].returncode}" if procs[i].returncode is not None else f"not ready after {timeout:.0f} s"
            raise SlimkitError(f"measured process {' '.join(commands[i])} {state}:\n{tail}")
        out = []
        for p, info in zip(procs, infos, strict=True):
            m = smaps_rollup(p.pid)
            uss = m.get("Private_Clean", 0) + m.get("Private_Dirty", 0)
            out.append(ProcessMemory(p.pid, m["Pss"], m["Rss"], uss,
                                     mapped_file_memory(p.pid, files) if files else {}, info or {}))
        for p in procs:
            p.stdin.write("\n")
            p.stdin.close()
        for p, cmd, log in zip(procs, commands, logs, strict=True):
            if p.wait(timeout) != 0:
                log.seek(0)
                raise SlimkitError(f"measured process {' '.join(cmd)} exited with {p.returncode}:\n{log.read()[-3000:]}")
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            for stream in (p.stdin, p.stdout):
                if stream is not None and not stream.closed:
                    stream.close()
        for log in logs:
            log.close()
