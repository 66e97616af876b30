"""Feature embeddings for flow-map backbones: Fourier features of times and of coordinates.

Each embedding also gives its directional derivative (``tangent``), so that a backbone can carry a
JVP tangent through itself in closed form (``MLP.forward_with_tangent``).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FourierTimeEmbedding(nn.Module):
    """``[t, sin(2 pi f_k t), cos(2 pi f_k t)]`` with ``num_freqs`` frequencies log-spaced in ``[1, max_freq]``.

    Frequencies are kept moderate because flow-map losses differentiate the network in time: high
    frequencies make ``d/dt`` of the embedding, and so the JVP tangents, large (the sCM paper's
    observation). ``num_freqs = 0`` gives the raw time alone.
    """

    def __init__(self, num_freqs: int = 0, max_freq: float = 8.0):
        super().__init__()
        if num_freqs < 0 or max_freq <= 0:
            raise ValueError(f"need num_freqs >= 0 and max_freq > 0; got {num_freqs}, {max_freq}")
        freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), num_freqs))
        self.register_buffer("freqs", 2 * math.pi * freqs, persistent=False)
        self.dim = 2 * num_freqs + 1

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * self.freqs.to(t.dtype)
        return torch.cat([t[:, None], torch.sin(angles), torch.cos(angles)], dim=-1)

    def tangent(self, t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """``d/de forward(t + e dt)``: ``dt [1, w cos(w t), -w sin(w t)]``."""
        w = self.freqs.to(t.dtype)
        angles = t[:, None] * w
        slope = torch.cat([torch.ones_like(t)[:, None], w * torch.cos(angles), -w * torch.sin(angles)], dim=-1)
        return dt[:, None] * slope


class FourierInputFeatures(nn.Module):
    """``[x, sin(2 pi x B), cos(2 pi x B)]`` with a fixed Gaussian matrix ``B`` of ``num_features``
    columns and scale ``scale`` (random Fourier features; Tancik et al. 2020, "Fourier features let
    networks learn high frequency functions in low dimensional domains").

    Sharp targets on low-dimensional data (the checkerboard's edges) need high spatial frequencies
    that an MLP on raw coordinates learns slowly. ``B`` is drawn from its own seeded generator, so two
    models built with the same settings have the same features whatever the global RNG state, and
    it is saved with the weights (a buffer, persistent when there are features). ``num_features = 0`` gives ``x`` alone.
    """

    def __init__(self, dim: int, num_features: int = 0, scale: float = 1.0, seed: int = 0):
        super().__init__()
        if num_features < 0 or not scale > 0:
            raise ValueError(f"need num_features >= 0 and scale > 0; got {num_features}, {scale}")
        g = torch.Generator().manual_seed(seed)
        proj = 2 * math.pi * scale * torch.randn(dim, num_features, generator=g)
        self.register_buffer("proj", proj, persistent=num_features > 0)
        self.dim = dim + 2 * num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj.shape[1] == 0:
            return x
        angles = x @ self.proj.to(x.dtype)
        return torch.cat([x, torch.sin(angles), torch.cos(angles)], dim=-1)

    def tangent(self, x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        """``d/de forward(x + e dx)``: ``[dx, cos(xB) (dx B), -sin(xB) (dx B)]``."""
        if self.proj.shape[1] == 0:
            return dx
        proj = self.proj.to(x.dtype)
        angles, dangles = x @ proj, dx @ proj
        return torch.cat([dx, torch.cos(angles) * dangles, -torch.sin(angles) * dangles], dim=-1)


NULL_CLASS = -1  # the label of "no class": classifier-free training drops labels to it


class ClassEmbedding(nn.Module):
    """A learned embedding of ``num_classes`` classes plus the null class (spec §7).

    ``cond`` is a ``[B]`` integer tensor of labels in ``[0, num_classes)``, where ``NULL_CLASS`` (-1)
    marks a row without a label; ``cond=None`` is the null class for every row (the unconditional
    model, the same network). Labels out of range, a floating ``cond`` or a ``cond`` whose length is
    not the batch's are ``ValueError`` s naming the value.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"ClassEmbedding needs num_classes >= 1 and dim >= 1; got {num_classes}, {dim}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)  # the last row is the null class

    def forward(self, cond: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if cond is None:
            index = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        else:
            check_labels(cond, batch, self.num_classes)
            index = torch.where(cond == NULL_CLASS, self.num_classes, cond.long())
        return self.table(index)


def check_labels(cond: torch.Tensor, batch: int, num_classes: int) -> None:
    """``cond`` must be a ``[batch]`` integer tensor of labels in ``[0, num_classes)`` or ``NULL_CLASS``."""
    if cond.dtype.is_floating_point or cond.dtype.is_complex or cond.dtype == torch.bool:
        raise ValueError(f"cond must be a [B] tensor of integer class labels; got dtype {cond.dtype}")
    if cond.shape != (batch,):
        raise ValueError(f"cond must have shape [B] = [{batch}]; got {tuple(cond.shape)}")
    if cond.numel() and not torch.compiler.is_compiling():
        low, high = int(cond.min()), int(cond.max())
        if low < NULL_CLASS or high >= num_classes:
            bad = low if low < NULL_CLASS else high
            raise ValueError(f"class label {bad} is out of range: this model has {num_classes} classes "
                             f"(labels 0..{num_classes - 1}, or {NULL_CLASS} for none)")


def refuse_labels(cond: torch.Tensor | None) -> None:
    """An unconditional backbone (``model.num_classes = 0``) takes no labels."""
    if cond is not None:
        raise ValueError("this model is unconditional (model.num_classes = 0) but was given class labels (cond); "
                         "train with model.num_classes = K to use labels")
