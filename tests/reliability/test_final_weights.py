"""Verified final weights: written with a manifest, checked on load (flowmaps.load, sample, --teacher)
for integrity, identity and finite values; a non-finite sample is an error, not a file."""

import hashlib
import json
import re

import numpy as np
import pytest
import torch

import flowmaps
from flowmaps.cli import main
from flowmaps.train.checkpoint import CheckpointError
from flowmaps.train.loop import TrainingInterrupted, train
from flowmaps.train.rundir import RunDirectoryError, UnfinishedRunError
from tests.reliability.support import TINY, copy_run, reseal_manifest, rewrite_weights, status, tiny, trained
from tests.train import faults


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--data", "8gaussians", "--out", str(run), *TINY]) == 0
    return run


def _poison(state):
    key = next(iter(state))
    state[key].view(-1)[0] = float("nan")


def _sample(run, out, capsys, *extra):
    code = main(["sample", str(run), "--n", "64", "--out", str(out), *extra])
    return code, capsys.readouterr()


def test_final_weights_carry_a_manifest_and_the_run_identity(finished):
    from safetensors import safe_open

    manifest, run_status = json.loads((finished / "manifest.json").read_text()), status(finished)
    assert manifest["metadata"]["flowmaps_run_id"] == run_status["run_id"]
    assert manifest["metadata"]["flowmaps_config_hash"] == run_status["config_hash"]
    for name, entry in manifest["files"].items():
        data = (finished / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        with safe_open(str(finished / name), "pt") as f:
            assert f.metadata()["flowmaps_run_id"] == run_status["run_id"]
    assert json.loads((finished / "metrics.json").read_text())["run_id"] == run_status["run_id"]
    assert flowmaps.load(finished).provenance["state"] == "finished"


def test_one_nan_in_the_ema_weights_is_refused_by_sample(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    rewrite_weights(run / "model_ema.safetensors", _poison)
    code, out = _sample(run, tmp_path / "s.npy", capsys)
    assert code == 2 and "model_ema.safetensors is corrupted (SHA-256 does not match the manifest)" in out.err
    assert not (tmp_path / "s.npy").exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_a_nan_with_a_consistent_manifest_or_without_one_is_refused(finished, tmp_path, legacy):
    """An adversary who reseals the manifest, or a run written before manifests existed: the values are
    still checked."""
    run = copy_run(finished, tmp_path / "run")
    rewrite_weights(run / "model_ema.safetensors", _poison)
    if legacy:
        (run / "manifest.json").unlink()
        (run / "status.json").unlink()
    else:
        reseal_manifest(run)
    with pytest.raises(CheckpointError, match=r"model_ema.safetensors holds 1 non-finite value\(s\) \(NaN or inf\)"):
        flowmaps.load(run)


def test_a_run_written_before_status_json_still_loads(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    for name in ("status.json", "manifest.json"):
        (run / name).unlink()
    model = flowmaps.load(run)
    assert torch.isfinite(model(torch.randn(4, 2), 1.0, 0.0)).all() and model.provenance["run_id"] is None


@pytest.mark.parametrize("damage,message", [
    ("truncate", "truncated or altered"),
    ("manifest", "weights manifest .* is missing or malformed"),
    ("swap", "carries the identity"),
    ("config", "config.yaml was changed after the run finished"),
    ("garbage", "truncated or altered"),
])
def test_damaged_final_artefacts_are_named(finished, tmp_path, damage, message):
    run = copy_run(finished, tmp_path / "run")
    ema = run / "model_ema.safetensors"
    if damage == "truncate":
        ema.write_bytes(ema.read_bytes()[:-10])
    elif damage == "manifest":
        (run / "manifest.json").unlink()
    elif damage == "swap":  # another run's (valid, finite) weights, with the manifest resealed
        other = trained(tmp_path / "other", model={"width": 16, "depth": 1}, train={"steps": 2})
        ema.write_bytes((other / "model_ema.safetensors").read_bytes())
        reseal_manifest(run)
    elif damage == "config":
        text = (run / "config.yaml").read_text()
        changed = re.sub(r"(?m)^  lr: .*$", "  lr: 0.0123", text)  # another learning rate than it trained with
        assert changed != text
        (run / "config.yaml").write_text(changed)
    else:
        ema.write_bytes(b"\x00" * 16)
    with pytest.raises((CheckpointError, RunDirectoryError), match=message):
        flowmaps.load(run)


def test_a_teacher_with_nan_weights_is_refused(finished, tmp_path, capsys):
    teacher = copy_run(finished, tmp_path / "teacher")
    rewrite_weights(teacher / "model_ema.safetensors", _poison)
    reseal_manifest(teacher)
    code = main(["train", "--data", "8gaussians", "--method", "ect", "--teacher", str(teacher),
                 "--out", str(tmp_path / "student"), *TINY])
    assert code == 2 and "holds 1 non-finite value(s)" in capsys.readouterr().err


def test_non_finite_samples_are_an_error_not_a_file(finished, tmp_path, capsys):
    """Finite weights large enough to overflow: the samples would be inf or NaN."""
    run = copy_run(finished, tmp_path / "run")

    def blow_up(state):
        for value in state.values():
            value.mul_(1e30)

    rewrite_weights(run / "model_ema.safetensors", blow_up)
    reseal_manifest(run)
    code, out = _sample(run, tmp_path / "s.npy", capsys)
    assert code == 2 and "samples from" in out.err and "are non-finite (NaN or inf)" in out.err, out.err
    assert not (tmp_path / "s.npy").exists() and not (tmp_path / "s.json").exists()


def test_an_unfinished_run_is_refused_unless_allowed(tmp_path, monkeypatch, capsys):
    faults.install(monkeypatch, sigterm_step=9)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(tiny(method={"name": "fm"}), tmp_path / "run", progress=False, evaluate_at_end=False)
    run, checkpoint = tmp_path / "run", stopped.value.checkpoint.name
    refusal = f"is not a finished run .status: interrupted at step {stopped.value.step}"
    with pytest.raises(UnfinishedRunError, match=refusal):
        flowmaps.load(run)
    model = flowmaps.load(run, allow_unfinished=True)
    assert model.provenance["weights"] == f"{checkpoint}/model_ema.safetensors"
    assert _sample(run, tmp_path / "s.npy", capsys)[0] == 2
    code, out = _sample(run, tmp_path / "s.npy", capsys, "--allow-unfinished")
    assert code == 0 and f"using the weights of its checkpoint {checkpoint}" in out.err
    meta = json.loads((tmp_path / "s.json").read_text())
    assert meta["run_state"] == "interrupted" and meta["weights_file"].startswith(checkpoint)
    assert np.isfinite(np.load(tmp_path / "s.npy")).all()
