"""CD: consistency distillation (Song, Dhariwal, Chen & Sutskever 2023, arXiv 2303.01469)."""

from dataclasses import dataclass

import torch

from flowmaps.methods.consistency.anchored import SOLVERS, GridCellConsistency, GridCurriculumOptions, teacher_step
from flowmaps.methods.options import option
from flowmaps.methods.registry import register
from flowmaps.methods.skeleton import Draw


@register
class ConsistencyDistillation(GridCellConsistency):
    """Consistency distillation: ``|F(x_s, s, 0) - sg[F_ema(x_r, r, 0)]|^2``, ``x_r`` a teacher Euler/Heun step.

    Song, Dhariwal, Chen & Sutskever 2023, "Consistency models" (arXiv 2303.01469), in this
    convention:

    ``L = E |F(x_s, s, 0) - sg[F_ema(x_r, r, 0)]|^2``, ``r = s - 1/N``,
    Euler ``x_r = x_s + (r - s) v_T(x_s, s)`` or Heun (the paper's choice, the default).

    The teacher ``v_T`` is a diffusion model (``--teacher RUN_DIR`` of an ``fm`` run, or
    ``exact``); the target uses the method's own EMA weights with the paper's fixed rate
    ``target_ema_decay = 0.95`` (0: the online weights under stop-gradient). At the exact map
    the residual is the teacher step's local error, ``O(1/N^2)`` (Euler) or ``O(1/N^3)`` (Heun).
    ``N`` is fixed (``final_steps``) by default.
    """

    name = "cd"
    setting = "teacher"
    cost = 5
    needs_teacher = True
    exact_limit = {"final_steps": 128}  # the teacher step's local error O(1/N^3) vanishes

    @dataclass
    class Options(GridCurriculumOptions):
        solver: str = option("heun", "teacher ODE step (the paper's Heun)", choices=SOLVERS)
        initial_steps: int = option(18, "intervals N at the start of a curriculum")
        final_steps: int = option(18, "intervals N of the fixed grid (the paper's 18)")
        logit_mean: float = option(-1.1, "mean of the logit-normal times")
        logit_std: float = option(2.0, "std of the logit-normal times")
        target_ema_decay: float = option(0.95, "decay of the EMA target (the paper's 0.95)")

    def previous_point(self, draw: Draw) -> torch.Tensor:
        """One teacher ODE step from ``s`` to ``r``."""
        return teacher_step(self.teacher, draw.x_s, draw.s, draw.t, draw.pair.cond, self.options.solver)
