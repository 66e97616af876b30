"""Samplers: drive a ``FlowMap`` from noise (t = 1) to data (t = 0) over a time grid (spec §4).

- ``sample_flow_map``: deterministic composition ``x <- F(x, t_i, t_{i+1})`` over
  ``1 = t_0 > t_1 > ... > t_N = 0``; one network evaluation per step. With the exact flow map this
  reproduces the exact map for any grid, by the compositional rule.
- ``sample_ode``: the diagonal ``v(x, t) = V(x, t, t)`` as an ODE sampler (Euler or Heun), the
  diffusion-model baseline every flow map is compared with.
- ``sample_consistency``: multistep sampling of maps anchored at ``t = 0`` (consistency models):
  jump to data ``x_0_hat = F(x, t_i, 0)``, re-noise to the next time
  ``x = alpha(t_{i+1}) x_0_hat + sigma(t_{i+1}) z`` with fresh noise ``z``, repeat.
- ``sample_gamma``: CTM's gamma sampler for two-time maps, a mix of both (``gamma = 0``
  deterministic composition, ``gamma = 1`` consistency-style).
- ``invert`` / ``round_trip_error``: data to noise ``F(x_0, 0, 1)`` and the error of noise back to data.

Each method names the sampler its maps are drawn with (``Method.sampler``), one of ``SAMPLERS``:
``flow_map`` (``FlowMapSampler``: compose ``F``), ``consistency`` (``ConsistencySampler``: maps
trained only towards ``t = 0``) and ``one_step`` (``OneStepSampler``: maps trained only from
``s = 1``, one step alone) and ``ode`` (``ODESampler``: Euler steps of the diagonal, for diffusion
models). Training evaluation, ``flowmaps bench``, ``flowmaps sample`` and
``sample(model, ...)`` on a ``flowmaps.load``-ed model all call the method's own.

Samplers add no ``torch.no_grad``: callers choose (reward steering differentiates through them).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar, Optional, Sequence, Union

import torch
from torch import nn

from flowmaps.schedules import LinearSchedule, Schedule

ODE_SOLVERS = ("euler", "heun")


def check_rho(rho: float, name: str = "the grid exponent rho") -> float:
    """``rho`` as a float if it is a finite positive number (a grid exponent); otherwise ``ValueError`` naming ``name``."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"{name} must be a positive number; got {rho!r}")
    return float(rho)


def time_grid(
    steps: int, device: Union[torch.device, str, None] = None, dtype: torch.dtype = torch.float32, rho: float = 1.0
) -> torch.Tensor:
    """The grid ``t_k = (1 - k / N)^rho``, ``k = 0..N``, of ``steps + 1`` times from 1 to 0.

    ``rho = 1`` is the uniform grid; ``rho > 1`` packs the steps towards the data end (``t = 0``),
    where the paths bend most, as EDM's ``rho`` does in noise level (Karras et al. 2022). The grids
    of ``N`` and ``2N`` steps are nested for every ``rho``.
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps}")
    check_rho(rho)
    if rho == 1:
        return torch.linspace(1.0, 0.0, int(steps) + 1, device=device, dtype=dtype)
    return torch.linspace(1.0, 0.0, int(steps) + 1, dtype=torch.float64).pow(rho).to(device=device, dtype=dtype)


def as_grid(
    grid: Union[int, Sequence[float], torch.Tensor], device: Union[torch.device, str, None], dtype: torch.dtype
) -> torch.Tensor:
    """Validate a user grid (or a step count) into a 1-D tensor of times in ``[0, 1]``.

    A grid must have at least two times, all in ``[0, 1]``, and be strictly monotone (decreasing for
    sampling, increasing for data-to-noise inversion).
    """
    if isinstance(grid, int):
        return time_grid(grid, device, dtype)
    g = torch.as_tensor(grid, dtype=dtype, device=device).flatten()
    if g.numel() < 2:
        raise ValueError(f"a time grid needs at least two times; got {g.tolist()}")
    if bool(((g < 0) | (g > 1) | ~torch.isfinite(g)).any()):
        raise ValueError(f"time grid entries must lie in [0, 1]; got {g.tolist()}")
    d = g[1:] - g[:-1]
    if not (bool((d < 0).all()) or bool((d > 0).all())):
        raise ValueError(f"time grid must be strictly monotone; got {g.tolist()}")
    return g


def sample_flow_map(
    model: nn.Module,
    noise: torch.Tensor,
    grid: Union[int, Sequence[float], torch.Tensor] = 1,
    cond: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Compose the flow map over ``grid`` (a step count or explicit times): ``x <- F(x, t_i, t_{i+1})``."""
    times = as_grid(grid, noise.device, noise.dtype)
    x = noise
    for s, t in zip(times[:-1], times[1:]):
        x = model(x, s, t, cond)
    return x


