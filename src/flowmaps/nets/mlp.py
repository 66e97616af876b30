"""An MLP backbone for vector data ``[B, D]`` (other shapes are flattened and restored)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from flowmaps.nets.embeddings import FourierTimeEmbedding


class MLP(nn.Module):
    """Average-velocity network ``V(x, s, t) = MLP([x, e(s), e(t - s), c])``.

    The times enter as features of ``s`` and of the interval ``t - s`` (so the diagonal ``s = t`` is a
    clean, always-identical signal, as in MeanFlow's ``(t, t - r)`` conditioning); ``e`` is the raw
    time plus ``num_freqs`` Fourier features (0 by default: raw times train fastest on 2D data).
    Smooth activations (SiLU) keep the network twice differentiable, which JVP-based losses need.
    No normalisation layers: with torch 2.13 the gradient of a forward-mode tangent through the native
    ``LayerNorm`` kernel is wrong (``docs/jvp.md``). ``num_classes > 0`` adds a learned class
    embedding (``cond`` is then a ``[B]`` integer tensor).
    """

    def __init__(
        self,
        dim: int,
        width: int = 256,
        depth: int = 3,
        num_freqs: int = 0,
        max_freq: float = 8.0,
        num_classes: int = 0,
        class_dim: int = 16,
    ):
        super().__init__()
        if dim < 1 or width < 1 or depth < 1:
            raise ValueError(f"MLP needs dim, width, depth >= 1; got dim={dim}, width={width}, depth={depth}")
        self.dim = dim
        self.embed = FourierTimeEmbedding(num_freqs, max_freq)
        self.class_embed = nn.Embedding(num_classes, class_dim) if num_classes > 0 else None
        layers: list[nn.Module] = []
        d_in = dim + 2 * self.embed.dim + (class_dim if num_classes > 0 else 0)
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), nn.SiLU()]
            d_in = width
        out = nn.Linear(width, dim)
        nn.init.normal_(out.weight, std=1.0 / math.sqrt(width))
        nn.init.zeros_(out.bias)
        self.layers = nn.Sequential(*layers, out)

    def forward(
        self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(shape[0], -1)
        if h.shape[1] != self.dim:
            raise ValueError(f"MLP was built for {self.dim} features; got x of shape {tuple(shape)}")
        features = [h, self.embed(s), self.embed(t - s)]
        if self.class_embed is not None:
            if cond is None:
                raise ValueError("this MLP is class-conditional: pass cond as a [B] tensor of class indices")
            features.append(self.class_embed(cond))
        return self.layers(torch.cat(features, dim=-1)).reshape(shape)
