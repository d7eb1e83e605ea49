"""Image tasks: the IDX reader, Fashion-MNIST loading and checks, image folders, splits."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slimkit.errors import DataError
from slimkit.zoo import images
from slimkit.zoo.images import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    ImageClassificationData,
    imagenet_batch,
    load_fashion_mnist,
    load_image_task,
    read_idx,
)
from slimkit.zoo.mobilenet import IMAGENET_MEAN, IMAGENET_STD

TYPE_BYTES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def idx_bytes(arr: np.ndarray, type_byte: int | None = None) -> bytes:
    """The IDX encoding of ``arr``, written by hand from the format description."""
    type_byte = TYPE_BYTES[arr.dtype] if type_byte is None else type_byte
    header = struct.pack(">BBBB", 0, 0, type_byte, arr.ndim)
    header += struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool | None = None) -> Path:
    data = idx_bytes(arr)
    if gz if gz is not None else path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_fashion(root: Path, n_train: int, n_test: int, n_train_labels: int | None = None) -> Path:
    """Fake Fashion-MNIST files with the real names; distinct seeded pixels and labels."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    counts = {"train": (n_train, n_train_labels or n_train), "test": (n_test, n_test)}
    for split, (image_file, label_file) in FASHION_MNIST_FILES.items():
        n_images, n_labels = counts[split]
        write_idx(root / image_file, rng.integers(0, 256, (n_images, 28, 28), dtype=np.uint8))
        write_idx(root / label_file, (np.arange(n_labels) % 10).astype(np.uint8))
    return root


# ---------------------------------------------------------------- read_idx


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("shape", [(7,), (3, 4, 5)], ids=["1d", "3d"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_read_idx_round_trips_exactly(tmp_path, gz, shape, dtype):
    rng = np.random.default_rng(1)
    if dtype is np.uint8:
        arr = rng.integers(0, 256, shape, dtype=np.uint8)
    else:
        arr = (rng.standard_normal(shape) * 1e3).astype(np.float32)
    path = write_idx(tmp_path / ("a.idx.gz" if gz else "a.idx"), arr)
    got = read_idx(path)
    assert got.dtype == np.dtype(dtype) and got.shape == shape
    np.testing.assert_array_equal(got, arr)
    assert read_idx(str(path)).shape == shape  # str paths work too


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float64])
def test_read_idx_other_types_are_big_endian(tmp_path, dtype):
    arr = np.array([[-3, 2], [1000 if dtype is not np.int8 else 100, -1]], dtype=dtype)
    got = read_idx(write_idx(tmp_path / "a.idx", arr))
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, arr)


def test_read_idx_detects_gzip_by_magic_without_suffix(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    got = read_idx(write_idx(tmp_path / "images-idx2-ubyte", arr, gz=True))
    np.testing.assert_array_equal(got, arr)
    assert got.flags.writeable


def test_read_idx_of_real_layout_bytes(tmp_path):
    # Bytes spelled out as in the format description, independent of idx_bytes.
    raw = bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 250, 251, 252])
    (tmp_path / "x").write_bytes(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), [[1, 2, 3], [250, 251, 252]])
    raw = bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + struct.pack(">f", 1.5)
    (tmp_path / "y").write_bytes(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "y"), np.array([1.5], dtype=np.float32))


