"""The benchmark harness: equal budgets, every sampler measured, skips and failures recorded."""

import csv
import json

import pytest
import torch

from flowmaps.bench import BenchConfig, run_bench, summarise, write_report
from flowmaps.bench.runner import EXACT_ODE, FLOOR, FLOW_MAP, Row, train_config
from flowmaps.cli import main
from flowmaps.methods import registry
from flowmaps.methods.base import LossOutput, Method

TINY = dict(methods=["fm", "lsd"], seeds=[0, 1], steps=12, batch_size=64, width=16, depth=1, nfe=[1, 2],
            ode_steps=[1, 4], n_samples=256, flow_map_error_samples=64, flow_map_error_points=2)


class _TeacherOnly(Method):
    """A stand-in distillation method (its loss is flow matching against the teacher's velocity)."""

    name = "bench_test_teacher"
    rule = "lagrangian"
    setting = "teacher"
    cost = 5
    needs_teacher = True

    def loss(self, model, batch, generator, ctx=None):
        t = torch.rand(batch.x0.shape[0], generator=generator)
        x = self.schedule.sample_xt(batch.x0, torch.randn(batch.x0.shape, generator=generator), t)
        residual = model(x, t, t, output="V", check_times=False) - self.teacher.velocity(x, t)
        return LossOutput(residual.pow(2).mean())


class _Broken(_TeacherOnly):
    """A method whose loss raises."""

    name = "bench_test_broken"
    needs_teacher = False

    def loss(self, model, batch, generator, ctx=None):
        raise RuntimeError("deliberately broken")


@pytest.fixture
def extra_methods(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, _TeacherOnly.name, registry.MethodEntry(_TeacherOnly.name, _TeacherOnly))
    monkeypatch.setitem(registry._REGISTRY, _Broken.name, registry.MethodEntry(_Broken.name, _Broken))


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(datasets=["8gaussians"], **TINY)
    return run_bench(cfg, out, log=lambda _: None), out


def test_every_method_gets_the_same_budget():
    cfg = BenchConfig(**TINY)
    a = train_config(cfg, "8gaussians", "fm", 0, None)
    b = train_config(cfg, "8gaussians", "lsd", 0, "exact")
    for section in ("model", "optim", "train"):
        assert a[section] == b[section]
    assert b["teacher"] == "exact" and "teacher" not in a


def test_bench_measures_every_sampler_against_exact_samples(tiny_result):
    result, _ = tiny_result
    rows = result.rows
    lsd_flow = {(r.nfe, r.seed) for r in rows if r.method == "lsd" and r.sampler == FLOW_MAP and r.metric == "energy_distance"}
    assert lsd_flow == {(k, s) for k in (1, 2) for s in (0, 1)}  # NFE counted, not assumed
    fm_ode = {r.nfe for r in rows if r.method == "fm" and r.sampler == "ODE euler"}
    assert fm_ode == {1, 4}
    assert not any(r.method == "fm" and r.sampler == FLOW_MAP for r in rows)  # fm's off-diagonal is untrained
    assert any(r.method == FLOOR for r in rows) and any(r.method == EXACT_ODE for r in rows)
    errors = [r for r in rows if r.metric == "flow_map_error"]
    assert {r.method for r in errors} == {"lsd"} and all(r.value > 0 for r in errors)
    # the exact velocity's ODE gets better with more steps; the floor is below every trained sampler
    exact = {r.nfe: r.value for r in rows if r.method == EXACT_ODE and r.seed == 0 and r.metric == "sliced_w2"}
    assert exact[4] < exact[1]
    floor = [r.value for r in rows if r.method == FLOOR and r.metric == "energy_distance"]
    trained = [r.value for r in rows if r.method == "lsd" and r.metric == "energy_distance"]
    assert max(floor) < min(trained)
    assert result.notes == []


