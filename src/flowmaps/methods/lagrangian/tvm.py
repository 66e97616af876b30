"""TVM: terminal velocity matching (Zhou, Parger, Haque & Song 2025, arXiv 2511.19797)."""

from dataclasses import dataclass

from torch import nn

from flowmaps.methods.lagrangian.jump_derivative import jump_and_derivative
from flowmaps.methods.options import (
    DiagonalTargetOptions, GapCurriculumOptions, GridOptions, JVPOptions, PairOptions, TargetOptions,
    WeightingOptions, option,
)
from flowmaps.methods.registry import register
from flowmaps.methods.skeleton import Draw, LossContext, LossTerms, SkeletonMethod, log_residual
from flowmaps.weighting import squared_norm


@register
class TVM(SkeletonMethod):
    """Terminal velocity matching: ``|V(x_t,t,t) - u|^2 + |d_t F(x_s,s,t) - V_ema(sg[F(x_s,s,t)], t, t)|^2``.

    Zhou, Parger, Haque & Song 2025, "Terminal velocity matching" (arXiv 2511.19797; code
    lumalabs/tvm), in this convention. Every example carries both terms:

    ``L = E |d/dt F(x_s, s, t) - V_ema(sg[F(x_s, s, t)], t, t)|^2 + E |V(x_t', t', t') - (alpha' x_0 + sigma' eps)|^2``

    with ``x_t'`` built from the same ``x_0, eps`` at an independent time ``t'``. The terminal velocity
    target uses EMA weights (``target="ema"``, decay ``target_ema_decay`` = 0.99 as in the paper, kept by
    the method and separate from the evaluation EMA; 0 uses the online weights) evaluated at the jump
    under stop-gradient; the derivative ``d/dt F`` is *not* under stop-gradient, so training
    differentiates through the JVP (TVM's custom attention kernel exists for that reason). Times
    follow the paper: gap ``s - t ~ sigmoid(N(-0.8, 1))``, target ``t ~ sigmoid(N(-0.4, 1))`` truncated
    to ``t <= 1 - gap``, ``t' ~ sigmoid(N(-0.4, 1))``. The paper's CFG scaling and semi-Lipschitz
    network changes are outside this loss.
    """

    name = "tvm"
    rule = "lagrangian"
    setting = "self-distillation"
    cost = 10

    @dataclass
    class Options(PairOptions, GapCurriculumOptions, WeightingOptions, DiagonalTargetOptions, JVPOptions,
                  TargetOptions, GridOptions):
        time_distribution: str = option("gap_logit_normal", "time distribution (TVM: gap first, then the target)")
        target: str = option("ema", "target network of the terminal velocity (the method's EMA)")
        target_ema_decay: float = option(0.99, "decay of the EMA target (the paper's 0.99)")

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: LossContext) -> None:
        jump, d_jump_dt = jump_and_derivative(model, draw, self.jvp_backend, grad="full")
        t, cond = draw.t, draw.pair.cond
        residual = d_jump_dt - self.target(model, ctx, jump.detach(), t, t, cond, output="V")
        terms.add("terminal", self.weighting(residual, draw.s, t))
        log_residual(terms, d_jump_dt, residual)
        # the flow-matching term on every row, at an independent time t' and the same (x_0, eps)
        x0 = draw.pair.x0
        t_fm = self.pairs.times(draw.size, draw.generator, x0.device).to(x0.dtype)
        x_t = self.schedule.sample_xt(x0, draw.eps, t_fm)
        v = model(x_t, t_fm, t_fm, cond, output="V", check_times=False)
        target = self.diagonal_velocity(model, x_t, x0, draw.eps, t_fm, cond, draw.batch)
        terms.add("diagonal", squared_norm(v - target, self.weighting.reduction))
