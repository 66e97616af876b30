"""PID: physics-informed distillation (Tee et al. 2024, TMLR; arXiv 2411.08378)."""

from dataclasses import dataclass

import torch
from torch import nn

from flowmaps.methods.lagrangian.from_noise import FromNoise
from flowmaps.methods.options import TimeOptions, WeightingOptions, option
from flowmaps.methods.registry import register
from flowmaps.methods.skeleton import Draw, LossContext, LossTerms, log_residual


@register
class PID(FromNoise):
    """Physics-informed distillation, data-free: ``|(F(eps,1,t+h) - F(eps,1,t))/h - sg[v_T(F(eps,1,t), t)]|^2``.

    Tee et al. 2024, "Physics informed distillation for diffusion models" (TMLR; arXiv 2411.08378),
    in this convention. The student is trained from pure noise ``eps`` at ``s = 1`` only, as a
    physics-informed network for the probability-flow ODE: the time derivative of its trajectory
    ``t -> F(eps, 1, t)`` is a forward finite difference with step ``fd_step`` (``t`` drawn in
    ``[0, 1 - h]``) and must equal the teacher velocity at the trajectory point. Stop-gradient on the
    teacher velocity only (its input ``F(eps, 1, t)`` is detached too, so the student cannot exploit
    the teacher); the gradient flows through both finite-difference evaluations. No EMA, no data.
    The paper's LPIPS distance is replaced by the penalties of ``flowmaps.weighting``. Residual at
    the exact map: ``O(h)`` (finite-difference error).
    """

    name = "pid"
    cost = 7
    exact_limit = {"fd_step": 1e-5}  # the finite difference's O(h) error vanishes

    @dataclass
    class Options(TimeOptions, WeightingOptions):
        fd_step: float = option(1e-3, "finite-difference step h of d/dt F(eps, 1, t)", within="(0, 1)")

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: LossContext) -> None:
        h, eps, one, cond = self.options.fd_step, draw.eps, draw.s, draw.pair.cond
        t = draw.t * (1 - h)  # keep t + h inside [0, 1]
        jump = model(eps, one, t, cond, check_times=False)
        ahead = model(eps, one, t + h, cond, check_times=False)
        d_jump_dt = (ahead - jump) / h
        with torch.no_grad():
            target = self.teacher.velocity(jump.detach(), t, cond)
        residual = d_jump_dt - target
        terms.add("lagrangian", self.weighting(residual, one, t))
        log_residual(terms, d_jump_dt, residual)
