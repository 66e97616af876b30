"""Flow matching: diffusion training of the diagonal ``v(x, t) = V(x, t, t)``.

``L_diag = E_{t, x_0, eps} |V(x_t, t, t) - (alpha'(t) x_0 + sigma'(t) eps)|^2``, the conditional
flow-matching loss (Lipman et al. 2023, "Flow matching for generative modeling"; Liu et al. 2023,
rectified flow), whose minimiser is the marginal velocity. Every self-distillation method uses it
on the diagonal part of its batch (``SkeletonMethod.diagonal_loss``); on its own (``fm``) it is the
plain diffusion/flow-matching baseline, sampled with the ODE solvers of ``flowmaps.samplers``.
``diagonal_target="batch_posterior"`` regresses on the velocity of the batch's empirical distribution
instead (the stable target field, ``flowmaps.posterior_targets``).
"""

from dataclasses import dataclass

from flowmaps.methods.options import DiagonalTargetOptions, TimeOptions
from flowmaps.methods.registry import register
from flowmaps.methods.skeleton import SkeletonMethod


@register
class FlowMatching(SkeletonMethod):
    """Flow matching on the diagonal: ``E |V(x_t, t, t) - (alpha' x_0 + sigma' eps)|^2``."""

    name = "fm"
    rule = "diagonal"
    setting = "scratch"
    cost = 3
    diagonal_fraction = 1.0
    sampler = "ode"  # the diagonal is the only trained part of the map

    @dataclass
    class Options(TimeOptions, DiagonalTargetOptions):
        """Times and the diagonal target."""