def corrupt(tmp_path: Path, kind: str) -> Path:
    good = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    name, data = {
        "bad magic": ("bad-magic-idx3-ubyte", b"\x01\x02" + good[2:]),
        "truncated data": ("short-idx3-ubyte", good[:-5]),
        "unknown type": ("odd-type-idx3-ubyte", good[:2] + b"\x0a" + good[3:]),
        "extra bytes": ("long-idx3-ubyte", good + b"\x00\x00"),
        "truncated header": ("header-idx3-ubyte", good[:9]),
        "tiny": ("tiny-idx3-ubyte", b"\x00\x00"),
        "truncated gzip": ("cut-idx3-ubyte.gz", gzip.compress(good)[:-12]),
        "not gzip": ("plain-idx3-ubyte.gz", good),
    }[kind]
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("bad magic", "magic"),
        ("truncated data", "truncated"),
        ("unknown type", "type byte 0x0A"),
        ("extra bytes", "size mismatch"),
        ("truncated header", "truncated header"),
        ("tiny", "too short"),
        ("truncated gzip", "gzip"),
        ("not gzip", "gzip"),
    ],
)
def test_read_idx_rejects_corrupt_files_naming_them(tmp_path, kind, words):
    path = corrupt(tmp_path, kind)
    with pytest.raises(DataError, match=words) as info:
        read_idx(path)
    assert path.name in str(info.value)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such IDX file") as info:
        read_idx(tmp_path / "gone-idx1-ubyte.gz")
    assert "gone-idx1-ubyte.gz" in str(info.value)


# ---------------------------------------------------------------- load_fashion_mnist


def test_fashion_mnist_with_wrong_counts_is_rejected(tmp_path):
    root = write_fashion(tmp_path / "fm", n_train=12, n_test=5)
    with pytest.raises(DataError, match=r"expected 60000 .*28x28") as info:
        load_fashion_mnist(root)
    assert "train-images-idx3-ubyte.gz" in str(info.value)


def test_fashion_mnist_missing_folder_gives_install_hint(tmp_path):
    with pytest.raises(DataError) as info:
        load_fashion_mnist(tmp_path / "nowhere")
    msg = str(info.value)
    assert str(tmp_path / "nowhere") in msg and "does not exist" in msg
    assert "dataset-fashion-mnist" in msg and "SLIMKIT_FASHION_MNIST" in msg


def test_fashion_mnist_missing_file_is_named(tmp_path):
    root = write_fashion(tmp_path / "fm", n_train=12, n_test=5)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="lacks t10k-labels-idx1-ubyte.gz") as info:
        load_fashion_mnist(root)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


def test_fashion_mnist_env_var_is_used_when_no_root(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMKIT_FASHION_MNIST", str(tmp_path / "from-env"))
    with pytest.raises(DataError, match="SLIMKIT_FASHION_MNIST") as info:
        load_fashion_mnist()
    assert str(tmp_path / "from-env") in str(info.value)


@pytest.fixture
def small_fashion_sizes(monkeypatch):
    """Let the real checks run on small fake files."""
    monkeypatch.setitem(images.FASHION_MNIST_SIZES, "train", 30)
    monkeypatch.setitem(images.FASHION_MNIST_SIZES, "test", 20)


def test_fashion_mnist_loads_valid_files(tmp_path, monkeypatch, small_fashion_sizes):
    root = write_fashion(tmp_path / "fm", n_train=30, n_test=20)
    monkeypatch.setenv("SLIMKIT_FASHION_MNIST", str(root))
    for d in (load_fashion_mnist(root), load_fashion_mnist(), load_image_task("fashion-mnist")):
        assert d.name == "fashion-mnist"
        assert d.train_x.shape == (30, 28, 28) and d.test_x.shape == (20, 28, 28)
        assert d.train_x.dtype == np.float32 and d.test_x.dtype == np.float32
        assert d.train_y.dtype == np.int64 and d.test_y.dtype == np.int64
        np.testing.assert_array_equal(d.train_y, np.arange(30) % 10)
        raw = read_idx(root / "train-images-idx3-ubyte.gz")
        np.testing.assert_allclose(d.train_x, raw / 255.0, rtol=1e-6)
        assert d.label_names[0] == "T-shirt/top" and d.label_names[-1] == "Ankle boot"
        assert len(d.label_names) == 10


def test_fashion_mnist_label_count_mismatch(tmp_path, small_fashion_sizes):
    root = write_fashion(tmp_path / "fm", n_train=30, n_test=20, n_train_labels=29)
    with pytest.raises(DataError, match="expected 30 unsigned-byte labels") as info:
        load_fashion_mnist(root)
    assert "train-labels-idx1-ubyte.gz" in str(info.value)


def test_fashion_mnist_label_out_of_range(tmp_path, small_fashion_sizes):
    root = write_fashion(tmp_path / "fm", n_train=30, n_test=20)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.full(20, 10, dtype=np.uint8))
    with pytest.raises(DataError, match=r"label 10 is out of range 0\.\.9") as info:
        load_fashion_mnist(root)
    assert "t10k-labels-idx1-ubyte.gz" in str(info.value)


