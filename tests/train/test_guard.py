"""The divergence guard: a NaN loss or a loss spike is skipped and explained, then rolled back from or stopped on."""

import json
import shutil

import pytest

from flowmaps.build import load_run_config
from flowmaps.train.checkpoint import CheckpointStore
from flowmaps.train.config import ConfigError, GuardConfig
from flowmaps.train.guard import DivergenceError, DivergenceGuard
from flowmaps.train.loop import lr_factor, train
from tests.train import faults
from tests.train.tiny import assert_same_tensors, tiny_config, weights


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _events(run_dir, kind):
    return [r for r in _records(run_dir) if r.get("event") == kind]


def _nan_call(report):
    (mb,) = report["micro_batches"]
    return mb, mb["model_calls"]


def test_guard_decisions_and_state():
    guard = DivergenceGuard(GuardConfig(max_strikes=2, on_divergence="rollback", lr_factor=0.5, max_rollbacks=1))
    assert guard.strike() == "skip" and guard.strike() == "rollback"
    guard.rolled_back()
    assert guard.lr_scale == 0.5 and guard.strikes == 0
    assert guard.strike() == "skip"
    guard.checkpointed()
    assert guard.strike() == "skip" and guard.strike() == "stop"  # rollbacks used up
    restored = DivergenceGuard(GuardConfig())
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()
    assert DivergenceGuard(GuardConfig(max_strikes=1, on_divergence="stop")).strike() == "stop"


@pytest.mark.parametrize("method", ["fm", "lsd"])
def test_a_nan_loss_is_skipped_and_reported_with_its_term_and_times(tmp_path, monkeypatch, caplog, method):
    faults.install(monkeypatch, nan_steps={3})
    cfg = tiny_config(method={"name": method}, train={"steps": 8})
    train(cfg, tmp_path / "r", progress=False, evaluate_at_end=False)
    (event,) = _events(tmp_path / "r", "nonfinite")
    assert event["step"] == 3 and event["action"] == "skip" and event["strikes"] == 1
    mb, calls = _nan_call(event["reports"][0])
    assert mb["nonfinite_terms"] and set(mb["nonfinite_terms"]) <= {"diagonal", "lagrangian", "grid"}
    assert calls and all(c["input_nonfinite"] > 0 for c in calls)
    first = calls[0]["times"]  # later calls may inherit NaN through F (LSD's target at (t, t))
    assert first and all(s > 0.5 for s, _ in first)  # the poisoned rows, and only those
    assert "step 3: non-finite step skipped" in caplog.text and "(s, t) = (" in caplog.text
    state = CheckpointStore(tmp_path / "r").load(CheckpointStore(tmp_path / "r").path_for(8)).state
    assert state["ema_updates"] == 7  # the skipped step left weights and EMA alone


def test_non_finite_gradients_of_a_finite_loss_name_the_parameters(tmp_path, monkeypatch):
    faults.install(monkeypatch, grad_nan_steps={2})
    train(tiny_config(method={"name": "fm"}, train={"steps": 4}), tmp_path / "r", progress=False,
          evaluate_at_end=False)
    (event,) = _events(tmp_path / "r", "nonfinite")
    report = event["reports"][0]
    assert report["micro_batches"][0]["nonfinite_terms"] == [] and "model_calls" not in report["micro_batches"][0]
    assert "net.layers.0.weight" in report["nonfinite_grads"]


def test_strikes_roll_back_to_the_last_checkpoint_with_a_lower_learning_rate(tmp_path, monkeypatch):
    faults.install(monkeypatch, nan_steps={9, 10, 11})
    cfg = tiny_config(method={"name": "fm"}, train={"steps": 16}, checkpoint={"every": 4},
                      guard={"max_strikes": 3, "lr_factor": 0.25})
    train(cfg, tmp_path / "r", progress=False, evaluate_at_end=False)
    (rollback,) = _events(tmp_path / "r", "rollback")
    assert rollback["step"] == 11 and rollback["to_step"] == 8 and rollback["lr_scale"] == 0.25
    assert [e["action"] for e in _events(tmp_path / "r", "nonfinite")] == ["skip", "skip", "rollback"]
    records = _records(tmp_path / "r")
    at = next(i for i, r in enumerate(records) if r.get("event") == "rollback")
    after = [r for r in records[at:] if "lr" in r]  # the log keeps the undone steps before the rollback event
    assert [r["step"] for r in after] == list(range(8, 16))
    lr = load_run_config(tmp_path / "r" / "config.yaml").optim.lr  # the backbone's default, as recorded
    assert after and all(r["lr"] == pytest.approx(0.25 * lr * lr_factor(cfg, r["step"])) for r in after)
    state = CheckpointStore(tmp_path / "r").load(CheckpointStore(tmp_path / "r").path_for(16)).state
    assert state["guard"]["lr_scale"] == 0.25 and state["guard"]["rollbacks"] == 1


