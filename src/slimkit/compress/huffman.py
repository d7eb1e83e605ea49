"""Canonical Huffman coding with numpy.

A canonical code is fully described by each symbol's code length: codes are handed out
in order of (length, symbol), so a stored table is just the lengths. Encoding packs all
codewords with vectorised bit operations. Decoding looks the next ``max_len`` bits up in
a table at every bit position of a chunk of the stream at once, then follows the chain of
codeword starts by pointer doubling, so no Python loop runs per symbol.
"""

from __future__ import annotations

import heapq

import numpy as np

MAX_LEN = 16  # longest codeword; the decoding table has 2**MAX_LEN entries at most
CHUNK_BITS = 1 << 20  # bit positions decoded at once; each costs about 20 bytes while decoding


class HuffmanError(ValueError):
    """A stored table or bit stream is not valid."""


def code_lengths(counts: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """Huffman code length of each symbol (0 for symbols that never occur).

    Lengths are limited to ``max_len`` by halving the counts until the code fits, which
    costs a fraction of a percent on the rare skewed alphabets that need it.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(len(counts), dtype=np.int64)
    used = np.flatnonzero(counts)
    if len(used) == 0:
        return lengths
    if len(used) == 1:
        lengths[used] = 1
        return lengths
    if len(used) > 2**max_len:
        raise ValueError(f"{len(used)} symbols do not fit codes of at most {max_len} bits")
    weights = counts[used]
    while True:
        depth = _tree_depths(weights)
        if depth.max() <= max_len:
            lengths[used] = depth
            return lengths
        weights = (weights + 1) // 2


def _tree_depths(weights: np.ndarray) -> np.ndarray:
    # Ties are broken by insertion order, so equal counts always give the same code.
    n = len(weights)
    heap = [(int(w), i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    parent = np.zeros(2 * n - 1, dtype=np.int64)
    nxt = n
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = nxt
        heapq.heappush(heap, (w1 + w2, nxt))
        nxt += 1
    depth = np.zeros(2 * n - 1, dtype=np.int64)
    for node in range(2 * n - 3, -1, -1):  # parents are numbered after their children
        depth[node] = depth[parent[node]] + 1
    return depth[:n]


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical codeword of each symbol, as an integer read MSB first."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, prev = 0, 0
    for s in np.lexsort((np.arange(len(lengths)), lengths)):
        n = int(lengths[s])
        if n == 0:
            continue
        code <<= n - prev
        codes[s] = code
        code += 1
        prev = n
    return codes


def encoded_bits(counts: np.ndarray, lengths: np.ndarray) -> int:
    """Length in bits of the bit stream for symbols with these counts."""
    return int((np.asarray(counts, dtype=np.int64) * lengths).sum())


def encode(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    """Pack the codewords of ``symbols`` MSB first, zero-padded to whole bytes."""
    symbols = np.asarray(symbols, dtype=np.int64)
    if len(symbols) == 0:
        return b""
    lens = lengths[symbols]
    if (lens == 0).any():
        raise ValueError("a symbol to encode has no code; build the lengths from these symbols' counts")
    codes = canonical_codes(lengths)[symbols]
    starts = np.cumsum(lens) - lens
    bits = np.zeros(int(lens.sum()), dtype=np.uint8)
    for j in range(int(lens.max())):
        sel = lens > j
        bits[starts[sel] + j] = (codes[sel] >> (lens[sel] - 1 - j)) & 1
    return np.packbits(bits).tobytes()


def decode(data: bytes, lengths: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` symbols coded in ``data`` with the canonical code of ``lengths``.

    Raises:
        HuffmanError: the stream is shorter than ``count`` symbols or holds a bit
            pattern that is no codeword.
    """
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    width = int(lengths.max()) if len(lengths) else 0
    if width == 0:
        raise HuffmanError("the code table is empty but the stream holds symbols")
    if width > MAX_LEN:
        raise HuffmanError(f"a code length of {width} bits exceeds the limit of {MAX_LEN}")
    # Lengths that break the Kraft inequality are no prefix code.
    used = lengths[lengths > 0]
    if (np.ldexp(1.0, -used)).sum() > 1.0:
        raise HuffmanError("the code lengths do not form a prefix code")
    sym_of = np.full(1 << width, -1, dtype=np.int64)
    len_of = np.ones(1 << width, dtype=np.uint8)  # holes: step one bit, then fail below
    codes = canonical_codes(lengths)
    for s in np.flatnonzero(lengths):
        lo = int(codes[s]) << (width - int(lengths[s]))
        hi = (int(codes[s]) + 1) << (width - int(lengths[s]))
        sym_of[lo:hi], len_of[lo:hi] = s, lengths[s]
    data = np.frombuffer(data, dtype=np.uint8)
    nbits = 8 * len(data)
    if count > nbits:  # every codeword takes at least one bit
        raise HuffmanError(f"the stream ends before its {count} symbols")
    out = np.empty(count, dtype=np.int64)
    done, start, hole = 0, 0, False
    # Chunks of CHUNK_BITS bit positions bound the memory: a few bytes per position of one
    # chunk, not per position of the stream. Each chunk starts where a codeword starts.
    while done < count and start < nbits:
        syms, start = _decode_chunk(data, start, min(CHUNK_BITS, nbits - start), width, count - done,
                                    sym_of, len_of)
        out[done : done + len(syms)] = syms
        done += len(syms)
        hole = hole or bool((syms < 0).any())
    if done < count:
        raise HuffmanError(f"the stream ends before its {count} symbols")
    if hole or start > nbits:  # start: where the last codeword ends
        raise HuffmanError("the stream holds a bit pattern that is no codeword")
    return out


def _decode_chunk(data: np.ndarray, start: int, size: int, width: int, most: int, sym_of: np.ndarray,
                  len_of: np.ndarray) -> tuple[np.ndarray, int]:
    """The symbols whose codewords start in bits ``start .. start + size - 1`` (at most
    ``most``), the first starting at ``start``, and the bit where the one after them starts."""
    first = start // 8
    bits = np.unpackbits(data[first : (start + size + width + 7) // 8])[start - 8 * first :]
    if len(bits) < size + width:  # past the end of the stream the window reads zeros
        bits = np.concatenate([bits, np.zeros(size + width - len(bits), dtype=np.uint8)])
    window = np.zeros(size, dtype=np.uint16)
    for j in range(width):
        window <<= 1
        window |= bits[j : j + size]
    del bits
    # jump[i]: where the codeword after the one starting at bit i starts; position ``size``
    # (the end of the chunk) leads to itself.
    jump = np.arange(size + 1, dtype=np.int32)
    jump[:size] += len_of[window]
    np.minimum(jump, size, out=jump)
    # pos[t], the start of codeword t, is jump applied t times to 0. Pointer doubling: with
    # pos known for t < m and jump = jump^m, pos for m <= t < 2m is jump[pos[t - m]]. It
    # stops once a codeword starts past the chunk; the chunk holds at most ``size``.
    pos = np.zeros(min(most, size), dtype=np.int32)
    m = 1
    while m < len(pos) and pos[m - 1] < size:
        r = min(m, len(pos) - m)
        pos[m : m + r] = jump[pos[:r]]
        m += r
        if m < len(pos) and pos[m - 1] < size:
            jump = jump[jump]
    del jump
    # pos rises until it reaches the end of the chunk, where it stays.
    pos = pos[: int(np.searchsorted(pos[:m], size))]
    last = int(pos[-1])
    return sym_of[window[pos]], start + last + int(len_of[window[last]])


def _write_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= len(data) or shift > 63:
            raise HuffmanError("the code table is cut short")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, offset


def _pack_bits(values: np.ndarray, width: int) -> bytes:
    bits = (values[:, None] >> np.arange(width - 1, -1, -1)) & 1
    return np.packbits(bits.astype(np.uint8).ravel()).tobytes()


def _unpack_bits(data: bytes, offset: int, count: int, width: int) -> tuple[np.ndarray, int]:
    nbytes = (count * width + 7) // 8
    if offset + nbytes > len(data):
        raise HuffmanError("the code table is cut short")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, count=nbytes, offset=offset))[: count * width]
    values = (bits.reshape(count, width).astype(np.int64) << np.arange(width - 1, -1, -1)).sum(axis=1)
    return values, offset + nbytes


def pack_lengths(lengths: np.ndarray) -> bytes:
    """A code table as stored, in the smaller of two layouts.

    ``varint size`` (symbols up to the last one with a code), then a byte ``flags``:
    its low 7 bits are the bits per stored length. Flag bit 7 clear: ``size`` lengths
    follow, packed MSB first. Set: ``varint count`` of symbols with a code, ``count``
    varints each the number of codeless symbols skipped before the next one, then their
    ``count`` lengths packed. A size of 0 (no symbols) is the whole table.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    used = np.flatnonzero(lengths)
    size = int(used[-1]) + 1 if len(used) else 0
    if size == 0:
        return _write_varint(0)
    width = max(1, int(lengths[:size].max()).bit_length())
    dense = _write_varint(size) + bytes([width]) + _pack_bits(lengths[:size], width)
    skips = np.diff(used, prepend=-1) - 1
    sparse = (_write_varint(size) + bytes([0x80 | width]) + _write_varint(len(used))
              + b"".join(_write_varint(int(k)) for k in skips) + _pack_bits(lengths[used], width))
    return dense if len(dense) <= len(sparse) else sparse


def unpack_lengths(data: bytes, offset: int = 0) -> tuple[np.ndarray, int]:
    """Inverse of :func:`pack_lengths`: the lengths and the offset just after the table."""
    size, offset = _read_varint(data, offset)
    if size == 0:
        return np.zeros(0, dtype=np.int64), offset
    if offset >= len(data):
        raise HuffmanError("the code table is cut short")
    flags = data[offset]
    offset += 1
    width = flags & 0x7F
    if not 1 <= width <= 8:
        raise HuffmanError(f"the code table says {width} bits per length; expected 1 to 8")
    if not flags & 0x80:
        return _unpack_bits(data, offset, size, width)
    count, offset = _read_varint(data, offset)
    symbols, prev = [], -1
    for _ in range(count):
        skip, offset = _read_varint(data, offset)
        prev += skip + 1
        symbols.append(prev)
    if count == 0 or prev >= size:
        raise HuffmanError("the code table names symbols outside its alphabet")
    values, offset = _unpack_bits(data, offset, count, width)
    lengths = np.zeros(size, dtype=np.int64)
    lengths[symbols] = values
    return lengths, offset
