"""Rewards ``r(x0, cond) -> [B]`` on clean samples, which steering tilts the model's distribution by:
the target is ``p(x0 | cond) exp(r(x0, cond))`` (spec §9).

- ``LinearGaussianLikelihood``: ``log N(y; A x0, s^2 I)`` up to a constant, ``-|A x0 - y|^2 / (2 s^2)``:
  the target is then the posterior of an inverse problem.
- ``QuadraticReward``: ``-lambda |B x0 - b|^2 / 2`` (a tilt of strength ``lambda``; spec §9).
- ``ClassifierReward``: ``scale * log softmax(classifier(x0))[k]``, the in-project image classifier's
  log-probability of class ``k``.
- ``CallableReward``: any Python function of ``(x0, cond)``.

``evaluate_reward`` checks what a reward returns: a ``[B]`` tensor of finite numbers, with a gradient
when the sampler needs one; anything else is a ``RewardError`` that names the reward.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch
import torch.nn.functional as nnf
from torch import nn

from flowmaps.conditions import Condition, labels_of
from flowmaps.oracle import check_noise_std
from flowmaps.steering.operators import LinearOperator, MatrixOperator


class RewardError(ValueError):
    """A reward that returned the wrong shape, a non-finite value or no gradient."""


class Reward(Protocol):
    """``r(x0, cond) -> [B]``; differentiable in ``x0`` for the gradient-based samplers."""

    name: str

    def __call__(self, x0: torch.Tensor, cond: Condition = None) -> torch.Tensor: ...


class LinearGaussianLikelihood:
    """``r(x0) = -|A x0 - y|^2 / (2 s^2)``: the log-likelihood of ``y = A x0 + n``, ``n ~ N(0, s^2 I)``,
    up to its constant. ``measurement`` is one measurement (``A``'s output shape for one sample)."""

    name = "likelihood"

    def __init__(self, operator: LinearOperator, measurement: torch.Tensor, noise_std: float,
                 shape: tuple[int, ...]):
        operator.check_shape(tuple(shape))
        expected = operator.out_shape(tuple(shape))
        y = torch.as_tensor(measurement, dtype=torch.float32)
        if y.numel() != torch.Size(expected).numel():
            raise RewardError(f"the measurement has {y.numel()} numbers (shape {list(y.shape)}) but the operator "
                              f"measures {list(expected)} of a sample of shape {list(shape)}")
        if not bool(torch.isfinite(y).all()):
            raise RewardError("the measurement has non-finite entries")
        self.operator, self.y, self.shape = operator, y.reshape(expected), tuple(shape)
        self.noise_std = check_noise_std(noise_std)

    def residual(self, x0: torch.Tensor) -> torch.Tensor:
        """``A x0 - y`` ``[B, *out]``."""
        return self.operator(x0) - self.y.to(device=x0.device, dtype=x0.dtype)

    def __call__(self, x0: torch.Tensor, cond: Condition = None) -> torch.Tensor:
        return -0.5 * self.residual(x0).pow(2).flatten(1).sum(1) / self.noise_std**2

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A [M, D], y [M], s)`` in float64, for the exact posterior (``GaussianMixture.posterior``)."""
        return self.operator.matrix(self.shape), self.y.double().flatten(), self.noise_std


class QuadraticReward(LinearGaussianLikelihood):
    """``r(x0) = -lambda |B x0 - b|^2 / 2`` (``lambda = strength``): the likelihood with ``A = B``, ``y = b``,
    ``s = 1 / sqrt(lambda)`` (spec §9)."""

    name = "quadratic"

    def __init__(self, matrix: torch.Tensor, target: torch.Tensor, strength: float, shape: tuple[int, ...]):
        check_noise_std(strength, "the quadratic reward's strength")
        super().__init__(MatrixOperator(matrix), target, strength**-0.5, shape)


class ClassifierReward:
    """``r(x0) = scale * log p_classifier(k | x0)`` for a classifier ``x0 -> logits [B, C]``; ``label``
    is one class ``k`` for every row, or ``None`` to take each row's class from ``cond``."""

    name = "classifier"

    def __init__(self, classifier: nn.Module, label: Optional[int], scale: float = 1.0,
                 num_classes: Optional[int] = None):
        if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0 or (
                num_classes is not None and label >= num_classes)):
            raise RewardError(f"the classifier reward's class must be one of 0 .. {(num_classes or 1) - 1}; "
                              f"got {label!r}")
        check_noise_std(scale, "the classifier reward's scale")
        self.classifier, self.label, self.scale = classifier, label, float(scale)

    def __call__(self, x0: torch.Tensor, cond: Condition = None) -> torch.Tensor:
        logp = nnf.log_softmax(self.classifier(x0).float(), dim=1)
        if self.label is not None:
            return self.scale * logp[:, self.label]
        labels = labels_of(cond)
        if labels is None:
            raise RewardError("the classifier reward has no class: give one (classifier:K) or labelled conditions")
        return self.scale * logp.gather(1, labels.to(logp.device).long()[:, None])[:, 0]


class CallableReward:
    """Any function ``fn(x0, cond) -> [B]``."""

    def __init__(self, fn: Callable[[torch.Tensor, Condition], torch.Tensor], name: str = "callable"):
        if not callable(fn):
            raise RewardError(f"a reward must be callable; got {type(fn).__name__}")
        self.fn, self.name = fn, name

    def __call__(self, x0: torch.Tensor, cond: Condition = None) -> torch.Tensor:
        return self.fn(x0, cond)


def evaluate_reward(reward: Reward, x0: torch.Tensor, cond: Condition = None,
                    need_grad: bool = False) -> torch.Tensor:
    """``reward(x0, cond)`` checked: a ``[B]`` float tensor of finite values, differentiable in ``x0`` when
    ``need_grad``; otherwise a ``RewardError`` naming the reward and the fault."""
    name = getattr(reward, "name", type(reward).__name__)
    values = reward(x0, cond)
    if not isinstance(values, torch.Tensor) or values.shape != (x0.shape[0],):
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise RewardError(f"the reward {name!r} must return one value per sample, shape [{x0.shape[0]}]; got {got}")
    if not values.dtype.is_floating_point:
        raise RewardError(f"the reward {name!r} returned {values.dtype} values; it must return floats")
    bad = ~torch.isfinite(values.detach())
    if bool(bad.any()):
        raise RewardError(f"the reward {name!r} is not finite in {int(bad.sum())}/{values.numel()} samples "
                          f"(first: row {int(bad.nonzero()[0, 0])}, value {float(values.detach()[bad][0])})")
    if need_grad and not values.requires_grad:
        raise RewardError(f"the reward {name!r} has no gradient in x0, which this sampler follows; make it "
                          "differentiable or use best-of-n / smc without gradients (eta=0)")
    return values
