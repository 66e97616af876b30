"""Option groups: the shared settings of the methods, as dataclasses composed into each method's options.

A method's options are one flat dataclass (``--set method.key=value`` names a field), built by
inheriting the groups it uses and declaring only its own fields and changed defaults::

    @dataclass
    class Options(TwoTimeOptions):
        diagonal_fraction: float = option(0.5, "rows on the diagonal (iMF: half)")

Every field is declared with ``option(default, doc, choices=... | within=...)``: the doc (with
its paper) and the constraint are what ``flowmaps methods NAME`` prints. ``check(method)``
validates every field by name: its type (from the annotation), that it is finite, its constraint,
then each class's ``check_group`` (constraints between fields).

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

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from flowmaps.jvp import JVP_BACKENDS
from flowmaps.options import Options, option, require
from flowmaps.posterior_targets import DIAGONAL_TARGETS
from flowmaps.time_pairs import DIRECTIONS, TIME_DISTRIBUTIONS, TimePairSampler
from flowmaps.weighting import PENALTIES, REDUCTIONS, TIME_WEIGHTS, LossWeighting

PairParam = Union[float, Sequence[float]]
TARGET_KINDS = ("online", "ema", "trainer")
GRID_TARGETS = ("ema", "online")


@dataclass
class TimeOptions(Options):
    """Times of the training rows (``flowmaps.time_pairs``)."""

    time_distribution: str = option("uniform", "time distribution (flowmaps.time_pairs)", choices=TIME_DISTRIBUTIONS)
    logit_mean: PairParam = option(-0.4, "mean of the logit-normal times (a pair: first/second draw; SD3, MeanFlow)")
    logit_std: PairParam = option(1.0, "std of the logit-normal times (a pair: first/second draw)")


@dataclass
class PairOptions(TimeOptions):
    """Two-time pairs ``(s, t)``: direction and the gap distribution of ``gap_logit_normal``."""

    direction: str = option("backward", "pair direction: both also trains t > s (inversion)", choices=DIRECTIONS)
    gap_logit_mean: float = option(-0.8, "mean of the logit-normal gap s - t (gap_logit_normal; TVM, Zhou et al. 2025)")
    gap_logit_std: float = option(1.0, "std of the logit-normal gap s - t (gap_logit_normal)", within="(0, inf)")


@dataclass
class DiagonalSplitOptions(Options):
    """The split of the batch between the diagonal ``s = t`` and the rule's pairs (spec §3)."""

    diagonal_fraction: float = option(0.75, "share of the batch on the diagonal s = t (Boffi et al. 2025: 0.75)",
                                      within="[0, 1]")
    diagonal_warmup: float = option(0.0, "fraction of training on the diagonal alone: flow matching first, at its "
                                         "cost, then the rule (0: off)", within="[0, 1)")


@dataclass
class GapCurriculumOptions(Options):
    """Interval-length curriculum: gaps scaled by ``max_gap_start -> 1`` over ``gap_warmup`` of training."""

    max_gap_start: float = option(1.0, "largest gap |s - t| at the start of training (1: no curriculum)",
                                  within="(0, 1]")
    gap_warmup: float = option(0.0, "fraction of training over which the largest gap grows to 1", within="[0, 1]")


@dataclass
class WeightingOptions(Options):
    """Per-example loss of a residual: penalty, adaptive weight, reduction, time weight (``flowmaps.weighting``)."""

    penalty: str = option("mse", "robust penalty (pseudo-Huber: iCT; Cauchy: Decoupled MeanFlow)", choices=PENALTIES)
    penalty_c: Optional[float] = option(1e-3, "scale c of the robust penalty (None: iCT's 0.00054 sqrt(D))",
                                        within="(0, inf)")
    adaptive_p: float = option(0.0, "power p of the adaptive weight 1 / (|R|^2 + c)^p (MeanFlow; 0: off)",
                               within="[0, inf)")
    adaptive_c: float = option(1e-3, "offset c of the adaptive weight", within="(0, inf)")
    reduction: str = option("mean", "reduction over features of |R|^2", choices=REDUCTIONS)
    time_weight: str = option("none", "time weight (gap: |t - s|, a loss on F; AYF)", choices=TIME_WEIGHTS)

    def loss_weighting(self) -> LossWeighting:
        """The ``LossWeighting`` of these options."""
        return LossWeighting(self.penalty, self.penalty_c, self.adaptive_p, self.adaptive_c, self.reduction,
                             self.time_weight)


