"""SoFlow: solution flow models (Luo, Yuan & Liu 2025, arXiv 2512.15657)."""

from dataclasses import dataclass

import torch
from torch import nn

from flowmaps.methods.options import TargetOptions, TwoTimeOptions, option, require
from flowmaps.methods.registry import register
from flowmaps.methods.skeleton import Draw, LossContext, LossTerms, SkeletonMethod, semigradient
from flowmaps.time_args import expand_like
from flowmaps.weighting import row_norm

SOFLOW_VELOCITIES = ("conditional", "self")


@register
class SoFlow(SkeletonMethod):
    """Solution flow: diag + ``|V - sg[V + R]|^2``, ``R = (F(x_s,s,t) - F(x_s + (s'-s) u, s', t)) / (s - s')``.

    Luo, Yuan & Liu 2025, "SoFlow: solution flow models for one-step generative modeling" (arXiv
    2512.15657), in this convention. The Eulerian rule as a finite difference in the source time,
    without a JVP: ``s' = s + r (t - s)`` is a point between ``s`` and ``t``, ``x_s' = x_s + (s' - s) u``
    an Euler step, and ``R = (F(x_s, s, t) - F(x_s', s', t)) / (s - s')`` tends to the Eulerian
    residual ``R_E`` as ``r -> 0``. SoFlow regresses ``F(x_s, s, t)`` on ``sg[F(x_s', s', t)]`` with a
    ``1 / (s - s')^2`` weight; its gradient is ``-2 R . grad_theta V / r`` with ``r`` the same for the
    whole batch, so we use the same direction without the ``1 / r`` scale, the pseudo-loss

    ``L = E_t |V(x_t, t, t) - u_t|^2 + E_{s>=t} w |V(x_s, s, t) - sg[V(x_s, s, t) + R]|^2``

    (its value is ``|R|^2``; the finite-difference bias of the gradient is ``O(r)``). The step fraction
    shrinks geometrically over training from ``step_start`` to ``step_end`` (the curriculum). ``u`` is
    the conditional velocity ``alpha'(s) x_0 + sigma'(s) eps`` (``velocity="conditional"``, unbiased
    only as ``r -> 0``) or the model's own diagonal ``sg[V(x_s, s, s)]`` (``"self"``). Stop-gradient on
    ``R`` (the ``target`` weights, online by default); the gradient flows through ``V(x_s, s, t)``. The
    step constants and the weighting are our choices (the paper's exact values could not be checked
    here): no adaptive weight ``w`` by default, because with the conditional velocity MeanFlow's
    ``p = 1`` biases the fixed point on low-dimensional data (``docs/methods.md``).
    """

    name = "soflow"
    rule = "eulerian"
    setting = "self-distillation"
    cost = 7
    exact_limit = {"step_start": 1e-3, "step_end": 1e-3}  # the finite difference's O(r) bias vanishes

    @dataclass
    class Options(TwoTimeOptions, TargetOptions):
        velocity: str = option("conditional", "velocity of the Euler step", choices=SOFLOW_VELOCITIES)
        step_start: float = option(0.25, "step fraction r at the start of training")
        step_end: float = option(0.01, "step fraction r at the end of training (geometric decay)")
        time_distribution: str = option("logit_normal", "time distribution")
        reduction: str = option("sum", "reduction over features of |R|^2")

        def check_group(self, method: str) -> None:
            require(0 < self.step_end <= self.step_start < 1, method, "step_end and step_start",
                    "satisfy 0 < step_end <= step_start < 1", (self.step_end, self.step_start))

    def step_fraction(self, progress: float) -> float:
        """``r(progress) = step_start (step_end / step_start)^progress``."""
        o = self.options
        return o.step_start * (o.step_end / o.step_start) ** progress

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: LossContext) -> None:
        x_s, s, t, cond = draw.x_s, draw.s, draw.t, draw.pair.cond
        r = self.step_fraction(draw.progress)
        s_next = s + r * (t - s)
        if self.options.velocity == "conditional":
            u = self.guided_velocity(model, x_s, s, cond, self.schedule.conditional_velocity(draw.pair.x0, draw.eps, s))
        else:
            u = self.target(model, ctx, x_s, s, s, cond, output="V")
        target = self.target(model, ctx, x_s + expand_like(s_next - s, x_s) * u, s_next, t, cond)
        avg = model(x_s, s, t, cond, output="V", check_times=False)
        with torch.no_grad():
            jump = x_s + expand_like(t - s, avg) * avg
            residual = (jump - target) / expand_like(s - s_next, jump)
        terms.add("eulerian", self.weighting(semigradient(avg, residual), s, t))
        terms.log("residual_norm", row_norm(residual))
        terms.log("step_fraction", torch.tensor(r))
