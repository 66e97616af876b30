"""Data sources: what the trainer draws batches of ``x_0`` (and class labels) from, and ``get_data``.

A source has a sample ``shape`` (``dim`` is its product), ``num_classes`` (0 for unlabelled data) and
``sample(n, generator) -> Batch`` with ``x0`` ``[n, *shape]`` float32 and ``cond`` ``[n]`` int64
labels (or ``None``) on the generator's device. A source built from a Gaussian mixture exposes it as
``mixture`` so that exact answers are available (``--teacher exact``, flow-map error); they are over
the flattened ``dim``. Finite data is served in shuffled epochs whose order is a function of the
seed and epoch number alone, labels following their samples; ``test_split()`` is the held-out
real data of a data set that has one (Fashion-MNIST's test set), for image metrics.

Image pixels (``uint8``: array files, class folders, Fashion-MNIST) are kept in memory as bytes and
scaled per batch to ``x = pixel / 127.5 - 1`` in ``[-1, 1]``; arrays of other dtypes are used as
they are. ``data_fingerprint`` identifies what a spec names, which a resumed run checks against its
checkpoint.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from flowmaps.data import toy2d
from flowmaps.data.arrays import Samples, load_npy, load_npz
from flowmaps.data.images import (
    FASHION_MNIST,
    class_folders,
    fashion_mnist_files,
    load_fashion_mnist,
    load_image_folder,
)
from flowmaps.data.mixtures import load_mixture_spec
from flowmaps.methods.base import Batch
from flowmaps.oracle import GaussianMixture


class DataSource:
    """Base class: ``sample(n, generator)`` returns a ``Batch`` on ``generator.device``.

    ``shared_order`` is true for finite data served in one global order (a sharded batch slices one
    draw of the whole batch rather than drawing each shard with its own generator).
    """

    name: str = ""
    shape: tuple[int, ...] = ()
    num_classes: int = 0
    mixture: GaussianMixture | None = None
    shared_order: bool = False

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    def test_split(self) -> Batch | None:
        """Held-out real data (CPU tensors), or ``None`` when the source has none."""
        return None

    def full_split(self) -> Batch | None:
        """Every training sample (CPU tensors) of finite data; ``None`` for data drawn fresh."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


class GeneratedData(DataSource):
    """Infinite unlabelled data from a sampling function ``fn(n, generator, device)``."""

    def __init__(self, name: str, fn: Callable[..., torch.Tensor], shape: tuple[int, ...] = (2,)):
        self.name, self.fn, self.shape = name, fn, shape

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        return Batch(self.fn(n, generator=generator, device=generator.device))


class MixtureData(DataSource):
    """Exact samples of a Gaussian mixture (built-in, or from a spec file), reshaped to ``shape``
    (default ``[dim]``); a labelled mixture's samples carry the classes of their components."""

    def __init__(self, name: str, mixture: GaussianMixture, shape: tuple[int, ...] | None = None):
        self.name, self.mixture = name, mixture
        self.shape = (mixture.dim,) if shape is None else tuple(shape)
        if math.prod(self.shape) != mixture.dim:
            raise ValueError(f"shape {list(self.shape)} does not hold the mixture's {mixture.dim} dimensions")
        self.num_classes = mixture.num_classes

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        if self.num_classes == 0:
            return Batch(self.mixture.sample(n, generator, generator.device).reshape(n, *self.shape))
        x, labels = self.mixture.sample(n, generator, generator.device, return_labels=True)
        return Batch(x.reshape(n, *self.shape), labels)


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """A new float32 tensor: ``uint8`` pixels scaled to ``[-1, 1]``, other numbers as they are."""
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)


