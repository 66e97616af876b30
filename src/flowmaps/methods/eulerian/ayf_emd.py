"""AYF-EMD: Align Your Flow, Eulerian (Sabour, Fidler & Kreis 2025, arXiv 2506.14603)."""

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
class AYFEMD(SkeletonMethod):
    """Align Your Flow, Eulerian: ``|V - sg[V + R_E / (|R_E|_2 + c)]|^2`` with the teacher, JVP without gradient.

    Sabour, Fidler & Kreis 2025, "Align Your Flow: scaling continuous-time flow map distillation"
    (arXiv 2506.14603). AYF matches ``F(x_s, s, t)`` to ``sg[F(x_s', s', t)]`` where ``s'`` lies between
    ``s`` and ``t`` and ``x_s' = x_s + (s' - s) v_T(x_s, s)`` (a teacher Euler step), and lets
    ``s' -> s``. In this convention the update is ``E 2 <-g, grad_theta V(x_s, s, t)>`` with
    ``g = R_E = d/ds F + grad_x F . v_T = v_T - V + (t - s) D`` tangent-normalised to
    ``g / (|g|_2 + c)`` (``tangent_norm_c``, 0.1; 0 disables), the per-example L2 norm over all
    features as in sCM's Algorithm 1 (``g <- g / (||g|| + c)``), which AYF adopts. The pseudo-loss is
    ``|V - sg[V + g]|^2``: with ``c = 0`` the target is MeanFlow's ``v_T + (t - s) D`` with the teacher
    velocity. AYF's loss on ``F`` weights this by ``|t - s|`` (``time_weight="gap"``). The JVP carries no
    gradient (separate gradient forward); no back-propagation into the teacher; no EMA. AYF's
    autoguidance, linearity warm-up and adversarial fine-tuning are not part of this loss.
    """

    name = "ayf-emd"
    rule = "eulerian"
    setting = "teacher"
    cost = 6
    needs_teacher = True

    @dataclass
    class Options(DistillationOptions, JVPOptions):
        tangent_norm_c: float = option(0.1, "c of the tangent normalisation g / (|g|_2 + c) (0: off; sCM, AYF)",
                                       within="[0, inf)")

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: LossContext) -> None:
        x_s, s, t, cond = draw.x_s, draw.s, draw.t, draw.pair.cond
        with torch.no_grad():
            v = self.teacher.velocity(x_s, s, cond)
        avg, derivative = flow_jvp(model, x_s, s, t, cond, dx=v, ds=1.0, output="V", backend=self.jvp_backend,
                                   grad="primal")
        with torch.no_grad():
            residual = v - avg + expand_like(t - s, avg) * derivative
            step = normalise_tangent(residual, self.options.tangent_norm_c)
        terms.add("eulerian", self.weighting(semigradient(avg, step), s, t))
        log_residual(terms, derivative, residual)
