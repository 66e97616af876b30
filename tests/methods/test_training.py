"""Distillation from a trained run directory (``--teacher RUN_DIR``) on one Gaussian-mixture spec.

Every method's own short run is registry-driven, in ``tests/methods/test_defaults.py``."""

import json

import pytest
import torch

from flowmaps import load
from flowmaps.build import build_model
from flowmaps.data import get_data
from flowmaps.methods import get_method_class
from flowmaps.metrics import energy_distance, flow_map_error, flow_map_reference, time_pair_grid
from flowmaps.samplers import sample_flow_map
from flowmaps.build import config_from_dict
from flowmaps.train.loop import train

SPEC = {"weights": [0.5, 0.3, 0.2], "means": [[-1.0, 0.0], [1.0, 0.5], [0.2, -1.0]],
        "stds": [[0.2, 0.2], [0.15, 0.3], [0.25, 0.1]]}
SOURCE_ONE = {"pid", "freeflow"}  # trained from s = 1 only: judged on the pairs (1, t)
STEPS = 600


def config(path, name):
    return config_from_dict({
        "data": {"name": str(path)},
        "method": {"name": name},
        "model": {"width": 128, "depth": 3},
        "optim": {"warmup_steps": 50},
        "train": {"steps": STEPS, "batch_size": 256, "seed": 0},
        "teacher": "exact" if get_method_class(name).needs_teacher else None,
    })


def scores(model, setup, name):
    reference = setup["source_one"] if name in SOURCE_ONE else setup["grid"]
    with torch.no_grad():
        one = sample_flow_map(model, setup["noise"], 1)
        four = sample_flow_map(model, setup["noise"], 4)
    return {"flow_map_error": flow_map_error(model, reference).mean,
            "energy_1": energy_distance(one, setup["exact"]), "energy_4": energy_distance(four, setup["exact"])}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixture") / "mix.json"
    path.write_text(json.dumps(SPEC))
    data = get_data(str(path))
    g = torch.Generator().manual_seed(123)
    grid = time_pair_grid(5)
    out = {
        "path": path,
        "exact": data.sample(2000, g).x0,
        "noise": torch.randn(2000, 2, generator=g),
        "grid": flow_map_reference(data.mixture, grid, n=512, generator=g),
        "source_one": flow_map_reference(data.mixture, [p for p in grid if p[0] == 1.0], n=512, generator=g),
    }
    torch.manual_seed(0)
    untrained = build_model(config(path, "lsd"), 2).eval()
    out["untrained"] = {name: scores(untrained, out, name) for name in ("lsd", "pid")}
    return out


@pytest.mark.slow
def test_distillation_from_a_trained_run_directory(setup, tmp_path):
    """``--teacher RUN_DIR``: an ``fm`` run's diagonal is the teacher velocity; LMD back-propagates
    through it into the student's jumps."""
    teacher_cfg = config(setup["path"], "fm").to_dict()
    teacher_cfg["train"]["steps"] = 300
    teacher = train(config_from_dict(teacher_cfg), tmp_path / "teacher", progress=False, evaluate_at_end=False)
    student_cfg = config(setup["path"], "lmd").to_dict()
    student_cfg["teacher"] = str(teacher.run_dir)
    student_cfg["train"]["steps"] = 300
    result = train(config_from_dict(student_cfg), tmp_path / "student", progress=False, evaluate_at_end=False)
    trained = scores(load(result.run_dir), setup, "lmd")
    untrained = setup["untrained"]["lsd"]
    for metric in ("flow_map_error", "energy_1", "energy_4"):
        assert trained[metric] < 0.5 * untrained[metric], (metric, trained, untrained)
