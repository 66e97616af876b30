"""FreeFlow: flow map distillation without data (Tong, Ma, Xie & Jaakkola 2025, arXiv 2511.19428)."""

import math
from dataclasses import dataclass

import torch
from torch import nn

from flowmaps.flow_map import FlowMap
from flowmaps.jvp import flow_jvp
from flowmaps.methods.lagrangian.from_noise import FromNoise
from flowmaps.methods.options import JVPOptions, TimeOptions, WeightingOptions, option
from flowmaps.methods.registry import register
from flowmaps.methods.skeleton import AuxiliaryNetwork, Draw, LossContext, LossTerms, semigradient
from flowmaps.nets import MLP
from flowmaps.time_args import expand_like
from flowmaps.weighting import row_norm, squared_norm

DENOISER = "denoiser"


@register
class FreeFlow(FromNoise):
    """FreeFlow, data-free: ``|V(eps,1,t) - sg[v_T(F(eps,1,t), t) - (t-1) d_t V]|^2`` + auxiliary-denoiser correction.

    Tong, Ma, Xie & Jaakkola 2025, "Flow map distillation without data" (arXiv 2511.19428), in this
    convention. Two terms, both from pure noise at ``s = 1``:

    - prediction: the average-velocity Lagrangian rule with its whole right-hand side under
      stop-gradient, ``|V(eps, 1, t) - sg[v_T(F(eps, 1, t), t) - (t - 1) d/dt V(eps, 1, t)]|^2``; the
      derivative comes from the JVP engine without gradient (``jvp_backend``, by default ``auto``: the
      exact closed-form tangent where the backbone has one; the paper's finite difference is
      ``finite_difference``, float64 central, and costs two more forward passes);
    - correction: an auxiliary flow-matching network ``v_aux`` learns the velocity of the student's
      one-step samples ``x_hat = F(eps', 1, 0)`` re-noised to ``x_tau = alpha x_hat + sigma xi``. The
      student then moves ``x_hat`` along
      ``g = alpha_tau^2 (v_aux - v_T)(x_tau, tau) / (alpha sigma' - sigma alpha')``, the
      noise-prediction difference (a distribution-matching / variational-score-distillation step):
      pseudo-loss ``correction_weight * |x_hat - sg[x_hat + g]|^2``, switched on after the
      ``correction_warmup`` fraction of training (the auxiliary network trains from the start).

    The auxiliary network (an MLP, ``auxiliary_networks``) belongs to the trainer: it builds it,
    optimises it with Adam at ``aux_lr`` on the auxiliary loss (one update per iteration, after the
    correction used it), checkpoints it and averages its gradients over processes. Stop-gradients: the
    prediction target and ``g`` entirely; gradients flow through ``V(eps, 1, t)`` and ``F(eps', 1, 0)``.
    No EMA, no data. Our choices where the paper could not be checked here: ``tau ~ U[0.02, 0.98]``,
    the weight of ``g``, the auxiliary network's size.
    """

    name = "freeflow"
    cost = 12
    # the correction vanishes only once the denoiser has learned the samples; test_lagrangian checks it
    exact_limit = {"correction_weight": 0.0}

    @dataclass
    class Options(TimeOptions, WeightingOptions, JVPOptions):
        correction_weight: float = option(1.0, "weight of the auxiliary-denoiser correction term", within="[0, inf)")
        correction_warmup: float = option(0.1, "fraction of training before the correction switches on",
                                          within="[0, 1]")
        aux_width: int = option(128, "width of the auxiliary denoiser MLP", within="[1, inf)")
        aux_depth: int = option(3, "depth of the auxiliary denoiser MLP", within="[1, inf)")
        aux_lr: float = option(1e-3, "Adam learning rate of the auxiliary denoiser", within="(0, inf)")

    def auxiliary_networks(self, sample_shape: tuple[int, ...], num_classes: int = 0) -> dict[str, AuxiliaryNetwork]:
        o = self.options
        denoiser = MLP(math.prod(sample_shape), o.aux_width, o.aux_depth, num_classes=num_classes)
        return {DENOISER: AuxiliaryNetwork(FlowMap(denoiser, shape=sample_shape, num_classes=num_classes), o.aux_lr)}

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: LossContext) -> None:
        if DENOISER not in ctx.auxiliary:
            raise ValueError("method 'freeflow' needs its auxiliary denoiser in ctx.auxiliary (the trainer builds it "
                             "from auxiliary_networks)")
        aux, o, generator, cond = ctx.auxiliary[DENOISER], self.options, draw.generator, draw.pair.cond
        eps, one, t = draw.eps, draw.s, draw.t
        # prediction: V(eps, 1, t) -> sg[v_T(F(eps, 1, t), t) - (t - 1) d/dt V]
        avg, d_avg_dt = flow_jvp(model, eps, one, t, cond, dt=1.0, output="V", backend=self.jvp_backend, grad="primal")
        with torch.no_grad():
            gap = expand_like(t - 1, avg)
            target = self.teacher.velocity(eps + gap * avg, t, cond) - gap * d_avg_dt
        terms.add("prediction", self.weighting(avg - target, one, t))
        terms.log("tangent_norm", row_norm(d_avg_dt))
        # the auxiliary denoiser's flow-matching loss on the student's one-step samples
        noise = torch.randn(eps.shape, generator=generator, device=eps.device, dtype=eps.dtype)
        samples = model(noise, one, torch.zeros_like(one), cond, check_times=False)
        xi = torch.randn(eps.shape, generator=generator, device=eps.device, dtype=eps.dtype)
        tau = torch.rand(eps.shape[0], generator=generator, device=eps.device, dtype=eps.dtype)
        x_aux = self.schedule.sample_xt(samples.detach(), xi, tau)
        residual = aux(x_aux, tau, tau, cond, output="V", check_times=False) - self.schedule.conditional_velocity(
            samples.detach(), xi, tau)
        terms.add_auxiliary("aux_loss", squared_norm(residual).mean())
        # correction: move one-step samples along the auxiliary-minus-teacher noise prediction
        if o.correction_weight > 0 and draw.progress >= o.correction_warmup:
            xi = torch.randn(eps.shape, generator=generator, device=eps.device, dtype=eps.dtype)
            tau = 0.02 + 0.96 * torch.rand(eps.shape[0], generator=generator, device=eps.device, dtype=eps.dtype)
            x_tau = self.schedule.sample_xt(samples.detach(), xi, tau)
            with torch.no_grad():
                tt = expand_like(tau, eps)
                a, s_, da, ds_ = (f(tt) for f in (self.schedule.alpha, self.schedule.sigma,
                                                  self.schedule.d_alpha, self.schedule.d_sigma))
                difference = (aux(x_tau, tau, tau, cond, output="V", check_times=False)
                              - self.teacher.velocity(x_tau, tau, cond))
                step = a**2 * difference / (a * ds_ - s_ * da)
            correction = squared_norm(semigradient(samples, step), self.weighting.reduction)
            terms.add("correction", o.correction_weight * correction)
            terms.log("correction_norm", row_norm(step))
