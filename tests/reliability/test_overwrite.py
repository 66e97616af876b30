"""Never overwrite what the user did not ask to overwrite: --out refuses a directory that holds a run
or files flowmaps did not write; --overwrite deletes only flowmaps' own files."""

import json

import pytest

from flowmaps.cli import main
from flowmaps.train.loop import train
from flowmaps.train.rundir import RunDirectoryError
from tests.reliability.support import TINY, status, tiny, trained

USER_CONFIG = "# my experiment: keep these comments\ntrain:\n  steps: 12  # short\n"


def test_out_onto_a_finished_run_without_checkpoints_is_refused(tmp_path, capsys):
    """checkpoint.every=0 leaves no checkpoints/: a second run into the directory used to retrain silently."""
    run = trained(tmp_path / "run", train={"steps": 6}, checkpoint={"every": 0})
    assert not (run / "checkpoints").exists()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["train", "--out", str(run), *TINY, "--set", "checkpoint.every=0"]) == 2
    err = capsys.readouterr().err
    assert "already holds a flowmaps run (finished at step 6 of 6" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_a_users_config_in_out_is_never_replaced(tmp_path, capsys):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "config.yaml").write_text(USER_CONFIG)
    assert main(["train", "--out", str(out), *TINY]) == 2
    assert "holds files flowmaps did not write (config.yaml)" in capsys.readouterr().err
    assert main(["train", "--out", str(out), *TINY, "--overwrite"]) == 2  # --overwrite deletes only flowmaps' files
    assert "config.yaml was not written by flowmaps" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == USER_CONFIG and sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_overwrite_replaces_the_run_and_keeps_foreign_files(tmp_path):
    run = trained(tmp_path / "run", train={"steps": 8})
    (run / "notes.txt").write_text("mine")
    (run / "slurm-1.out").write_text("log")
    with pytest.raises(RunDirectoryError, match=r"already holds a flowmaps run .* and holds files flowmaps did not "
                                                r"write \(notes.txt, slurm-1.out\)"):
        train(tiny(train={"steps": 8}), run, progress=False, evaluate_at_end=False)
    first = status(run)["run_id"]
    train(tiny(train={"steps": 4}, checkpoint={"every": 2}), run, progress=False, evaluate_at_end=False, overwrite=True)
    assert (run / "notes.txt").read_text() == "mine" and (run / "slurm-1.out").read_text() == "log"
    assert status(run)["run_id"] != first and status(run)["steps"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    assert not (run / "previous").exists()


def test_a_new_run_into_an_empty_or_new_directory_needs_no_flag(tmp_path):
    (tmp_path / "empty").mkdir()
    trained(tmp_path / "empty", train={"steps": 2})
    trained(tmp_path / "new" / "nested", train={"steps": 2})
    assert status(tmp_path / "new" / "nested")["state"] == "finished"


def test_overwrite_with_a_broken_status_file_is_named(tmp_path, capsys):
    run = trained(tmp_path / "run", train={"steps": 2})
    (run / "status.json").write_text("{not json")
    assert main(["train", "--out", str(run), *TINY]) == 2
    assert "status.json is not a flowmaps status file" in capsys.readouterr().err


def test_temporaries_of_a_killed_first_write_do_not_block_a_new_run(tmp_path):
    """Killed while writing its first status.json, a run leaves only a hidden temporary: the next run
    into the directory needs no --overwrite."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".status.json.k3j2x9.tmp").write_text('{"format": 1, "sta')
    (out / "run.lock").write_text('{"pid": 999999999, "host": "elsewhere"}')
    trained(out, train={"steps": 2})
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["checkpoints", "config.yaml", "data_info.json", "manifest.json", "metrics.json", "model.safetensors",
         "model_ema.safetensors", "status.json", "train_log.jsonl"])


def test_a_kill_during_overwrite_never_leaves_weights_beside_another_config(tmp_path, monkeypatch):
    """--overwrite deletes the earlier run's files one by one; stopped after each deletion, the directory
    is still recognised as flowmaps' (so --overwrite finishes the job) and holds no final weights from
    another config than the one beside them."""
    import flowmaps.train.rundir as rundir
    from tests.reliability.support import copy_run, final_weights_belong_to_config

    source = trained(tmp_path / "source", train={"steps": 4}, checkpoint={"every": 2})
    names = len(list(source.iterdir()))
    remove = rundir._remove
    for stop_after in range(names):
        run = copy_run(source, tmp_path / f"run-{stop_after}")
        done = []

        def dying(path, done=done, stop_after=stop_after):
            if len(done) == stop_after:
                raise KeyboardInterrupt  # stands in for the kill
            done.append(path.name)
            remove(path)

        monkeypatch.setattr(rundir, "_remove", dying)
        with pytest.raises(KeyboardInterrupt):
            train(tiny(train={"steps": 2}, model={"width": 16}), run, progress=False, evaluate_at_end=False,
                  overwrite=True)
        monkeypatch.setattr(rundir, "_remove", remove)
        assert done[:1] in ([], ["status.json"]) and final_weights_belong_to_config(run), done
        assert rundir.is_run_directory(run)
        train(tiny(train={"steps": 2}, model={"width": 16}), run, progress=False, evaluate_at_end=False, overwrite=True)
        assert status(run)["steps"] == 2


def test_a_run_refused_by_a_check_on_its_data_leaves_no_empty_out(tmp_path, capsys):
    """The labels check needs the data, so it runs after --out is taken: the folders the run created go
    again, a folder that was there before stays."""
    refused = ["--set", "model.num_classes=3"]  # the default data has no labels
    assert main(["train", "--out", str(tmp_path / "new" / "nested"), *TINY, *refused]) == 2
    assert "has no labels" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    assert main(["train", "--out", str(tmp_path / "mine"), *TINY, *refused]) == 2
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())
