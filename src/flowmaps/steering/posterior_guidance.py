"""Pseudoinverse-guided posterior sampling for linear-Gaussian inverse problems (Song et al. 2023,
"Pseudoinverse-guided diffusion models for inverse problems"), the reference for linear ``A``.

It approximates ``p(x0 | x_t)`` by ``N(f(x_t, t), r_t^2 I)`` with ``r_t^2 = c^2 sigma_t^2 / (alpha_t^2 c^2 +
sigma_t^2)`` (``c = data_std``), so ``p(y | x_t) ≈ N(y; A f, r_t^2 A A^T + s^2 I)`` and

    grad_x log p(y | x_t) ≈ (d f / d x)^T A^T (r_t^2 A A^T + s^2 I)^-1 (y - A f).

This score term turns the denoiser and noise estimates into the posterior's, ``f_y = f + sigma_t^2 /
alpha_t * g`` and ``eps_y = eps_hat - sigma_t g``, and a deterministic (DDIM) step moves to
``x' = alpha_{t'} f_y + sigma_{t'} eps_y``. For an isotropic Gaussian prior of std ``c`` the
approximation is exact, so with many steps it reproduces the exact posterior. The grid starts at
``t = 1 - 1e-3`` (where ``alpha_t > 0``); each step costs 3 NFE (``v``, and a backward pass through it).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from flowmaps.oracle import check_noise_std
from flowmaps.samplers import time_grid
from flowmaps.schedules import Schedule
from flowmaps.steering.base import (
    Particles,
    Steerer,
    SteeringError,
    SteeringResult,
    default_schedule,
    final_reward,
    register_steerer,
)
from flowmaps.steering.rewards import LinearGaussianLikelihood, Reward

START = 1.0 - 1e-3


@register_steerer
class PosteriorGuidance(Steerer):
    """ΠGDM posterior guidance for a ``LinearGaussianLikelihood`` reward; one particle per sample."""

    name = "posterior-guidance"

    def __init__(self, data_std: float = 1.0, schedule: Optional[Schedule] = None):
        self.data_std = check_noise_std(data_std, "the data std")
        self.schedule = default_schedule(schedule)

    def cost(self, steps: int, particles: int = 1) -> int:
        return 3 * steps

    def check(self, reward: Reward, particles: int) -> None:
        super().check(reward, particles)
        if not isinstance(reward, LinearGaussianLikelihood):
            raise SteeringError("posterior-guidance needs a linear-Gaussian measurement (a likelihood or quadratic "
                                f"reward); got the reward {getattr(reward, 'name', type(reward).__name__)!r}")

    def run(self, model: nn.Module, reward: Reward, noise: torch.Tensor, particles: Particles, steps: int,
            generator: Optional[torch.Generator]) -> SteeringResult:
        assert isinstance(reward, LinearGaussianLikelihood)
        sch, cond, c2 = self.schedule, particles.cond, self.data_std**2
        times = time_grid(steps, dtype=torch.float64)
        times[0] = START
        x = noise
        for t, t_next in zip(times[:-1].tolist(), times[1:].tolist()):
            a, s = float(sch.alpha(torch.tensor(t))), float(sch.sigma(torch.tensor(t)))
            r2 = c2 * s**2 / (a**2 * c2 + s**2)
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                v = model(xg, t, t, cond, output="V")
                f = sch.velocity_to_denoiser(v, xg, t)
                residual = -reward.residual(f)  # y - A f
                z = reward.operator.solve_gram(residual.detach(), torch.full((x.shape[0],), r2, device=x.device,
                                                                            dtype=x.dtype), reward.noise_std**2)
                (g,) = torch.autograd.grad((reward.operator(f) * z).sum(), xg)
            with torch.no_grad():
                f_y = f.detach() + (s**2 / a) * g
                eps_y = sch.velocity_to_noise(v.detach(), x, t) - s * g
                a_next, s_next = sch.alpha(torch.tensor(t_next)), sch.sigma(torch.tensor(t_next))
                x = float(a_next) * f_y + float(s_next) * eps_y
        r = final_reward(reward, x, cond)
        return SteeringResult(x.detach(), r, self.cost(steps), 1, steps, extra={"data_std": self.data_std})
