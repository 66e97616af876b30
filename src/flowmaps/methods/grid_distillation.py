"""Grid distillation: the jumps of sampling grids regressed on finer compositions of the map.

A flow map is sampled on grids (``flowmaps.samplers.time_grid``): ``N`` steps use the jumps
``(u_{k+1}^rho, u_k^rho)``, ``u_k = k / N`` (``rho = 1``: the uniform grid; ``rho > 1`` packs the
steps towards the data). By the compositional rule (spec §2) each such jump equals the composition
of ``K`` sub-jumps, and short jumps are the ones a self-distilled map learns best (they approach
Euler steps of its diagonal), so the composition is a better estimate of the jump than the jump
itself. The term

    L_grid = E |F(x_s, s, t) - sg[F_K(x_s, s, t)]|^2,
    F_K = F(., t_{K-1}, t) o ... o F(., s, t_1),  t_i = (s^(1/rho) + i (t^(1/rho) - s^(1/rho)) / K)^rho,

with ``(s, t)`` a jump of the grid of ``N = 2^L`` steps (``L`` in ``0..levels``, uniform or in
proportion to ``level_weights``; the segment ``k`` uniform; the sub-jumps are the steps of the
``K N``-step grid) and
``x_s = alpha(s) x_0 + sigma(s) eps``, pulls the few-step maps towards the many-step composition.
It is progressive self-distillation (Boffi et al. 2025's PSD, whose midpoint variant is ``K = 2``
with random pairs) on the dyadic grids that shortcut models sample with (Frans et al. 2024), with a
``K``-fold target. The target uses the EMA weights when the trainer passes them (``target="ema"``)
and the online weights otherwise. At the exact map the term is zero (the compositional rule).

The rows are extra: ``round(fraction * B)`` examples of the batch's data with fresh noise, on top of
the method's own rows; the term switches on at ``start`` (a fraction of training), so the early,
fast-changing phase runs at the method's own cost.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from flowmaps.methods.base import LossContext
from flowmaps.methods.draw import Draw
from flowmaps.methods.options import GridOptions
from flowmaps.schedules import Schedule
from flowmaps.weighting import LossTerms, squared_norm


def dyadic_jumps(n: int, levels: int, generator: torch.Generator, device: torch.device,
                 dtype: torch.dtype, rho: float = 1.0,
                 level_weights: Optional[Sequence[float]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` jumps ``(s, t) = (((k + 1) / 2^L)^rho, (k / 2^L)^rho)``: ``L`` in ``0..levels`` (uniform,
    or with probabilities proportional to ``level_weights``), ``k`` uniform in ``0..2^L - 1`` (the
    steps of ``flowmaps.samplers.time_grid(2^L, rho=rho)``)."""
    if level_weights is None:
        level = torch.randint(0, levels + 1, (n,), generator=generator, device=device)
    else:
        probs = torch.as_tensor(level_weights, dtype=torch.float64, device=device)
        level = torch.multinomial(probs, n, replacement=True, generator=generator)
    steps = torch.pow(2.0, level.to(dtype))
    k = torch.floor(torch.rand(n, generator=generator, device=device, dtype=dtype) * steps)
    return ((k + 1) / steps).pow(rho), (k / steps).pow(rho)


def composed_jump(model: nn.Module, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, substeps: int,
                  cond: Optional[torch.Tensor] = None, rho: float = 1.0) -> torch.Tensor:
    """``F_K(x, s, t)``: ``substeps`` jumps from ``s`` to ``t`` (per-row times), equal in ``u = t^(1/rho)``.

    With ``rho = 1`` the sub-jumps are equal; otherwise they subdivide the step of a ``rho`` grid into
    the steps of the ``substeps``-times finer ``rho`` grid.
    """
    u_s, u_t = s.pow(1.0 / rho), t.pow(1.0 / rho)
    times = [s] + [(u_s + (u_t - u_s) * (i / substeps)).pow(rho) for i in range(1, substeps)] + [t]
    for start, end in zip(times[:-1], times[1:]):
        x = model(x, start, end, cond, check_times=False)
    return x


class GridDistillation:
    """The ``grid`` loss term (module docstring), an auxiliary term of the skeleton (``GridOptions``)."""

    def __init__(self, schedule: Schedule, options: GridOptions, reduction: str = "mean"):
        self.schedule, self.options, self.reduction = schedule, options, reduction

    def active(self, progress: float) -> bool:
        return self.options.grid_fraction > 0 and progress >= self.options.grid_start

    def add(self, method: Any, model: nn.Module, draw: Draw, ctx: LossContext, terms: LossTerms) -> None:
        """Add ``|F(x_s, s, t) - sg[F_K(x_s, s, t)]|^2`` on ``round(grid_fraction * B)`` rows to ``terms``."""
        o, batch, generator = self.options, draw.batch, draw.generator
        n = int(round(o.grid_fraction * batch.x0.shape[0]))
        if n == 0 or not self.active(draw.progress):
            return
        rows = batch.take(slice(0, n))
        x0 = rows.x0
        s, t = dyadic_jumps(n, o.grid_levels, generator, x0.device, x0.dtype, o.grid_rho, o.grid_level_weights)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_s = self.schedule.sample_xt(x0, eps, s)
        use_ema = o.grid_target == "ema" and ctx.ema_model is not None
        with torch.no_grad():
            goal = composed_jump(ctx.ema_model if use_ema else model, x_s, s, t, o.grid_substeps, rows.cond, o.grid_rho)
        jump = model(x_s, s, t, rows.cond, check_times=False)
        terms.add("grid", o.grid_weight * squared_norm(jump - goal, self.reduction))


__all__ = ["GridDistillation", "composed_jump", "dyadic_jumps"]
