"""A compact, checksummed file of pruned and clustered weights (Deep Compression storage).

Each tensor is stored in the smallest of three exact forms:

- ``clustered``: the positions of its non-zero weights as gaps (zeros skipped since the
  previous entry), at most ``2**gap_bits - 1``; a longer gap is bridged by filler
  entries, each a stored zero (code 0). Gaps and cluster codes are Huffman-coded,
  with canonical tables stored as code lengths only. The codebook is stored raw.
- ``sparse``: the same gaps, with each entry's value stored raw.
- ``dense``: the raw values (biases, layers left unclustered).

The layout is documented in ``docs/pruning.md`` ("Storage codec"). Decoding gives back
the encoded tensors bit for bit (``-0.0`` becomes ``+0.0``), unless ``float16=True``
asked for codebooks and dense tensors to be rounded to float16.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

import slimkit.compress.huffman as huffman
from slimkit.atomic import write_bytes
from slimkit.compress.cluster import shared_weights
from slimkit.errors import ConfigError, ModelLoadError

MAGIC = b"SKWC"
VERSION = 1
MAX_GAP_BITS = 12
MAX_CENTROIDS = 256  # a plain tensor with at most this many distinct non-zero values is clustered
SECTIONS = {"dense": ("data",), "dense_hi": ("high", "low"), "clustered": ("codebook", "gaps", "codes"),
            "sparse": ("gaps", "values")}
DTYPES = {name: getattr(torch, name) for name in
          ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")}
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
_CRC = struct.Struct("<I")


@dataclass
class _Encoded:
    meta: dict[str, Any]
    sections: list[bytes] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(len(s) + _CRC.size for s in self.sections)


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(f"tensors of dtype {name} cannot be stored; supported: {', '.join(DTYPES)}")
    return name


def _stored(dtype: torch.dtype, store: torch.dtype) -> dict[str, str]:
    # Only written when it differs from the tensor's dtype: the header is part of the size.
    return {} if store == dtype else {"stored": _dtype_name(store)}


def _raw(t: torch.Tensor) -> bytes:
    # Native byte order: little-endian on every platform torch ships for.
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def _named_tensors(source: nn.Module | Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, Any]]:
    """(name, tensor, weight sharing or None) in state_dict order, parametrized weights as plain."""
    if not isinstance(source, nn.Module):
        return [(k, v.detach(), None) for k, v in source.items()]
    out, seen = [], set()
    for key, value in source.state_dict().items():
        parts = key.split(".")
        if "parametrizations" not in parts:
            out.append((key, value.detach(), None))
            continue
        i = parts.index("parametrizations")
        module_name, tensor_name = ".".join(parts[:i]), parts[i + 1]
        name = ".".join([*parts[:i], tensor_name])
        if name in seen:
            continue
        seen.add(name)
        module = source.get_submodule(module_name)
        shared = shared_weights(module) if tensor_name == "weight" else None
        with torch.no_grad():
            out.append((name, getattr(module, tensor_name).detach(), shared))
    return out


def _gap_streams(gaps: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Gap symbols with fillers for gap width ``bits``, and where the real entries are."""
    cap = 1 << bits
    fillers = gaps >> bits
    last = np.cumsum(fillers + 1) - 1  # index of each real entry among all entries
    symbols = np.full(int(last[-1]) + 1 if len(last) else 0, cap - 1, dtype=np.int64)
    symbols[last] = gaps & (cap - 1)
    return symbols, last


def _huffman_section(symbols: np.ndarray, alphabet: int) -> bytes:
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=alphabet))
    return huffman.pack_lengths(lengths) + huffman.encode(symbols, lengths)


def _huffman_cost(counts: np.ndarray) -> int:
    lengths = huffman.code_lengths(counts)
    return (huffman.encoded_bits(counts, lengths) + 7) // 8 + len(huffman.pack_lengths(lengths))


