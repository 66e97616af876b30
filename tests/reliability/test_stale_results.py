"""Stale results never survive: a new or extended run retires the earlier run's final artefacts at its
start, so a kill or a divergence cannot leave old weights beside a new config; the SLURM recipe of
docs/training.md judges a run by status.json."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import flowmaps
from flowmaps.cli import main
from flowmaps.train import loop
from flowmaps.train.rundir import FINAL_NAMES, UnfinishedRunError
from tests.reliability.support import TINY, copy_run, final_weights_belong_to_config, status
from tests.train import faults
from tests.train.tiny import assert_same_tensors, weights

ROOT = Path(__file__).resolve().parents[2]
STOP_EARLY = ["--set", "guard.max_strikes=2", "--set", "guard.on_divergence=stop"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 12-step CLI run with every artefact (weights, metrics, samples, report)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--out", str(run), *TINY]) == 0
    return run


def _leftover_finals(run):
    return [n for n in FINAL_NAMES if n != "divergence.json" and (run / n).exists()]


def test_overwrite_then_divergence_leaves_no_final_artefact_of_the_old_run(finished, tmp_path, monkeypatch, capsys):
    run = copy_run(finished, tmp_path / "run")
    faults.install(monkeypatch, nan_steps={2, 3})
    assert main(["train", "--out", str(run), *TINY, "--method", "fm", "--overwrite", *STOP_EARLY]) == 2
    assert "diverged at step 3" in capsys.readouterr().err
    assert _leftover_finals(run) == []
    assert status(run)["state"] == "diverged" and final_weights_belong_to_config(run)
    assert main(["sample", str(run), "--out", str(tmp_path / "s.npy")]) == 2
    assert "is not a finished run (status: diverged" in capsys.readouterr().err
    assert not (tmp_path / "s.npy").exists()


def test_extension_then_divergence_keeps_the_old_run_only_in_previous(finished, tmp_path, monkeypatch, capsys):
    run = copy_run(finished, tmp_path / "run")
    before = weights(run / "model_ema.safetensors")
    faults.install(monkeypatch, nan_steps={13, 14})
    assert main(["train", "--resume", str(run), "--steps", "20", *STOP_EARLY]) == 2
    assert _leftover_finals(run) == [] and status(run)["state"] == "diverged" and status(run)["steps"] == 20
    with pytest.raises(UnfinishedRunError, match="diverged at step"):
        flowmaps.load(run)
    old = flowmaps.load(run / "previous")  # the 12-step run, whole and verified
    assert_same_tensors(before, {k: v for k, v in old.state_dict().items()})
    assert status(run / "previous")["steps"] == 12 and "steps: 12" in (run / "previous" / "config.yaml").read_text()
    assert main(["sample", str(run), "--out", str(tmp_path / "s.npy")]) == 2
    capsys.readouterr()


def test_a_crash_in_an_extension_leaves_a_resumable_run(finished, tmp_path, monkeypatch):
    """An exception at step 14 of an extension to 20: status ``failed``, no final weights, the 12-step run
    in previous/, and resuming ends exactly where an uninterrupted extension ends."""
    reference = copy_run(finished, tmp_path / "reference")
    assert main(["train", "--resume", str(reference), "--steps", "20"]) == 0
    run = copy_run(finished, tmp_path / "run")
    step = loop.Trainer.train_step

    def crashing(self, index, stop_requested):
        if index == 14:
            raise RuntimeError("injected crash")
        return step(self, index, stop_requested)

    monkeypatch.setattr(loop.Trainer, "train_step", crashing)
    with pytest.raises(RuntimeError, match="injected crash"):
        main(["train", "--resume", str(run), "--steps", "20"])
    assert status(run)["state"] == "failed" and "injected crash" in status(run)["message"]
    assert _leftover_finals(run) == [] and (run / "previous" / "model.safetensors").is_file()
    assert not (run / "run.lock").exists()
    monkeypatch.setattr(loop.Trainer, "train_step", step)
    assert main(["train", "--resume", str(run), "--steps", "20"]) == 0
    assert status(run)["state"] == "finished"
    assert_same_tensors(weights(reference / "model.safetensors"), weights(run / "model.safetensors"))


def _recipe_decision() -> str:
    """The requeue decision of the SLURM recipe in docs/training.md: from ``state=$(`` to its ``fi``."""
    text = (ROOT / "docs" / "training.md").read_text()
    match = re.search(r"^state=\$\(.*?^fi$", text, re.S | re.M)
    assert match, "docs/training.md: the SLURM recipe does not read status.json"
    return match.group(0)


@pytest.mark.parametrize("state,requeued", [("running", True), ("interrupted", True), ("finished", False),
                                            ("diverged", False), ("failed", False), (None, False)])
def test_the_slurm_recipe_requeues_by_status(tmp_path, state, requeued):
    """The recipe requeues a run that was killed (``running``) or stopped by a signal, never one that
    finished, diverged or failed, and never one that did not start (no status.json)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"stale")  # what the old recipe took for "finished"
    if state is not None:
        (run / "status.json").write_text(f'{{"format": 1, "state": "{state}", "step": 3, "steps": 9}}')
    script = "scontrol() { echo \"requeue $*\"; }\n" + _recipe_decision()
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # `python` is this interpreter
    env = {**os.environ, "RUN": str(run), "SLURM_JOB_ID": "42", "PATH": path}
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert ("requeue 42" in done.stdout) == requeued, (state, done.stdout, done.stderr)


def test_previous_holds_the_run_the_latest_extension_started_from(tmp_path):
    from flowmaps.train.loop import train
    from tests.reliability.support import tiny

    run = tmp_path / "run"
    for steps in (8, 16, 24):
        train(tiny(train={"steps": steps}), run, progress=False, evaluate_at_end=False, resume=steps > 8)
        if steps > 8:
            assert status(run / "previous")["steps"] == steps - 8 and flowmaps.load(run / "previous") is not None
    assert status(run)["steps"] == 24 and [s["steps"] for s in status(run)["sessions"]] == [8, 16, 24]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".previous")]
