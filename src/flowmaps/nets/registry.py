"""Name -> backbone builder, chosen by ``model.backbone``.

A builder takes the run's ``ModelConfig`` and the data dimension and returns a network
``net(x, s, t, cond=None) -> V`` (the average velocity, shaped like ``x``) for ``FlowMap`` to wrap.
Registering a builder is all a new backbone needs (``docs/extending.md``); the backbone tests run
every registered one through the same checks (shapes, JVP tangents against finite differences).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from flowmaps.nets.mlp import MLP
from flowmaps.train.config import ModelConfig

BackboneBuilder = Callable[[ModelConfig, int], nn.Module]
_BACKBONES: dict[str, BackboneBuilder] = {}


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator: make the builder available as ``model.backbone = name``."""
    def add(builder: BackboneBuilder) -> BackboneBuilder:
        if not name or name in _BACKBONES:
            raise ValueError(f"backbone name {name!r} is empty or already registered")
        _BACKBONES[name] = builder
        return builder
    return add


def backbone_names() -> list[str]:
    return sorted(_BACKBONES)


def build_backbone(model: ModelConfig, dim: int) -> nn.Module:
    """The network of ``model.backbone`` for ``dim``-dimensional data."""
    if model.backbone not in _BACKBONES:
        raise ValueError(f"unknown model.backbone {model.backbone!r}; available backbones: {', '.join(backbone_names())}")
    return _BACKBONES[model.backbone](model, dim)


@register_backbone("mlp")
def mlp(model: ModelConfig, dim: int) -> nn.Module:
    """``flowmaps.nets.MLP`` with ``model.width``, ``depth``, ``num_freqs``, ``max_freq``, ``x_features``, ``x_scale``."""
    return MLP(dim, width=model.width, depth=model.depth, num_freqs=model.num_freqs, max_freq=model.max_freq,
               x_features=model.x_features, x_scale=model.x_scale)


__all__ = ["BackboneBuilder", "register_backbone", "backbone_names", "build_backbone"]
