"""What ``flowmaps posterior`` and ``flowmaps steer`` turn their arguments into: sampler options,
measurements, reward files, the run's classifier, and the exact reference of a mixture run.

Every bad input is a named ``ValueError`` subclass (``SteeringError``, ``RewardError``,
``OperatorError``), which the CLI reports with exit code 2.

- ``quadratic:FILE``: an ``.npz`` holding ``B`` (``[M, D]``, ``D`` the numbers in one sample), ``b``
  (``[M]``) and a scalar ``strength`` (``lambda > 0``): ``r(x) = -lambda |B x - b|^2 / 2``.
- ``classifier:K``: ``scale * log p(K | x)`` under the in-project feature classifier of the run's data
  (``flowmaps.metrics.classifier``; labelled images with a test split, e.g. Fashion-MNIST), trained
  once and cached like the image metrics' own.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from flowmaps.conditions import Condition, labels_of, scale_of
from flowmaps.data import data_fingerprint, get_data
from flowmaps.data.sources import BUILTIN, MIXTURE_SUFFIXES
from flowmaps.evaluation import classifier_data, uses_image_metrics
from flowmaps.metrics import load_or_train_classifier
from flowmaps.metrics.samples import energy_distance
from flowmaps.oracle import GaussianMixture, PosteriorMixture
from flowmaps.steering.base import STEERERS, SteeringError, check_count
from flowmaps.steering.operators import LinearOperator, OperatorError
from flowmaps.steering.rewards import ClassifierReward, QuadraticReward, RewardError

# the sampler flags of both commands, by the option name the samplers take
OPTION_FLAGS = {"eta": "--eta", "ess_threshold": "--ess-threshold", "lookahead": "--lookahead", "select": "--select",
                "data_std": "--data-std", "map_steps": "--map-steps"}
DEFAULT_PARTICLES = {"smc": 8, "noise-smc": 8, "best-of-n": 8}  # every other sampler: 1
ENERGY_SAMPLES = 4096  # samples compared with the exact reference, at most
QUADRATIC_KEYS = ("B", "b", "strength")
_MEASUREMENT_STREAM = 0x5EED  # the measurement noise of --truth is drawn from its own stream of the seed


def method_options(method: str, given: dict[str, Any], schedule: Any = None) -> dict[str, Any]:
    """The options of sampler ``method`` from the flags ``given`` (``None``: not given), refusing a flag the
    sampler does not take (e.g. ``--lookahead`` for anything but smc); ``schedule`` (the run's) goes to the
    samplers that take one."""
    if method not in STEERERS:
        raise SteeringError(f"unknown steering method {method!r}; choose one of {sorted(STEERERS)}")
    accepted = inspect.signature(STEERERS[method].__init__).parameters
    options = {key: value for key, value in given.items() if value is not None}
    wrong = [key for key in options if key not in accepted]
    if wrong:
        own = [flag for key, flag in OPTION_FLAGS.items() if key in accepted]
        takes = f"it takes {', '.join(own)}" if own else f"it takes none of {', '.join(OPTION_FLAGS.values())}"
        raise SteeringError(f"{OPTION_FLAGS.get(wrong[0], wrong[0])} does not apply to --method {method} ({takes})")
    if schedule is not None and "schedule" in accepted:
        options["schedule"] = schedule
    return options


def particle_count(method: str, particles: Optional[int]) -> int:
    """``--particles``, or the method's default (8 for smc, noise-smc and best-of-n, 1 otherwise)."""
    if particles is None:
        return DEFAULT_PARTICLES.get(method, 1)
    return check_count(particles, "--particles (particles per sample)")


def load_array(path: str, what: str, error: type[ValueError] = RewardError) -> np.ndarray:
    """A real, finite ``.npy`` array (no pickles), or ``error`` naming ``what`` and the fault."""
    file = Path(path)
    if not file.is_file():
        raise error(f"the {what} file {path!r} does not exist")
    try:
        array = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise error(f"cannot read the {what} {path}: {err}") from err
    if not isinstance(array, np.ndarray) or not (np.issubdtype(array.dtype, np.floating)
                                                 or np.issubdtype(array.dtype, np.integer)):
        raise error(f"the {what} {path} must hold one array of real numbers; got "
                    f"{getattr(array, 'dtype', type(array).__name__)}")
    if array.size == 0 or not bool(np.isfinite(array).all()):
        raise error(f"the {what} {path} is empty or has non-finite entries (NaN or inf)")
    return array


def load_truth(path: str, shape: tuple[int, ...]) -> torch.Tensor:
    """``--truth``: one clean sample of ``shape`` (``[*shape]`` or ``[1, *shape]``), float32."""
    x = load_array(path, "truth")
    if tuple(x.shape) not in (tuple(shape), (1, *shape)):
        raise RewardError(f"--truth {path} has shape {list(x.shape)}; it must be one sample of the run's shape "
                          f"{list(shape)}")
    return torch.as_tensor(x, dtype=torch.float32).reshape(1, *shape)


def measure(operator: LinearOperator, truth: torch.Tensor, noise_std: float, seed: int) -> torch.Tensor:
    """``y = A x + noise_std * n``, ``n ~ N(0, I)`` drawn from the seed's own measurement stream (not the
    samplers' noise), ``[*out]``."""
    with torch.no_grad():
        clean = operator(truth)[0]
    gen = torch.Generator().manual_seed(seed * 65_537 + _MEASUREMENT_STREAM)
    return clean + noise_std * torch.randn(clean.shape, generator=gen, dtype=clean.dtype)


def quadratic_reward(path: str, shape: tuple[int, ...]) -> QuadraticReward:
    """``quadratic:FILE``: the ``.npz`` of the module docstring, checked, as a ``QuadraticReward``."""
    file = Path(path)
    if file.suffix != ".npz":
        raise RewardError(f"quadratic:FILE takes an .npz with arrays {', '.join(QUADRATIC_KEYS)}; got {path!r}")
    if not file.is_file():
        raise RewardError(f"the quadratic reward file {path!r} does not exist")
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError, KeyError) as err:
        raise RewardError(f"cannot read the quadratic reward file {path}: {err}") from err
    missing, extra = sorted(set(QUADRATIC_KEYS) - set(arrays)), sorted(set(arrays) - set(QUADRATIC_KEYS))
    if missing or extra:
        raise RewardError(f"the quadratic reward file {path} must hold exactly {', '.join(QUADRATIC_KEYS)}; missing "
                          f"{missing}, unknown {extra}")
    for key, value in arrays.items():
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
            raise RewardError(f"the quadratic reward file {path}: {key} must hold real numbers; got {value.dtype}")
        if not bool(np.isfinite(value).all()):
            raise RewardError(f"the quadratic reward file {path}: {key} has non-finite entries (NaN or inf)")
    matrix, target, strength = arrays["B"], arrays["b"], arrays["strength"]
    dim = math.prod(shape)
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] != dim:
        raise RewardError(f"the quadratic reward file {path}: B has shape {list(matrix.shape)}; it must be [M, {dim}] "
                          f"(M >= 1, {dim} the numbers in one sample of shape {list(shape)})")
    if target.shape != (matrix.shape[0],):
        raise RewardError(f"the quadratic reward file {path}: b has shape {list(target.shape)}; it must be "
                          f"[{matrix.shape[0]}] (one entry per row of B)")
    if strength.size != 1 or not float(strength.reshape(-1)[0]) > 0:
        raise RewardError(f"the quadratic reward file {path}: strength must be one positive number; got "
                          f"{strength.tolist()}")
    return QuadraticReward(torch.as_tensor(matrix, dtype=torch.float64), torch.as_tensor(target, dtype=torch.float64),
                           float(strength.reshape(-1)[0]), shape)


