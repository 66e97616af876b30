"""Export a trained flow map to diffusers (the ``diffusers`` extra: ``pip install flowmaps[diffusers]``).

diffusers' ``FlowMapEulerDiscreteScheduler`` (AnyFlow, Gu et al. 2026) samples flow maps in this
project's convention: its ``sigma`` is our time ``t`` (``sigma = 1`` noise, ``x = (1 - sigma) x_0 + sigma
eps`` for the linear schedule), its timesteps are ``1000 sigma``, and one ``step`` from ``sigma_t`` to
``sigma_r`` is ``x - (sigma_t - sigma_r) u`` with the model's output ``u = V(x, sigma_t, sigma_r)``:
exactly ``F(x, s, t) = x + (t - s) V(x, s, t)`` on the grid ``1 = sigma_0 > ... > sigma_N = 0``, which
is ``flowmaps.samplers.sample_flow_map``. A diffusion model (the ``ode`` sampler, ``fm``) is called on
its diagonal ``V(x, sigma_t, sigma_t)``, the Euler step of ``sample_ode``.

``export_diffusers(RUN, DIR)`` (``flowmaps export RUN --diffusers DIR``) writes::

    DIR/model_index.json                  the pipeline class and its parts, as diffusers lays them out
    DIR/scheduler/scheduler_config.json   FlowMapEulerDiscreteScheduler (1000 train timesteps, shift 1)
    DIR/flowmap/flowmap_config.json       the model section of the run's config, sample shape, classes,
                                          sampler, schedule and the run's identity
    DIR/flowmap/model.safetensors         the network's weights (EMA by default)

and ``FlowMapPipeline.from_pretrained(DIR)`` rebuilds the network (``flowmaps.build``) and samples with
``pipeline(num_inference_steps, class_labels=...)``. Maps trained only towards ``t = 0`` (the
``consistency`` sampler: jump to data, re-noise) do not compose over a grid and are not exported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from flowmaps.build import build_model, config_from_dict, load_run_config, recorded_model
from flowmaps.files import read_json, write_json
from flowmaps.flow_map import FlowMap
from flowmaps.conditions import Condition, guided
from flowmaps.nets.embeddings import check_guidance_input, check_label_range
from flowmaps.runs import CONFIG_FILE, load
from flowmaps.samplers import get_sampler
from flowmaps.teachers.diffusers import import_diffusers
from flowmaps.train.checkpoint import load_weights, save_weights

PIPELINE_CLASS = "FlowMapPipeline"
MODEL_INDEX = "model_index.json"
FLOWMAP_CONFIG = "flowmap_config.json"
WEIGHTS = "model.safetensors"
SCHEDULER = "FlowMapEulerDiscreteScheduler"
EXPORTABLE_SAMPLERS = ("flow_map", "one_step", "ode")
OUTPUT_TYPES = ("pt", "np")
FORMAT_VERSION = 1


def _check_sampler(sampler: str) -> None:
    if sampler not in EXPORTABLE_SAMPLERS:
        raise ValueError(f"maps drawn with the {sampler} sampler are not composed over a grid as diffusers' "
                         f"{SCHEDULER} composes them; exportable samplers: {', '.join(EXPORTABLE_SAMPLERS)}")


class FlowMapPipeline:
    """A flowmaps ``FlowMap`` under diffusers' ``FlowMapEulerDiscreteScheduler`` (module docstring).

    ``config`` holds what ``from_pretrained`` needs to rebuild the network: ``model`` (the run config's
    model section), ``schedule`` (the training schedule's name) and the run's identity ``run``; the
    sample shape, classes and sampler are the ``flowmap``'s own."""

    def __init__(self, flowmap: FlowMap, scheduler: Any, config: dict[str, Any]):
        if flowmap.shape is None:
            raise ValueError("the flow map has no sample shape (build it with flowmaps.build.build_model)")
        _check_sampler(flowmap.sampler)
        self.flowmap = flowmap.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.config = config

    @property
    def device(self) -> torch.device:
        return next(self.flowmap.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.flowmap.parameters()).dtype

    def to(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None) -> FlowMapPipeline:
        self.flowmap.to(device=device, dtype=dtype)
        return self

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                        dtype: torch.dtype = torch.float32) -> FlowMapPipeline:
        """The pipeline saved in ``path`` (``save_pretrained`` or ``export_diffusers``) on ``device`` in ``dtype``."""
        diffusers = import_diffusers()
        root = Path(path)
        index = read_json(root / MODEL_INDEX, "pipeline index")
        if not isinstance(index, dict) or index.get("_class_name") != PIPELINE_CLASS:
            raise ValueError(f"{root / MODEL_INDEX} is not a flowmaps export (its _class_name is not {PIPELINE_CLASS})")
        info = read_json(root / "flowmap" / FLOWMAP_CONFIG, "flow map config")
        if not isinstance(info, dict) or info.get("format") != FORMAT_VERSION:
            raise ValueError(f"{root / 'flowmap' / FLOWMAP_CONFIG} is not a flow map config of format {FORMAT_VERSION}")
        scales = info.get("guidance_range")
        cfg = config_from_dict({"model": recorded_model(info["model"]), "train": {"guidance_range": scales}})
        model = build_model(cfg, tuple(info["shape"]))
        load_weights(model, root / "flowmap" / WEIGHTS)
        model.sampler = info["sampler"]
        scheduler = getattr(diffusers, SCHEDULER).from_pretrained(root / "scheduler")
        config = {k: info[k] for k in ("model", "schedule", "run", "guidance_range") if k in info}
        return cls(model.to(device=device, dtype=dtype), scheduler, config)

    def save_pretrained(self, path: Union[str, Path]) -> Path:
        """Write the layout of the module docstring into ``path``; returns it."""
        diffusers = import_diffusers()
        root = Path(path)
        self.scheduler.save_pretrained(root / "scheduler")
        m = self.flowmap
        save_weights(m, root / "flowmap" / WEIGHTS, {"format": str(FORMAT_VERSION)})
        write_json(root / "flowmap" / FLOWMAP_CONFIG, {
            "format": FORMAT_VERSION, **self.config, "shape": list(m.shape), "num_classes": m.num_classes,
            "sampler": m.sampler})
        write_json(root / MODEL_INDEX, {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers.__version__,
                                        "_module": __name__, "scheduler": ["diffusers", SCHEDULER],
                                        "flowmap": ["flowmaps", "FlowMap"]})
        return root

    def _labels(self, class_labels: Union[int, Sequence[int], torch.Tensor, None],
                batch_size: Optional[int]) -> tuple[Optional[torch.Tensor], int]:
        """``class_labels`` as ``[B]`` labels (``None``: the null class) and the batch size."""
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        if class_labels is None:
            return None, 1 if batch_size is None else batch_size
        if self.flowmap.num_classes == 0:
            raise ValueError("this model is unconditional (no classes); it takes no class_labels")
        labels = torch.as_tensor(class_labels, device=self.device)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() > 1:
            raise ValueError(f"class_labels must be a class index or a list of them; got {class_labels!r}")
        labels = labels.long().reshape(-1)
        if labels.numel() == 1 and batch_size is not None:
            labels = labels.expand(batch_size)
        if batch_size is not None and labels.numel() != batch_size:
            raise ValueError(f"{labels.numel()} class_labels for batch_size {batch_size}: give one label or one per "
                             "sample")
        check_label_range(labels, self.flowmap.num_classes)
        return labels, labels.numel()

    def _condition(self, labels: Optional[torch.Tensor], guidance_scale: float) -> Condition:
        """The labels, with the guidance scale on every row for a guidance-conditioned model
        (``model.guidance``); a model without that input takes only ``guidance_scale = 1``."""
        check_guidance_input(torch.tensor([float(guidance_scale)]), self.flowmap.takes_guidance,
                             self.flowmap.guidance_range)
        if not self.flowmap.takes_guidance or (labels is None and guidance_scale == 1.0):
            return labels
        if labels is None:
            raise ValueError(f"guidance_scale {guidance_scale} needs class_labels (guidance mixes the conditional and "
                             "the unconditional model)")
        return guided(labels, guidance_scale)

    def __call__(self, num_inference_steps: int = 1, class_labels: Union[int, Sequence[int], torch.Tensor, None] = None,
                 guidance_scale: float = 1.0, generator: Optional[torch.Generator] = None,
                 batch_size: Optional[int] = None, latents: Optional[torch.Tensor] = None, output_type: str = "pt",
                 return_dict: bool = True) -> Any:
        """``batch_size`` samples (default: one per latent, else one per class label, else 1) in
        ``num_inference_steps`` steps from ``latents`` (noise at ``t = 1``; drawn with ``generator`` when
        not given). ``class_labels``: a class or one per sample (``None``: the null class, the
        unconditional model; -1 marks a row without a class). Samples are in the run's data space: a
        ``[B, *shape]`` tensor (``output_type`` ``"pt"``) or NumPy array (``"np"``), in
        ``ImagePipelineOutput.images`` (a tuple without ``return_dict``)."""
        diffusers = import_diffusers()
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}")
        get_sampler(self.flowmap.sampler).check_steps(num_inference_steps)
        if batch_size is None and latents is not None:
            batch_size = latents.shape[0]
        labels, batch = self._labels(class_labels, batch_size)
        cond = self._condition(labels, guidance_scale)
        shape = (batch, *self.flowmap.shape)
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor

            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {list(shape)}; got {list(latents.shape)}")
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        sigmas = self.scheduler.sigmas
        x = latents.to(device=self.device, dtype=self.dtype)
        diagonal = self.flowmap.sampler == "ode"
        with torch.no_grad():
            for i, timestep in enumerate(self.scheduler.timesteps):
                target = sigmas[i] if diagonal else sigmas[i + 1]
                u = self.flowmap(x, sigmas[i], target, cond, output="V")
                x = self.scheduler.step(u, timestep, x).prev_sample
        images = x.cpu().numpy() if output_type == "np" else x
        return diffusers.ImagePipelineOutput(images=images) if return_dict else (images,)


def export_diffusers(run_dir: Union[str, Path], out: Union[str, Path], ema: bool = True,
                     allow_unfinished: bool = False) -> Path:
    """Write the finished run ``run_dir`` (EMA weights unless ``ema=False``) as a diffusers folder ``out``
    (module docstring), which must be missing, empty or an earlier export (then replaced); returns ``out``."""
    diffusers = import_diffusers()
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MODEL_INDEX).is_file())):
        raise ValueError(f"--diffusers {out} exists and is not an empty folder or an earlier export; choose a new one")
    model = load(run_dir, ema=ema, allow_unfinished=allow_unfinished)
    _check_sampler(model.sampler)
    cfg = load_run_config(run_dir / CONFIG_FILE)
    provenance = {k: model.provenance[k] for k in ("run_id", "config_hash", "weights", "state")}
    config = {"model": cfg.model.to_dict(), "schedule": cfg.train.schedule, "run": {"dir": str(run_dir), **provenance},
              "guidance_range": cfg.train.guidance_range}
    pipeline = FlowMapPipeline(model, getattr(diffusers, SCHEDULER)(), config)
    return pipeline.save_pretrained(out)


__all__ = ["FlowMapPipeline", "export_diffusers"]
