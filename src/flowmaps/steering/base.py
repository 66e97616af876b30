"""What every steering sampler shares: its result, its interface and registry, and particle bookkeeping.

A steering sampler draws ``n`` samples of the tilted target ``p(x0 | cond) exp(r(x0, cond))`` from a
trained flow map. Each output comes from its own group of ``particles`` particles (``[n * K]`` rows,
group ``i`` in rows ``i K .. i K + K - 1``), so weighting and resampling stay within a group and more
particles make each output more exact. Cost is counted in network evaluations (NFE) per particle,
a backward pass through the network counted as two.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from flowmaps.conditions import Condition
from flowmaps.schedules import LinearSchedule, Schedule
from flowmaps.steering.rewards import Reward, evaluate_reward


class SteeringError(ValueError):
    """Steering settings a sampler cannot run with (particles, budget, thresholds)."""


@dataclass
class SteeringResult:
    """``samples`` ``[n, *shape]`` and their ``reward`` ``[n]``; ``nfe``: network evaluations per
    particle (a backward pass counts two); ``ess``: the final effective sample size as a fraction of
    the particles, averaged over groups (1 without weights); ``resamples``: resampling events, all
    groups together; ``steps``: the sampler's time steps."""

    samples: torch.Tensor
    reward: torch.Tensor
    nfe: int
    particles: int
    steps: int
    ess: float = 1.0
    resamples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        """The JSON-able summary: mean reward (and its spread), NFE, particles, ESS, resamples."""
        r = self.reward.double()
        return {"n": int(r.numel()), "reward_mean": float(r.mean()), "reward_std": float(r.std()) if r.numel() > 1
                else 0.0, "nfe_per_particle": self.nfe, "particles": self.particles,
                "nfe_per_sample": self.nfe * self.particles, "steps": self.steps, "ess": self.ess,
                "resamples": self.resamples, **self.extra}


@dataclass
class Particles:
    """The ``[n * K]`` rows of ``n`` groups of ``K`` particles, with their log-weights and conditions."""

    groups: int
    size: int
    cond: Condition
    log_w: torch.Tensor
    resampled: int = 0  # groups resampled so far, summed over steps

    @classmethod
    def start(cls, groups: int, size: int, cond: Condition, device: torch.device) -> Particles:
        rows = torch.arange(groups, device=device).repeat_interleave(size)
        return cls(groups, size, None if cond is None else cond[rows],
                   torch.zeros(groups * size, dtype=torch.float64, device=device))

    def weights(self) -> torch.Tensor:
        """The normalised weights of each group, ``[n, K]``."""
        return torch.softmax(self.log_w.view(self.groups, self.size), dim=1)

    def ess(self, w: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Each group's effective sample size ``(sum w)^2 / sum w^2`` over ``K``, ``[n]`` (of ``w``, the
        normalised weights, when given)."""
        w = self.weights() if w is None else w
        return 1.0 / (w.pow(2).sum(1) * self.size)

    def resample(self, threshold: float, generator: Optional[torch.Generator]) -> Optional[torch.Tensor]:
        """Systematic resampling of the groups whose ESS fraction is below ``threshold``: the row index
        of each particle's parent (``None`` when no group resamples); their log-weights return to 0."""
        w = self.weights()
        low = self.ess(w) < threshold
        if not bool(low.any()):
            return None
        u = (torch.rand(self.groups, 1, generator=generator, device=w.device, dtype=w.dtype)
             + torch.arange(self.size, device=w.device, dtype=w.dtype)) / self.size
        picks = torch.searchsorted(w.cumsum(1), u).clamp_(max=self.size - 1)
        own = torch.arange(self.size, device=w.device).expand(self.groups, -1)
        picks = torch.where(low[:, None], picks, own)
        self.log_w.view(self.groups, self.size)[low] = 0.0
        self.resampled += int(low.sum())
        return (picks + torch.arange(self.groups, device=w.device)[:, None] * self.size).flatten()

    def choose(self, generator: Optional[torch.Generator]) -> torch.Tensor:
        """One row per group, drawn in proportion to the weights: ``[n]`` row indices."""
        picks = torch.multinomial(self.weights(), 1, generator=generator)[:, 0]
        return picks + torch.arange(self.groups, device=picks.device) * self.size


class Steerer(ABC):
    """A steering sampler: ``run`` turns noise ``[n * K, *shape]`` into a ``SteeringResult``.

    ``cost(steps, particles)`` is its NFE per particle with ``steps`` steps, and ``steps_for(nfe,
    particles)`` the most steps a budget of ``nfe`` buys. ``gradient`` says whether it follows ``grad r``.
    """

    name: ClassVar[str]
    gradient: ClassVar[bool] = True
    weighted: ClassVar[bool] = False  # uses more than one particle per output by weighting them

    @abstractmethod
    def cost(self, steps: int, particles: int = 1) -> int: ...

    def steps_for(self, nfe: int, particles: int = 1) -> int:
        steps = 0
        while self.cost(steps + 1, particles) <= nfe:
            steps += 1
        if steps == 0:
            raise SteeringError(f"{self.name} needs at least {self.cost(1, particles)} NFE per particle (one "
                                f"step); got {nfe}")
        return steps

    def check(self, reward: Reward, particles: int) -> None:
        """Refuse settings this sampler cannot use (raise ``SteeringError``)."""
        if particles > 1 and not self.weighted:
            raise SteeringError(f"{self.name} steers each sample alone (particles=1); got particles={particles}")

    @abstractmethod
    def run(self, model: nn.Module, reward: Reward, noise: torch.Tensor, particles: Particles, steps: int,
            generator: Optional[torch.Generator]) -> SteeringResult: ...


STEERERS: dict[str, type[Steerer]] = {}


def register_steerer(cls: type[Steerer]) -> type[Steerer]:
    """Add a steering sampler class to ``STEERERS`` under its ``name``."""
    if cls.name in STEERERS:
        raise ValueError(f"a steering sampler named {cls.name!r} is already registered")
    STEERERS[cls.name] = cls
    return cls


def check_count(value: Any, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SteeringError(f"{name} must be an integer >= {low}; got {value!r}")
    return value


def check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0):
        raise SteeringError(f"{name} must be a number in [0, 1]; got {value!r}")
    return float(value)


def check_eta(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise SteeringError(f"the stochasticity eta must be a finite number >= 0; got {value!r}")
    return float(value)


def final_reward(reward: Reward, x0: torch.Tensor, cond: Condition) -> torch.Tensor:
    with torch.no_grad():
        return evaluate_reward(reward, x0, cond).detach()


def default_schedule(schedule: Optional[Schedule]) -> Schedule:
    return schedule if schedule is not None else LinearSchedule()
