"""SIGKILL at random writes during the final save of a run and during the first checkpoint of an extended
run. After every kill the directory holds a consistent finished run or resumes to one (bit-identical to
an uninterrupted run), and it never holds final weights from another config."""

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import flowmaps
from flowmaps.cli import main
from flowmaps.train.rundir import UnfinishedRunError
from tests.reliability.support import TINY, final_weights_belong_to_config, status
from tests.train.tiny import assert_same_tensors, weights

ROOT = Path(__file__).resolve().parents[2]
KILLS = 3  # random kill points per scenario


def _child(args, pause_at=None, listing=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("FLOWMAPS_TEST_PAUSE_AT", None)
    if pause_at is not None:
        env["FLOWMAPS_TEST_PAUSE_AT"] = str(pause_at)
    if listing:
        env["FLOWMAPS_TEST_LIST_WRITES"] = "1"
    return subprocess.Popen([sys.executable, str(ROOT / "tests/reliability/kill_target.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def _writes(args) -> list[str]:
    """The numbered writes of an uninterrupted child run (which must succeed)."""
    proc = _child(args, listing=True)
    output = proc.communicate()[0]
    assert proc.returncode == 0, output
    return [line.split("WRITE ", 1)[1].split(" ", 1)[1] for line in output.splitlines() if "WRITE " in line]


def _kill_in_write(args, index) -> str:
    proc = _child(args, pause_at=index)
    for line in proc.stdout:
        if "PAUSED " in line:  # a progress bar may precede it on the line
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return line.split("PAUSED ", 1)[1].strip()
    raise AssertionError(f"the child never paused at write {index} (exit {proc.wait()})")


def _same_weights(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert_same_tensors(weights(a / name), weights(b / name))


def _judge(run: Path, finished_like: Path, resume_args: list[str], result: Path) -> str:
    """Check a killed run directory: consistent (finished, verified, the weights of ``finished_like``) or
    refused by ``flowmaps.load`` and resumable to ``result``'s weights; returns which."""
    assert final_weights_belong_to_config(run)
    if (run / "status.json").is_file() and status(run)["state"] == "finished":
        flowmaps.load(run)
        _same_weights(finished_like, run)
        verdict = "finished"
    else:
        with pytest.raises(UnfinishedRunError):
            flowmaps.load(run)
        verdict = "resumable"
    assert main(["train", "--resume", str(run), *resume_args]) == 0
    assert status(run)["state"] == "finished" and final_weights_belong_to_config(run)
    flowmaps.load(run)
    _same_weights(result, run)
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".previous")]
    return verdict


@pytest.mark.slow
def test_sigkill_during_the_final_save(tmp_path):
    reference = tmp_path / "reference"
    writes = _writes(["train", "--out", str(reference), *TINY])
    last_checkpoint = max(i for i, path in enumerate(writes) if "/checkpoints/" in path)
    final_phase = list(range(last_checkpoint + 1, len(writes)))
    assert {Path(writes[i]).name for i in final_phase} >= {"model.safetensors", "manifest.json", "status.json"}
    picks = sorted(random.Random(18).sample(final_phase, KILLS))
    verdicts = []
    for index in picks:
        run = tmp_path / f"run-{index}"
        cut = _kill_in_write(["train", "--out", str(run), *TINY], index)
        assert Path(cut) == run / Path(writes[index]).name
        assert [p for p in run.iterdir() if p.name.startswith(f".{Path(cut).name}.")]  # its half-written temporary
        verdicts.append((index, Path(writes[index]).name, _judge(run, reference, [], reference)))
    print("kills:", verdicts)


@pytest.mark.slow
def test_sigkill_during_the_first_checkpoint_of_an_extended_run(tmp_path):
    """An 8-step run extended to 16, killed anywhere from its start to its first checkpoint (step 12)."""
    base = tmp_path / "base"
    assert main(["train", "--out", str(base), *TINY, "--steps", "8"]) == 0
    reference = tmp_path / "reference"
    shutil.copytree(base, reference)
    writes = _writes(["train", "--resume", str(reference), "--steps", "16", "--no-progress"])
    first_checkpoint = next(i for i, path in enumerate(writes)
                            if path.endswith("/manifest.json") and "/checkpoints/" in path)
    phase = list(range(0, first_checkpoint + 2))  # through the status update after it
    assert Path(writes[first_checkpoint + 1]).name == "status.json"
    picks = sorted({0, *random.Random(19).sample(phase[1:], KILLS)})  # always the very first write too
    verdicts = []
    for index in picks:
        run = tmp_path / f"run-{index}"
        shutil.copytree(base, run)
        _kill_in_write(["train", "--resume", str(run), "--steps", "16", "--no-progress"], index)
        verdict = _judge(run, base, ["--steps", "16"], reference)
        if (run / "previous").exists():
            _same_weights(base, run / "previous")
            flowmaps.load(run / "previous")
        verdicts.append((index, Path(writes[index]).name, verdict))
    assert verdicts[0][2] == "finished"  # killed before it wrote anything: still the 8-step run, whole
    print("kills:", verdicts)
