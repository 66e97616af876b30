"""Backbones: networks ``net(x, s, t, cond=None) -> V`` that a ``FlowMap`` wraps.

Every module of this package that registers a backbone is imported here, so ``model.backbone``
can name it (``flowmaps.nets.registry``).
"""

from flowmaps.nets.embeddings import NULL_CLASS, ClassEmbedding, FourierTimeEmbedding
from flowmaps.nets.mlp import MLP
from flowmaps.nets import dit, unet  # noqa: F401  (they register the "dit" and "unet" backbones)
from flowmaps.nets.registry import (
    BackboneOptions, backbone_entry, backbone_names, build_backbone, register_backbone, resolve_backbone_options,
)

__all__ = ["MLP", "NULL_CLASS", "BackboneOptions", "ClassEmbedding", "FourierTimeEmbedding", "backbone_entry",
           "backbone_names", "build_backbone", "register_backbone", "resolve_backbone_options"]
