"""Lagrangian methods: train ``d/dt F(x_s, s, t) = v(F(x_s, s, t), t)`` (spec §2).

The Lagrangian residual is ``d/dt F(x_s, s, t) - v(F(x_s, s, t), t)``; with
``F = x + (t - s) V`` its time derivative is ``d/dt F = V + (t - s) d/dt V``, which one forward-mode
JVP along the tangent ``(x, s, t) <- (0, 0, 1)`` returns together with ``F``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from flowmaps.jvp import JVP_BACKENDS, jvp
from flowmaps.methods.base import Batch, LossContext, LossOutput, Method, mean_square
from flowmaps.methods.diagonal import diagonal_residual
from flowmaps.methods.registry import register
from flowmaps.schedules import Schedule
from flowmaps.time_pairs import TimePairSampler


@register
class LSD(Method):
    """Lagrangian self-distillation: diag + ``|d_t F(x_s,s,t) - sg[V(F(x_s,s,t), t, t)]|^2``.

    Boffi, Albergo & Vanden-Eijnden 2025, "How to build a consistency model: learning flow maps via
    self-distillation" (arXiv 2505.18825), in this project's convention (t = 0 data):

    ``L = E_t |V(x_t, t, t) - (alpha' x_0 + sigma' eps)|^2
        + E_{s>=t} |d/dt F(x_s, s, t) - sg[V(F(x_s, s, t), t, t)]|^2``.

    The batch is split between the two terms by ``diagonal_fraction``. The target velocity is the
    model's own diagonal evaluated at the (detached) jump ``F(x_s, s, t)`` under stop-gradient, with
    the online weights; the derivative term ``d/dt F`` carries the gradient (through the JVP).
    """

    name = "lsd"
    rule = "lagrangian"
    setting = "self-distillation"
    cost = 10

    def __init__(
        self,
        schedule: Schedule,
        diagonal_fraction: float = 0.75,
        time_distribution: str = "uniform",
        direction: str = "backward",
        jvp_backend: str = "func",
    ):
        super().__init__(schedule)
        if jvp_backend not in JVP_BACKENDS:
            raise ValueError(f"unknown jvp_backend {jvp_backend!r}; choose one of {JVP_BACKENDS}")
        self.pairs = TimePairSampler(diagonal_fraction, time_distribution, direction)
        self.jvp_backend = jvp_backend

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, ctx: Optional[LossContext] = None
    ) -> LossOutput:
        x0 = batch.x0
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        pairs = self.pairs.sample(x0.shape[0], generator, x0.device)
        n_diag = pairs.t_diag.shape[0]
        diag, off = batch.take(slice(0, n_diag)), batch.take(slice(n_diag, None))
        per_example, terms, diagnostics = [], {}, {}
        if n_diag > 0:
            t = pairs.t_diag.to(x0.dtype)
            loss_diag = mean_square(diagonal_residual(model, self.schedule, diag.x0, eps[:n_diag], t, diag.cond))
            per_example.append(loss_diag)
            terms["diagonal"] = loss_diag.mean().detach()
        if off.x0.shape[0] > 0:
            s, t = pairs.s.to(x0.dtype), pairs.t.to(x0.dtype)
            x_s = self.schedule.sample_xt(off.x0, eps[n_diag:], s)

            def flow(t_: torch.Tensor) -> torch.Tensor:
                return model(x_s, s, t_, off.cond, check_times=False)

            jump, d_jump_dt = jvp(flow, (t,), (torch.ones_like(t),), backend=self.jvp_backend)
            with torch.no_grad():
                target = model(jump.detach(), t, t, off.cond, output="V", check_times=False)
            loss_lag = mean_square(d_jump_dt - target)
            per_example.append(loss_lag)
            terms["lagrangian"] = loss_lag.mean().detach()
            diagnostics["tangent_norm"] = d_jump_dt.detach().flatten(1).norm(dim=1).mean()
        loss = torch.cat(per_example).mean()
        return LossOutput(loss, terms, diagnostics)