@dataclass
class DiagonalTargetOptions(Options):
    """What the diagonal ``V(x_t, t, t)`` regresses on (``flowmaps.posterior_targets``)."""

    diagonal_target: str = option(
        "conditional", "diagonal target: the conditional velocity, the batch's empirical velocity (stable target "
        "field, Xu et al. 2023) or the teacher's velocity", choices=DIAGONAL_TARGETS + ("teacher",))


@dataclass
class JVPOptions(Options):
    """The forward-mode engine of the method's JVPs (``flowmaps.jvp``)."""

    jvp_backend: str = option("auto", "JVP backend (auto: the fused closed form where the backbone has one, else func)",
                              choices=JVP_BACKENDS)


@dataclass
class TargetOptions(Options):
    """The stop-gradient target network (``flowmaps.methods.targets``)."""

    target: str = option("online", "target network: the online weights under stop-gradient, the method's own EMA "
                         "(target_ema_decay) or the trainer's evaluation EMA", choices=TARGET_KINDS)
    target_ema_decay: float = option(0.0, "decay of the method's EMA target (target='ema'; 0: the online weights)",
                                     within="[0, 1)")


@dataclass
class GridOptions(Options):
    """Grid distillation, an auxiliary term: sampling-grid jumps regressed on finer compositions."""

    grid_fraction: float = option(0.0, "extra rows for grid distillation, a fraction of the batch (0: off)",
                                  within="[0, 1]")
    grid_substeps: int = option(8, "sub-jumps K of the composed target", within="[2, inf)")
    grid_levels: int = option(4, "grids of 1..2^grid_levels steps", within="[0, inf)")
    grid_start: float = option(0.0, "fraction of training after which the grid term switches on", within="[0, 1)")
    grid_target: str = option("ema", "weights of the composed target (ema: the trainer's EMA)", choices=GRID_TARGETS)
    grid_weight: float = option(1.0, "weight of the grid term", within="(0, inf)")
    grid_rho: float = option(1.0, "grid exponent: jumps of t_k = (1 - k/N)^rho (flowmaps.samplers.time_grid)",
                             within="(0, inf)")
    grid_level_weights: Optional[list[float]] = option(None, "share of the rows per level 0..grid_levels (default uniform)")

    def check_group(self, method: str) -> None:
        weights = self.grid_level_weights
        require(weights is None or (len(weights) == self.grid_levels + 1 and all(w >= 0 for w in weights)
                                    and sum(weights) > 0), method, "grid_level_weights",
                f"be {self.grid_levels + 1} non-negative numbers (one per level 0..grid_levels={self.grid_levels}, "
                "not all zero; set it with grid_levels)", weights)


@dataclass
class TwoTimeOptions(PairOptions, DiagonalSplitOptions, GapCurriculumOptions, WeightingOptions,
                     DiagonalTargetOptions, GridOptions):
    """Everything a two-time method (Lagrangian, Eulerian, compositional) carries; methods that take JVPs
    add ``JVPOptions``."""


@dataclass
class DistillationOptions(TwoTimeOptions):
    """A two-time distillation method's: every row on the rule by default, diagonal rows (if any) on the
    teacher's velocity."""

    diagonal_fraction: float = option(0.0, "share of the batch on the diagonal, regressed on the teacher")
    diagonal_target: str = option("teacher", "diagonal target (the teacher's velocity by default)")


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
    "Options", "option", "require", "TimeOptions", "PairOptions", "DiagonalSplitOptions",
    "GapCurriculumOptions", "WeightingOptions", "DiagonalTargetOptions", "JVPOptions", "TargetOptions",
    "GridOptions", "TwoTimeOptions", "DistillationOptions", "pair_sampler", "TARGET_KINDS", "GRID_TARGETS",
]
