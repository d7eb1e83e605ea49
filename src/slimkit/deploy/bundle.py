"""Signed, versioned bundles: one archive a device verifies before it runs the model.

A bundle is an uncompressed tar archive holding ``manifest.json``, its Ed25519 signature
``manifest.sig`` and the model's files under ``payload/`` (a saved model's
``slimkit.json``, weights and tokenizer, and a run's ``metrics.json`` and recipe). The
manifest names the bundle's format, the model and its version, the slimkit version that
made it, the SHA-256 and size of every payload file, the target profile, the model's
inputs and outputs and what it needs to run (framework, ONNX Runtime version and opset,
execution provider), and the fingerprint of the key that signed it.

Verifying checks, in order: the archive reads; it holds a manifest and a signature; the
signature is the given key's over the manifest's exact bytes; when a version is
installed, the bundle's is newer; and every payload file is listed, present and has its
hash (nothing more, nothing less). Installing writes the payload into place only once all
of it has checked out, replacing the installed model whole or not at all.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib
import importlib.metadata
import io
import json
import os
import re
import tarfile
import tempfile
from contextlib import nullcontext
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from slimkit import __version__
from slimkit.atomic import atomic_dir, atomic_path, write_bytes
from slimkit.errors import SlimkitError

FORMAT = "slimkit.bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
PAYLOAD = "payload"
INSTALLED = "bundle-manifest.json"  # the manifest of what an install folder holds
# A run folder's own files that travel with its output model; its variants do not.
RUN_FILES = ("metrics.json", "recipe.yaml")
VERSION = re.compile(r"^\d+(\.\d+){0,3}$")
CHUNK = 1 << 20


class BundleError(SlimkitError):
    """A bundle is unreadable, unsigned, tampered with, signed by another key, or older
    than what is installed; the message says which, and nothing was installed."""


# -- keys -------------------------------------------------------------------------------
def generate_key(path: str | os.PathLike) -> tuple[Path, Path]:
    """Write a new Ed25519 private key to ``path`` (PEM, readable by its owner only) and its
    public key to ``path.pub``; return both paths. An existing key is never replaced."""
    private, public = Path(path), Path(f"{path}.pub")
    for p in (private, public):
        if p.exists():
            raise BundleError(f"{p}: already exists; choose another path (a key is never overwritten)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # Created readable by its owner only (mkstemp's mode), then moved into place: the
    # secret is never on disk with wider permissions, nor half-written.
    private.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{private.name}.", dir=private.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.replace(tmp, private)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_bytes(public, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _read_key(path: str | os.PathLike, private: bool) -> Any:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BundleError(f"{path}: cannot read the key ({e.strerror})") from None
    try:
        key = serialization.load_pem_private_key(data, None) if private else serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        kind = "private" if private else "public"
        raise BundleError(f"{path}: not a PEM {kind} key; make one with `slimkit bundle keygen`") from None
    wanted = Ed25519PrivateKey if private else Ed25519PublicKey
    if not isinstance(key, wanted):
        raise BundleError(f"{path}: not an Ed25519 key; bundles are signed with Ed25519 (`slimkit bundle keygen`)")
    return key


def fingerprint(public: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, in hex: how a manifest names its signer."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


# -- versions ---------------------------------------------------------------------------
def _version(text: str) -> tuple[int, ...]:
    if not isinstance(text, str) or not VERSION.match(text):
        raise BundleError(f"version {text!r}: write it as numbers with dots, such as 1.4.0")
    return tuple(int(x) for x in text.split("."))


def newer(candidate: str, installed: str) -> bool:
    """Whether version ``candidate`` is after ``installed`` (``1.10`` after ``1.9``)."""
    a, b = _version(candidate), _version(installed)
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) > b + (0,) * (width - len(b))


# -- creating ---------------------------------------------------------------------------
def _payload_files(folder: Path) -> list[Path]:
    """The saved model in ``folder`` (a run folder or a model folder) and the run's record."""
    from slimkit.serialize import read_meta

    meta = read_meta(folder)  # refuses a folder without a saved model
    files = [folder / "slimkit.json", folder / meta["weights"]]
    if meta.get("tokenizer"):
        files += sorted(p for p in (folder / meta["tokenizer"]).rglob("*") if p.is_file())
    files += [folder / name for name in RUN_FILES if (folder / name).is_file()]
    external = folder / f"{meta['weights']}.data"  # ONNX weights over 2 GB live beside the graph
    if external.is_file():
        files.append(external)
    return files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _signature_of_model(folder: Path, meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's inputs and outputs, and what running it needs."""
    if meta["framework"] != "onnx":
        import torch

        runtime = {"framework": "torch", "torch": torch.__version__.split("+")[0]}
        if any(t["config"]["method"] == "pt2e_static_int8" for t in meta.get("transforms", [])):
            # A PT2E program is rebuilt by capturing the architecture again, which names
            # its observers as this torch minor does; torchao converts it.
            runtime.update(torchao=importlib.metadata.version("torchao"), captured_program=True)
        return {"framework": "torch"}, runtime
    import onnx
    import onnxruntime

    model = onnx.load(str(folder / meta["weights"]), load_external_data=False)

    def describe(values) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower(), "shape": shape})
        return out

    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None)
    # Operators outside the ONNX standard (ONNX Runtime's fused and int8 kernels) run on
    # ONNX Runtime only: a device with another runtime must know before it installs.
    custom = sorted({f"{n.domain}:{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    return ({"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)},
            {"framework": "onnx", "onnxruntime": onnxruntime.__version__, "opset": opset,
             "execution_provider": "CPUExecutionProvider", "custom_ops": custom})


