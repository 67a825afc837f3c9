"""Fashion-MNIST (docs/workloads.md section 5) read from its original IDX files, in numpy.

    from shmps import fashion_mnist
    images, labels = fashion_mnist.load("train")   # uint8 [60000, 28, 28], uint8 [60000]
    images, labels = fashion_mnist.load("test")    # uint8 [10000, 28, 28], uint8 [10000]

The files are those of Debian's package dataset-fashion-mnist, in /usr/share/datasets/fashion-mnist/
(or the directory given, or $SHMPS_FASHION_MNIST_DIR): train-images-idx3-ubyte.gz,
train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz. They are read
here with gzip, struct and numpy alone (no torchvision, no download), and checked: the IDX magic
number of each file, its dimensions (28x28 images), its count (60,000 or 10,000, the same in the
images and in the labels), its exact length, and labels below 10. Anything else raises
FileNotFoundError or ValueError naming the file, what was wrong and what to do.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_DIR = "SHMPS_FASHION_MNIST_DIR"
ROWS = COLS = 28
CLASSES = 10
COUNTS = {"train": 60000, "test": 10000}
# The files' own prefixes: the test split is called t10k.
PREFIX = {"train": "train", "test": "t10k"}
# IDX magic: two zero bytes, the element type (0x08: unsigned byte), the number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_FIX = ("reinstall the data (apt-get install --reinstall dataset-fashion-mnist), or point "
        f"${ENV_DIR} at a directory holding the four original .gz files")


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The directory read: `path` if given, else $SHMPS_FASHION_MNIST_DIR, else Debian's."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR)


def files(split: str, path: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The (images, labels) files of a split."""
    if split not in COUNTS:
        raise ValueError(f"unknown Fashion-MNIST split '{split}': use 'train' or 'test'")
    d = data_dir(path)
    p = PREFIX[split]
    return d / f"{p}-images-idx3-ubyte.gz", d / f"{p}-labels-idx1-ubyte.gz"


def _read_gz(path: Path) -> bytes:
    if not path.is_file():
        where = "" if path.parent.is_dir() else f" (the directory {path.parent} does not exist either)"
        raise FileNotFoundError(
            f"Fashion-MNIST file {path} not found{where}: install Debian's package with "
            f"`apt-get install dataset-fashion-mnist`, or set ${ENV_DIR} to a directory holding "
            f"{path.name}")
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    # A truncated .gz ends early (EOFError); a damaged one fails its CRC or its header
    # (gzip.BadGzipFile is an OSError; zlib.error for a corrupt deflate stream).
    except (EOFError, OSError, zlib.error) as e:
        raise ValueError(f"Fashion-MNIST file {path} is not a complete gzip file ({e}); {_FIX}") from e


def _parse(path: Path, data: bytes, magic: int, dims: int, count: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """The uint8 array of an IDX file whose header must be `magic` and `dims` dimensions, the
    first of them `count`."""
    header = 4 + 4 * dims
    if len(data) < header:
        raise ValueError(f"Fashion-MNIST file {path} holds {len(data)} bytes once decompressed, less than its "
                         f"{header}-byte IDX header; {_FIX}")
    (got_magic,) = struct.unpack_from(">I", data, 0)
    if got_magic != magic:
        raise ValueError(f"Fashion-MNIST file {path} starts with IDX magic 0x{got_magic:08x}, expected 0x{magic:08x} "
                         f"(unsigned bytes, {dims} dimension{'s' if dims > 1 else ''}): it is not this kind of IDX "
                         f"file; {_FIX}")
    shape = struct.unpack_from(f">{dims}I", data, 4)
    want = (count,) + (ROWS, COLS)[:dims - 1]
    if shape != want:
        raise ValueError(f"Fashion-MNIST file {path} declares dimensions {'x'.join(map(str, shape))}, expected "
                         f"{'x'.join(map(str, want))}; {_FIX}")
    size = int(np.prod(shape))
    if len(data) != header + size:
        raise ValueError(f"Fashion-MNIST file {path} holds {len(data)} bytes once decompressed, expected "
                         f"{header + size} ({header}-byte header + {size} values of "
                         f"{'x'.join(map(str, shape))}): it is "
                         f"{'truncated' if len(data) < header + size else 'longer than its header says'}; {_FIX}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape), shape


def load(split: str = "train", directory: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of the split "train" (N = 60000) or "test"
    (N = 10000). The arrays are read-only views of the decompressed files (copy them to write)."""
    images_path, labels_path = files(split, directory)
    count = COUNTS[split]
    images, _ = _parse(images_path, _read_gz(images_path), IMAGES_MAGIC, 3, count)
    labels, _ = _parse(labels_path, _read_gz(labels_path), LABELS_MAGIC, 1, count)
    top = int(labels.max())
    if top >= CLASSES:
        bad = int(np.argmax(labels >= CLASSES))
        raise ValueError(f"Fashion-MNIST file {labels_path}: label {top} at index {bad}, but there are "
                         f"{CLASSES} classes (0..{CLASSES - 1}); {_FIX}")
    return images, labels


def normalized(images: np.ndarray) -> np.ndarray:
    """float32 [N, 1, 28, 28] in [0, 1]: the network's input."""
    return (images.astype(np.float32) / 255.0).reshape(len(images), 1, ROWS, COLS)
