"""Noise schedules: ``x_t = alpha(t) x_0 + sigma(t) eps`` with t = 0 data and t = 1 noise.

The conditional velocity is ``d x_t / dt = alpha'(t) x_0 + sigma'(t) eps`` and the marginal
velocity is its conditional expectation given ``x_t`` (spec §1). Because
``[x_t, v] = [[alpha, sigma], [alpha', sigma']] [x_0, eps]`` with determinant
``alpha sigma' - sigma alpha'`` (1 for the linear schedule, pi/2 for the cosine one), velocity,
denoiser ``f = E[x_0 | x_t]`` and noise prediction ``E[eps | x_t]`` convert into one another
exactly at every ``t``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from flowmaps.time_args import TimeLike, as_batch_time, expand_like


class Schedule(ABC):
    """A path ``x_t = alpha(t) x_0 + sigma(t) eps`` with ``alpha(0) = 1, sigma(0) = 0, sigma(1) = 1``."""

    name: str

    @abstractmethod
    def alpha(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def sigma(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def d_alpha(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def d_sigma(self, t: torch.Tensor) -> torch.Tensor: ...

    def _coefficients(self, t: TimeLike, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tb = expand_like(as_batch_time(t, x), x)
        return self.alpha(tb), self.sigma(tb), self.d_alpha(tb), self.d_sigma(tb)

    def sample_xt(self, x0: torch.Tensor, eps: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """``x_t = alpha(t) x_0 + sigma(t) eps``."""
        a, s, _, _ = self._coefficients(t, x0)
        return a * x0 + s * eps

    def conditional_velocity(self, x0: torch.Tensor, eps: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """``alpha'(t) x_0 + sigma'(t) eps`` (``eps - x_0`` for the linear schedule)."""
        _, _, da, ds = self._coefficients(t, x0)
        return da * x0 + ds * eps

    def velocity_to_denoiser(self, v: torch.Tensor, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """``x_0 = (sigma' x - sigma v) / (alpha sigma' - sigma alpha')``."""
        a, s, da, ds = self._coefficients(t, x)
        return (ds * x - s * v) / (a * ds - s * da)

    def velocity_to_noise(self, v: torch.Tensor, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """``eps = (alpha v - alpha' x) / (alpha sigma' - sigma alpha')``."""
        a, s, da, ds = self._coefficients(t, x)
        return (a * v - da * x) / (a * ds - s * da)

    def denoiser_to_velocity(self, x0_hat: torch.Tensor, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """``v = alpha' f + sigma' (x - alpha f) / sigma``; singular at ``t = 0`` where ``sigma = 0``."""
        a, s, da, ds = self._coefficients(t, x)
        return da * x0_hat + ds * (x - a * x0_hat) / s

    def noise_to_velocity(self, eps_hat: torch.Tensor, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """``v = alpha' (x - sigma eps) / alpha + sigma' eps``; singular where ``alpha = 0``."""
        a, s, da, ds = self._coefficients(t, x)
        return da * (x - s * eps_hat) / a + ds * eps_hat


class LinearSchedule(Schedule):
    """Rectified flow / linear interpolation: ``alpha = 1 - t``, ``sigma = t``, velocity ``eps - x_0``."""

    name = "linear"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - t

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.ones_like(t)

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)


class CosineSchedule(Schedule):
    """Trigonometric schedule: ``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)`` (variance preserving)."""

    name = "cosine"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cos(0.5 * math.pi * t)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sin(0.5 * math.pi * t)

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)


SCHEDULES: dict[str, type[Schedule]] = {"linear": LinearSchedule, "cosine": CosineSchedule}


def get_schedule(name: str) -> Schedule:
    """Build a schedule by name (``linear`` or ``cosine``)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name]()
