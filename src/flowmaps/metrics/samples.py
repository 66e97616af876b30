"""Sample-quality metrics between a model's samples and reference samples (or a known density),
the flow-map error against the exact map, and network-evaluation (NFE) counting.

- ``energy_distance``: ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (Székely & Rizzo), V-statistic over
  all pairs; zero iff the distributions agree; its square root is a metric. The V-statistic is
  never negative and has a positive bias of about ``E|X - X'| / n + E|Y - Y'| / m`` for two
  samples of one distribution: that is the floor a benchmark reports beside it.
- ``mmd``: squared maximum mean discrepancy with a fixed multi-bandwidth Gaussian kernel
  ``k(x, y) = mean_b exp(-|x - y|^2 / (2 b^2))``, bandwidths ``b in {0.05, 0.1, 0.2, 0.5, 1, 2}``
  (unbiased U-statistic, so it can dip slightly below zero for identical distributions).
- ``sliced_wasserstein``: ``(E_theta W_2^2(theta . X, theta . Y))^{1/2}`` over random unit
  directions, each 1D ``W_2`` from sorted projections (equal sample sizes).
- ``histogram_kl``: ``KL(p || q) = sum_b p_b log(p_b / q_b)`` between target bin probabilities
  ``p`` on a regular grid and the model's histogram ``q_b = (n_b + 1/2) / (N + B/2)`` (a
  Jeffreys pseudo-count of 1/2 per bin keeps it finite; samples outside the grid count in ``N``
  but in no bin, so mass lost outside the box is penalised). With ``N`` exact samples the
  estimator is not zero: its floor is about ``log(1 + B / (2 N))``, the pseudo-counts' share of
  the mass (the sampling noise, ``+(B_p - 1) / (2 N)`` over the ``B_p`` bins with ``p > 0``, and
  the pseudo-counts inside them, ``-B_p / (2 N)``, cancel to first order): 0.074 for the
  checkerboard's 50 x 50 grid at 16k samples, 0.019 at 64k. Benchmarks report it beside the KL.
  Two estimators of the checkerboard's ``p`` (``checkerboard_bin_probs(estimator=...)``, both named in
  every table): ``"exact"``, each bin's exact probability (the density times the filled area it
  covers), and ``"midpoint"``, the density at each bin's centre, normalised: our best reading of
  Boffi et al.'s App. G.1. The square edges fall mid-bin on the 50 x 50 grid, so the midpoint
  estimator gives a straddling bin all or none of a half-filled bin's mass, and its floor is far
  higher: 0.072 for 64k exact samples (0.129 at 16k) against the exact estimator's 0.019 (0.074),
  ``tests/metrics/test_samples.py``.
- ``flow_map_error``: ``E |F_model(x_s, s, t) - F_exact(x_s, s, t)|^2 / E |F_exact(x_s, s, t) - x_s|^2``
  with ``x_s`` exact samples of the marginal at ``s``, per ``(s, t)`` pair of a grid and averaged
  over the grid: 0 for the exact map, 1 for the identity map ``F = x``.
- ``NFECounter``: wraps a model and counts its calls (network function evaluations) and the
  examples they processed, so that a sampler's cost is measured rather than assumed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flowmaps.oracle import GaussianMixture


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

    if not bandwidths or min(bandwidths) <= 0:
        raise ValueError(f"mmd needs positive bandwidths; got {tuple(bandwidths)}")

    def kernel_mean(a: torch.Tensor, b: torch.Tensor, same: bool) -> torch.Tensor:
        half_neg_d2 = torch.cdist(a, b).square_().mul_(-0.5)
        total = sum(torch.exp(half_neg_d2 * (1.0 / bw**2)).sum() for bw in bandwidths) / len(bandwidths)
        if same:  # drop the diagonal k(x_i, x_i) = 1: the U-statistic
            n = a.shape[0]
            return (total - n) / (n * (n - 1))
        return total / (a.shape[0] * b.shape[0])

    return float(kernel_mean(x, x, True) + kernel_mean(y, y, True) - 2 * kernel_mean(x, y, False))


def sliced_wasserstein(
    x: torch.Tensor, y: torch.Tensor, num_projections: int = 256, generator: torch.Generator | None = None
) -> float:
    """Sliced 2-Wasserstein distance over ``num_projections`` random directions (needs equal sizes)."""
    x, y = _check_pair(x, y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"sliced_wasserstein needs equal sample sizes; got {x.shape[0]} and {y.shape[0]}")
    if generator is None:
        generator = torch.Generator(device=x.device).manual_seed(0)
    theta = torch.randn(x.shape[1], num_projections, generator=generator, device=x.device, dtype=x.dtype)
    theta = theta / theta.norm(dim=0, keepdim=True)
    # [P, N] rows sort faster than [N, P] columns
    px, _ = torch.sort((x @ theta).T.contiguous(), dim=1)
    py, _ = torch.sort((y @ theta).T.contiguous(), dim=1)
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
    """``KL(p || q)`` of target bin probabilities ``p`` (``[bins, bins]``) to the samples' histogram.

    ``q_b = (n_b + 1/2) / (N + B/2)`` over the ``B = bins^2`` bins of ``[-box, box]^2``, with ``N``
    counting every sample (inside the box or not); see the module docstring for the floor.
    """
    if target_probs.dim() != 2 or target_probs.shape[0] != target_probs.shape[1]:
        raise ValueError(f"target_probs must be a square [bins, bins] grid; got shape {tuple(target_probs.shape)}")
    p = target_probs.to(torch.float64).cpu()
    if bool((p < 0).any()) or abs(float(p.sum()) - 1.0) > 1e-6:
        raise ValueError(f"target_probs must be non-negative and sum to 1; got sum {float(p.sum()):.6g}")
    bins = p.shape[0]
    counts = histogram(samples, bins, box)
    q = (counts.cpu() + 0.5) / (samples.shape[0] + 0.5 * bins * bins)
    mask = p > 0
    return float((p[mask] * torch.log(p[mask] / q[mask])).sum())


HIST_ESTIMATORS = ("exact", "midpoint")


def checkerboard_bin_probs(bins: int = 50, estimator: str = "exact") -> torch.Tensor:
    """Bin probabilities of Boffi et al.'s checkerboard on a ``bins x bins`` grid of ``[-1, 1]^2``.

    The density is 1/2 on the 8 filled 0.5 x 0.5 squares (``floor(4u) + floor(4v)`` even).
    ``"exact"``: each bin's probability is the density times the filled area it covers, computed per
    axis in 1D. ``"midpoint"``: the density at each bin's centre, normalised to sum to 1 (module
    docstring).
    """
    if estimator not in HIST_ESTIMATORS:
        raise ValueError(f"unknown histogram estimator {estimator!r}; choose one of {HIST_ESTIMATORS}")
    edges = torch.linspace(-1.0, 1.0, bins + 1, dtype=torch.float64)
    if estimator == "midpoint":
        cell = torch.floor(4 * (0.5 * (edges[:-1] + edges[1:]) + 1) / 2).clamp(0, 3)  # checker column of the centre
        filled = ((cell[:, None] + cell[None, :]) % 2 == 0).to(torch.float64)
        return filled / filled.sum()
    lo, hi = edges[:-1], edges[1:]
    # overlap[b, c] = length of bin b inside checker column/row c (4 cells of width 0.5)
    cells = torch.arange(4, dtype=torch.float64)
    c_lo, c_hi = -1 + 0.5 * cells, -0.5 + 0.5 * cells
    overlap = (torch.minimum(hi[:, None], c_hi[None]) - torch.maximum(lo[:, None], c_lo[None])).clamp(min=0)
    overlap = torch.where(overlap < 1e-12, torch.zeros_like(overlap), overlap)  # rounding of the bin edges
    filled = ((cells[:, None] + cells[None, :]) % 2 == 0).to(torch.float64)  # [4, 4]
    area = overlap @ filled @ overlap.T  # [bins, bins]
    return 0.5 * area


# ----- flow-map error against the exact map ------------------------------------------------------


def time_pair_grid(points: int = 5) -> list[tuple[float, float]]:
    """All pairs ``(s, t)`` with ``s > t`` on the uniform grid of ``points`` times in ``[0, 1]``.

    ``points = 5`` gives the 10 pairs of ``{0, 1/4, 1/2, 3/4, 1}``, from short hops to the full
    jump ``(1, 0)``, all in the sampling direction.
    """
    if points < 2:
        raise ValueError(f"a time-pair grid needs at least 2 points; got {points}")
    times = [i / (points - 1) for i in range(points)]
    return [(s, t) for s in reversed(times) for t in reversed(times) if s > t]


@dataclass
class FlowMapReference:
    """Exact jumps for ``flow_map_error``: per pair ``(s, t)``, points ``x_s`` and ``F_exact(x_s, s, t)``.

    Build it once with ``flow_map_reference`` and score many models against it: the exact map is
    a float64 ODE solve, far costlier than a network call.
    """

    pairs: list[tuple[float, float]]
    x_s: list[torch.Tensor]
    exact: list[torch.Tensor]

    def only(self, keep: Callable[[float, float], bool]) -> FlowMapReference:
        """The pairs ``(s, t)`` for which ``keep(s, t)`` holds (e.g. a sampler's ``trained``)."""
        chosen = [i for i, (s, t) in enumerate(self.pairs) if keep(s, t)]
        return FlowMapReference([self.pairs[i] for i in chosen], [self.x_s[i] for i in chosen],
                                [self.exact[i] for i in chosen])


def flow_map_reference(
    target: GaussianMixture,
    pairs: Sequence[tuple[float, float]] | None = None,
    n: int = 2048,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> FlowMapReference:
    """``n`` exact samples ``x_s`` of the marginal at ``s`` and their exact images ``F(x_s, s, t)``.

    ``pairs`` defaults to ``time_pair_grid(5)``; each needs ``s != t``, both in ``[0, 1]``.
    """
    pairs = [(float(s), float(t)) for s, t in (time_pair_grid() if pairs is None else pairs)]
    if not pairs:
        raise ValueError("flow_map_reference needs at least one (s, t) pair")
    if n < 2:
        raise ValueError(f"flow_map_reference needs n >= 2 samples; got {n}")
    for s, t in pairs:
        if not (0.0 <= s <= 1.0 and 0.0 <= t <= 1.0) or s == t:
            raise ValueError(f"flow-map error pairs need s != t, both in [0, 1]; got (s, t) = ({s}, {t})")
    device = torch.device(device)
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(0)
    xs, exact = [], []
    for s, t in pairs:
        x_s = target.sample_xt(n, s, generator, device).to(torch.float64)
        xs.append(x_s)
        exact.append(target.flow_map(x_s, s, t))
    return FlowMapReference(pairs, xs, exact)


@dataclass
class FlowMapError:
    """Relative squared error of a flow map: ``mean`` over the grid and ``per_pair[(s, t)]``."""

    mean: float
    per_pair: dict[tuple[float, float], float]


def flow_map_error(
    model: nn.Module,
    reference: FlowMapReference | GaussianMixture,
    cond: torch.Tensor | None = None,
) -> FlowMapError:
    """``E |F_model(x_s, s, t) - F_exact(x_s, s, t)|^2 / E |F_exact(x_s, s, t) - x_s|^2`` per pair.

    ``reference`` holds exact samples ``x_s`` of the marginal at ``s`` with their exact images
    (``flow_map_reference``); a ``GaussianMixture`` is turned into one with the default grid.
    ``model`` is called as ``model(x, s, t, cond)`` without gradients, in its own dtype and on its
    own device. The denominator is the mean squared length of the exact jump, so the error is 0
    for the exact map and 1 for the identity ``F(x, s, t) = x``; ``mean`` averages the pairs.
    """
    device, dtype = module_device(model), _module_dtype(model)
    if not isinstance(reference, FlowMapReference):
        reference = flow_map_reference(reference, device=device)
    per_pair: dict[tuple[float, float], float] = {}
    for (s, t), x_s, exact in zip(reference.pairs, reference.x_s, reference.exact):
        with torch.no_grad():
            predicted = model(x_s.to(device=device, dtype=dtype), s, t, cond)
        predicted = predicted.to(device=exact.device, dtype=torch.float64)
        num = (predicted - exact).pow(2).sum(dim=1).mean()
        den = (exact - x_s).pow(2).sum(dim=1).mean()
        per_pair[(s, t)] = float(num / den)
    return FlowMapError(sum(per_pair.values()) / len(per_pair), per_pair)


def module_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a module without parameters)."""
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _module_dtype(model: nn.Module) -> torch.dtype:
    param = next(iter(model.parameters()), None)
    return param.dtype if param is not None and param.is_floating_point() else torch.float32


# ----- NFE counting ------------------------------------------------------------------------------


class NFECounter(nn.Module):
    """Counts network function evaluations: ``calls`` to the wrapped model and ``examples`` processed.

    ``counter = NFECounter(model)`` is used in place of ``model``: every ``counter(x, ...)`` runs
    ``model(x, ...)`` and adds 1 to ``calls`` and ``x.shape[0]`` to ``examples``. So
    ``sample_flow_map(counter, noise, 4)`` leaves ``calls == 4`` and a Heun ODE sampler with ``N``
    steps ``2 N``. ``reset()`` sets both counts to zero.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls = 0
        self.examples = 0

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        self.examples += int(x.shape[0])
        return self.model(x, *args, **kwargs)

    def reset(self) -> None:
        self.calls = 0
        self.examples = 0
