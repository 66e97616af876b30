"""LSD: Lagrangian self-distillation (Boffi, Albergo & Vanden-Eijnden 2025, arXiv 2505.18825)."""

from dataclasses import dataclass
from typing import Optional

from torch import nn

from flowmaps.methods.lagrangian.jump_derivative import jump_and_derivative
from flowmaps.methods.options import JVPOptions, TargetOptions, TwoTimeOptions, option
from flowmaps.methods.registry import register
from flowmaps.methods.skeleton import Draw, LossContext, LossTerms, SkeletonMethod, log_residual


@register
class LSD(SkeletonMethod):
    """Lagrangian self-distillation: diag + ``|d_t F(x_s,s,t) - sg[V(F(x_s,s,t), t, t)]|^2``.

    Boffi, Albergo & Vanden-Eijnden 2025, "How to build a consistency model: learning flow maps via
    self-distillation" (arXiv 2505.18825), in this project's convention (t = 0 data):

    ``L = E_t |V(x_t, t, t) - (alpha' x_0 + sigma' eps)|^2
        + E_{s>=t} |d/dt F(x_s, s, t) - sg[V(F(x_s, s, t), t, t)]|^2``.

    The batch is split between the two terms by ``diagonal_fraction``. The target velocity is the
    model's own diagonal evaluated at the (detached) jump ``F(x_s, s, t)`` under stop-gradient (the
    online weights by default, ``target``); the derivative term ``d/dt F`` carries the gradient.

    Two presets. ``robust`` (the default; the checkerboard record's levers, ``docs/benchmarks.md``):
    half the batch on the diagonal, which regresses on the batch's empirical velocity
    (``diagonal_target="batch_posterior"``), and grid distillation from 30 % of training on the
    power grids ``t_k = (1 - k/N)^2`` that the map is then sampled on, half of its rows on the
    one-step jump. ``paper``: Boffi et al.'s loss alone (diagonal fraction 0.75, the conditional
    velocity, no grid term). ``robust`` is the default on the MLP, ``paper`` on the image backbones
    (``backbone_presets``). On the MLP, unless the config sets them, LSD trains at lr 5e-3 with random
    Fourier features of low-dimensional ``x`` (``backbone_defaults``).
    """

    name = "lsd"
    rule = "lagrangian"
    setting = "self-distillation"
    cost = 10
    # the record's MLP: random Fourier features of low-dimensional x and a higher rate (docs/benchmarks.md,
    # "The default experiment": one-step KL 0.13 against 0.40 without the features and 0.21 at lr 2e-3)
    backbone_defaults = {"mlp": {"lr": 5e-3, "x_features": None}}
    # robust was measured on low-dimensional data; on Fashion-MNIST's U-Net (830 steps) it gave FD 46 / 50 at
    # 1 / 4 steps and a diagonal ODE of 25, where paper gave 30 / 7.5 and 5.5 (docs/benchmarks.md)
    backbone_presets = {"unet": "paper", "dit": "paper"}
    presets = {
        "robust": {"diagonal_fraction": 0.5, "diagonal_target": "batch_posterior", "grid_fraction": 0.25,
                   "grid_start": 0.3, "grid_weight": 30.0, "grid_rho": 2.0, "grid_level_weights": [4, 1, 1, 1, 1]},
        "paper": {"diagonal_fraction": 0.75, "diagonal_target": "conditional", "grid_fraction": 0.0,
                  "grid_start": 0.0, "grid_weight": 1.0, "grid_rho": 1.0, "grid_level_weights": None},
    }

    @dataclass
    class Options(TwoTimeOptions, JVPOptions, TargetOptions):
        """The two-time groups and the target network, with the ``robust`` preset's values as defaults."""

        preset: str = option("robust", "named option set: robust (batch-posterior diagonal, grid distillation "
                             "on rho = 2 grids; the default on the MLP) or paper (Boffi et al. 2025's loss alone; "
                             "the default on unet and dit)")
        diagonal_fraction: float = option(0.5, "share of the batch on the diagonal s = t (paper preset: 0.75)")
        diagonal_target: str = option("batch_posterior", "diagonal target (paper preset: conditional)")
        grid_fraction: float = option(0.25, "extra rows for grid distillation, a fraction of the batch (0: off)")
        grid_start: float = option(0.3, "fraction of training after which the grid term switches on")
        grid_weight: float = option(30.0, "weight of the grid term")
        grid_rho: float = option(2.0, "grid exponent: jumps of t_k = (1 - k/N)^rho (flowmaps.samplers.time_grid)")
        grid_level_weights: Optional[list[float]] = option([4, 1, 1, 1, 1], "share of the rows per level "
                                                           "0..grid_levels (half on the one-step jump)")

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: LossContext) -> None:
        jump, d_jump_dt = jump_and_derivative(model, draw, self.jvp_backend, grad="full")
        target = self.target(model, ctx, jump.detach(), draw.t, draw.t, draw.pair.cond, output="V")
        residual = d_jump_dt - target
        terms.add("lagrangian", self.weighting(residual, draw.s, draw.t))
        log_residual(terms, d_jump_dt, residual)
