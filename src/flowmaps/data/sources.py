"""Data sources: what the trainer draws batches of ``x_0`` from.

A source has ``dim`` and ``sample(n, generator) -> [n, dim]``; a source built from a Gaussian
mixture also exposes it as ``mixture`` so that exact answers are available (``--teacher exact``,
flow-map error). Array files are iterated in shuffled epochs whose order is a function of the seed
and epoch number alone.

Files are checked before anything is allocated: an ``.npy`` header must describe exactly the bytes
that follow it, and a mixture spec is read only up to ``flowmaps.train.config.FILE_LIMIT`` bytes and
parsed strictly (no repeated keys, no alias bombs). Mixture weights that do not sum to 1 are
renormalised with a warning. ``data_fingerprint`` identifies what a spec names (the built-in set, or
the SHA-256 of the file), which a resumed run checks against its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from flowmaps.data import toy2d
from flowmaps.oracle import GaussianMixture
from flowmaps.train.config import ConfigError, check_expansion, parse_yaml, read_text_limited

logger = logging.getLogger("flowmaps.data")


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


def _check_npy_header(path: Path) -> None:
    """The ``.npy`` header of ``path`` must announce a real numeric array whose bytes are all in the file."""
    fmt = np.lib.format
    readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
    with open(path, "rb") as f:
        version = fmt.read_magic(f)
        if version not in readers:
            raise ValueError(f"data file {path} is .npy version {version}; versions 1.0 and 2.0 are read")
        shape, _, dtype = readers[version](f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"data file {path} holds Python objects, not numbers")
    expected = math.prod(shape) * dtype.itemsize
    actual = path.stat().st_size - offset
    if actual != expected:
        raise ValueError(f"data file {path}: its header announces shape {shape} of {dtype} ({expected} bytes), "
                         f"but {actual} bytes follow it (truncated or altered)")


def load_array(path: Path) -> np.ndarray:
    """Load and validate an ``[N, D]`` ``.npy`` file of finite numbers (the header checked first)."""
    try:
        _check_npy_header(path)
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


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"duplicate key(s) {repeated}")
    return dict(pairs)


def load_mixture_spec(path: Path) -> GaussianMixture:
    """Read a mixture spec (``.json`` / ``.yaml``): ``{weights: [K], means: [K][D], stds: [K][D]}``."""
    try:
        text = read_text_limited(path, "mixture spec")
        if path.suffix == ".json":
            try:
                spec = json.loads(text, object_pairs_hook=_unique_keys)
            except (ValueError, RecursionError) as err:
                raise ConfigError(f"cannot parse mixture spec {path}: {err}") from err
            check_expansion(spec, f"mixture spec {path}")
        else:
            spec = parse_yaml(text, f"mixture spec {path}")
    except ConfigError as err:
        raise ValueError(str(err)) from err
    if not isinstance(spec, dict):
        raise ValueError(f"mixture spec {path} must be a mapping with keys weights, means, stds")
    missing = sorted({"weights", "means", "stds"} - set(spec))
    extra = sorted(set(spec) - {"weights", "means", "stds"})
    if missing or extra:
        raise ValueError(f"mixture spec {path}: missing keys {missing}, unknown keys {extra} (need weights, means, stds)")
    try:
        mixture = GaussianMixture(spec["weights"], spec["means"], spec["stds"])
    except (ValueError, TypeError, RuntimeError) as err:
        raise ValueError(f"mixture spec {path}: {err}") from err
    total = sum(float(w) for w in np.asarray(spec["weights"], dtype=np.float64).reshape(-1))
    if abs(total - 1.0) > 1e-6:
        logger.warning(f"mixture spec {path}: the weights sum to {total:.6g}, not 1; renormalised to "
                       f"{[round(w, 6) for w in mixture.weights.tolist()]}")
    return mixture


def data_fingerprint(spec: str) -> str:
    """What ``spec`` names, for a resume to check: ``builtin:NAME``, or ``sha256:HEX`` of the data
    file's bytes (an ``.npy`` array or a mixture spec)."""
    if spec in BUILTIN:
        return f"builtin:{spec}"
    digest = hashlib.sha256()
    with open(spec, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


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