def _best_gap_bits(gaps: np.ndarray, code_counts: np.ndarray | None, value_size: int) -> int:
    """The gap width giving the smallest gaps + codes (or raw values) sections."""
    top = max(1, min(MAX_GAP_BITS, int(gaps.max()).bit_length() if len(gaps) else 1))
    best, best_cost = 1, None
    for bits in range(1, top + 1):
        cap = 1 << bits
        fillers = int((gaps >> bits).sum())
        gap_counts = np.bincount(gaps & (cap - 1), minlength=cap)
        gap_counts[cap - 1] += fillers
        cost = _huffman_cost(gap_counts)
        if code_counts is None:
            cost += (len(gaps) + fillers) * value_size
        else:
            counts = code_counts.copy()
            counts[0] += fillers
            cost += _huffman_cost(counts)
        if best_cost is None or cost < best_cost:
            best, best_cost = bits, cost
    return best


def _sparse_forms(name: str, t: torch.Tensor, shared, gap_bits: int | str, float16: bool) -> list[_Encoded]:
    flat = t.reshape(-1).cpu()
    dtype = _dtype_name(t.dtype)
    store = torch.float16 if float16 and t.dtype == torch.float32 else t.dtype
    if shared is not None:
        codebook = shared.codebook.detach().cpu()
        codes_all = shared.codes.reshape(-1).cpu().long().numpy()
        positions = np.flatnonzero(codes_all)
        codes = codes_all[positions]
    else:
        if not t.is_floating_point() or not bool(torch.isfinite(flat).all()):
            return []
        positions = torch.nonzero(flat != 0).reshape(-1).numpy()
        nonzero = flat[positions]
        codebook, inverse = torch.unique(nonzero, sorted=True, return_inverse=True)
        codes = inverse.numpy().astype(np.int64) + 1
        if len(codebook) > MAX_CENTROIDS:
            codebook = None
    gaps = np.diff(positions, prepend=-1) - 1
    forms = []
    base = {"name": name, "shape": list(t.shape), "dtype": dtype, "entries": 0, "gap_bits": 0}
    if codebook is not None:
        alphabet = len(codebook) + 1
        counts = np.bincount(codes, minlength=alphabet)
        bits = _best_gap_bits(gaps, counts, 0) if gap_bits == "auto" else int(gap_bits)
        gap_symbols, last = _gap_streams(gaps, bits)
        code_symbols = np.zeros(len(gap_symbols), dtype=np.int64)
        code_symbols[last] = codes
        meta = {**base, "kind": "clustered", "entries": len(gap_symbols), "gap_bits": bits,
                "centroids": len(codebook), **_stored(t.dtype, store)}
        forms.append(_Encoded(meta, [_raw(codebook.to(store)), _huffman_section(gap_symbols, 1 << bits),
                                     _huffman_section(code_symbols, alphabet)]))
    if shared is None:
        size = torch.empty(0, dtype=store).element_size()
        bits = _best_gap_bits(gaps, None, size) if gap_bits == "auto" else int(gap_bits)
        gap_symbols, last = _gap_streams(gaps, bits)
        values = torch.zeros(len(gap_symbols), dtype=store)
        values[torch.as_tensor(last)] = flat[positions].to(store)
        meta = {**base, "kind": "sparse", "entries": len(gap_symbols), "gap_bits": bits, **_stored(t.dtype, store)}
        forms.append(_Encoded(meta, [_huffman_section(gap_symbols, 1 << bits), _raw(values)]))
    return forms


def _dense_forms(name: str, t: torch.Tensor, float16: bool) -> list[_Encoded]:
    store = torch.float16 if float16 and t.dtype == torch.float32 else t.dtype
    meta = {"name": name, "shape": list(t.shape), "dtype": _dtype_name(t.dtype), **_stored(t.dtype, store)}
    raw = _raw(t.to(store))
    forms = [_Encoded({**meta, "kind": "dense"}, [raw])]
    size = torch.empty(0, dtype=store).element_size()
    if size > 1 and t.numel():
        # The most significant byte (sign and high exponent bits of a float) takes few
        # values in a tensor of similar magnitudes: Huffman-code it, keep the rest raw.
        planes = np.frombuffer(raw, dtype=np.uint8).reshape(-1, size)
        high = _huffman_section(planes[:, -1].astype(np.int64), 256)
        forms.append(_Encoded({**meta, "kind": "dense_hi"}, [high, planes[:, :-1].tobytes()]))
    return forms


def _encode_tensor(name: str, t: torch.Tensor, shared, gap_bits: int | str, float16: bool) -> _Encoded:
    forms = _dense_forms(name, t, float16) + (_sparse_forms(name, t, shared, gap_bits, float16) if t.numel() else [])
    return min(forms, key=lambda f: f.size)  # ties keep the first: raw dense


