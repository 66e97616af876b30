"""Validation and broadcasting of time arguments.

Every public entry point of the library accepts a time as a Python float, a 0-d tensor or a
``[B]`` tensor. These helpers turn such a time into a ``[B]`` tensor on the batch's device and
into a view that broadcasts against a ``[B, ...]`` batch, and raise a clear error otherwise.
"""

from __future__ import annotations

from typing import Union

import torch

TimeLike = Union[float, int, torch.Tensor]


def as_batch_time(t: TimeLike, x: torch.Tensor, name: str = "t") -> torch.Tensor:
    """Return ``t`` as a ``[B]`` tensor matching the batch size, device and dtype of ``x``.

    Raises ``ValueError`` naming ``name`` when ``t`` has a shape other than ``()``, ``[1]`` or ``[B]``.
    """
    if x.dim() < 1:
        raise ValueError(f"x must have a batch dimension [B, ...]; got a tensor of shape {tuple(x.shape)}")
    batch = x.shape[0]
    if not isinstance(t, torch.Tensor):
        return torch.full((batch,), float(t), device=x.device, dtype=x.dtype)
    t = t.to(device=x.device, dtype=x.dtype)
    if t.dim() == 0 or t.shape == (1,):
        return t.reshape(1).expand(batch)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(
            f"{name} must be a float or a tensor of shape [B] = [{batch}] matching x of shape "
            f"{tuple(x.shape)}; got shape {tuple(t.shape)}"
        )
    return t


def check_unit_interval(t: torch.Tensor, name: str = "t") -> None:
    """Raise ``ValueError`` if any entry of ``t`` lies outside ``[0, 1]`` or is not finite."""
    bad = ~((t >= 0) & (t <= 1))
    if bool(bad.any()):
        value = t[bad][0].item()
        raise ValueError(f"{name} must lie in [0, 1] (t=0 is data, t=1 is noise); got {name}={value}")


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a ``[B]`` time as ``[B, 1, ..., 1]`` so that it broadcasts against ``x`` of shape ``[B, ...]``."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))
