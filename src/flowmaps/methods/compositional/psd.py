"""PSD: progressive self-distillation (Boffi, Albergo & Vanden-Eijnden 2025, arXiv 2505.18825), and PSD-M."""

from dataclasses import dataclass

import torch
from torch import nn

from flowmaps.methods.options import TargetOptions, TwoTimeOptions, option
from flowmaps.methods.registry import register, register_preset
from flowmaps.methods.skeleton import Draw, LossContext, LossTerms, SkeletonMethod

SPLITS = ("uniform", "midpoint")


@register
class ProgressiveSelfDistillation(SkeletonMethod):
    """Progressive self-distillation: diag + ``|F(x_s,s,t) - sg[F(F(x_s,s,u),u,t)]|^2``, ``u ~ U[t, s]``.

    Boffi, Albergo & Vanden-Eijnden 2025, "How to build a consistency model: learning flow maps via
    self-distillation" (arXiv 2505.18825), in this convention (t = 0 data, ``s >= t``):

    ``L = E_t |V(x_t, t, t) - (alpha' x_0 + sigma' eps)|^2
        + E_{s >= t, u} |F(x_s, s, t) - sg[F(F(x_s, s, u), u, t)]|^2``,

    ``u ~ U[t, s]`` (``split="uniform"``, PSD-U) or ``u = (s + t) / 2`` (``"midpoint"``, PSD-M, the
    ``psd-m`` preset). The one-step jump is the student; the two-step composition is the target under
    stop-gradient (``target``: the online weights by default), so the diagonal's accuracy propagates
    to ever longer jumps.
    """

    name = "psd-u"
    rule = "compositional"
    setting = "self-distillation"
    cost = 8

    @dataclass
    class Options(TwoTimeOptions, TargetOptions):
        split: str = option("uniform", "intermediate time u: u ~ U[t, s] or u = (s + t) / 2", choices=SPLITS)

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: LossContext) -> None:
        x_s, s, t, cond = draw.x_s, draw.s, draw.t, draw.pair.cond
        if self.options.split == "uniform":
            u = t + torch.rand(s.shape, generator=draw.generator, device=s.device, dtype=s.dtype) * (s - t)
        else:
            u = 0.5 * (s + t)
        target = self.target(model, ctx, self.target(model, ctx, x_s, s, u, cond), u, t, cond)
        jump = model(x_s, s, t, cond, check_times=False)
        terms.add("compositional", self.weighting(jump - target, s, t))


register_preset("psd-m", ProgressiveSelfDistillation, {"split": "midpoint"},
                "Progressive self-distillation, midpoint split: as psd-u with u = (s + t) / 2.")
