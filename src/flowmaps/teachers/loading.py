"""``load_teacher``: a teacher from its command-line spec (``exact`` or a run directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from flowmaps.data import DataSource
from flowmaps.runs import DATA_INFO_FILE, data_info, load
from flowmaps.schedules import Schedule
from flowmaps.teachers.base import ExactTeacher, FlowMapTeacher, Teacher


def load_teacher(spec: str, data: DataSource, device: torch.device, schedule: Optional[Schedule] = None) -> Teacher:
    """``"exact"`` (the data must be a Gaussian mixture) or the path of a trained run directory.

    The exact teacher follows the training ``schedule`` (default: the mixture's own, linear).
    """
    if spec == "exact":
        if data.mixture is None:
            raise ValueError(
                f"--teacher exact needs Gaussian-mixture data (a mixture spec file, 8gaussians or ring); "
                f"{data.name!r} has no exact velocity"
            )
        return ExactTeacher(data.mixture if schedule is None else data.mixture.with_schedule(schedule))
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"teacher {spec!r} is neither 'exact' nor a run directory")
    if (path / DATA_INFO_FILE).is_file():
        info = data_info(path)
        if info.shape != tuple(data.shape):
            raise ValueError(f"teacher run {path} was trained on samples of shape {list(info.shape)}; {data.name!r} "
                             f"has samples of shape {list(data.shape)}")
    return FlowMapTeacher(load(path, ema=True, device=device))


__all__ = ["load_teacher"]
