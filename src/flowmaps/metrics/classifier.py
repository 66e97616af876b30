"""The in-project feature classifier of the image metrics: a small CNN trained once per data set with a
fixed seed and cached on disk with its test accuracy.

- ``FeatureCNN``: ``[B, C, H, W]`` images in ``[-1, 1]`` of any size -> conv 3x3 (32) -> ReLU -> 2x2 max
  pool -> conv 3x3 (64) -> ReLU -> 2x2 max pool -> average pool to a 4 x 4 grid -> linear 128 -> ReLU
  (the features, ``features(x)`` ``[B, 128]``) -> linear ``K`` (the logits). A max pool is applied only
  while both sides are at least 4 pixels, so 28 x 28 runs at 28, 14, 7 and 4 x 4 at 4, 2, 2; the
  4 x 4 average grid (rather than one global average) keeps the coarse layout that tells a shirt from
  a coat.
- ``train_classifier``: Adam (learning rate 1e-3) on the cross-entropy, ``epochs`` passes over the
  training set in an order drawn by a ``torch.Generator`` seeded with ``seed``, the initial weights
  drawn under the same seed: on the CPU the weights are a function of the data, the seed and the
  settings. The defaults (2 epochs of batches of 128) reach 0.854 test accuracy on Fashion-MNIST in 84 s
  on one CPU core (measured with torch 2.13; other CPUs' rounding moves the figure slightly).
- ``load_or_train_classifier(key, data, num_classes)``: the cache entry
  ``CACHE_DIR/<sha256(key)[:16]>/`` holds ``model.safetensors`` (the weights, with ``key`` in their
  metadata) and ``info.json`` (``key``, ``num_classes``, ``input_shape``, the test ``accuracy``, the
  ``seed``, the training ``settings``, the weights' size and SHA-256, a ``format`` version), each
  written atomically (``flowmaps.files``), ``info.json`` last. ``CACHE_DIR`` is
  ``$FLOWMAPS_CACHE/classifiers``, else ``~/.cache/flowmaps/classifiers``. A load checks the key,
  the number of classes, the settings, the weights' size and SHA-256 against ``info.json``, their
  finite values and shapes; an entry that fails any check is retrained and rewritten with a warning,
  never used. Two processes training one entry at once each write whole files by atomic renames; a
  reader that finds one's weights beside the other's ``info.json`` sees the SHA-256 differ and retrains.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flowmaps.files import read_json, write_json
from flowmaps.train.checkpoint import CheckpointError, load_weights, save_weights

logger = logging.getLogger("flowmaps.metrics")

FEATURE_DIM = 128
POOL_GRID = 4  # side of the average-pooled grid before the feature layer
SEED = 0
EPOCHS = 2
BATCH_SIZE = 128
LEARNING_RATE = 1e-3
INFER_BATCH = 1024  # images per forward pass of a trained classifier
CACHE_ENV = "FLOWMAPS_CACHE"
MODEL_FILE = "model.safetensors"
INFO_FILE = "info.json"
INFO_FORMAT = 1
ARCHITECTURE = "FeatureCNN v1: conv32-pool-conv64-pool-avg4x4-fc128-fcK"

ClassifierData = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class FeatureCNN(nn.Module):
    """The feature classifier's network (module docstring): ``features(x)`` ``[B, 128]``, ``logits(x)``
    ``[B, num_classes]``; ``forward`` is ``logits``."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        if in_channels < 1 or num_classes < 2:
            raise ValueError(f"FeatureCNN needs in_channels >= 1 and num_classes >= 2; got {in_channels}, {num_classes}")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.project = nn.Linear(64 * POOL_GRID**2, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    @staticmethod
    def _pool(h: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(h, 2) if min(h.shape[-2:]) >= 4 else h

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"FeatureCNN expects [B, {self.in_channels}, H, W] images; got {tuple(x.shape)}")
        h = self._pool(F.relu(self.conv1(x)))
        h = self._pool(F.relu(self.conv2(h)))
        return F.relu(self.project(F.adaptive_avg_pool2d(h, POOL_GRID).flatten(1)))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)


def _module_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _batched(fn: Callable[[torch.Tensor], Any], model: nn.Module, x: torch.Tensor, batch_size: int) -> list[Any]:
    """``fn`` of ``x``'s row chunks on ``model``'s device, in eval mode without gradients."""
    model.eval()
    device = _module_device(model)
    return [fn(x[i:i + batch_size].to(device=device, dtype=torch.float32)) for i in range(0, x.shape[0], batch_size)]


