"""Sampling of time pairs ``(s, t)`` with an oversampled diagonal ``s = t``, and gap curricula.

The batch is split, not masked (spec §3): the first ``round(diagonal_fraction * B)`` examples get a
single time ``t`` and train the diagonal (the diffusion-model velocity), the rest get a pair
``(s, t)`` and train the off-diagonal rule. Pairs are drawn in the sampling direction ``s >= t``
(noise towards data) by default; ``direction="both"`` also trains ``t > s`` (data to noise, needed
for inversion ``F(x_0, 0, 1)``).

Distributions of a pair:

- ``"uniform"``: uniform on the triangle ``0 <= t <= s <= 1`` (the max and min of two uniforms). Its
  gap ``s - t`` has density ``2 (1 - gap)``: long jumps are rare (``P(gap > 0.9) = 0.01``), and
  the one-step jump ``(1, 0)`` sits where the density vanishes.
- ``"uniform_gap"``: the gap uniform on ``[0, 1]``, then ``t`` uniform on ``[0, 1 - gap]`` and
  ``s = t + gap`` (density ``1 / (1 - gap)`` on the triangle): every jump length is drawn equally
  often (``P(gap > 0.9) = 0.1``), for maps meant to be good in one or a few steps.
- ``"logit_normal"``: two independent draws ``sigmoid(N(m, sd^2))``, ordered (MeanFlow, iMF: the
  max is the source, the min the target). ``logit_mean`` / ``logit_std`` may be pairs ``(first,
  second)`` to give the two draws their own distributions.
- ``"gap_logit_normal"`` (Terminal Velocity Matching): the gap ``s - t ~ sigmoid(N(gap_mean,
  gap_std^2))`` first, then the target ``t ~ sigmoid(N(m, sd^2))`` truncated to ``t <= 1 - gap``,
  and ``s = t + gap``.

Curriculum (``max_gap_start < 1``): every gap is multiplied by
``g(progress) = max_gap_start + (1 - max_gap_start) min(1, progress / gap_warmup)``, so training
starts on short jumps and reaches the full distribution after the ``gap_warmup`` fraction of steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

TIME_DISTRIBUTIONS = ("uniform", "uniform_gap", "logit_normal", "gap_logit_normal")
DIRECTIONS = ("backward", "both")

PairParam = Union[float, Sequence[float]]


@dataclass
class TimePairs:
    """``t_diag`` for the diagonal part of the batch; ``s``, ``t`` for the off-diagonal part."""

    t_diag: torch.Tensor
    s: torch.Tensor
    t: torch.Tensor


def _pair(value: PairParam, name: str) -> tuple[float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), float(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        return float(value[0]), float(value[1])
    raise ValueError(f"{name} must be a number or a pair of numbers (first, second draw); got {value!r}")


def logit_normal(n: int, mean: float, std: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` draws of ``sigmoid(mean + std * N(0, 1))``."""
    z = torch.randn(n, generator=generator, device=device)
    return torch.sigmoid(mean + std * z)


def progress_of(step: int, total_steps: int) -> float:
    """Training progress in ``[0, 1]`` for curricula: ``step / total_steps``, clipped."""
    return min(1.0, max(0.0, step / max(1, total_steps)))


