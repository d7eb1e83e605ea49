"""The storage codec: canonical Huffman, exact round trips, real sizes, damaged files."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch
from torch import nn

from slimkit.compress import (
    ClusterConfig,
    cluster_,
    decode,
    describe,
    encode,
    huffman,
    make_permanent_,
)
from slimkit.errors import ConfigError, ModelLoadError
from slimkit.prune.api import prune_
from slimkit.prune.magnitude import MagnitudePruneConfig
from slimkit.zoo.mlp import MLP


def entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(counts[counts > 0] * np.log2(p)).sum())


SKEWED = {
    "geometric": lambda rng: rng.geometric(0.08, 20_000) - 1,
    "zipf": lambda rng: np.minimum(rng.zipf(1.5, 20_000), 3000),
    "one_dominant": lambda rng: (rng.random(5000) < 0.01) * rng.integers(1, 40, 5000),
    "uniform": lambda rng: rng.integers(0, 33, 5000),
    "single_symbol": lambda rng: np.full(100, 7),
    "two_symbols": lambda rng: rng.integers(3, 5, 99),
}


@pytest.mark.parametrize("kind", list(SKEWED))
def test_canonical_huffman_round_trips_and_is_within_a_bit_of_entropy(kind):
    symbols = SKEWED[kind](np.random.default_rng(0)).astype(np.int64)
    counts = np.bincount(symbols)
    lengths = huffman.code_lengths(counts)
    assert lengths.max() <= huffman.MAX_LEN
    used = lengths[lengths > 0]
    assert (np.ldexp(1.0, -used)).sum() <= 1.0  # a prefix code (Kraft)
    bits = huffman.encoded_bits(counts, lengths)
    h = entropy_bits(counts)
    assert h <= bits <= h + len(symbols)  # Huffman: at most entropy + 1 bit per symbol
    if kind == "geometric":
        assert bits <= 1.01 * h
    data = huffman.encode(symbols, lengths)
    assert len(data) == (bits + 7) // 8
    table = huffman.pack_lengths(lengths)
    back, end = huffman.unpack_lengths(table + b"rest")
    assert end == len(table)
    np.testing.assert_array_equal(back, lengths[: len(back)])
    assert not lengths[len(back):].any()  # only trailing unused symbols are dropped
    np.testing.assert_array_equal(huffman.decode(data, back, len(symbols)), symbols)


def test_canonical_codes_are_ordered_by_length_then_symbol():
    lengths = np.array([3, 2, 3, 0, 2, 3, 3])
    codes = huffman.canonical_codes(lengths)
    assert [format(int(codes[s]), f"0{lengths[s]}b") for s in (1, 4, 0, 2, 5, 6)] == \
        ["00", "01", "100", "101", "110", "111"]


def test_lengths_are_limited_on_a_fibonacci_alphabet():
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib)
    assert huffman._tree_depths(counts).max() == 29  # unlimited, the rarest needs 29 bits
    lengths = huffman.code_lengths(counts)
    assert lengths.max() <= 16
    symbols = np.repeat(np.arange(30), counts)[:: 997]
    data = huffman.encode(symbols, lengths)
    np.testing.assert_array_equal(huffman.decode(data, lengths, len(symbols)), symbols)


def test_decoding_a_short_or_invalid_stream_fails():
    lengths = huffman.code_lengths(np.array([5, 3, 1, 1]))
    data = huffman.encode(np.array([0, 1, 2, 3, 0]), lengths)
    with pytest.raises(huffman.HuffmanError, match="ends before"):
        huffman.decode(data, lengths, 50)
    with pytest.raises(huffman.HuffmanError, match="prefix code"):
        huffman.decode(data, np.array([1, 1, 1]), 2)


class Seq(nn.Sequential):
    def forward(self, x):
        for layer in self:
            x = layer(x)
        return x


def compressed_mlp(sparsity=0.8, bits=4, seed=0) -> Seq:
    torch.manual_seed(seed)
    model = Seq(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    prune_(model, MagnitudePruneConfig(sparsity=sparsity))
    cluster_(model, ClusterConfig(bits=bits))
    return model


def plain_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {"0.weight": model[0].weight, "0.bias": model[0].bias, "2.weight": model[2].weight,
            "2.bias": model[2].bias}


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, w in want.items():
        w = w.detach()
        assert got[name].dtype == w.dtype and got[name].shape == w.shape
        assert torch.equal(got[name].view(torch.int32), w.view(torch.int32)), name


@pytest.mark.parametrize("gap_bits", ["auto", 1, 3, 12])
def test_round_trip_is_bit_exact_on_a_pruned_clustered_mlp(tmp_path, gap_bits):
    model = compressed_mlp()
    path = tmp_path / "m.skwc"
    size = encode(model, path, gap_bits=gap_bits)
    assert size == os.path.getsize(path)
    got = decode(path)
    assert_bit_exact(got, {"0.bias": model[0].bias, "0.weight": model[0].weight,
                           "2.bias": model[2].bias, "2.weight": model[2].weight})
    info = {t["name"]: t for t in describe(path)["tensors"]}
    assert info["0.weight"]["kind"] == "clustered" and info["0.weight"]["centroids"] == 16
    if gap_bits == 1:  # every gap over 1 needs filler zeros
        assert info["0.weight"]["entries"] > int((model[0].weight != 0).sum())
    plain = Seq(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    plain.load_state_dict(got)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
    assert os.listdir(tmp_path) == ["m.skwc"]  # written through a temporary file, renamed


def test_a_plain_state_dict_is_coded_by_its_distinct_values(tmp_path):
    model = compressed_mlp(bits=3)
    make_permanent_(model)
    sd = model.state_dict()
    encode(sd, tmp_path / "m.skwc")
    assert_bit_exact(decode(tmp_path / "m.skwc"), dict(sd))
    kinds = {t["name"]: t["kind"] for t in describe(tmp_path / "m.skwc")["tensors"]}
    assert kinds["0.weight"] == kinds["2.weight"] == "clustered"


def test_pruned_unclustered_and_odd_tensors_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Seq(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    prune_(model, MagnitudePruneConfig(sparsity=0.9))
    sd = {**{k: v.detach() for k, v in plain_tensors(model).items()},
          "steps": torch.tensor(7), "flags": torch.tensor([True, False]), "empty": torch.zeros(0, 3),
          "zeros": torch.zeros(4, 4), "half": torch.randn(8).half(), "bf": torch.randn(3, 5).bfloat16()}
    encode(sd, tmp_path / "m.skwc")
    got = decode(tmp_path / "m.skwc")
    kinds = {t["name"]: t["kind"] for t in describe(tmp_path / "m.skwc")["tensors"]}
    assert kinds["0.weight"] == "sparse"  # 819 distinct values: more than a codebook holds
    for name, want in sd.items():
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name


def test_float16_storage_is_smaller_and_rounds_to_float16(tmp_path):
    model = compressed_mlp()
    exact = encode(model, tmp_path / "a.skwc")
    small = encode(model, tmp_path / "b.skwc", float16=True)
    assert small < exact
    got = decode(tmp_path / "b.skwc")
    for name, want in plain_tensors(model).items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], want.detach().half().float()), name


def test_bad_gap_bits_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="gap_bits"):
        encode(compressed_mlp(), tmp_path / "m.skwc", gap_bits=13)


def lenet_300_100(sparsity=0.92, bits=5, seed=0) -> MLP:
    """LeNet-300-100's shape with random Gaussian weights (std 1/sqrt(fan_in)), bell-shaped
    as trained weights are; its mask is uniformly random, the hardest to code."""
    torch.manual_seed(seed)
    model = MLP(784, [300, 100], 10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, m.in_features**-0.5)
    prune_(model, MagnitudePruneConfig(sparsity=sparsity))
    cluster_(model, ClusterConfig(bits=bits))
    return model


def test_lenet_300_100_compresses_40x_and_decodes_fast(tmp_path):
    model = lenet_300_100()
    n = sum(p.numel() for p in MLP(784, [300, 100], 10).parameters())
    assert n == 266_610
    path = tmp_path / "lenet.skwc"
    size = encode(model, path)
    ratio = 4 * n / size
    assert ratio >= 40.0, f"{size} bytes, {ratio:.2f}x"
    start = time.perf_counter()
    got = decode(path)
    assert time.perf_counter() - start < 5.0
    layers = [model.net[i] for i in (2, 5, 8)]
    assert_bit_exact({k: got[k] for k in ("net.2.weight", "net.5.weight", "net.8.weight")},
                     {f"net.{i}.weight": m.weight for i, m in zip((2, 5, 8), layers, strict=True)})


def test_size_is_close_to_the_entropy_of_mask_and_codes(tmp_path):
    model = lenet_300_100()
    size = encode(model, tmp_path / "lenet.skwc")
    estimate = 0.0  # bytes: log2 C(n, k) for where the weights are, k * H(codes) for which
    raw = 0
    for m in (model.net[2], model.net[5], model.net[8]):
        w = m.weight.detach().reshape(-1)
        n, k = w.numel(), int((w != 0).sum())
        mask_bits = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)
        _, counts = torch.unique(w[w != 0], return_counts=True)
        estimate += (mask_bits + entropy_bits(counts.numpy())) / 8
        raw += 4 * (m.bias.numel() + 32)  # biases and codebooks in float32
    # Huffman coding costs about 1%; header, code tables and checksums a few hundred bytes.
    assert estimate + raw - 300 <= size <= 1.015 * estimate + raw + 512, (size, estimate, raw)


def damaged(tmp_path, mutate) -> str:
    model = compressed_mlp()
    path = tmp_path / "m.skwc"
    encode(model, path)
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(mutate(data, describe(path))))
    with pytest.raises(ModelLoadError) as err:
        decode(path)
    return str(err.value)


def section_offset(info, name: str, section: str) -> int:
    offset = info["header"]
    for t in info["tensors"]:
        for s, size in t["sections"].items():
            if (t["name"], s) == (name, section):
                return offset
            offset += size
    raise KeyError(name)


def flip(data: bytearray, at: int) -> bytearray:
    data[at] ^= 0x40
    return data


def test_a_corrupt_byte_is_found_and_its_section_named(tmp_path):
    msg = damaged(tmp_path, lambda d, i: flip(d, section_offset(i, "0.weight", "codes") + 5))
    assert "section '0.weight/codes' is corrupt" in msg
    msg = damaged(tmp_path, lambda d, i: flip(d, section_offset(i, "2.bias", "high") + 1))
    assert "section '2.bias/high' is corrupt" in msg
    assert "header is corrupt" in damaged(tmp_path, lambda d, i: flip(d, 12))
    assert "file checksum" in damaged(tmp_path, lambda d, i: flip(d, len(d) - 1))


def test_a_truncated_file_is_reported(tmp_path):
    msg = damaged(tmp_path, lambda d, i: d[: section_offset(i, "2.weight", "gaps") + 3])
    assert "truncated" in msg and "'2.weight/gaps'" in msg
    assert "truncated" in damaged(tmp_path, lambda d, i: d[:6])
    assert "truncated" in damaged(tmp_path, lambda d, i: d[:20])
    assert "truncated" in damaged(tmp_path, lambda d, i: d[:-2])
    assert "unexpected bytes" in damaged(tmp_path, lambda d, i: d + b"\0\0")


def test_unknown_version_and_foreign_files_are_refused(tmp_path):
    def version(v):
        return lambda d, i: d[:4] + v.to_bytes(2, "little") + d[6:]

    assert "format version 2" in damaged(tmp_path, version(2)) and "upgrade slimkit" in damaged(tmp_path, version(2))
    assert "not a slimkit compressed weights file" in damaged(tmp_path, lambda d, i: b"PK\3\4" + d[4:])
    with pytest.raises(ModelLoadError, match="cannot read"):
        decode(tmp_path / "missing.skwc")