class ArrayData(DataSource):
    """Finite samples (``[N, *shape]``, optionally labelled) served in shuffled epochs (without replacement
    within an epoch), with an optional held-out ``test`` split."""

    shared_order = True

    def __init__(self, name: str, train: Samples, seed: int = 0, test: Samples | None = None):
        self.name = name
        self.data = torch.from_numpy(np.ascontiguousarray(train.x if train.x.dtype == np.uint8
                                                          else train.x.astype(np.float32, copy=False)))
        self.labels = None if train.y is None else torch.from_numpy(train.y)
        self.shape, self.num_classes = tuple(self.data.shape[1:]), train.num_classes
        self.test = test
        self.seed, self.epoch, self.position = seed, 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.data.shape[0], generator=g)

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        rows = []
        while n > 0:
            take = min(n, self.data.shape[0] - self.position)
            rows.append(self._order[self.position : self.position + take])
            self.position += take
            n -= take
            if self.position == self.data.shape[0]:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
        index = torch.cat(rows)
        labels = None if self.labels is None else self.labels[index].to(generator.device)
        return Batch(_as_float(self.data[index].to(generator.device)), labels)

    def test_split(self) -> Batch | None:
        if self.test is None:
            return None
        return Batch(_as_float(torch.from_numpy(self.test.x)),
                     None if self.test.y is None else torch.from_numpy(self.test.y))

    def full_split(self) -> Batch:
        return Batch(_as_float(self.data), None if self.labels is None else self.labels.clone())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()


BUILTIN: dict[str, Callable[[], DataSource]] = {
    "checkerboard": lambda: GeneratedData("checkerboard", toy2d.checkerboard),
    "moons": lambda: GeneratedData("moons", toy2d.moons),
    "spirals": lambda: GeneratedData("spirals", toy2d.spirals),
    "8gaussians": lambda: MixtureData("8gaussians", toy2d.eight_gaussians()),
    "ring": lambda: MixtureData("ring", toy2d.ring()),
}

ARRAY_SUFFIXES = (".npy", ".npz")
MIXTURE_SUFFIXES = (".json", ".yaml", ".yml")


def data_fingerprint(spec: str) -> str:
    """What ``spec`` names, for a resume to check: ``builtin:NAME``; ``builtin:fashion-mnist:SIZES`` (the
    byte sizes of its four files); ``folder-sha256:HEX`` over the relative paths, sizes and modification
    times of a class-folder tree's images; or ``sha256:HEX`` of a data file's bytes."""
    if spec in BUILTIN:
        return f"builtin:{spec}"
    if spec == FASHION_MNIST:
        sizes = [p.stat().st_size for pair in fashion_mnist_files().values() for p in pair]
        return f"builtin:{FASHION_MNIST}:{','.join(map(str, sizes))}"
    path = Path(spec)
    digest = hashlib.sha256()
    if path.is_dir():
        for _, files in class_folders(path):
            for file in files:
                stat = file.stat()
                digest.update(f"{file.relative_to(path).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return f"folder-sha256:{digest.hexdigest()}"
    with open(spec, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def get_data(spec: str, seed: int = 0) -> DataSource:
    """A built-in 2D set, ``fashion-mnist``, an ``.npy`` / ``.npz`` array file, a class-folder tree of
    images, or a mixture spec ``.json`` / ``.yaml``; ``seed`` fixes the epoch order of finite data."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    if spec == FASHION_MNIST:
        train, test = load_fashion_mnist()
        return ArrayData(FASHION_MNIST, train, seed=seed, test=test)
    path = Path(spec)
    if path.is_dir():
        return ArrayData(path.name, load_image_folder(path), seed=seed)
    if path.suffix in ARRAY_SUFFIXES + MIXTURE_SUFFIXES:
        if not path.is_file():
            raise ValueError(f"data file {path} does not exist")
        if path.suffix in ARRAY_SUFFIXES:
            return ArrayData(path.stem, load_npy(path) if path.suffix == ".npy" else load_npz(path), seed=seed)
        mixture = load_mixture_spec(path)
        return MixtureData(path.stem, mixture.mixture, mixture.shape)
    raise ValueError(
        f"unknown data {spec!r}: use a built-in set ({', '.join(sorted(BUILTIN))}), {FASHION_MNIST}, an .npy / .npz "
        "array file, a folder of class sub-folders of images, or a mixture spec .json / .yaml"
    )