def sample_ode(
    model: nn.Module,
    noise: torch.Tensor,
    grid: Union[int, Sequence[float], torch.Tensor] = 64,
    solver: str = "euler",
    cond: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Integrate ``dx/dt = V(x, t, t)`` over ``grid`` with Euler (1 NFE/step) or Heun (2 NFE/step)."""
    if solver not in ODE_SOLVERS:
        raise ValueError(f"unknown ODE solver {solver!r}; choose one of {ODE_SOLVERS}")
    times = as_grid(grid, noise.device, noise.dtype)
    x = noise
    for s, t in zip(times[:-1], times[1:]):
        v = model(x, s, s, cond, output="V")
        if solver == "euler":
            x = x + (t - s) * v
        else:
            x_pred = x + (t - s) * v
            v_next = model(x_pred, t, t, cond, output="V")
            x = x + (t - s) * 0.5 * (v + v_next)
    return x


def ode_nfe(steps: int, solver: str) -> int:
    """Network evaluations of ``sample_ode`` with ``steps`` steps."""
    return steps * (2 if solver == "heun" else 1)


GridLike = Union[int, Sequence[float], torch.Tensor]


def _sampling_grid(grid: GridLike, x: torch.Tensor, sampler: str) -> torch.Tensor:
    times = as_grid(grid, x.device, x.dtype)
    if bool((times[1:] > times[:-1]).any()):
        raise ValueError(f"{sampler} needs a decreasing time grid (noise to data); got {times.tolist()}")
    return times


def _fresh_noise(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def sample_consistency(
    model: nn.Module,
    noise: torch.Tensor,
    grid: GridLike = 1,
    schedule: Optional[Schedule] = None,
    generator: Optional[torch.Generator] = None,
    cond: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Consistency-model multistep sampling over a decreasing ``grid`` (a step count or times).

    ``noise`` is a sample at time ``t_0 = grid[0]``. Each step jumps to data,
    ``x_0_hat = F(x, t_i, 0)``, then re-noises it to the next time with fresh noise ``z``:
    ``x = alpha(t_{i+1}) x_0_hat + sigma(t_{i+1}) z`` (Song et al. 2023, Alg. 1). The result is the
    last jump when the grid ends at 0, else the re-noised sample at ``grid[-1]``. One network
    evaluation per step; only ``F(x, s, 0)`` is used. With the exact map every ``x`` is an exact
    sample of the marginal at its time (an exact jump gives a data sample, re-noising gives
    ``p_{t_{i+1}}``). ``schedule`` is the training schedule (default linear).
    """
    schedule = schedule if schedule is not None else LinearSchedule()
    times = _sampling_grid(grid, noise, "sample_consistency")
    x = noise
    for s, t in zip(times[:-1], times[1:]):
        x0_hat = model(x, s, 0.0, cond)
        if float(t) == 0.0:
            x = x0_hat
        else:
            x = schedule.sample_xt(x0_hat, _fresh_noise(x0_hat, generator), t)
    return x


def time_at_noise_ratio(schedule: Schedule, ratio: float, upper: float = 1.0, iterations: int = 100) -> float:
    """The time ``t in [0, upper]`` with ``sigma(t) / alpha(t) = ratio`` (bisection; the ratio increases in ``t``)."""
    if ratio <= 0.0:
        return 0.0
    lo, hi = 0.0, upper
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        tm = torch.tensor(mid, dtype=torch.float64)
        if float(schedule.sigma(tm) / schedule.alpha(tm)) < ratio:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def sample_gamma(
    model: nn.Module,
    noise: torch.Tensor,
    grid: GridLike = 1,
    gamma: float = 0.5,
    schedule: Optional[Schedule] = None,
    generator: Optional[torch.Generator] = None,
    cond: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """CTM's gamma sampler for two-time maps over a decreasing ``grid``.

    Kim et al. 2024 (CTM, arXiv 2310.02279), in this convention. With the noise-to-signal ratio
    ``lambda(t) = sigma(t) / alpha(t)`` (the EDM noise level), each step from ``t_i`` to
    ``t_{i+1}`` jumps deterministically past the target, to the time ``u`` with
    ``lambda(u) = sqrt(1 - gamma^2) lambda(t_{i+1})``, then adds back the missing noise:

    ``x <- (alpha(t_{i+1}) / alpha(u)) F(x, t_i, u) + gamma sigma(t_{i+1}) z``.

    ``gamma = 0`` is the deterministic composition ``F(x, t_i, t_{i+1})`` (``sample_flow_map``);
    ``gamma = 1`` jumps to ``u = 0`` and re-noises fully (``sample_consistency``). The added variance
    ``alpha(t_{i+1})^2 (lambda(t_{i+1})^2 - lambda(u)^2)`` is exactly what separates the two
    marginals, so with the exact map every step gives an exact sample of ``p_{t_{i+1}}``.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1] (0 deterministic, 1 consistency-style); got {gamma}")
    schedule = schedule if schedule is not None else LinearSchedule()
    times = _sampling_grid(grid, noise, "sample_gamma")
    x = noise
    for s, t in zip(times[:-1], times[1:]):
        t_f = float(t)
        if gamma == 0.0 or t_f == 0.0:
            x = model(x, s, t, cond)
            continue
        t64 = torch.tensor(t_f, dtype=torch.float64)
        alpha_t, sigma_t = float(schedule.alpha(t64)), float(schedule.sigma(t64))
        u = 0.0 if gamma == 1.0 else time_at_noise_ratio(schedule, (1 - gamma**2) ** 0.5 * sigma_t / alpha_t, t_f)
        alpha_u = float(schedule.alpha(torch.tensor(u, dtype=torch.float64)))
        jump = model(x, s, u, cond)
        x = (alpha_t / alpha_u) * jump + gamma * sigma_t * _fresh_noise(jump, generator)
    return x


def invert(
    model: nn.Module, data: torch.Tensor, grid: GridLike = 1, cond: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Data to noise: compose ``F`` over an increasing grid, ``F(x_0, 0, 1)`` in one step.

    ``grid`` is a step count (the uniform grid ``0, 1/N, ..., 1``) or increasing times. The map
    must have been trained in the data-to-noise direction (pairs with ``t > s``, e.g.
    ``direction="both"``, or ``fmm``).
    """
    times = torch.flip(time_grid(grid, data.device, data.dtype), [0]) if isinstance(grid, int) else as_grid(
        grid, data.device, data.dtype)
    if bool((times[1:] < times[:-1]).any()):
        raise ValueError(f"invert needs an increasing time grid (data to noise); got {times.tolist()}")
    return sample_flow_map(model, data, times, cond)


@torch.no_grad()
def round_trip_error(
    model: nn.Module, data: torch.Tensor, steps: int = 1, cond: Optional[torch.Tensor] = None
) -> dict[str, float]:
    """Map ``data`` to noise and back in ``steps`` steps each way; report the reconstruction error (no gradient).

    Returns ``mean`` and ``max`` of the per-example Euclidean error ``|F(F(x_0, 0, 1), 1, 0) - x_0|``
    (composed over ``steps`` steps each way), and ``relative``: the mean error over the mean
    norm of ``data``. Zero for the exact map, whose two directions are inverses.
    """
    noise = invert(model, data, steps, cond)
    reconstruction = sample_flow_map(model, noise, steps, cond)
    error = (reconstruction - data).flatten(1).norm(dim=1)
    scale = data.flatten(1).norm(dim=1).mean()
    return {"mean": float(error.mean()), "max": float(error.max()), "relative": float(error.mean() / scale)}


class Sampler(ABC):
    """Noise to data in ``steps`` network evaluations on the grid ``time_grid(steps, rho)``."""

    name: ClassVar[str]
    # whether the map's diagonal is trained, so the diagonal's ODE sampler is a fair baseline
    ode_baseline: ClassVar[bool] = False
    # the most steps the map supports (None: any)
    max_steps: ClassVar[Optional[int]] = None
    # whether the samples are a function of the noise alone (no fresh noise between steps)
    deterministic: ClassVar[bool] = True
    # whether the exact map gives exact samples at every step count (else only as the steps grow)
    exact_at_every_step_count: ClassVar[bool] = True

    def check_steps(self, steps: int) -> None:
        """``ValueError`` unless ``steps`` is a positive integer this sampler supports."""
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer; got {steps!r}")
        if self.max_steps is not None and steps > self.max_steps:
            raise ValueError(f"the {self.name} sampler takes at most {self.max_steps} step(s): {self.why_max}; "
                             f"got {steps} (sample with another sampler only if its map was trained for it)")

    why_max: ClassVar[str] = ""

    def trained(self, s: float, t: float) -> bool:
        """Whether the maps of this sampler's methods are trained at the pair ``(s, t)``."""
        return True

    @abstractmethod
    def sample(self, model: nn.Module, noise: torch.Tensor, steps: int, cond: Optional[torch.Tensor] = None,
               rho: float = 1.0, schedule: Optional[Schedule] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``steps`` network evaluations from ``noise`` (at ``t = 1``) to data."""

    def label(self, steps: int, rho: float = 1.0) -> str:
        """How a table names this sampler at ``steps`` steps (with the grid's ``rho`` where it matters:
        every grid of one step is ``[1, 0]``)."""
        grid = f" (grid rho {rho:g})" if rho != 1 and steps > 1 else ""
        return f"{self.name.replace('_', ' ')}, {steps} step{'s' if steps > 1 else ''}{grid}"


class FlowMapSampler(Sampler):
    """Deterministic composition of ``F`` over the grid (``sample_flow_map``)."""

    name = "flow_map"
    ode_baseline = True

    def sample(self, model: nn.Module, noise: torch.Tensor, steps: int, cond: Optional[torch.Tensor] = None,
               rho: float = 1.0, schedule: Optional[Schedule] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        self.check_steps(steps)
        return sample_flow_map(model, noise, time_grid(steps, noise.device, noise.dtype, rho), cond)


class ConsistencySampler(Sampler):
    """Jump to data, re-noise to the next time, repeat (``sample_consistency``): only ``F(x, s, 0)`` is used."""

    name = "consistency"
    deterministic = False

    def trained(self, s: float, t: float) -> bool:
        return t == 0.0

    def sample(self, model: nn.Module, noise: torch.Tensor, steps: int, cond: Optional[torch.Tensor] = None,
               rho: float = 1.0, schedule: Optional[Schedule] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        self.check_steps(steps)
        return sample_consistency(model, noise, time_grid(steps, noise.device, noise.dtype, rho), schedule,
                                  generator, cond)


class OneStepSampler(Sampler):
    """``F(eps, 1, 0)`` alone: for maps trained only from ``s = 1`` (data-free distillation)."""

    name = "one_step"
    max_steps = 1
    why_max = "its map was trained only from s = 1, so F(x, s, t) with s < 1 is untrained"

    def trained(self, s: float, t: float) -> bool:
        return s == 1.0

    def label(self, steps: int, rho: float = 1.0) -> str:
        return "one step from s = 1"

    def sample(self, model: nn.Module, noise: torch.Tensor, steps: int, cond: Optional[torch.Tensor] = None,
               rho: float = 1.0, schedule: Optional[Schedule] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        self.check_steps(steps)
        return sample_flow_map(model, noise, 1, cond)


class ODESampler(Sampler):
    """Euler steps of the diagonal ``dx/dt = V(x, t, t)`` on the grid (``sample_ode``): the sampler of a
    diffusion model (``fm``), whose off-diagonal is untrained. It converges to the exact map as the
    steps grow (first order), rather than being exact at every step count."""

    name = "ode"
    ode_baseline = True
    exact_at_every_step_count = False

    def trained(self, s: float, t: float) -> bool:
        return s == t  # only the diagonal of a diffusion model's map is trained

    def sample(self, model: nn.Module, noise: torch.Tensor, steps: int, cond: Optional[torch.Tensor] = None,
               rho: float = 1.0, schedule: Optional[Schedule] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        self.check_steps(steps)
        return sample_ode(model, noise, time_grid(steps, noise.device, noise.dtype, rho), "euler", cond)

    def label(self, steps: int, rho: float = 1.0) -> str:
        grid = f" (grid rho {rho:g})" if rho != 1 and steps > 1 else ""
        return f"ODE euler, {steps} step{'s' if steps > 1 else ''}{grid}"


SAMPLERS: dict[str, Sampler] = {}


def register_sampler(sampler: Sampler) -> Sampler:
    """Make ``sampler`` available by its ``name`` (``Method.sampler``, ``flowmaps sample --sampler``)."""
    if not sampler.name or sampler.name in SAMPLERS:
        raise ValueError(f"sampler name {sampler.name!r} is empty or already registered")
    SAMPLERS[sampler.name] = sampler
    return sampler


for _sampler in (FlowMapSampler(), ConsistencySampler(), OneStepSampler(), ODESampler()):
    register_sampler(_sampler)


def get_sampler(name: str) -> Sampler:
    """The sampler called ``name`` (one of ``SAMPLERS``)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def grid_rho_of(model: nn.Module, rho: Optional[float] = None) -> float:
    """``rho``, else the model's ``grid_rho`` (``flowmaps.load`` sets a run's; 1, uniform, for a plain map)."""
    return float(rho) if rho is not None else float(getattr(model, "grid_rho", 1.0))


def sample(model: nn.Module, noise: torch.Tensor, steps: int = 1, cond: Optional[torch.Tensor] = None,
           sampler: Optional[str] = None, rho: Optional[float] = None, schedule: Optional[Schedule] = None,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Samples of ``model`` with its own sampler (``model.sampler``, set by ``flowmaps.load`` from the
    method that trained it; ``flow_map`` for a plain ``FlowMap``) or the one named by ``sampler``, on
    the grid ``time_grid(steps, rho)``; ``rho=None`` takes the model's ``grid_rho`` (1 for a plain map)."""
    chosen = get_sampler(sampler if sampler is not None else getattr(model, "sampler", FlowMapSampler.name))
    return chosen.sample(model, noise, steps, cond, grid_rho_of(model, rho), schedule, generator)
