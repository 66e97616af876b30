"""Data sources: what the trainer draws batches of ``x_0`` from.

A source has ``dim`` and ``sample(n, generator) -> [n, dim]``; a source built from a Gaussian
mixture also exposes it as ``mixture`` so that exact answers are available (``--teacher exact``,
flow-map error). Array files are iterated in shuffled epochs whose order is a function of the seed
and epoch number alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from flowmaps.data import toy2d
from flowmaps.oracle import GaussianMixture


class DataSource:
    """Base class: ``sample(n, generator)`` returns ``[n, dim]`` float32 data on ``device``."""

    name: str = ""
    dim: int = 0
    mixture: Optional[GaussianMixture] = None

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


class GeneratedData(DataSource):
    """Infinite data from a sampling function ``fn(n, generator, device)``."""

    def __init__(self, name: str, fn: Callable[..., torch.Tensor], dim: int = 2):
        self.name, self.fn, self.dim = name, fn, dim

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.fn(n, generator=generator, device=generator.device)


class MixtureData(DataSource):
    """Exact samples of a Gaussian mixture (built-in, or from a spec file)."""

    def __init__(self, name: str, mixture: GaussianMixture):
        self.name, self.mixture, self.dim = name, mixture, mixture.dim

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.mixture.sample(n, generator, generator.device)


class ArrayData(DataSource):
    """A finite ``[N, D]`` array, served in shuffled epochs (without replacement within an epoch)."""

    def __init__(self, name: str, array: np.ndarray, seed: int = 0):
        self.name = name
        self.data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        self.dim = self.data.shape[1]
        self.seed, self.epoch, self.position = seed, 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.data.shape[0], generator=g)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        rows = []
        while n > 0:
            take = min(n, self.data.shape[0] - self.position)
            rows.append(self._order[self.position : self.position + take])
            self.position += take
            n -= take
            if self.position == self.data.shape[0]:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
        return self.data[torch.cat(rows)].to(generator.device)

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


def load_array(path: Path) -> np.ndarray:
    """Load and validate an ``[N, D]`` ``.npy`` file of finite numbers."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"cannot read data file {path}: {err}") from err
    if array.ndim != 2:
        raise ValueError(f"data file {path} must hold an array of shape [N, D]; got shape {array.shape}")
    if array.shape[0] < 2 or array.shape[1] < 1:
        raise ValueError(f"data file {path} must hold at least 2 rows and 1 column; got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"data file {path} must hold real numbers; got dtype {array.dtype}")
    bad = ~np.isfinite(array)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"data file {path} contains {int(bad.sum())} non-finite value(s) (NaN or inf); "
            f"the first is at row {row}, column {col}"
        )
    return array


def load_mixture_spec(path: Path) -> GaussianMixture:
    """Read a mixture spec (``.json`` / ``.yaml``): ``{weights: [K], means: [K][D], stds: [K][D]}``."""
    text = path.read_text()
    try:
        if path.suffix == ".json":
            spec = json.loads(text)
        else:
            import yaml

            spec = yaml.safe_load(text)
    except Exception as err:  # the parsers raise several unrelated types
        raise ValueError(f"cannot parse mixture spec {path}: {err}") from err
    if not isinstance(spec, dict):
        raise ValueError(f"mixture spec {path} must be a mapping with keys weights, means, stds")
    missing = sorted({"weights", "means", "stds"} - set(spec))
    extra = sorted(set(spec) - {"weights", "means", "stds"})
    if missing or extra:
        raise ValueError(f"mixture spec {path}: missing keys {missing}, unknown keys {extra} (need weights, means, stds)")
    try:
        return GaussianMixture(spec["weights"], spec["means"], spec["stds"])
    except (ValueError, TypeError, RuntimeError) as err:
        raise ValueError(f"mixture spec {path}: {err}") from err


def get_data(spec: str, seed: int = 0) -> DataSource:
    """A built-in name, an ``.npy`` file of shape ``[N, D]``, or a mixture spec ``.json`` / ``.yaml``."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    path = Path(spec)
    if path.suffix in (".npy", ".json", ".yaml", ".yml"):
        if not path.is_file():
            raise ValueError(f"data file {path} does not exist")
        if path.suffix == ".npy":
            return ArrayData(path.stem, load_array(path), seed=seed)
        return MixtureData(path.stem, load_mixture_spec(path))
    raise ValueError(
        f"unknown data {spec!r}: use a built-in set ({', '.join(sorted(BUILTIN))}), "
        "an .npy file of shape [N, D], or a mixture spec .json/.yaml"
    )
