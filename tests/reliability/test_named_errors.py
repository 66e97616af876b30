"""Every failure a user can cause is ``flowmaps: error: ...`` naming what and where, with exit status 2:
paths that are files, read-only and full file systems, parse errors, device strings, memory limits,
and malformed files that look valid. A failed write keeps the last good checkpoint and final weights.

Tests run as root, for whom chmod does not make anything read-only: read-only file systems, missing
permissions and full disks are simulated by making the system calls fail with the errno they would give.
"""

import errno
import io
import json
import os
import pathlib

import numpy as np
import pytest
import torch

import flowmaps
import flowmaps.train.checkpoint as checkpoint_module
from flowmaps.cli import main
from flowmaps.train.checkpoint import CheckpointStore
from tests.reliability.support import TINY, copy_run, status
from tests.train.tiny import assert_same_tensors, weights


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--out", str(run), *TINY]) == 0
    return run


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "flowmaps: error: " in err and "Traceback" not in err, err
    return err


def _fail_for(monkeypatch, owner, name, code, when):
    """Make ``owner.name`` raise ``OSError(code)`` for the calls ``when(*args)`` selects."""
    original = getattr(owner, name)

    def failing(*args, **kwargs):
        if when(*args):
            raise OSError(code, os.strerror(code), str(args[-1] if owner is pathlib.Path else args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


# -- paths ---------------------------------------------------------------------------------------------

def test_out_naming_a_file(tmp_path, capsys):
    (tmp_path / "afile.txt").write_text("x")
    assert main(["train", "--out", str(tmp_path / "afile.txt"), *TINY]) == 2
    assert "afile.txt is a file, not a run directory" in _error(capsys)
    assert main(["train", "--resume", str(tmp_path / "afile.txt")]) == 2
    assert "is not a flowmaps run directory" in _error(capsys)


def test_bench_out_naming_a_file(tmp_path, capsys):
    (tmp_path / "afile.txt").write_text("x")
    assert main(["bench", "--quick", "--methods", "fm", "--out", str(tmp_path / "afile.txt")]) == 2
    assert "bench: --out " in _error(capsys)


def test_sample_out_naming_a_directory(finished, tmp_path, capsys):
    (tmp_path / "s.npy").mkdir()
    assert main(["sample", str(finished), "--out", str(tmp_path / "s.npy")]) == 2
    assert "is a directory" in _error(capsys)


# -- read-only file systems, permissions, full disks ------------------------------------------------------

def test_a_read_only_file_system_at_the_start(tmp_path, monkeypatch, capsys):
    _fail_for(monkeypatch, os, "open", errno.EROFS, lambda path, *a: str(path).endswith("run.lock"))
    assert main(["train", "--out", str(tmp_path / "run"), *TINY]) == 2
    assert "run.lock: Read-only file system (EROFS)" in _error(capsys)


def test_no_permission_to_create_out(tmp_path, monkeypatch, capsys):
    _fail_for(monkeypatch, pathlib.Path, "mkdir", errno.EACCES, lambda path, *a: path.name == "run")
    assert main(["train", "--out", str(tmp_path / "run"), *TINY]) == 2
    assert f"{tmp_path / 'run'}: Permission denied (EACCES)" in _error(capsys)


def test_a_read_only_file_system_at_the_final_save_keeps_the_checkpoints(tmp_path, monkeypatch, capsys):
    _fail_for(monkeypatch, os, "replace", errno.EROFS, lambda src, dst=None: str(dst).endswith("/model.safetensors"))
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY]) == 2
    assert f"cannot write {run / 'model.safetensors'}: Read-only file system (EROFS)" in _error(capsys)
    assert status(run)["state"] == "failed" and not (run / "model.safetensors").exists()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    store = CheckpointStore(run)
    assert store.load(store.checkpoints()[-1]).checkpoint.step == 12


def test_a_full_disk_at_the_final_save_names_the_free_space_and_resumes(finished, tmp_path, monkeypatch, capsys):
    _fail_for(monkeypatch, pathlib.Path, "write_bytes", errno.ENOSPC,
              lambda path, *a: path.name.startswith(".model_ema.safetensors."))
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY]) == 2
    err = _error(capsys)
    assert f"cannot write {run / 'model_ema.safetensors'}: No space left on device (ENOSPC); " in err
    assert "MiB free on" in err
    assert status(run)["state"] == "failed"
    monkeypatch.undo()  # space freed
    assert main(["train", "--resume", str(run)]) == 0
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert_same_tensors(weights(finished / name), weights(run / name))


