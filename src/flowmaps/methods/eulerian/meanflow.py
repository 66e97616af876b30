"""MeanFlow (Geng, Deng, Bai, Kolter & He 2025, arXiv 2505.13447) and its paper presets."""

from dataclasses import dataclass

from torch import nn

from flowmaps.jvp import flow_jvp
from flowmaps.methods.options import JVPOptions, TwoTimeOptions, option
from flowmaps.methods.registry import register
from flowmaps.methods.skeleton import Draw, LossContext, LossTerms, SkeletonMethod, log_residual
from flowmaps.time_args import expand_like


@register
class MeanFlow(SkeletonMethod):
    """MeanFlow: ``w |V(x_s,s,t) - sg[u + (t-s)(d_s V + grad_x V . u)]|^2``, ``u = alpha' x_0 + sigma' eps``.

    Geng, Deng, Bai, Kolter & He 2025, "Mean flows for one-step generative modeling" (arXiv
    2505.13447), in this convention (MeanFlow's ``u(z_t, r, t)`` with ``r < t`` is our ``V(x_s, s, t)``
    with ``s`` = their ``t`` and ``t`` = their ``r``):

    ``L = E w |V(x_s, s, t) - sg[u + (t - s) (d/ds V + grad_x V . u)]|^2``,   ``w = sg[1 / (|.|^2 + c)^p]``,

    the average-velocity Eulerian rule with the conditional velocity in place of the marginal one
    (valid because of the MSE, the evaluation at ``x_s``, the target linear in ``u`` and the
    stop-gradient on the whole target). One JVP along ``(u, 1, 0)`` without gradient and a separate
    gradient forward of ``V``; no EMA in the loss. Rows with ``s = t`` reduce to flow matching.
    ``preset`` is a named option set: ``"robust"`` (default: the ImageNet recipe without the adaptive
    weight), ``"imagenet"`` (the paper's ImageNet recipe, ``p = 1``) or ``"cifar10"`` (its CIFAR-10
    code); options given explicitly override it. ``|.|^2`` is the squared
    L2 norm (``reduction="sum"``, as the paper). With ``p > 0`` the update is unbiased only for
    symmetric conditional residuals (``flowmaps.weighting``).
    """

    name = "meanflow"
    rule = "eulerian"
    setting = "scratch"
    cost = 4
    joint_rows = True
    presets = {
        # the ImageNet recipe without the adaptive weight, whose p = 1 biases the fixed point on
        # low-dimensional data (a held-out 2D mixture, 3000 steps: 0.382 of noise's energy distance at
        # one step with p = 1, 0.103 with p = 0; docs/benchmarks.md)
        "robust": dict(diagonal_fraction=0.75, logit_mean=-0.4, logit_std=1.0, adaptive_p=0.0),
        # MeanFlow ImageNet 256 (DiT): 25% of the rows with s != t, both times ~ sigmoid(N(-0.4, 1)), p = 1
        "imagenet": dict(diagonal_fraction=0.75, logit_mean=-0.4, logit_std=1.0, adaptive_p=1.0),
        # MeanFlow CIFAR-10 (U-Net, official PyTorch code): 75% with s != t, source ~ sigmoid(N(-0.6, 1.6)),
        # target ~ sigmoid(N(-4, 1.6)) (ordered), p = 0.75
        "cifar10": dict(diagonal_fraction=0.25, logit_mean=[-0.6, -4.0], logit_std=1.6, adaptive_p=0.75),
    }

    @dataclass
    class Options(TwoTimeOptions, JVPOptions):
        preset: str = option("robust", "named option set: robust (the ImageNet recipe with p = 0, unbiased on "
                             "low-dimensional data), imagenet (the paper's, p = 1) or cifar10 (its CIFAR-10 code)")
        time_distribution: str = option("logit_normal", "time distribution (both times logit-normal, ordered)")
        reduction: str = option("sum", "reduction over features of |R|^2 (the paper's squared L2 norm)")
        adaptive_p: float = option(0.0, "power p of the adaptive weight 1 / (|R|^2 + c)^p: 0 in the robust preset "
                                   "(p = 1, the imagenet preset, biases low-dimensional data), 0.75 in cifar10")

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: LossContext) -> None:
        s, t = draw.s, draw.t
        u = self.guided_velocity(model, draw.x_s, s, draw.pair.cond,
                                 self.schedule.conditional_velocity(draw.pair.x0, draw.eps, s))
        avg, derivative = flow_jvp(model, draw.x_s, s, t, draw.pair.cond, dx=u, ds=1.0, output="V",
                                   backend=self.jvp_backend, grad="primal")
        target = u + expand_like(t - s, u) * derivative
        per_example = self.weighting(avg - target, s, t)
        terms.add("diagonal", per_example[:draw.n_diag])
        terms.add("meanflow", per_example[draw.n_diag:])
        log_residual(terms, derivative, avg - target)
