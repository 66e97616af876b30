"""Teachers from diffusers (the ``diffusers`` extra: ``pip install flowmaps[diffusers]``).

``load_diffusers_teacher(DIR)`` reads a folder as diffusers saves one: ``DIR/unet`` (a ``UNet2DModel``,
``save_pretrained``) and ``DIR/scheduler`` (its scheduler, ``save_pretrained``). The scheduler names
the teacher's convention (spec §8; the adapter is ``flowmaps.teachers.conventions.ConventionTeacher``):

- ``DDPMScheduler``, ``DDIMScheduler``, ``EulerDiscreteScheduler``: the DDPM path of the scheduler's
  own ``alphas_cumprod`` (from its ``beta_schedule``, ``beta_start``, ``beta_end`` and
  ``num_train_timesteps``, or its ``trained_betas``) and its ``prediction_type`` (``epsilon``,
  ``sample`` or ``v_prediction``). The UNet is called at fractional timesteps, the table's log-SNR
  interpolated between them. Settings of the sampler alone (``clip_sample``, thresholding, timestep
  spacing, Karras sigmas) do not change what the network computes and are not applied;
- ``FlowMatchEulerDiscreteScheduler``: rectified flow, ``x = (1 - sigma) x_0 + sigma eps`` at the
  timestep ``num_train_timesteps * sigma``, the UNet predicting ``eps - x_0`` (``shift`` moves the
  sampling grid only).

Class labels: a UNet with a learned class table (``class_embed_type`` unset, ``num_class_embeds = K + 1``)
is a teacher of ``K`` classes whose last embedding, index ``K``, is the null class (classifier-free
training's dropped label): our label ``-1`` (``flowmaps.nets.NULL_CLASS``) and ``cond=None`` map to it.
A UNet without a class embedding refuses labels.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Union

import torch
from torch import nn

from flowmaps.files import read_json
from flowmaps.nets.embeddings import NULL_CLASS, check_label_range, check_labels
from flowmaps.schedules import Schedule
from flowmaps.teachers.conventions import (
    BETA_SCHEDULES, ConventionTeacher, DiscreteVPPath, GaussianPath, RectifiedFlowPath,
)

VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
VP_PREDICTIONS = ("epsilon", "sample", "v_prediction")
SCHEDULER_CONFIG = "scheduler_config.json"


def import_diffusers() -> ModuleType:
    """The ``diffusers`` module, or an ``ImportError`` saying how to install it."""
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(f"diffusers teachers and export need diffusers: pip install flowmaps[diffusers] "
                          f"({err})") from err
    return diffusers


def _vp_path(config: dict[str, Any], alphas_cumprod: torch.Tensor, where: Path) -> GaussianPath:
    if config.get("rescale_betas_zero_snr"):
        raise ValueError(f"{where}: rescale_betas_zero_snr gives the last timestep zero SNR, which this adapter does "
                         "not support (its log-SNR table must be finite)")
    if config.get("timestep_type", "discrete") != "discrete":
        raise ValueError(f"{where}: timestep_type {config['timestep_type']!r} is not supported (only discrete "
                         "timesteps)")
    name = "vp_trained_betas" if config.get("trained_betas") is not None else f"vp_{config.get('beta_schedule')}"
    return DiscreteVPPath(alphas_cumprod.to(torch.float64), name)


def _convention(diffusers: ModuleType, scheduler_dir: Path) -> tuple[GaussianPath, str, dict[str, Any]]:
    """The path, the prediction type and the config of the scheduler saved in ``scheduler_dir``."""
    where = scheduler_dir / SCHEDULER_CONFIG
    config = read_json(where, "scheduler config")
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in VP_SCHEDULERS + FLOW_SCHEDULERS:
        raise ValueError(f"{where}: scheduler {name!r} is not supported; a diffusers teacher has one of "
                         f"{', '.join(VP_SCHEDULERS + FLOW_SCHEDULERS)}")
    if name in FLOW_SCHEDULERS:
        if config.get("invert_sigmas"):
            raise ValueError(f"{where}: invert_sigmas is not supported (sigma = 1 must be noise)")
        scheduler = getattr(diffusers, name).from_pretrained(scheduler_dir)
        return RectifiedFlowPath(scheduler.config.num_train_timesteps), "flow", config
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in VP_PREDICTIONS:
        raise ValueError(f"{where}: unknown prediction_type {prediction!r}; a {name} teacher predicts one of "
                         f"{', '.join(VP_PREDICTIONS)}")
    if config.get("trained_betas") is None and config.get("beta_schedule", "linear") not in BETA_SCHEDULES:
        raise ValueError(f"{where}: unknown beta_schedule {config.get('beta_schedule')!r}; choose one of "
                         f"{', '.join(BETA_SCHEDULES)} (or trained_betas)")
    scheduler = getattr(diffusers, name).from_pretrained(scheduler_dir)
    return _vp_path(config, scheduler.alphas_cumprod, where), prediction, config


class DiffusersTeacher(ConventionTeacher):
    """A diffusers ``UNet2DModel`` on ``path`` predicting ``prediction``, as ``velocity(x, t, cond)`` (frozen,
    eval mode). ``num_classes`` is ``num_class_embeds - 1`` (0 without a class embedding) and ``shape``
    ``(in_channels, sample_size, sample_size)``. With ``learned_variance`` (DDPM's ``variance_type``
    ``learned`` or ``learned_range``) the UNet's second half of channels, the variance, is dropped."""

    def __init__(self, unet: nn.Module, path: GaussianPath, prediction: str, schedule: Optional[Schedule] = None,
                 learned_variance: bool = False):
        config = unet.config
        if config.time_embedding_type != "positional":
            raise ValueError(f"UNet time_embedding_type {config.time_embedding_type!r} is not supported: a teacher "
                             "is called at fractional timesteps, which needs the positional embedding")
        if config.class_embed_type is not None:
            raise ValueError(f"UNet class_embed_type {config.class_embed_type!r} is not supported (only a learned "
                             "class table: class_embed_type unset, num_class_embeds = classes + 1)")
        embeds = config.num_class_embeds
        if embeds is not None and embeds < 2:
            raise ValueError(f"UNet num_class_embeds = {embeds}: a class-conditional teacher needs num_class_embeds "
                             "= classes + 1 >= 2 (the last embedding is the null class)")
        channels = config.in_channels
        if config.out_channels != channels * (2 if learned_variance else 1):
            raise ValueError(f"UNet out_channels = {config.out_channels} does not fit in_channels = {channels}"
                             f"{' with a learned variance' if learned_variance else ''}")
        size = config.sample_size
        shape = None if size is None else (channels, *((size, size) if isinstance(size, int) else size))
        self.unet = unet.eval().requires_grad_(False)
        super().__init__(self._predict, path, prediction, schedule, shape, 0 if embeds is None else embeds - 1)

    def class_labels(self, cond: Optional[torch.Tensor], batch: int, device: torch.device) -> Optional[torch.Tensor]:
        """The UNet's ``class_labels`` for our ``cond``: ``-1`` and ``None`` are the null index ``num_classes``."""
        if self.num_classes == 0:
            if cond is not None:
                raise ValueError("this diffusers UNet has no class embedding (num_class_embeds is not set): it takes "
                                 "no class labels (cond)")
            return None
        if cond is None:
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        check_labels(cond, batch)
        check_label_range(cond, self.num_classes)
        return torch.where(cond == NULL_CLASS, self.num_classes, cond.long()).to(device)

    def _predict(self, x: torch.Tensor, tau: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        labels = self.class_labels(cond, x.shape[0], x.device)
        output = self.unet(x.to(self.unet.dtype), tau, class_labels=labels).sample
        return output[:, : x.shape[1]].to(x.dtype)


def load_diffusers_teacher(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                           schedule: Optional[Schedule] = None, dtype: torch.dtype = torch.float32) -> DiffusersTeacher:
    """The teacher in the diffusers folder ``path`` (``unet/`` and ``scheduler/``, module docstring) on
    ``device`` in ``dtype``, as a velocity under ``schedule`` (default linear)."""
    diffusers = import_diffusers()
    root = Path(path)
    for part, what in (("unet", "a UNet2DModel"), ("scheduler", "its scheduler")):
        if not (root / part).is_dir():
            raise ValueError(f"{root} is not a diffusers teacher folder: it has no {part}/ ({what}, saved with "
                             "save_pretrained)")
    teacher_path, prediction, config = _convention(diffusers, root / "scheduler")
    unet = diffusers.UNet2DModel.from_pretrained(root / "unet", torch_dtype=dtype).to(device)
    learned = config.get("variance_type") in ("learned", "learned_range")
    return DiffusersTeacher(unet, teacher_path, prediction, schedule, learned_variance=learned)


__all__ = ["DiffusersTeacher", "import_diffusers", "load_diffusers_teacher"]
