"""End-of-run evaluation: sample quality of the flow map at each NFE and of the ODE baseline.

Two scorers, chosen by the data:

- ``VectorScorer`` (vectors, and images without a labelled test split): energy distance, MMD,
  sliced Wasserstein on the flattened samples, the checkerboard's histogram KL under both
  estimators, and for class-conditional samples the mean over classes of the energy distance to
  that class's data (``class_energy_distance``: exact class-conditional samples for labelled
  mixtures, spec §7).
- ``ImageScorer`` (images with labels and a test split, e.g. Fashion-MNIST): Fréchet distance,
  precision and recall in the feature space of the in-project classifier (trained once per data
  set and cached, ``flowmaps.metrics.classifier``) against the real test set, and the class
  accuracy of conditional samples; the floor is one half of the test set against the other. With
  ``eval.inception_fid`` it adds ``inception_fid`` (the ``fid`` extra, ``flowmaps.metrics.inception``;
  not comparable with published FIDs) on the same sets.

Class-conditional models are sampled for the labels of a fresh data sample, so the classes come in
the data's proportions; every sampler sees the same noise and labels.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from flowmaps import metrics
from flowmaps.conditions import Condition
from flowmaps.metrics import ImageMetrics, InceptionFeatures, import_fid_helper, load_or_train_classifier
from flowmaps.data import DataSource
from flowmaps.methods import Batch
from flowmaps.samplers import get_sampler, grid_rho_of, ode_nfe, sample_ode
from flowmaps.schedules import Schedule
from flowmaps.train.config import ConfigError, EvalConfig

ENERGY_SAMPLES = 4096
MMD_SAMPLES = 2048
SLICED_SAMPLES = 16384  # sorting 256 projections of all 64k samples would cost a quarter of the evaluation
CHUNK_VALUES = 2**17  # sample values (rows x sample size) per network call during evaluation
GRID_PER_CLASS = 8  # images per class (or per row) in an image panel
GRID_ROWS = 10


def sample_metrics(samples: torch.Tensor, reference: torch.Tensor, data_name: str) -> dict[str, float]:
    """Energy distance (first 4096 points), MMD (first 2048), sliced Wasserstein (first 16384) and, for
    the checkerboard, the histogram KL (all points) of ``samples`` under both estimators of the bin
    probabilities (``hist_kl``: exact; ``hist_kl_midpoint``: the density at the bin centres)."""
    samples, reference = samples.reshape(samples.shape[0], -1), reference.reshape(reference.shape[0], -1)
    out = {
        "energy_distance": metrics.energy_distance(samples[:ENERGY_SAMPLES], reference[:ENERGY_SAMPLES]),
        "mmd": metrics.mmd(samples[:MMD_SAMPLES], reference[:MMD_SAMPLES]),
        "sliced_w2": metrics.sliced_wasserstein(samples[:SLICED_SAMPLES], reference[:SLICED_SAMPLES]),
    }
    if data_name == "checkerboard":
        out["hist_kl"] = metrics.histogram_kl(metrics.checkerboard_bin_probs(), samples)
        out["hist_kl_midpoint"] = metrics.histogram_kl(metrics.checkerboard_bin_probs(estimator="midpoint"), samples)
    return out


def class_energy_distance(samples: torch.Tensor, labels: torch.Tensor, reference: Batch) -> float:
    """Mean over the classes present in ``labels`` of the energy distance between the samples made for
    class ``c`` and the reference rows of class ``c`` (at most ``ENERGY_SAMPLES`` each)."""
    flat, ref = samples.reshape(samples.shape[0], -1), reference.x0.reshape(reference.x0.shape[0], -1)
    distances = []
    for c in labels.unique().tolist():
        mine, theirs = flat[labels == c][:ENERGY_SAMPLES], ref[reference.cond == c][:ENERGY_SAMPLES]
        if len(mine) > 1 and len(theirs) > 1:
            distances.append(metrics.energy_distance(mine, theirs))
    return float(sum(distances) / len(distances)) if distances else math.nan


class VectorScorer:
    """Sample metrics of flattened samples against a fresh data sample (module docstring)."""

    def __init__(self, data: DataSource, reference: Batch, second: Batch):
        self.name, self.reference, self.second = data.name, reference, second

    def floor(self) -> dict[str, float]:
        return self(self.second.x0, self.second.cond)

    def __call__(self, samples: torch.Tensor, labels: Optional[torch.Tensor]) -> dict[str, float]:
        out = sample_metrics(samples, self.reference.x0, self.name)
        if labels is not None and self.reference.cond is not None:
            out["class_energy_distance"] = class_energy_distance(samples, labels, self.reference)
        return out


class ImageScorer:
    """Classifier-feature metrics against the real test split (``flowmaps.metrics.ImageMetrics``), at
    ``size`` samples on each side (at most half the test split): the floor and the samples are scored at
    the same size, since the Fréchet distance and the k-NN radii depend on it. ``inception``: also the
    Inception FID (``flowmaps.metrics.inception``) of the same samples against the same reference."""

    def __init__(self, data: DataSource, fingerprint: str, device: torch.device, size: int, inception: bool = False):
        test = data.test_split()
        classifier = load_or_train_classifier(fingerprint, lambda: classifier_data(data), data.num_classes,
                                              device=device)
        self.metrics = ImageMetrics(classifier, test.x0, test.cond, size=min(size, test.x0.shape[0] // 2))
        self.classifier_accuracy = classifier.accuracy
        self.inception = InceptionFeatures(device) if inception else None
        if self.inception is not None:
            size = self.metrics.size
            self.inception_reference = self.inception(test.x0[:size])
            self.inception_floor = metrics.frechet_distance(self.inception(test.x0[size:2 * size]),
                                                            self.inception_reference)

    def floor(self) -> dict[str, float]:
        out = self.metrics.floor()
        if self.inception is not None:
            out["inception_fid"] = self.inception_floor
        return out

    def __call__(self, samples: torch.Tensor, labels: Optional[torch.Tensor]) -> dict[str, float]:
        out = self.metrics(samples, labels)
        if self.inception is not None:
            out["inception_fid"] = metrics.frechet_distance(self.inception(samples[:self.metrics.size]),
                                                            self.inception_reference)
        return out


def classifier_data(data: DataSource) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training and test images and labels of ``data``, for the feature classifier."""
    train, test = data.full_split(), data.test_split()
    return train.x0, train.cond, test.x0, test.cond