def find_classifier(data_spec: str, shape: tuple[int, ...], device: torch.device) -> tuple[nn.Module, int]:
    """The run's in-project feature classifier, ``(FeatureCNN, num_classes)``, frozen and in eval mode:
    the one the image metrics use (found in, or trained into, the classifier cache)."""

    if len(shape) != 3:
        raise RewardError(f"classifier:K needs an image run ([C, H, W] samples) whose data has a classifier; this "
                          f"run's samples have shape {list(shape)}")
    data = get_data(data_spec)
    if not uses_image_metrics(data):
        raise RewardError(f"the run's data {data_spec!r} has no in-project classifier: that needs labelled images with "
                          "a test split (e.g. fashion-mnist)")
    cached = load_or_train_classifier(data_fingerprint(data_spec), lambda: classifier_data(data), data.num_classes,
                                      device=device)
    if tuple(cached.input_shape) != tuple(shape):
        raise RewardError(f"the classifier of {data_spec!r} takes {list(cached.input_shape)} images; this run's "
                          f"samples are {list(shape)}")
    return cached.model.eval().requires_grad_(False), cached.num_classes


def classifier_reward(arg: str, data_spec: str, shape: tuple[int, ...], scale: float,
                      device: torch.device) -> ClassifierReward:
    """``classifier:K`` with ``--reward-scale``: ``scale * log p(K | x)`` under ``find_classifier``'s model."""
    if not arg.strip().isdigit():
        raise RewardError(f"classifier:K needs a class index K (an integer >= 0); got {arg!r}")
    module, num_classes = find_classifier(data_spec, shape, device)
    return ClassifierReward(module, int(arg), scale, num_classes)


