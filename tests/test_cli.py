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
    assert {"flow map, 1 step", "flow map, 8 steps (grid rho 2)", "ODE heun 4 steps"} <= set(metrics["samplers"])
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


@pytest.fixture(scope="module")
def own_sampler_runs(tmp_path_factory):
    """Tiny runs of a map trained only towards t = 0 (scm) and of one trained only from s = 1 (pid)."""
    root = tmp_path_factory.mktemp("own-sampler")
    assert main(["train", "--data", "8gaussians", "--method", "scm", "--out", str(root / "scm"), *TINY]) == 0
    assert main(["train", "--data", "8gaussians", "--method", "pid", "--teacher", "exact", "--out",
                 str(root / "pid"), *TINY]) == 0
    return root


def test_sample_uses_the_method_sampler_and_records_it(own_sampler_runs, tmp_path):
    """``flowmaps sample`` on an scm run re-noises between steps (the consistency sampler), not composing
    ``F``: its output equals the consistency sampler on the same noise and differs from the composition."""
    from flowmaps.samplers import sample_consistency, sample_flow_map, time_grid

    run = own_sampler_runs / "scm"
    out = tmp_path / "s"
    assert main(["sample", str(run), "--nfe", "3", "--n", "256", "--seed", "4", "--out", str(out)]) == 0
    x = torch.from_numpy(np.load(tmp_path / "s.npy"))
    meta = json.loads((tmp_path / "s.json").read_text())
    assert meta["sampler"] == "consistency" == meta["method_sampler"] and meta["nfe"] == 3
    model = flowmaps.load(run)
    assert model.sampler == "consistency"
    gen = torch.Generator().manual_seed(4)
    noise = torch.randn(256, 2, generator=gen)
    with torch.no_grad():
        expected = sample_consistency(model, noise, time_grid(3), generator=gen)
        composed = sample_flow_map(model, noise, 3)
        assert torch.allclose(flowmaps.sample(model, noise, 1), model(noise, 1.0, 0.0))
    assert torch.allclose(x, expected) and not torch.allclose(x, composed, atol=1e-3)
    assert main(["sample", str(run), "--nfe", "3", "--n", "256", "--seed", "4", "--sampler", "flow_map",
                 "--out", str(tmp_path / "f.npy")]) == 0
    assert torch.allclose(torch.from_numpy(np.load(tmp_path / "f.npy")), composed)
    assert json.loads((tmp_path / "f.json").read_text())["sampler"] == "flow_map"


def test_sample_refuses_several_steps_of_a_one_step_map(own_sampler_runs, tmp_path, capsys):
    run = own_sampler_runs / "pid"
    assert main(["sample", str(run), "--nfe", "4", "--out", str(tmp_path / "p.npy")]) == 2
    assert "one_step sampler takes at most 1 step" in capsys.readouterr().err
    assert not (tmp_path / "p.npy").exists()
    assert main(["sample", str(run), "--nfe", "1", "--n", "64", "--out", str(tmp_path / "p.npy")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["sampler"] == "one_step"
