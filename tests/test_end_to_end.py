"""Short CPU training runs on Gaussian-mixture data, judged against exact samples."""

import json

import pytest
import torch

from flowmaps.data import get_data
from flowmaps.metrics import energy_distance
from flowmaps.samplers import sample_flow_map
from flowmaps.build import config_from_dict
from flowmaps.train.loop import train

SPEC = {"weights": [0.5, 0.3, 0.2], "means": [[-1.0, 0.0], [1.0, 0.5], [0.2, -1.0]],
        "stds": [[0.2, 0.2], [0.15, 0.3], [0.25, 0.1]]}


@pytest.mark.slow
def test_lsd_on_a_mixture_beats_noise_by_far(tmp_path):
    (tmp_path / "mix.json").write_text(json.dumps(SPEC))
    cfg = config_from_dict({
        "data": {"name": str(tmp_path / "mix.json")},
        "method": {"name": "lsd"},
        "model": {"width": 128, "depth": 3},
        "train": {"steps": 2000, "batch_size": 256, "seed": 0},
    })
    result = train(cfg, tmp_path / "run", progress=False, evaluate_at_end=False)
    from flowmaps import load

    model = load(result.run_dir)
    data = get_data(str(tmp_path / "mix.json"))
    g = torch.Generator().manual_seed(123)
    exact = data.sample(4000, g).x0
    noise = torch.randn(4000, 2, generator=g)
    with torch.no_grad():
        d_noise = energy_distance(noise, exact)
        d1 = energy_distance(sample_flow_map(model, noise, 1), exact)
        d4 = energy_distance(sample_flow_map(model, noise, 4), exact)
    floor = energy_distance(data.sample(4000, g).x0, exact)
    print(f"energy distance: noise {d_noise:.4f}, 1 step {d1:.4f}, 4 steps {d4:.4f}, floor {floor:.4f}")
    assert d1 < 0.1 * d_noise
    assert d4 <= d1 + 3 * max(floor, 1e-3)