def encode(source: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike, *,
           gap_bits: int | Literal["auto"] = "auto", float16: bool = False) -> int:
    """Write the weights of ``source`` to ``path`` in the compressed format, atomically.

    Args:
        source: a model (masked and clustered layers are read through their
            parametrizations and stored under plain names such as ``fc1.weight``) or a
            state_dict of plain tensors (tensors with at most 256 distinct non-zero values
            are treated as clustered).
        path: the file to write; it appears complete or not at all.
        gap_bits: width of the relative indices, 1 to 12; ``"auto"`` picks, per tensor,
            the width giving the smallest file.
        float16: store codebooks and dense float32 tensors as float16. Smaller, but
            decoding then gives those values rounded to float16.

    Returns:
        The size of the file in bytes.
    """
    if gap_bits != "auto" and not (isinstance(gap_bits, int) and 1 <= gap_bits <= MAX_GAP_BITS):
        raise ConfigError(f"gap_bits: {gap_bits!r} is not 'auto' or a whole number from 1 to {MAX_GAP_BITS}")
    tensors = [_encode_tensor(n, t, s, gap_bits, float16) for n, t, s in _named_tensors(source)]
    for e in tensors:
        e.meta["sections"] = [len(s) for s in e.sections]
    header = _deflate(json.dumps({"tensors": [e.meta for e in tensors]}, separators=(",", ":")).encode())
    parts = [_PREFIX.pack(MAGIC, VERSION, len(header)), header, _CRC.pack(zlib.crc32(header))]
    for e in tensors:
        for s in e.sections:
            parts += [s, _CRC.pack(zlib.crc32(s))]
    body = b"".join(parts)
    data = body + _CRC.pack(zlib.crc32(body))
    write_bytes(path, data)
    return len(data)


