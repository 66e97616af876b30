"""Image data: class-folder trees (the ImageFolder layout) and Fashion-MNIST from Debian's package.

A class-folder tree holds one sub-folder per class; the sorted sub-folder names are the classes
``0 .. K-1`` and the images directly inside each are its samples (files with other suffixes and
hidden entries are ignored). Every image is decoded once with Pillow into ``uint8`` memory: mode
``L`` stays greyscale (``C = 1``), every other mode is converted to ``RGB`` (``C = 3``), and all
images must then share one size and mode.

Fashion-MNIST is read from the gzip-compressed IDX files of Debian's ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``, or the folder named by ``FLOWMAPS_FASHION_MNIST``): the 60k
training images with their labels, and the 10k test images as the held-out split. Nothing is
cached on disk.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from flowmaps.data.arrays import Samples

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_ENV = "FLOWMAPS_FASHION_MNIST"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {  # split: (images, labels)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # IDX magic numbers: unsigned bytes in 3 and 1 dimensions


def class_folders(root: Path) -> list[tuple[Path, list[Path]]]:
    """The class folders of ``root`` in class order, each with its sorted image files."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"image folder {root} has no class sub-folders (the layout is one sub-folder of images "
                         "per class)")
    classes = []
    for folder in folders:
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"class folder {folder} holds no images (files ending in {', '.join(IMAGE_SUFFIXES)})")
        classes.append((folder, files))
    return classes


def _decode(path: Path) -> Image.Image:
    """The image in ``path``, as ``L`` if it is greyscale and ``RGB`` otherwise."""
    try:
        with Image.open(path) as image:
            image.load()
            return image if image.mode == "L" else image.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def load_image_folder(root: Path) -> Samples:
    """Every image of a class-folder tree as ``uint8`` ``[N, C, H, W]`` with its class labels."""
    classes = class_folders(root)
    pixels, labels = [], []
    first, first_key = None, None
    for label, (_, files) in enumerate(classes):
        for path in files:
            image = _decode(path)
            key = (image.size, image.mode)
            if first is None:
                first, first_key = path, key
            elif key != first_key:
                raise ValueError(f"image {path} is {_describe(key)} but {first} is {_describe(first_key)}; all images "
                                 "of a folder must have one size and mode")
            array = np.asarray(image, dtype=np.uint8)
            pixels.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
            labels.append(label)
    if len(pixels) < 2:
        raise ValueError(f"image folder {root} must hold at least 2 images; it has {len(pixels)}")
    return Samples(np.stack(pixels), np.asarray(labels, dtype=np.int64), len(classes))


def _describe(key: tuple[tuple[int, int], str]) -> str:
    (width, height), mode = key
    return f"{width}x{height} (width x height) {mode}"


def fashion_mnist_dir() -> Path:
    """Where Fashion-MNIST is read from: ``$FLOWMAPS_FASHION_MNIST`` if set, else Debian's folder."""
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


def fashion_mnist_files() -> dict[str, tuple[Path, Path]]:
    """The IDX files (images, labels) of each Fashion-MNIST split, checked to exist (else a ``ValueError``
    that says where they were looked for and how to get them)."""
    directory = fashion_mnist_dir()
    files = {split: (directory / images, directory / labels) for split, (images, labels) in FASHION_MNIST_FILES.items()}
    missing = [p.name for pair in files.values() for p in pair if not p.is_file()]
    if missing:
        raise ValueError(f"fashion-mnist: {', '.join(missing)} not found in {directory} (the folder named by "
                         f"{FASHION_MNIST_ENV}, or {FASHION_MNIST_DIR} when it is unset); install the Debian package "
                         "with `apt-get install dataset-fashion-mnist`, or set "
                         f"{FASHION_MNIST_ENV} to a folder holding those files")
    return files


def load_fashion_mnist() -> tuple[Samples, Samples]:
    """The training (60k) and test (10k) splits of Fashion-MNIST: ``uint8`` ``[N, 1, 28, 28]``, labels 0..9."""
    splits = []
    for images_path, labels_path in fashion_mnist_files().values():
        images = read_idx(images_path, _IDX_IMAGES)
        labels = read_idx(labels_path, _IDX_LABELS)
        if images.shape[0] == 0 or images.shape[1:] != (28, 28) or labels.shape[0] != images.shape[0]:
            raise ValueError(f"fashion-mnist: {images_path} holds images of shape {images.shape} and {labels_path} "
                             f"{labels.shape[0]} labels; expected [N, 28, 28] with N >= 1 and N labels")
        if labels.max() >= 10:
            raise ValueError(f"fashion-mnist: {labels_path} holds label {int(labels.max())}; the classes are 0..9")
        splits.append(Samples(images[:, None], labels.astype(np.int64), 10))
    return splits[0], splits[1]


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The ``uint8`` array of a gzip-compressed IDX file whose magic number must be ``magic``."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"cannot read IDX file {path}: {err}") from err
    ndim = magic & 0xFF
    header = 4 * (1 + ndim)
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise ValueError(f"IDX file {path} must start with magic number {magic}; found {found}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ValueError(f"IDX file {path} announces shape {shape} ({expected} bytes) but holds {len(raw) - header} "
                         "bytes of data (truncated or altered)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()