def test_report_files(tiny_result):
    result, out = tiny_result
    text = write_report(result, out)
    for name in ("results.csv", "summary.csv", "table.md", "quality_vs_nfe_8gaussians.png", "samples_8gaussians.png",
                 "bench.json"):
        assert (out / name).is_file(), name
    with (out / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    lsd1 = [r for r in summary if r["method"] == "lsd" and r["nfe"] == "1" and r["metric"] == "energy_distance"]
    assert len(lsd1) == 1 and lsd1[0]["n"] == "2"
    assert "| lsd | flow map |" in text and "±" in text and "NFE 4" in text
    assert json.loads((out / "bench.json").read_text())["config"]["steps"] == TINY["steps"]


def test_summary_mean_and_sample_std():
    rows = [Row("d", "m", "flow map", 1, seed, "energy_distance", v) for seed, v in enumerate([1.0, 2.0, 3.0])]
    (s,) = summarise(rows)
    assert (s.mean, s.std, s.n) == (2.0, 1.0, 3)


def test_teacher_methods_are_skipped_on_data_without_a_mixture_and_failures_are_noted(extra_methods, tmp_path):
    cfg = BenchConfig(datasets=["moons", "8gaussians"], **{**TINY, "seeds": [0], "steps": 4, "ode_steps": [1],
                      "methods": [_TeacherOnly.name, _Broken.name]})
    result = run_bench(cfg, tmp_path, log=lambda _: None)
    assert any("bench_test_teacher on moons: skipped" in n for n in result.notes)
    assert sum("bench_test_broken" in n and "deliberately broken" in n for n in result.notes) == 2
    ran = {(r.dataset, r.method) for r in result.rows if r.sampler == FLOW_MAP}
    assert ran == {("8gaussians", _TeacherOnly.name)}


def test_bad_bench_config_is_rejected():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        run_bench(BenchConfig(methods=["nope"]), "unused")
    with pytest.raises(ValueError, match="ode_solver"):
        BenchConfig(ode_solver="rk4")
    with pytest.raises(ValueError, match="seeds must be distinct"):
        BenchConfig(seeds=[0, 0])
    with pytest.raises(ValueError, match="positive integers"):
        BenchConfig(nfe=[0])


@pytest.mark.slow
def test_bench_command(tmp_path, capsys):
    args = ["bench", "--data", "8gaussians", "--methods", "lsd", "--seeds", "1", "--steps", "5", "--batch-size", "32",
            "--n-samples", "128", "--out", str(tmp_path / "b"), "--no-progress", "--quick"]
    assert main(args) == 0
    assert "| lsd | flow map |" in capsys.readouterr().out
    assert (tmp_path / "b" / "table.md").is_file()
    assert main([*args[:-1], "--methods", "magic"]) == 2
    assert "unknown method 'magic'" in capsys.readouterr().err


def test_sampling_throughput_counts_nfe():
    from flowmaps.bench.throughput import sampling_throughput, throughput_table
    from flowmaps.flow_map import FlowMap
    from flowmaps.nets import MLP

    model = FlowMap(MLP(2, width=8, depth=1)).eval()
    rows = sampling_throughput(model, 2, batch=16, flow_map_steps=(1, 4), ode_nfe=(1, 4), repeats=1)
    got = [(r.sampler, r.steps, r.nfe) for r in rows]
    assert got == [("flow map", 1, 1), ("flow map", 4, 4), ("ODE euler", 1, 1), ("ODE euler", 4, 4), ("ODE heun", 2, 4)]
    assert all(r.samples_per_second > 0 for r in rows)
    assert "| ODE heun | 2 | 4 |" in throughput_table(rows)


def test_each_method_is_sampled_with_its_own_sampler(tmp_path):
    """Consistency maps (trained only to t = 0) re-noise between steps; one-step maps get one step."""
    cfg = BenchConfig(datasets=["8gaussians"], **{**TINY, "methods": ["ct", "pid"], "seeds": [0], "steps": 4})
    result = run_bench(cfg, tmp_path, log=lambda _: None)
    samplers = {(r.method, r.sampler, r.nfe) for r in result.rows if r.metric == "energy_distance"}
    assert {("ct", "consistency", 1), ("ct", "consistency", 2), ("pid", FLOW_MAP, 1)} <= samplers
    assert not any(m == "pid" and k == 2 for m, _, k in samplers)
    assert {r.method for r in result.rows if r.metric == "flow_map_error"} == {"ct", "pid"}


def test_composition_error_and_cost_ratio_are_reported(tiny_result, tmp_path):
    """Two-time maps get the compositional-rule residual; the table gives it and the training time
    relative to ``fm``'s."""
    result, _ = tiny_result
    comp = [r for r in result.rows if r.metric.startswith("composition_error")]
    assert {r.method for r in comp} == {"lsd"} and {r.seed for r in comp} == {0, 1}
    assert all(r.value >= 0 for r in comp)
    text = write_report(result, tmp_path)
    assert "composition error (s > u > t)" in text and "training time / fm" in text
    fm_row = next(line for line in text.splitlines() if line.startswith("| fm |") and line.endswith("| 1.00 |"))
    assert fm_row


def test_parallel_jobs_give_the_serial_rows(tmp_path):
    """``jobs=2`` trains in spawned worker processes and returns the serial run's rows, in its order."""
    cfg = BenchConfig(datasets=["8gaussians"], **{**TINY, "seeds": [0], "steps": 6})
    serial = run_bench(cfg, tmp_path / "serial", log=lambda _: None)
    parallel = run_bench(cfg, tmp_path / "parallel", log=lambda _: None, jobs=2)
    key = lambda r: (r.dataset, r.method, r.sampler, r.nfe, r.seed, r.metric)  # noqa: E731
    assert [key(r) for r in serial.rows] == [key(r) for r in parallel.rows]
    for a, b in zip(serial.rows, parallel.rows):
        if a.metric != "train_seconds":
            assert b.value == pytest.approx(a.value, rel=1e-4, abs=1e-7), key(a)
    assert set(parallel.panels["8gaussians"]) == {"data", "fm", "lsd"}
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        run_bench(cfg, tmp_path / "none", jobs=0)


def test_a_rerun_reuses_finished_runs_and_redoes_changed_ones(tmp_path):
    """Finished (method, seed) runs are recorded beside their weights; rerunning the benchmark into the
    same directory reuses them (nothing retrained), while a changed budget retrains."""
    cfg = BenchConfig(datasets=["8gaussians"], **{**TINY, "seeds": [0], "steps": 5})
    first = run_bench(cfg, tmp_path, log=lambda _: None)
    weights = tmp_path / "runs" / "8gaussians" / "lsd" / "seed0" / "model_ema.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = run_bench(cfg, tmp_path, log=lambda _: None)
    assert weights.stat().st_mtime_ns == stamp
    assert [(r.method, r.metric, r.value) for r in again.rows] == [(r.method, r.metric, r.value) for r in first.rows]
    assert set(again.panels["8gaussians"]["lsd"]) == set(first.panels["8gaussians"]["lsd"])
    changed = run_bench(cfg.replace(steps=6), tmp_path, log=lambda _: None)
    assert weights.stat().st_mtime_ns != stamp and not changed.notes


def test_ect_starts_from_the_benchmarks_own_fm_run(tmp_path):
    """ECT is initialised from a pretrained diffusion model: the bench hands it the fm run of the same
    seed (run after every fm run), and skips it with a note when fm is not benchmarked."""
    cfg = BenchConfig(datasets=["8gaussians"], **{**TINY, "seeds": [0], "steps": 4, "methods": ["ect", "fm"]})
    result = run_bench(cfg, tmp_path, log=lambda _: None)
    assert result.notes == []
    assert any(r.method == "ect" and r.sampler == "consistency" for r in result.rows)
    saved = (tmp_path / "runs" / "8gaussians" / "ect" / "seed0" / "config.yaml").read_text()
    assert str(tmp_path / "runs" / "8gaussians" / "fm" / "seed0") in saved
    alone = run_bench(cfg.replace(methods=["ect"]), tmp_path / "alone", log=lambda _: None)
    assert any("ect on 8gaussians: skipped" in n and "include fm" in n for n in alone.notes)


class _FlakyOnce(_Broken):
    """Flow matching whose loss is NaN at step 2: the divergence guard skips that step."""

    name = "bench_test_flaky"

    def loss(self, model, batch, generator, ctx=None):
        t = torch.rand(batch.x0.shape[0], generator=generator)
        eps = torch.randn(batch.x0.shape, generator=generator)
        x = self.schedule.sample_xt(batch.x0, eps, t)
        loss = (model(x, t, t, output="V", check_times=False) - (eps - batch.x0)).pow(2).mean()
        return LossOutput(loss * float("nan") if ctx is not None and ctx.step == 2 else loss)


def test_guard_events_are_counted_per_run(monkeypatch, tmp_path):
    """Steps the divergence guard skipped are reported per run (0 for healthy runs)."""
    monkeypatch.setitem(registry._REGISTRY, _FlakyOnce.name, registry.MethodEntry(_FlakyOnce.name, _FlakyOnce))
    cfg = BenchConfig(datasets=["8gaussians"], **{**TINY, "seeds": [0], "steps": 5, "methods": ["fm", _FlakyOnce.name]})
    result = run_bench(cfg, tmp_path, log=lambda _: None)
    skipped = {r.method: r.value for r in result.rows if r.metric == "nonfinite_steps"}
    assert skipped == {"fm": 0.0, _FlakyOnce.name: 1.0}
    assert "non-finite steps skipped" in write_report(result, tmp_path)
