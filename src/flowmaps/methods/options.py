"""Option groups: the shared settings of the methods, as dataclasses composed into each method's options.

A method's options are one flat dataclass (``--set method.key=value`` names a field), built by
inheriting the groups it uses and declaring only its own fields and changed defaults::

    @dataclass
    class Options(TwoTimeOptions):
        diagonal_fraction: float = option(0.5, "rows on the diagonal (iMF: half)")

Every field is declared with ``option(default, doc)``: the doc (with its paper) is what
``flowmaps methods NAME`` prints. ``check(method)`` validates every field by name: the types from
the annotations, then each group's own ``check_group`` (the groups' constraints and choices).

The groups (spec §3, "shared machinery"):

- ``TimeOptions``: the distribution of the times (``flowmaps.time_pairs``);
- ``PairOptions``: direction and gap parameters of two-time pairs; ``DiagonalSplitOptions``: the share
  of the batch on the diagonal; ``GapCurriculumOptions``: the interval-length curriculum;
- ``WeightingOptions``: penalty, adaptive weight, reduction and time weight (``flowmaps.weighting``);
- ``DiagonalTargetOptions``: what the diagonal ``V(x_t, t, t)`` regresses on;
- ``JVPOptions``: the forward-mode engine (``flowmaps.jvp``);
- ``TargetOptions``: the stop-gradient target network (``flowmaps.methods.targets``);
- ``GridOptions``: grid distillation, an auxiliary term (``flowmaps.methods.grid_distillation``).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union, get_args, get_origin, get_type_hints

from flowmaps.jvp import check_backend
from flowmaps.posterior_targets import DIAGONAL_TARGETS
from flowmaps.samplers import check_rho
from flowmaps.time_pairs import DIRECTIONS, TIME_DISTRIBUTIONS, TimePairSampler
from flowmaps.weighting import PENALTIES, REDUCTIONS, TIME_WEIGHTS, LossWeighting

PairParam = Union[float, Sequence[float]]
TARGET_KINDS = ("online", "ema", "trainer")
GRID_TARGETS = ("ema", "online")


def option(default: Any, doc: str) -> Any:
    """A documented option field: ``default`` and a one-line ``doc`` (what it is, its paper)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def _type_ok(value: Any, typ: Any) -> bool:
    """Whether ``value`` fits the annotation ``typ`` (int passes for float; bool never for numbers)."""
    if typ is Any:
        return True
    origin = get_origin(typ)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in get_args(typ))
    if typ is type(None):
        return value is None
    if origin in (list, tuple, collections.abc.Sequence):
        inner = get_args(typ)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, inner[0]) for v in value)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def choice(method: str, name: str, value: Any, choices: Sequence[str]) -> None:
    """``ValueError`` naming ``name`` of ``method`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} of method {method!r} must be one of {tuple(choices)}; got {value!r}")


def require(ok: bool, method: str, name: str, what: str, value: Any) -> None:
    """``ValueError`` naming ``name`` of ``method`` and the constraint ``what`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{name} of method {method!r} must {what}; got {value!r}")


@dataclass
class Options:
    """Base of every method's options: field docs and validation by name."""

    def check(self, method: str) -> None:
        """Check every field's type, then each group's ``check_group`` (raises ``ValueError`` naming the option)."""
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _type_ok(value, hints[f.name]):
                raise ValueError(f"option {f.name} of method {method!r} must be of type {hints[f.name]}; got "
                                 f"{value!r} ({type(value).__name__})")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"option {f.name} of method {method!r} must be finite; got {value!r}")
        for klass in reversed(type(self).__mro__):
            group_check = klass.__dict__.get("check_group")
            if group_check is not None:
                group_check(self, method)

    @classmethod
    def coerce(cls, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` with numeric strings turned into floats where a field is a number (YAML reads ``1e-3``
        as a string)."""
        hints = get_type_hints(cls)
        out = dict(values)
        for name, value in values.items():
            if isinstance(value, str) and name in hints and _type_ok(1.5, hints[name]) and not _type_ok(value, hints[name]):
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    @classmethod
    def docs(cls) -> dict[str, str]:
        """``{field: doc}`` for every option."""
        return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{field: default}`` for every option."""
        return dataclasses.asdict(cls())


@dataclass
class TimeOptions(Options):
    """Times of the training rows (``flowmaps.time_pairs``)."""

    time_distribution: str = option("uniform", f"time distribution, one of {TIME_DISTRIBUTIONS} (flowmaps.time_pairs)")
    logit_mean: PairParam = option(-0.4, "mean of the logit-normal times (a pair: first/second draw; SD3, MeanFlow)")
    logit_std: PairParam = option(1.0, "std of the logit-normal times (a pair: first/second draw)")

    def check_group(self, method: str) -> None:
        choice(method, "time_distribution", self.time_distribution, TIME_DISTRIBUTIONS)


