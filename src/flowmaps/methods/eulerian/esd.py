"""ESD: Eulerian self-distillation (Boffi, Albergo & Vanden-Eijnden 2025, arXiv 2505.18825)."""

from dataclasses import dataclass

from torch import nn

from flowmaps.jvp import flow_jvp
from flowmaps.methods.options import JVPOptions, TargetOptions, TwoTimeOptions
from flowmaps.methods.registry import register
from flowmaps.methods.skeleton import Draw, LossContext, LossTerms, SkeletonMethod, log_residual


@register
class ESD(SkeletonMethod):
    """Eulerian self-distillation: diag + ``|d_s F(x_s,s,t) + sg[grad_x F(x_s,s,t) . V(x_s,s,s)]|^2``.

    Boffi, Albergo & Vanden-Eijnden 2025, "How to build a consistency model: learning flow maps via
    self-distillation" (arXiv 2505.18825), in this convention:

    ``L = E_t |V(x_t, t, t) - (alpha' x_0 + sigma' eps)|^2
        + E_{s>=t} |d/ds F(x_s, s, t) + sg[grad_x F(x_s, s, t) . V(x_s, s, s)]|^2``.

    The velocity is the model's own diagonal (``target``: online weights by default) under
    stop-gradient, and the spatial part of the JVP ``grad_x F . v`` sits under stop-gradient too, so the
    gradient flows only through the time derivative ``d/ds F`` (a JVP along ``(0, 1, 0)`` with
    gradient; the spatial part is a second JVP along ``(v, 0, 0)`` without). The batch is split by
    ``diagonal_fraction``.
    """

    name = "esd"
    rule = "eulerian"
    setting = "self-distillation"
    cost = 10

    @dataclass
    class Options(TwoTimeOptions, JVPOptions, TargetOptions):
        """The two-time groups and the target network; no options of its own."""

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: LossContext) -> None:
        x_s, s, t, cond = draw.x_s, draw.s, draw.t, draw.pair.cond
        v = self.target(model, ctx, x_s, s, s, cond, output="V")
        _, d_jump_ds = flow_jvp(model, x_s, s, t, cond, ds=1.0, output="F", backend=self.jvp_backend, grad="full")
        _, spatial = flow_jvp(model, x_s, s, t, cond, dx=v, output="F", backend=self.jvp_backend, grad="none")
        residual = d_jump_ds + spatial
        terms.add("eulerian", self.weighting(residual, s, t))
        log_residual(terms, d_jump_ds, residual)
