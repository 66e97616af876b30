"""SIGKILL a training process at random points, checkpoint writes included; resuming must end bit-identical."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowmaps.train.checkpoint import CheckpointStore
from flowmaps.build import config_from_dict
from flowmaps.train.loop import train
from tests.train.tiny import assert_same_tensors, tiny_values, weights, write_array_data

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 40, 4


def _child(args, pause_at=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("FLOWMAPS_TEST_PAUSE_AT", None)
    if pause_at is not None:
        env["FLOWMAPS_TEST_PAUSE_AT"] = str(pause_at)
    return subprocess.Popen([sys.executable, str(ROOT / "tests/train/kill_target.py"), "train", "--no-progress", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def _logged_steps(run_dir):
    path = run_dir / "train_log.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _kill_at_pause(proc):
    for line in proc.stdout:
        if line.startswith("PAUSED"):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return line.split()[1]
    raise AssertionError(f"the child never paused (exit {proc.wait()})")


def _kill_after(proc, run_dir, steps, timeout=120.0):
    deadline = time.monotonic() + timeout
    while _logged_steps(run_dir) < steps:
        assert proc.poll() is None, f"the child ended early: {proc.stdout.read()}"
        assert time.monotonic() < deadline, "the child made no progress"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path):
    data = write_array_data(tmp_path / "data.npy", rows=150)
    values = tiny_values(data, train={"steps": STEPS}, checkpoint={"every": EVERY, "keep_last": 2})
    reference = train(config_from_dict(values), tmp_path / "reference", progress=False, evaluate_at_end=False)

    run = tmp_path / "run"
    first = ["--out", str(run)] + [f"--set={s}.{k}={json.dumps(v)}" for s, e in values.items() for k, v in e.items()]
    rng = random.Random(6)
    store = CheckpointStore(run)
    kills = []
    for round_ in range(4):
        args = first if round_ == 0 else ["--resume", str(run)]
        done = store.checkpoints()[-1].step if store.checkpoints() else 0
        if round_ % 2 == 0:  # inside the 2nd or 3rd checkpoint write: weights, EMA, state or manifest
            pause = rng.randrange(4, 12)
            cut = Path(_kill_at_pause(_child(args, pause_at=pause)))
            kills.append(("write", pause, cut.name))
            assert cut.parent.name.startswith(".tmp-") and cut.is_file()  # a half-written file was left behind
        else:  # anywhere in the next few steps
            target = done + rng.randrange(EVERY + 1, 3 * EVERY)
            kills.append(("step", target))
            _kill_after(_child(args), run, target)
        for checkpoint in store.checkpoints():  # no corrupted state: everything listed verifies
            store.load(checkpoint)
        assert store.checkpoints()[-1].step > done  # each life made progress
    final = _child(["--resume", str(run)])
    output = final.communicate()[0]
    assert final.returncode == 0, output
    assert "resuming from" in output, output
    assert not any(n.startswith(".tmp-") for n in os.listdir(run / "checkpoints"))

    for name in ("model.safetensors", "model_ema.safetensors"):
        assert_same_tensors(weights(reference.run_dir / name), weights(run / name))
    a = store.load(store.path_for(STEPS)).state
    b = CheckpointStore(reference.run_dir).load(CheckpointStore(reference.run_dir).path_for(STEPS)).state
    for k, v in a["optimizer"]["state"].items():
        assert_same_tensors(v, b["optimizer"]["state"][k])
    assert a["data"] == b["data"] and a["ema_updates"] == b["ema_updates"] == STEPS
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    ref_log = [json.loads(line) for line in (reference.run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(STEPS))
    assert [r["loss"] for r in log] == [r["loss"] for r in ref_log]
    print("kills:", kills)
