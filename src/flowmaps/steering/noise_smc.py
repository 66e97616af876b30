"""Tempered SMC in the flow map's noise space with preconditioned Crank-Nicolson moves.

A flow map turns noise into data in a few evaluations: ``G(z)``, the map's own deterministic sampler
from ``z`` at ``t = 1`` in ``map_steps`` steps (``F(z, 1, 0)`` for one), pushes ``N(0, I)`` onto the
model's ``p_0``. The tilted target ``p_0 exp(r)`` is therefore the push-forward under ``G`` of the
noise-space target ``pi(z) ∝ N(z; 0, I) exp(r(G(z)))``, which this sampler draws by sequential Monte
Carlo over the tempered targets ``pi_k(z) ∝ N(z; 0, I) exp(lambda_k r(G(z)))``, ``lambda_0 = 0 < ... <
lambda_S = 1`` (SMC samplers, Del Moral, Doucet & Jasra 2006; with pCN moves for Gaussian priors in
high dimension, Beskos, Jasra, Muzaffer & Stuart 2015). Each of the ``S`` stages:

1. reweights, ``log w += (lambda_k - lambda_{k-1}) r(G(z))``, with ``lambda_k`` chosen per group so that
   the conditional ESS of the increment (Zhou, Johansen & Aston 2016) is ``ess_threshold`` (adaptive
   tempering), but at least an even share of what remains (``(1 - lambda_{k-1}) / (S - k + 1)``), so
   that ``lambda`` reaches 1 at the last stage;
2. resamples (systematic) the groups whose ESS fraction is below ``ess_threshold``;
3. moves every particle once by a pCN proposal ``z' = sqrt(1 - beta^2) z + beta xi`` (Cotter, Roberts,
   Stuart & White 2013), accepted with probability ``min(1, exp(lambda_k (r(G(z')) - r(G(z)))))``. The
   proposal is reversible for ``N(0, I)``, so the move keeps ``pi_k`` invariant exactly, needs no
   gradient of ``r``, and its acceptance does not decay with the dimension. Each group's ``beta``
   adapts towards an acceptance rate of ``ACCEPTANCE`` from its last move.

Nothing is discretised but the flow map itself: with the exact map the samples tend to the exact tilted
target as the particles grow (unlike the tilted-SDE samplers, whose reference chain carries its own
step error). Cost: ``map_steps`` NFE for the first ``G(z)`` and per move, no backward pass, so
``S = nfe / map_steps - 1`` stages.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from flowmaps.samplers import get_sampler, sample
from flowmaps.steering.base import (
    Particles,
    Steerer,
    SteeringError,
    SteeringResult,
    check_count,
    check_fraction,
    final_reward,
    register_steerer,
)
from flowmaps.steering.rewards import Reward
from flowmaps.time_args import expand_like

ACCEPTANCE = 0.3  # the pCN acceptance rate each group's step size adapts towards
_BISECTIONS = 40


def conditional_ess(log_w: torch.Tensor, increment: torch.Tensor) -> torch.Tensor:
    """``(sum_i W_i u_i)^2 / sum_i W_i u_i^2`` per group (rows of ``[n, K]``), ``W`` the normalised
    weights of ``log_w`` and ``u = exp(increment)``: the ESS fraction the increment leaves (Zhou et al. 2016)."""
    log_norm = torch.log_softmax(log_w, dim=1)
    return torch.exp(2 * torch.logsumexp(log_norm + increment, 1) - torch.logsumexp(log_norm + 2 * increment, 1))


def next_temperature(log_w: torch.Tensor, r: torch.Tensor, lam: torch.Tensor, stages_left: int,
                     target: float) -> torch.Tensor:
    """Each group's next ``lambda`` (``[n]``): the largest step in ``(0, 1 - lam]`` whose conditional ESS is at
    least ``target`` (by bisection; the ESS falls as the step grows), and never less than ``(1 - lam) /
    stages_left``."""
    if stages_left == 1:
        return torch.ones_like(lam)
    room = 1.0 - lam
    low, high = torch.zeros_like(lam), room.clone()
    fits = conditional_ess(log_w, high[:, None] * r) >= target
    for _ in range(_BISECTIONS):
        mid = 0.5 * (low + high)
        ok = conditional_ess(log_w, mid[:, None] * r) >= target
        low, high = torch.where(ok, mid, low), torch.where(ok, high, mid)
    step = torch.where(fits, room, low).maximum(room / stages_left)
    return (lam + step).clamp(max=1.0)


@register_steerer
class NoiseSMC(Steerer):
    """Tempered SMC on the noise of the flow map's own sampler, with pCN moves: no reward gradient, exact
    in the limit of many particles (module docstring)."""

    name = "noise-smc"
    gradient = False
    weighted = True

    def __init__(self, ess_threshold: float = 0.5, map_steps: int = 1, step_size: float = 0.5):
        self.ess_threshold = check_fraction(ess_threshold, "the ESS threshold")
        if self.ess_threshold == 0.0:
            raise SteeringError("noise-smc tempers to an ESS fraction of ess_threshold, so it must be > 0")
        self.map_steps = check_count(map_steps, "map_steps (flow-map steps per noise-to-data map)")
        if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not 0.0 < step_size <= 1.0:
            raise SteeringError(f"the pCN step size beta must be in (0, 1]; got {step_size!r}")
        self.step_size = float(step_size)

    def cost(self, steps: int, particles: int = 1) -> int:
        return self.map_steps * (steps + 1)

    def _push(self, model: nn.Module, z: torch.Tensor, cond, reward: Reward) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            x = sample(model, z, self.map_steps, cond)
        return x, final_reward(reward, x, cond).double()

    def run(self, model: nn.Module, reward: Reward, noise: torch.Tensor, particles: Particles, steps: int,
            generator: Optional[torch.Generator]) -> SteeringResult:
        own = get_sampler(getattr(model, "sampler", "flow_map"))
        if self.map_steps > 1 and not own.deterministic:
            raise SteeringError(f"noise-smc needs a deterministic noise-to-data map; this model's sampler "
                                f"{own.name!r} re-noises between steps, so use map_steps=1")
        n, k, cond = particles.groups, particles.size, particles.cond
        z = noise
        x, r = self._push(model, z, cond, reward)
        lam = torch.zeros(n, dtype=torch.float64, device=z.device)
        beta = torch.full((n,), self.step_size, dtype=torch.float64, device=z.device)
        accepted = []
        for stage in range(steps):
            new = next_temperature(particles.log_w.view(n, k), r.view(n, k), lam, steps - stage, self.ess_threshold)
            particles.log_w += ((new - lam).repeat_interleave(k) * r)
            lam = new
            parents = particles.resample(self.ess_threshold, generator)
            if parents is not None:
                z, x, r = z[parents], x[parents], r[parents]
            b = beta.repeat_interleave(k)
            xi = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z_new = expand_like(torch.sqrt(1 - b * b).to(z.dtype), z) * z + expand_like(b.to(z.dtype), z) * xi
            x_new, r_new = self._push(model, z_new, cond, reward)
            log_u = torch.rand(n * k, generator=generator, device=z.device, dtype=torch.float64).log()
            take = log_u < lam.repeat_interleave(k) * (r_new - r)
            z, x, r = (torch.where(expand_like(take, a), a_new, a) for a, a_new in ((z, z_new), (x, x_new), (r, r_new)))
            rate = take.view(n, k).double().mean(1)
            accepted.append(float(rate.mean()))
            beta = (beta * torch.exp(rate - ACCEPTANCE)).clamp(1e-3, 1.0)
        ess = float(particles.ess().mean())
        keep = particles.choose(generator)
        return SteeringResult(x[keep].detach(), r[keep].to(x.dtype), self.cost(steps), k, steps, ess,
                              particles.resampled,
                              {"map_steps": self.map_steps, "acceptance": sum(accepted) / max(len(accepted), 1)})