class TimePairSampler:
    """Draw ``TimePairs`` for a batch (module docstring for the options)."""

    def __init__(
        self,
        diagonal_fraction: float = 0.75,
        distribution: str = "uniform",
        direction: str = "backward",
        logit_mean: PairParam = -0.4,
        logit_std: PairParam = 1.0,
        gap_logit_mean: float = -0.8,
        gap_logit_std: float = 1.0,
        max_gap_start: float = 1.0,
        gap_warmup: float = 0.0,
    ):
        if not 0.0 <= diagonal_fraction <= 1.0:
            raise ValueError(f"diagonal_fraction must lie in [0, 1]; got {diagonal_fraction}")
        if distribution not in TIME_DISTRIBUTIONS:
            raise ValueError(f"unknown time distribution {distribution!r}; choose one of {TIME_DISTRIBUTIONS}")
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; choose one of {DIRECTIONS}")
        self.logit_mean = _pair(logit_mean, "logit_mean")
        self.logit_std = _pair(logit_std, "logit_std")
        if min(self.logit_std) <= 0 or gap_logit_std <= 0:
            raise ValueError(f"logit_std and gap_logit_std must be positive; got {logit_std}, {gap_logit_std}")
        if not 0.0 < max_gap_start <= 1.0:
            raise ValueError(f"max_gap_start must lie in (0, 1]; got {max_gap_start}")
        if not 0.0 <= gap_warmup <= 1.0:
            raise ValueError(f"gap_warmup must lie in [0, 1] (a fraction of training); got {gap_warmup}")
        self.diagonal_fraction = diagonal_fraction
        self.distribution = distribution
        self.direction = direction
        self.gap_logit_mean, self.gap_logit_std = float(gap_logit_mean), float(gap_logit_std)
        self.max_gap_start, self.gap_warmup = max_gap_start, gap_warmup

    def split(self, batch: int) -> tuple[int, int]:
        """Sizes ``(n_diagonal, n_pairs)`` of the two parts of a batch of ``batch`` examples."""
        n_diag = int(round(self.diagonal_fraction * batch))
        return n_diag, batch - n_diag

    def times(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """``n`` single times from the configured distribution (uniform for both uniform pair
        distributions, the first draw's parameters for the logit-normal ones)."""
        if self.distribution in ("uniform", "uniform_gap"):
            return torch.rand(n, generator=generator, device=device)
        return logit_normal(n, self.logit_mean[0], self.logit_std[0], generator, device)

    def max_gap(self, progress: float) -> float:
        """The curriculum factor ``g(progress)`` applied to every gap ``s - t``."""
        if self.max_gap_start >= 1.0:
            return 1.0
        ramp = 1.0 if self.gap_warmup == 0 else min(1.0, progress / self.gap_warmup)
        return self.max_gap_start + (1.0 - self.max_gap_start) * ramp

    def pairs(self, n: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` pairs ``(s, t)`` with ``s >= t`` from the configured distribution (no curriculum)."""
        if self.distribution == "uniform":
            a = torch.rand(n, generator=generator, device=device)
            b = torch.rand(n, generator=generator, device=device)
            return torch.maximum(a, b), torch.minimum(a, b)
        if self.distribution == "uniform_gap":
            gap = torch.rand(n, generator=generator, device=device)
            t = torch.rand(n, generator=generator, device=device) * (1 - gap)
            return (t + gap).clamp(max=1.0), t  # the clamp only absorbs rounding
        if self.distribution == "logit_normal":
            a = logit_normal(n, self.logit_mean[0], self.logit_std[0], generator, device)
            b = logit_normal(n, self.logit_mean[1], self.logit_std[1], generator, device)
            return torch.maximum(a, b), torch.minimum(a, b)
        gap = logit_normal(n, self.gap_logit_mean, self.gap_logit_std, generator, device)
        m, sd = self.logit_mean[1], self.logit_std[1]
        # target t ~ sigmoid(N(m, sd^2)) conditioned on t <= 1 - gap, by inverting the normal CDF
        upper = torch.special.ndtr((torch.logit(1 - gap) - m) / sd)
        u = torch.rand(n, generator=generator, device=device) * upper
        t = torch.sigmoid(m + sd * torch.special.ndtri(u.clamp(min=1e-12)))
        t = torch.minimum(t, 1 - gap)
        return t + gap, t

    def sample_pairs(self, n: int, generator: torch.Generator, device: torch.device,
                     progress: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` pairs ``(s, t)`` with the gap curriculum at ``progress`` and, for ``direction="both"``,
        each pair flipped with probability 1/2."""
        s, t = self.pairs(n, generator, device)
        g = self.max_gap(progress)
        if g < 1.0:
            t = s - g * (s - t)
        if self.direction == "both":
            flip = torch.rand(n, generator=generator, device=device) < 0.5
            s, t = torch.where(flip, t, s), torch.where(flip, s, t)
        return s, t

    def sample(
        self, batch: int, generator: torch.Generator, device: torch.device, progress: float = 1.0
    ) -> TimePairs:
        """Times for a batch: ``t_diag`` for the diagonal rows, ``(s, t)`` for the others."""
        n_diag, n_pair = self.split(batch)
        t_diag = self.times(n_diag, generator, device)
        s, t = self.sample_pairs(n_pair, generator, device, progress)
        return TimePairs(t_diag=t_diag, s=s, t=t)


__all__ = ["TIME_DISTRIBUTIONS", "DIRECTIONS", "TimePairs", "TimePairSampler", "logit_normal", "progress_of"]
