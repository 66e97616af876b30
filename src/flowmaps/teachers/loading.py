"""``load_teacher``: a teacher from its command-line spec (``exact``, a run directory or ``diffusers:DIR``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

import torch

from flowmaps.data import DataSource, get_data
from flowmaps.runs import DATA_INFO_FILE, data_info, load
from flowmaps.schedules import Schedule
from flowmaps.teachers.base import ExactTeacher, FlowMapTeacher, Teacher
from flowmaps.teachers.diffusers import load_diffusers_teacher


DIFFUSERS_PREFIX = "diffusers:"
EXACT_PREFIX = "exact:"


def load_teacher(spec: str, data: Optional[DataSource] = None, device: Union[str, torch.device] = "cpu",
                 schedule: Optional[Schedule] = None) -> Teacher:
    """``"exact"`` (the data must be a Gaussian mixture), ``"exact:SPEC"`` (the exact velocity of another
    mixture spec of the same dimension, e.g. a deliberately weaker model for autoguidance), the path
    of a trained run directory, or ``"diffusers:DIR"``: a diffusers UNet and scheduler
    (``flowmaps.teachers.diffusers``, the ``diffusers`` extra).

    The exact and diffusers teachers follow the training ``schedule`` (default linear). With ``data``
    (needed by ``exact``), a run or diffusers teacher made for other samples (shape, classes) is refused.
    """
    if spec.startswith(DIFFUSERS_PREFIX):
        folder = spec[len(DIFFUSERS_PREFIX):]
        teacher = load_diffusers_teacher(folder, device, schedule)
        if data is not None and (teacher.shape != tuple(data.shape) or teacher.num_classes != data.num_classes):
            shape = "unknown" if teacher.shape is None else list(teacher.shape)
            raise ValueError(f"diffusers teacher {folder} makes samples of shape {shape} with {teacher.num_classes} "
                             f"classes; {data.name!r} has samples of shape {list(data.shape)} with {data.num_classes} "
                             "classes")
        return teacher
    if spec.startswith(EXACT_PREFIX):
        mixture = get_data(spec[len(EXACT_PREFIX):]).mixture
        if mixture is None:
            raise ValueError(f"teacher {spec!r}: {spec[len(EXACT_PREFIX):]} is not a Gaussian-mixture spec")
        if data is not None and mixture.dim != math.prod(data.shape):
            raise ValueError(f"teacher {spec!r} has dimension {mixture.dim}; {data.name!r} has samples of shape "
                             f"{list(data.shape)}")
        return ExactTeacher(mixture if schedule is None else mixture.with_schedule(schedule))
    if spec == "exact":
        if data is None:
            raise ValueError("--teacher exact needs the data (a Gaussian mixture) whose exact velocity it is")
        if data.mixture is None:
            raise ValueError(
                f"--teacher exact needs Gaussian-mixture data (a mixture spec file, 8gaussians or ring); "
                f"{data.name!r} has no exact velocity"
            )
        return ExactTeacher(data.mixture if schedule is None else data.mixture.with_schedule(schedule))
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"teacher {spec!r} is neither 'exact' nor a run directory (nor {DIFFUSERS_PREFIX}DIR)")
    if data is not None and (path / DATA_INFO_FILE).is_file():
        info = data_info(path)
        if info.shape != tuple(data.shape):
            raise ValueError(f"teacher run {path} was trained on samples of shape {list(info.shape)}; {data.name!r} "
                             f"has samples of shape {list(data.shape)}")
    return FlowMapTeacher(load(path, ema=True, device=device))


__all__ = ["DIFFUSERS_PREFIX", "EXACT_PREFIX", "load_teacher"]
