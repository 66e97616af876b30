"""Conditions that carry a guidance scale: ``F(x, s, t, c, w)`` (spec §7).

A condition ``cond`` is ``None`` (unconditional), a ``[B]`` integer tensor of class labels (-1: the
null class), or a ``Guided`` pair of labels and per-row guidance scales ``w`` (diffusers'
``guidance_scale``: ``w = 1`` conditional, ``w = 0`` unconditional), which a guidance-conditioned
student takes as an input (``model.guidance``; Meng et al. 2023, "On distillation of guided
diffusion models"; the iMF/TVM recipe). Methods pass ``cond`` through untouched; only the
embeddings, the targets and the teachers look inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch


@dataclass(frozen=True)
class Guided:
    """Class labels ``[B]`` and guidance scales ``[B]`` of the same rows; ``weight`` (``[B]``, optional)
    is the weight of each row's diagonal term that the scales' draw prescribes (guidance-free
    training's ``beta^2``; ``None``: 1)."""

    labels: torch.Tensor
    scale: torch.Tensor
    weight: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.labels.dim() != 1 or self.scale.shape != self.labels.shape or (
                self.weight is not None and self.weight.shape != self.labels.shape):
            raise ValueError(f"a guided condition needs labels [B], scales [B] (and weights [B]); got "
                             f"{tuple(self.labels.shape)}, {tuple(self.scale.shape)}"
                             + ("" if self.weight is None else f", {tuple(self.weight.shape)}"))

    def __getitem__(self, index: Union[slice, torch.Tensor]) -> Guided:
        return Guided(self.labels[index], self.scale[index], None if self.weight is None else self.weight[index])

    @property
    def shape(self) -> torch.Size:
        return self.labels.shape

    def to(self, device: Union[str, torch.device]) -> Guided:
        return Guided(self.labels.to(device), self.scale.to(device),
                      None if self.weight is None else self.weight.to(device))


Condition = Optional[Union[torch.Tensor, Guided]]


def labels_of(cond: Condition) -> Optional[torch.Tensor]:
    """The class labels of ``cond`` (``None`` for an unconditional call)."""
    return cond.labels if isinstance(cond, Guided) else cond


def scale_of(cond: Condition) -> Optional[torch.Tensor]:
    """The guidance scales of ``cond`` (``None``: no scale given, the conditional model ``w = 1``)."""
    return cond.scale if isinstance(cond, Guided) else None


def weight_of(cond: Condition) -> Optional[torch.Tensor]:
    """The diagonal-term weights of ``cond``'s rows (``None``: 1)."""
    return cond.weight if isinstance(cond, Guided) else None


def with_labels(cond: Condition, labels: Optional[torch.Tensor]) -> Condition:
    """``cond`` with its labels replaced by ``labels`` (its scales and weights kept)."""
    return Guided(labels, cond.scale, cond.weight) if isinstance(cond, Guided) and labels is not None else labels


def check_scales(scale: torch.Tensor) -> tuple[float, float]:
    """The least and largest of the guidance scales ``scale`` (one device synchronisation), refused
    (``ValueError``) unless every one is finite and ``>= 0``."""
    low, high = float(scale.min()), float(scale.max())
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0:
        raise ValueError(f"guidance scale w must be finite and >= 0; got values in [{low}, {high}]")
    return low, high


def guided(labels: torch.Tensor, scale: Union[float, torch.Tensor]) -> Guided:
    """``Guided(labels, w)`` with a float ``w`` broadcast to every row."""
    w = torch.as_tensor(scale, dtype=torch.float32, device=labels.device)
    return Guided(labels, w.expand(labels.shape).clone() if w.dim() == 0 else w)


__all__ = ["Guided", "Condition", "labels_of", "scale_of", "weight_of", "with_labels", "check_scales", "guided"]
