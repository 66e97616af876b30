"""PFMM: progressive flow map matching (Boffi, Albergo & Vanden-Eijnden 2024, arXiv 2406.07507)."""

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from flowmaps.methods.options import GridOptions, PairOptions, WeightingOptions, option
from flowmaps.methods.registry import register
from flowmaps.methods.skeleton import Draw, LossContext, LossTerms, SkeletonMethod


@register
class ProgressiveFlowMapMatching(SkeletonMethod):
    """Progressive flow map matching: ``|F(x_s, s, t) - F_T(F_T(x_s, s, u), u, t)|^2`` with a flow-map teacher.

    Boffi, Albergo & Vanden-Eijnden 2024, "Flow map matching" (arXiv 2406.07507, progressive
    FMM): a student learns in one jump what a pretrained flow map ``F_T`` does in
    ``teacher_steps`` jumps over the uniform subdivision ``s = u_0 > u_1 > ... > u_K = t``:

    ``L = E_{s >= t} |F(x_s, s, t) - F_T(... F_T(F_T(x_s, u_0, u_1), u_1, u_2) ..., u_{K-1}, u_K)|^2``

    (``K = 2``: the midpoint composition of the spec). The teacher is frozen (no gradient, no EMA);
    it needs ``flow_map(x, s, t, cond)``: ``--teacher RUN_DIR`` of a flow-map run, or ``exact`` for
    Gaussian-mixture data. The diagonal is not trained (the student never sees ``s = t``).
    """

    name = "pfmm"
    rule = "compositional"
    setting = "teacher"
    cost = 5
    needs_teacher = True

    @dataclass
    class Options(PairOptions, WeightingOptions, GridOptions):
        teacher_steps: int = option(2, "teacher jumps K composed into the target", within="[1, inf)")

    def teacher_flow_map(self) -> Callable[..., torch.Tensor]:
        flow_map = getattr(self.teacher, "flow_map", None)
        if not callable(flow_map):
            raise ValueError(
                f"pfmm needs a flow-map teacher with flow_map(x, s, t, cond) (--teacher RUN_DIR of a flow-map run, "
                f"or exact); got {type(self.teacher).__name__}"
            )
        return flow_map

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: LossContext) -> None:
        flow_map, k = self.teacher_flow_map(), self.options.teacher_steps
        x_s, s, t, cond = draw.x_s, draw.s, draw.t, draw.pair.cond
        with torch.no_grad():
            target = x_s
            for i in range(k):
                target = flow_map(target, s + (t - s) * (i / k), s + (t - s) * ((i + 1) / k), cond)
        jump = model(x_s, s, t, cond, check_times=False)
        terms.add("pfmm", self.weighting(jump - target, s, t))
