"""CTM: consistency trajectory models (Kim et al. 2024, arXiv 2310.02279)."""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from flowmaps.methods.consistency.anchored import SOLVERS, teacher_step
from flowmaps.methods.options import DiagonalSplitOptions, DiagonalTargetOptions, TargetOptions, TimeOptions, option
from flowmaps.methods.registry import register
from flowmaps.methods.skeleton import Batch, Draw, LossContext, LossTerms, SkeletonMethod, mean_square


def through_frozen_weights(
    model: nn.Module, y: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor]
) -> torch.Tensor:
    """``F(y, t, 0)`` with the weights under stop-gradient but the gradient flowing through ``y``.

    The network is called with detached copies of its parameters (``torch.func.functional_call``), so
    back-propagation reaches ``y`` (``J^T`` of the map) and nothing else: one forward and one
    input-only backward. Under ``DistributedDataParallel`` the call goes to the wrapped module: it
    produces no weight gradient, so it must not register DDP's gradient hooks either.
    """
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    frozen = {name: p.detach() for name, p in inner.named_parameters()}
    return torch.func.functional_call(inner, frozen, (y, t, torch.zeros_like(t), cond), {"check_times": False})


@register
class ConsistencyTrajectory(SkeletonMethod):
    """CTM: ``|F_sg(F(x_s, s, t), t, 0) - F_sg(sg[F_ema(x_r, r, t)], t, 0)|^2``, ``x_r`` a teacher step; plus diag.

    Kim et al. 2024, "Consistency trajectory model: learning probability flow ODE trajectory of
    diffusion" (arXiv 2310.02279), in this convention (``s > r >= t``):

    ``L = E_t |V(x_t, t, t) - (alpha' x_0 + sigma' eps)|^2
        + E |F_sg(F(x_s, s, t), t, 0) - F_sg(sg[F_ema(x_r, r, t)], t, 0)|^2``,

    with ``r = s - 1/N`` on the uniform grid, ``x_r`` one teacher Heun (or Euler) step from
    ``x_s``, ``t ~ U[0, r]``. The student is the two-time jump ``F(x_s, s, t)``; the target jumps
    from the teacher's point with the ``target`` weights: the paper's own EMA (decay 0.999, its
    released training scripts; ``preset="paper"``) or, by default (``"robust"``), the online weights
    under stop-gradient: at small budgets the slow EMA leaves the one-step map untrained (a held-out
    mixture, 3000 steps: 1.03 of noise's energy distance against 0.105 online; ``docs/benchmarks.md``); both are
    then carried to ``t = 0`` by the map with stop-gradient weights ``F_sg`` (the online weights,
    not updated through this call, but differentiated with respect to its input on the student
    side), so the comparison happens in data space. The first term (the paper's denoising score
    matching, the conditional target) trains the diagonal on a ``diagonal_fraction`` of the batch.
    The GAN term of the paper is not included.
    """

    name = "ctm"
    rule = "eulerian"
    setting = "teacher"
    cost = 7
    needs_teacher = True
    presets = {"robust": {"target": "online"}, "paper": {"target": "ema", "target_ema_decay": 0.999}}

    @dataclass
    class Options(TimeOptions, DiagonalSplitOptions, DiagonalTargetOptions, TargetOptions):
        diagonal_fraction: float = option(0.25, "share of the batch on the diagonal (denoising score matching)")
        num_steps: int = option(18, "intervals N of the grid r = s - 1/N", within="[1, inf)")
        solver: str = option("heun", "teacher ODE step", choices=SOLVERS)
        logit_mean: float = option(-1.1, "mean of the logit-normal times")
        logit_std: float = option(2.0, "std of the logit-normal times")
        preset: str = option("robust", "named option set: robust (online target) or paper (EMA target, 0.999)")
        target: str = option("online", "target network of the target jump (robust: online; paper: ema)")
        target_ema_decay: float = option(0.999, "decay of the EMA target (the paper's 0.999)")

    def pair_times(self, pair: Batch, generator: torch.Generator, ctx: LossContext,
                   progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``s`` on the grid ``{1/N, ..., 1}`` (the cell of a draw of ``time_distribution``), ``t ~ U[0, s - 1/N]``."""
        n, device, dtype, steps = pair.x0.shape[0], pair.x0.device, pair.x0.dtype, self.options.num_steps
        i = torch.ceil(self.pairs.times(n, generator, device).to(dtype) * steps).clamp(1, steps)
        return i / steps, (i - 1) / steps * torch.rand(n, generator=generator, device=device, dtype=dtype)

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: LossContext) -> None:
        x_s, s, t, cond, steps = draw.x_s, draw.s, draw.t, draw.pair.cond, self.options.num_steps
        r = (torch.round(s * steps) - 1) / steps
        x_r = teacher_step(self.teacher, x_s, s, r, cond, self.options.solver)
        target_jump = self.target(model, ctx, x_r, r, t, cond)
        with torch.no_grad():
            target = model(target_jump, t, torch.zeros_like(t), cond, check_times=False)
        pred = through_frozen_weights(model, model(x_s, s, t, cond, check_times=False), t, cond)
        terms.add("trajectory", mean_square(pred - target))
