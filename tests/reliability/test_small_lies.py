"""Honest small things: strict JSON everywhere, the real output path printed, one file mode for every
file of a run (the umask's), an extension that cannot shrink a run, and the run's identity in each artefact."""

import json
import os
import stat

import pytest

from flowmaps.cli import main
from flowmaps.train.guard import DivergenceError
from flowmaps.train.loop import train
from tests.reliability.support import TINY, copy_run, status, strict_json, tiny
from tests.train import faults


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--out", str(run), *TINY]) == 0
    return run


def test_divergence_reports_and_the_log_are_strict_json(tmp_path, monkeypatch):
    faults.install(monkeypatch, nan_steps={2, 3})
    cfg = tiny(method={"name": "fm"}, train={"steps": 8}, guard={"max_strikes": 2, "on_divergence": "stop"})
    with pytest.raises(DivergenceError):
        train(cfg, tmp_path / "r", progress=False, evaluate_at_end=False)
    report = strict_json((tmp_path / "r" / "divergence.json").read_text())
    assert report["reports"][0]["reports"][0]["micro_batches"][0]["loss"] == "NaN"  # a string, not a bare literal
    for line in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines():
        strict_json(line)
    assert strict_json((tmp_path / "r" / "status.json").read_text())["state"] == "diverged"


def test_every_json_file_of_a_finished_run_is_strict(finished):
    paths = [p for p in finished.rglob("*.json")]
    assert {p.name for p in paths} >= {"status.json", "manifest.json", "metrics.json", "data_info.json"}
    for path in paths:
        strict_json(path.read_text())


@pytest.mark.parametrize("given,written", [("x", "x.npy"), ("x.npy", "x.npy"), ("x.tar", "x.tar.npy")])
def test_sample_prints_the_path_it_wrote(finished, tmp_path, monkeypatch, capsys, given, written):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", str(finished), "--n", "8", "--out", given]) == 0
    metadata = written[: -len(".npy")] + ".json"
    assert f"to {written} (metadata {metadata})" in capsys.readouterr().out
    assert (tmp_path / written).is_file() and (tmp_path / metadata).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([written, metadata])


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_file_of_a_run_has_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        train(tiny(train={"steps": 8}, checkpoint={"every": 4}), tmp_path / "run", progress=False)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    dirs = [p for p in (tmp_path / "run").rglob("*") if p.is_dir()]
    assert {p.name for p in files} >= {"model.safetensors", "config.yaml", "state.pt", "samples.png", "status.json"}
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(0o666 & ~umask)}, \
        {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in dirs} == {oct(0o777 & ~umask)}


def test_an_extension_cannot_shrink_a_run_and_is_recorded(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    config, before = (run / "config.yaml").read_text(), status(run)
    assert main(["train", "--resume", str(run), "--steps", "6"]) == 2
    assert "has done 12 steps; train.steps=6 would shrink the run" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == config and status(run) == before
    assert main(["train", "--resume", str(run), "--steps", "16"]) == 0
    assert "steps: 16" in (run / "config.yaml").read_text()
    sessions = status(run)["sessions"]
    assert [(s["from_step"], s["steps"]) for s in sessions] == [(0, 12), (12, 16)]
    assert sessions[0]["config_hash"] != sessions[1]["config_hash"] == status(run)["config_hash"]


def test_the_run_identity_is_in_every_artefact(finished):
    from PIL import Image
    from safetensors import safe_open

    run_id, digest = status(finished)["run_id"], status(finished)["config_hash"]
    assert json.loads((finished / "metrics.json").read_text())["run_id"] == run_id
    assert f"_run {run_id}, config {digest[:16]}_" in (finished / "metrics.md").read_text()
    assert Image.open(finished / "samples.png").text["flowmaps_run_id"] == run_id
    with safe_open(str(finished / "model.safetensors"), "pt") as f:
        assert f.metadata()["flowmaps_config_hash"] == digest
    manifest = json.loads((finished / "checkpoints" / "step_00000012" / "manifest.json").read_text())
    assert manifest["run"]["run_id"] == run_id and manifest["run"]["data"] == "builtin:checkerboard"
