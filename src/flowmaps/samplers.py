"""Samplers: drive a ``FlowMap`` from noise (t = 1) to data (t = 0) over a time grid (spec §4).

- ``sample_flow_map``: deterministic composition ``x <- F(x, t_i, t_{i+1})`` over
  ``1 = t_0 > t_1 > ... > t_N = 0``; one network evaluation per step. With the exact flow map this
  reproduces the exact map for any grid, by the compositional rule.
- ``sample_ode``: the diagonal ``v(x, t) = V(x, t, t)`` as an ODE sampler (Euler or Heun), the
  diffusion-model baseline every flow map is compared with.

Samplers add no ``torch.no_grad``: callers choose (reward steering differentiates through them).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

ODE_SOLVERS = ("euler", "heun")


def time_grid(
    steps: int, device: Union[torch.device, str, None] = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The uniform grid ``[1, 1 - 1/N, ..., 0]`` of ``steps + 1`` times."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps}")
    return torch.linspace(1.0, 0.0, int(steps) + 1, device=device, dtype=dtype)


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
