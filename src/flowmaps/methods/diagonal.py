"""The diagonal loss: flow matching / diffusion training of ``v(x, t) = V(x, t, t)``.

``L_diag = E_{t, x_0, eps} |V(x_t, t, t) - (alpha'(t) x_0 + sigma'(t) eps)|^2``, the conditional
flow-matching loss (Lipman et al. 2023, "Flow matching for generative modeling"; Liu et al. 2023,
rectified flow), whose minimiser is the marginal velocity. Every self-distillation method uses it
on the diagonal part of its batch; on its own (``fm``) it is the plain diffusion/flow-matching
baseline, sampled with the ODE solvers of ``flowmaps.samplers``. ``diagonal_target="batch_posterior"``
regresses on the velocity of the batch's empirical distribution instead (the stable target field,
``flowmaps.posterior_targets``): the same minimiser up to a vanishing bias, with far less variance.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from flowmaps.methods.base import Batch, LossContext, LossOutput, Method, mean_square
from flowmaps.methods.registry import register
from flowmaps.posterior_targets import check_diagonal_target, diagonal_velocity_target
from flowmaps.schedules import Schedule
from flowmaps.time_pairs import TimePairSampler


def diagonal_residual(
    model: nn.Module,
    schedule: Schedule,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    cond: Optional[torch.Tensor] = None,
    target: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``V(x_t, t, t) - target`` with ``x_t = alpha(t) x_0 + sigma(t) eps``; the target defaults to the
    conditional velocity ``alpha'(t) x_0 + sigma'(t) eps``."""
    x_t = schedule.sample_xt(x0, eps, t)
    v = model(x_t, t, t, cond, output="V", check_times=False)
    return v - (schedule.conditional_velocity(x0, eps, t) if target is None else target)


@register
class FlowMatching(Method):
    """Flow matching on the diagonal: ``E |V(x_t, t, t) - (alpha' x_0 + sigma' eps)|^2``."""

    name = "fm"
    rule = "diagonal"
    setting = "scratch"
    cost = 3

    def __init__(
        self, schedule: Schedule, time_distribution: str = "uniform", logit_mean: float = -0.4, logit_std: float = 1.0,
        diagonal_target: str = "conditional",
    ):
        super().__init__(schedule)
        self.times = TimePairSampler(1.0, time_distribution, logit_mean=logit_mean, logit_std=logit_std)
        self.diagonal_target_name = check_diagonal_target(diagonal_target, self.name)

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, ctx: Optional[LossContext] = None
    ) -> LossOutput:
        x0 = batch.x0
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = self.times.times(x0.shape[0], generator, x0.device).to(x0.dtype)
        target = diagonal_velocity_target(self.diagonal_target_name, self.schedule, x0, eps, t, batch.cond, x0, batch.cond)
        per_example = mean_square(diagonal_residual(model, self.schedule, x0, eps, t, batch.cond, target))
        loss = per_example.mean()
        return LossOutput(loss, terms={"diagonal": loss.detach()})
