"""Canonical Huffman decoding in chunks: bit-exact round trips and bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from slimkit.compress import huffman


def skewed(n: int, probs: list[float], seed: int = 0) -> tuple[np.ndarray, np.ndarray, bytes]:
    """``n`` seeded symbols drawn with ``probs``, their code lengths and their bit stream."""
    symbols = np.random.default_rng(seed).choice(len(probs), size=n, p=np.array(probs) / sum(probs))
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=len(probs)))
    return symbols, lengths, huffman.encode(symbols, lengths)


# One symbol takes 70% (a 1-bit code); a geometric tail; 40 rare symbols with long codes.
GEOMETRIC = [0.7, 0.15, 0.08, 0.04, 0.02, 0.01]
LONG_TAIL = [1000.0, 300.0, 100.0, 30.0, 10.0] + [1.0] * 40


@pytest.mark.parametrize("probs", [GEOMETRIC, LONG_TAIL, [1.0, 1.0]])
def test_skewed_streams_round_trip(probs):
    symbols, lengths, data = skewed(20_000, probs)
    got = huffman.decode(data, lengths, len(symbols))
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, symbols)


@pytest.mark.parametrize("chunk", [1, 3, 8, 61])
def test_codewords_that_cross_chunk_boundaries_decode_the_same(monkeypatch, chunk):
    symbols, lengths, data = skewed(3_000, LONG_TAIL, seed=1)
    assert lengths.max() >= 10  # codewords longer than some chunks
    monkeypatch.setattr(huffman, "CHUNK_BITS", chunk)
    np.testing.assert_array_equal(huffman.decode(data, lengths, len(symbols)), symbols)
    # Fewer symbols than the stream holds: the first ones.
    np.testing.assert_array_equal(huffman.decode(data, lengths, 1234), symbols[:1234])


def test_a_stream_of_several_chunks_decodes_in_bounded_memory():
    symbols, lengths, data = skewed(2_600_000, GEOMETRIC)
    nbits = 8 * len(data)
    assert nbits > 3.5 * huffman.CHUNK_BITS  # about 4 Mbit: four chunks
    tracemalloc.start()
    try:
        got = huffman.decode(data, lengths, len(symbols))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got, symbols)
    # Measured 39 MB, 21 of them the int64 output; one int64 array per bit took 236 MB.
    assert peak < 64 * 2**20


def test_errors_are_found_across_chunks(monkeypatch):
    symbols, lengths, data = skewed(500, GEOMETRIC)
    monkeypatch.setattr(huffman, "CHUNK_BITS", 16)
    with pytest.raises(huffman.HuffmanError, match="ends before its 5000 symbols"):
        huffman.decode(data, lengths, 5000)
    with pytest.raises(huffman.HuffmanError, match="ends before its 700 symbols"):
        huffman.decode(data, lengths, 700)
    # Codes 0 and 10; 11 is no codeword. It comes at bit 24, in the second chunk.
    stream = bytes([0, 0, 0, 0b1100_0000, 0, 0])
    np.testing.assert_array_equal(huffman.decode(stream, np.array([1, 2]), 24), np.zeros(24))
    with pytest.raises(huffman.HuffmanError, match="no codeword"):
        huffman.decode(stream, np.array([1, 2]), 40)
