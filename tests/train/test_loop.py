"""The training loop: exact resume, signals, run-directory rules, and the CLI's --resume."""

import json
import shutil
import signal

import pytest
import torch

from flowmaps.cli import main
from flowmaps.train.checkpoint import CheckpointStore
from flowmaps.train.loop import TrainingInterrupted, train
from flowmaps.train.rundir import RunDirectoryError
from tests.train import faults
from tests.train.tiny import assert_same_tensors, tiny_config, tiny_values, weights, write_array_data


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _final_state(run_dir, step):
    return CheckpointStore(run_dir).load(CheckpointStore(run_dir).path_for(step))


def _assert_same_run(a, b, step):
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert_same_tensors(weights(a / name), weights(b / name))
    sa, sb = _final_state(a, step).state, _final_state(b, step).state
    for k, v in sa["optimizer"]["state"].items():
        assert_same_tensors(v, sb["optimizer"]["state"][k])
    assert sa["ema_updates"] == sb["ema_updates"] and sa["data"] == sb["data"]
    assert all(torch.equal(sa["generators"][k], sb["generators"][k]) for k in sa["generators"])
    la, lb = ([r for r in _log(d) if "event" not in r] for d in (a, b))
    assert [r["step"] for r in lb] == list(range(step))  # each step logged once, the redone ones replaced
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


@pytest.fixture
def array_data(tmp_path):
    return write_array_data(tmp_path / "data.npy", rows=150)


def test_resume_continues_bit_identically(tmp_path, array_data):
    """Resuming from step 16 of 24 gives the weights, optimiser, EMA, data order, RNG and log of an
    uninterrupted run (array data: the epoch order is part of the state)."""
    cfg = tiny_config(array_data)
    train(cfg, tmp_path / "full", progress=False, evaluate_at_end=False)
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for name in ("model.safetensors", "model_ema.safetensors"):
        (tmp_path / "cut" / name).unlink()
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_00000024")
    with (tmp_path / "cut" / "train_log.jsonl").open("a") as f:
        f.write('{"step": 16, "loss": 123.0}\n{"step": 17, "lo')  # what a kill mid-write leaves
    train(cfg, tmp_path / "cut", progress=False, evaluate_at_end=False, resume=True)
    _assert_same_run(tmp_path / "full", tmp_path / "cut", 24)


def test_sigterm_writes_a_checkpoint_and_the_run_resumes_exactly(tmp_path, monkeypatch):
    cfg = tiny_config(method={"name": "fm"}, checkpoint={"every": 10})
    faults.install(monkeypatch)
    train(cfg, tmp_path / "full", progress=False, evaluate_at_end=False)
    faults.install(monkeypatch, sigterm_step=5)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(cfg, tmp_path / "cut", progress=False, evaluate_at_end=False)
    assert stopped.value.signum == signal.SIGTERM and stopped.value.step in (6, 7)
    assert stopped.value.checkpoint.is_dir() and not (tmp_path / "cut" / "model.safetensors").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers are put back
    assert _log(tmp_path / "cut")[-1]["event"] == "interrupted"
    train(cfg, tmp_path / "cut", progress=False, evaluate_at_end=False, resume=True)
    _assert_same_run(tmp_path / "full", tmp_path / "cut", 24)
    assert [r["event"] for r in _log(tmp_path / "cut") if "event" in r] == ["interrupted"]  # kept in the history


def test_a_fresh_start_refuses_a_directory_with_checkpoints(tmp_path):
    cfg = tiny_config(train={"steps": 8})
    train(cfg, tmp_path / "r", progress=False, evaluate_at_end=False)
    with pytest.raises(RunDirectoryError, match="already holds a flowmaps run.*--resume"):
        train(cfg, tmp_path / "r", progress=False, evaluate_at_end=False)
    train(cfg, tmp_path / "r", progress=False, evaluate_at_end=False, overwrite=True)
    assert [c.step for c in CheckpointStore(tmp_path / "r").checkpoints()] == [8]


def test_resume_without_a_checkpoint_refuses_unless_restart(tmp_path, caplog):
    """A resume that finds no checkpoint to continue refuses (it used to start from step 0 silently);
    ``restart=True`` starts the run again from step 0, exactly like a new run of that config."""
    cfg = tiny_config(train={"steps": 6}, checkpoint={"every": 0})
    train(cfg, tmp_path / "a", progress=False, evaluate_at_end=False)
    assert not (tmp_path / "a" / "checkpoints").exists()  # every = 0: no periodic or final checkpoint
    longer = tiny_config(train={"steps": 8}, checkpoint={"every": 0})
    with pytest.raises(RunDirectoryError, match="no valid checkpoint to resume from.*--restart"):
        train(longer, tmp_path / "a", progress=False, evaluate_at_end=False, resume=True)
    train(longer, tmp_path / "a", progress=False, evaluate_at_end=False, resume=True, restart=True)
    assert "--restart starts the run again from step 0" in caplog.text
    train(longer, tmp_path / "fresh", progress=False, evaluate_at_end=False)
    assert_same_tensors(weights(tmp_path / "fresh" / "model.safetensors"), weights(tmp_path / "a" / "model.safetensors"))
    assert json.loads((tmp_path / "a" / "previous" / "status.json").read_text())["steps"] == 6  # the 6-step run, kept


def test_one_process_shards_match_a_plain_batch_when_there_is_one_shard(tmp_path):
    """grad_accum splits the batch into shards with their own streams; with one shard nothing changes,
    and two shards of a batch give a different but equally valid run."""
    one = train(tiny_config(train={"steps": 4}), tmp_path / "one", progress=False, evaluate_at_end=False)
    two = train(tiny_config(train={"steps": 4, "grad_accum": 2}), tmp_path / "two", progress=False,
                evaluate_at_end=False)
    a, b = weights(one.run_dir / "model.safetensors"), weights(two.run_dir / "model.safetensors")
    assert not torch.equal(a["net.layers.0.weight"], b["net.layers.0.weight"])
    with pytest.raises(ValueError, match="train.batch_size=64 must be divisible by .* 3"):
        train(tiny_config(train={"grad_accum": 3}), tmp_path / "three", progress=False, evaluate_at_end=False)


def test_low_precision_needs_cuda(tmp_path):
    with pytest.raises(ValueError, match="train.precision=bf16 needs a CUDA device"):
        train(tiny_config(train={"precision": "bf16"}), tmp_path / "r", progress=False, evaluate_at_end=False)


def test_cli_resume(tmp_path, capsys):
    values = tiny_values(train={"steps": 10}, checkpoint={"every": 5})
    args = [f"--set={section}.{key}={json.dumps(value)}" for section, entries in values.items()
            for key, value in (entries.items() if isinstance(entries, dict) else [])]
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--no-progress", *args]) == 0
    assert main(["train", "--out", str(out), "--no-progress", *args]) == 2
    assert "already holds a flowmaps run" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--steps", "14", "--no-progress"]) == 0
    text = capsys.readouterr()
    assert "resuming lsd" in text.out and "resuming from" in text.err
    assert [r["step"] for r in _log(out)] == list(range(14))
    assert main(["train", "--resume", str(out), "--method", "fm"]) == 2
    assert "cannot be combined with --method" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--set", "optim.lr=1"]) == 2
    assert "would change what a resumed run computes" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "is not a flowmaps run directory" in capsys.readouterr().err
