"""Gaussian-mixture spec files (``.json`` / ``.yaml``): data whose exact answers are known.

A spec is ``{weights: [K], means: [K][D], stds: [K][D]}`` with two optional keys: ``labels: [K]``
gives each component a class (the data is then labelled, spec §7) and ``shape: [C, H, W]`` (any
list whose product is ``D``) serves samples in that shape, e.g. ``[1, 4, 4]`` for 16-dimensional
image-shaped data; the mixture's exact answers stay over the flattened ``D``.

A spec is read only up to ``flowmaps.train.config.FILE_LIMIT`` bytes and parsed strictly (no
repeated keys, no alias bombs). Weights that do not sum to 1 are renormalised with a warning.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flowmaps.oracle import GaussianMixture
from flowmaps.train.config import (
    ConfigError,
    check_expansion,
    parse_yaml,
    read_text_limited,
)

logger = logging.getLogger("flowmaps.data")

REQUIRED_KEYS = ("weights", "means", "stds")
OPTIONAL_KEYS = ("labels", "shape")


@dataclass(frozen=True)
class MixtureSpec:
    """A spec file's mixture (labelled if the spec gives labels) and the shape of one sample."""

    mixture: GaussianMixture
    shape: tuple[int, ...]


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"duplicate key(s) {repeated}")
    return dict(pairs)


def _parse(path: Path) -> Any:
    try:
        text = read_text_limited(path, "mixture spec")
        if path.suffix == ".json":
            try:
                spec = json.loads(text, object_pairs_hook=_unique_keys)
            except (ValueError, RecursionError) as err:
                raise ConfigError(f"cannot parse mixture spec {path}: {err}") from err
            check_expansion(spec, f"mixture spec {path}")
            return spec
        return parse_yaml(text, f"mixture spec {path}")
    except ConfigError as err:
        raise ValueError(str(err)) from err


def _sample_shape(value: Any, dim: int, path: Path) -> tuple[int, ...]:
    """``shape`` of a spec: a non-empty list of positive integers whose product is ``dim``."""
    if (not isinstance(value, list) or not value
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value)):
        raise ValueError(f"mixture spec {path}: shape must be a non-empty list of positive integers; got {value!r}")
    if math.prod(value) != dim:
        raise ValueError(f"mixture spec {path}: shape {value} has {math.prod(value)} values but the means have "
                         f"dimension {dim}")
    return tuple(value)


def load_mixture_spec(path: Path) -> MixtureSpec:
    """Read and check a mixture spec (see the module docstring)."""
    spec = _parse(path)
    valid = ", ".join(REQUIRED_KEYS) + " (and optionally " + ", ".join(OPTIONAL_KEYS) + ")"
    if not isinstance(spec, dict):
        raise ValueError(f"mixture spec {path} must be a mapping with keys {valid}")  # noqa: TRY004 (bad file content)
    missing = sorted(set(REQUIRED_KEYS) - set(spec))
    extra = sorted(set(spec) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if missing or extra:
        raise ValueError(f"mixture spec {path}: missing keys {missing}, unknown keys {extra} (the keys are {valid})")
    labels = spec.get("labels")
    if labels is not None and not (isinstance(labels, list)
                                   and all(isinstance(k, int) and not isinstance(k, bool) for k in labels)):
        raise ValueError(f"mixture spec {path}: labels must be a list of integers (one class per component); "
                         f"got {labels!r}")
    try:
        mixture = GaussianMixture(spec["weights"], spec["means"], spec["stds"], labels=labels)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ValueError(f"mixture spec {path}: {err}") from err
    shape = _sample_shape(spec["shape"], mixture.dim, path) if "shape" in spec else (mixture.dim,)
    total = sum(float(w) for w in np.asarray(spec["weights"], dtype=np.float64).reshape(-1))
    if abs(total - 1.0) > 1e-6:
        logger.warning(f"mixture spec {path}: the weights sum to {total:.6g}, not 1; renormalised to "
                       f"{[round(w, 6) for w in mixture.weights.tolist()]}")
    return MixtureSpec(mixture, shape)
