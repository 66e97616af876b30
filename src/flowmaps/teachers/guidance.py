"""Guided teachers (spec §7): classifier-free guidance and autoguidance on any teacher's velocity.

With the guidance scale ``w`` of diffusers' ``guidance_scale`` (``w = 1`` the conditional teacher,
``w = 0`` the unconditional one):

- classifier-free guidance (Ho & Salimans 2022), distilled at a fixed scale as in Meng et al. 2023,
  "On distillation of guided diffusion models": ``v_w(x, t, c) = v(x, t, None) + w (v(x, t, c) - v(x, t, None))``;
- autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): a
  weaker model of the same condition takes the unconditional one's place,
  ``v_w(x, t, c) = v_weak(x, t, c) + w (v(x, t, c) - v_weak(x, t, c))``.

The guided flow map ``F_w`` is the flow map of ``dx/dt = v_w``: the exact one for the exact
mixture teacher (``GaussianMixture.flow_map(..., guidance=w)``), otherwise the float64
Dormand-Prince solve of ``v_w`` (``flowmaps.oracle.integrate_dopri5``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from flowmaps.conditions import Condition, labels_of, scale_of
from flowmaps.nets.embeddings import NULL_CLASS
from flowmaps.oracle import integrate_dopri5
from flowmaps.teachers.base import ExactTeacher, Teacher
from flowmaps.time_args import TimeLike, as_batch_time, check_unit_interval, expand_like


def check_guidance_scale(w: float, where: str = "guidance scale") -> float:
    """``w`` as a float, refused (``ValueError`` naming ``where``) when it is NaN, infinite or negative."""
    w = float(w)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"{where} must be a finite number >= 0 (1: the conditional model, 0: the unconditional); "
                         f"got {w}")
    return w


class GuidedTeacher:
    """``teacher`` guided at scale ``scale`` (classifier-free guidance), or against ``weak`` (autoguidance).

    ``velocity(x, t, cond, guidance=None)`` returns ``v_w`` (module docstring); the scales of a
    ``Guided`` ``cond`` (a guidance-conditioned student's rows) or ``guidance`` (a ``[B]`` tensor)
    override the fixed scale per row. Rows without a label (``cond`` -1 or ``None``) get the
    unconditional velocity under classifier-free guidance. ``flow_map`` is ``F_w``."""

    def __init__(self, teacher: Teacher, scale: float, weak: Optional[Teacher] = None,
                 rtol: float = 1e-6, atol: float = 1e-7):
        for role, model in (("teacher", teacher), ("weak teacher", weak)):
            if model is not None and getattr(model, "num_classes", None) == 0:
                raise ValueError(f"guidance needs a class-conditional {role}; this one has no classes "
                                 "(train it with model.num_classes > 0)")
        self.teacher, self.weak = teacher, weak
        self.scale = check_guidance_scale(scale)
        self.rtol, self.atol = rtol, atol

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Condition = None,
                 guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        labels = labels_of(cond)
        given = guidance if guidance is not None else scale_of(cond)
        w = as_batch_time(self.scale if given is None else given, x, "guidance")
        conditional = self.teacher.velocity(x, t, labels)
        if self.weak is not None:
            base = self.weak.velocity(x, t, labels)
        elif labels is None:
            return conditional
        else:
            base = self.teacher.velocity(x, t, torch.full_like(labels, NULL_CLASS))
        return base + expand_like(w, x) * (conditional - base)

    def flow_map(self, x: torch.Tensor, s: TimeLike, t: TimeLike, cond: Condition = None) -> torch.Tensor:
        if isinstance(self.teacher, ExactTeacher) and self.weak is None:
            w = scale_of(cond)
            return self.teacher.flow_map(x, s, t, labels_of(cond), guidance=self.scale if w is None else w)
        x64 = x.to(torch.float64)
        sb, tb = as_batch_time(s, x64, "s"), as_batch_time(t, x64, "t")
        check_unit_interval(sb, "s")
        check_unit_interval(tb, "t")
        gap = expand_like(tb - sb, x)

        def rhs(tau: float, y: torch.Tensor) -> torch.Tensor:
            v = self.velocity(y.to(x.dtype), (sb + tau * (tb - sb)).to(x.dtype), cond)
            return gap * v.to(torch.float64)

        return integrate_dopri5(rhs, x64, rtol=self.rtol, atol=self.atol).to(x.dtype)


__all__ = ["GuidedTeacher", "check_guidance_scale"]
