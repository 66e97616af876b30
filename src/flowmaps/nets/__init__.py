"""Backbones: networks ``net(x, s, t, cond=None) -> V`` that a ``FlowMap`` wraps."""

from flowmaps.nets.embeddings import FourierTimeEmbedding
from flowmaps.nets.mlp import MLP
from flowmaps.nets.registry import backbone_names, build_backbone, register_backbone

__all__ = ["MLP", "FourierTimeEmbedding", "backbone_names", "build_backbone", "register_backbone"]
