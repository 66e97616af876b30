"""flowmaps: learning the integral of a diffusion model.

Convention: t = 0 is data, t = 1 is noise; ``F(x, s, t) = x + (t - s) V(x, s, t)`` maps the point
``x`` at time ``s`` to where its probability-flow path is at time ``t``. See ``docs/`` and the spec.
"""

from flowmaps.flow_map import FlowMap
from flowmaps.runs import load
from flowmaps.samplers import sample
from flowmaps.schedules import CosineSchedule, LinearSchedule, Schedule, get_schedule

__all__ = ["FlowMap", "load", "sample", "Schedule", "LinearSchedule", "CosineSchedule", "get_schedule"]
__version__ = "0.1.0"
