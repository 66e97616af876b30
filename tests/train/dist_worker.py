"""The per-process side of the two-process gloo tests; run by ``torchrun --nproc_per_node 2``.

``python -m torch.distributed.run --nproc_per_node 2 tests/train/dist_worker.py OUT`` joins one process
group (``train`` uses it) and, in one launch: trains ``lsd`` and ``meanflow``; resumes a copy of the
``lsd`` run from its middle checkpoint; runs a method that bypasses DistributedDataParallel (the
gradient check must stop it); and makes the loss NaN on rank 1 only (both ranks must skip the step
and stay in sync). Rank 0 prints one ``OK`` line per check; the test reads them.
"""

import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from flowmaps.methods import Method, build_method
from flowmaps.train import loop
from flowmaps.build import config_from_dict
from flowmaps.train.distributed import GradientSyncError, is_main_process
from tests.train import faults
from tests.train.tiny import assert_same_tensors, weights

STEPS, EVERY = 10, 5
VALUES = {"model": {"width": 32, "depth": 1}, "optim": {"warmup_steps": 2},
          "train": {"steps": STEPS, "batch_size": 64, "seed": 5, "log_every": 1, "device": "cpu"},
          "checkpoint": {"every": EVERY}, "eval": {"n_samples": 256, "nfe": [1], "ode_steps": 2}}


def config(method: str):
    return config_from_dict({**VALUES, "method": {"name": method}})


def say(text: str) -> None:
    if is_main_process():
        print(text, flush=True)


def resume_lsd(out: Path) -> None:
    cut = out / "lsd-cut"
    if dist.get_rank() == 0:
        shutil.copytree(out / "lsd", cut)
        shutil.rmtree(cut / "checkpoints" / f"step_{STEPS:08d}")
        (cut / "model.safetensors").unlink()
    dist.barrier()
    loop.train(config("lsd"), cut, progress=False, evaluate_at_end=False, resume=True)
    if dist.get_rank() == 0:
        assert_same_tensors(weights(out / "lsd" / "model.safetensors"), weights(cut / "model.safetensors"))
        assert_same_tensors(weights(out / "lsd" / "model_ema.safetensors"), weights(cut / "model_ema.safetensors"))
    say("OK resume")


class ThroughInnerModule(Method):
    """The known failure: the loss calls the FlowMap inside DDP, so no gradient is all-reduced."""

    def __init__(self, inner: Method):
        super().__init__(inner.schedule)
        self.inner, self.name = inner, inner.name

    def loss(self, model, batch, generator, ctx=None):
        return self.inner.loss(model.module, batch, generator, ctx)


def sync_check(out: Path, monkeypatch_build) -> None:
    monkeypatch_build(lambda name, schedule, teacher=None, **o: ThroughInnerModule(build_method(name, schedule, **o)))
    try:
        loop.train(config("lsd"), out / "unsynced", progress=False, evaluate_at_end=False)
    except GradientSyncError as err:
        assert "step 0: gradient norms differ across ranks" in str(err), err
        say("OK sync check")
        return
    raise AssertionError("a loss through the unwrapped module was not detected")


class Fingerprint(Method):
    """Records a checksum of the parameters seen by the last loss call (to compare ranks)."""

    def __init__(self, inner: Method):
        super().__init__(inner.schedule)
        self.inner, self.name, self.sum = inner, inner.name, None

    def loss(self, model, batch, generator, ctx=None):
        self.sum = torch.cat([p.detach().flatten() for p in model.parameters()]).double().sum()
        return self.inner.loss(model, batch, generator, ctx)


def nan_on_one_rank(out: Path, monkeypatch_build) -> None:
    built = []

    def build(name, schedule, teacher=None, **options):
        inner = build_method(name, schedule, **options)
        nan_steps = {2} if dist.get_rank() == 1 else set()
        built.append(Fingerprint(faults.Faulty(inner, nan_steps=nan_steps)))
        return built[-1]

    monkeypatch_build(build)
    loop.train(config("lsd"), out / "nan", progress=False, evaluate_at_end=False)
    sums = [None, None]
    dist.all_gather_object(sums, float(built[-1].sum))
    assert sums[0] == sums[1], sums
    if dist.get_rank() == 0:
        import json

        events = [json.loads(line) for line in (out / "nan" / "train_log.jsonl").read_text().splitlines()]
        (event,) = [e for e in events if e.get("event") == "nonfinite"]
        by_rank = {r["rank"]: r for r in event["reports"]}
        assert event["step"] == 2 and by_rank[1]["micro_batches"][0]["model_calls"], event
        assert all(e.get("event") or e["step"] != 2 for e in events)
    say("OK nan on one rank")


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    for method in ("lsd", "meanflow"):
        loop.train(config(method), out / method, progress=False, evaluate_at_end=False)
        say(f"OK {method}")
    resume_lsd(out)
    original = loop.build_method
    try:
        sync_check(out, lambda fn: setattr(loop, "build_method", fn))
        nan_on_one_rank(out, lambda fn: setattr(loop, "build_method", fn))
    finally:
        loop.build_method = original
    # Leave together and skip interpreter finalisation: gloo's worker threads can still hold work that
    # the DDP wrappers of the five runs above kept alive, and tearing those down during finalisation
    # aborts the process (SIGABRT, "terminate called without an active exception") after every check passed.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
