"""LMD: Lagrangian map distillation (Boffi, Albergo & Vanden-Eijnden 2024, arXiv 2406.07507)."""

from dataclasses import dataclass

from torch import nn

from flowmaps.methods.lagrangian.jump_derivative import jump_and_derivative
from flowmaps.methods.options import DistillationOptions, JVPOptions
from flowmaps.methods.registry import register
from flowmaps.methods.skeleton import Draw, LossContext, LossTerms, SkeletonMethod, log_residual


@register
class LMD(SkeletonMethod):
    """Lagrangian map distillation: ``|d_t F(x_s,s,t) - v_T(F(x_s,s,t), t)|^2``, no stop-gradient.

    Boffi, Albergo & Vanden-Eijnden 2024, "Flow map matching" (arXiv 2406.07507), in this convention:

    ``L = E_{x_0, eps, s >= t} |d/dt F(x_s, s, t) - v_T(F(x_s, s, t), t)|^2``,
    ``x_s = alpha(s) x_0 + sigma(s) eps``.

    No stop-gradient: the gradient flows through the JVP tangent ``d/dt F`` (second-order
    differentiation) and through the jump ``F`` into the frozen teacher's input. No EMA.
    ``diagonal_fraction`` rows (0 by default) regress ``V(x_t, t, t)`` on ``v_T(x_t, t)``.
    """

    name = "lmd"
    rule = "lagrangian"
    setting = "teacher"
    cost = 9
    needs_teacher = True

    @dataclass
    class Options(DistillationOptions, JVPOptions):
        """The two-time groups of a distillation method and the JVP backend; no options of its own."""

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: LossContext) -> None:
        jump, d_jump_dt = jump_and_derivative(model, draw, self.jvp_backend, grad="full")
        residual = d_jump_dt - self.teacher.velocity(jump, draw.t, draw.pair.cond)
        terms.add("lagrangian", self.weighting(residual, draw.s, draw.t))
        log_residual(terms, d_jump_dt, residual)
