"""Processes, devices and data shards for data-parallel training with ``torchrun``.

``torchrun --nproc_per_node N -m flowmaps train ...`` starts N processes with ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` set; ``DistributedContext.setup`` then joins the process group
(NCCL on CUDA, gloo on CPU), gives each process its GPU (``cuda:LOCAL_RANK``) and wraps the model in
``DistributedDataParallel``. Rank 0 alone logs, writes checkpoints and evaluates.

Shards and random streams. The global batch of a step (``train.batch_size``) is split into
``S = world_size * train.grad_accum`` shards of equal size, and shard ``k`` belongs to rank
``k // grad_accum``. Every shard has its own generator, seeded from ``(seed, k)`` (shard 0 with the
seed itself, so a one-process run draws what it always drew): it draws the shard's data (generated
and mixture sources) and then the method's noise and times. Array data is served in one shuffled
order for all ranks, each shard taking its slice of the step's rows, so every rank reads a disjoint
part. Training therefore depends on ``S`` and not on how the shards are spread over processes: two
processes with ``grad_accum = 1`` reach the parameters of one process with ``grad_accum = 2`` (bit
for bit with two shards; with more, up to the rounding of differently ordered gradient sums).

Gradient synchronisation. ``DistributedDataParallel`` all-reduces gradients only for forward calls
that go through the wrapper: a loss that reaches the inner module (``model.module``, or a JVP of the
unwrapped ``FlowMap``) gets local gradients on every rank and no error. Methods call the model they
are given, which keeps JVP losses synchronised (forward-mode tangents run inside the wrapper's
forward). ``check_gradient_sync`` makes the failure loud: in the first ``distributed.check_steps``
steps the gradient norms of all ranks are compared and must agree.
"""

from __future__ import annotations

import gc
import inspect
import os
import signal
import threading
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from flowmaps.build import resolve_device
from flowmaps.conditions import Guided
from flowmaps.data import DataSource
from flowmaps.methods import Batch
from flowmaps.nets import NULL_CLASS

_GOLDEN = 0x9E3779B97F4A7C15


class GradientSyncError(RuntimeError):
    """Gradients differ across ranks after the backward pass: the all-reduce was skipped."""


def is_main_process() -> bool:
    """Rank 0, or the only process; readable before the process group exists (``RANK`` from torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def shard_seed(seed: int, shard: int) -> int:
    """Seed of shard ``shard``'s generator: ``seed`` for shard 0, far-apart streams for the others."""
    return (seed + shard * _GOLDEN) % 2**64


@dataclass
class DistributedContext:
    """Rank, world size and device of this process, with the few collectives the trainer needs.

    With one process every collective is the identity and nothing is initialised.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @classmethod
    def setup(cls, device_name: str, backend: str = "auto") -> "DistributedContext":
        """Join the process group that ``torchrun`` describes (or use one already initialised)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        initialised = dist.is_available() and dist.is_initialized()
        if not initialised and world == 1:
            return cls(device=resolve_device(device_name))
        if initialised:
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device = _rank_device(device_name, local_rank)
        if not initialised:
            chosen = backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
            if chosen == "nccl" and device.type != "cuda":
                raise ValueError("distributed.backend=nccl needs CUDA devices; use gloo (or auto) on the CPU")
            dist.init_process_group(chosen, timeout=timedelta(minutes=30),
                                    device_id=device if device.type == "cuda" else None)
        return cls(rank=rank, world_size=world, local_rank=local_rank, device=device, owns_group=not initialised)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel(model)`` with several processes, else ``model`` itself.

        Buffers are not broadcast at each forward: backbones hold constants (time frequencies), not
        running statistics, and a broadcast per call would cost a collective in every model call.
        """
        if not self.enabled:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                          else {"broadcast_buffers": False})  # renamed in recent torch
        return ddp(model, device_ids=device_ids, **no_buffer_sync)

    def max(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over ranks (a copy; ``values`` is untouched)."""
        out = values.detach().clone()
        if self.enabled:
            dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (a copy)."""
        out = values.detach().clone()
        if self.enabled:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (small picklable values between the processes of this run), in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group if ``setup`` created it, once the run's DDP wrappers (and the gloo work
        they hold) are collected, so none outlives the group into interpreter finalisation."""
        if self.owns_group and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()


