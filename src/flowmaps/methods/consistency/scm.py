"""sCM: continuous-time consistency training (Lu & Song 2024, arXiv 2410.11081)."""

from dataclasses import dataclass

from torch import nn

from flowmaps.jvp import flow_jvp
from flowmaps.methods.consistency.to_data import ToData
from flowmaps.methods.options import JVPOptions, TimeOptions, option
from flowmaps.methods.registry import register
from flowmaps.methods.skeleton import TANGENT_NORMS, Draw, LossContext, LossTerms, mean_square, normalise_tangent
from flowmaps.time_args import expand_like


@register
class ContinuousConsistency(ToData):
    """sCM: continuous-time consistency training with tangent normalisation, ``grad ~ E[g_n . dF(x_s, s, 0)/dtheta]``.

    Lu & Song 2024, "Simplifying, stabilizing and scaling continuous-time consistency models"
    (arXiv 2410.11081), sCT, in this convention. The ``r -> s`` limit of consistency training has
    the gradient of ``E <F(x_s, s, 0), sg[g]>`` with ``g = d/ds F(x_s, s, 0)`` along the path:

    ``g = u - V(x_s, s, 0) - w s (d_s V + grad_x V . u)``, ``u = alpha'(s) x_0 + sigma'(s) eps``,
    ``L = E |F(x_s, s, 0) - sg[F(x_s, s, 0) - g / (||g|| + c)]|^2``

    (``F(x, s, 0) = x - s V(x, s, 0)``). The normalisation is the paper's Algorithm 1,
    ``g <- g / (||g|| + c)`` with ``c = tangent_norm_c = 0.1`` and ``||g||`` the L2 norm of the example
    over all its features (``tangent_norm="l2"``); ``"rms"`` divides by the root mean square instead
    (``||g|| / sqrt(D)``, NVlabs/FastGen's spatially invariant variant). The JVP along the tangent
    ``(u, 1, 0)`` uses the online weights under stop-gradient (the paper's ``theta^- = sg[theta]``, no
    EMA); ``w`` is the tangent warm-up, rising linearly from 0 to 1 over the first ``tangent_warmup``
    fraction of training. The paper's learned adaptive weighting is not used. At the exact map
    ``E[g | x_s] = 0`` (Eulerian rule), and for Gaussian data ``g`` is symmetric given ``x_s``, so the
    normalised loss is still stationary there.
    """

    name = "scm"
    setting = "scratch"
    cost = 5

    @dataclass
    class Options(TimeOptions, JVPOptions):
        time_distribution: str = option("logit_normal", "time distribution (the paper's log-normal noise levels)")
        logit_mean: float = option(-1.0, "mean of the logit-normal times")
        logit_std: float = option(1.4, "std of the logit-normal times")
        tangent_norm_c: float = option(0.1, "c of the tangent normalisation g / (||g|| + c) (the paper's 0.1)",
                                       within="(0, inf)")
        tangent_norm: str = option("l2", "norm of the tangent normalisation (l2: the paper's; rms: FastGen's)",
                                   choices=TANGENT_NORMS)
        tangent_warmup: float = option(0.1, "fraction of training over which the tangent warm-up w rises to 1",
                                       within="[0, 1]")

    def warmup_factor(self, ctx: LossContext) -> float:
        """The tangent warm-up ``w``: ``step / (tangent_warmup * total_steps)``, capped at 1."""
        warmup = self.options.tangent_warmup
        return 1.0 if warmup == 0 else min(1.0, ctx.step / (warmup * max(ctx.total_steps, 1)))

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: LossContext) -> None:
        x_s, s, cond, o = draw.x_s, draw.s, draw.pair.cond, self.options
        u = self.guided_velocity(model, x_s, s, cond, self.schedule.conditional_velocity(draw.pair.x0, draw.eps, s))
        v_avg, d_v = flow_jvp(model, x_s, s, draw.t, cond, dx=u, ds=1.0, output="V", backend=self.jvp_backend,
                              grad="primal")
        s_ = expand_like(s, x_s)
        g = u - v_avg.detach() - self.warmup_factor(ctx) * s_ * d_v
        g_normalised = normalise_tangent(g, o.tangent_norm_c, o.tangent_norm)
        f = x_s - s_ * v_avg  # F(x_s, s, 0), carrying the gradient
        terms.add("consistency", mean_square(f - (f.detach() - g_normalised)))
        terms.log("tangent_norm", g.flatten(1).norm(dim=1))