# ---------------------------------------------------------------- validation_split


def unique_data(n_train: int = 50, n_test: int = 10) -> ImageClassificationData:
    """Every train image holds its own index, so images identify examples."""
    train_x = np.broadcast_to(np.arange(n_train, dtype=np.float32)[:, None, None], (n_train, 2, 3)).copy()
    test_x = np.full((n_test, 2, 3), -1.0, dtype=np.float32) + np.arange(n_test)[:, None, None]
    return ImageClassificationData(
        "toy", train_x / n_train, np.arange(n_train) % 3, test_x, np.arange(n_test) % 3, ["a", "b", "c"]
    )


def ids(x: np.ndarray, n_train: int = 50) -> list[int]:
    return [round(float(v) * n_train) for v in x[:, 0, 0]]


def test_validation_split_sizes_and_disjointness():
    d = unique_data()
    reduced, (val_x, val_y) = d.validation_split(12, seed=3)
    assert reduced.train_x.shape == (38, 2, 3) and len(reduced.train_y) == 38
    assert val_x.shape == (12, 2, 3) and len(val_y) == 12
    train_ids, val_ids = ids(reduced.train_x), ids(val_x)
    assert set(train_ids).isdisjoint(val_ids)
    assert sorted(train_ids + val_ids) == list(range(50))
    assert train_ids == sorted(train_ids)  # what stays keeps its order
    # Labels travel with their images.
    np.testing.assert_array_equal(reduced.train_y, np.array(train_ids) % 3)
    np.testing.assert_array_equal(val_y, np.array(val_ids) % 3)
    assert reduced.name == "toy" and reduced.label_names == ["a", "b", "c"]


def test_validation_split_is_deterministic_per_seed():
    d = unique_data()
    a, (ax, ay) = d.validation_split(10, seed=7)
    b, (bx, by) = unique_data().validation_split(10, seed=7)
    np.testing.assert_array_equal(ax, bx)
    np.testing.assert_array_equal(ay, by)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    _, (cx, _) = d.validation_split(10, seed=8)
    assert ids(cx) != ids(ax)
    assert ids(ax) != list(range(10)) and ids(ax) != list(range(40, 50))


