"""Backbones: networks ``net(x, s, t, cond=None) -> V`` that a ``FlowMap`` wraps."""

from flowmaps.nets.embeddings import FourierTimeEmbedding
from flowmaps.nets.mlp import MLP

__all__ = ["MLP", "FourierTimeEmbedding"]
