"""Teachers written in other conventions, converted at the edge to ``v(x, t, cond)`` (spec §8).

A foreign teacher lives on a Gaussian path ``x = a(tau) x_0 + b(tau) eps`` in its own time ``tau``
(a DDPM timestep, an EDM noise level, diffusers' flow-match timestep ``1000 sigma``, ...) and predicts
one of (``PREDICTIONS``):

- ``epsilon``: the noise, ``x0_hat = (x - b eps_hat) / a``;
- ``sample``: the data (an EDM denoiser ``D(x; sigma)``), ``eps_hat = (x - a x0_hat) / b``;
- ``v_prediction`` (Salimans & Ho 2022, "Progressive distillation"): ``v = a_n eps - b_n x_0`` on the
  variance-normalised path ``a_n, b_n = (a, b) / sqrt(a^2 + b^2)`` (``a^2 + b^2 = 1`` for a VP path),
  so ``x0_hat = a_n x_n - b_n v`` and ``eps_hat = b_n x_n + a_n v`` with ``x_n = x / sqrt(a^2 + b^2)``;
  this is diffusers' ``v_prediction`` for DDPM/DDIM and for ``EulerDiscreteScheduler``;
- ``flow``: the path's own velocity ``a' x_0 + b' eps`` in its flow time (only on the flow paths).

The paths (``PATHS``, each with its time variable):

- ``vp_linear``, ``vp_scaled_linear``, ``vp_cosine``: DDPM (Ho et al. 2020) with diffusers' beta
  schedules ``linear``, ``scaled_linear`` and ``squaredcos_cap_v2`` (``ddpm_betas``), ``alphas_cumprod =
  cumprod(1 - betas)``, ``a = sqrt(alphas_cumprod)``, ``b = sqrt(1 - alphas_cumprod)``; the time is the
  timestep ``0 .. N - 1``. The discrete table is made continuous by interpolating its log-SNR linearly
  between timesteps: a teacher of this path is called at fractional timesteps;
- ``ve``: variance exploding (Song et al. 2021), ``a = 1``, ``b = sigma in [sigma_min, sigma_max]``,
  the time is ``sigma``;
- ``edm``: Karras et al. 2022, ``a = 1``, ``b = sigma in [0.002, 80]``, the time is ``sigma``; its raw
  network takes EDM's preconditioning (``EDMPreconditioning``);
- ``rectified_flow``: diffusers' flow-match schedulers, ``x = (1 - sigma) x_0 + sigma eps``, the time is
  the timestep ``1000 sigma``, the flow output ``d x / d sigma = eps - x_0`` (our convention);
- ``flow_matching``: facebookresearch/flow_matching, ``x = t' x_0 + (1 - t') eps`` with ``t' = 0``
  noise, the time is ``t'``, the flow output ``d x / d t' = x_0 - eps``.

``ConventionTeacher`` adapts a callable ``fn(x_T, tau_T, cond)`` of such a teacher. For our time ``t``
(under our schedule, default linear) it (1) finds the teacher time ``tau_T`` with the same log-SNR
``log(a^2 / b^2) = log(alpha(t)^2 / sigma(t)^2)`` (closed form, or the inverse of the interpolated table
of a discrete path), (2) rescales the state, ``x_T = (a_T / alpha(t)) x = (b_T / sigma(t)) x`` (the
ratio with the larger denominator, so neither end divides by zero), (3) converts the teacher's output
to ``x0_hat, eps_hat`` and returns ``v = alpha'(t) x0_hat + sigma'(t) eps_hat``. A path that does not
reach every noise level (a DDPM table, EDM's sigma range) leaves our times outside ``exact_range``
clamped to its nearest end: the teacher is then called at its own least (or most) noisy time, and the
first such call logs a warning.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from typing import Callable, ClassVar, NamedTuple, Optional, Union

import torch
from torch import nn

from flowmaps.schedules import LinearSchedule, Schedule
from flowmaps.time_args import TimeLike, as_batch_time, check_unit_interval, expand_like

logger = logging.getLogger("flowmaps.teachers")

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_BISECTION_STEPS = 64  # halvings of [0, 1] for our time at a log-SNR: below float64 resolution
_CLAMP_NOTICE = 1e-9  # log-SNR beyond a path's range by more than this is reported (less is round-off)


def ddpm_betas(beta_schedule: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
               max_beta: float = 0.999) -> torch.Tensor:
    """diffusers' DDPM betas ``[N]`` (float64), written out:

    - ``linear``: ``beta_i = beta_start + (beta_end - beta_start) i / (N - 1)``;
    - ``scaled_linear``: ``beta_i = (sqrt(beta_start) + (sqrt(beta_end) - sqrt(beta_start)) i / (N - 1))^2``;
    - ``squaredcos_cap_v2`` (Nichol & Dhariwal 2021): ``beta_i = min(1 - abar((i + 1) / N) / abar(i / N),
      max_beta)`` with ``abar(u) = cos((u + 0.008) / 1.008 pi / 2)^2`` (``beta_start``, ``beta_end`` unused).
    """
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {beta_schedule!r}; choose one of {list(BETA_SCHEDULES)}")
    n = num_train_timesteps
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"num_train_timesteps must be an integer >= 2; got {num_train_timesteps!r}")
    if beta_schedule == "squaredcos_cap_v2":
        u = torch.arange(n + 1, dtype=torch.float64) / n
        alpha_bar = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.clamp(1 - alpha_bar[1:] / alpha_bar[:-1], max=max_beta)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2


class GaussianPath(ABC):
    """A teacher's path ``x = a(tau) x_0 + b(tau) eps`` in its own time ``tau``, located by its log-SNR
    ``lambda = log(a^2 / b^2)``, which decreases from data to noise."""

    name: str
    time_name: ClassVar[str]  # what the teacher's time is (timestep, sigma, t')
    flow_time: ClassVar[Optional[str]] = None  # the variable of its ``flow`` output; None: it has none

    @property
    @abstractmethod
    def time_range(self) -> tuple[float, float]:
        """The teacher's times ``(lowest, highest)``."""

    @property
    @abstractmethod
    def log_snr_range(self) -> tuple[float, float]:
        """The log-SNRs ``(lowest, highest)`` the path reaches (``-inf`` / ``inf`` when unbounded)."""

    @abstractmethod
    def log_snr(self, tau: torch.Tensor) -> torch.Tensor:
        """``lambda(tau)`` (float64)."""

    @abstractmethod
    def time_at_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        """The time ``tau`` with ``lambda(tau) = lam`` (float64), for ``lam`` within ``log_snr_range``."""

    @abstractmethod
    def coefficients(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``a(tau), b(tau)`` (float64)."""

    def flow_coefficients(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``d a / d u, d b / d u`` in the path's flow time ``u`` (``flow_time``)."""
        raise ValueError(f"the {self.name} path has no flow time, so a teacher on it cannot predict a flow velocity")

    def check_time(self, tau: torch.Tensor) -> None:
        """``ValueError`` unless every ``tau`` lies in ``time_range``."""
        lo, hi = self.time_range
        bad = ~((tau >= lo) & (tau <= hi))
        if bool(bad.any()):
            raise ValueError(f"the {self.name} path's {self.time_name} lies in [{lo:g}, {hi:g}]; got "
                             f"{tau[bad].flatten()[0].item():g}")


class DiscreteVPPath(GaussianPath):
    """A DDPM table ``alphas_cumprod[k]``, ``k = 0 .. N - 1``: ``a = sqrt(abar)``, ``b = sqrt(1 - abar)``
    (variance preserving), continuous in the timestep by linear interpolation of the log-SNR
    ``log(abar / (1 - abar))`` between timesteps (so fractional timesteps have a noise level)."""

    time_name = "timestep"

    def __init__(self, alphas_cumprod: Union[torch.Tensor, list[float]], name: str = "vp"):
        table = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if table.numel() < 2 or not bool(((table > 0) & (table < 1)).all()):
            raise ValueError(f"alphas_cumprod of the {name} path must hold at least two values in (0, 1) (no zero "
                             "terminal SNR)")
        lam = torch.log(table) - torch.log1p(-table)
        if not bool((lam[1:] < lam[:-1]).all()):
            raise ValueError(f"alphas_cumprod of the {name} path must decrease strictly with the timestep (every "
                             "beta > 0)")
        self.name = name
        self.alphas_cumprod = table
        self.table = lam

    @classmethod
    def from_betas(cls, betas: Union[torch.Tensor, list[float]], name: str = "vp") -> DiscreteVPPath:
        """The path of DDPM betas: ``alphas_cumprod = cumprod(1 - betas)``."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        return cls(torch.cumprod(1 - betas, dim=0), name)

    @property
    def time_range(self) -> tuple[float, float]:
        return 0.0, float(self.table.numel() - 1)

    @property
    def log_snr_range(self) -> tuple[float, float]:
        return float(self.table[-1]), float(self.table[0])

    def log_snr(self, tau: torch.Tensor) -> torch.Tensor:
        table = self.table.to(tau.device)
        tau = tau.to(torch.float64)
        i = torch.floor(tau).clamp(0, table.numel() - 2).long()
        w = tau - i
        return (1 - w) * table[i] + w * table[i + 1]

    def time_at_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        table = self.table.to(lam.device)
        above = torch.searchsorted(-table, -lam.contiguous())  # entries with a log-SNR above lam
        i = (above - 1).clamp(0, table.numel() - 2)
        return i + (table[i] - lam) / (table[i] - table[i + 1])

    def coefficients(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = self.log_snr(tau)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


class VEPath(GaussianPath):
    """Variance exploding: ``x = x_0 + sigma eps``, ``sigma in [sigma_min, sigma_max]``; the time is ``sigma``."""

    time_name = "sigma"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, name: str = "ve"):
        if not (0 < sigma_min < sigma_max < math.inf):
            raise ValueError(f"the {name} path needs 0 < sigma_min < sigma_max < inf; got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max, self.name = float(sigma_min), float(sigma_max), name

    @property
    def time_range(self) -> tuple[float, float]:
        return self.sigma_min, self.sigma_max

    @property
    def log_snr_range(self) -> tuple[float, float]:
        return -2 * math.log(self.sigma_max), -2 * math.log(self.sigma_min)

    def log_snr(self, tau: torch.Tensor) -> torch.Tensor:
        return -2 * torch.log(tau.to(torch.float64))

    def time_at_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        return torch.exp(-0.5 * lam)

    def coefficients(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = tau.to(torch.float64)
        return torch.ones_like(sigma), sigma


class EDMPath(VEPath):
    """EDM (Karras et al. 2022, "Elucidating the design space..."): ``x = x_0 + sigma eps`` with EDM's
    ``sigma in [0.002, 80]``; the time is ``sigma``. Its teachers are denoisers (prediction ``sample``)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, name: str = "edm"):
        super().__init__(sigma_min, sigma_max, name)