def _deflate(data: bytes) -> bytes:
    # Raw deflate (no zlib wrapper): the header has its own CRC32.
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def _read(path: str | os.PathLike) -> tuple[bytes, list[dict[str, Any]], list[list[bytes]], int]:
    """The file's bytes, tensor descriptions, checked sections, and header size."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read the weights file ({e})") from None
    if len(data) < _PREFIX.size:
        raise ModelLoadError(f"{path}: truncated: {len(data)} bytes is shorter than the file's prefix")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ModelLoadError(f"{path}: not a slimkit compressed weights file (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise ModelLoadError(f"{path}: format version {version} is not one this slimkit reads (version "
                             f"{VERSION}); {'upgrade slimkit' if version > VERSION else 'the file is corrupt'}")
    start = _PREFIX.size
    end = start + hlen + _CRC.size
    if end > len(data):
        raise ModelLoadError(f"{path}: truncated: the header needs bytes {start}..{end} but the file has {len(data)}")
    header = data[start : start + hlen]
    if zlib.crc32(header) != _CRC.unpack_from(data, start + hlen)[0]:
        raise ModelLoadError(f"{path}: the header is corrupt (checksum mismatch)")
    try:
        tensors = json.loads(zlib.decompress(header, -15))["tensors"]
    except (zlib.error, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path}: the header is unreadable ({e})") from None
    offset, sections = end, []
    for meta in tensors:
        names = SECTIONS.get(meta.get("kind"))
        if names is None or len(meta.get("sections", ())) != len(names):
            raise ModelLoadError(f"{path}: the header describes {meta.get('name')!r} in an unknown way")
        parts = []
        for name, length in zip(names, meta["sections"], strict=True):
            label = f"{meta['name']}/{name}"
            stop = offset + length + _CRC.size
            if stop > len(data):
                raise ModelLoadError(f"{path}: truncated: section {label!r} needs bytes {offset}..{stop} "
                                     f"but the file has {len(data)}")
            part = data[offset : offset + length]
            if zlib.crc32(part) != _CRC.unpack_from(data, offset + length)[0]:
                raise ModelLoadError(f"{path}: section {label!r} is corrupt (checksum mismatch)")
            parts.append(part)
            offset = stop
        sections.append(parts)
    if offset + _CRC.size > len(data):
        raise ModelLoadError(f"{path}: truncated: the file checksum after byte {offset} is missing")
    if offset + _CRC.size != len(data):
        raise ModelLoadError(f"{path}: {len(data) - offset - _CRC.size} unexpected bytes after the last section")
    if zlib.crc32(data[:offset]) != _CRC.unpack_from(data, offset)[0]:
        raise ModelLoadError(f"{path}: the file checksum (last 4 bytes) does not match")
    return data, tensors, sections, end


def _decode_tensor(meta: dict[str, Any], parts: list[bytes]) -> torch.Tensor:
    dtype = DTYPES[meta["dtype"]]
    store = DTYPES[meta.get("stored", meta["dtype"])]
    shape = tuple(meta["shape"])
    numel = int(np.prod(shape, dtype=np.int64))
    if meta["kind"] == "dense":
        return torch.frombuffer(bytearray(parts[0]), dtype=store).to(dtype).reshape(shape) if numel else \
            torch.zeros(shape, dtype=dtype)
    if meta["kind"] == "dense_hi":
        lengths, at = huffman.unpack_lengths(parts[0])
        high = huffman.decode(parts[0][at:], lengths, numel).astype(np.uint8)
        low = np.frombuffer(parts[1], dtype=np.uint8).reshape(numel, -1)
        raw = np.concatenate([low, high[:, None]], axis=1).tobytes()
        return torch.frombuffer(bytearray(raw), dtype=store).to(dtype).reshape(shape)
    entries = meta["entries"]
    gap_part = parts[1] if meta["kind"] == "clustered" else parts[0]
    lengths, at = huffman.unpack_lengths(gap_part)
    gaps = huffman.decode(gap_part[at:], lengths, entries)
    positions = np.cumsum(gaps + 1) - 1
    if len(positions) and positions[-1] >= numel:
        raise huffman.HuffmanError(f"entries run past the tensor's {numel} elements")
    if meta["kind"] == "clustered":
        codebook = torch.frombuffer(bytearray(parts[0]), dtype=store).to(dtype) if parts[0] else \
            torch.zeros(0, dtype=dtype)
        lengths, at = huffman.unpack_lengths(parts[2])
        codes = huffman.decode(parts[2][at:], lengths, entries)
        if len(codes) and codes.max() > len(codebook):
            raise huffman.HuffmanError(f"a code exceeds the {len(codebook)} centroids")
        values = torch.cat([torch.zeros(1, dtype=dtype), codebook])[torch.as_tensor(codes)]
    else:
        values = torch.frombuffer(bytearray(parts[1]), dtype=store).to(dtype) if parts[1] else \
            torch.zeros(0, dtype=dtype)
        if len(values) != entries:
            raise huffman.HuffmanError(f"{len(values)} values for {entries} entries")
    out = torch.zeros(numel, dtype=dtype)
    out[torch.as_tensor(positions)] = values
    return out.reshape(shape)


def decode(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`encode` back into a state_dict of plain tensors.

    Load it into a plain model (one that is not masked or clustered, e.g. after
    :func:`slimkit.prune.magnitude.make_permanent_`) with ``model.load_state_dict``.

    Raises:
        ModelLoadError: the file is not one of ours, is of an unknown version, is
            truncated or corrupt; the message names the part (header or section).
    """
    _, tensors, sections, _ = _read(path)
    out = {}
    for meta, parts in zip(tensors, sections, strict=True):
        try:
            out[meta["name"]] = _decode_tensor(meta, parts)
        except (huffman.HuffmanError, KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"{path}: tensor {meta.get('name')!r} cannot be decoded ({e}); "
                                 "the file is corrupt") from None
    return out


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Where the bytes of a file written by :func:`encode` go: header and each section.

    Returns:
        ``{"bytes": file size, "version", "header": bytes of prefix, header and checksum,
        "checksum": 4, "tensors": [{"name", "kind", "shape", "dtype", "bytes",
        "sections": {name: bytes incl. its 4-byte checksum}, ...}]}``.
    """
    data, tensors, _, header = _read(path)
    rows = []
    for meta in tensors:
        secs = {n: length + _CRC.size for n, length in zip(SECTIONS[meta["kind"]], meta["sections"], strict=True)}
        rows.append({**{k: v for k, v in meta.items() if k != "sections"}, "bytes": sum(secs.values()),
                     "sections": secs})
    return {"bytes": len(data), "version": VERSION, "header": header, "checksum": _CRC.size, "tensors": rows}
