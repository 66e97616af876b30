"""One process per run directory: run.lock is held for the life of the process, a second trainer gets a
named error, and a lock left by a killed process is taken over with a warning."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flowmaps.cli import main
from flowmaps.train.guard import DivergenceError
from flowmaps.train.lock import RunLock, RunLockedError
from flowmaps.train.loop import TrainingInterrupted, train
from flowmaps.train.rundir import RunDirectoryError
from tests.reliability.support import TINY, status, tiny, trained
from tests.train import faults
from tests.train.tiny import assert_same_tensors, weights

ROOT = Path(__file__).resolve().parents[2]


def _paused_child(args, pause_at):
    """The CLI in a child process that stops inside its ``pause_at``-th file write (see kill_target.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "FLOWMAPS_TEST_PAUSE_AT": str(pause_at)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests/reliability/kill_target.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    for line in proc.stdout:
        if "PAUSED " in line:
            return proc
    raise AssertionError(f"the child never paused (exit {proc.wait()})")


def test_a_second_trainer_on_one_out_gets_a_named_error(tmp_path, capsys):
    """While one process trains into RUN, a second one (new, --overwrite or --resume) exits 2 naming the
    holder and touches nothing; once the first is killed, its lock is taken over with a warning and the
    run resumes to the result of an uninterrupted run."""
    reference = tmp_path / "reference"
    assert main(["train", "--out", str(reference), *TINY]) == 0
    run = tmp_path / "run"
    child = _paused_child(["train", "--out", str(run), *TINY], pause_at=9)  # inside the step-8 checkpoint
    try:
        holder = json.loads((run / "run.lock").read_text())
        assert holder["pid"] == child.pid and holder["host"] == socket.gethostname()
        listing = sorted(p.name for p in run.iterdir())
        for extra in ([], ["--overwrite"]):
            assert main(["train", "--out", str(run), *TINY, *extra]) == 2
            err = capsys.readouterr().err
            assert f"is in use by another flowmaps process (PID {child.pid} on host" in err, err
        assert main(["train", "--resume", str(run)]) == 2
        assert "in use by another flowmaps process" in capsys.readouterr().err
        assert sorted(p.name for p in run.iterdir()) == listing and (run / "checkpoints" / "step_00000004").is_dir()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (run / "run.lock").exists() and status(run)["state"] == "running"  # what a SIGKILL leaves
    assert main(["train", "--resume", str(run)]) == 0
    assert f"taking over the stale lock {run / 'run.lock'} of PID {child.pid}" in capsys.readouterr().err
    assert not (run / "run.lock").exists() and status(run)["state"] == "finished"
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert_same_tensors(weights(reference / name), weights(run / name))


def test_lock_file_rules(tmp_path):
    warnings = []
    first = RunLock(tmp_path, warn=warnings.append).acquire()
    with pytest.raises(RunLockedError, match=f"PID {os.getpid()} on host"):
        RunLock(tmp_path).acquire()  # another open file description: flock refuses it
    first.release()
    assert not (tmp_path / "run.lock").exists()
    with RunLock(tmp_path):
        assert (tmp_path / "run.lock").is_file()
    assert warnings == []


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


@pytest.mark.parametrize("holder,outcome", [
    ("dead", "stale lock"), ("other-host", "of PID 1 on host elsewhere"), ("garbage", None), ("live", "error"),
])
def test_a_leftover_lock_file_is_judged_by_its_holder(tmp_path, holder, outcome):
    """The flock of a leftover file is free; its recorded holder decides: a dead PID here or a holder on
    another host is taken over with a warning, a live PID here (a file system that ignores flock) refuses."""
    contents = {"dead": {"pid": _dead_pid(), "host": socket.gethostname()},
                "other-host": {"pid": 1, "host": "elsewhere"},
                "live": {"pid": os.getppid(), "host": socket.gethostname()}}
    (tmp_path / "run.lock").write_text(json.dumps(contents[holder]) if holder in contents else "\x00garbage")
    warnings = []
    if outcome == "error":
        with pytest.raises(RunLockedError, match="does not enforce the lock, the holder is alive"):
            RunLock(tmp_path, warn=warnings.append).acquire()
        return
    lock = RunLock(tmp_path, warn=warnings.append).acquire()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (outcome is None and warnings == []) or (len(warnings) == 1 and outcome in warnings[0]), warnings


def test_the_lock_is_released_on_every_exit(tmp_path, monkeypatch):
    trained(tmp_path / "ok", train={"steps": 2})
    with pytest.raises(RunDirectoryError, match="already holds a flowmaps run"):
        trained(tmp_path / "ok", train={"steps": 2})
    faults.install(monkeypatch, nan_steps={1})
    with pytest.raises(DivergenceError):
        train(tiny(method={"name": "fm"}, train={"steps": 4}, guard={"max_strikes": 1}), tmp_path / "diverged",
              progress=False, evaluate_at_end=False)
    faults.install(monkeypatch, sigterm_step=1)
    with pytest.raises(TrainingInterrupted):
        train(tiny(method={"name": "fm"}, train={"steps": 4}), tmp_path / "stopped", progress=False,
              evaluate_at_end=False)
    with pytest.raises(ValueError, match="divisible"):
        train(tiny(train={"grad_accum": 3}), tmp_path / "bad", progress=False, evaluate_at_end=False)
    for name, state in (("ok", "finished"), ("diverged", "diverged"), ("stopped", "interrupted"), ("bad", None)):
        assert not (tmp_path / name / "run.lock").exists(), name
        assert (status(tmp_path / name)["state"] if state else None) == state
