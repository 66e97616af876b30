"""Exact answers for Gaussian and Gaussian-mixture data (spec §6).

For ``x_0 ~ N(mu, diag(c^2))`` and ``x_t = alpha_t x_0 + sigma_t eps``, ``x_t ~ N(alpha_t mu, q_t)``
per dimension with ``q_t = alpha_t^2 c^2 + sigma_t^2``, and the flow map is affine:

    F(x, s, t) = alpha_t mu + sqrt(q_t / q_s) (x - alpha_s mu),
    v(x, t)    = alpha'_t mu + (q'_t / (2 q_t)) (x - alpha_t mu),   q' = 2 (alpha alpha' c^2 + sigma sigma').

For a mixture ``sum_k w_k N(mu_k, diag(c_k^2))`` the marginal velocity is
``v(x, t) = sum_k P(k | x_t = x) v_k(x, t)`` with the posterior weights of the components'
marginals ``N(alpha_t mu_k, q_{k,t})``; the denoiser is ``E[x_0 | x_t] = sum_k P(k | x) E_k[x_0 | x]``
with ``E_k[x_0 | x] = mu_k + alpha_t c_k^2 (x - alpha_t mu_k) / q_{k,t}``. The exact flow map of a
mixture is that ODE solved in float64 with an adaptive Dormand-Prince 5(4) integrator.
All computations run in float64; results are returned in the input's dtype.

A labelled mixture gives each component a class (spec §7). Its class-conditional velocity
``v(x, t, c)`` is the velocity of the mixture over class ``c``'s components with their weights
renormalised within the class, i.e. the posterior weights restricted to those components and
renormalised; a row whose label is ``NULL_LABEL`` (-1) gets the unconditional velocity.

Guidance (spec §7, diffusers' ``guidance_scale``): ``v_w(x, t, c) = v(x, t, None) + w (v(x, t, c) -
v(x, t, None))``, ``w = 1`` the conditional velocity, ``w = 0`` the unconditional one; the guided
flow map ``F_w`` is the flow map of ``dx/dt = v_w``. Both take ``guidance=w`` (a float or a ``[B]``
tensor, ``w >= 0``).

Posteriors (spec §9): with a measurement ``y = A x_0 + n``, ``n ~ N(0, s_y^2 I)``, the posterior of
a mixture prior is the full-covariance mixture ``PosteriorMixture`` (``GaussianMixture.posterior``):
``Sigma'_k = (Sigma_k^-1 + A^T A / s_y^2)^-1``, ``mu'_k = Sigma'_k (Sigma_k^-1 mu_k + A^T y / s_y^2)``,
``w'_k ∝ w_k N(y; A mu_k, A Sigma_k A^T + s_y^2 I)``; a quadratic reward ``lambda r(x) = -lambda |B x -
b|^2 / 2`` tilts the prior into the same formula with ``A = B``, ``y = b``, ``s_y^2 = 1 / lambda``
(``GaussianMixture.tilted``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from flowmaps.conditions import check_scales
from flowmaps.schedules import LinearSchedule, Schedule
from flowmaps.time_args import TimeLike, as_batch_time, check_unit_interval

ArrayLike = Sequence | torch.Tensor

NULL_LABEL = -1  # the label of "no class" (``flowmaps.nets.NULL_CLASS``): that row is unconditional


class GaussianMixture:
    """``sum_k w_k N(mu_k, diag(c_k^2))`` with exact velocity, denoiser, samples and flow map.

    ``weights`` ``[K]`` (normalised here), ``means`` ``[K, D]``, ``stds`` ``[K, D]`` (or ``[K]`` /
    a scalar for isotropic components), all positive. ``labels`` ``[K]`` (optional) gives each
    component a class; the classes are ``0 .. num_classes - 1`` and each has at least one component.
    """

    def __init__(self, weights: ArrayLike, means: ArrayLike, stds: ArrayLike, schedule: Schedule | None = None,
                 labels: ArrayLike | None = None):
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        mu = torch.as_tensor(means, dtype=torch.float64)
        if mu.dim() == 1:
            mu = mu[:, None]
        if mu.dim() != 2 or mu.shape[0] != w.shape[0]:
            raise ValueError(f"means must have shape [K, D] with K = {w.shape[0]} weights; got {tuple(mu.shape)}")
        c = torch.as_tensor(stds, dtype=torch.float64)
        c = c.reshape(-1, 1) if c.dim() == 1 and c.shape[0] == mu.shape[0] else c
        try:
            c = torch.broadcast_to(c, mu.shape).clone()
        except RuntimeError as err:
            raise ValueError(f"stds of shape {tuple(c.shape)} do not fit means of shape {tuple(mu.shape)}") from err
        if not bool((w > 0).all()) or not bool(torch.isfinite(w).all()):
            raise ValueError(f"mixture weights must be positive and finite; got {w.tolist()}")
        if not bool((c > 0).all()) or not bool(torch.isfinite(c).all()):
            raise ValueError("mixture standard deviations must be positive and finite")
        if not bool(torch.isfinite(mu).all()):
            raise ValueError("mixture means must be finite")
        self.weights = w / w.sum()
        self.means = mu
        self.stds = c
        self.schedule = schedule if schedule is not None else LinearSchedule()
        self.labels = None if labels is None else _check_component_labels(labels, w.shape[0])

    def with_schedule(self, schedule: Schedule) -> GaussianMixture:
        """The same data distribution under another noise schedule (velocity and flow map change with it)."""
        return GaussianMixture(self.weights, self.means, self.stds, schedule, self.labels)

    def conditional(self, c: int) -> GaussianMixture:
        """The (unlabelled) mixture of class ``c``'s components, their weights renormalised (spec §7)."""
        if self.labels is None:
            raise ValueError(f"this mixture has no labels, so it has no class {c}")
        if not 0 <= c < self.num_classes:
            raise ValueError(f"class {c} is out of range: this mixture's classes are 0 .. {self.num_classes - 1}")
        members = self.labels == c
        return GaussianMixture(self.weights[members], self.means[members], self.stds[members], self.schedule)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.weights.shape[0]

    @property
    def num_classes(self) -> int:
        """The number of classes (``max(labels) + 1``); 0 for an unlabelled mixture."""
        return 0 if self.labels is None else int(self.labels.max()) + 1

    def _params(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.weights.to(device), self.means.to(device), self.stds.to(device)

    # ----- sampling -------------------------------------------------------------------------
    def sample(
        self, n: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu",
        return_labels: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``n`` exact samples of ``x_0`` (float32), drawn with ``generator``; with ``return_labels``
        also the ``[n]`` int64 classes of the components they were drawn from (a labelled mixture only)."""
        if return_labels and self.labels is None:
            raise ValueError("return_labels=True needs a labelled mixture; this one has no labels")
        w, mu, c = self._params(torch.device(device))
        k = torch.multinomial(w, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, device=device, dtype=torch.float64)
        x = (mu[k] + c[k] * z).float()
        return (x, self.labels.to(k.device)[k]) if return_labels else x

    def sample_xt(
        self, n: int, t: float, generator: torch.Generator | None = None, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """``n`` exact samples of the marginal at time ``t`` (``alpha_t x_0 + sigma_t eps``)."""
        x0 = self.sample(n, generator, device)
        eps = torch.randn(x0.shape, generator=generator, device=device)
        return self.schedule.sample_xt(x0, eps, t)

    # ----- marginal quantities ----------------------------------------------------------------
    def _component_stats(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None):
        """Per-component posterior log-weights ``[B, K]``, marginal variances ``[B, K, D]`` and coefficients.

        With ``cond`` (checked by ``_check_cond``) row ``i``'s posterior is restricted to the components
        of class ``cond[i]`` and renormalised; rows labelled ``NULL_LABEL`` keep every component.
        """
        w, mu, c = self._params(x.device)
        tt = t[:, None, None]
        sch = self.schedule
        a, s, da, ds = sch.alpha(tt), sch.sigma(tt), sch.d_alpha(tt), sch.d_sigma(tt)
        q = a**2 * c[None] ** 2 + s**2  # [B, K, D]
        diff = x[:, None, :] - a * mu[None]  # [B, K, D]
        log_norm = -0.5 * (diff**2 / q + torch.log(2 * torch.pi * q)).sum(-1)
        log_post = torch.log(w)[None] + log_norm
        if cond is not None:
            labels = self.labels.to(x.device)
            allowed = (labels[None] == cond[:, None]) | (cond[:, None] == NULL_LABEL)  # [B, K]
            log_post = log_post.masked_fill(~allowed, -torch.inf)
        log_post = log_post - torch.logsumexp(log_post, dim=1, keepdim=True)
        return log_post, q, diff, a, s, da, ds, mu, c

    def velocity(self, x: torch.Tensor, t: TimeLike, cond: torch.Tensor | None = None,
                 guidance: TimeLike | None = None) -> torch.Tensor:
        """The exact velocity ``v(x, t) = E[alpha' x_0 + sigma' eps | x_t = x]``; with ``cond`` (``[B]``
        class labels, ``NULL_LABEL`` for none) row ``i``'s is conditioned on class ``cond[i]``; with
        ``guidance`` ``w`` it is the guided ``v_w = v(x, t, None) + w (v(x, t, c) - v(x, t, None))``."""
        x64, t64 = self._inputs(x, t)
        labels = self._check_cond(cond, x64)
        return self._guided_velocity(x64, t64, labels, self._check_guidance(guidance, cond, x64)).to(x.dtype)

    def _guided_velocity(self, x64: torch.Tensor, t64: torch.Tensor, labels: torch.Tensor | None,
                         w: torch.Tensor | None) -> torch.Tensor:
        if w is None or labels is None:
            return self._velocity(x64, t64, labels)
        unconditional = self._velocity(x64, t64, None)
        return unconditional + w[:, None] * (self._velocity(x64, t64, labels) - unconditional)

    def _check_guidance(self, guidance: TimeLike | None, cond: torch.Tensor | None,
                        x64: torch.Tensor) -> torch.Tensor | None:
        """``guidance`` as a ``[B]`` float64 tensor of finite scales ``w >= 0`` (``None``: unguided)."""
        if guidance is None:
            return None
        if self.labels is None or cond is None:
            raise ValueError("guidance needs class labels: a labelled mixture and cond (v_w mixes the conditional "
                             "and the unconditional velocity)")
        w = as_batch_time(guidance, x64, "guidance")
        check_scales(w)
        return w

    def _velocity(self, x64: torch.Tensor, t64: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        log_post, q, diff, a, s, da, ds, mu, c = self._component_stats(x64, t64, cond)
        dq = 2 * (a * da * c[None] ** 2 + s * ds)
        v_k = da * mu[None] + dq / (2 * q) * diff
        return (log_post.exp()[..., None] * v_k).sum(1)

    def denoiser(self, x: torch.Tensor, t: TimeLike, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The exact denoiser ``E[x_0 | x_t = x]`` (given class ``cond[i]`` in row ``i``, as ``velocity``)."""
        x64, t64 = self._inputs(x, t)
        log_post, q, diff, a, _, _, _, mu, c = self._component_stats(x64, t64, self._check_cond(cond, x64))
        f_k = mu[None] + a * c[None] ** 2 * diff / q
        return (log_post.exp()[..., None] * f_k).sum(1).to(x.dtype)

    def log_density(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """``log p_t(x)`` of the marginal at time ``t``, ``[B]``."""
        x64, t64 = self._inputs(x, t)
        w, mu, c = self._params(x64.device)
        tt = t64[:, None, None]
        a, s = self.schedule.alpha(tt), self.schedule.sigma(tt)
        q = a**2 * c[None] ** 2 + s**2
        diff = x64[:, None, :] - a * mu[None]
        log_norm = -0.5 * (diff**2 / q + torch.log(2 * torch.pi * q)).sum(-1)
        return torch.logsumexp(torch.log(w)[None] + log_norm, dim=1).to(x.dtype)

    def _inputs(self, x: torch.Tensor, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        x64 = self._float64(x)
        return x64, as_batch_time(t, x64)

    def _float64(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected x of shape [B, {self.dim}] for this mixture; got {tuple(x.shape)}")
        return x.to(torch.float64)

    def _check_cond(self, cond: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        """``cond`` as a ``[B]`` int64 tensor on ``x``'s device whose labels are classes of this mixture
        or ``NULL_LABEL``; ``None`` when it is ``None`` or every row is unconditional."""
        if cond is None:
            return None
        if cond.shape != (x.shape[0],) or cond.dtype.is_floating_point or cond.dtype.is_complex:
            raise ValueError(f"cond must be a [B] = [{x.shape[0]}] integer tensor of class labels; "
                             f"got {cond.dtype} of shape {tuple(cond.shape)}")
        cond = cond.to(device=x.device, dtype=torch.int64)
        unconditional = cond == NULL_LABEL
        if bool(unconditional.all()):
            return None
        bad = ~unconditional & ((cond < 0) | (cond >= self.num_classes))
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            classes = (f"its classes are 0 .. {self.num_classes - 1}" if self.labels is not None
                       else "it has no labels")
            raise ValueError(f"cond[{row}] = {int(cond[row])} is not a class of this mixture ({classes}) "
                             f"nor the null label {NULL_LABEL}")
        return cond

    # ----- posteriors (spec §9) ------------------------------------------------------------------
    def posterior(self, operator: ArrayLike, measurement: ArrayLike, noise_std: float) -> PosteriorMixture:
        """The exact posterior ``p(x_0 | y)`` for ``y = A x_0 + n``, ``n ~ N(0, noise_std^2 I)``: ``A`` is
        ``[M, D]`` and ``y`` ``[M]``; ``noise_std`` must be positive and finite."""
        a = torch.as_tensor(operator, dtype=torch.float64)
        y = torch.as_tensor(measurement, dtype=torch.float64).flatten()
        if a.dim() != 2 or a.shape[1] != self.dim:
            raise ValueError(f"the operator must be a [M, {self.dim}] matrix for this mixture; got {tuple(a.shape)}")
        if y.shape[0] != a.shape[0]:
            raise ValueError(f"the measurement has {y.shape[0]} entries but the operator has {a.shape[0]} rows")
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(y).all())):
            raise ValueError("the operator and the measurement must be finite")
        check_noise_std(noise_std)
        var = float(noise_std) ** 2
        prior_cov = torch.diag_embed(self.stds**2)  # [K, D, D]
        precision = torch.diag_embed(self.stds**-2) + (a.T @ a / var)[None]
        cov = torch.linalg.inv(precision)
        cov = (cov + cov.transpose(1, 2)) / 2
        mean = (cov @ (self.means / self.stds**2 + (a.T @ y / var)[None])[..., None])[..., 0]
        evidence = torch.distributions.MultivariateNormal(
            self.means @ a.T, a[None] @ prior_cov @ a.T[None] + var * torch.eye(a.shape[0], dtype=torch.float64))
        log_w = torch.log(self.weights) + evidence.log_prob(y[None])
        return PosteriorMixture(torch.softmax(log_w, 0), mean, cov, torch.logsumexp(log_w, 0).item())

    def tilted(self, matrix: ArrayLike, target: ArrayLike, strength: float) -> PosteriorMixture:
        """The prior tilted by a quadratic reward, ``p(x) exp(-strength |B x - b|^2 / 2)`` normalised:
        the posterior with ``A = B``, ``y = b`` and ``s_y = 1 / sqrt(strength)`` (spec §9)."""
        return self.posterior(matrix, target, 1.0 / math.sqrt(check_noise_std(strength, "the tilt strength")))

    # ----- flow map ---------------------------------------------------------------------------
    def flow_map(self, x: torch.Tensor, s: TimeLike, t: TimeLike, cond: torch.Tensor | None = None,
                 rtol: float = 1e-9, atol: float = 1e-10, guidance: TimeLike | None = None) -> torch.Tensor:
        """The exact ``F(x, s, t)`` (given class ``cond[i]`` in row ``i`` and guided by ``guidance``, as
        ``velocity``): the probability-flow ODE of that velocity solved from ``s`` to ``t`` in float64.

        Times may differ per example: the ODE is integrated in ``tau in [0, 1]`` with
        ``time = s + tau (t - s)`` and ``dx/dtau = (t - s) v(x, time)``.
        """
        x64 = self._float64(x)
        sb, tb = as_batch_time(s, x64, "s"), as_batch_time(t, x64, "t")
        check_unit_interval(sb, "s")
        check_unit_interval(tb, "t")
        labels = self._check_cond(cond, x64)
        w = self._check_guidance(guidance, cond, x64)
        gap = (tb - sb)[:, None]

        def rhs(tau: float, y: torch.Tensor) -> torch.Tensor:
            return gap * self._guided_velocity(y, sb + tau * (tb - sb), labels, w)

        return integrate_dopri5(rhs, x64, rtol=rtol, atol=atol).to(x.dtype)


def check_noise_std(noise_std: float, name: str = "the noise std") -> float:
    """``noise_std`` as a float if it is a positive finite number; otherwise ``ValueError`` naming ``name``."""
    if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not (
            math.isfinite(noise_std) and noise_std > 0):
        raise ValueError(f"{name} must be a positive finite number; got {noise_std!r}")
    return float(noise_std)


@dataclass(frozen=True)
class PosteriorMixture:
    """``sum_k w_k N(mu_k, Sigma_k)`` with full covariances: an exact posterior or tilted prior (spec §9).

    ``weights`` ``[K]``, ``means`` ``[K, D]``, ``covariances`` ``[K, D, D]`` (float64);
    ``log_evidence`` is ``log p(y)`` (for a tilt, ``log E_prior[exp(lambda r)]`` up to the Gaussian
    normaliser ``(2 pi / lambda)^(M/2)``).
    """

    weights: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor
    log_evidence: float

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _components(self) -> torch.distributions.MultivariateNormal:
        return torch.distributions.MultivariateNormal(self.means, self.covariances)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact samples ``[n, D]`` (float32), drawn with ``generator`` (on the CPU)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covariances)
        return (self.means[k] + (chol[k] @ z[..., None])[..., 0]).float()

    def mean(self) -> torch.Tensor:
        """``E[x]`` ``[D]``."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """``Cov[x]`` ``[D, D]``: the mean within-component covariance plus the covariance of the means."""
        centred = self.means - self.mean()
        return (self.weights[:, None, None] * (self.covariances + centred[:, :, None] * centred[:, None, :])).sum(0)

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` ``[B]`` for ``x`` ``[B, D]``."""
        log_k = self._components().log_prob(x.to(torch.float64)[:, None, :])
        return torch.logsumexp(torch.log(self.weights) + log_k, dim=1).to(x.dtype)


def _check_component_labels(labels: ArrayLike, num_components: int) -> torch.Tensor:
    """``labels`` as a ``[K]`` int64 tensor of classes ``0 .. C - 1``, each the class of some component."""
    tensor = torch.as_tensor(labels)
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise ValueError(f"mixture labels must be integers (one class per component); got {tensor.tolist()}")
    if tensor.shape != (num_components,):
        raise ValueError(f"mixture labels must have shape [K] = [{num_components}] (one class per component); "
                         f"got shape {tuple(tensor.shape)}")
    tensor = tensor.to(torch.int64)
    if bool((tensor < 0).any()):
        k = int((tensor < 0).nonzero()[0, 0])
        raise ValueError(f"mixture labels must be >= 0; component {k} has label {int(tensor[k])}")
    empty = sorted(set(range(int(tensor.max()) + 1)) - set(tensor.tolist()))
    if empty:
        raise ValueError(f"mixture labels must use every class 0 .. {int(tensor.max())}; class(es) {empty} "
                         "have no component")
    return tensor


class Gaussian(GaussianMixture):
    """A single Gaussian ``N(mu, diag(c^2))``, whose flow map and velocity are in closed form."""

    def __init__(self, mean: ArrayLike, std: ArrayLike, schedule: Schedule | None = None):
        mu = torch.as_tensor(mean, dtype=torch.float64).flatten()
        c = torch.broadcast_to(torch.as_tensor(std, dtype=torch.float64), mu.shape)
        super().__init__([1.0], mu[None], c[None], schedule)

    def with_schedule(self, schedule: Schedule) -> Gaussian:
        return Gaussian(self.means[0], self.stds[0], schedule)

    def flow_map(self, x: torch.Tensor, s: TimeLike, t: TimeLike, cond: torch.Tensor | None = None,
                 rtol: float = 0.0, atol: float = 0.0, guidance: TimeLike | None = None) -> torch.Tensor:
        """``F(x, s, t) = alpha_t mu + sqrt(q_t / q_s) (x - alpha_s mu)`` (exact; tolerances unused).
        A single Gaussian has no classes: ``cond`` may only hold ``NULL_LABEL`` and it takes no guidance."""
        x64 = x.to(torch.float64)
        sb, tb = as_batch_time(s, x64, "s"), as_batch_time(t, x64, "t")
        check_unit_interval(sb, "s")
        check_unit_interval(tb, "t")
        self._check_cond(cond, x64)
        self._check_guidance(guidance, cond, x64)
        mu, c = self.means[0].to(x.device), self.stds[0].to(x.device)
        sch = self.schedule

        def q(time: torch.Tensor) -> torch.Tensor:
            return sch.alpha(time)[:, None] ** 2 * c**2 + sch.sigma(time)[:, None] ** 2

        a_s, a_t = sch.alpha(sb)[:, None], sch.alpha(tb)[:, None]
        return (a_t * mu + torch.sqrt(q(tb) / q(sb)) * (x64 - a_s * mu)).to(x.dtype)


# Dormand-Prince 5(4) tableau.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def integrate_dopri5(rhs, y0: torch.Tensor, rtol: float = 1e-9, atol: float = 1e-10, max_steps: int = 100_000) -> torch.Tensor:
    """Integrate ``dy/dtau = rhs(tau, y)`` from ``tau = 0`` to ``1`` with adaptive Dormand-Prince 5(4).

    The step is controlled by the worst example's error norm, so every example meets the tolerance.
    """
    tau, h, y = 0.0, 1e-2, y0
    k1 = rhs(tau, y)
    for _ in range(max_steps):
        if tau >= 1.0 - 1e-14:
            return y
        h = min(h, 1.0 - tau)
        ks = [k1]
        for i in range(1, 7):
            yi = y + h * sum(a * k for a, k in zip(_A[i], ks))
            ks.append(rhs(tau + _C[i] * h, yi))
        y5 = y + h * sum(b * k for b, k in zip(_B5, ks))
        y4 = y + h * sum(b * k for b, k in zip(_B4, ks))
        scale = atol + rtol * torch.maximum(y.abs(), y5.abs())
        err = ((y5 - y4) / scale).pow(2).mean(dim=tuple(range(1, y.dim()))).sqrt().max().item()
        if err <= 1.0:
            tau, y, k1 = tau + h, y5, ks[6]
        h = h * min(5.0, max(0.2, 0.9 * (err + 1e-16) ** -0.2))
    raise RuntimeError(f"Dormand-Prince integration did not finish within {max_steps} steps")


class ExactAverageVelocity(nn.Module):
    """A backbone that returns the exact average velocity ``V(x, s, t) = (F(x, s, t) - x) / (t - s)``.

    Wrapped in a ``FlowMap`` it is the true flow map of ``target``: samplers handed it must reproduce
    the exact map and every loss must vanish at it. On the diagonal (``|t - s| < 1e-6``) it returns the
    exact velocity ``v(x, t)``. Differentiable in ``x``, ``s`` and ``t`` (closed form for a
    ``Gaussian``; through the float64 integrator for a mixture).
    """

    def __init__(self, target: GaussianMixture, diagonal_tol: float = 1e-6):
        super().__init__()
        self.target = target
        self.diagonal_tol = diagonal_tol

    def forward(
        self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        gap = (t - s)[:, None]
        on_diagonal = gap.abs() < self.diagonal_tol
        if bool(on_diagonal.all()):  # the ODE sampler's calls: no flow map to integrate
            return self.target.velocity(x, t, cond)
        safe_gap = torch.where(on_diagonal, torch.ones_like(gap), gap)
        average = (self.target.flow_map(x, s, t, cond) - x) / safe_gap
        return torch.where(on_diagonal, self.target.velocity(x, t, cond), average)
