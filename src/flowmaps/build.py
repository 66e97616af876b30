"""Build the objects a run needs from its validated config."""

from __future__ import annotations

import torch

from flowmaps.flow_map import FlowMap
from flowmaps.nets import MLP
from flowmaps.train.config import Config


def build_model(cfg: Config, dim: int) -> FlowMap:
    """A ``FlowMap`` over an ``MLP`` backbone for ``dim``-dimensional data."""
    m = cfg.model
    return FlowMap(MLP(dim, width=m.width, depth=m.depth, num_freqs=m.num_freqs, max_freq=m.max_freq,
                       x_features=m.x_features, x_scale=m.x_scale))


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; an unavailable CUDA device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available on this machine")
    return device
