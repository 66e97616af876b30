"""Resume checks what it resumes: the data (file hash or built-in name), the method and the model must be
those of the checkpoint; a resume without a valid checkpoint refuses unless asked to restart."""

import json
import shutil

import numpy as np
import pytest

from flowmaps.cli import main
from flowmaps.train.checkpoint import CheckpointStore
from flowmaps.train.loop import train
from flowmaps.train.rundir import RunDirectoryError
from tests.reliability.support import TINY, status, tiny, trained
from tests.train.tiny import assert_same_tensors, weights, write_array_data


def _cut(run, keep_step):
    """Make ``run`` look killed after its checkpoint ``keep_step``: later checkpoints and final files gone."""
    for path in (run / "checkpoints").iterdir():
        if int(path.name.split("_")[1]) > keep_step:
            shutil.rmtree(path)
    for name in ("model.safetensors", "model_ema.safetensors", "manifest.json", "metrics.json"):
        (run / name).unlink(missing_ok=True)
    (run / "status.json").write_text(json.dumps({**status(run), "state": "running", "step": keep_step}))
    return run


def test_a_changed_data_file_is_refused(tmp_path):
    data = write_array_data(tmp_path / "data.npy", rows=150)
    cfg = tiny(data=data)
    run = _cut(trained(tmp_path / "run", data=data), 16)
    np.save(data, np.load(data) * 2)  # the same path, other data
    with pytest.raises(RunDirectoryError, match="cannot be resumed: its checkpoint step_00000016 was trained with data "
                                                "'sha256:"):
        train(cfg, run, progress=False, evaluate_at_end=False, resume=True)
    assert status(run)["state"] == "running" and not (run / "run.lock").exists()


@pytest.mark.parametrize("old,new,key", [
    ("diagonal_fraction: 0.25", "diagonal_fraction: 0.5", "method"),
    ("width: 32", "width: 48", "model"),
])
def test_a_changed_method_or_model_is_refused(tmp_path, capsys, old, new, key):
    run = _cut(trained(tmp_path / "run", method={"name": "lsd", "diagonal_fraction": 0.25}), 16)
    text = (run / "config.yaml").read_text()
    assert old in text
    (run / "config.yaml").write_text(text.replace(old, new))
    assert main(["train", "--resume", str(run)]) == 2
    assert f"was trained with {key} " in capsys.readouterr().err


def test_a_resume_without_a_checkpoint_refuses_unless_restart(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY, "--set", "checkpoint.every=0"]) == 0
    assert main(["train", "--resume", str(run), "--steps", "16"]) == 2
    assert "has no valid checkpoint to resume from" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "other"), *TINY, "--restart"]) == 2
    assert "--restart goes with --resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--steps", "16", "--restart"]) == 0
    assert status(run)["steps"] == 16 and status(run)["sessions"][0]["from_step"] == 0
    assert status(run / "previous")["steps"] == 12


def test_a_checkpoint_without_a_run_record_still_resumes(tmp_path, caplog):
    """Checkpoints written before they recorded their run: resumed, with a warning that nothing was checked."""
    full = trained(tmp_path / "full")
    run = _cut(trained(tmp_path / "run"), 16)
    manifest_path = CheckpointStore(run).path_for(16) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["run"]
    manifest_path.write_text(json.dumps(manifest))
    train(tiny(), run, progress=False, evaluate_at_end=False, resume=True)
    assert "was written before checkpoints recorded their run" in caplog.text
    assert_same_tensors(weights(full / "model.safetensors"), weights(run / "model.safetensors"))


def test_a_finished_run_resumed_with_its_own_config_is_left_alone(tmp_path, capsys):
    run = trained(tmp_path / "run")
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(run)]) == 0
    assert "is already finished" in capsys.readouterr().err
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()} == before
