"""FMM: flow map matching (Boffi, Albergo & Vanden-Eijnden 2024, arXiv 2406.07507)."""

from dataclasses import dataclass

from torch import nn

from flowmaps.jvp import flow_jvp
from flowmaps.methods.options import JVPOptions, TwoTimeOptions, option
from flowmaps.methods.registry import register
from flowmaps.methods.skeleton import Draw, LossContext, LossTerms, SkeletonMethod


@register
class FlowMapMatching(SkeletonMethod):
    """Flow map matching: ``|F(y,t,s) - x_s|^2 + |d/dt' F(y,t,t')|_{t'=s} - (alpha' x_0 + sigma' eps)|^2``, ``y = F(x_s,s,t)``.

    Boffi, Albergo & Vanden-Eijnden 2024, "Flow map matching" (arXiv 2406.07507, Prop. "FMM"),
    in this convention. With ``y = F(x_s, s, t)`` the jump to ``t`` and back:

    ``L = E_{s, t in [0, 1]^2} [ |F(y, t, s) - x_s|^2
        + |d/dt' F(y, t, t')|_{t' = s} - (alpha'(s) x_0 + sigma'(s) eps)|^2 ]``.

    The first term is the inverse property ``F(., t, s) o F(., s, t) = id``; the second is the
    Lagrangian derivative of the return jump at its end, ``v(F(y, t, s), s) = v(x_s, s)`` at the
    true map, regressed on the conditional velocity. That regression is valid (MSE, evaluated at a
    function of ``x_s``), so the loss is minimised by the true map without a teacher. No
    stop-gradients: the gradient flows through both jumps. Pairs are drawn in both directions
    (``s > t`` and ``t > s``), so the model learns the map both ways (inversion included). The
    derivative is one forward-mode JVP along the tangent ``(0, 0, 1)`` of the return jump. With
    ``diagonal_fraction > 0`` part of the batch has ``s = t``, where the loss is flow matching.
    """

    name = "fmm"
    rule = "compositional"
    setting = "scratch"
    cost = 9

    @dataclass
    class Options(TwoTimeOptions, JVPOptions):
        diagonal_fraction: float = option(0.0, "share of the batch on the diagonal s = t")
        direction: str = option("both", "pair direction (both: the map is learned both ways)")

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: LossContext) -> None:
        x_s, s, t, cond = draw.x_s, draw.s, draw.t, draw.pair.cond
        y = model(x_s, s, t, cond, check_times=False)
        x_back, velocity = flow_jvp(model, y, t, s, cond, dt=1.0, output="F", backend=self.jvp_backend, grad="full")
        inverse = self.weighting(x_back - x_s, s, t)
        u = self.guided_velocity(model, x_s, s, cond, self.schedule.conditional_velocity(draw.pair.x0, draw.eps, s))
        matching = self.weighting(velocity - u, s, t)
        terms.add("fmm", inverse + matching)
        terms.log("inverse", inverse)
        terms.log("matching", matching)
