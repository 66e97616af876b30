"""Class conditioning end to end, against exact class-conditional samples (spec §7).

A labelled Gaussian mixture of image shape ``[1, 4, 4]`` (one class per component) is trained through
the CLI with a class-conditional U-Net and with an unconditional one. Samples drawn for class ``c``
(``flowmaps sample --class c``) are compared with exact samples of that class's mixture: the
conditional model's energy distance must be far below the unconditional model's, whose samples of
"class c" are draws of the whole mixture.
"""

import json

import numpy as np
import pytest
import torch

from flowmaps.cli import main
from flowmaps.data import get_data
from flowmaps.metrics import energy_distance

pytestmark = pytest.mark.slow
SPEC = {
    "weights": [0.4, 0.35, 0.25],
    "means": [[1.2 * np.sin(k + 1.7 * j) for j in range(16)] for k in range(3)],
    "stds": [[0.25] * 16, [0.35] * 16, [0.3] * 16],
    "labels": [0, 1, 2],
    "shape": [1, 4, 4],
}
N = 1500


def _train(tmp_path, name: str, num_classes: int) -> str:
    spec = tmp_path / "labelled.json"
    spec.write_text(json.dumps(SPEC))
    out = tmp_path / name
    assert main(["train", "--data", str(spec), "--steps", "200", "--batch-size", "64", "--out", str(out),
                 "--no-progress", "--set", "model.backbone=unet", "--set", f"model.num_classes={num_classes}",
                 "--set", "eval.n_samples=512", "--set", "eval.nfe=[2]"]) == 0
    return str(out)


def _distance_to_class(run: str, tmp_path, c: int, conditional: bool) -> float:
    out = tmp_path / f"{run.rsplit('/', 1)[-1]}-{c}.npy"
    args = ["sample", run, "--n", str(N), "--nfe", "2", "--out", str(out)]
    assert main(args + (["--class", str(c)] if conditional else [])) == 0
    samples = torch.from_numpy(np.load(out)).double()
    assert samples.shape == (N, 1, 4, 4)
    mixture = get_data(str(tmp_path / "labelled.json")).mixture.conditional(c)
    exact = mixture.sample(N, torch.Generator().manual_seed(c)).double()
    return energy_distance(samples.reshape(N, -1), exact)


def test_class_conditional_samples_match_each_class_far_better_than_unconditional_ones(tmp_path):
    conditional, unconditional = _train(tmp_path, "cond", 3), _train(tmp_path, "uncond", 0)
    for c in range(3):
        ours = _distance_to_class(conditional, tmp_path, c, True)
        baseline = _distance_to_class(unconditional, tmp_path, c, False)
        assert ours < 0.2 * baseline, (c, ours, baseline)