def _rank_device(name: str, local_rank: int) -> torch.device:
    if name.startswith("cuda:"):
        raise ValueError(
            f"train.device={name!r} names one GPU, but several processes run; use train.device=cuda (each "
            "process takes cuda:LOCAL_RANK) and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} was asked for but CUDA is not available on this machine")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {local_rank} has no GPU: only {torch.cuda.device_count()} are visible")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def gradient_norm(parameters: Iterable[nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the gradients (0 when there are none)."""
    grads = [p.grad.detach().float() for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def check_gradient_sync(ctx: DistributedContext, parameters: Iterable[nn.Parameter], step: int) -> None:
    """Raise ``GradientSyncError`` unless every rank holds the same gradient norm (relative 1e-5).

    After DDP's all-reduce the gradients are identical on all ranks; different norms mean a forward
    call bypassed the wrapper. Non-finite norms are left to the divergence guard.
    """
    if not ctx.enabled:
        return
    params = list(parameters)
    norm = gradient_norm(params).to(ctx.device)
    high, neg_low = ctx.max(torch.stack([norm, -norm])).tolist()
    low = -neg_low
    if not (torch.isfinite(torch.tensor([high, low])).all()):
        return
    if high - low > 1e-5 * max(high, 1e-12):
        raise GradientSyncError(
            f"step {step}: gradient norms differ across ranks (min {low:.8g}, max {high:.8g}), so "
            "DistributedDataParallel did not all-reduce them. The loss called the model through the "
            "unwrapped module (e.g. model.module, or a JVP of the inner FlowMap); methods must call the "
            "model passed to Method.loss."
        )


@dataclass
class MicroBatch:
    """One shard of a step: its data, its generator, and the generator state before the loss
    (kept so that a non-finite step can be replayed for a diagnosis)."""

    batch: Batch
    generator: torch.Generator
    shard: int
    generator_state: torch.Tensor


class ShardedBatches:
    """Draws this process's shards of each step's global batch (see the module docstring)."""

    def __init__(
        self,
        data: DataSource,
        global_batch: int,
        grad_accum: int,
        ctx: DistributedContext,
        seed: int,
        labels: bool = False,
        label_dropout: float = 0.0,
        guidance_range: Optional[Sequence[float]] = None,
        guidance_draw: str = "uniform",
    ):
        self.num_shards = ctx.world_size * grad_accum
        if global_batch % self.num_shards != 0:
            raise ValueError(
                f"train.batch_size={global_batch} must be divisible by world_size * train.grad_accum = "
                f"{ctx.world_size} * {grad_accum} = {self.num_shards} (the number of equal shards of a batch)"
            )
        self.data = data
        self.labels, self.label_dropout = labels, label_dropout
        self.guidance_range = None if guidance_range is None else (float(guidance_range[0]), float(guidance_range[1]))
        self.guidance_draw = guidance_draw
        self.global_batch = global_batch
        self.shard_size = global_batch // self.num_shards
        self.shards = range(ctx.rank * grad_accum, (ctx.rank + 1) * grad_accum)
        self.generators = {k: torch.Generator(device=ctx.device).manual_seed(shard_seed(seed, k)) for k in self.shards}

    def next(self) -> list[MicroBatch]:
        """The micro-batches of this process for the next step, in shard order."""
        if self.data.shared_order:  # one global order: every shard slices the same rows
            rows = self.data.sample(self.global_batch, self.generators[self.shards[0]])
            parts = {k: rows.take(slice(k * self.shard_size, (k + 1) * self.shard_size)) for k in self.shards}
        else:
            parts = {k: self.data.sample(self.shard_size, self.generators[k]) for k in self.shards}
        return [MicroBatch(self._conditioned(parts[k], self.generators[k]), self.generators[k], k,
                           self.generators[k].get_state()) for k in self.shards]

    def _conditioned(self, batch: Batch, generator: torch.Generator) -> Batch:
        """The labels a conditional model trains on: each dropped to ``NULL_CLASS`` with probability
        ``label_dropout`` (classifier-free training, spec §7); none for an unconditional model. With
        ``guidance_range`` every row also gets a guidance scale (``_guided``; ``flowmaps.conditions.Guided``:
        a guidance-conditioned student)."""
        if not self.labels:
            return Batch(batch.x0)
        if batch.cond is None:
            raise ValueError(f"a class-conditional model needs labelled data; {self.data.name!r} has no labels")
        cond = batch.cond
        if self.label_dropout > 0:
            drop = torch.rand(cond.shape, generator=generator, device=generator.device) < self.label_dropout
            cond = torch.where(drop.to(cond.device), torch.full_like(cond, NULL_CLASS), cond)
        if self.guidance_range is not None:
            return Batch(batch.x0, self._guided(cond, generator, batch.x0.device))
        return Batch(batch.x0, cond)

    def _guided(self, labels: torch.Tensor, generator: torch.Generator, device: torch.device) -> Guided:
        """A guidance scale per row from ``guidance_range = (low, high)``: ``uniform``, ``w ~ U[low, high]``;
        ``gft`` (guidance-free training, Chen et al. 2025, arXiv 2501.15420), ``w = 1 / beta`` with
        ``beta ~ U[1 / high, 1 / low]``, the labelled rows' diagonal terms weighted by ``beta^2``: GFT's
        loss ``|beta V_w + (1 - beta) sg[V_None] - u|^2`` is ``beta^2 |V_w - (w u + (1 - w) sg[V_None])|^2``,
        the guided diagonal target of ``flowmaps.methods.skeleton``."""
        low, high = self.guidance_range
        r = torch.rand(labels.shape, generator=generator, device=generator.device).to(device)
        if self.guidance_draw == "uniform":
            return Guided(labels, low + (high - low) * r)
        beta = 1 / high + (1 / low - 1 / high) * r
        weight = torch.where(labels == NULL_CLASS, torch.ones_like(beta), beta**2)
        return Guided(labels, 1 / beta, weight)

    def state_dict(self) -> dict[str, Any]:
        """Data order and this process's shard generators (``{shard: state}``)."""
        return {"data": self.data.state_dict(), "generators": {k: g.get_state() for k, g in self.generators.items()}}

    def load_state_dict(self, data_state: dict[str, Any], generator_states: dict[int, torch.Tensor]) -> None:
        """Restore the data order and this process's generators from the states of all shards."""
        missing = sorted(set(self.shards) - set(generator_states))
        if len(generator_states) != self.num_shards or missing:
            raise ValueError(
                f"the checkpoint holds {len(generator_states)} data shards but this run has {self.num_shards} "
                "(world_size * train.grad_accum); resume with the same product to continue the same run"
            )
        self.data.load_state_dict(data_state)
        for k, g in self.generators.items():
            g.set_state(generator_states[k])


class StopRequest:
    """Turns the first SIGTERM or SIGINT into a request to checkpoint and stop after the current step.

    The signal's previous handler is put back at once, so a second signal acts as usual (Ctrl-C twice
    ends the process immediately). Handlers can only be installed from the main thread; elsewhere this
    does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


__all__ = [
    "DistributedContext", "GradientSyncError", "MicroBatch", "ShardedBatches", "StopRequest", "check_gradient_sync",
    "gradient_norm", "is_main_process", "shard_seed",
]