def accuracy(model: FeatureCNN, x: torch.Tensor, y: torch.Tensor, batch_size: int = INFER_BATCH) -> float:
    """The share of ``x`` that ``model`` classifies as ``y``."""
    predictions = torch.cat(_batched(lambda b: model.logits(b).argmax(dim=1).cpu(), model, x, batch_size))
    return float((predictions == y.cpu()).double().mean())


def _check_split(x: torch.Tensor, y: torch.Tensor, num_classes: int, name: str) -> None:
    if x.dim() != 4 or x.shape[0] == 0 or y.shape != (x.shape[0],):
        raise ValueError(f"the {name} split must be [N >= 1, C, H, W] images with [N] labels; got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if y.dtype.is_floating_point or int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"the {name} labels must be integers in 0..{num_classes - 1}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"the {name} images contain non-finite values")


def _batches(n: int, batch_size: int, epochs: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """The row indices of each batch: ``epochs`` shuffled passes over ``n`` rows."""
    for _ in range(epochs):
        yield from torch.randperm(n, generator=generator).split(batch_size)


def train_classifier(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    num_classes: int,
    seed: int = SEED,
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    lr: float = LEARNING_RATE,
    max_seconds: float | None = None,
    device: str | torch.device | None = None,
) -> tuple[FeatureCNN, float]:
    """A ``FeatureCNN`` trained on ``(x_train, y_train)`` (images in ``[-1, 1]``) and its accuracy on
    ``(x_test, y_test)`` (module docstring). ``max_seconds`` stops training at the first batch past
    that time (the weights then depend on the machine's speed). Returns the model in eval mode."""
    _check_split(x_train, y_train, num_classes, "training")
    _check_split(x_test, y_test, num_classes, "test")
    if x_test.shape[1:] != x_train.shape[1:]:
        raise ValueError(f"training and test images differ in shape: {tuple(x_train.shape[1:])} and "
                         f"{tuple(x_test.shape[1:])}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"train_classifier needs epochs >= 1 and batch_size >= 1; got {epochs}, {batch_size}")
    device = torch.device(device or "cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureCNN(x_train.shape[1], num_classes)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.monotonic()
    with torch.enable_grad():  # also when called under no_grad (end-of-run evaluation)
        for idx in _batches(x_train.shape[0], batch_size, epochs, torch.Generator().manual_seed(seed)):
            xb = x_train[idx.to(x_train.device)].to(device=device, dtype=torch.float32)
            loss = F.cross_entropy(model(xb), y_train[idx.to(y_train.device)].to(device=device, dtype=torch.long))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if max_seconds is not None and time.monotonic() - start > max_seconds:
                break
    model.eval()
    return model, accuracy(model, x_test, y_test)


class CachedClassifier:
    """A trained ``FeatureCNN`` with what ``info.json`` says of it: ``accuracy`` (its test accuracy),
    ``num_classes``, ``input_shape``, ``info``, ``path`` (its cache entry). ``features``, ``logits``,
    ``predict`` and ``features_and_logits`` run in eval mode without gradients in chunks of
    ``batch_size`` on the model's device and return on the input's device."""

    def __init__(self, model: FeatureCNN, info: dict[str, Any], path: Path, batch_size: int = INFER_BATCH):
        self.model, self.info, self.path, self.batch_size = model.eval(), info, path, batch_size
        self.accuracy: float = float(info["accuracy"])
        self.num_classes: int = int(info["num_classes"])
        self.input_shape: tuple[int, ...] = tuple(info["input_shape"])

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape or x.shape[0] == 0:
            raise ValueError(f"the classifier of {self.info['key']!r} takes [B >= 1, "
                             f"{', '.join(map(str, self.input_shape))}] images; got {tuple(x.shape)}")

        def both(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.model.features(b)
            return features.to(x.device), self.model.head(features).to(x.device)

        parts = _batched(both, self.model, x, self.batch_size)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[0]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(dim=1)


def default_cache_dir() -> Path:
    """``$FLOWMAPS_CACHE/classifiers``, else ``~/.cache/flowmaps/classifiers``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "flowmaps") / "classifiers"


def cache_entry(key: str, cache_dir: Path | None = None) -> Path:
    """The cache entry of the classifier of data fingerprint ``key``."""
    return (default_cache_dir() if cache_dir is None else Path(cache_dir)) / hashlib.sha256(key.encode()).hexdigest()[:16]


def _settings() -> dict[str, Any]:
    return {"architecture": ARCHITECTURE, "epochs": EPOCHS, "batch_size": BATCH_SIZE, "lr": LEARNING_RATE}


def _load(entry: Path, key: str, num_classes: int, device: torch.device) -> CachedClassifier:
    """The classifier of a cache entry, verified (module docstring); ``ValueError`` (``CheckpointError``)
    or ``OSError`` when the entry cannot be used."""
    info = read_json(entry / INFO_FILE, "classifier info")
    if not isinstance(info, dict) or info.get("format") != INFO_FORMAT:
        raise ValueError(f"format {info.get('format') if isinstance(info, dict) else None!r}, not {INFO_FORMAT}")
    expected = {"key": key, "num_classes": num_classes, "seed": SEED, "settings": _settings()}
    wrong = {name: info.get(name) for name, value in expected.items() if info.get(name) != value}
    if wrong:
        raise ValueError(f"it was made for {wrong}, not {({name: expected[name] for name in wrong})}")
    shape, score, files = info.get("input_shape"), info.get("accuracy"), info.get("files")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ValueError(f"input_shape {shape!r} is not [C, H, W]")
    if not (isinstance(score, float) and 0.0 <= score <= 1.0):
        raise ValueError(f"accuracy {score!r} is not a share")
    listed = files.get(MODEL_FILE) if isinstance(files, dict) else None
    if not isinstance(listed, dict) or not {"bytes", "sha256"} <= listed.keys():
        raise ValueError(f"it lists no size and SHA-256 of {MODEL_FILE}")
    model = FeatureCNN(shape[0], num_classes)
    metadata = load_weights(model, entry / MODEL_FILE, listed)
    if metadata.get("key") != key:
        raise CheckpointError(f"the weights were written for key {metadata.get('key')!r}")
    return CachedClassifier(model.to(device), info, entry)


def load_or_train_classifier(
    key: str,
    data: Callable[[], ClassifierData],
    num_classes: int,
    cache_dir: Path | None = None,
    device: str | torch.device | None = None,
) -> CachedClassifier:
    """The feature classifier of the data fingerprinted by ``key`` (e.g. ``builtin:fashion-mnist``): read
    from its cache entry when that is whole and verified, else trained on ``data()`` (``(x_train,
    y_train, x_test, y_test)``, images in ``[-1, 1]``) with the fixed seed and settings, and cached
    (module docstring). ``device`` is where it trains and runs (default CPU)."""
    device = torch.device(device or "cpu")
    entry = cache_entry(key, cache_dir)
    if (entry / INFO_FILE).exists():
        try:
            return _load(entry, key, num_classes, device)
        except (ValueError, OSError) as err:
            logger.warning("feature classifier cache entry %s is unusable (%s); retraining it", entry, err)
    x_train, y_train, x_test, y_test = data()
    logger.info("training the feature classifier of %s on %d images (cached in %s)", key, len(x_train), entry)
    start = time.monotonic()
    model, test_accuracy = train_classifier(x_train, y_train, x_test, y_test, num_classes, device=device)
    seconds = time.monotonic() - start
    logger.info("feature classifier of %s: test accuracy %.4f after %.0f s", key, test_accuracy, seconds)
    digest = save_weights(model, entry / MODEL_FILE, metadata={"key": key})
    info = {
        "format": INFO_FORMAT, "key": key, "num_classes": num_classes, "input_shape": list(x_train.shape[1:]),
        "accuracy": test_accuracy, "seed": SEED, "settings": _settings(), "train_samples": len(x_train),
        "test_samples": len(x_test), "train_seconds": round(seconds, 1), "device": str(device),
        "torch": torch.__version__, "files": {MODEL_FILE: digest},
    }
    write_json(entry / INFO_FILE, info)
    return CachedClassifier(model, info, entry)


__all__ = [
    "CachedClassifier", "FeatureCNN", "accuracy", "cache_entry", "default_cache_dir", "load_or_train_classifier",
    "train_classifier",
]
