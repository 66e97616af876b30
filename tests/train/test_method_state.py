"""Methods that own training state (EMA targets) resume exactly: the state travels in checkpoints."""

import shutil

from flowmaps.train.checkpoint import CheckpointStore
from flowmaps.train.loop import train
from tests.train.tiny import assert_same_tensors, tiny_config, weights


def test_tvm_resumed_from_its_first_checkpoint_ends_bit_identical(tmp_path):
    """TVM's EMA target is method state: a run resumed at step 8 of 16 matches an uninterrupted one."""
    cfg = tiny_config(method={"name": "tvm"}, train={"steps": 16}, checkpoint={"every": 8, "keep_last": 2})
    train(cfg, tmp_path / "full", progress=False, evaluate_at_end=False)
    store = CheckpointStore(tmp_path / "full")
    assert [c.step for c in store.checkpoints()] == [8, 16]
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for name in ("model.safetensors", "model_ema.safetensors"):
        (tmp_path / "cut" / name).unlink()
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_00000016")
    train(cfg, tmp_path / "cut", progress=False, evaluate_at_end=False, resume=True)

    for name in ("model.safetensors", "model_ema.safetensors"):
        assert_same_tensors(weights(tmp_path / "full" / name), weights(tmp_path / "cut" / name))
    full, cut = (CheckpointStore(tmp_path / d).load(CheckpointStore(tmp_path / d).path_for(16)).state
                 for d in ("full", "cut"))
    target, final = full["method"]["target"], weights(tmp_path / "full" / "model.safetensors")
    assert target and any(not bool((v == final[k]).all()) for k, v in target.items())  # not a copy of the weights
    assert_same_tensors(target, cut["method"]["target"])