def test_validation_split_leaves_test_and_original_unchanged():
    d = unique_data()
    before = (d.train_x.copy(), d.train_y.copy(), d.test_x.copy(), d.test_y.copy())
    reduced, _ = d.validation_split(5, seed=0)
    np.testing.assert_array_equal(reduced.test_x, before[2])
    np.testing.assert_array_equal(reduced.test_y, before[3])
    for got, want in zip((d.train_x, d.train_y, d.test_x, d.test_y), before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert len(d.train_y) == 50


@pytest.mark.parametrize("n_val", [0, -1, 50, 51, 2.5])
def test_validation_split_rejects_bad_sizes(n_val):
    with pytest.raises(DataError, match="between 1 and 49"):
        unique_data().validation_split(n_val, seed=0)


# ---------------------------------------------------------------- image folders


def write_png(path: Path, value: int, size: tuple[int, int] = (28, 28), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, value, value)
    Image.new(mode, size, color).save(path)


def image_folder(root: Path) -> Path:
    """2 classes, 3+2 train and 1+1 test PNGs; each pixel value identifies its image."""
    for i in range(3):
        write_png(root / "train" / "boots" / f"b{i}.png", 10 + i)
    for i in range(2):
        write_png(root / "train" / "apples" / f"a{i}.png", 200 + i, mode="RGB")
    write_png(root / "test" / "apples" / "t0.png", 255)
    write_png(root / "test" / "boots" / "t1.png", 0)
    return root


def test_image_folder_loads_shapes_labels_and_classes(tmp_path):
    root = image_folder(tmp_path / "imgs")
    (root / "train" / "boots" / "notes.txt").write_text("not an image")
    d = load_image_task(str(root))
    assert d.name == str(root)
    assert d.label_names == ["apples", "boots"]
    assert d.train_x.shape == (5, 28, 28) and d.test_x.shape == (2, 28, 28)
    assert d.train_x.dtype == np.float32 and d.train_y.dtype == np.int64
    np.testing.assert_array_equal(d.train_y, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(d.test_y, [0, 1])
    np.testing.assert_allclose(d.train_x[:, 0, 0] * 255, [200, 201, 10, 11, 12], atol=1e-4)
    np.testing.assert_allclose(d.test_x[:, 5, 5], [1.0, 0.0])
    assert 0.0 <= d.train_x.min() and d.train_x.max() <= 1.0


def test_image_folder_wrong_size_image_is_named(tmp_path):
    root = image_folder(tmp_path / "imgs")
    write_png(root / "test" / "boots" / "big.png", 5, size=(32, 28))
    with pytest.raises(DataError, match="32x28") as info:
        load_image_task(str(root))
    assert "big.png" in str(info.value)


def test_image_folder_one_class_is_rejected(tmp_path):
    root = tmp_path / "imgs"
    write_png(root / "train" / "only" / "a.png", 1)
    write_png(root / "test" / "only" / "b.png", 2)
    with pytest.raises(DataError, match="at least two"):
        load_image_task(str(root))


def test_image_folder_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="no such directory.*fashion-mnist"):
        load_image_task(str(tmp_path / "nope"))
    root = image_folder(tmp_path / "imgs")
    for p in (root / "test").rglob("*.png"):
        p.unlink()
    with pytest.raises(DataError, match="no .png/.jpg/.jpeg images") as info:
        load_image_task(str(root))
    assert str(root / "test") in str(info.value)
    for d in sorted((root / "test").iterdir()):
        d.rmdir()
    (root / "test").rmdir()
    with pytest.raises(DataError, match="no 'test' subfolder"):
        load_image_task(str(root))


def test_image_folder_unknown_test_class_and_unreadable_image(tmp_path):
    root = image_folder(tmp_path / "imgs")
    write_png(root / "test" / "pears" / "p.png", 3)
    with pytest.raises(DataError, match="pears"):
        load_image_task(str(root))
    (root / "test" / "pears" / "p.png").unlink()
    (root / "test" / "pears").rmdir()
    (root / "train" / "boots" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read") as info:
        load_image_task(str(root))
    assert "broken.png" in str(info.value)


def test_image_folder_in_colour_resized_with_jpegs(tmp_path):
    root = image_folder(tmp_path / "imgs")
    # A photograph of another size, as JPEG, and a pure red PNG.
    Image.new("RGB", (64, 48), (40, 80, 120)).save(root / "train" / "apples" / "photo.jpg", quality=100)
    Image.new("RGB", (28, 28), (255, 0, 0)).save(root / "test" / "boots" / "red.png")
    with pytest.raises(DataError, match="64x48.*size=\\(height, width\\)"):
        load_image_task(str(root))
    d = load_image_task(str(root), color="rgb", size=(16, 20))
    assert d.train_x.shape == (6, 16, 20, 3) and d.test_x.shape == (3, 16, 20, 3)
    np.testing.assert_array_equal(d.train_y, [0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(d.train_x[2].mean((0, 1)) * 255, [40, 80, 120], atol=2)  # JPEG rounding
    np.testing.assert_allclose(d.train_x[0, 3, 3], [200 / 255] * 3, atol=1e-6)  # grey read as RGB
    np.testing.assert_allclose(d.test_x[1, 8, 8], [1.0, 0.0, 0.0])  # boots/red.png sorts before t1.png
    assert load_image_task(str(root), size=12).train_x.shape == (6, 12, 12)


def test_image_task_rejects_bad_colour_and_size(tmp_path):
    root = image_folder(tmp_path / "imgs")
    with pytest.raises(DataError, match="'grey' or 'rgb'"):
        load_image_task(str(root), color="bgr")
    for bad in (0, (3, 4, 5), (2.5, 3), True):
        with pytest.raises(DataError, match="positive integers"):
            load_image_task(str(root), size=bad)
    with pytest.raises(DataError, match="imagenet_batch"):
        load_image_task("fashion-mnist", color="rgb")


def test_imagenet_batch_replicates_grey_resizes_and_normalises():
    grey = np.full((2, 28, 28), 0.5, dtype=np.float32)
    grey[1] = 1.0
    x = imagenet_batch(grey, 128)
    assert x.shape == (2, 3, 128, 128) and x.dtype == torch.float32
    for c in range(3):  # a constant image stays constant through bilinear resizing
        expected = [(v - IMAGENET_MEAN[c]) / IMAGENET_STD[c] for v in (0.5, 1.0)]
        np.testing.assert_allclose(x[:, c].amax((1, 2)), expected, rtol=1e-6)
        np.testing.assert_allclose(x[:, c].amin((1, 2)), expected, rtol=1e-6)


def test_imagenet_batch_keeps_rgb_order_takes_uint8_and_tensors():
    red = np.zeros((1, 4, 6, 3), dtype=np.uint8)
    red[..., 0] = 255
    x = imagenet_batch(red, None)
    assert x.shape == (1, 3, 4, 6)
    expected = [(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1], -IMAGENET_MEAN[2] / IMAGENET_STD[2]]
    np.testing.assert_allclose(x[0, :, 0, 0], expected, rtol=1e-6)
    # [N, H, W, 1] is greyscale; a left-to-right ramp keeps its direction after resizing.
    ramp = torch.linspace(0, 1, 8).repeat(1, 8, 1).unsqueeze(-1)
    y = imagenet_batch(ramp, (4, 16))
    assert y.shape == (1, 3, 4, 16) and bool((y[0, 0, 0].diff() >= 0).all())
    # Shrinking is antialiased: a one-pixel checkerboard averages to grey (plain bilinear
    # sampling at a third of the size would pick single black and white pixels).
    board = ((torch.arange(9).view(1, 9) + torch.arange(9).view(9, 1)) % 2).float()
    z = imagenet_batch(board.unsqueeze(0), 3)[0, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    np.testing.assert_allclose(z, torch.full((3, 3), 0.5), atol=0.01)


@pytest.mark.parametrize("shape", [(4, 4), (1, 3, 4, 4), (1, 4, 4, 2)])
def test_imagenet_batch_rejects_other_layouts(shape):
    with pytest.raises(DataError, match=r"\[N, H, W, 3\] RGB"):
        imagenet_batch(np.zeros(shape, dtype=np.float32))


# ---------------------------------------------------------------- the real data


@pytest.mark.integration
def test_real_fashion_mnist():
    if not FASHION_MNIST_DIR.is_dir() and not os.environ.get("SLIMKIT_FASHION_MNIST"):
        message = f"Fashion-MNIST: {FASHION_MNIST_DIR} is absent; {images.FASHION_MNIST_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    d = load_fashion_mnist()
    assert d.name == "fashion-mnist"
    assert d.train_x.shape == (60000, 28, 28) and d.test_x.shape == (10000, 28, 28)
    assert d.train_y.shape == (60000,) and d.test_y.shape == (10000,)
    assert d.train_x.dtype == np.float32 and d.test_x.dtype == np.float32
    for x in (d.train_x, d.test_x):
        assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() == 1.0
    assert len(d.label_names) == 10 and d.label_names[9] == "Ankle boot"
    np.testing.assert_array_equal(np.bincount(d.test_y, minlength=10), [1000] * 10)
    np.testing.assert_array_equal(np.unique(d.train_y), np.arange(10))
