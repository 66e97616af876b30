"""ECT: easy consistency tuning (Geng, Pokle, Luo, Lin & Kolter 2024, arXiv 2406.14548)."""

from dataclasses import dataclass

import torch
from torch import nn

from flowmaps.methods.consistency.anchored import AnchoredConsistency, AnchoredOptions
from flowmaps.methods.options import option
from flowmaps.methods.registry import register
from flowmaps.methods.skeleton import Batch, Draw, LossContext


@register
class EasyConsistencyTuning(AnchoredConsistency):
    """ECT: consistency training from a pretrained diffusion model with a shrinking step ``s - r``.

    Geng, Pokle, Luo, Lin & Kolter 2024, "Consistency models made easy" (arXiv 2406.14548), in
    this convention:

    ``L = E (sqrt(|F(x_s, s, 0) - sg[F(x_r, r, 0)]|^2 + c^2) - c) / (s - r)``, same ``(x_0, eps)``,
    ``r = max(0, s (1 - n(s) / q^a))``, ``n(s) = 1 + 8 sigmoid(-sigma(s) / alpha(s))``,

    with ``a`` the stage (``stages`` equal stages over training): stage 0 has ``r = 0``, which is
    diffusion (denoiser) training, and each later stage divides the step by ``q``. The paper's
    mapping acts on the EDM noise level; here it acts on ``t`` with ``n`` evaluated at the EDM
    level ``sigma / alpha``. The target is the online network under stop-gradient; times are
    logit-normal ``(-1.1, 2.0)``. ``initialize``, which the trainer calls once before the first step of
    a fresh run (not on resume), copies the teacher's weights into the student (``--teacher RUN_DIR``
    of a run with the same model architecture, e.g. an ``fm`` run); the trainer then starts its
    evaluation EMA from them.
    """

    name = "ect"
    setting = "teacher"
    cost = 4
    needs_teacher = True
    initializes_from_teacher = True
    exact_limit = {"stages": 10}  # late stages: the step s - r shrinks to 9 / 2^9 of s

    @dataclass
    class Options(AnchoredOptions):
        stages: int = option(6, "stages a of the shrinking step (equal shares of training)", within="[1, inf)")
        q: float = option(2.0, "step divisor q per stage", within="(1, inf)")
        time_distribution: str = option("logit_normal", "time distribution")
        logit_mean: float = option(-1.1, "mean of the logit-normal times")
        logit_std: float = option(2.0, "std of the logit-normal times")
        penalty: str = option("pseudo_huber", "robust penalty (the paper's pseudo-Huber)")
        reduction: str = option("sum", "reduction over features of |R|^2 (pseudo-Huber on the L2 norm)")
        weighting: str = option("inverse_step", "step weight (the paper's 1 / (s - r))")
        target: str = option("online", "target network (the online weights under stop-gradient)")

    def stage(self, ctx: LossContext) -> int:
        """The stage ``a = floor(stages * step / total_steps)`` (at most ``stages - 1``)."""
        return min(self.options.stages - 1, ctx.step * self.options.stages // max(ctx.total_steps, 1))

    def pair_times(self, pair: Batch, generator: torch.Generator, ctx: LossContext,
                   progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``s`` from ``time_distribution``, ``r = max(0, s (1 - n(s) / q^stage))``."""
        s = self.pairs.times(pair.x0.shape[0], generator, pair.x0.device).to(pair.x0.dtype).clamp(min=1e-4)
        noise_level = self.schedule.sigma(s) / self.schedule.alpha(s).clamp(min=1e-12)
        shrink = (1 + 8 * torch.sigmoid(-noise_level)) / self.options.q ** self.stage(ctx)
        return s, (s * (1 - shrink)).clamp(min=0.0)

    def previous_point(self, draw: Draw) -> torch.Tensor:
        """``x_r = alpha(r) x_0 + sigma(r) eps``: the same data and noise as ``x_s``."""
        return self.schedule.sample_xt(draw.pair.x0, draw.eps, draw.t)

    def initialize(self, model: nn.Module) -> None:
        """Copy the teacher network's weights into ``model`` (ECT's initialisation of a fresh run)."""
        source = getattr(self.teacher, "model", None)
        if not isinstance(source, nn.Module):
            raise ValueError(
                "ect initialises the student from a trained run: pass --teacher RUN_DIR (an fm or flow-map run with "
                f"the same model settings); the teacher {type(self.teacher).__name__} has no network weights"
            )
        src, dst = list(source.parameters()), list(model.parameters())
        shapes_src, shapes_dst = [tuple(p.shape) for p in src], [tuple(p.shape) for p in dst]
        if shapes_src != shapes_dst:
            raise ValueError(
                "ect: the teacher run's network does not match the student's (use the same model.width, "
                f"model.depth, model.num_freqs); teacher parameter shapes {shapes_src}, student {shapes_dst}"
            )
        with torch.no_grad():
            for p, q in zip(dst, src):
                p.copy_(q)

    def curriculum_state(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        """ECT's steps have no grid: the stage ``a`` of the shrinking schedule."""
        return {"stage": torch.tensor(float(self.stage(ctx)))}
