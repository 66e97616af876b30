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
            self.inner, self.options, self.backbone_defaults = inner, inner.options, inner.backbone_defaults

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


@pytest.mark.slow
def test_distill_diffusers_trains_a_diffusers_teacher_distils_and_scores_it(tmp_path, capsys):
    """``--quick`` cut further: the diffusers teacher is trained and saved where ``diffusers:DIR`` reads it, its
    three students (conditional, guided teacher, guidance-conditioned) train through ``flowmaps.train``, and
    the table scores them against the teacher's DDIM at the same scale (slow: the feature classifier)."""
    from flowmaps.teachers import load_teacher
    from tests.fashion_mnist import require_fashion_mnist
    from tests.teachers import require_diffusers

    require_fashion_mnist()
    require_diffusers()
    distill = _script("distill_diffusers")
    out = tmp_path / "out"
    assert distill.main(["--quick", "--out", str(out), "--teacher-steps", "3", "--student-steps", "2",
                         "--n-samples", "16", "--ddim-steps", "2", "3", "--sample-steps", "1", "2"]) == 0
    text = capsys.readouterr().out
    teacher = load_teacher(f"diffusers:{out / 'teacher'}")
    assert teacher.num_classes == 10 and teacher.shape == (1, 28, 28)
    result = json.loads((out / "distill_diffusers.json").read_text())
    rows = {(r["model"], r["w"], r["steps"]): r for r in result["rows"]}
    students = [("cd", 1.0), ("cd, teacher w = 2", 2.0), ("cd, w in [1, 3]", 1.0), ("cd, w in [1, 3]", 2.0)]
    assert set(rows) == ({("teacher", w, k) for w in (1.0, 2.0) for k in (2, 3)}
                         | {(name, w, k) for name, w in students for k in (1, 2)})
    assert rows[("teacher", 2.0, 3)]["nfe"] == 6 and rows[("teacher", 1.0, 3)]["fd_ratio"] == 1.0
    assert all(r["fd"] > 0 and 0 <= r["class_accuracy"] <= 1 for r in rows.values())
    assert "FD / teacher 3-step DDIM" in text and (out / "distill_diffusers.md").read_text() in text
    assert "cd, w in [1, 3] (w = 2), 1 step: " in text and (out / "samples" / "cd-guided-w2-2.png").is_file()
    assert "guidance: true" in (out / "cd-w-conditioned" / "config.yaml").read_text()
    assert "teacher_scale: 2.0" in (out / "cd-guided" / "config.yaml").read_text()
    for bad in (["--guidance", "4"], ["--methods", "lsd"], ["--n-samples", "3"]):
        with pytest.raises(SystemExit):
            distill.main(["--quick", "--out", str(tmp_path / "bad"), *bad])


def test_steering_scores_every_method_against_the_exact_posterior(tmp_path, capsys):
    """``--quick``: an LSD map trained through the CLI (then reused), every steering method on the exact and the
    trained map, scored against exact posterior samples beside the floor; the 2-D figure; the images part skips
    without its run."""
    from flowmaps.steering import STEERERS

    steering = _script("steering")
    runs, out = tmp_path / "runs", tmp_path / "out" / "steering.md"
    assert steering.main(["--quick", "--data", "8gaussians", "mix16", "--runs", str(runs), "--out", str(out),
                          "--figures", str(tmp_path / "figures")]) == 0
    text = capsys.readouterr().out
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    settings = {(r["data"], r["measurement"]) for r in rows}
    assert settings == {("8gaussians", "proj s=0.3"), ("8gaussians", "proj s=0.1"), ("mix16", "proj s=0.3"),
                        ("mix16", "proj s=0.1"), ("mix16", "inpaint:half s=0.1")}
    scored = [r for r in rows if r["method"] != "exact posterior"]
    assert {r["model"] for r in scored} == {"exact", "lsd"}
    assert {r["method"].split(" ")[0] for r in scored} == set(STEERERS)
    assert {r["method"] for r in scored} >= {"best-of-n (max)", "best-of-n (resample)"}
    for r in scored:
        assert r["nfe_per_particle"] <= r["budget"] == 16
        assert r["nfe_per_sample"] == r["nfe_per_particle"] * r["particles"]
        assert r["floor"] > 0 and r["ed"] >= 0 and abs(r["ratio"] - r["ed"] / r["floor"]) < 1e-9
        assert 0 < r["ess"] <= 1 and r["seconds"] >= 0
    assert out.read_text() in text and "| 8gaussians | proj s=0.1 | exact | smc | 16 |" in text
    assert "best at 16 NFE per particle" in text and (tmp_path / "figures" / "steering-2d.png").is_file()
    assert (runs / "mix16.json").is_file() and (runs / "lsd-mix16" / "model.safetensors").is_file()
    assert steering.main(["--quick", "--data", "8gaussians", "--models", "lsd", "--runs", str(runs)]) == 0
    assert "reusing the finished run" in capsys.readouterr().out
    assert steering.main(["--images", "--quick", "--image-run", str(tmp_path / "absent")]) == 0
    assert "skipped" in capsys.readouterr().out
