"""Image-classification tasks: Fashion-MNIST from a Debian package, or a user's image folder.

Fashion-MNIST ships as four IDX files that :func:`read_idx` parses directly (the format
is a tiny header plus raw big-endian numbers), so nothing is ever unpickled and nothing
is cached on disk. Images are float32 in ``[0, 1]``, shaped ``[N, H, W]`` (greyscale) or
``[N, H, W, 3]`` (RGB, from a folder read with ``color="rgb"``); each task carries its
label map, the class name of every label index.

:func:`imagenet_batch` turns a batch of them into what an ImageNet-pretrained backbone
such as MobileNetV2 takes: three channels, resized, normalised.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from slimkit.errors import DataError
from slimkit.zoo.mobilenet import IMAGENET_MEAN, IMAGENET_STD

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "SLIMKIT_FASHION_MNIST"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}
FASHION_MNIST_SIDE = 28
FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_HINT = (
    "install the Debian package dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`, "
    "which `make test` does when run as root), or set SLIMKIT_FASHION_MNIST to a folder with "
    "the four IDX files"
)

# IDX type byte -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
# Files an image folder may hold; anything else in a class folder is ignored.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_SUFFIX_TEXT = "/".join(IMAGE_SUFFIXES)


@dataclass
class ImageClassificationData:
    """Images with integer labels, split into train and test.

    Attributes:
        name: Where the data came from (``"fashion-mnist"`` or the folder given).
        train_x: float32 images in ``[0, 1]``, shape ``[N, H, W]`` (greyscale) or
            ``[N, H, W, 3]`` (RGB).
        train_y: int64 labels, shape ``[N]``, indices into ``label_names``.
        test_x: float32 images in ``[0, 1]``, shaped like ``train_x``.
        test_y: int64 labels, shape ``[M]``.
        label_names: The label map: the name of each class, by label index.
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    label_names: list[str]

    def limited(self, train_limit: int | None, test_limit: int | None) -> ImageClassificationData:
        """The first examples of each split, for quicker runs (the test split stays fixed)."""
        out = dataclasses.replace(
            self, train_x=self.train_x[:train_limit], train_y=self.train_y[:train_limit],
            test_x=self.test_x[:test_limit], test_y=self.test_y[:test_limit],
        )
        if len(set(out.train_y.tolist())) < 2:
            raise DataError(
                f"{self.name}: the first {train_limit} train images all have one label; raise "
                "task.train_limit so training sees every label"
            )
        return out

    def validation_split(
        self, n_val: int, seed: int
    ) -> tuple[ImageClassificationData, tuple[np.ndarray, np.ndarray]]:
        """Carve a random validation set out of the train split.

        The test split is left untouched, so tuning on the validation set never sees it.

        Args:
            n_val: How many train examples to move to the validation set.
            seed: Seed of the random choice; the same seed gives the same split.

        Returns:
            The data with the remaining train examples (in their original order), and
            ``(val_x, val_y)``.

        Raises:
            DataError: If ``n_val`` is not between 1 and the train size minus one.
        """
        n = len(self.train_y)
        if isinstance(n_val, bool) or not isinstance(n_val, (int, np.integer)) or not 1 <= n_val < n:
            raise DataError(
                f"{self.name}: cannot take a validation set of {n_val!r} from {n} train "
                f"examples; give an integer n_val between 1 and {n - 1}"
            )
        order = np.random.default_rng(seed).permutation(n)
        val, keep = order[:n_val], np.sort(order[n_val:])
        reduced = dataclasses.replace(
            self,
            train_x=self.train_x[keep],
            train_y=self.train_y[keep],
            label_names=list(self.label_names),
        )
        return reduced, (self.train_x[val], self.train_y[val])


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, plain or gzip-compressed.

    Gzip is recognised by a ``.gz`` suffix or by the gzip magic bytes.

    Args:
        path: The IDX file.

    Returns:
        The array, with the shape from the header and the native-endian form of the
        header's type (uint8, int8, int16, int32, float32 or float64).

    Raises:
        DataError: If the file is missing or unreadable, is not valid gzip, has a bad
            magic number or type byte, or holds fewer or more bytes than its header says.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such IDX file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the IDX file ({e.strerror or e})") from None
    if path.suffix == ".gz" or raw.startswith(_GZIP_MAGIC):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: not a valid gzip file ({e}); the file is corrupt or truncated") from None

    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header (4 bytes at least)")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()}; an IDX file starts with two zero "
            "bytes, a type byte and the number of dimensions"
        )
    type_byte, ndim = raw[2], raw[3]
    if type_byte not in _IDX_DTYPES:
        known = ", ".join(f"0x{t:02X}" for t in _IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX type byte 0x{type_byte:02X}; known types are {known}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path}: truncated header; {ndim} dimensions need {header} header bytes, "
            f"the file has {len(raw)}"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_byte]
    expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
    got = len(raw) - header
    if got < expected:
        raise DataError(
            f"{path}: truncated data; shape {shape} of {dtype.newbyteorder('=').name} needs "
            f"{expected} bytes after the header, the file has {got}"
        )
    if got > expected:
        raise DataError(
            f"{path}: size mismatch; shape {shape} of {dtype.newbyteorder('=').name} needs "
            f"{expected} bytes after the header, the file has {got} ({got - expected} extra)"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist(root: str | Path | None = None) -> ImageClassificationData:
    """Load Fashion-MNIST from its four gzipped IDX files.

    Args:
        root: Folder holding ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
            ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``. If None, the
            folder named by the environment variable ``SLIMKIT_FASHION_MNIST``, else
            ``/usr/share/datasets/fashion-mnist`` (where the Debian package
            ``dataset-fashion-mnist`` installs them).

    Returns:
        60000 train and 10000 test images of 28x28 as float32 in ``[0, 1]``, int64 labels
        0..9, and the 10 class names.

    Raises:
        DataError: If a file is missing, corrupt, or not shaped like Fashion-MNIST.
    """
    if root is not None:
        directory, origin = Path(root), ""
    elif os.environ.get(FASHION_MNIST_ENV):
        directory, origin = Path(os.environ[FASHION_MNIST_ENV]), f" (from ${FASHION_MNIST_ENV})"
    else:
        directory, origin = FASHION_MNIST_DIR, ""

    names = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        where = "does not exist" if not directory.is_dir() else f"lacks {', '.join(missing)}"
        raise DataError(f"Fashion-MNIST: the folder {directory}{origin} {where}; {FASHION_MNIST_HINT}")

    splits = {
        split: _read_fashion_split(directory / images, directory / labels, FASHION_MNIST_SIZES[split])
        for split, (images, labels) in FASHION_MNIST_FILES.items()
    }
    return ImageClassificationData(
        "fashion-mnist", *splits["train"], *splits["test"], list(FASHION_MNIST_LABELS)
    )


def _read_fashion_split(images_path: Path, labels_path: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    side = FASHION_MNIST_SIDE
    fix = "reinstall dataset-fashion-mnist or point SLIMKIT_FASHION_MNIST to the original files"
    images = read_idx(images_path)
    if images.dtype != np.uint8 or images.shape != (n, side, side):
        raise DataError(
            f"{images_path}: expected {n} unsigned-byte images of {side}x{side}, found "
            f"{images.dtype} of shape {images.shape}; {fix}"
        )
    labels = read_idx(labels_path)
    if labels.dtype != np.uint8 or labels.shape != (n,):
        raise DataError(
            f"{labels_path}: expected {n} unsigned-byte labels to match {images_path.name}, "
            f"found {labels.dtype} of shape {labels.shape}; {fix}"
        )
    n_classes = len(FASHION_MNIST_LABELS)
    if labels.max(initial=0) >= n_classes:
        raise DataError(
            f"{labels_path}: label {int(labels.max())} is out of range 0..{n_classes - 1}; {fix}"
        )
    return images.astype(np.float32) / np.float32(255.0), labels.astype(np.int64)


def load_image_task(
    source: str,
    *,
    color: Literal["grey", "rgb"] = "grey",
    size: int | Sequence[int] | None = None,
) -> ImageClassificationData:
    """Load ``fashion-mnist`` or a folder of images, one subfolder per class.

    A folder is laid out as ``root/train/<class>/*.png`` and ``root/test/<class>/*.png``
    (``.jpg`` and ``.jpeg`` files are read too). Class names are the sorted subfolder
    names of ``train``, and a label is the index of its class name. This is the path for
    your own photographs, such as frames from a car's camera: read them with
    ``color="rgb"`` and ``size=...``, then feed batches through :func:`imagenet_batch`.

    Args:
        source: ``"fashion-mnist"``, the path of such a folder, or of a CSV file of image
            paths and labels (see :func:`load_image_csv`).
        color: for a folder, read images as ``"grey"`` (``[N, H, W]``) or ``"rgb"``
            (``[N, H, W, 3]``). Fashion-MNIST is greyscale; :func:`imagenet_batch`
            replicates it to three channels per batch.
        size: for a folder, resize every image on reading to this side (square) or
            ``(height, width)``, bilinearly, so images of different sizes can be loaded.
            Without it all images must have the size of the first train image.

    Returns:
        The images as float32 in ``[0, 1]`` with int64 labels, in class order.

    Raises:
        DataError: If the folder or a split is missing or empty, there are fewer than two
            classes, ``test`` has a class that ``train`` lacks, an image is unreadable or
            (without ``size``) of a different size, or ``color``/``size`` are invalid or
            given for Fashion-MNIST.
    """
    if color not in ("grey", "rgb"):
        raise DataError(f"color={color!r}: read images as 'grey' or 'rgb'")
    shape = _size(size)
    if source.lower().endswith(".csv"):
        return load_image_csv(source, color=color, size=size)
    if source == "fashion-mnist":
        if color != "grey" or shape is not None:
            raise DataError(
                "fashion-mnist is 28x28 greyscale and loads as such (color and size apply to image "
                "folders); convert batches with slimkit.zoo.images.imagenet_batch(x, size) instead, "
                "which does not hold the whole upscaled set in memory"
            )
        return load_fashion_mnist()
    return _load_image_folder(source, Path(source), "RGB" if color == "rgb" else "L", shape)


def load_image_csv(
    path: str | Path,
    *,
    image_column: str = "image",
    label_column: str = "label",
    color: Literal["grey", "rgb"] = "grey",
    size: int | Sequence[int] | None = None,
) -> ImageClassificationData:
    """Load images listed in a CSV file, one row per image: its path and its label.

    Paths are read relative to the CSV file's folder unless absolute. Labels are any
    strings; class names are their sorted distinct values. The rows are split 80/20 into
    train and test by the same seeded shuffle as text tasks
    (:data:`slimkit.zoo.tasks.SPLIT_SEED`), so every run sees the same test images.

    Args:
        path: the CSV file (UTF-8, with a header row).
        image_column: the column holding each image's path.
        label_column: the column holding each image's class.
        color: read images as ``"grey"`` or ``"rgb"``.
        size: resize every image to this side or ``(height, width)``; without it all
            images must have the size of the first train image.

    Raises:
        DataError: a missing file or column, an unreadable or missing image, fewer than
            two classes, or a train split with a single class.
    """
    from slimkit.zoo.tasks import SPLIT_SEED, TEST_FRACTION

    if color not in ("grey", "rgb"):
        raise DataError(f"color={color!r}: read images as 'grey' or 'rgb'")
    shape = _size(size)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such CSV file; give a CSV with an {image_column!r} and a {label_column!r} column")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (image_column, label_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"{path}: no column {missing[0]!r}; columns are {reader.fieldnames}; set "
                "task.image_column and task.label_column"
            )
        rows = [(row[image_column], row[label_column]) for row in reader]
    if not rows:
        raise DataError(f"{path}: no rows; list one image path and label per row")
    names = sorted({label for _, label in rows})
    if len(names) < 2:
        raise DataError(f"{path}: every row has the label {names[0]!r}; a classification task needs at least two")
    index = {n: i for i, n in enumerate(names)}
    files = [((path.parent / p) if not Path(p).is_absolute() else Path(p), index[label]) for p, label in rows]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(files))
    n_test = max(1, int(round(len(files) * TEST_FRACTION)))
    test, train = [files[i] for i in order[:n_test]], [files[i] for i in order[n_test:]]
    if len({label for _, label in train}) < 2:
        raise DataError(f"{path}: after the 80/20 split the train part ({len(train)} rows) has a single label; "
                        "give more rows of each label")
    mode = "RGB" if color == "rgb" else "L"
    reference = train[0][0]
    first = _read_image(reference, mode, shape).shape
    x_train, y_train = _read_images(train, first, reference, mode, shape)
    x_test, y_test = _read_images(test, first, reference, mode, shape)
    return ImageClassificationData(str(path), x_train, y_train, x_test, y_test, names)


