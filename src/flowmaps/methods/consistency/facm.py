"""FACM: flow-anchored consistency models (Peng et al. 2025, arXiv 2507.03738)."""

import math
from dataclasses import dataclass

import torch
from torch import nn

from flowmaps.jvp import flow_jvp
from flowmaps.methods.consistency.to_data import ToData
from flowmaps.methods.options import JVPOptions, TimeOptions, option
from flowmaps.methods.registry import register
from flowmaps.methods.skeleton import Draw, LossContext, LossTerms, mean_square
from flowmaps.time_args import expand_like
from flowmaps.weighting import adaptive_weight


@register
class FlowAnchoredConsistency(ToData):
    """FACM: a consistency loss on ``F(x_s, s, 0)`` anchored by flow matching at the expanded times ``1 + s``.

    Peng et al. 2025, "Flow-anchored consistency models" (arXiv 2507.03738), in this convention
    (their ``t`` is ``1 - s``; their expanded time ``2 - t`` is ``1 + s``). With the teacher
    velocity ``v = v_T(x_s, s)``:

    - anchor: ``|V(x_s, 1+s, 1+s) - v|^2 + (1 - cos(V(x_s, 1+s, 1+s), v))``: the network at times in
      ``[1, 2]`` is a velocity (denoiser) model, an auxiliary task that keeps the features of the
      flow;
    - consistency: ``V_tgt = v - s (d_s V + grad_x V . v)`` (from ``d/ds F(x_s, s, 0) = 0``),
      ``g = sg[V] - sg[V_tgt]``, target ``sg[V] - (1 - (1 - s)^p) clip(g, -1, 1)``, and
      ``L_CM = sin(pi s / 2) e / sg[e + c]^q``, ``e = |V(x_s, s, 0) - target|^2`` (mean over features),

    ``L = E[L_CM + anchor]``. ``V`` and its JVP along ``(v, 1, 0)`` use the online weights; the JVP
    and the target are under stop-gradient. Times are logit-normal ``(-0.8, 1.6)`` (the paper's
    log-normal noise level for the linear schedule); ``p = relaxation_power``, ``c = adaptive_c``,
    ``q = adaptive_power``. The teacher is a diffusion model (``--teacher RUN_DIR`` or ``exact``).
    """

    name = "facm"
    setting = "teacher"
    cost = 8
    needs_teacher = True
    # the exact map of a test knows nothing of the expanded times; test_consistency checks the anchor
    exact_limit = {"anchor_weight": 0.0}

    @dataclass
    class Options(TimeOptions, JVPOptions):
        time_distribution: str = option("logit_normal", "time distribution (the paper's log-normal noise levels)")
        logit_mean: float = option(-0.8, "mean of the logit-normal times")
        logit_std: float = option(1.6, "std of the logit-normal times")
        relaxation_power: float = option(0.5, "p of the relaxation 1 - (1 - s)^p", within="(0, inf)")
        adaptive_c: float = option(1e-3, "offset c of the adaptive weight e / sg[e + c]^q", within="(0, inf)")
        adaptive_power: float = option(0.5, "power q of the adaptive weight", within="[0, inf)")
        anchor_weight: float = option(1.0, "weight of the flow-matching anchor at the expanded times (0: off, "
                                      "the paper's ablation)", within="[0, inf)")

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: LossContext) -> None:
        x_s, s, cond, o = draw.x_s, draw.s, draw.pair.cond, self.options
        with torch.no_grad():
            v = self.teacher.velocity(x_s, s, cond)
        expanded = 1 + s
        v_aux = model(x_s, expanded, expanded, cond, output="V", check_times=False)
        cosine = torch.nn.functional.cosine_similarity(v_aux.flatten(1), v.flatten(1), dim=1)
        anchor = mean_square(v_aux - v) + (1 - cosine)
        v_avg, d_v = flow_jvp(model, x_s, s, draw.t, cond, dx=v, ds=1.0, output="V", backend=self.jvp_backend,
                              grad="primal")
        s_ = expand_like(s, x_s)
        with torch.no_grad():
            g = v_avg - (v - s_ * d_v)
            target = v_avg - (1 - (1 - s_) ** o.relaxation_power) * g.clamp(-1.0, 1.0)
        e = mean_square(v_avg - target)
        terms.add("consistency", adaptive_weight(e, o.adaptive_power, o.adaptive_c) * e * torch.sin(0.5 * math.pi * s))
        terms.add("anchor", o.anchor_weight * anchor)
        terms.log("tangent_norm", d_v.flatten(1).norm(dim=1))
