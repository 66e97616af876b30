"""What a benchmark run measures: datasets, methods, seeds, the shared training budget, samplers.

Every method gets the same budget (``steps``, ``batch_size``, model ``width`` x ``depth``,
optimiser) through ``flowmaps.train.loop.train``; methods are taken from the registry at run time,
so methods added later are benchmarked without touching this file. ``QUICK`` is a smoke-sized
run (a few minutes on a 2-core CPU); ``FULL`` is the setting of the tables in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from flowmaps.samplers import ODE_SOLVERS

ODE_SCOPES = ("diagonal", "all")


@dataclass
class BenchConfig:
    """Settings of one ``flowmaps bench`` run.

    - ``datasets``: data specs as ``flowmaps train --data`` takes them (built-in names, ``.npy``
      files, mixture specs); mixtures also get the flow-map error and exact-teacher methods.
    - ``methods``: method names, or ``None`` for every registered method.
    - ``seeds``: one training run per seed; tables report mean ± sample standard deviation.
    - ``steps``, ``batch_size``, ``width``, ``depth``, ``lr``, ``ema_decay``: the equal budget.
    - ``nfe``: step counts of the flow-map sampler ``F`` composed over a uniform grid.
    - ``ode_steps`` / ``ode_solver``: the diagonal ODE baseline, run for the ``"diagonal"``
      methods (flow matching) or, with ``ode_scope="all"``, for the diagonal of every method.
    - ``n_samples``: samples per sampler (energy distance uses the first 4096, MMD the first
      2048; sliced Wasserstein and the checkerboard histogram KL use all of them).
    - ``flow_map_error_samples`` / ``flow_map_error_points``: points per ``(s, t)`` pair and the
      size of the time grid of ``flowmaps.metrics.flow_map_error`` (mixture data only).
    """

    datasets: list[str] = field(default_factory=lambda: ["checkerboard", "8gaussians"])
    methods: Optional[list[str]] = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 2000
    batch_size: int = 1024
    width: int = 256
    depth: int = 3
    lr: float = 1e-3
    ema_decay: float = 0.999
    nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    ode_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128])
    ode_solver: str = "euler"
    ode_scope: str = "diagonal"
    n_samples: int = 16384
    flow_map_error_samples: int = 1024
    flow_map_error_points: int = 5
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("datasets", "seeds", "nfe", "ode_steps"):
            if not getattr(self, name):
                raise ValueError(f"bench: {name} must not be empty")
        if self.methods is not None and not self.methods:
            raise ValueError("bench: methods must be None (all registered methods) or a non-empty list")
        for name in ("steps", "batch_size", "width", "depth", "n_samples", "flow_map_error_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"bench: {name} must be positive; got {getattr(self, name)}")
        if self.flow_map_error_points < 2:
            raise ValueError(f"bench: flow_map_error_points must be at least 2; got {self.flow_map_error_points}")
        if not self.lr > 0 or not 0 <= self.ema_decay < 1:
            raise ValueError(f"bench: need lr > 0 and ema_decay in [0, 1); got {self.lr}, {self.ema_decay}")
        bad = [k for k in [*self.nfe, *self.ode_steps] if int(k) != k or k < 1]
        if bad:
            raise ValueError(f"bench: nfe and ode_steps entries must be positive integers; got {bad}")
        if self.ode_solver not in ODE_SOLVERS:
            raise ValueError(f"bench: ode_solver must be one of {ODE_SOLVERS}; got {self.ode_solver!r}")
        if self.ode_scope not in ODE_SCOPES:
            raise ValueError(f"bench: ode_scope must be one of {ODE_SCOPES}; got {self.ode_scope!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"bench: seeds must be distinct; got {self.seeds}")

    def replace(self, **changes) -> "BenchConfig":
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FULL = BenchConfig()

QUICK = BenchConfig(
    datasets=["8gaussians"],
    seeds=[0, 1],
    steps=150,
    batch_size=256,
    width=128,
    depth=3,
    lr=2e-3,
    ode_steps=[1, 2, 4, 8, 16, 32, 64, 128],
    n_samples=1024,
    flow_map_error_samples=256,
    flow_map_error_points=3,
)
