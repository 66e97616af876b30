"""SplitMeanFlow: interval splitting consistency (Guo et al. 2025, arXiv 2507.16884)."""

from dataclasses import dataclass

import torch
from torch import nn

from flowmaps.methods.options import DistillationOptions, TargetOptions, option
from flowmaps.methods.registry import register
from flowmaps.methods.skeleton import Draw, LossContext, LossTerms, SkeletonMethod
from flowmaps.time_args import expand_like


@register
class SplitMeanFlow(SkeletonMethod):
    """SplitMeanFlow: teacher diag + ``|V(x_s,s,t) - sg[l V(x_s,s,u) + (1-l) V(F(x_s,s,u),u,t)]|^2``.

    Guo et al. 2025, "SplitMeanFlow: interval splitting consistency in few-step generative
    modeling" (arXiv 2507.16884): shortcut models with unequal splits. The paper's interval
    ``[r, t]`` with the split point ``s = (1 - l) t + l r`` is, in this convention (``s >= t``,
    sampling direction), the interval ``[t, s]`` split at ``u = s + l (t - s)``, ``l ~ U(0, 1)``:

    ``L = E_t |V(x_t, t, t) - v_T(x_t, t)|^2
        + E_{s >= t, l} |V(x_s, s, t) - sg[l V(x_s, s, u) + (1 - l) V(x_u, u, t)]|^2``,
    ``x_u = F(x_s, s, u)``.

    ``(t - s)`` times the target is ``(u - s) V(x_s, s, u) + (t - u) V(x_u, u, t)``, the
    compositional rule in average-velocity form. The boundary condition ``V(x, t, t) = v`` is
    taught by the teacher's velocity ``v_T`` (``--teacher RUN_DIR`` of a diffusion/``fm`` run, or
    ``exact``); the split target uses the ``target`` weights (online by default) under stop-gradient.
    """

    name = "splitmeanflow"
    rule = "compositional"
    setting = "teacher"
    cost = 9
    needs_teacher = True

    @dataclass
    class Options(DistillationOptions, TargetOptions):
        diagonal_fraction: float = option(0.5, "share of the batch on the diagonal, regressed on the teacher")

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: LossContext) -> None:
        x_s, s, t, cond = draw.x_s, draw.s, draw.t, draw.pair.cond
        lam = torch.rand(s.shape, generator=draw.generator, device=s.device, dtype=s.dtype)
        u = s + lam * (t - s)
        v1 = self.target(model, ctx, x_s, s, u, cond, output="V")
        v2 = self.target(model, ctx, x_s + expand_like(u - s, x_s) * v1, u, t, cond, output="V")
        lam_ = expand_like(lam, v1)
        v = model(x_s, s, t, cond, output="V", check_times=False)
        terms.add("compositional", self.weighting(v - (lam_ * v1 + (1 - lam_) * v2), s, t))
