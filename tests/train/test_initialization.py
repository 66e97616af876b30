"""``train.init_from`` (``--init-from RUN_DIR``): a fresh run starts from another run's EMA weights, exactly;
other architectures, other data and paths that are not runs are refused by name; a resume never re-initialises."""

import logging
import shutil

import pytest
import torch

from flowmaps.build import build_model, config_from_dict
from flowmaps.cli import main
from flowmaps.train.initialization import InitializationError, copy_weights, initialize_from, load_source
from flowmaps.train.loop import train
from tests.train.tiny import assert_same_tensors, cli_args, tiny_config, tiny_values, weights

SHAPE = (2,)  # the checkerboard's


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished tiny fm run (the same mlp as the lsd runs below)."""
    run = tmp_path_factory.mktemp("init") / "fm"
    train(tiny_config(method={"name": "fm"}, train={"steps": 6}, checkpoint={"every": 0}), run, progress=False,
          evaluate_at_end=False)
    return run


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_initialize_from_copies_every_tensor_of_the_source_ema(source):
    model = build_model(tiny_config(), SHAPE)
    fresh = _state(model)
    ema = weights(source / "model_ema.safetensors")
    assert not torch.equal(fresh["net.layers.0.weight"], ema["net.layers.0.weight"])
    loaded = initialize_from(str(source), model, SHAPE, 0)
    assert loaded.provenance["weights"] == "model_ema.safetensors"
    assert_same_tensors(_state(model), ema)


def test_a_fresh_run_and_its_ema_start_from_the_source(source, tmp_path, caplog):
    """One step at a learning rate of 1e-30 moves no weight: both final files hold the source's EMA weights."""
    caplog.set_level(logging.INFO, logger="flowmaps")
    out = tmp_path / "lsd"
    cfg = tiny_config(train={"steps": 1, "init_from": str(source)}, optim={"lr": 1e-30}, checkpoint={"every": 0})
    train(cfg, out, progress=False, evaluate_at_end=False)
    ema = weights(source / "model_ema.safetensors")
    assert_same_tensors(weights(out / "model.safetensors"), ema)
    assert_same_tensors(weights(out / "model_ema.safetensors"), ema)
    assert f"initialised from {source} (model_ema.safetensors" in caplog.text
    assert f"init_from: {source}" in (out / "config.yaml").read_text()


def test_cli_init_from_trains_and_records_the_source(source, tmp_path):
    out = tmp_path / "cli"
    args = cli_args(tiny_values(train={"steps": 2}, checkpoint={"every": 0}))
    assert main(["train", "--out", str(out), "--no-progress", "--init-from", str(source), *args]) == 0
    assert f"init_from: {source}" in (out / "config.yaml").read_text()


def test_another_architecture_is_refused_with_its_mismatches(source, tmp_path, capsys):
    narrow = build_model(tiny_config(model={"width": 16}), SHAPE)
    with pytest.raises(InitializationError, match=r"net.layers.0.weight: \[32, .*\] float32 in the source, \[16, "
                                                  r".*\] float32 in the new model.*the backbones must agree"):
        initialize_from(str(source), narrow, SHAPE, 0)
    args = cli_args({"model": {"width": 16}, "train": {"steps": 2, "device": "cpu"}})
    assert main(["train", "--out", str(tmp_path / "narrow"), "--no-progress", "--init-from", str(source), *args]) == 2
    err = capsys.readouterr().err
    assert "does not match this run's" in err and "the backbones must agree" in err and "model section" in err
    deeper = build_model(tiny_config(model={"depth": 2}), SHAPE)
    with pytest.raises(InitializationError, match="only in the new model"):
        copy_weights(build_model(tiny_config(), SHAPE), deeper)


def test_sources_that_are_not_runs_of_this_data_are_refused(source, tmp_path):
    model = build_model(tiny_config(), SHAPE)
    (tmp_path / "empty").mkdir()
    for spec in (tmp_path / "empty", tmp_path / "missing", source / "model_ema.safetensors"):
        with pytest.raises(InitializationError, match="is not a flowmaps run directory"):
            initialize_from(str(spec), model, SHAPE, 0)
    with pytest.raises(InitializationError, match="another architecture.*--teacher diffusers:"):
        load_source(f"diffusers:{tmp_path}", SHAPE, 0)
    with pytest.raises(InitializationError, match=r"shape \[2\] with 0 classes; this run has samples of shape \[3\]"):
        load_source(str(source), (3,), 0)
    with pytest.raises(InitializationError, match="model.num_classes = 4"):
        load_source(str(source), SHAPE, 4)


def test_a_resumed_run_restores_its_checkpoint_and_never_reads_the_source(source, tmp_path, capsys):
    """A run cut at step 5 of 10 and resumed, with its source deleted first, equals the uninterrupted run."""
    copy = tmp_path / "source"
    shutil.copytree(source, copy)
    cfg = tiny_config(train={"steps": 10, "init_from": str(copy)}, checkpoint={"every": 5})
    train(cfg, tmp_path / "full", progress=False, evaluate_at_end=False)
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for name in ("model.safetensors", "model_ema.safetensors"):
        (tmp_path / "cut" / name).unlink()
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_00000010")
    shutil.rmtree(copy)
    train(cfg, tmp_path / "cut", progress=False, evaluate_at_end=False, resume=True)
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert_same_tensors(weights(tmp_path / "full" / name), weights(tmp_path / "cut" / name))
    assert main(["train", "--resume", str(tmp_path / "cut"), "--init-from", str(source)]) == 2
    assert "cannot be combined with --init-from" in capsys.readouterr().err


def test_init_from_replaces_the_method_s_own_initialisation(source, tmp_path):
    """ECT copies its teacher into the student; with ``train.init_from`` the student starts from that run instead."""
    other = tmp_path / "other"
    train(tiny_config(method={"name": "fm"}, train={"steps": 6, "seed": 9}, checkpoint={"every": 0}), other,
          progress=False, evaluate_at_end=False)
    cfg = config_from_dict({**tiny_values(train={"steps": 1, "init_from": str(other)}, optim={"lr": 1e-30},
                                          checkpoint={"every": 0}), "method": {"name": "ect"}, "teacher": str(source)})
    train(cfg, tmp_path / "ect", progress=False, evaluate_at_end=False)
    assert_same_tensors(weights(tmp_path / "ect" / "model_ema.safetensors"), weights(other / "model_ema.safetensors"))
