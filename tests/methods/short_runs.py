"""Short CPU training runs on a Gaussian mixture, scored against exact samples and an untrained model.

Shared by the slow tests of the compositional and consistency families. A run trains through the
real pipeline (config validation, ``train``, run directory, ``flowmaps.load``) and is scored by the
energy distance of its 1-step and 4-step samples to exact mixture samples; methods anchored at
``t = 0`` are sampled with the consistency sampler, the others by composing the map.
"""

import json
from pathlib import Path
from typing import Any, Optional

import torch

from flowmaps import load
from flowmaps.build import build_model
from flowmaps.data import get_data
from flowmaps.methods import get_method_class
from flowmaps.metrics import energy_distance
from flowmaps.samplers import sample_consistency, sample_flow_map
from flowmaps.schedules import LinearSchedule
from flowmaps.build import config_from_dict
from flowmaps.train.loop import train

SPEC = {"weights": [0.5, 0.3, 0.2], "means": [[-1.0, 0.0], [1.0, 0.5], [0.2, -1.0]],
        "stds": [[0.2, 0.2], [0.15, 0.3], [0.25, 0.1]]}
WIDTH, DEPTH, BATCH = 96, 3, 256


def mixture_file(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "mix.json"
    if not path.exists():
        path.write_text(json.dumps(SPEC))
    return path


def run(directory: Path, method: str, steps: int, teacher: Optional[str] = None,
        options: Optional[dict[str, Any]] = None, ema_decay: float = 0.999) -> Path:
    """Train ``method`` for ``steps`` steps into ``directory / method``; return the run directory."""
    cfg = config_from_dict({
        "data": {"name": str(mixture_file(directory))},
        "method": {"name": method, **(options or {})},
        "model": {"width": WIDTH, "depth": DEPTH},
        "optim": {"ema_decay": ema_decay},
        "train": {"steps": steps, "batch_size": BATCH, "seed": 0, "device": "cpu"},
        "teacher": teacher,
    })
    return train(cfg, directory / method, progress=False, evaluate_at_end=False).run_dir


def distances(model, method: str, directory: Path) -> tuple[float, float]:
    """Energy distances of 1-step and 4-step samples of ``model`` to 4000 exact mixture samples."""
    data = get_data(str(mixture_file(directory)))
    g = torch.Generator().manual_seed(123)
    exact, noise = data.sample(4000, g).x0, torch.randn(4000, 2, generator=g)
    anchored = get_method_class(method).sampler == "consistency"
    with torch.no_grad():
        one = sample_flow_map(model, noise, 1)
        four = (sample_consistency(model, noise, 4, LinearSchedule(), torch.Generator().manual_seed(5))
                if anchored else sample_flow_map(model, noise, 4))
    return energy_distance(one, exact), energy_distance(four, exact)


def assert_trains(directory: Path, method: str, steps: int, factor: float = 0.4, **kw) -> None:
    """After a short run the 1- and 4-step distances are below ``factor`` times an untrained model's."""
    trained = distances(load(run(directory, method, steps, **kw)), method, directory)
    torch.manual_seed(0)
    cfg = config_from_dict({"model": {"width": WIDTH, "depth": DEPTH}, "method": {"name": "fm"}})
    untrained = distances(build_model(cfg, 2).eval(), method, directory)
    print(f"{method}: energy distance 1/4 steps {trained[0]:.4f} / {trained[1]:.4f}, "
          f"untrained {untrained[0]:.4f} / {untrained[1]:.4f}")
    assert trained[0] < factor * untrained[0] and trained[1] < factor * untrained[1], (trained, untrained)
