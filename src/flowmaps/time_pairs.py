"""Sampling of time pairs ``(s, t)`` with an oversampled diagonal ``s = t``.

The batch is split, not masked (spec §3): the first ``round(diagonal_fraction * B)`` examples get a
single time ``t`` and train the diagonal (the diffusion-model velocity), the rest get a pair
``(s, t)`` and train the off-diagonal rule. Pairs are drawn in the sampling direction ``s >= t``
(noise towards data) by default; ``direction="both"`` also trains ``t > s`` (data to noise, needed
for inversion ``F(x_0, 0, 1)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TIME_DISTRIBUTIONS = ("uniform", "logit_normal")
DIRECTIONS = ("backward", "both")


@dataclass
class TimePairs:
    """``t_diag`` for the diagonal part of the batch; ``s``, ``t`` for the off-diagonal part."""

    t_diag: torch.Tensor
    s: torch.Tensor
    t: torch.Tensor


class TimePairSampler:
    """Draw ``TimePairs`` for a batch.

    ``distribution="uniform"`` draws ``(s, t)`` uniformly on the triangle ``0 <= t <= s <= 1`` (the
    max and min of two uniforms); ``"logit_normal"`` draws both times from
    ``sigmoid(N(mean, std^2))`` before ordering them (as in MeanFlow / SD3).
    """

    def __init__(
        self,
        diagonal_fraction: float = 0.75,
        distribution: str = "uniform",
        direction: str = "backward",
        logit_mean: float = -0.4,
        logit_std: float = 1.0,
    ):
        if not 0.0 <= diagonal_fraction <= 1.0:
            raise ValueError(f"diagonal_fraction must lie in [0, 1]; got {diagonal_fraction}")
        if distribution not in TIME_DISTRIBUTIONS:
            raise ValueError(f"unknown time distribution {distribution!r}; choose one of {TIME_DISTRIBUTIONS}")
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; choose one of {DIRECTIONS}")
        if logit_std <= 0:
            raise ValueError(f"logit_std must be positive; got {logit_std}")
        self.diagonal_fraction = diagonal_fraction
        self.distribution = distribution
        self.direction = direction
        self.logit_mean = logit_mean
        self.logit_std = logit_std

    def split(self, batch: int) -> tuple[int, int]:
        """Sizes ``(n_diagonal, n_pairs)`` of the two parts of a batch of ``batch`` examples."""
        n_diag = int(round(self.diagonal_fraction * batch))
        return n_diag, batch - n_diag

    def times(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """``n`` single times from the configured distribution."""
        if self.distribution == "uniform":
            return torch.rand(n, generator=generator, device=device)
        z = torch.randn(n, generator=generator, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * z)

    def sample(self, batch: int, generator: torch.Generator, device: torch.device) -> TimePairs:
        n_diag, n_pair = self.split(batch)
        t_diag = self.times(n_diag, generator, device)
        a = self.times(n_pair, generator, device)
        b = self.times(n_pair, generator, device)
        s, t = torch.maximum(a, b), torch.minimum(a, b)
        if self.direction == "both":
            flip = torch.rand(n_pair, generator=generator, device=device) < 0.5
            s, t = torch.where(flip, t, s), torch.where(flip, s, t)
        return TimePairs(t_diag=t_diag, s=s, t=t)
