"""LSD: Lagrangian self-distillation (Boffi, Albergo & Vanden-Eijnden 2025, arXiv 2505.18825)."""

from dataclasses import dataclass

from torch import nn

from flowmaps.methods.lagrangian.jump_derivative import jump_and_derivative
from flowmaps.methods.options import JVPOptions, TargetOptions, TwoTimeOptions
from flowmaps.methods.registry import register
from flowmaps.methods.skeleton import Draw, LossContext, LossTerms, SkeletonMethod, log_residual


@register
class LSD(SkeletonMethod):
    """Lagrangian self-distillation: diag + ``|d_t F(x_s,s,t) - sg[V(F(x_s,s,t), t, t)]|^2``.

    Boffi, Albergo & Vanden-Eijnden 2025, "How to build a consistency model: learning flow maps via
    self-distillation" (arXiv 2505.18825), in this project's convention (t = 0 data):

    ``L = E_t |V(x_t, t, t) - (alpha' x_0 + sigma' eps)|^2
        + E_{s>=t} |d/dt F(x_s, s, t) - sg[V(F(x_s, s, t), t, t)]|^2``.

    The batch is split between the two terms by ``diagonal_fraction``. The target velocity is the
    model's own diagonal evaluated at the (detached) jump ``F(x_s, s, t)`` under stop-gradient (the
    online weights by default, ``target``); the derivative term ``d/dt F`` carries the gradient.
    """

    name = "lsd"
    rule = "lagrangian"
    setting = "self-distillation"
    cost = 10

    @dataclass
    class Options(TwoTimeOptions, JVPOptions, TargetOptions):
        """The two-time groups and the target network; no options of its own."""

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: LossContext) -> None:
        jump, d_jump_dt = jump_and_derivative(model, draw, self.jvp_backend, grad="full")
        target = self.target(model, ctx, jump.detach(), draw.t, draw.t, draw.pair.cond, output="V")
        residual = d_jump_dt - target
        terms.add("lagrangian", self.weighting(residual, draw.s, draw.t))
        log_residual(terms, d_jump_dt, residual)
