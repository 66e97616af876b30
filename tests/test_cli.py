import json

import numpy as np
import pytest
import torch

import flowmaps
from flowmaps.cli import main

TINY = ["--steps", "30", "--batch-size", "64", "--no-progress", "--set", "model.width=32", "--set", "model.depth=1",
        "--set", "eval.n_samples=512", "--set", "eval.ode_steps=4", "--set", "train.log_every=10"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--out", str(out), *TINY]) == 0
    return out


def test_train_writes_a_complete_run_directory(run_dir):
    for name in ("config.yaml", "model.safetensors", "model_ema.safetensors", "train_log.jsonl", "metrics.json",
                 "metrics.md", "samples.png"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "lsd" and metrics["data"] == "checkerboard"
    assert {"flow map, 1 step", "flow map, 8 steps", "ODE heun 4 steps"} <= set(metrics["samplers"])
    assert "hist_kl" in metrics["samplers"]["flow map, 1 step"]
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 29 and "loss/lagrangian" in log[-1]


def test_load_returns_the_ema_flow_map(run_dir):
    model = flowmaps.load(run_dir)
    x = model(torch.randn(5, 2), 1.0, 0.0)
    assert x.shape == (5, 2) and torch.isfinite(x).all()
    raw = flowmaps.load(run_dir, ema=False)
    assert not torch.equal(raw(torch.ones(1, 2), 1.0, 0.0), x[:1] * 0 + model(torch.ones(1, 2), 1.0, 0.0))


def test_sample_command(run_dir, tmp_path):
    out = tmp_path / "s.npy"
    assert main(["sample", str(run_dir), "--nfe", "2", "--n", "100", "--seed", "3", "--out", str(out)]) == 0
    a = np.load(out)
    assert a.shape == (100, 2) and np.isfinite(a).all()
    main(["sample", str(run_dir), "--nfe", "2", "--n", "100", "--seed", "3", "--out", str(tmp_path / "t.npy")])
    assert np.array_equal(a, np.load(tmp_path / "t.npy"))


def test_sample_command_on_a_power_grid(run_dir, tmp_path, capsys):
    """``--rho 2`` composes the map over ``time_grid(3, rho=2)``, with the same noise as the uniform grid."""
    out = tmp_path / "rho.npy"
    assert main(["sample", str(run_dir), "--nfe", "3", "--rho", "2", "--n", "50", "--seed", "3", "--out", str(out)]) == 0
    model = flowmaps.load(run_dir)
    noise = torch.randn(50, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(model(model(noise, 1.0, 4 / 9), 4 / 9, 1 / 9), 1 / 9, 0.0)
    assert np.allclose(np.load(out), expected.numpy(), atol=1e-6)
    assert main(["sample", str(run_dir), "--nfe", "3", "--rho", "0", "--out", str(tmp_path / "bad.npy")]) == 2
    assert "rho" in capsys.readouterr().err


def test_methods_command(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "lsd" in text and "lagrangian" in text and "fm" in text


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--method", "magic"], "unknown method 'magic'"),
        (["--set", "method.diagonal_fraction=2"], "diagonal_fraction of method 'lsd' must lie in"),
        (["--steps", "-3"], "train.steps must be positive"),
        (["--data", "nosuchset"], "unknown data 'nosuchset'"),
    ],
)
def test_bad_input_stops_with_a_message(args, msg, capsys, tmp_path):
    assert main(["train", "--out", str(tmp_path / "r"), *TINY, *args]) == 2
    assert msg in capsys.readouterr().err


def test_nan_data_file_is_reported(tmp_path, capsys):
    arr = np.random.randn(50, 2)
    arr[7, 0] = np.nan
    np.save(tmp_path / "x.npy", arr)
    assert main(["train", "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "non-finite" in capsys.readouterr().err


def test_missing_run_directory(tmp_path, capsys):
    assert main(["sample", str(tmp_path), "--out", str(tmp_path / "s.npy")]) == 2
    assert "not a flowmaps run directory" in capsys.readouterr().err
