"""The scripts under ``benchmarks/`` run and print their tables (tiny sizes; timings are not checked)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_method_cost_times_methods_against_fm_and_compares_backends(capsys):
    method_cost = _script("method_cost")
    assert method_cost.main(["--methods", "lsd", "ct", "--repeats", "1", "--warmup", "1", "--no-memory",
                             "--batch", "32", "--width", "16", "--depth", "2", "--compare-backend", "func"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and "---" not in line}
    assert set(rows) >= {"fm", "lsd", "ct"}
    assert rows["fm"].split("|")[7].strip() == "1.00"  # time / fm of fm itself
    assert rows["lsd"].split("|")[10].strip() != "" and rows["ct"].split("|")[10].strip() == ""  # ct takes no JVP


def test_checkerboard_record_trains_scores_and_writes_its_files(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text("data: {name: checkerboard}\nmethod: {name: lsd, diagonal_target: batch_posterior, "
                      "grid_fraction: 0.25, grid_rho: 2.0, grid_level_weights: [2, 1, 1, 1, 1]}\n"
                      "model: {width: 16, depth: 1}\noptim: {warmup_steps: 2}\ntrain: {batch_size: 64}\n")
    record = _script("checkerboard_record")
    record.main(["--config", str(config), "--minutes", "0.03", "--curve-every", "0.6", "--late-batch", "128",
                 "--ode-steps", "2", "--skip-spikes", "10", "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "record.json").read_text())
    assert result["steps"] > 0 and result["skipped_spikes"] >= 0 and result["skip_spikes"] == 10
    assert result["diverged_at_step"] is None
    assert all(0 < result[f"kl_{k}"] < 10 for k in (1, 2, 4, 8, 16)) and 0 < result["floor"] < 0.1
    assert result["sampler_rho"] == 2.0 and all(0 < result[f"kl_{k}_rho"] < 10 for k in (2, 4, 8, 16))
    assert result["config"]["method"]["diagonal_target"] == "batch_posterior"
    curve = (tmp_path / "out" / "curve.csv").read_text().splitlines()
    assert curve[0].startswith("step,train_seconds,kl_1") and len(curve) >= 3  # a snapshot and the final row
    assert curve[0].endswith("kl_mid_16_rho") and "kl_mid_1," in curve[0]  # both estimators
    assert 0 < result["floor"] < result["floor_mid"] < 0.3 and all(0 < result[f"kl_mid_{k}"] < 10 for k in (1, 8))
    assert (tmp_path / "out" / "samples.png").is_file() and "KL, midpoint estimator" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        record.main(["--config", str(config), "--skip-spikes", "0.5", "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit):
        record.main(["--config", str(config), "--sampler-rho", "0", "--out", str(tmp_path / "bad")])


def _exploding_record(tmp_path, monkeypatch, exploding_steps):
    """The record script on a tiny fm run whose loss is multiplied by 1000 at ``exploding_steps``,
    with a spike streak of 4."""
    config = tmp_path / "tiny.yaml"
    config.write_text("data: {name: checkerboard}\nmethod: {name: fm}\nmodel: {width: 8, depth: 1}\n"
                      "train: {batch_size: 32}\n")
    record = _script("checkerboard_record")
    build = record.build_method

    class Exploding:
        def __init__(self, inner):
            self.inner = inner

        def loss(self, model, batch, generator, ctx):
            out = self.inner.loss(model, batch, generator, ctx)
            if ctx.step in exploding_steps:
                out.loss = out.loss * 1e3
            return out

    monkeypatch.setattr(record, "build_method", lambda *a, **k: Exploding(build(*a, **k)))
    monkeypatch.setattr(record, "SPIKE_STREAK", 4)
    return record, config


def test_checkerboard_record_rolls_back_when_the_loss_leaves_the_median(tmp_path, monkeypatch, capsys):
    """Four spikes in a row (steps 305-308) roll the weights back to the snapshot of step 300 and halve
    the learning rate; training then goes on to the end of its budget."""
    record, config = _exploding_record(tmp_path, monkeypatch, range(305, 309))
    monkeypatch.setattr(record, "SNAPSHOT_EVERY", 100)
    record.main(["--config", str(config), "--minutes", "0.05", "--curve-every", "1000", "--ode-steps", "0",
                 "--skip-spikes", "10", "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "record.json").read_text())
    assert result["rollbacks"] == [308] and result["diverged_at_step"] is None
    assert result["skipped_spikes"] == 4 and result["steps"] > 309
    assert "rolled back to step 300, learning rate x0.5" in capsys.readouterr().out


def test_checkerboard_record_stops_a_run_whose_loss_leaves_the_median_for_good(tmp_path, monkeypatch, capsys):
    """A permanent level shift of the loss (here x1000 from step 205 on, before the first snapshot of
    healthy weights) is a divergence: after ``SPIKE_STREAK`` skipped steps in a row training stops
    instead of skipping until the budget ends."""
    record, config = _exploding_record(tmp_path, monkeypatch, range(205, 10**9))
    record.main(["--config", str(config), "--minutes", "2", "--curve-every", "1000", "--ode-steps", "0",
                 "--skip-spikes", "10", "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "record.json").read_text())
    assert result["diverged_at_step"] == 205 and result["steps"] == 209 and result["skipped_spikes"] == 4
    assert result["train_seconds"] < 60 and "diverged at step 205" in capsys.readouterr().out