def test_a_full_disk_at_a_checkpoint_keeps_the_earlier_ones(finished, tmp_path, monkeypatch, capsys):
    written = []
    original = checkpoint_module._write_bytes

    def filling(path, data):
        written.append(path)
        if "step_00000008" in str(path) and path.name == "state.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a write() on a full disk names no file
        original(path, data)

    monkeypatch.setattr(checkpoint_module, "_write_bytes", filling)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY]) == 2
    err = _error(capsys)
    assert "cannot write checkpoint" in err and "step_00000008: No space left on device (ENOSPC)" in err
    assert "the earlier checkpoints are kept" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004"]
    monkeypatch.undo()
    assert main(["train", "--resume", str(run)]) == 0  # from step 4, to the uninterrupted run's weights
    assert_same_tensors(weights(finished / "model.safetensors"), weights(run / "model.safetensors"))


def test_a_full_disk_in_an_extension_keeps_the_previous_final_weights(finished, tmp_path, monkeypatch, capsys):
    run = copy_run(finished, tmp_path / "run")
    before = weights(run / "model.safetensors")
    _fail_for(monkeypatch, pathlib.Path, "write_bytes", errno.ENOSPC, lambda path, *a: path.name.startswith(".model."))
    assert main(["train", "--resume", str(run), "--steps", "16"]) == 2
    assert "No space left on device (ENOSPC)" in _error(capsys)
    monkeypatch.undo()
    assert_same_tensors(before, weights(run / "previous" / "model.safetensors"))
    assert flowmaps.load(run / "previous", ema=False).provenance["state"] == "finished"


def test_a_full_disk_while_logging_names_the_log(tmp_path, monkeypatch, capsys):
    from flowmaps.train import loop

    write = loop.RunLog.write

    def full(self, record):
        if self.file is not None and record.get("step") == 5:
            self.file = io.StringIO()
            self.file.write = lambda text: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return write(self, record)

    monkeypatch.setattr(loop.RunLog, "write", full)
    assert main(["train", "--out", str(tmp_path / "run"), *TINY, "--set", "train.log_every=1"]) == 2
    assert f"cannot write {tmp_path / 'run' / 'train_log.jsonl'}: No space left on device (ENOSPC)" in _error(capsys)


def test_a_divergence_of_a_fused_jvp_method_is_reported_not_a_traceback(tmp_path, capsys):
    """lsd's fused tangents return (value, tangent) pairs, which the guard's replay used to choke on."""
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY, "--set", "optim.lr=1e30", "--set", "guard.max_strikes=1",
                 "--set", "guard.on_divergence=stop"]) == 2
    assert "training diverged at step" in _error(capsys) and status(run)["state"] == "diverged"
    report = json.loads((run / "divergence.json").read_text())
    assert report["reports"][0]["reports"][0]["micro_batches"][0]["model_calls"]


# -- parse errors, devices, memory -------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--set", "optim.lr=[1,2"], "cannot parse the value of --set optim.lr=[1,2"),
    (["--device", "cuda:abc"], "train.device must be auto, cpu, cuda or cuda:N (N a device index); got 'cuda:abc'"),
    (["--set", "model.width=1000000000", "--set", "model.depth=3"],
     "a mlp model ({'backbone': 'mlp', 'num_classes': 0, 'width': 1000000000, 'depth': 3, 'num_freqs': 0, "
     "'max_freq': 8.0, 'x_features': 128, 'x_scale': 0.5, 'class_dim': 16}) on data of shape [2] needs at least"),
])
def test_bad_train_arguments(tmp_path, capsys, args, message):
    assert main(["train", "--out", str(tmp_path / "run"), *TINY, *args]) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing written