def create_bundle(folder: str | os.PathLike, key: str | os.PathLike, out: str | os.PathLike, version: str,
                  name: str | None = None, target: str | None = None) -> dict[str, Any]:
    """Bundle the saved model in ``folder`` (a run folder's output model, or a model folder)
    into ``out``, signed with the private ``key``; return the manifest.

    Args:
        folder: a run folder or a folder written by :func:`slimkit.save`.
        key: an Ed25519 private key (:func:`generate_key`).
        out: the bundle file to write (atomically).
        version: the model's version, numbers with dots; a device installs only newer ones.
        name: the model's name (default: the folder's).
        target: the device profile the model is built for (a shipped profile's name or a
            profile YAML file; see :mod:`slimkit.deploy.devices`), if any.
    """
    from slimkit.serialize import read_meta

    folder = Path(folder)
    _version(version)
    if target is not None:
        from slimkit.deploy.devices import load_profile

        target = load_profile(target).name  # a shipped profile's name, or the name in the user's file
    private = _read_key(key, private=True)
    meta = read_meta(folder)
    files = _payload_files(folder)
    io_signature, runtime = _signature_of_model(folder, meta)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": {"name": name or folder.name, "version": version},
        "slimkit_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "target": target, "io": io_signature, "runtime": runtime,
        "signer": fingerprint(private.public_key()),
        "files": {p.relative_to(folder).as_posix(): {"sha256": _sha256(p), "size": p.stat().st_size} for p in files},
    }
    body = json.dumps(manifest, indent=1, sort_keys=True).encode()
    signature = private.sign(body)
    with atomic_path(out) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for member, data in ((MANIFEST, body), (SIGNATURE, signature)):
                info = tarfile.TarInfo(member)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
            for p in files:
                tar.add(p, arcname=f"{PAYLOAD}/{p.relative_to(folder).as_posix()}", recursive=False)
    return manifest