class RectifiedFlowPath(GaussianPath):
    """diffusers' flow-match convention: ``x = (1 - sigma) x_0 + sigma eps``, the time is the timestep
    ``num_train_timesteps * sigma`` and the flow output ``d x / d sigma = eps - x_0``."""

    time_name = "timestep"
    flow_time = "sigma"

    def __init__(self, num_train_timesteps: int = 1000, name: str = "rectified_flow"):
        if isinstance(num_train_timesteps, bool) or not (isinstance(num_train_timesteps, (int, float))
                                                         and num_train_timesteps > 0):
            raise ValueError(f"num_train_timesteps must be positive; got {num_train_timesteps!r}")
        self.scale, self.name = float(num_train_timesteps), name

    @property
    def time_range(self) -> tuple[float, float]:
        return 0.0, self.scale

    @property
    def log_snr_range(self) -> tuple[float, float]:
        return -math.inf, math.inf

    def log_snr(self, tau: torch.Tensor) -> torch.Tensor:
        sigma = tau.to(torch.float64) / self.scale
        return 2 * (torch.log1p(-sigma) - torch.log(sigma))

    def time_at_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.sigmoid(-0.5 * lam)

    def coefficients(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = tau.to(torch.float64) / self.scale
        return 1 - sigma, sigma

    def flow_coefficients(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        one = torch.ones_like(tau, dtype=torch.float64)
        return -one, one


class FlowMatchingPath(GaussianPath):
    """facebookresearch/flow_matching's convention: ``x = t' x_0 + (1 - t') eps`` with ``t' = 0`` noise and
    ``t' = 1`` data; the time is ``t'`` and the flow output ``d x / d t' = x_0 - eps`` (our time runs
    backwards, ``t' = 1 - t`` for the linear schedule, and the velocity has the opposite sign)."""

    time_name = "t'"
    flow_time = "t'"
    name = "flow_matching"

    @property
    def time_range(self) -> tuple[float, float]:
        return 0.0, 1.0

    @property
    def log_snr_range(self) -> tuple[float, float]:
        return -math.inf, math.inf

    def log_snr(self, tau: torch.Tensor) -> torch.Tensor:
        tau = tau.to(torch.float64)
        return 2 * (torch.log(tau) - torch.log1p(-tau))

    def time_at_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(0.5 * lam)

    def coefficients(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tau = tau.to(torch.float64)
        return tau, 1 - tau

    def flow_coefficients(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        one = torch.ones_like(tau, dtype=torch.float64)
        return one, -one


PATHS: dict[str, Callable[[], GaussianPath]] = {
    "vp_linear": lambda: DiscreteVPPath.from_betas(ddpm_betas("linear"), "vp_linear"),
    "vp_scaled_linear": lambda: DiscreteVPPath.from_betas(
        ddpm_betas("scaled_linear", beta_start=0.00085, beta_end=0.012), "vp_scaled_linear"),
    "vp_cosine": lambda: DiscreteVPPath.from_betas(ddpm_betas("squaredcos_cap_v2"), "vp_cosine"),
    "ve": VEPath,
    "edm": EDMPath,
    "rectified_flow": RectifiedFlowPath,
    "flow_matching": FlowMatchingPath,
}


def get_path(name: str) -> GaussianPath:
    """The path called ``name`` (one of ``PATHS``) with its usual parameters (DDPM: 1000 timesteps,
    betas 1e-4 to 0.02, or Stable Diffusion's 0.00085 to 0.012 for ``scaled_linear``)."""
    if name not in PATHS:
        raise ValueError(f"unknown teacher path {name!r}; choose one of {sorted(PATHS)}")
    return PATHS[name]()


class Coefficients(NamedTuple):
    """A path's ``a, b`` at the teacher's time, shaped to broadcast against the state; ``da, db`` in its
    flow time (``None`` for a path without one)."""

    a: torch.Tensor
    b: torch.Tensor
    da: Optional[torch.Tensor] = None
    db: Optional[torch.Tensor] = None


class Prediction(ABC):
    """What a teacher's network outputs: ``encode`` writes it from ``x_0, eps``; ``decode`` recovers
    ``x0_hat, eps_hat`` from it and the state ``x = a x_0 + b eps``."""

    name: ClassVar[str]
    needs_flow: ClassVar[bool] = False

    @abstractmethod
    def encode(self, x0: torch.Tensor, eps: torch.Tensor, c: Coefficients) -> torch.Tensor: ...

    @abstractmethod
    def decode(self, output: torch.Tensor, x: torch.Tensor, c: Coefficients) -> tuple[torch.Tensor, torch.Tensor]: ...


class EpsilonPrediction(Prediction):
    """``eps``; ``x0_hat = (x - b eps_hat) / a``."""

    name = "epsilon"

    def encode(self, x0: torch.Tensor, eps: torch.Tensor, c: Coefficients) -> torch.Tensor:
        return eps

    def decode(self, output: torch.Tensor, x: torch.Tensor, c: Coefficients) -> tuple[torch.Tensor, torch.Tensor]:
        return (x - c.b * output) / c.a, output


class SamplePrediction(Prediction):
    """``x_0``; ``eps_hat = (x - a x0_hat) / b``."""

    name = "sample"

    def encode(self, x0: torch.Tensor, eps: torch.Tensor, c: Coefficients) -> torch.Tensor:
        return x0

    def decode(self, output: torch.Tensor, x: torch.Tensor, c: Coefficients) -> tuple[torch.Tensor, torch.Tensor]:
        return output, (x - c.a * output) / c.b


class VPrediction(Prediction):
    """``v = (a eps - b x_0) / r`` with ``r = sqrt(a^2 + b^2)``; ``x0_hat = (a x / r - b v) / r``,
    ``eps_hat = (b x / r + a v) / r``."""

    name = "v_prediction"

    def encode(self, x0: torch.Tensor, eps: torch.Tensor, c: Coefficients) -> torch.Tensor:
        return (c.a * eps - c.b * x0) / torch.hypot(c.a, c.b)

    def decode(self, output: torch.Tensor, x: torch.Tensor, c: Coefficients) -> tuple[torch.Tensor, torch.Tensor]:
        r = torch.hypot(c.a, c.b)
        return (c.a * x / r - c.b * output) / r, (c.b * x / r + c.a * output) / r


class FlowPrediction(Prediction):
    """The path's velocity ``u = a' x_0 + b' eps`` in its flow time; with ``d = a b' - b a'``,
    ``x0_hat = (b' x - b u) / d`` and ``eps_hat = (a u - a' x) / d``."""

    name = "flow"
    needs_flow = True

    def encode(self, x0: torch.Tensor, eps: torch.Tensor, c: Coefficients) -> torch.Tensor:
        return c.da * x0 + c.db * eps

    def decode(self, output: torch.Tensor, x: torch.Tensor, c: Coefficients) -> tuple[torch.Tensor, torch.Tensor]:
        det = c.a * c.db - c.b * c.da
        return (c.db * x - c.b * output) / det, (c.a * output - c.da * x) / det


PREDICTIONS: dict[str, Prediction] = {p.name: p for p in (EpsilonPrediction(), SamplePrediction(), VPrediction(),
                                                            FlowPrediction())}


def get_prediction(name: str) -> Prediction:
    """The prediction type called ``name`` (one of ``PREDICTIONS``)."""
    if name not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {name!r}; choose one of {sorted(PREDICTIONS)}")
    return PREDICTIONS[name]


class EDMPreconditioning(nn.Module):
    """EDM's denoiser around a raw network ``F`` (Karras et al. 2022, Table 1):
    ``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, cond)`` with ``c_skip = sd^2 / (sigma^2 + sd^2)``,
    ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``, ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = log(sigma) / 4``
    and ``sd = sigma_data``. Use it with the ``edm`` path and the ``sample`` prediction."""

    def __init__(self, raw: Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor],
                 sigma_data: float = 0.5):
        super().__init__()
        if not callable(raw):
            raise TypeError(f"EDMPreconditioning needs a callable raw network F(x, c_noise, cond); got "
                            f"{type(raw).__name__}")
        if not (0 < sigma_data < math.inf):
            raise ValueError(f"sigma_data must be positive and finite; got {sigma_data}")
        self.raw, self.sigma_data = raw, float(sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        s = expand_like(sigma, x)
        sd2 = self.sigma_data**2
        norm = torch.sqrt(s**2 + sd2)
        return sd2 / norm**2 * x + s * self.sigma_data / norm * self.raw(x / norm, torch.log(sigma) / 4, cond)


def _log_snr(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """Our ``log(alpha(t)^2 / sigma(t)^2)`` (``inf`` at ``t = 0``)."""
    return 2 * (torch.log(schedule.alpha(t)) - torch.log(schedule.sigma(t)))


class ConventionTeacher:
    """A teacher ``fn(x_T, tau_T, cond) -> output`` on a foreign ``path`` (a ``GaussianPath`` or a name of
    ``PATHS``) predicting ``prediction`` (a name of ``PREDICTIONS``), as ``velocity(x, t, cond)`` under
    ``schedule`` (default linear), by the three steps of the module docstring. ``tau_T`` is a ``[B]``
    tensor of the teacher's own time in ``x``'s dtype; ``cond`` is passed through. An ``nn.Module`` ``fn``
    is frozen (eval mode, no parameter gradients); the velocity stays differentiable in ``x``.

    ``shape`` (one sample's shape) and ``num_classes`` (0: unconditional), when known, say what the
    teacher makes (``load_teacher`` checks them against the data)."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor],
                 path: Union[GaussianPath, str], prediction: str, schedule: Optional[Schedule] = None,
                 shape: Optional[tuple[int, ...]] = None, num_classes: Optional[int] = None):
        if not callable(fn):
            raise TypeError(f"ConventionTeacher needs a callable fn(x, tau, cond); got {type(fn).__name__}")
        self.path = get_path(path) if isinstance(path, str) else path
        if not isinstance(self.path, GaussianPath):
            raise ValueError(f"path must be a GaussianPath or one of {sorted(PATHS)}; got {type(path).__name__}")
        self.prediction = get_prediction(prediction)
        if self.prediction.needs_flow and self.path.flow_time is None:
            raise ValueError(f"prediction {prediction!r} needs a path with a flow time (rectified_flow, "
                             f"flow_matching); the {self.path.name} path has none")
        if isinstance(fn, nn.Module):
            fn.eval().requires_grad_(False)
        self.fn = fn
        self.schedule = schedule if schedule is not None else LinearSchedule()
        self.shape = None if shape is None else tuple(shape)
        self.num_classes = num_classes
        self._warned = False

    def teacher_time(self, t: TimeLike) -> torch.Tensor:
        """The teacher's time (float64, ``t``'s shape) at the log-SNR of our ``t``, clamped to its range."""
        t64 = torch.as_tensor(t, dtype=torch.float64)
        check_unit_interval(t64.reshape(-1))
        lam = _log_snr(self.schedule, t64)
        lo, hi = self.path.log_snr_range
        if not self._warned and bool(((lam < lo - _CLAMP_NOTICE) | (lam > hi + _CLAMP_NOTICE)).any()):
            t_lo, t_hi = self.exact_range
            logger.warning(f"the {self.path.name} teacher covers our times [{t_lo:.6g}, {t_hi:.6g}] only; times "
                           f"outside are clamped to its {self.path.time_name} range {list(self.path.time_range)}")
            self._warned = True
        return self.path.time_at_log_snr(lam.clamp(lo, hi))

    def our_time(self, tau: TimeLike) -> torch.Tensor:
        """Our time (float64, ``tau``'s shape) at the log-SNR of the teacher's time ``tau`` (the inverse of
        ``teacher_time`` within ``exact_range``): a grid of the teacher's timesteps in our time."""
        tau64 = torch.as_tensor(tau, dtype=torch.float64)
        self.path.check_time(tau64)
        return self._time_at_log_snr(self.path.log_snr(tau64))

    @property
    def exact_range(self) -> tuple[float, float]:
        """Our times whose log-SNR the path reaches: there the adapted velocity is the teacher's exactly."""
        lo, hi = self.path.log_snr_range
        t = self._time_at_log_snr(torch.tensor([hi, lo], dtype=torch.float64))
        return float(t[0]), float(t[1])

    def _time_at_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        """Our ``t in [0, 1]`` with ``lambda(t) = lam`` by bisection (our log-SNR decreases in ``t``);
        ``lam = inf`` is ``t = 0`` and ``-inf`` is ``t = 1``."""
        lo, hi = torch.zeros_like(lam), torch.ones_like(lam)
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            early = _log_snr(self.schedule, mid) > lam
            lo, hi = torch.where(early, mid, lo), torch.where(early, hi, mid)
        t = torch.where(lam == math.inf, 0.0, 0.5 * (lo + hi))
        return torch.where(lam == -math.inf, 1.0, t)

    def state_scale(self, t: TimeLike) -> torch.Tensor:
        """``k`` with ``x_T = k x`` (float64, ``t``'s shape): ``a_T / alpha(t)`` where ``alpha >= sigma``,
        else ``b_T / sigma(t)``."""
        return self._map(torch.as_tensor(t, dtype=torch.float64))[3]

    def _map(self, t64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's time, ``a_T``, ``b_T`` and the state scale at our times ``t64``."""
        tau = self.teacher_time(t64)
        a, b = self.path.coefficients(tau)
        alpha, sigma = self.schedule.alpha(t64), self.schedule.sigma(t64)
        return tau, a, b, torch.where(alpha >= sigma, a / alpha, b / sigma)

    def velocity(self, x: torch.Tensor, t: TimeLike, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        tb = as_batch_time(t, x).to(torch.float64)
        tau, a, b, scale = self._map(tb)
        da, db = self.path.flow_coefficients(tau) if self.prediction.needs_flow else (None, None)
        c = Coefficients(*(None if v is None else expand_like(v, x).to(x.dtype) for v in (a, b, da, db)))
        x_teacher = expand_like(scale, x).to(x.dtype) * x
        output = self.fn(x_teacher, tau.to(x.dtype), cond)
        if output.shape != x.shape:
            raise ValueError(f"the teacher returned shape {tuple(output.shape)} for x of shape {tuple(x.shape)}")
        x0_hat, eps_hat = self.prediction.decode(output, x_teacher, c)
        d_alpha, d_sigma = (expand_like(v(tb), x).to(x.dtype) for v in (self.schedule.d_alpha, self.schedule.d_sigma))
        return d_alpha * x0_hat + d_sigma * eps_hat


__all__ = ["BETA_SCHEDULES", "PATHS", "PREDICTIONS", "Coefficients", "ConventionTeacher", "DiscreteVPPath",
           "EDMPath", "EDMPreconditioning", "FlowMatchingPath", "GaussianPath", "Prediction", "RectifiedFlowPath",
           "VEPath", "ddpm_betas", "get_path", "get_prediction"]