@pytest.mark.parametrize("args,message", [
    (["--device", "bogus"], "device 'bogus' is not one of auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:abc"], "device 'cuda:abc' is not one of"),
    (["--n", "10000000000"], "--n 10000000000 (10000000000 samples of shape [2]) needs at least"),
])
def test_bad_sample_arguments(finished, tmp_path, capsys, args, message):
    assert main(["sample", str(finished), "--out", str(tmp_path / "s.npy"), *args]) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "s.npy").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_a_cuda_device_without_cuda(finished, tmp_path, capsys):
    assert main(["sample", str(finished), "--out", str(tmp_path / "s.npy"), "--device", "cuda:0"]) == 2
    assert "CUDA is not available" in _error(capsys)


@pytest.mark.parametrize("name,content,message", [
    ("c.yaml", b"optim:\n  lr: [1, 2\n", "cannot parse config file"),
    ("c.toml", b"[optim\nlr = 1\n", "cannot parse config file"),
    ("c.yaml", b"\xff\xfe\x00bad", "is not UTF-8 text"),
    ("c.yaml", b"# padding\n" * 200_000, "bytes; at most 1048576 are read"),
])
def test_unreadable_config_files(tmp_path, capsys, name, content, message):
    (tmp_path / name).write_bytes(content)
    assert main(["train", "--config", str(tmp_path / name), "--out", str(tmp_path / "run")]) == 2
    err = _error(capsys)
    assert message in err and name in err


# -- malformed files that look valid ----------------------------------------------------------------------

def _rewrite_state(path, change):
    """Edit ``state.pt`` of a checkpoint and reseal its manifest (a well-formed file with the wrong content)."""
    import hashlib

    state = torch.load(path / "state.pt", weights_only=True)
    change(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    (path / "state.pt").write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["state.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("change,reason", [
    (lambda state: state.pop("optimizer"), "optimizer (missing)"),
    (lambda state: state.update(rng={"torch": 1}), "rng (dict, expected list)"),
    (lambda state: state["guard"].pop("lr_scale"), "cannot be restored (KeyError"),
])
def test_a_well_formed_state_with_missing_keys_falls_back_to_the_previous_checkpoint(
        finished, tmp_path, capsys, change, reason):
    run = copy_run(finished, tmp_path / "run")
    for name in ("model.safetensors", "model_ema.safetensors", "manifest.json"):
        (run / name).unlink()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000008", "step_00000012"]
    _rewrite_state(run / "checkpoints" / "step_00000012", change)
    (run / "status.json").write_text(json.dumps({**status(run), "state": "running"}))  # as if killed at the end
    assert main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "skipping a bad checkpoint: checkpoint" in err and reason in err, err
    assert "resuming from" in err and "step_00000008 (8 steps done)" in err
    assert_same_tensors(weights(finished / "model.safetensors"), weights(run / "model.safetensors"))


def test_no_usable_checkpoint_is_a_named_refusal(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    for step in (8, 12):
        _rewrite_state(run / "checkpoints" / f"step_{step:08d}", lambda state: state.pop("data"))
    assert main(["train", "--resume", str(run), "--steps", "16"]) == 2
    assert "has no valid checkpoint to resume from" in _error(capsys)


@pytest.mark.parametrize("content,message", [
    ('{"dim": 1000000000000, "name": "x"}', "does not hold a sample shape of positive sizes"),
    ("{not json", "data info file"),
])
def test_a_malformed_data_info_file(finished, tmp_path, capsys, content, message):
    run = copy_run(finished, tmp_path / "run")
    (run / "data_info.json").write_text(content)
    assert main(["sample", str(run), "--out", str(tmp_path / "s.npy")]) == 2
    assert message in _error(capsys)


def test_an_npy_header_that_asks_for_terabytes(tmp_path, capsys):
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 2)})
    (tmp_path / "bomb.npy").write_bytes(buffer.getvalue() + b"\x00" * 64)
    assert main(["train", "--data", str(tmp_path / "bomb.npy"), "--out", str(tmp_path / "run"), *TINY]) == 2
    assert "its header announces shape (1000000000000, 2)" in _error(capsys)


def test_a_manifest_too_large_to_read_is_a_bad_checkpoint(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    manifest = run / "checkpoints" / "step_00000012" / "manifest.json"
    manifest.write_bytes(b" " * (17 * 2**20))
    (run / "status.json").write_text(json.dumps({**status(run), "state": "running"}))
    assert main(["train", "--resume", str(run)]) == 0
    assert "more than the" in capsys.readouterr().err