# -- verifying --------------------------------------------------------------------------
def _open(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:")
    except FileNotFoundError:
        raise BundleError(f"{path}: no such bundle") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BundleError(f"{path}: not a readable bundle (truncated or corrupt: {e})") from None


def _members(tar: tarfile.TarFile, path: Path) -> dict[str, tarfile.TarInfo]:
    try:
        members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BundleError(f"{path}: truncated or corrupt archive ({e}); download it again") from None
    out = {}
    for m in members:
        name = PurePosixPath(m.name)
        if not m.isfile() or name.is_absolute() or ".." in name.parts:
            raise BundleError(f"{path}: member {m.name!r} is not a plain file inside the bundle; refused")
        if m.name in out:
            raise BundleError(f"{path}: member {m.name!r} appears twice; refused")
        out[m.name] = m
    return out


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> bytes:
    try:
        f = tar.extractfile(member)
        data = f.read() if f is not None else b""
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BundleError(f"{path}: truncated or corrupt archive at {member.name!r} ({e})") from None
    if len(data) != member.size:
        raise BundleError(f"{path}: truncated archive: {member.name!r} holds {len(data)} of {member.size} bytes")
    return data


def verify_bundle(path: str | os.PathLike, public_key: str | os.PathLike, installed: str | None = None,
                  extract_to: Path | None = None) -> dict[str, Any]:
    """Check the bundle at ``path`` against the signer's ``public_key``; return its manifest.

    With ``installed`` (a version), a bundle that is not newer is refused. With
    ``extract_to``, the payload is written there while it is hashed (the caller discards
    the folder if this raises).

    Raises:
        BundleError: unreadable or truncated, unsigned, a signature that does not check
            out with the key, a file missing, added or changed, or a downgrade.
    """
    path = Path(path)
    public = _read_key(public_key, private=False)
    with _open(path) as tar:
        members = _members(tar, path)
        if MANIFEST not in members:
            raise BundleError(f"{path}: no {MANIFEST}; this is not a slimkit bundle")
        if SIGNATURE not in members:
            raise BundleError(f"{path}: unsigned (no {SIGNATURE}); refused: sign it with `slimkit bundle create --key`")
        body, signature = _read(tar, members[MANIFEST], path), _read(tar, members[SIGNATURE], path)
        try:
            manifest = json.loads(body)
            signer = manifest.get("signer")
        except (ValueError, AttributeError):
            manifest, signer = None, None
        try:
            public.verify(signature, body)
        except InvalidSignature:
            given = fingerprint(public)
            if isinstance(signer, str) and signer != given:
                raise BundleError(f"{path}: signed by another key (fingerprint {signer[:16]}...), not the given "
                                  f"{public_key} ({given[:16]}...); refused") from None
            raise BundleError(f"{path}: the signature does not match the manifest: the manifest or the signature "
                              "was changed after signing; refused") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{path}: the signed manifest is not a {FORMAT} manifest")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise BundleError(f"{path}: bundle format v{manifest['format_version']} is newer than this slimkit "
                              f"({__version__}) reads; upgrade slimkit")
        version = manifest["model"]["version"]
        if installed is not None and not newer(version, installed):
            raise BundleError(f"{path}: version {version} is not newer than the installed {installed}; refused "
                              "(no downgrades, and the same version is not installed twice)")
        listed = {f"{PAYLOAD}/{k}": v for k, v in manifest["files"].items()}
        present = {n for n in members if n not in (MANIFEST, SIGNATURE)}
        for name in sorted(present - set(listed)):
            raise BundleError(f"{path}: {name!r} is not in the signed manifest; refused")
        for name in sorted(set(listed) - present):
            raise BundleError(f"{path}: {name!r} is in the manifest but missing from the bundle; refused")
        for name in sorted(listed):
            _check_member(tar, members[name], listed[name], path, extract_to)
    return manifest


def _check_member(tar: tarfile.TarFile, member: tarfile.TarInfo, expected: dict[str, Any], path: Path,
                  extract_to: Path | None) -> None:
    h = hashlib.sha256()
    size = 0
    dest = None
    if extract_to is not None:
        dest = extract_to / PurePosixPath(member.name).relative_to(PAYLOAD)
        dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        src = tar.extractfile(member)
        with open(dest, "wb") if dest is not None else nullcontext() as out:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
                if out is not None:
                    out.write(chunk)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BundleError(f"{path}: truncated or corrupt archive at {member.name!r} ({e})") from None
    if size != expected["size"] or h.hexdigest() != expected["sha256"]:
        raise BundleError(f"{path}: {member.name!r} does not match its SHA-256 in the signed manifest (changed "
                          "after signing, or damaged in transfer); refused")


