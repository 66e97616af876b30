"""The auxiliary networks a method asks the trainer for (``Method.auxiliary_networks``), owned by the trainer.

The trainer builds them once (on the run's device; under ``torchrun`` every rank starts from rank
0's weights), passes them to the method's loss in ``LossContext.auxiliary``, back-propagates the
loss's ``auxiliary_loss`` with the model's loss, averages their gradients over the ranks, steps one
Adam optimiser per network (at the network's ``lr``) in the same steps as the model's optimiser, and
saves both in checkpoints. No method runs an optimiser step of its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flowmaps.methods.base import AuxiliaryNetwork
from flowmaps.train.distributed import DistributedContext


class AuxiliaryNetworks:
    """The method's auxiliary networks with their optimisers (none for most methods)."""

    def __init__(self, networks: dict[str, AuxiliaryNetwork], dist_ctx: DistributedContext):
        self.dist = dist_ctx
        self.modules: dict[str, nn.Module] = {k: a.module.to(dist_ctx.device) for k, a in networks.items()}
        self.optimizers = {k: torch.optim.Adam(self.modules[k].parameters(), lr=a.lr) for k, a in networks.items()}
        if dist_ctx.enabled:
            for module in self.modules.values():
                for param in module.parameters():
                    torch.distributed.broadcast(param.data, src=0)

    def zero_grad(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)

    def step(self, scaler: torch.amp.GradScaler) -> None:
        """One optimiser step per network on its gradients, averaged over the ranks."""
        for name, optimizer in self.optimizers.items():
            if self.dist.enabled:
                for param in self.modules[name].parameters():
                    if param.grad is not None:
                        torch.distributed.all_reduce(param.grad)
                        param.grad /= self.dist.world_size
            scaler.step(optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {name: {"weights": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
                       "optimizer": self.optimizers[name].state_dict()} for name, module in self.modules.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.modules):
            raise ValueError(f"the checkpoint holds auxiliary networks {sorted(state)}, the method has "
                             f"{sorted(self.modules)}")
        for name, module in self.modules.items():
            module.load_state_dict(state[name]["weights"])
            self.optimizers[name].load_state_dict(state[name]["optimizer"])
