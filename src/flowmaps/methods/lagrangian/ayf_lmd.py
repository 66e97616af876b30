"""AYF-LMD: Align Your Flow, Lagrangian (Sabour, Fidler & Kreis 2025, arXiv 2506.14603)."""

from dataclasses import dataclass

import torch
from torch import nn

from flowmaps.jvp import flow_jvp
from flowmaps.methods.options import DistillationOptions, JVPOptions, option
from flowmaps.methods.registry import register
from flowmaps.methods.skeleton import (
    Draw, LossContext, LossTerms, SkeletonMethod, log_residual, normalise_tangent, semigradient,
)
from flowmaps.time_args import expand_like


@register
class AYFLMD(SkeletonMethod):
    """Align Your Flow, Lagrangian: LMD with the whole residual under stop-gradient (``|V - sg[V - R_L]|^2``).

    Sabour, Fidler & Kreis 2025, "Align Your Flow: scaling continuous-time flow map distillation"
    (arXiv 2506.14603). AYF compares a jump ``s -> t`` with a slightly shorter jump ``s -> t'`` (``t'``
    between ``s`` and ``t``) finished by a teacher Euler step, puts that target under stop-gradient and
    lets ``t' -> t``. In this convention the resulting update is

    ``grad = E 2 <g, grad_theta V(x_s, s, t)>``, ``g = R_L = d/dt F(x_s, s, t) - v_T(F(x_s, s, t), t)``,

    i.e. the pseudo-loss ``|V - sg[V - g]|^2``: ``V`` moves towards ``v_T(F, t) - (t - s) d/dt V``
    (the average-velocity Lagrangian rule with its whole right-hand side under ``sg``). AYF's loss on
    ``F`` weights this by ``|t - s|`` (``time_weight="gap"``). The JVP carries no gradient (computed
    without grad; the gradient comes from a separate forward of ``V``), and there is no
    back-propagation through the teacher. ``tangent_norm_c > 0`` normalises ``g`` to
    ``g / (|g|_2 + c)`` as AYF-EMD does (off by default for the Lagrangian variant). No EMA.
    """

    name = "ayf-lmd"
    rule = "lagrangian"
    setting = "teacher"
    cost = 6
    needs_teacher = True

    @dataclass
    class Options(DistillationOptions, JVPOptions):
        tangent_norm_c: float = option(0.0, "c of the tangent normalisation g / (|g|_2 + c) (0: off)",
                                       within="[0, inf)")

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: LossContext) -> None:
        s, t, cond = draw.s, draw.t, draw.pair.cond
        avg, d_avg_dt = flow_jvp(model, draw.x_s, s, t, cond, dt=1.0, output="V", backend=self.jvp_backend,
                                 grad="primal")
        with torch.no_grad():
            gap = expand_like(t - s, avg)
            jump = draw.x_s + gap * avg
            d_jump_dt = avg + gap * d_avg_dt
            residual = d_jump_dt - self.teacher.velocity(jump, t, cond)
            step = -normalise_tangent(residual, self.options.tangent_norm_c)
        terms.add("lagrangian", self.weighting(semigradient(avg, step), s, t))
        log_residual(terms, d_jump_dt, residual)
