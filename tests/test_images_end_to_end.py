"""Fashion-MNIST through the command line: a class-conditional U-Net trains, evaluates in the feature
space of the in-project classifier (and of Inception, with the fid extra), writes its picture and report, and
samples for chosen classes."""

import json
from pathlib import Path

import numpy as np
import pytest

from flowmaps.cli import main
from tests.fashion_mnist import require_fashion_mnist
from tests.metrics import require_fid

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fashion-mnist.yaml"


def test_a_class_conditional_fashion_mnist_run(tmp_path):
    require_fashion_mnist()
    run = tmp_path / "fashion"
    assert main(["train", "--config", str(CONFIG), "--steps", "3", "--batch-size", "16", "--out",
                 str(run), "--no-progress", "--set", "eval.n_samples=128", "--set", "eval.nfe=[1]",
                 "--set", "eval.ode_steps=1", "--set", "checkpoint.every=0"]) == 0
    samplers = json.loads((run / "metrics.json").read_text())["samplers"]
    floor, one_step = samplers["floor (two data samples)"], samplers["flow map, 1 step"]
    for row in (floor, one_step):
        assert {"fd", "precision", "recall", "class_accuracy", "class_accuracy_per_class"} <= set(row)
    assert floor["fd"] < one_step["fd"] and floor["class_accuracy"] > 0.6  # 3 steps: far from the data
    info = json.loads((run / "data_info.json").read_text())
    assert info["shape"] == [1, 28, 28] and info["num_classes"] == 10
    assert (run / "samples.png").is_file() and "Class accuracy per class" in (run / "report.html").read_text()
    out = tmp_path / "sneakers.npy"
    assert main(["sample", str(run), "--nfe", "2", "--class", "7", "--n", "8", "--out", str(out)]) == 0
    assert np.load(out).shape == (8, 1, 28, 28) and out.with_suffix(".png").is_file()
    assert json.loads(out.with_suffix(".json").read_text())["classes"] == [7] * 8


def test_a_fashion_mnist_run_with_inception_fid(tmp_path):
    require_fashion_mnist()
    require_fid()
    run = tmp_path / "fashion"
    assert main(["train", "--config", str(CONFIG), "--steps", "3", "--batch-size", "16", "--out", str(run),
                 "--no-progress", "--set", "eval.n_samples=32", "--set", "eval.nfe=[1]", "--set", "eval.ode_steps=1",
                 "--set", "checkpoint.every=0", "--set", "eval.inception_fid=true"]) == 0
    samplers = json.loads((run / "metrics.json").read_text())["samplers"]
    floor, one_step = samplers["floor (two data samples)"], samplers["flow map, 1 step"]
    assert 0 < floor["inception_fid"] < one_step["inception_fid"]  # 3 training steps: far from the data
    assert "inception_fid" in (run / "metrics.md").read_text()
