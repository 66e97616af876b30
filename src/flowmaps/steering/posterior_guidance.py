"""Gaussian posterior guidance for linear-Gaussian inverse problems: the reference for linear ``A``
(the Gaussian approximation of ΠGDM, Song et al. 2023, "Pseudoinverse-guided diffusion models for
inverse problems", with an isotropic covariance).

It approximates ``p(x0 | x_t)`` by ``N(f(x_t, t), r_t^2 I)``, ``f`` the diagonal's denoiser and
``r_t^2 = c^2 sigma_t^2 / (alpha_t^2 c^2 + sigma_t^2)`` (``c = data_std``: exact for ``N(mu, c^2 I)``
data). Then ``p(x0 | x_t, y)`` is Gaussian too, with mean

    f_y = f + r_t^2 A^T (r_t^2 A A^T + s^2 I)^-1 (y - A f),

and the posterior's probability-flow velocity is ``alpha'_t f_y + sigma'_t eps_y`` with ``eps_y = (x -
alpha_t f_y) / sigma_t``: a deterministic (DDIM) step ``x' = alpha_{t'} f_y + sigma_{t'} eps_y``. For an
isotropic Gaussian prior of std ``c`` this is the exact posterior's flow, so with many steps it
reproduces the exact posterior. One NFE per step (``v``; no backward pass: ΠGDM's vector-Jacobian
product ``(df/dx)^T`` is replaced by the covariance ``r_t^2 I`` it approximates, which stays stable
near ``t = 1`` where ``sigma_t^2 / alpha_t`` amplifies a learned Jacobian's error).
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


@register_steerer
class PosteriorGuidance(Steerer):
    """Gaussian posterior guidance for a ``LinearGaussianLikelihood`` reward; one particle per sample."""

    name = "posterior-guidance"
    gradient = False

    def __init__(self, data_std: float = 1.0, schedule: Optional[Schedule] = None):
        self.data_std = check_noise_std(data_std, "the data std")
        self.schedule = default_schedule(schedule)

    def cost(self, steps: int, particles: int = 1) -> int:
        return steps

    def check(self, reward: Reward, particles: int) -> None:
        super().check(reward, particles)
        if not isinstance(reward, LinearGaussianLikelihood):
            raise SteeringError("posterior-guidance needs a linear-Gaussian measurement (a likelihood or quadratic "
                                f"reward); got the reward {getattr(reward, 'name', type(reward).__name__)!r}")

    def run(self, model: nn.Module, reward: Reward, noise: torch.Tensor, particles: Particles, steps: int,
            generator: Optional[torch.Generator]) -> SteeringResult:
        assert isinstance(reward, LinearGaussianLikelihood)
        sch, cond, c2 = self.schedule, particles.cond, self.data_std**2
        times = time_grid(steps, dtype=torch.float64).tolist()
        x = noise
        with torch.no_grad():
            for t, t_next in zip(times[:-1], times[1:]):
                a, s = float(sch.alpha(torch.tensor(t))), float(sch.sigma(torch.tensor(t)))
                r2 = c2 * s**2 / (a**2 * c2 + s**2)
                f = sch.velocity_to_denoiser(model(x, t, t, cond, output="V"), x, t)
                z = reward.operator.solve_gram(-reward.residual(f), torch.full((x.shape[0],), r2, device=x.device,
                                                                            dtype=x.dtype), reward.noise_std**2)
                f_y = f + r2 * self._adjoint(reward, f, z)
                eps_y = (x - a * f_y) / s
                x = float(sch.alpha(torch.tensor(t_next))) * f_y + float(sch.sigma(torch.tensor(t_next))) * eps_y
        r = final_reward(reward, x, cond)
        return SteeringResult(x, r, self.cost(steps), 1, steps, extra={"data_std": self.data_std})

    @staticmethod
    def _adjoint(reward: LinearGaussianLikelihood, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``A^T z`` (a vector-Jacobian product of the linear operator, at any point ``x``)."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (out,) = torch.autograd.grad((reward.operator(xg) * z).sum(), xg)
        return out
