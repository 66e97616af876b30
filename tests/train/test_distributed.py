"""Data-parallel training with torchrun (gloo on CPU, 1 thread per process) and its building blocks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowmaps.data import get_data
from flowmaps.train.checkpoint import CheckpointStore
from flowmaps.build import config_from_dict
from flowmaps.train.distributed import DistributedContext, ShardedBatches, StopRequest, shard_seed
from flowmaps.train.loop import train
from tests.train.dist_worker import STEPS, VALUES
from tests.train.tiny import assert_same_tensors, weights, write_array_data

ROOT = Path(__file__).resolve().parents[2]
# Two shards: DDP's (g0 + g1) / 2 and accumulation's g0 / 2 + g1 / 2 round identically (halving is exact),
# so the runs agree bit for bit; with more shards the sums are ordered differently and agree to rounding.
ATOL = 0.0


def _torchrun(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _one_process_reference(method: str, out: Path) -> Path:
    """The same global batch on one process: its two shards as two accumulated micro-batches."""
    values = {**VALUES, "method": {"name": method}, "train": {**VALUES["train"], "grad_accum": 2}}
    return train(config_from_dict(values), out, progress=False, evaluate_at_end=False).run_dir


def _assert_close_runs(two: Path, one: Path) -> None:
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert_same_tensors(weights(two / name), weights(one / name), atol=ATOL)


@pytest.mark.slow
def test_torchrun_flowmaps_train_matches_one_process(tmp_path):
    """``torchrun --nproc_per_node 2 -m flowmaps train`` (fm): the process group comes from the environment."""
    sets = [f"--set={s}.{k}={v}".replace(" ", "") for s, e in VALUES.items() for k, v in e.items()]
    stdout = _torchrun("-m", "flowmaps", "train", "--method", "fm", "--out", str(tmp_path / "two"), "--no-progress",
                       *sets)
    assert stdout.count("flowmaps: training fm") == 1  # rank 0 alone prints
    _assert_close_runs(tmp_path / "two", _one_process_reference("fm", tmp_path / "one"))
    state = CheckpointStore(tmp_path / "two").load(CheckpointStore(tmp_path / "two").path_for(STEPS)).state
    assert len(state["rng"]) == 2 and sorted(state["generators"]) == [0, 1]  # every rank's streams


@pytest.mark.slow
def test_two_processes_jvp_methods_resume_and_guard(tmp_path):
    """lsd and meanflow (JVP losses) keep gradients synchronised and match one process; a two-process run
    resumes bit-identically; a loss through the unwrapped module is caught; a NaN on one rank is
    skipped by both (see tests/train/dist_worker.py)."""
    stdout = _torchrun(str(ROOT / "tests/train/dist_worker.py"), str(tmp_path))
    for check in ("OK lsd", "OK meanflow", "OK resume", "OK sync check", "OK nan on one rank"):
        assert check in stdout, stdout
    for method in ("lsd", "meanflow"):
        _assert_close_runs(tmp_path / method, _one_process_reference(method, tmp_path / f"one-{method}"))


def test_shards_partition_array_data_and_have_their_own_streams(tmp_path):
    """Two ranks (simulated) read disjoint halves of each global batch of array data, in the order a single
    process with two micro-batches reads them; generated data uses one stream per shard."""
    data_file = write_array_data(tmp_path / "d.npy", rows=48)  # three steps an epoch
    single = ShardedBatches(get_data(str(data_file)), 16, 2, DistributedContext(), seed=1)
    ranks = [ShardedBatches(get_data(str(data_file)), 16, 1, DistributedContext(rank=r, world_size=2), seed=1)
             for r in range(2)]
    for _ in range(5):  # into the second epoch
        a, b = single.next()
        (r0,), (r1,) = ranks[0].next(), ranks[1].next()
        assert torch.equal(a.batch.x0, r0.batch.x0) and torch.equal(b.batch.x0, r1.batch.x0)
        assert not set(map(tuple, r0.batch.x0.tolist())) & set(map(tuple, r1.batch.x0.tolist()))
        assert torch.equal(b.generator_state, r1.generator_state)
    assert shard_seed(7, 0) == 7 and len({shard_seed(7, k) for k in range(64)}) == 64
    generated = ShardedBatches(get_data("checkerboard"), 16, 2, DistributedContext(), seed=1)
    first, second = generated.next()
    assert not torch.equal(first.batch.x0, second.batch.x0)
    with pytest.raises(ValueError, match="data shards"):
        generated.load_state_dict({}, {0: first.generator_state})


@pytest.mark.parametrize("draw", ["uniform", "gft"])
def test_guidance_scales_are_drawn_per_row_in_the_range_and_replayed_from_the_generator(tmp_path, draw):
    """``uniform``: ``w ~ U[low, high]``; ``gft``: ``w = 1 / beta``, ``beta ~ U[1 / high, 1 / low]``, the
    labelled rows weighted ``beta^2`` and the label-dropped rows 1. Two batchers of the same seed draw
    the same scales."""
    spec = tmp_path / "labelled.json"
    spec.write_text('{"weights": [0.5, 0.5], "means": [[-1, 0], [1, 0]], "stds": [0.3, 0.3], "labels": [0, 1]}')

    def batcher():
        return ShardedBatches(get_data(str(spec)), 4096, 1, DistributedContext(), seed=3, labels=True,
                              label_dropout=0.2, guidance_range=(1.0, 4.0), guidance_draw=draw)

    (first,), (again,) = batcher().next(), batcher().next()
    cond = first.batch.cond
    assert torch.equal(cond.scale, again.batch.cond.scale)
    assert float(cond.scale.min()) >= 1.0 - 1e-6 and float(cond.scale.max()) <= 4.0 + 1e-6
    if draw == "uniform":
        assert cond.weight is None and abs(float(cond.scale.mean()) - 2.5) < 0.05
        return
    beta = 1 / cond.scale
    assert abs(float(beta.mean()) - 0.625) < 0.01  # uniform on [0.25, 1]
    dropped = cond.labels == -1
    assert 0.15 < float(dropped.float().mean()) < 0.25
    assert torch.allclose(cond.weight[~dropped], beta[~dropped] ** 2) and bool((cond.weight[dropped] == 1).all())


def test_stop_request_catches_the_first_signal_only():
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == before  # a second SIGTERM would act as usual
    assert signal.getsignal(signal.SIGTERM) == before


def test_one_process_needs_no_process_group():
    ctx = DistributedContext.setup("cpu")
    assert not ctx.enabled and ctx.is_main and ctx.device == torch.device("cpu")
    values = torch.tensor([1.0, -2.0])
    assert torch.equal(ctx.max(values), values) and ctx.gather({"a": 1}) == [{"a": 1}]
    with pytest.raises(ValueError, match="names one GPU, but several processes run"):
        from flowmaps.train.distributed import _rank_device

        _rank_device("cuda:1", 0)
