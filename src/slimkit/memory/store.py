"""A content-addressed weight store: each distinct tensor is stored, and mapped, once.

Models that share weights — three task heads over one frozen encoder, a model and a
fine-tune whose frozen layers did not change — share the objects that hold them, on
disk and in memory::

    root/
      slimkit-store.json          format marker
      objects/ab/abcdef…          raw little-endian tensor bytes, named by their SHA-256
      models/NAME.json            manifest: tensor name -> {hash, dtype, shape, nbytes},
                                  plus the slimkit.json description of the architecture
      tmp/                        objects being written

An object is written to ``tmp/``, flushed to disk, then hard-linked into place: it
appears complete or not at all, and when two writers store the same object at once the
first link wins and the second finds it there. Manifests are replaced atomically. A
put holds a shared lock on the store and :meth:`WeightStore.gc` an exclusive one, so
collecting garbage never removes an object a put is about to reference.

Reading maps each object read-only through a :class:`~slimkit.memory.shared_weights.MappingPool`
keyed by hash, so every model in a process that uses an object gets views of one
mapping, and processes share its pages. Each object's hash is checked when it is
loaded; a corrupt or truncated object is reported with the models and tensors that
use it, and models that do not use it load as before.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from slimkit import __version__
from slimkit.atomic import write_json
from slimkit.errors import ModelLoadError, SlimkitError
from slimkit.memory.shared_weights import (
    DTYPE_CODES,
    DTYPES,
    MappingPool,
    assign_weights_,
    build_skeleton,
    default_pool,
    tensor_from_mapping,
)

try:
    import fcntl
except ImportError:  # not POSIX: no locking between put and gc
    fcntl = None  # type: ignore[assignment]

FORMAT = "slimkit.store"
FORMAT_VERSION = 1
MANIFEST_FORMAT = "slimkit.store.manifest"
MARKER = "slimkit-store.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEX = re.compile(r"[0-9a-f]{64}")
_CHUNK = 8 * 1024 * 1024

Verify = Literal["full", "once"]


class StoreError(SlimkitError):
    """The store, a model name or a model given to the store is unusable."""


@dataclass
class ObjectProblem:
    """A stored object that is missing, truncated or whose bytes no longer match its hash."""

    digest: str
    path: Path
    problem: str
    used_by: list[str] = field(default_factory=list)  # "model: tensor, tensor, …"

    def __str__(self) -> str:
        users = "; ".join(self.used_by) if self.used_by else "no model"
        return f"object {self.digest[:16]}… ({self.path}): {self.problem}; used by {users}"


class CorruptObjectError(ModelLoadError):
    """One or more objects a model needs are missing, truncated or corrupt.

    ``problems`` lists each bad object with the models and tensors that use it.
    """

    def __init__(self, root: Path, problems: list[ObjectProblem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"weight store {root}: {len(problems)} bad object(s):\n{lines}\n"
            "Models that do not use these objects are not affected. Put an affected model "
            "again to rewrite its objects, or remove the models that use them and run gc()."
        )


@dataclass
class PutReport:
    """What :meth:`WeightStore.put` did: how much was new and how much deduplicated."""

    name: str
    tensors: int
    logical_bytes: int  # the model's tensors and files, as if stored alone
    objects_written: int = 0
    objects_reused: int = 0
    objects_repaired: int = 0  # present but corrupt; rewritten
    bytes_written: int = 0


@dataclass
class StoreStats:
    """Deduplication at a glance: logical bytes (every model counted whole) vs stored bytes."""

    models: int
    objects: int
    logical_bytes: int  # sum over models of their tensors' and files' bytes
    unique_bytes: int  # bytes of the distinct objects the models reference
    stored_bytes: int  # apparent size of objects and manifests on disk
    allocated_bytes: int  # blocks they use on disk
    unreferenced_objects: int

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.unique_bytes if self.unique_bytes else 1.0


@dataclass
class VerifyReport:
    """Every referenced object checked against its hash."""

    objects_checked: int
    bytes_checked: int
    problems: list[ObjectProblem]
    bad_manifests: list[str]
    unreferenced: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems and not self.bad_manifests


@dataclass
class GcReport:
    objects_removed: int
    bytes_freed: int
    temp_files_removed: int


def tensor_bytes(t: torch.Tensor):
    """The tensor's raw bytes (little-endian, C order) as a NumPy ``uint8`` array, no copy if contiguous."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest() if hasattr(hashlib, "file_digest") else _sha_loop(f)


