"""Continuous-time maps anchored at ``t = 0``: every pair row jumps ``(s, 0)`` (sCM, FACM)."""

import torch

from flowmaps.methods.skeleton import Batch, LossContext, SkeletonMethod


class ToData(SkeletonMethod):
    """Pair rows ``(s, 0)``, ``s`` from the options' time distribution; sampled by the consistency sampler."""

    rule = "eulerian"
    sampler = "consistency"

    def pair_times(self, pair: Batch, generator: torch.Generator, ctx: LossContext,
                   progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.pairs.times(pair.x0.shape[0], generator, pair.x0.device)
        return s, torch.zeros_like(s)