def uses_image_metrics(data: DataSource) -> bool:
    """Image data with labels and a test split is scored in classifier-feature space."""
    return len(data.shape) == 3 and data.num_classes > 0 and data.test_split() is not None


def check_eval_config(cfg: EvalConfig, data: DataSource) -> None:
    """Refuse, before training, an ``eval.inception_fid`` that the end of the run could not honour: data
    that is not scored as images, or a missing ``fid`` extra (a ``ConfigError`` naming the install)."""
    if not cfg.inception_fid:
        return
    if not uses_image_metrics(data):
        raise ConfigError(f"eval.inception_fid needs images with labels and a test split (such as fashion-mnist); "
                          f"the data {data.name!r} is scored with sample metrics instead")
    try:
        import_fid_helper()
    except ImportError as err:
        raise ConfigError(f"eval.inception_fid: {err}") from err


def sample_in_chunks(fn: Callable[[torch.Tensor, Condition], torch.Tensor], noise: torch.Tensor,
                     labels: Condition) -> torch.Tensor:
    """``fn(noise, labels)`` over row chunks of at most ``CHUNK_VALUES`` values, concatenated on the CPU
    (``labels``: the condition, class labels or a ``Guided`` pair, sliced with the noise)."""
    size = max(1, CHUNK_VALUES // math.prod(noise.shape[1:]))
    parts = [fn(noise[i:i + size], None if labels is None else labels[i:i + size]).cpu()
             for i in range(0, noise.shape[0], size)]
    return torch.cat(parts)


def panel_rows(labels: Optional[torch.Tensor], n: int) -> torch.Tensor:
    """Indices of the images an image panel shows: ``GRID_PER_CLASS`` of each of the first
    ``GRID_ROWS`` classes (a row per class), or the first ``GRID_ROWS x GRID_PER_CLASS`` rows."""
    if labels is None:
        return torch.arange(min(n, GRID_ROWS * GRID_PER_CLASS))
    rows = [torch.nonzero(labels == c).flatten()[:GRID_PER_CLASS] for c in labels.unique()[:GRID_ROWS].tolist()]
    return torch.cat([r for r in rows if len(r) == GRID_PER_CLASS] or [torch.arange(min(n, GRID_PER_CLASS))])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: DataSource,
    cfg: EvalConfig,
    seed: int,
    device: torch.device,
    sampler: str = "flow_map",
    schedule: Optional[Schedule] = None,
    fingerprint: Optional[str] = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Metrics of ``model``'s samples (module docstring), with the floor of two exact data samples.

    ``sampler`` is the method's own (``flowmaps.samplers.SAMPLERS``), run at every ``cfg.nfe`` it
    supports on the grid ``time_grid(k, rho=cfg.grid_rho)`` (None: the model's own ``grid_rho``, as
    ``flowmaps.samplers.sample`` takes it); ``consistency`` re-noises with
    ``schedule`` between steps. Samplers whose map has a trained diagonal (``flow_map``) add the
    diagonal's ODE baseline. ``fingerprint`` names the data for the classifier cache (image metrics).
    Returns ``(metrics, panels)``; ``panels`` maps panel names (``data``, ``1 step``, ...,
    ``ODE heun (64 NFE)``) to CPU tensors to plot: points, or for images one row per class.
    """
    chosen, rho = get_sampler(sampler), grid_rho_of(model, cfg.grid_rho)
    gen = torch.Generator(device=device).manual_seed(seed + 7919)
    n = cfg.sample_count(data.shape)
    reference, second = data.sample(n, gen), data.sample(n, gen)
    reference, second = Batch(reference.x0.cpu(), _cpu(reference.cond)), Batch(second.x0.cpu(), _cpu(second.cond))
    conditional = getattr(model, "num_classes", 0) > 0
    labels = reference.cond.to(device) if conditional else None
    noise = torch.randn(n, *data.shape, generator=gen, device=device)
    scorer = (ImageScorer(data, fingerprint or data.name, device, n, cfg.inception_fid) if uses_image_metrics(data)
              else VectorScorer(data, reference, second))
    results: dict[str, Any] = {
        "floor (two data samples)": scorer.floor(),
        "noise (untrained scale)": scorer(noise.cpu(), _cpu(labels)),
    }
    shown = panel_rows(_cpu(labels), n) if len(data.shape) == 3 else torch.arange(n)
    panels = {"data": reference.x0[shown]}  # row i: data of the class samples of row i were made for
    for k in [k for k in cfg.nfe if chosen.max_steps is None or k <= chosen.max_steps]:
        x = sample_in_chunks(lambda z, c: chosen.sample(model, z, k, c, rho=rho, schedule=schedule,
                                                        generator=gen), noise, labels)
        results[chosen.label(k, rho)] = {"nfe": k, **scorer(x, _cpu(labels))}
        panels[f"{k} step{'s' if k > 1 else ''}"] = x[shown]
    if chosen.ode_baseline:
        x = sample_in_chunks(lambda z, c: sample_ode(model, z, cfg.ode_steps, cfg.ode_solver, c), noise, labels)
        nfe = ode_nfe(cfg.ode_steps, cfg.ode_solver)
        results[f"ODE {cfg.ode_solver} {cfg.ode_steps} steps"] = {"nfe": nfe, **scorer(x, _cpu(labels))}
        panels[f"ODE {cfg.ode_solver} ({nfe} NFE)"] = x[shown]
    return results, panels


def _cpu(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.cpu()


def metrics_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table with one row per sampler and one column per (scalar) metric."""
    columns = sorted({k for row in results.values() for k, v in row.items() if k != "nfe" and not isinstance(v, dict)})
    lines = ["| sampler | NFE | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, row in results.items():
        cells = [f"{row[c]:.4g}" if c in row else "" for c in columns]
        lines.append(f"| {name} | {row.get('nfe', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
