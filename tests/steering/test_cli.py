"""``flowmaps posterior`` and ``flowmaps steer`` through the real CLI, on tiny runs trained here: a 2-D
four-component mixture (exact posteriors known) and a labelled image-shaped mixture ``[1, 4, 4]``.

The classifier reward's image path runs with the run's classifier replaced by a tiny random
``FeatureCNN`` (``cli_support.find_classifier`` patched): the real in-project classifier exists only for
labelled images with a test split (Fashion-MNIST), whose training takes over a minute on a CPU.
"""

import json
import math

import numpy as np
import pytest
import torch

from flowmaps.cli import main
from flowmaps.metrics.classifier import FeatureCNN
from flowmaps.steering import STEERERS, build_steerer
from flowmaps.steering import cli_support

SQUARE = {"weights": [0.25] * 4, "means": [[-1.5, -1.5], [-1.5, 1.5], [1.5, -1.5], [1.5, 1.5]], "stds": [0.4] * 4}
IMAGES = {"weights": [0.5, 0.5], "means": [[0.5] * 16, [-0.5] * 16], "stds": [[0.3] * 16, [0.3] * 16],
          "labels": [0, 1], "shape": [1, 4, 4]}
EVAL = ["--set", "eval.n_samples=256", "--set", "eval.ode_steps=2", "--set", "eval.nfe=[1]",
        "--set", "checkpoint.every=0", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The 2-D run (600 LSD steps of a small MLP, a few seconds) and the input files of the commands."""
    root = tmp_path_factory.mktemp("steer-cli")
    (root / "square.json").write_text(json.dumps(SQUARE))
    assert main(["train", "--data", str(root / "square.json"), "--out", str(root / "run"), "--steps", "600",
                 "--batch-size", "256", "--set", "model.width=64", "--set", "model.depth=2", *EVAL]) == 0
    arrays = {"A": np.array([[1.0, 1.0]]), "y": np.array([0.3]), "x": np.array([1.5, -1.5]),
              "A3": np.ones((1, 3)), "y2": np.array([0.3, 0.1]), "xbad": np.zeros(3), "ynan": np.array([np.nan])}
    for name, value in arrays.items():
        np.save(root / f"{name}.npy", value)
    np.savez(root / "q.npz", B=np.array([[1.0, 0.0]]), b=np.array([1.5]), strength=np.array(2.0))
    np.savez(root / "q_shape.npz", B=np.ones((1, 3)), b=np.array([1.5]), strength=np.array(2.0))
    np.savez(root / "q_b.npz", B=np.ones((2, 2)), b=np.array([1.5]), strength=np.array(2.0))
    np.savez(root / "q_nan.npz", B=np.array([[1.0, 0.0]]), b=np.array([np.nan]), strength=np.array(2.0))
    np.savez(root / "q_missing.npz", B=np.array([[1.0, 0.0]]), b=np.array([1.5]))
    np.savez(root / "q_strength.npz", B=np.array([[1.0, 0.0]]), b=np.array([1.5]), strength=np.array(-1.0))
    return root


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A class-conditional run on the labelled ``[1, 4, 4]`` mixture, two training steps (wiring only)."""
    root = tmp_path_factory.mktemp("steer-images")
    (root / "images.json").write_text(json.dumps(IMAGES))
    assert main(["train", "--data", str(root / "images.json"), "--out", str(root / "run"), "--steps", "2",
                 "--batch-size", "8", "--set", "model.num_classes=2", "--set", "model.width=32",
                 "--set", "model.depth=1", *EVAL]) == 0
    return root / "run"


def _posterior(files, out, *args, operator="A.npy", measurement=("--measurement", "y.npy"), noise="0.3"):
    """``flowmaps posterior`` on the 2-D run; ``measurement``: flags and file names (in ``files``) in turn."""
    given = [str(files / m) if i % 2 else m for i, m in enumerate(measurement)]
    return main(["posterior", str(files / "run"), "--operator", operator if ":" in operator else str(files / operator),
                 *given, f"--noise-std={noise}", "--n", "64", "--nfe", "12", "--seed", "1", "--out", str(out), *args])


def _summary(out):
    return json.loads(out.with_suffix(".json").read_text())


def test_posterior_with_a_matrix_operator_writes_samples_and_metrics(files, tmp_path, capsys):
    out = tmp_path / "post.npy"
    assert main(["posterior", str(files / "run"), "--operator", str(files / "A.npy"), "--measurement",
                 str(files / "y.npy"), "--noise-std", "0.3", "--method", "smc", "--nfe", "16", "--n", "200",
                 "--seed", "0", "--out", str(out)]) == 0
    samples = np.load(out)
    assert samples.shape == (200, 2) and np.isfinite(samples).all()
    summary = _summary(out)
    assert summary["method"] == "smc" and summary["particles"] == 8  # smc's default
    assert summary["nfe_per_particle"] <= summary["nfe_budget"] == 16
    assert 0 < summary["ess"] <= 1 and math.isfinite(summary["reward_mean"])
    assert summary["operator"].endswith("A.npy") and summary["noise_std"] == 0.3 and summary["seed"] == 0
    assert summary["exact_reference"] == "the exact posterior of the data mixture"
    assert summary["exact_samples"] == 200 and 0 <= summary["energy_distance_floor"] < 0.1
    assert summary["energy_distance"] < 0.3  # the trained map's posterior lies near the exact one (floor ~0.04)
    assert summary["wall_seconds"] > 0 and summary["run"] == str(files / "run")
    line = capsys.readouterr().out
    assert "energy distance" in line and "smc" in line and str(out) in line
    assert not out.with_suffix(".png").exists()  # vectors: no picture


@pytest.mark.parametrize("method", sorted(STEERERS))
def test_every_steering_method_runs_through_the_cli(files, tmp_path, method):
    out = tmp_path / f"{method}.npy"
    assert _posterior(files, out, "--method", method) == 0
    assert np.load(out).shape == (64, 2)
    summary = _summary(out)
    assert summary["method"] == method and summary["nfe_per_particle"] <= 12
    assert summary["particles"] == cli_support.particle_count(method, None)
    assert summary["nfe_per_particle"] == build_steerer(method).cost(summary["steps"], summary["particles"])
    assert {"reward_mean", "ess", "energy_distance", "energy_distance_floor"} <= set(summary)


def test_sampler_flags_reach_the_sampler(files, tmp_path):
    out = tmp_path / "smc.npy"
    assert _posterior(files, out, "--method", "smc", "--particles", "4", "--lookahead", "denoiser", "--eta", "0.5",
                      "--ess-threshold", "0.3") == 0
    summary = _summary(out)
    assert summary["particles"] == 4 and summary["lookahead"] == "denoiser" and summary["eta"] == 0.5
    out = tmp_path / "bon.npy"
    assert _posterior(files, out, "--method", "best-of-n", "--select", "resample") == 0
    assert _summary(out)["select"] == "resample"
    out = tmp_path / "noise.npy"
    assert _posterior(files, out, "--method", "noise-smc", "--map-steps", "2", "--ess-threshold", "0.7") == 0
    summary = _summary(out)
    assert summary["map_steps"] == 2 and summary["steps"] == 5 and summary["nfe_per_particle"] == 12


def test_the_same_seed_gives_the_same_samples(files, tmp_path):
    assert _posterior(files, tmp_path / "a.npy", "--method", "fmtt", "--particles", "2") == 0
    assert _posterior(files, tmp_path / "b.npy", "--method", "fmtt", "--particles", "2") == 0
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_truth_is_measured_and_recorded(files, tmp_path):
    out = tmp_path / "t.npy"
    assert _posterior(files, out, measurement=("--truth", "x.npy")) == 0
    truth, y = np.load(tmp_path / "t.truth.npy"), np.load(tmp_path / "t.measurement.npy")
    assert np.array_equal(truth, [1.5, -1.5]) and y.shape == (1,)
    assert abs(float(y[0]) - 0.0) < 4 * 0.3  # A x = 0 plus noise of std 0.3
    summary = _summary(out)
    assert summary["truth_file"] == str(tmp_path / "t.truth.npy")
    assert summary["measurement_file"] == str(tmp_path / "t.measurement.npy") and summary["measurement"] is None
    assert _posterior(files, tmp_path / "u.npy", measurement=("--truth", "x.npy")) == 0
    assert np.array_equal(y, np.load(tmp_path / "u.measurement.npy"))  # drawn with the seed


def test_quadratic_steer_reports_the_distance_to_the_tilted_mixture(files, tmp_path, capsys):
    out = tmp_path / "q.npy"
    assert main(["steer", str(files / "run"), "--reward", f"quadratic:{files / 'q.npz'}", "--method", "smc",
                 "--n", "128", "--nfe", "16", "--out", str(out)]) == 0
    samples = np.load(out)
    assert samples.shape == (128, 2)
    summary = _summary(out)
    assert summary["command"] == "steer" and summary["reward"] == f"quadratic:{files / 'q.npz'}"
    assert summary["exact_reference"] == "the exact tilt of the data mixture"
    assert summary["energy_distance"] < 0.5 and summary["energy_distance_floor"] < 0.15
    assert samples[:, 0].mean() > 0.5  # pulled towards x_1 = 1.5
    assert "energy distance" in capsys.readouterr().out


BAD_POSTERIOR = [
    ({"operator": "A3.npy"}, "operator matrix is [1, 3]"),
    ({"operator": "inpaint:nothere.npy"}, "does not exist"),
    ({"operator": "blur:3"}, "unknown operator"),
    ({"measurement": ("--measurement", "y2.npy")}, "measurement has 2 numbers"),
    ({"measurement": ("--measurement", "ynan.npy")}, "non-finite"),
    ({"measurement": ("--truth", "xbad.npy")}, "--truth"),
    ({"noise": "-0.1"}, "--noise-std must be a positive"),
    ({"noise": "0"}, "--noise-std must be a positive"),
    ({"noise": "nan"}, "--noise-std must be a positive"),
    ({"measurement": ()}, "exactly one of --measurement"),
    ({"measurement": ("--measurement", "y.npy", "--truth", "x.npy")}, "exactly one of --measurement"),
]


@pytest.mark.parametrize("change,message", BAD_POSTERIOR)
def test_bad_posterior_inputs_exit_2_with_a_message(files, tmp_path, capsys, change, message):
    assert _posterior(files, tmp_path / "o.npy", **change) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()


BAD_SAMPLER = [
    (["--particles", "0"], "--particles"),
    (["--method", "smc", "--particles", "-2"], "--particles"),
    (["--method", "dps", "--nfe", "1"], "needs at least 2 NFE"),
    (["--method", "posterior-guidance", "--data-std", "-1"], "data std"),
    (["--method", "smc", "--data-std", "1"], "--data-std does not apply to --method smc"),
    (["--nfe", "0"], "--nfe"),
    (["--method", "magic"], "unknown steering method 'magic'"),
    (["--method", "fmtt", "--lookahead", "denoiser"], "--lookahead does not apply to --method fmtt"),
    (["--method", "dps", "--lookahead", "flow_map"], "--lookahead does not apply"),
    (["--method", "smc", "--select", "max"], "--select does not apply"),
    (["--method", "posterior-guidance", "--eta", "0.5"], "--eta does not apply"),
    (["--method", "dps", "--particles", "4"], "particles=1"),
    (["--method", "smc", "--ess-threshold", "2"], "ESS threshold"),
    (["--method", "noise-smc", "--map-steps", "0"], "map_steps"),
    (["--method", "noise-smc", "--ess-threshold", "0"], "must be > 0"),
    (["--method", "noise-smc", "--eta", "0.5"], "--eta does not apply to --method noise-smc"),
    (["--method", "smc", "--map-steps", "2"], "--map-steps does not apply to --method smc"),
    (["--method", "noise-smc", "--nfe", "1"], "needs at least 2 NFE"),
    (["--method", "fmtt", "--eta", "-1"], "eta"),
    (["--label", "1"], "--label 1: this run's model is unconditional"),
]


@pytest.mark.parametrize("args,message", BAD_SAMPLER)
def test_bad_sampler_flags_exit_2_with_a_message(files, tmp_path, capsys, args, message):
    assert _posterior(files, tmp_path / "o.npy", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()


@pytest.mark.parametrize("spec,message", [
    ("quadratic:{root}/q_shape.npz", "B has shape [1, 3]"),
    ("quadratic:{root}/q_b.npz", "b has shape [1]"),
    ("quadratic:{root}/q_nan.npz", "b has non-finite entries"),
    ("quadratic:{root}/q_missing.npz", "missing ['strength']"),
    ("quadratic:{root}/q_strength.npz", "strength must be one positive number"),
    ("quadratic:{root}/absent.npz", "does not exist"),
    ("quadratic:{root}/A.npy", "takes an .npz"),
    ("classifier:1", "needs an image run"),
    ("magic:1", "unknown reward"),
])
def test_bad_rewards_exit_2_with_a_message(files, tmp_path, capsys, spec, message):
    out = tmp_path / "o.npy"
    assert main(["steer", str(files / "run"), "--reward", spec.format(root=files), "--n", "8", "--nfe", "4",
                 "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_image_posterior_writes_a_picture_and_the_exact_class_posterior(image_run, tmp_path):
    truth = tmp_path / "x.npy"
    np.save(truth, np.full((1, 4, 4), 0.5, dtype=np.float32))
    out = tmp_path / "inpaint.npy"
    assert main(["posterior", str(image_run), "--operator", "inpaint:half", "--truth", str(truth), "--noise-std",
                 "0.1", "--method", "fmtt", "--nfe", "8", "--n", "16", "--label", "0", "--out", str(out)]) == 0
    assert np.load(out).shape == (16, 1, 4, 4) and out.with_suffix(".png").is_file()
    assert np.load(tmp_path / "inpaint.measurement.npy").shape == (8,)  # the top two rows
    summary = _summary(out)
    assert summary["classes"] == [0] * 16
    assert summary["exact_reference"] == "the exact posterior of the class-0 part of the data mixture"
    assert "energy_distance" in summary
    out = tmp_path / "both.npy"  # samples of both classes: no single exact prior
    assert main(["posterior", str(image_run), "--operator", "denoise", "--truth", str(truth), "--noise-std", "0.1",
                 "--nfe", "4", "--n", "8", "--out", str(out)]) == 0
    summary = _summary(out)
    assert summary["exact_reference"] is None and "--label" in summary["exact_reference_note"]
    assert main(["posterior", str(image_run), "--operator", "downsample:3", "--truth", str(truth), "--noise-std",
                 "0.1", "--out", str(tmp_path / "bad.npy")]) == 2


def test_classifier_reward_on_images(image_run, tmp_path, monkeypatch, capsys):
    """The image data here has no in-project classifier (a named error); with a tiny random FeatureCNN in
    its place, ``classifier:K`` steers, and K out of range is refused."""
    out = tmp_path / "c.npy"
    assert main(["steer", str(image_run), "--reward", "classifier:1", "--out", str(out), "--n", "8"]) == 2
    assert "has no in-project classifier" in capsys.readouterr().err
    torch.manual_seed(0)
    net = FeatureCNN(1, 2)
    seen = {}

    def fake(data_spec, shape, device):
        seen["shape"] = shape
        return net.eval().requires_grad_(False), 2

    monkeypatch.setattr(cli_support, "find_classifier", fake)
    assert main(["steer", str(image_run), "--reward", "classifier:1", "--reward-scale", "2", "--method", "fmtt",
                 "--nfe", "8", "--n", "16", "--label", "1", "--out", str(out)]) == 0
    samples = np.load(out)
    assert samples.shape == (16, 1, 4, 4) and out.with_suffix(".png").is_file() and seen["shape"] == (1, 4, 4)
    summary = _summary(out)
    expected = 2 * torch.log_softmax(net(torch.as_tensor(samples)), 1)[:, 1].double().mean()
    assert summary["reward_mean"] == pytest.approx(float(expected), abs=1e-4)
    assert summary["reward_scale"] == 2 and "energy_distance" not in summary
    for spec, message in (("classifier:5", "must be one of 0 .. 1"), ("classifier:x", "class index")):
        assert main(["steer", str(image_run), "--reward", spec, "--out", str(tmp_path / "o.npy")]) == 2
        assert message in capsys.readouterr().err
    assert main(["steer", str(image_run), "--reward", "classifier:1", "--method", "posterior-guidance",
                 "--out", str(tmp_path / "o.npy")]) == 2
    assert "linear-Gaussian" in capsys.readouterr().err
