"""Every registered method, with its default options, trains on a held-out mixture (driven by the registry).

The mixture is the one of ``benchmarks/held_out_defaults.py``, used by no method's own tests or
recipes. Each method trains through the real pipeline (config validation, ``train``, the run
directory, ``flowmaps.load``) at a small CPU budget and is sampled with its own sampler
(``flowmaps.sample``); its one-step energy distance to exact samples must be well below that of
pure noise, and so must the four-step one where its sampler takes several steps; its flow-map error
on the pairs it trains must be below half of an untrained network's. The full-budget table (3000
steps, the default model) is in ``docs/benchmarks.md``.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import flowmaps
from flowmaps.build import config_from_dict
from flowmaps.data import get_data
from flowmaps.methods import get_method_class, method_names
from flowmaps.build import build_model
from flowmaps.metrics import energy_distance, flow_map_error, flow_map_reference, time_pair_grid
from flowmaps.samplers import get_sampler
from flowmaps.train.loop import train

_spec = importlib.util.spec_from_file_location(
    "held_out_defaults", Path(__file__).resolve().parents[2] / "benchmarks" / "held_out_defaults.py")
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
HELD_OUT = _bench.HELD_OUT
STEPS, BATCH, WIDTH = 1200, 256, 128
BOUND = 0.6  # a fraction of noise's energy distance (1: untrained); at 1200 steps methods reach 0.02-0.54


def config(data: Path, name: str, teacher):
    return config_from_dict({"data": {"name": str(data)}, "method": {"name": name},
                             "model": {"width": WIDTH, "depth": 3},
                             "train": {"steps": STEPS, "batch_size": BATCH, "seed": 0, "device": "cpu"},
                             "checkpoint": {"every": 0}, "teacher": teacher})


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("held-out")
    data = root / "held_out.json"
    data.write_text(json.dumps(HELD_OUT))
    fm = train(config(data, "fm", None), root / "fm-teacher", progress=False, evaluate_at_end=False).run_dir
    source = get_data(str(data))
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(0)
    return {"root": root, "data": data, "fm": fm, "schedule": source.mixture.schedule,
            "exact": source.sample(6000, g).x0, "noise": torch.randn(6000, 2, generator=g),
            "pairs": flow_map_reference(source.mixture, time_pair_grid(5), n=512, generator=g),
            "untrained": build_model(config(data, "fm", None), 2).eval()}


@pytest.mark.slow
@pytest.mark.parametrize("name", method_names())
def test_default_options_train_on_a_held_out_mixture(held_out, name):
    cls = get_method_class(name)
    teacher = None if not cls.needs_teacher else str(held_out["fm"]) if cls.initializes_from_teacher else "exact"
    run = train(config(held_out["data"], name, teacher), held_out["root"] / name, progress=False,
                evaluate_at_end=False).run_dir
    model, exact, noise = flowmaps.load(run), held_out["exact"], held_out["noise"]
    scale = energy_distance(noise, exact)
    sampler = get_sampler(cls.sampler)
    steps = [1] if sampler.max_steps == 1 else [1, 4] if sampler.exact_at_every_step_count else [16, 64]
    with torch.no_grad():
        scores = {k: energy_distance(flowmaps.sample(model, noise, k, schedule=held_out["schedule"],
                                                     generator=torch.Generator().manual_seed(k)), exact) / scale
                  for k in steps}
    print(name, {k: round(v, 3) for k, v in scores.items()})
    assert all(v < BOUND for v in scores.values()), scores
    pairs = held_out["pairs"].only(sampler.trained)
    if pairs.pairs:  # a diffusion model (fm) trains no pair s > t
        error, untrained = flow_map_error(model, pairs).mean, flow_map_error(held_out["untrained"], pairs).mean
        assert error < 0.5 * untrained, (error, untrained)
