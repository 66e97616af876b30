"""Best-of-N: draw ``N`` samples with the flow map's own few-step sampler and keep the best.

Each output looks at its group of ``N = particles`` candidates (``steps`` flow-map steps each, so
``steps`` NFE per particle) and keeps the highest reward (``select="max"``, the usual best-of-N, whose
samples concentrate on the reward's maximisers as ``N`` grows: a bias against the tilted target) or
one drawn with probability ``∝ exp(r)`` (``select="resample"``: sampling-importance-resampling, which
tends to the tilted target ``p exp(r)`` as ``N`` grows). No gradient of the reward is needed.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from flowmaps.samplers import sample
from flowmaps.steering.base import Particles, Steerer, SteeringError, SteeringResult, final_reward, register_steerer
from flowmaps.steering.rewards import Reward

SELECTIONS = ("max", "resample")


@register_steerer
class BestOfN(Steerer):
    """Best-of-N over one-step (or few-step) flow-map samples."""

    name = "best-of-n"
    gradient = False
    weighted = True

    def __init__(self, select: str = "max"):
        if select not in SELECTIONS:
            raise SteeringError(f"unknown best-of-n selection {select!r}; choose one of {SELECTIONS}")
        self.select = select

    def cost(self, steps: int, particles: int = 1) -> int:
        return steps

    def run(self, model: nn.Module, reward: Reward, noise: torch.Tensor, particles: Particles, steps: int,
            generator: Optional[torch.Generator]) -> SteeringResult:
        with torch.no_grad():
            x = sample(model, noise, steps, particles.cond, generator=generator)
        r = final_reward(reward, x, particles.cond)
        if self.select == "max":
            keep = r.view(particles.groups, particles.size).argmax(1) + torch.arange(
                particles.groups, device=r.device) * particles.size
        else:
            particles.log_w += r.double()
            keep = particles.choose(generator)
        return SteeringResult(x[keep], r[keep], steps, particles.size, steps, float(particles.ess().mean()), 0,
                              {"select": self.select})