def _sha_loop(f) -> str:
    h = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


class WeightStore:
    """A content-addressed store of model weights (see the module docstring).

    Args:
        root: the store's folder; created if missing.
        pool: mapping pool for loads (``None``: the process-wide one), keyed by hash.
    """

    def __init__(self, root: str | os.PathLike, *, pool: MappingPool | None = None):
        self.root = Path(root)
        self.pool = default_pool() if pool is None else pool
        marker = self.root / MARKER
        if not marker.is_file():
            # A concurrent creator may be writing the marker (a hidden temporary file).
            others = [p.name for p in self.root.iterdir() if not p.name.startswith(f".{MARKER}.")] \
                if self.root.is_dir() else []
            # Checked again after listing: a concurrent creator renames its marker into place
            # before it makes the subfolders, so what it made is never mistaken for a stranger's.
            if others and not marker.is_file():
                raise StoreError(f"{self.root} is a non-empty folder but not a weight store (no {MARKER}); "
                                 "give an empty or new folder")
            if not marker.is_file():
                write_json(marker, {"format": FORMAT, "format_version": FORMAT_VERSION})
        try:
            doc = json.loads(marker.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{marker}: corrupt JSON ({e})") from None
        if doc.get("format") != FORMAT or doc.get("format_version", 0) > FORMAT_VERSION:
            raise StoreError(f"{marker}: format {doc.get('format')!r} v{doc.get('format_version')} is not one "
                             f"this slimkit ({__version__}) reads; upgrade slimkit")
        for sub in ("objects", "models", "tmp"):
            (self.root / sub).mkdir(exist_ok=True)

    # -- writing ---------------------------------------------------------------------------

    def put(self, name: str, model: Any, *, meta: dict[str, Any] | None = None) -> PutReport:
        """Store a model's weights under ``name`` (replacing a model of that name).

        Args:
            name: letters, digits, ``.``, ``_`` and ``-``.
            model: a :class:`slimkit.zoo.models.LoadedModel` (its architecture and
                tokenizer are kept, so :meth:`load` can rebuild it) or an ``nn.Module``
                (load it with :meth:`load_into` a module you build).
            meta: JSON-serialisable notes kept in the manifest, e.g. how to build the
                module.

        Raises:
            StoreError: a bad name, or tensors that cannot be stored (every one listed).
        """
        from slimkit.quantize.api import transforms_of
        from slimkit.zoo.models import LoadedModel

        self._check_name(name)
        if isinstance(model, LoadedModel):
            module, tokenizer = model.module, model.tokenizer
            slim = {"spec": model.spec, "max_seq_len": model.max_seq_len, "transforms": transforms_of(module)}
        elif isinstance(model, nn.Module):
            module, tokenizer, slim = model, None, None
        else:
            raise StoreError(f"cannot store a {type(model).__name__}; give a LoadedModel or an nn.Module "
                             "(an ONNX model keeps its weights in its .onnx file)")
        state = module.state_dict()
        problems = []
        for key, t in state.items():
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.is_quantized:
                problems.append(f"{key}: a {type(t).__name__} ({getattr(t, 'layout', '')}) is not a plain tensor")
            elif t.dtype not in DTYPE_CODES:
                problems.append(f"{key}: dtype {t.dtype} has no safetensors code")
            elif t.device.type == "meta":
                problems.append(f"{key}: on the meta device, it has no values")
        if problems:
            raise StoreError(f"model {name!r}: {len(problems)} tensor(s) cannot be stored:\n"
                             + "\n".join(f"  - {p}" for p in problems))
        if sys.byteorder != "little":
            raise StoreError("the store holds little-endian bytes; this machine is big-endian")
        logical = sum(t.numel() * t.element_size() for t in state.values())
        report = PutReport(name, len(state), logical)
        tensors: dict[str, dict[str, Any]] = {}
        files: dict[str, dict[str, Any]] = {}
        seen: dict[tuple, str] = {}  # tied tensors are hashed once
        with self._lock(exclusive=False):
            for key, t in state.items():
                ident = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
                data = tensor_bytes(t)
                digest = seen.get(ident) if t.numel() else None
                if digest is None:
                    digest = hashlib.sha256(data).hexdigest()
                    self._put_object(digest, data, report)
                    seen[ident] = digest
                tensors[key] = {"hash": digest, "dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape),
                                "nbytes": int(data.nbytes)}
            if tokenizer is not None:
                with tempfile.TemporaryDirectory(prefix="slimkit-tok-") as tmp:
                    tokenizer.save_pretrained(tmp)
                    for f in sorted(Path(tmp).rglob("*")):
                        if f.is_file():
                            data = f.read_bytes()
                            digest = hashlib.sha256(data).hexdigest()
                            self._put_object(digest, data, report)
                            files[f"tokenizer/{f.relative_to(tmp).as_posix()}"] = {"hash": digest, "nbytes": len(data)}
                            report.logical_bytes += len(data)
            manifest = {
                "format": MANIFEST_FORMAT, "format_version": FORMAT_VERSION, "slimkit_version": __version__,
                "name": name, "slimkit": slim, "meta": meta, "tensors": tensors, "files": files,
            }
            write_json(self._manifest_path(name), manifest)
        return report

    def _put_object(self, digest: str, data, report: PutReport) -> None:
        path = self._object_path(digest)
        nbytes = len(memoryview(data).cast("B"))
        repair = False
        if path.exists():
            if path.stat().st_size == nbytes and _file_sha256(path) == digest:
                report.objects_reused += 1
                return
            repair = True
        path.parent.mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{digest[:16]}.", suffix=".tmp", dir=self.root / "tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(memoryview(data).cast("B"))
                f.flush()
                os.fsync(f.fileno())  # a crash must never leave a named object with missing bytes
            os.chmod(tmp, 0o444)  # objects never change; guard against an accidental write
            if repair:
                os.replace(tmp, path)
                report.objects_repaired += 1
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    report.objects_reused += 1  # a concurrent writer stored it first
                    return
                except OSError:  # a file system without hard links
                    os.replace(tmp, path)
                report.objects_written += 1
            report.bytes_written += nbytes
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def remove(self, name: str) -> None:
        """Forget a model; its objects stay until :meth:`gc` finds no model using them."""
        self._check_name(name)
        path = self._manifest_path(name)
        if not path.is_file():
            raise ModelLoadError(self._no_model(name))
        path.unlink()

    # -- reading ---------------------------------------------------------------------------

    def models(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "models").glob("*.json") if not p.name.startswith("."))

    def manifest(self, name: str) -> dict[str, Any]:
        """A model's manifest (tensors, files, architecture and ``meta``)."""
        self._check_name(name)
        path = self._manifest_path(name)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelLoadError(self._no_model(name)) from None
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{path}: corrupt manifest ({e}); put model {name!r} again") from None
        if doc.get("format") != MANIFEST_FORMAT or doc.get("format_version", 0) > FORMAT_VERSION:
            raise ModelLoadError(f"{path}: format {doc.get('format')!r} v{doc.get('format_version')} is not one "
                                 f"this slimkit ({__version__}) reads; upgrade slimkit")
        return doc

    def state_dict(self, name: str, *, verify: Verify = "full") -> dict[str, torch.Tensor]:
        """The model's tensors as read-only views of the pooled object mappings.

        Args:
            verify: ``"full"`` hashes every object on every load; ``"once"`` hashes an
                object the first time this process maps it and trusts the mapping after.

        Raises:
            CorruptObjectError: an object is missing, truncated or fails its hash
                (every bad object is listed, with the models that use it).
        """
        if verify not in ("full", "once"):
            raise StoreError(f"verify={verify!r}; use 'full' or 'once'")
        entries = self.manifest(name)["tensors"]
        maps, problems = {}, []
        for digest, nbytes in sorted({(e["hash"], e["nbytes"]) for e in entries.values()}):
            try:
                maps[digest] = self._map_object(digest, nbytes, verify)
            except _Bad as bad:
                problems.append(ObjectProblem(digest, self._object_path(digest), str(bad)))
        if problems:
            self._raise(problems)
        out = {}
        for key, e in entries.items():
            dtype = DTYPES.get(e["dtype"])
            if dtype is None:
                raise ModelLoadError(f"{self._manifest_path(name)}: {key} has dtype {e['dtype']!r}, unknown to this torch")
            # A manifest edited by hand (or damaged) could pair a shape with too few bytes.
            expected = math.prod(e["shape"]) * dtype.itemsize
            if expected != e["nbytes"]:
                raise ModelLoadError(
                    f"{self._manifest_path(name)}: {key} is {e['shape']} {e['dtype']} ({expected} bytes) but its "
                    f"object holds {e['nbytes']} bytes; the manifest is corrupt: put model {name!r} again")
            mm = maps[e["hash"]]
            out[key] = torch.empty(e["shape"], dtype=dtype) if mm is None else tensor_from_mapping(mm, dtype, e["shape"])
        return out

    def load_into(self, name: str, module: nn.Module, *, verify: Verify = "full", strict: bool = True) -> nn.Module:
        """Give ``module`` the stored weights of ``name``, memory-mapped and read-only.

        Build ``module`` under :func:`~slimkit.memory.shared_weights.empty_weights` so no
        memory is spent on weights that are replaced at once.
        """
        return assign_weights_(module, self.state_dict(name, verify=verify), strict=strict)

    def load(self, name: str, *, verify: Verify = "full"):
        """Rebuild a model stored from a ``LoadedModel``, its weights memory-mapped.

        Raises:
            StoreError: the model was stored as a plain ``nn.Module``; use :meth:`load_into`.
            CorruptObjectError: see :meth:`state_dict`.
        """
        manifest = self.manifest(name)
        if manifest.get("slimkit") is None:
            raise StoreError(f"model {name!r} was stored as a plain nn.Module; build it and use load_into()")
        weights = self.state_dict(name, verify=verify)
        with tempfile.TemporaryDirectory(prefix="slimkit-tok-") as tmp:
            tok_dir = None
            if manifest.get("files"):
                problems = []
                for rel, e in manifest["files"].items():
                    path = self._object_path(e["hash"])
                    try:
                        data = path.read_bytes()
                    except FileNotFoundError:
                        problems.append(ObjectProblem(e["hash"], path, "missing"))
                        continue
                    if hashlib.sha256(data).hexdigest() != e["hash"]:
                        problems.append(ObjectProblem(e["hash"], path, f"{len(data)} bytes that do not match the hash"))
                        continue
                    target = Path(tmp) / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                if problems:
                    self._raise(problems)
                tok_dir = Path(tmp) / "tokenizer"
            model = build_skeleton(manifest["slimkit"], tok_dir)
        assign_weights_(model.module, weights)
        model.module.eval()
        return model

    def _map_object(self, digest: str, nbytes: int, verify: Verify):
        if nbytes == 0:
            return None
        path = self._object_path(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise _Bad("missing") from None
        if st.st_size != nbytes:
            raise _Bad(_size_problem(st.st_size, nbytes))
        # The hash names the content, the inode the file: an object rewritten by put()
        # after corruption gets a fresh mapping, not the old bad one.
        key = ("sha256", digest, st.st_dev, st.st_ino, st.st_mtime_ns)
        try:
            mm = self.pool.map(path, key)
        except ModelLoadError as e:
            raise _Bad(str(e)) from None
        if len(mm) != nbytes:
            raise _Bad(_size_problem(len(mm), nbytes))
        if verify == "full" or not self.pool.is_verified(key):
            found = hashlib.sha256(mm).hexdigest()
            if found != digest:
                raise _Bad(f"its bytes hash to {found[:16]}…, not to its name: the file changed on disk")
            self.pool.mark_verified(key)
        return mm

    # -- maintenance -----------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Hash every object a model references (reading the files, not mapping them)."""
        refs, bad_manifests = self._references()
        problems, checked, nbytes = [], 0, 0
        for digest, size in sorted(refs.items()):
            path = self._object_path(digest)
            checked += 1
            try:
                st = path.stat()
            except FileNotFoundError:
                problems.append(ObjectProblem(digest, path, "missing"))
                continue
            if st.st_size != size:
                problems.append(ObjectProblem(digest, path, _size_problem(st.st_size, size)))
                continue
            nbytes += size
            found = _file_sha256(path)
            if found != digest:
                problems.append(ObjectProblem(digest, path, f"its bytes hash to {found[:16]}…, not to its name"))
        self._add_users(problems)
        unreferenced = [d for d in self._objects_on_disk() if d not in refs]
        return VerifyReport(checked, nbytes, problems, bad_manifests, unreferenced)

    def gc(self) -> GcReport:
        """Delete objects no model references, and leftovers of interrupted writes.

        Raises:
            StoreError: a manifest cannot be read (its objects could be deleted); fix or
                remove it first.
        """
        with self._lock(exclusive=True):
            refs, bad = self._references()
            if bad:
                raise StoreError(f"gc refused: cannot read manifest(s) {', '.join(bad)}; their objects would be "
                                 "deleted. Put those models again or remove their manifests")
            removed = freed = 0
            for digest in self._objects_on_disk():
                if digest not in refs:
                    path = self._object_path(digest)
                    freed += path.stat().st_size
                    path.unlink()
                    removed += 1
            temps = 0
            for stale in [*(self.root / "tmp").glob("*"), *(self.root / "models").glob(".*.tmp")]:
                stale.unlink()
                temps += 1
        return GcReport(removed, freed, temps)

    def stats(self) -> StoreStats:
        refs, _ = self._references()
        logical = 0
        for name in self.models():
            try:
                m = self.manifest(name)
            except ModelLoadError:
                continue
            logical += sum(e["nbytes"] for e in [*m["tensors"].values(), *m.get("files", {}).values()])
        on_disk = self._objects_on_disk()
        stored = allocated = 0
        for path in [*(self._object_path(d) for d in on_disk), *(self.root / "models").glob("*.json")]:
            st = path.stat()
            stored += st.st_size
            allocated += st.st_blocks * 512
        return StoreStats(len(self.models()), len(on_disk), logical, sum(refs.values()), stored, allocated,
                          sum(d not in refs for d in on_disk))

    # -- helpers ---------------------------------------------------------------------------

    def _object_path(self, digest: str) -> Path:
        return self.root / "objects" / digest[:2] / digest

    def _manifest_path(self, name: str) -> Path:
        return self.root / "models" / f"{name}.json"

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise StoreError(f"model name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")

    def _no_model(self, name: str) -> str:
        have = self.models()
        return f"weight store {self.root} has no model {name!r}; it has: {', '.join(have) or 'none'}"

    def _objects_on_disk(self) -> list[str]:
        objects = self.root / "objects"
        return sorted(p.name for p in objects.glob("??/*") if _HEX.fullmatch(p.name))

    def _references(self) -> tuple[dict[str, int], list[str]]:
        refs: dict[str, int] = {}
        bad = []
        for name in self.models():
            try:
                m = self.manifest(name)
            except ModelLoadError:
                bad.append(name)
                continue
            for e in [*m["tensors"].values(), *m.get("files", {}).values()]:
                refs[e["hash"]] = e["nbytes"]
        return refs, bad

    def _add_users(self, problems: list[ObjectProblem]) -> None:
        wanted = {p.digest: p for p in problems}
        if not wanted:
            return
        for name in self.models():
            try:
                m = self.manifest(name)
            except ModelLoadError:
                continue
            uses: dict[str, list[str]] = {}
            for key, e in [*m["tensors"].items(), *m.get("files", {}).items()]:
                if e["hash"] in wanted:
                    uses.setdefault(e["hash"], []).append(key)
            for digest, keys in uses.items():
                shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
                wanted[digest].used_by.append(f"{name}: {shown}")

    def _raise(self, problems: list[ObjectProblem]) -> None:
        self._add_users(problems)
        raise CorruptObjectError(self.root, problems)

    @contextmanager
    def _lock(self, exclusive: bool) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        with open(self.root / "lock", "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class _Bad(Exception):
    """One object's problem, gathered into a CorruptObjectError."""


def _size_problem(found: int, expected: int) -> str:
    if found < expected:
        return f"truncated: {found} of {expected} bytes"
    return f"{found} bytes, {expected} expected"