def test_the_guard_stops_with_a_report(tmp_path, monkeypatch):
    faults.install(monkeypatch, nan_steps={2, 3})
    cfg = tiny_config(method={"name": "fm"}, train={"steps": 8}, guard={"max_strikes": 2, "on_divergence": "stop"})
    with pytest.raises(DivergenceError, match="diverged at step 3: 2 non-finite step.*guard.on_divergence=stop") as err:
        train(cfg, tmp_path / "r", progress=False, evaluate_at_end=False)
    assert len(err.value.reports) == 2
    saved = json.loads((tmp_path / "r" / "divergence.json").read_text())
    assert [r["step"] for r in saved["reports"]] == [2, 3] and saved["step"] == 3
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["state"] == "diverged" and saved["run_id"] == status["run_id"]
    assert not (tmp_path / "r" / "model.safetensors").exists()


def test_rollback_without_a_checkpoint_stops(tmp_path, monkeypatch):
    faults.install(monkeypatch, nan_steps={1})
    cfg = tiny_config(method={"name": "fm"}, train={"steps": 4}, guard={"max_strikes": 1})
    with pytest.raises(DivergenceError, match="no checkpoint to roll back to"):
        train(cfg, tmp_path / "r", progress=False, evaluate_at_end=False)


def test_spike_decisions_and_state():
    guard = DivergenceGuard(GuardConfig(max_strikes=2, spike_factor=10.0, spike_window=3, max_rollbacks=1))
    assert not any(guard.is_spike(v) for v in (1.0, 500.0, 2.0))  # the window fills first
    assert guard.is_spike(21.0) and guard.spike() == "skip"  # median 2
    assert not guard.is_spike(3.0) and guard.spikes_in_a_row == 0  # accepted: ends the run of spikes
    assert guard.is_spike(100.0) and guard.spike() == "skip" and guard.is_spike(100.0) and guard.spike() == "rollback"
    restored = DivergenceGuard(GuardConfig(spike_factor=10.0, spike_window=3))
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict() and list(restored.recent) == [500.0, 2.0, 3.0]
    off = DivergenceGuard(GuardConfig())
    assert not any(off.is_spike(v) for v in (1.0, 1e9)) and len(off.recent) == 0
    zero = DivergenceGuard(GuardConfig(spike_factor=2.0, spike_window=2))
    assert not any(zero.is_spike(v) for v in (0.0, 0.0, 1.0))  # a median of 0 judges nothing


def test_loss_spikes_are_skipped_and_a_run_of_them_rolls_back(tmp_path, monkeypatch, caplog):
    faults.install(monkeypatch, spike_steps={6, 9, 10, 11})
    cfg = tiny_config(method={"name": "fm"}, train={"steps": 16}, checkpoint={"every": 4},
                      guard={"spike_factor": 10.0, "spike_window": 4, "max_strikes": 3})
    train(cfg, tmp_path / "r", progress=False, evaluate_at_end=False)
    spikes = _events(tmp_path / "r", "spike")
    assert [(e["step"], e["action"]) for e in spikes] == [(6, "skip"), (9, "skip"), (10, "skip"), (11, "rollback")]
    assert all(e["loss"] > 10 * e["median_loss"] and "diagonal" in e["terms"] for e in spikes)
    (rollback,) = _events(tmp_path / "r", "rollback")
    assert rollback["step"] == 11 and rollback["to_step"] == 8 and rollback["lr_scale"] == 0.5
    assert "is " in caplog.text and "x the median of the last 4 steps" in caplog.text
    state = CheckpointStore(tmp_path / "r").load(CheckpointStore(tmp_path / "r").path_for(16)).state
    assert len(state["guard"]["recent_losses"]) == 4 and state["guard"]["rollbacks"] == 1
    # step 6 was skipped; 9, 10 and 11 were undone by the rollback to step 8 and trained again
    assert state["ema_updates"] == 16 - 1


def test_spike_factor_is_validated():
    with pytest.raises(ConfigError, match="guard.spike_factor must be 0 \\(off\\) or above 1"):
        tiny_config(guard={"spike_factor": 0.5})
    with pytest.raises(ConfigError, match="guard.spike_window must be positive"):
        tiny_config(guard={"spike_window": 0})


def test_the_window_of_recent_losses_is_training_state(tmp_path, monkeypatch):
    """Cut at step 16 of 24 and resumed, a run flags the spike at step 18 as the uninterrupted run
    does (a fresh window would still be filling) and ends bit-identical to it."""
    faults.install(monkeypatch, spike_steps={18})
    cfg = tiny_config(method={"name": "fm"}, guard={"spike_factor": 10.0, "spike_window": 4})
    train(cfg, tmp_path / "full", progress=False, evaluate_at_end=False)
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for name in ("model.safetensors", "model_ema.safetensors"):
        (tmp_path / "cut" / name).unlink()
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_00000024")
    train(cfg, tmp_path / "cut", progress=False, evaluate_at_end=False, resume=True)
    assert [e["step"] for e in _events(tmp_path / "full", "spike")] == [18]
    assert [e["step"] for e in _events(tmp_path / "cut", "spike")] == [18]
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert_same_tensors(weights(tmp_path / "full" / name), weights(tmp_path / "cut" / name))
    logged = [[(r["step"], r["loss"]) for r in _records(d) if "event" not in r] for d in (tmp_path / "full", tmp_path / "cut")]
    assert logged[0] == logged[1] and 18 not in [step for step, _ in logged[0]]
