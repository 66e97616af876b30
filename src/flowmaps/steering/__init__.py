"""Reward steering and inverse problems with a trained flow map (spec §5, §9).

``steer(model, reward, n, method=...)`` draws ``n`` samples of ``p(x0 | cond) exp(r(x0, cond))``:

- ``fmtt``: flow map trajectory tilting, the look-ahead ``F(x, t, 0)`` (Sabour et al. 2025), with
  Jarzynski weights when ``particles > 1``;
- ``dps``: the same tilting with the denoiser look-ahead ``f(x, t)`` (Chung et al. 2023);
- ``smc``: twisted SMC with the flow-map (or denoiser) look-ahead as the twist and exact weights;
- ``noise-smc``: tempered SMC on the noise of the flow map's noise-to-data map, pCN moves (no gradient);
- ``best-of-n``: keep the best of ``particles`` flow-map samples (or resample them by ``exp(r)``);
- ``posterior-guidance``: ΠGDM, the reference for linear-Gaussian measurements.

Rewards are in ``flowmaps.steering.rewards``, measurement operators in ``flowmaps.steering.operators``;
the exact posterior of a mixture prior is ``flowmaps.oracle.GaussianMixture.posterior``.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import nn

from flowmaps.conditions import Condition
from flowmaps.metrics.samples import module_device
from flowmaps.steering import best_of_n, noise_smc, posterior_guidance, tilting  # noqa: F401  (registers the samplers)
from flowmaps.steering.base import (
    STEERERS,
    Particles,
    Steerer,
    SteeringError,
    SteeringResult,
    check_count,
)
from flowmaps.steering.operators import OperatorError, parse_operator
from flowmaps.steering.rewards import (
    CallableReward,
    ClassifierReward,
    LinearGaussianLikelihood,
    QuadraticReward,
    Reward,
    RewardError,
)

__all__ = ["STEERERS", "CallableReward", "ClassifierReward", "LinearGaussianLikelihood", "OperatorError",
           "QuadraticReward", "Reward", "RewardError", "Steerer", "SteeringError", "SteeringResult",
           "build_steerer", "parse_operator", "steer"]


def build_steerer(method: Union[str, Steerer], **options: Any) -> Steerer:
    """The steering sampler ``method`` (a name in ``STEERERS`` with its options, or an instance)."""
    if isinstance(method, Steerer):
        return method
    if method not in STEERERS:
        raise SteeringError(f"unknown steering method {method!r}; choose one of {sorted(STEERERS)}")
    try:
        return STEERERS[method](**options)
    except TypeError as err:
        raise SteeringError(f"bad options for {method}: {err}") from err


def steer(model: nn.Module, reward: Reward, n: int, method: Union[str, Steerer] = "fmtt", nfe: int = 16,
          particles: int = 1, cond: Condition = None, generator: Optional[torch.Generator] = None,
          shape: Optional[tuple[int, ...]] = None, **options: Any) -> SteeringResult:
    """``n`` samples of the tilted target from ``model`` (a ``FlowMap``) by ``method``, each from a group of
    ``particles`` particles with at most ``nfe`` network evaluations per particle (backward = 2).

    ``cond`` (``[n]`` labels or a ``Guided`` condition) conditions output row ``i`` and all its
    particles; ``shape`` is one sample's shape (default ``model.shape``); noise is drawn with
    ``generator`` on the model's device. ``options`` go to the sampler (``eta``, ``ess_threshold``,
    ``lookahead``, ``select``, ``data_std``, ``schedule``, ``map_steps``, ``step_size``).
    """
    check_count(n, "the number of samples n")
    check_count(particles, "the number of particles")
    check_count(nfe, "the NFE budget")
    steerer = build_steerer(method, **options)
    steerer.check(reward, particles)
    shape = tuple(shape if shape is not None else getattr(model, "shape", None) or ())
    if not shape:
        raise SteeringError("the sample shape is unknown: pass shape=(...) for a model without one")
    if cond is not None and (getattr(cond, "shape", (None,))[0] != n):
        raise SteeringError(f"cond must give one condition per sample, [{n}]; got {tuple(cond.shape)}")
    steps = steerer.steps_for(nfe, particles)
    device = module_device(model)
    noise = torch.randn(n * particles, *shape, generator=generator, device=device)
    result = steerer.run(model, reward, noise, Particles.start(n, particles, cond, device), steps, generator)
    result.extra.setdefault("method", steerer.name)
    if not math.isfinite(float(result.reward.double().mean())):
        raise RewardError(f"{steerer.name} ended with non-finite rewards")
    return result
