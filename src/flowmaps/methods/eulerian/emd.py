"""EMD: Eulerian map distillation (Boffi, Albergo & Vanden-Eijnden 2024, arXiv 2406.07507)."""

from dataclasses import dataclass

import torch
from torch import nn

from flowmaps.jvp import flow_jvp
from flowmaps.methods.options import DistillationOptions, JVPOptions
from flowmaps.methods.registry import register
from flowmaps.methods.skeleton import Draw, LossContext, LossTerms, SkeletonMethod
from flowmaps.weighting import row_norm


@register
class EMD(SkeletonMethod):
    """Eulerian map distillation: ``|d_s F(x_s,s,t) + grad_x F(x_s,s,t) . v_T(x_s, s)|^2``, no stop-gradient.

    Boffi, Albergo & Vanden-Eijnden 2024, "Flow map matching" (arXiv 2406.07507), in this convention:
    ``L = E_{x_0, eps, s >= t} |d/ds F(x_s, s, t) + grad_x F(x_s, s, t) . v_T(x_s, s)|^2`` with
    ``x_s = alpha(s) x_0 + sigma(s) eps``; one JVP along ``(v_T, 1, 0)``. No stop-gradient: the
    gradient flows through the whole JVP (second-order differentiation). No EMA. The teacher is
    evaluated at the data point ``x_s``, which does not depend on the parameters.
    """

    name = "emd"
    rule = "eulerian"
    setting = "teacher"
    cost = 7
    needs_teacher = True

    @dataclass
    class Options(DistillationOptions, JVPOptions):
        """The two-time groups of a distillation method and the JVP backend; no options of its own."""

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: LossContext) -> None:
        with torch.no_grad():
            v = self.teacher.velocity(draw.x_s, draw.s, draw.pair.cond)
        _, residual = flow_jvp(model, draw.x_s, draw.s, draw.t, draw.pair.cond, dx=v, ds=1.0, output="F",
                               backend=self.jvp_backend, grad="full")
        terms.add("eulerian", self.weighting(residual, draw.s, draw.t))
        terms.log("residual_norm", row_norm(residual))
