"""Array files: ``.npy`` (samples) and ``.npz`` (samples ``x`` with optional labels ``y``).

Samples are ``[N, D]`` vectors or ``[N, C, H, W]`` images. A ``uint8`` array holds pixels (scaled
to ``[-1, 1]`` when served); any other real dtype is used as the numbers it holds and must be
finite. Labels are integers ``>= 0`` with ``num_classes = max(y) + 1`` unless the ``.npz`` names
``num_classes`` itself. Every ``.npy`` header (also those inside an ``.npz``) is checked before
anything is allocated: it must describe exactly the bytes that follow it. Nothing is unpickled.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

NPZ_KEYS = ("x", "y", "num_classes")  # samples, optional labels, optional class count


@dataclass(frozen=True)
class Samples:
    """``x`` ``[N, *shape]`` (``uint8`` pixels or real numbers), ``y`` ``[N]`` int64 labels or ``None``,
    and the number of classes the labels index (0 when unlabelled)."""

    x: np.ndarray
    y: np.ndarray | None = None
    num_classes: int = 0


def _check_npy_header(f: BinaryIO, size: int, where: str) -> None:
    """The ``.npy`` header read from ``f`` (a stream of ``size`` bytes) must announce a numeric array
    whose bytes are exactly the rest of the stream."""
    fmt = np.lib.format
    readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
    version = fmt.read_magic(f)
    if version not in readers:
        raise ValueError(f"{where} is .npy version {version}; versions 1.0 and 2.0 are read")
    shape, _, dtype = readers[version](f)
    if dtype.hasobject:
        raise ValueError(f"{where} holds Python objects, not numbers")
    expected = math.prod(shape) * dtype.itemsize
    actual = size - f.tell()
    if actual != expected:
        raise ValueError(f"{where}: its header announces shape {shape} of {dtype} ({expected} bytes), "
                         f"but {actual} bytes follow it (truncated or altered)")


def _check_samples(x: np.ndarray, where: str) -> np.ndarray:
    """``x`` must be ``[N, D]`` or ``[N, C, H, W]`` (``N >= 2``) real numbers, finite unless ``uint8``."""
    if x.ndim not in (2, 4):
        raise ValueError(f"{where} must hold samples of shape [N, D] or images of shape [N, C, H, W]; "
                         f"got shape {x.shape}")
    if x.shape[0] < 2 or 0 in x.shape:
        raise ValueError(f"{where} must hold at least 2 samples, each with at least one value; got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{where} must hold real numbers; got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(x)
        if bad.any():
            first = np.argwhere(bad)[0]
            names = ("row", "column") if x.ndim == 2 else ("sample", "channel", "row", "column")
            at = ", ".join(f"{name} {int(i)}" for name, i in zip(names, first))
            raise ValueError(f"{where} contains {int(bad.sum())} non-finite value(s) (NaN or inf); the first is at {at}")
    return x


def check_labels(y: np.ndarray, n: int, where: str, num_classes: int | None = None) -> tuple[np.ndarray, int]:
    """``y`` as ``[n]`` int64 labels in ``[0, num_classes)`` and that class count (``max(y) + 1`` unless
    given); a ``ValueError`` naming ``where`` and the first bad label otherwise."""
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels y in {where} must be integers; got dtype {y.dtype}")
    if y.shape != (n,):
        raise ValueError(f"labels y in {where} must have shape [N] = [{n}] (one per sample); got shape {y.shape}")
    negative = np.flatnonzero(y < 0)
    if negative.size:
        i = int(negative[0])
        raise ValueError(f"labels y in {where} must be >= 0; the first bad label is y[{i}] = {int(y[i])}")
    if num_classes is None:
        return y.astype(np.int64), int(y.max()) + 1
    too_large = np.flatnonzero(y >= num_classes)
    if too_large.size:
        i = int(too_large[0])
        raise ValueError(f"labels y in {where} must be below num_classes = {num_classes}; the first bad label is "
                         f"y[{i}] = {int(y[i])}")
    return y.astype(np.int64), num_classes


def load_npy(path: Path) -> Samples:
    """Read and check an ``.npy`` file of samples (``[N, D]`` or ``[N, C, H, W]``; unlabelled)."""
    try:
        with open(path, "rb") as f:
            _check_npy_header(f, path.stat().st_size, f"data file {path}")
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"cannot read data file {path}: {err}") from err
    return Samples(_check_samples(x, f"data file {path}"))


def load_npz(path: Path) -> Samples:
    """Read and check an ``.npz`` file: ``x`` (samples), optional ``y`` (``[N]`` labels) and optional
    scalar ``num_classes`` (every label below it)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = {}
            for info in archive.infolist():
                key = info.filename.removesuffix(".npy")
                with archive.open(info) as f:
                    _check_npy_header(f, info.file_size, f"array {key!r} of data file {path}")
                members[key] = info
        unknown = sorted(set(members) - set(NPZ_KEYS))
        if unknown or "x" not in members:
            raise ValueError(f"data file {path} has keys {sorted(members)}; it needs 'x' and may have 'y' and "
                             f"'num_classes' (unknown: {unknown})")
        with np.load(path, allow_pickle=False) as arrays:
            loaded = {key: arrays[key] for key in members}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"cannot read data file {path}: {err}") from err
    x = _check_samples(loaded["x"], f"array 'x' of data file {path}")
    num_classes = loaded.get("num_classes")
    if num_classes is not None:
        if num_classes.shape != () or not np.issubdtype(num_classes.dtype, np.integer) or int(num_classes) < 1:
            raise ValueError(f"num_classes in data file {path} must be a positive integer scalar; got "
                             f"{num_classes!r}")
        if "y" not in loaded:
            raise ValueError(f"data file {path} gives num_classes but no labels y")
    if "y" not in loaded:
        return Samples(x)
    y, classes = check_labels(loaded["y"], x.shape[0], f"data file {path}",
                              None if num_classes is None else int(num_classes))
    return Samples(x, y, classes)
