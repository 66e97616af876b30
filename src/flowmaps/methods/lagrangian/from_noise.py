"""Data-free distillation from pure noise: the pair rows start at ``s = 1`` (PID, FreeFlow)."""

import torch

from flowmaps.methods.skeleton import Batch, LossContext, SkeletonMethod


class FromNoise(SkeletonMethod):
    """Every row is a pair ``(1, t)`` from pure noise, ``t`` from the options' time distribution; only
    ``F(eps, 1, t)`` is trained, so the map is a one-step sampler. The data is unused."""

    rule = "lagrangian"
    setting = "teacher"
    needs_teacher = True
    sampler = "one_step"

    def pair_times(self, pair: Batch, generator: torch.Generator, ctx: LossContext,
                   progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.pairs.times(pair.x0.shape[0], generator, pair.x0.device)
        return torch.ones_like(t), t