def _size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``size`` as ``(height, width)``, or None."""
    if size is None:
        return None
    sides = [size] if isinstance(size, (int, np.integer)) else list(size)
    if len(sides) not in (1, 2) or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in sides
    ):
        raise DataError(f"size={size!r}: give one side or (height, width), positive integers")
    return (int(sides[0]), int(sides[-1]))


def imagenet_batch(
    images: np.ndarray | torch.Tensor,
    size: int | Sequence[int] | None = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """A batch of images as ImageNet-pretrained backbones (MobileNetV2) take them.

    Greyscale images are replicated to three channels (the pretrained filters expect
    RGB), every image is resized bilinearly to ``size`` (antialiased when shrinking), then
    each channel is normalised with the mean and standard deviation the ImageNet weights
    were trained with. Apply it per batch: all of Fashion-MNIST upscaled to 128x128 at
    once would take 11 GB.

    Args:
        images: a batch as the loaders give it: ``[N, H, W]`` greyscale or
            ``[N, H, W, 3]`` RGB, float in ``[0, 1]`` or uint8 in ``[0, 255]``; a numpy
            array or a tensor (kept on its device).
        size: the output side (square) or ``(height, width)``; None keeps ``H, W``.
        mean: per-channel mean subtracted after scaling to ``[0, 1]``.
        std: per-channel standard deviation divided by.

    Returns:
        float32 ``[N, 3, height, width]``.

    Raises:
        DataError: another layout, or a bad ``size``.
    """
    x = torch.as_tensor(images)
    layout = "give [N, H, W] greyscale or [N, H, W, 3] RGB images, as the slimkit.zoo.images loaders return"
    if x.dim() == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if not (x.dim() == 3 or (x.dim() == 4 and x.shape[-1] == 3)):
        raise DataError(f"imagenet_batch: images of shape {tuple(x.shape)}; {layout}")
    shape = _size(size)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    if shape is not None and tuple(x.shape[2:]) != shape:
        shrinking = shape[0] < x.shape[2] or shape[1] < x.shape[3]
        x = F.interpolate(x, size=shape, mode="bilinear", align_corners=False, antialias=shrinking)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


@dataclass(frozen=True)
class ImageInput:
    """How a batch of task images becomes a model's input tensor.

    Attributes:
        size: ``(height, width)`` the model takes, or None to keep the images' own size.
        channels: 3 (greyscale replicated, as ImageNet backbones take it) or 1 (RGB
            averaged to grey).
        normalize: ``imagenet`` subtracts ImageNet's per-channel mean and divides by its
            standard deviation (what pretrained backbones such as MobileNetV2 expect);
            ``none`` keeps values in ``[0, 1]``.
    """

    size: tuple[int, int] | None = None
    channels: Literal[1, 3] = 3
    normalize: Literal["imagenet", "none"] = "imagenet"

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``[N, H, W]`` or ``[N, H, W, 3]`` images in ``[0, 1]`` as float32 ``[N, C, height, width]``."""
        imagenet = self.normalize == "imagenet"
        if self.channels == 3:
            mean, std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet else ((0.0,) * 3, (1.0,) * 3)
            return imagenet_batch(images, self.size, mean, std)
        x = torch.as_tensor(images)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = (x.mean(-1) if x.dim() == 4 else x).unsqueeze(1)
        if self.size is not None and tuple(x.shape[2:]) != self.size:
            shrinking = self.size[0] < x.shape[2] or self.size[1] < x.shape[3]
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=shrinking)
        if imagenet:
            x = (x - sum(IMAGENET_MEAN) / 3) / (sum(IMAGENET_STD) / 3)
        return x


