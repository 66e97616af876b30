"""Low-variance diagonal targets: the exact velocity of the batch's empirical data distribution.

Flow matching regresses ``V(x_t, t, t)`` on the conditional velocity ``alpha'(t) x_0 + sigma'(t) eps``,
whose variance around the marginal velocity ``v(x_t, t) = E[alpha' x_0 + sigma' eps | x_t]`` is large
at high noise, where ``x_t`` says little about which ``x_0`` it came from. The stable target field
(Xu, Tong & Jaakkola 2023, "Stable Target Field for Reduced Variance Score Estimation in
Diffusion Models", arXiv 2302.00670) replaces the conditional target by the posterior mean over a
reference set ``{x_0^j}`` of data points that contains the example's own ``x_0``:

    w_j(x_t) = softmax_j( -|x_t - alpha(t) x_0^j|^2 / (2 sigma(t)^2) )
    m(x_t)   = sum_j w_j x_0^j                                   (estimate of E[x_0 | x_t])
    target   = alpha'(t) m + sigma'(t) (x_t - alpha(t) m) / sigma(t)

which is the exact marginal velocity of the empirical distribution of the references. Here the
references are the data rows of the training batch. At low noise the weights collapse onto the own
``x_0`` and the target is the conditional one; at high noise it averages over the batch. The estimate
is consistent (its bias vanishes as the reference set grows) and its variance is far below the
conditional target's; class-conditional batches weigh only references of the same class (rows of
the null class, all of them).
"""

from __future__ import annotations

from typing import Optional

import torch

from flowmaps.schedules import Schedule

DIAGONAL_TARGETS = ("conditional", "batch_posterior")


def empirical_velocity(
    schedule: Schedule,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    references: torch.Tensor,
    cond: Optional[torch.Tensor] = None,
    reference_cond: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The marginal velocity at ``x_t = alpha(t) x0 + sigma(t) eps`` of the empirical distribution of
    ``references`` (the module docstring's formula).

    ``x0``, ``eps``: ``[B, ...]``, ``t``: ``[B]``, ``references``: ``[N, ...]`` data points. With
    ``cond`` and ``reference_cond`` (class labels ``[B]`` and ``[N]``) row ``i`` averages only over the
    references of its own class; a row of the null class -1 (label dropout: the unconditional model)
    averages over every reference, whose empirical distribution is the unconditional one. Evaluated as
    the conditional target plus a correction, ``alpha' x0 + sigma' eps + (alpha' - sigma' alpha /
    sigma)(m - x0)``, which is the same quantity but needs no division of ``x_t - alpha m`` by a small
    ``sigma``: at low noise, where ``m = x0``, it is the conditional target exactly. Computed in
    float32 or wider.
    """
    if references.shape[1:] != x0.shape[1:]:
        raise ValueError(f"references of shape {tuple(references.shape)} do not match x0 of shape {tuple(x0.shape)}")
    if (cond is None) != (reference_cond is None):
        raise ValueError("give class labels for both the rows and the references, or for neither")
    dtype = torch.promote_types(x0.dtype, torch.float32)
    x0_, eps_, ref = (v.reshape(v.shape[0], -1).to(dtype) for v in (x0, eps, references))
    t = t.to(dtype)
    alpha, sigma = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
    d_alpha, d_sigma = schedule.d_alpha(t)[:, None], schedule.d_sigma(t)[:, None]
    x_t = alpha * x0_ + sigma * eps_
    # -|x_t - alpha r_j|^2 / (2 sigma^2) up to a per-row constant (|x_t|^2 cancels in the softmax)
    scale = 2 * sigma.clamp(min=1e-12) ** 2
    logits = (2 * alpha * (x_t @ ref.T) - alpha**2 * ref.pow(2).sum(1)[None]) / scale
    if cond is not None:
        rows = cond.reshape(-1, 1)
        same = (rows == reference_cond.reshape(1, -1)) | (rows < 0)
        logits = logits.masked_fill(~same, float("-inf"))
    mean_x0 = torch.softmax(logits, dim=1) @ ref
    correction = torch.where(sigma > 0, d_alpha - d_sigma * alpha / sigma, torch.zeros_like(sigma))
    velocity = d_alpha * x0_ + d_sigma * eps_ + correction * (mean_x0 - x0_)
    return velocity.reshape(x0.shape).to(x0.dtype)


def check_diagonal_target(name: str, method: str) -> str:
    """``name`` if it is one of ``DIAGONAL_TARGETS``, else a ``ValueError`` naming ``method``."""
    if name not in DIAGONAL_TARGETS:
        raise ValueError(f"unknown diagonal_target {name!r} of method {method!r}; choose one of {DIAGONAL_TARGETS}")
    return name


def diagonal_velocity_target(
    name: str,
    schedule: Schedule,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    cond: Optional[torch.Tensor],
    references: torch.Tensor,
    reference_cond: Optional[torch.Tensor],
) -> torch.Tensor:
    """The diagonal's regression target: ``"conditional"``, ``alpha' x0 + sigma' eps``, or
    ``"batch_posterior"``, the empirical velocity of ``references`` (the training batch)."""
    if name == "batch_posterior":
        return empirical_velocity(schedule, x0, eps, t, references, cond, reference_cond)
    return schedule.conditional_velocity(x0, eps, t)


__all__ = ["DIAGONAL_TARGETS", "check_diagonal_target", "diagonal_velocity_target", "empirical_velocity"]
