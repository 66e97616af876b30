"""Built-in 2D data sets, each drawn fresh from its generator (infinite data).

All sets live roughly in ``[-1.5, 1.5]^2`` with per-coordinate standard deviation near 0.5-1.
``8gaussians`` and ``ring`` are Gaussian mixtures, so their exact velocity and flow map are known
(``flowmaps.oracle``).
"""

from __future__ import annotations

import math

import torch

from flowmaps.oracle import GaussianMixture


def checkerboard(n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """Uniform on the 8 squares of ``[-1, 1]^2`` where ``floor(4u) + floor(4v)`` is even, ``u = (x + 1) / 2``.

    This is the 2D target of Boffi et al. (2025). Sampling: a uniform cell ``(i, j)`` of the 4x4 grid
    with ``i + j`` even, then a uniform point inside it.
    """
    cell = torch.randint(0, 8, (n,), generator=generator, device=device)
    i = cell // 2
    j = 2 * (cell % 2) + (i % 2)  # j has the parity of i, so i + j is even
    uv = (torch.stack([i, j], dim=1).float() + torch.rand(n, 2, generator=generator, device=device)) / 4
    return 2 * uv - 1


def moons(n: int, generator: torch.Generator | None = None, device="cpu", noise: float = 0.05) -> torch.Tensor:
    """Two interleaved half circles (as scikit-learn's ``make_moons``), centred and scaled to unit size."""
    upper = torch.rand(n, generator=generator, device=device) < 0.5
    angle = math.pi * torch.rand(n, generator=generator, device=device)
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    pts = torch.stack([x - 0.5, y - 0.25], dim=1)
    pts = pts + noise * torch.randn(n, 2, generator=generator, device=device)
    return pts


def spirals(n: int, generator: torch.Generator | None = None, device="cpu", noise: float = 0.03) -> torch.Tensor:
    """Two interleaved Archimedean spirals, radius up to 1."""
    r = torch.sqrt(torch.rand(n, generator=generator, device=device))
    arm = (torch.rand(n, generator=generator, device=device) < 0.5).float()
    angle = 3 * math.pi * r + math.pi * arm
    pts = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1)
    return pts + noise * torch.randn(n, 2, generator=generator, device=device)


def eight_gaussians() -> GaussianMixture:
    """Eight equal Gaussians (std 0.1) at radius 1 on the unit circle's compass points."""
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return GaussianMixture(torch.ones(8), means, 0.1 * torch.ones(8, 2))


def ring() -> GaussianMixture:
    """A ring of 16 equal, narrow Gaussians (std 0.04) at radius 1: a hard many-mode mixture."""
    angles = torch.arange(16, dtype=torch.float64) * (2 * math.pi / 16)
    means = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return GaussianMixture(torch.ones(16), means, 0.04 * torch.ones(16, 2))
