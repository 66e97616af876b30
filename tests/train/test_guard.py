"""The divergence guard: a NaN loss is skipped and explained, then rolled back from or stopped on."""

import json

import pytest

from flowmaps.train.checkpoint import CheckpointStore
from flowmaps.train.config import GuardConfig
from flowmaps.train.guard import DivergenceError, DivergenceGuard
from flowmaps.train.loop import lr_factor, train
from tests.train import faults
from tests.train.tiny import tiny_config


def _events(run_dir, kind):
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("event") == kind]


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
    assert mb["nonfinite_terms"] and set(mb["nonfinite_terms"]) <= {"diagonal", "lagrangian"}
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
    records = [json.loads(line) for line in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()]
    at = next(i for i, r in enumerate(records) if r.get("event") == "rollback")
    after = [r for r in records[at:] if "lr" in r]  # the log keeps the undone steps before the rollback event
    assert [r["step"] for r in after] == list(range(8, 16))
    assert after and all(r["lr"] == pytest.approx(0.25 * cfg.optim.lr * lr_factor(cfg, r["step"])) for r in after)
    state = CheckpointStore(tmp_path / "r").load(CheckpointStore(tmp_path / "r").path_for(16)).state
    assert state["guard"]["lr_scale"] == 0.25 and state["guard"]["rollbacks"] == 1


def test_the_guard_stops_with_a_report(tmp_path, monkeypatch):
    faults.install(monkeypatch, nan_steps={2, 3})
    cfg = tiny_config(method={"name": "fm"}, train={"steps": 8}, guard={"max_strikes": 2, "on_divergence": "stop"})
    with pytest.raises(DivergenceError, match="diverged at step 3: 2 non-finite step.*guard.on_divergence=stop") as err:
        train(cfg, tmp_path / "r", progress=False, evaluate_at_end=False)
    assert len(err.value.reports) == 2
    saved = json.loads((tmp_path / "r" / "divergence.json").read_text())
    assert [r["step"] for r in saved] == [2, 3]
    assert not (tmp_path / "r" / "model.safetensors").exists()


def test_rollback_without_a_checkpoint_stops(tmp_path, monkeypatch):
    faults.install(monkeypatch, nan_steps={1})
    cfg = tiny_config(method={"name": "fm"}, train={"steps": 4}, guard={"max_strikes": 1})
    with pytest.raises(DivergenceError, match="no checkpoint to roll back to"):
        train(cfg, tmp_path / "r", progress=False, evaluate_at_end=False)
