"""CT: consistency training (Song, Dhariwal, Chen & Sutskever 2023), and the iCT recipe as a preset."""

from dataclasses import dataclass
from typing import Optional

import torch

from flowmaps.methods.consistency.anchored import GridCellConsistency, GridCurriculumOptions, ct_target_decay
from flowmaps.methods.options import option
from flowmaps.methods.registry import register, register_preset
from flowmaps.methods.skeleton import Draw, LossContext


@register
class ConsistencyTraining(GridCellConsistency):
    """Consistency training: ``|F(x_s, s, 0) - sg[F_ema(x_r, r, 0)]|^2`` with ``x_s``, ``x_r`` from one ``(x_0, eps)``.

    Song, Dhariwal, Chen & Sutskever 2023, "Consistency models" (arXiv 2303.01469), in this
    convention (the consistency function is ``f(x, s) = F(x, s, 0)``, t = 0 data):

    ``L = E_{x_0, eps, i} |F(x_s, s, 0) - sg[F_ema(x_r, r, 0)]|^2``,
    ``x_s = alpha(s) x_0 + sigma(s) eps``, ``x_r = alpha(r) x_0 + sigma(r) eps``, ``r = s - 1/N``.

    Using the same ``(x_0, eps)`` is an Euler step with the conditional velocity (exact for the
    linear schedule); the loss tends to the distillation loss as ``N -> infinity``. ``N`` follows
    the paper's curriculum from ``initial_steps`` to ``final_steps`` (``curriculum="ct"``). The
    paper's target is the method's own EMA with the rate ``mu(k) = exp(s_0 log mu_0 / N(k))``
    (``N(k)`` grid points, ``s_0 = initial_steps``, ``mu_0 = target_ema_decay = 0.9``, its CIFAR-10
    value; a fixed curriculum keeps ``mu_0``): ``preset="paper"``. An EMA target moves information
    about one grid interval per EMA time constant, so at small budgets it never trains (a held-out
    mixture, 3000 steps: 1.40 of noise's energy distance); the default preset ``"robust"`` uses the
    online weights under stop-gradient, as iCT does (0.087; ``docs/benchmarks.md``). Its recipes
    (``penalty``, ``weighting``, ``target``, ``curriculum``) are options; ``ict`` is a named set of
    them. ``weighting="inverse_step"`` keeps the loss from shrinking like ``(s - r)^2`` as the
    curriculum refines the grid (``docs/methods.md``).
    """

    name = "ct"
    setting = "scratch"
    cost = 4
    exact_limit = {"curriculum": "fixed", "final_steps": 256}  # conditional pairs: consistent as N grows
    presets = {"robust": {"target": "online"}, "paper": {"target": "ema", "target_ema_decay": 0.9}}

    @dataclass
    class Options(GridCurriculumOptions):
        preset: str = option("robust", "named option set: robust (online target) or paper (Song et al.'s EMA "
                             "target, mu_0 = 0.9)")
        target: str = option("online", "target network (robust preset: the online weights; paper: ema)")
        curriculum: str = option("ct", "grid curriculum (ct: Song et al. 2023, App. C)")
        logit_mean: float = option(-1.1, "mean of the logit-normal times (iCT's log-normal noise levels)")
        logit_std: float = option(2.0, "std of the logit-normal times")
        target_ema_decay: float = option(0.9, "mu_0 of the EMA target (the paper's CIFAR-10 value)")

    def target_decay(self, ctx: LossContext) -> Optional[float]:
        """``mu(k) = exp(s_0 log mu_0 / N(k))`` under the CT curriculum, else the configured ``mu_0``."""
        o = self.options
        if o.curriculum == "ct":
            return ct_target_decay(o.target_ema_decay, o.initial_steps, self.num_steps(ctx))
        return None

    def previous_point(self, draw: Draw) -> torch.Tensor:
        """``x_r = alpha(r) x_0 + sigma(r) eps``: the same data and noise as ``x_s``."""
        return self.schedule.sample_xt(draw.pair.x0, draw.eps, draw.t)


register_preset("ict", ConsistencyTraining, dict(
    curriculum="ict", initial_steps=10, final_steps=1280, time_distribution="logit_normal", penalty="pseudo_huber",
    reduction="sum", weighting="inverse_step", target="online", target_ema_decay=0.0,
), "iCT (Song & Dhariwal 2023, arXiv 2310.14189): CT with pseudo-Huber on |R|_2 (c = 0.00054 sqrt(D)), online "
   "target, 1/(s - r) weights, intervals doubling 10 -> 1280, logit-normal (-1.1, 2.0) times.")
