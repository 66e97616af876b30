"""Checkpoint files: atomic, verified, retained as last K plus best, and never unpickled."""

import json
import os
import pickle

import pytest
import torch

from flowmaps.flow_map import FlowMap
from flowmaps.nets import MLP
from flowmaps.train.checkpoint import (
    MANIFEST_FILE, MODEL_FILE, STATE_FILE, CheckpointError, CheckpointStore, capture_rng, load_weights, restore_rng,
    save_weights,
)


def _model(seed: int = 0) -> FlowMap:
    torch.manual_seed(seed)
    return FlowMap(MLP(2, width=8, depth=1))


def _state(step: int) -> dict:
    opt = torch.optim.Adam(_model().parameters())
    return {"step": step, "optimizer": opt.state_dict(), "rng": [capture_rng()], "note": None}


def _save(store: CheckpointStore, step: int, metric=None, seed: int = 0):
    return store.save(step, _model(seed), _model(seed + 100), _state(step), metric)


def test_round_trip_restores_weights_and_state(tmp_path):
    store = CheckpointStore(tmp_path)
    saved = _save(store, 5, metric=0.25, seed=1)
    assert saved.path.name == "step_00000005" and saved.path.is_dir()
    loaded = store.load(saved)
    assert loaded.checkpoint.step == 5 and loaded.checkpoint.metric == 0.25 and loaded.state["step"] == 5
    model, ema = _model(7), _model(8)
    loaded.apply_weights(model, ema)
    for a, b in zip(model.parameters(), _model(1).parameters()):
        assert torch.equal(a, b)
    for a, b in zip(ema.parameters(), _model(101).parameters()):
        assert torch.equal(a, b)
    assert loaded.state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)


def test_rng_states_round_trip():
    import random

    import numpy as np

    state = capture_rng()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()
    restore_rng(state)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]


def test_retention_keeps_last_k_plus_best(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2, keep_best=True)
    for step, metric in [(1, 0.9), (2, 0.1), (3, 0.5), (4, 0.7), (5, 0.6)]:
        _save(store, step, metric)
    assert [c.step for c in store.checkpoints()] == [2, 4, 5]  # best (0.1) plus the newest two
    store_no_best = CheckpointStore(tmp_path / "b", keep_last=2, keep_best=False)
    for step in (1, 2, 3):
        _save(store_no_best, step, metric=0.1 * step)
    assert [c.step for c in store_no_best.checkpoints()] == [2, 3]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_corrupted_checkpoint_is_reported_and_skipped(tmp_path, damage):
    store = CheckpointStore(tmp_path, keep_last=3)
    _save(store, 1, seed=1)
    bad = _save(store, 2, seed=2)
    target = bad.path / MODEL_FILE
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-50])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-3] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    else:
        (bad.path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="step_00000002"):
        store.load(bad)
    reports = []
    loaded = store.latest_valid(report=reports.append)
    assert loaded is not None and loaded.checkpoint.step == 1
    assert len(reports) == 1 and "skipping a bad checkpoint" in reports[0] and "step_00000002" in reports[0]


def test_state_file_with_arbitrary_objects_is_refused(tmp_path):
    """A state file that would run code when unpickled is rejected, even with a matching manifest."""
    import hashlib

    store = CheckpointStore(tmp_path)
    saved = _save(store, 3)

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    payload = pickle.dumps({"step": 3, "x": Boom()}, protocol=2)
    (saved.path / STATE_FILE).write_bytes(payload)
    manifest = json.loads((saved.path / MANIFEST_FILE).read_text())
    manifest["files"][STATE_FILE] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (saved.path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        store.load(saved)
    assert not (tmp_path / "pwned").exists()


def test_interrupted_writes_leave_no_checkpoint(tmp_path, monkeypatch):
    """A write that dies before the rename leaves only a hidden temporary directory, removed at the next start."""
    import flowmaps.train.checkpoint as ckpt

    store = CheckpointStore(tmp_path)
    _save(store, 1)
    calls = []

    def dying_write(path, data):
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt  # stands in for the process dying mid-write
        path.write_bytes(data)

    monkeypatch.setattr(ckpt, "_write_bytes", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _save(store, 2)
    assert [c.step for c in store.checkpoints()] == [1]
    leftovers = [p for p in store.root.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []  # the failed writer cleans up after itself when it can
    hidden = store.root / ".tmp-step_00000003-killed"
    hidden.mkdir()
    (hidden / MODEL_FILE).write_bytes(b"partial")
    store.remove_temporaries()
    assert not hidden.exists()


def test_saving_the_same_step_again_replaces_it(tmp_path):
    store = CheckpointStore(tmp_path)
    _save(store, 4, seed=1)
    _save(store, 4, seed=2)
    model, ema = _model(0), _model(0)
    store.load(store.path_for(4)).apply_weights(model, ema)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), _model(2).parameters()))
    assert [p.name for p in store.root.iterdir()] == ["step_00000004"]


def test_weights_files(tmp_path):
    model = _model(3)
    save_weights(model, tmp_path / "w.safetensors")
    other = _model(4)
    load_weights(other, tmp_path / "w.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(other, tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt or not a safetensors file"):
        load_weights(other, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="does not match the model"):
        load_weights(FlowMap(MLP(2, width=4, depth=1)), tmp_path / "w.safetensors")
