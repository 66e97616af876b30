"""Sample-quality metrics between a model's samples and reference samples (or a known density).

- ``energy_distance``: ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (Székely & Rizzo), V-statistic over
  all pairs; zero iff the distributions agree; its square root is a metric.
- ``mmd``: squared maximum mean discrepancy with a fixed multi-bandwidth Gaussian kernel
  ``k(x, y) = mean_b exp(-|x - y|^2 / (2 b^2))``, bandwidths ``b in {0.05, 0.1, 0.2, 0.5, 1, 2}``
  (unbiased U-statistic, so it can dip slightly below zero for identical distributions).
- ``sliced_wasserstein``: ``(E_theta W_2^2(theta . X, theta . Y))^{1/2}`` over random unit
  directions, each 1D ``W_2`` from sorted projections (equal sample sizes).
- ``histogram_kl``: ``KL(p || q) = sum_b p_b log(p_b / q_b)`` between target bin probabilities
  ``p`` on a regular grid and the model's histogram ``q_b = (n_b + 1/2) / (N + B/2)`` (a
  Jeffreys pseudo-count of 1/2 per bin keeps it finite; samples outside the grid count in ``N``
  but in no bin, so mass lost outside the box is penalised).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def _as_2d(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() < 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must have shape [N >= 2, ...]; got {tuple(x.shape)}")
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains non-finite values")
    return x


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same number of features; got {x.shape[1]} and {y.shape[1]}")
    return x, y.to(x.device)


def _mean_pairwise_distance(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    total = a.new_zeros(())
    for i in range(0, a.shape[0], chunk):
        total = total + torch.cdist(a[i : i + chunk], b).sum()
    return total / (a.shape[0] * b.shape[0])


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` between the sample sets ``x`` and ``y``."""
    x, y = _check_pair(x, y)
    return float(2 * _mean_pairwise_distance(x, y) - _mean_pairwise_distance(x, x) - _mean_pairwise_distance(y, y))


MMD_BANDWIDTHS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = MMD_BANDWIDTHS) -> float:
    """Unbiased squared MMD with the fixed multi-bandwidth Gaussian kernel of the module docstring."""
    x, y = _check_pair(x, y)

    def kernel_mean(a: torch.Tensor, b: torch.Tensor, same: bool) -> torch.Tensor:
        d2 = torch.cdist(a, b).pow(2)
        k = sum(torch.exp(-d2 / (2 * bw**2)) for bw in bandwidths) / len(bandwidths)
        if same:
            n = a.shape[0]
            return (k.sum() - k.diagonal().sum()) / (n * (n - 1))
        return k.mean()

    return float(kernel_mean(x, x, True) + kernel_mean(y, y, True) - 2 * kernel_mean(x, y, False))


def sliced_wasserstein(
    x: torch.Tensor, y: torch.Tensor, num_projections: int = 256, generator: Optional[torch.Generator] = None
) -> float:
    """Sliced 2-Wasserstein distance over ``num_projections`` random directions (needs equal sizes)."""
    x, y = _check_pair(x, y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"sliced_wasserstein needs equal sample sizes; got {x.shape[0]} and {y.shape[0]}")
    if generator is None:
        generator = torch.Generator(device=x.device).manual_seed(0)
    theta = torch.randn(x.shape[1], num_projections, generator=generator, device=x.device, dtype=x.dtype)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ theta, dim=0)
    py, _ = torch.sort(y @ theta, dim=0)
    return float((px - py).pow(2).mean().sqrt())


def histogram(samples: torch.Tensor, bins: int = 50, box: float = 1.0) -> torch.Tensor:
    """Counts of 2D ``samples`` in a ``bins x bins`` grid on ``[-box, box]^2`` (outside points dropped)."""
    s = _as_2d(samples, "samples")
    if s.shape[1] != 2:
        raise ValueError(f"histogram needs 2D samples; got {s.shape[1]} features")
    idx = torch.floor((s + box) / (2 * box) * bins).long()
    inside = ((idx >= 0) & (idx < bins)).all(dim=1)
    flat = idx[inside, 0] * bins + idx[inside, 1]
    return torch.bincount(flat, minlength=bins * bins).reshape(bins, bins).to(torch.float64)


def histogram_kl(target_probs: torch.Tensor, samples: torch.Tensor, box: float = 1.0) -> float:
    """``KL(p || q)`` of target bin probabilities ``p`` (``[bins, bins]``) to the samples' histogram."""
    bins = target_probs.shape[0]
    counts = histogram(samples, bins, box)
    p = target_probs.to(torch.float64).cpu()
    q = (counts.cpu() + 0.5) / (samples.shape[0] + 0.5 * bins * bins)
    mask = p > 0
    return float((p[mask] * torch.log(p[mask] / q[mask])).sum())


def checkerboard_bin_probs(bins: int = 50) -> torch.Tensor:
    """Exact bin probabilities of Boffi et al.'s checkerboard on a ``bins x bins`` grid of ``[-1, 1]^2``.

    The density is 1/2 on the 8 filled 0.5 x 0.5 squares (``floor(4u) + floor(4v)`` even); each bin's
    probability is the density times the filled area it covers, computed per axis in 1D.
    """
    edges = torch.linspace(-1.0, 1.0, bins + 1, dtype=torch.float64)
    lo, hi = edges[:-1], edges[1:]
    # overlap[b, c] = length of bin b inside checker column/row c (4 cells of width 0.5)
    cells = torch.arange(4, dtype=torch.float64)
    c_lo, c_hi = -1 + 0.5 * cells, -0.5 + 0.5 * cells
    overlap = (torch.minimum(hi[:, None], c_hi[None]) - torch.maximum(lo[:, None], c_lo[None])).clamp(min=0)
    filled = ((cells[:, None] + cells[None, :]) % 2 == 0).to(torch.float64)  # [4, 4]
    area = overlap @ filled @ overlap.T  # [bins, bins]
    return 0.5 * area
