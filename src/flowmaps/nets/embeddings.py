"""Feature embeddings for flow-map backbones: Fourier features of times and of coordinates.

Each embedding also gives its directional derivative (``tangent``), so that a backbone can carry a
JVP tangent through itself in closed form (``MLP.forward_with_tangent``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from flowmaps.conditions import Condition, check_scales, labels_of, scale_of


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


class GuidanceEmbedding(nn.Module):
    """An embedding of the guidance scale ``w >= 0`` (spec §7): Fourier features of the bounded
    coordinate ``c = w / (2 (1 + w))`` in ``[0, 1/2)``, at frequencies 1 and 2 (periods no shorter
    than the range, so no two scales share features), through a two-layer MLP whose last layer starts
    at zero: a network that gains this input starts as the network without it. Float32 (or float64)
    even under autocast, as the time embeddings are."""

    def __init__(self, dim: int):
        super().__init__()
        self.features = FourierTimeEmbedding(num_freqs=2, max_freq=2.0)
        self.mlp = nn.Sequential(nn.Linear(self.features.dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        dtype = self.mlp[0].weight.dtype
        with torch.autocast(device_type=w.device.type, enabled=False):
            w = w.to(dtype)
            return self.mlp(self.features(w / (2 * (1 + w))))


class ClassEmbedding(nn.Module):
    """A learned embedding of ``num_classes`` classes plus the null class (spec §7), and optionally of
    the guidance scale (``enable_guidance``: ``F(x, s, t, c, w)``).

    ``cond`` is a ``[B]`` integer tensor of labels in ``[0, num_classes)``, where ``NULL_CLASS`` (-1)
    marks a row without a label, or a ``flowmaps.conditions.Guided`` pair of labels and guidance
    scales; ``cond=None`` is the null class for every row (the unconditional model, the same network).
    A guidance-conditioned embedding adds ``GuidanceEmbedding(w)`` (``w = 1``, the conditional model,
    when ``cond`` carries no scale). A floating ``cond``, a ``cond`` whose length is not the batch's
    and, in eval mode, a label out of range or a scale other than 1 given to an embedding without
    the guidance input are ``ValueError`` s naming the value. In training mode those checks (a device
    synchronisation on every call) are not made here: the trainer checks the data once, and
    ``FlowMap.forward`` checks every user-facing call (``check_times``).
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"ClassEmbedding needs num_classes >= 1 and dim >= 1; got {num_classes}, {dim}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)  # the last row is the null class
        self.guidance: Optional[GuidanceEmbedding] = None

    def enable_guidance(self) -> None:
        """Give the embedding the guidance-scale input (its branch starts at zero)."""
        self.guidance = GuidanceEmbedding(self.table.embedding_dim).to(self.table.weight.device)

    def forward(self, cond: Condition, batch: int, device: torch.device) -> torch.Tensor:
        labels, scale = labels_of(cond), scale_of(cond)
        if labels is None:
            index = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        else:
            check_labels(labels, batch)
            if not self.training:
                check_label_range(labels, self.num_classes)
                check_guidance_input(scale, self.guidance is not None)
            index = torch.where(labels == NULL_CLASS, self.num_classes, labels.long())
        emb = self.table(index)
        if self.guidance is None:
            return emb
        w = torch.ones(batch, device=device) if scale is None else scale
        return emb + self.guidance(w).to(emb.dtype)


def check_guidance_input(scale: Optional[torch.Tensor], takes_guidance: bool,
                         trained: Optional[tuple[float, float]] = None) -> None:
    """Guidance scales must be finite and ``>= 0``; a network without the guidance input takes only
    ``w = 1``; a network trained on ``trained = (low, high)`` takes scales in that range (one device
    synchronisation)."""
    if scale is None or not scale.numel() or torch.compiler.is_compiling():
        return
    low, high = check_scales(scale)
    if not takes_guidance and (low != 1.0 or high != 1.0):
        raise ValueError(f"this model has no guidance input (model.guidance = false), so it takes only w = 1; got "
                         f"w in [{low}, {high}]. Train with model.guidance=true and train.guidance_range=[LOW, HIGH]")
    if trained is not None and (low < trained[0] - 1e-6 or high > trained[1] + 1e-6):
        raise ValueError(f"guidance scale w in [{low}, {high}] is outside the range this model was trained on "
                         f"(train.guidance_range = [{trained[0]}, {trained[1]}])")


def enable_guidance(net: nn.Module) -> None:
    """Give ``net``'s class embedding the guidance-scale input (``model.guidance``); a network
    without a ``ClassEmbedding`` (an unconditional one) cannot take a scale."""
    embeddings = [m for m in net.modules() if isinstance(m, ClassEmbedding)]
    if not embeddings:
        raise ValueError(f"{type(net).__name__} has no class embedding to carry a guidance scale: model.guidance "
                         "needs a class-conditional model (model.num_classes > 0)")
    for m in embeddings:
        m.enable_guidance()


def takes_guidance(net: nn.Module) -> bool:
    """Whether ``net`` has the guidance-scale input."""
    return any(isinstance(m, ClassEmbedding) and m.guidance is not None for m in net.modules())


def classes_of(net: nn.Module) -> int:
    """The number of classes of ``net``'s ``ClassEmbedding`` (0: it has none, an unconditional network)."""
    return next((m.num_classes for m in net.modules() if isinstance(m, ClassEmbedding)), 0)


def check_labels(cond: torch.Tensor, batch: int) -> None:
    """``cond`` must be a ``[batch]`` integer tensor (no device synchronisation)."""
    if cond.dtype.is_floating_point or cond.dtype.is_complex or cond.dtype == torch.bool:
        raise ValueError(f"cond must be a [B] tensor of integer class labels; got dtype {cond.dtype}")
    if cond.shape != (batch,):
        raise ValueError(f"cond must have shape [B] = [{batch}]; got {tuple(cond.shape)}")


def check_label_range(cond: torch.Tensor, num_classes: int) -> None:
    """Every label of ``cond`` lies in ``[0, num_classes)`` or is ``NULL_CLASS`` (one device synchronisation)."""
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