@dataclass
class PairOptions(TimeOptions):
    """Two-time pairs ``(s, t)``: direction and the gap distribution of ``gap_logit_normal``."""

    direction: str = option("backward", f"pair direction, one of {DIRECTIONS}: both also trains t > s (inversion)")
    gap_logit_mean: float = option(-0.8, "mean of the logit-normal gap s - t (gap_logit_normal; TVM, Zhou et al. 2025)")
    gap_logit_std: float = option(1.0, "std of the logit-normal gap s - t (gap_logit_normal)")

    def check_group(self, method: str) -> None:
        choice(method, "direction", self.direction, DIRECTIONS)


@dataclass
class DiagonalSplitOptions(Options):
    """The split of the batch between the diagonal ``s = t`` and the rule's pairs (spec §3)."""

    diagonal_fraction: float = option(0.75, "share of the batch on the diagonal s = t (Boffi et al. 2025: 0.75)")

    def check_group(self, method: str) -> None:
        require(0 <= self.diagonal_fraction <= 1, method, "diagonal_fraction", "lie in [0, 1]", self.diagonal_fraction)


@dataclass
class GapCurriculumOptions(Options):
    """Interval-length curriculum: gaps scaled by ``max_gap_start -> 1`` over ``gap_warmup`` of training."""

    max_gap_start: float = option(1.0, "largest gap |s - t| at the start of training (1: no curriculum)")
    gap_warmup: float = option(0.0, "fraction of training over which the largest gap grows to 1")

    def check_group(self, method: str) -> None:
        require(0 < self.max_gap_start <= 1, method, "max_gap_start", "lie in (0, 1]", self.max_gap_start)
        require(0 <= self.gap_warmup <= 1, method, "gap_warmup", "lie in [0, 1] (a fraction of training)",
                self.gap_warmup)


@dataclass
class WeightingOptions(Options):
    """Per-example loss of a residual: penalty, adaptive weight, reduction, time weight (``flowmaps.weighting``)."""

    penalty: str = option("mse", f"robust penalty, one of {PENALTIES} (pseudo-Huber: iCT; Cauchy: Decoupled MeanFlow)")
    penalty_c: float = option(1e-3, "scale c of the robust penalty")
    adaptive_p: float = option(0.0, "power p of the adaptive weight 1 / (|R|^2 + c)^p (MeanFlow; 0: off)")
    adaptive_c: float = option(1e-3, "offset c of the adaptive weight")
    reduction: str = option("mean", f"reduction over features of |R|^2, one of {REDUCTIONS}")
    time_weight: str = option("none", f"time weight, one of {TIME_WEIGHTS} (gap: |t - s|, a loss on F; AYF)")

    def check_group(self, method: str) -> None:
        choice(method, "penalty", self.penalty, PENALTIES)
        choice(method, "reduction", self.reduction, REDUCTIONS)
        choice(method, "time_weight", self.time_weight, TIME_WEIGHTS)
        require(self.penalty_c is None or self.penalty_c > 0, method, "penalty_c", "be positive", self.penalty_c)
        require(self.adaptive_p >= 0, method, "adaptive_p", "be non-negative", self.adaptive_p)
        require(self.adaptive_c > 0, method, "adaptive_c", "be positive", self.adaptive_c)

    def loss_weighting(self) -> LossWeighting:
        """The ``LossWeighting`` of these options."""
        return LossWeighting(self.penalty, self.penalty_c, self.adaptive_p, self.adaptive_c, self.reduction,
                             self.time_weight)


@dataclass
class DiagonalTargetOptions(Options):
    """What the diagonal ``V(x_t, t, t)`` regresses on (``flowmaps.posterior_targets``)."""

    diagonal_target: str = option(
        "conditional", f"diagonal target, one of {DIAGONAL_TARGETS + ('teacher',)}: the conditional velocity, the "
        "batch's empirical velocity (stable target field, Xu et al. 2023), or the teacher's velocity")

    def check_group(self, method: str) -> None:
        choice(method, "diagonal_target", self.diagonal_target, DIAGONAL_TARGETS + ("teacher",))


@dataclass
class JVPOptions(Options):
    """The forward-mode engine of the method's JVPs (``flowmaps.jvp``)."""

    jvp_backend: str = option("auto", "JVP backend: auto (fused closed form where the backbone has one, else func), "
                              "func, forward_ad, double_backward, finite_difference")

    def check_group(self, method: str) -> None:
        check_backend(self.jvp_backend, f"jvp_backend of method {method!r}")