# -- installing and loading -------------------------------------------------------------
def installed_version(dest: str | os.PathLike) -> str | None:
    """The model version installed in ``dest``, or None."""
    meta = Path(dest) / INSTALLED
    if not meta.is_file():
        return None
    return json.loads(meta.read_text())["model"]["version"]


def install_bundle(path: str | os.PathLike, public_key: str | os.PathLike, dest: str | os.PathLike) -> dict[str, Any]:
    """Verify the bundle and install its model into ``dest``; return its manifest.

    ``dest`` is replaced whole, only once every file has checked out: a refused or
    interrupted install leaves what was there. A bundle not newer than the installed
    version is refused.
    """
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        manifest = verify_bundle(path, public_key, installed_version(dest), extract_to=tmp)
        check_runtime(manifest, path)
        (tmp / INSTALLED).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def check_runtime(manifest: dict[str, Any], path: str | os.PathLike = "bundle") -> None:
    """Refuse a bundle whose runtime requirements this device does not meet.

    An ONNX model needs ONNX Runtime at least as new (major.minor) as the one it was
    checked with, which also covers its opset, and the execution provider it was built
    for; a PyTorch model needs torch at least as new, and a PT2E program (captured again
    at load) the same torch minor version and torchao at least as new.

    Raises:
        BundleError: naming what is required and what this device has.
    """
    runtime = manifest.get("runtime") or {}
    framework = runtime.get("framework")
    package = {"onnx": "onnxruntime", "torch": "torch"}.get(framework)
    if package is None:
        raise BundleError(f"{path}: runtime framework {framework!r} is unknown to this slimkit ({__version__})")
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise BundleError(f"{path}: the model runs on {package} >= {runtime.get(package)}, which this device does "
                          f"not have; install it") from None
    have, need = str(module.__version__).split("+")[0], str(runtime.get(package, "0"))
    if _major_minor(have) < _major_minor(need):
        what = ""
        if framework == "onnx":
            what = f" (opset {runtime.get('opset')}{''.join(', ' + op for op in runtime.get('custom_ops', [])[:3])})"
        raise BundleError(f"{path}: the model needs {package} >= {need}{what}; this device has {have}: upgrade "
                          f"{package}, or export the model with an older one; refused")
    if runtime.get("captured_program") and _major_minor(have) != _major_minor(need):
        raise BundleError(f"{path}: the model is a PT2E program captured with torch {need}, which loading captures "
                          f"again the same way; this device has torch {have}: install torch "
                          f"{'.'.join(map(str, _major_minor(need)))}, or quantize the float model there; refused")
    if runtime.get("torchao"):
        try:
            have_ao = importlib.metadata.version("torchao")
        except importlib.metadata.PackageNotFoundError:
            raise BundleError(f"{path}: the model is a PT2E program, which needs torchao >= {runtime['torchao']}; "
                              "this device does not have torchao: install it; refused") from None
        if _major_minor(have_ao) < _major_minor(runtime["torchao"]):
            raise BundleError(f"{path}: the model needs torchao >= {runtime['torchao']}; this device has {have_ao}: "
                              "upgrade torchao; refused")
    provider = runtime.get("execution_provider")
    if framework == "onnx" and provider and provider not in module.get_available_providers():
        raise BundleError(f"{path}: the model was built for {provider}, which this device's ONNX Runtime does not "
                          f"have (it has {', '.join(module.get_available_providers())}); refused")


def _major_minor(version: str) -> tuple[int, int]:
    parts = [int(p) if p.isdigit() else 0 for p in (version.split(".") + ["0", "0"])[:2]]
    return parts[0], parts[1]


def load_bundle(path: str | os.PathLike, public_key: str | os.PathLike, workdir: str | os.PathLike) -> Any:
    """Verify the bundle, install it into ``workdir`` and load its model (PyTorch or ONNX)."""
    from slimkit.serialize import load

    install_bundle(path, public_key, workdir)
    return load(workdir)