def parse_reward(spec: str, data_spec: str, shape: tuple[int, ...], scale: float, device: torch.device):
    """``--reward``: ``classifier:K`` or ``quadratic:FILE`` (module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind == "quadratic" and arg:
        if scale != 1.0:
            raise RewardError("--reward-scale applies to classifier rewards; a quadratic reward's strength is in its file")
        return quadratic_reward(arg, shape)
    if kind == "classifier" and arg:
        return classifier_reward(arg, data_spec, shape, scale, device)
    raise RewardError(f"unknown reward {spec!r}; use classifier:K or quadratic:FILE.npz")


def run_mixture(data_spec: str, data_name: str, shape: tuple[int, ...]) -> Optional[GaussianMixture]:
    """The Gaussian mixture the run was trained on (a built-in mixture or a mixture spec file that is still
    where the run's config names it and matches the run), else ``None``: there is no exact reference."""

    if not (data_spec in BUILTIN or (Path(data_spec).suffix in MIXTURE_SUFFIXES and Path(data_spec).is_file())):
        return None
    try:
        data = get_data(data_spec)
    except ValueError:
        return None
    mixture = getattr(data, "mixture", None)
    if mixture is None or data.name != data_name or tuple(data.shape) != tuple(shape):
        return None
    return mixture


def prior_of(mixture: GaussianMixture, cond: Condition) -> tuple[Optional[GaussianMixture], str]:
    """The exact prior the samples were conditioned on, with what it is: the whole mixture when
    unconditional, its class-``K`` part when every sample is of class ``K`` at guidance 1 (or none);
    otherwise ``(None, why)``."""
    labels, scale = labels_of(cond), scale_of(cond)
    if labels is None:
        return mixture, "the data mixture"
    if scale is not None and not bool((scale == 1).all()):
        return None, "guided samples (scale != 1) have no exact mixture prior"
    classes = labels.unique().tolist()
    if len(classes) != 1:
        return None, "samples of several classes: give one --label K for an exact reference"
    return mixture.conditional(int(classes[0])), f"the class-{int(classes[0])} part of the data mixture"


def exact_scores(samples: torch.Tensor, target: PosteriorMixture, seed: int) -> dict[str, float]:
    """``energy_distance`` of the (flattened) samples to as many exact samples of ``target`` (at most
    ``ENERGY_SAMPLES``), and ``energy_distance_floor``: the same between two independent exact sets."""
    x = samples.reshape(samples.shape[0], -1)[:ENERGY_SAMPLES].double().cpu()
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed * 65_537 + _MEASUREMENT_STREAM + 1)
    reference, second = target.sample(n, gen).double(), target.sample(n, gen).double()
    return {"energy_distance": energy_distance(x, reference), "energy_distance_floor": energy_distance(second, reference),
            "exact_samples": n}


__all__ = ["DEFAULT_PARTICLES", "OPTION_FLAGS", "OperatorError", "classifier_reward", "exact_scores", "find_classifier",
           "load_array", "load_truth", "measure", "method_options", "parse_reward", "particle_count", "prior_of",
           "quadratic_reward", "run_mixture"]