@dataclass
class TargetOptions(Options):
    """The stop-gradient target network (``flowmaps.methods.targets``)."""

    target: str = option("online", f"target network, one of {TARGET_KINDS}: the online weights under stop-gradient, "
                         "the method's own EMA (target_ema_decay), or the trainer's evaluation EMA")
    target_ema_decay: float = option(0.0, "decay of the method's EMA target (target='ema'; 0: the online weights)")

    def check_group(self, method: str) -> None:
        choice(method, "target", self.target, TARGET_KINDS)
        require(0 <= self.target_ema_decay < 1, method, "target_ema_decay",
                "lie in [0, 1) (0: the online weights under stop-gradient)", self.target_ema_decay)


@dataclass
class GridOptions(Options):
    """Grid distillation, an auxiliary term: sampling-grid jumps regressed on finer compositions."""

    grid_fraction: float = option(0.0, "extra rows for grid distillation, a fraction of the batch (0: off)")
    grid_substeps: int = option(8, "sub-jumps K of the composed target")
    grid_levels: int = option(4, "grids of 1..2^grid_levels steps")
    grid_start: float = option(0.0, "fraction of training after which the grid term switches on")
    grid_target: str = option("ema", f"weights of the composed target, one of {GRID_TARGETS} (ema: the trainer's EMA)")
    grid_weight: float = option(1.0, "weight of the grid term")
    grid_rho: float = option(1.0, "grid exponent: jumps of t_k = (1 - k/N)^rho (flowmaps.samplers.time_grid)")
    grid_level_weights: Optional[list[float]] = option(None, "share of the rows per level 0..grid_levels (default uniform)")

    def check_group(self, method: str) -> None:
        require(0 <= self.grid_fraction <= 1, method, "grid_fraction", "lie in [0, 1]", self.grid_fraction)
        require(self.grid_substeps >= 2, method, "grid_substeps", "be an integer >= 2", self.grid_substeps)
        require(self.grid_levels >= 0, method, "grid_levels", "be a non-negative integer", self.grid_levels)
        require(0 <= self.grid_start < 1, method, "grid_start", "lie in [0, 1) (a fraction of training)",
                self.grid_start)
        require(self.grid_weight > 0, method, "grid_weight", "be positive", self.grid_weight)
        check_rho(self.grid_rho, f"grid_rho of method {method!r}")
        weights = self.grid_level_weights
        require(weights is None or (len(weights) == self.grid_levels + 1 and all(w >= 0 for w in weights)
                                    and sum(weights) > 0), method, "grid_level_weights",
                f"be {self.grid_levels + 1} non-negative numbers (one per level 0..grid_levels={self.grid_levels}), "
                "not all zero", weights)
        choice(method, "grid_target", self.grid_target, GRID_TARGETS)


@dataclass
class TwoTimeOptions(PairOptions, DiagonalSplitOptions, GapCurriculumOptions, WeightingOptions,
                     DiagonalTargetOptions, GridOptions):
    """Everything a two-time method (Lagrangian, Eulerian, compositional) carries; methods that take JVPs
    add ``JVPOptions``."""


def pair_sampler(options: Options, diagonal_fraction: float = 0.0) -> TimePairSampler:
    """The ``TimePairSampler`` of ``options``: the groups it inherits set its arguments; ``diagonal_fraction``
    is the method's fixed share when its options have no ``DiagonalSplitOptions``."""
    kw: dict[str, Any] = {}
    if isinstance(options, TimeOptions):
        kw.update(distribution=options.time_distribution, logit_mean=options.logit_mean, logit_std=options.logit_std)
    if isinstance(options, PairOptions):
        kw.update(direction=options.direction, gap_logit_mean=options.gap_logit_mean,
                  gap_logit_std=options.gap_logit_std)
    if isinstance(options, GapCurriculumOptions):
        kw.update(max_gap_start=options.max_gap_start, gap_warmup=options.gap_warmup)
    if isinstance(options, DiagonalSplitOptions):
        diagonal_fraction = options.diagonal_fraction
    return TimePairSampler(diagonal_fraction, **kw)


__all__ = [
    "Options", "option", "choice", "require", "TimeOptions", "PairOptions", "DiagonalSplitOptions",
    "GapCurriculumOptions", "WeightingOptions", "DiagonalTargetOptions", "JVPOptions", "TargetOptions",
    "GridOptions", "TwoTimeOptions", "pair_sampler", "TARGET_KINDS", "GRID_TARGETS",
]