def _load_image_folder(name: str, root: Path, mode: str = "L", size: tuple[int, int] | None = None) -> ImageClassificationData:
    layout = f"lay it out as {root}/train/<class>/*.png and {root}/test/<class>/*.png"
    if not root.is_dir():
        raise DataError(f"{root}: no such directory; give 'fashion-mnist' or a folder of images ({layout})")
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"{root}: no '{split}' subfolder; {layout}")

    classes = _subfolders(root / "train")
    if len(classes) < 2:
        raise DataError(
            f"{root / 'train'}: found {len(classes)} class folder(s) {classes}; a classification "
            f"task needs at least two, one subfolder of images per class ({layout})"
        )
    extra = sorted(set(_subfolders(root / "test")) - set(classes))
    if extra:
        raise DataError(
            f"{root / 'test'}: class folder(s) {extra} have no counterpart in {root / 'train'}, "
            "so a model could never learn them; add them to train or remove them from test"
        )

    files: dict[str, list[tuple[Path, int]]] = {}
    for split in ("train", "test"):
        found = []
        for label, cls in enumerate(classes):
            found_files = _image_files(root / split / cls)
            if split == "train" and not found_files:
                raise DataError(
                    f"{root / split / cls}: no {_SUFFIX_TEXT} images; every class needs train images, "
                    "so add some or remove the folder"
                )
            found += [(p, label) for p in found_files]
        if not found:
            raise DataError(f"{root / split}: no {_SUFFIX_TEXT} images in any class folder; {layout}")
        files[split] = found

    reference = files["train"][0][0]
    shape = _read_image(reference, mode, size).shape
    x_train, y_train = _read_images(files["train"], shape, reference, mode, size)
    x_test, y_test = _read_images(files["test"], shape, reference, mode, size)
    return ImageClassificationData(name, x_train, y_train, x_test, y_test, classes)


def _subfolders(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(
        p for p in directory.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def _read_image(path: Path, mode: str = "L", size: tuple[int, int] | None = None) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read the image ({e}); replace or remove it") from None


def _read_images(
    files: list[tuple[Path, int]], shape: tuple[int, ...], reference: Path,
    mode: str = "L", size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    x = np.empty((len(files), *shape), dtype=np.float32)
    y = np.empty(len(files), dtype=np.int64)
    for i, (path, label) in enumerate(files):
        pixels = _read_image(path, mode, size)
        if pixels.shape != shape:
            raise DataError(
                f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]} (width x height) but the "
                f"first train image {reference} is {shape[1]}x{shape[0]}; resize it so all "
                "images have the same size, or load with size=(height, width)"
            )
        x[i] = pixels / np.float32(255.0)
        y[i] = label
    return x, y
