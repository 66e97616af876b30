"""The training loop: shards -> method loss -> guarded optimiser step -> EMA -> log -> checkpoint.

``train(cfg, out_dir)`` trains on one process, or on every process that ``torchrun`` started (see
``flowmaps.train.distributed``), and writes a run directory: ``config.yaml`` (resolved),
``data_info.json``, ``train_log.jsonl``, ``checkpoints/``, and at the end ``model.safetensors``,
``model_ema.safetensors``, ``metrics.json`` (and, with evaluation, ``metrics.md``, ``samples.png``).

A run survives interruptions: checkpoints (``flowmaps.train.checkpoint``) hold everything the
next steps depend on, so ``train(cfg, out_dir, resume=True)`` continues bit-identically on the CPU;
SIGTERM/SIGINT write a checkpoint and raise ``TrainingInterrupted``; non-finite steps and loss spikes
go to the divergence guard (``flowmaps.train.guard``). ``docs/training.md`` is the user's guide.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from flowmaps import runs
from flowmaps.build import build_model
from flowmaps.data import get_data
from flowmaps.evaluation import evaluate, metrics_table
from flowmaps.methods import LossContext, LossOutput, build_method
from flowmaps.plots import plot_panels
from flowmaps.report import write_report
from flowmaps.schedules import get_schedule
from flowmaps.teachers import load_teacher
from flowmaps.train.auxiliary import AuxiliaryNetworks
from flowmaps.train.checkpoint import (
    Checkpoint, CheckpointStore, LoadedCheckpoint, capture_rng, restore_rng, save_weights,
)
from flowmaps.train.config import Config, save_config
from flowmaps.train.distributed import DistributedContext, ShardedBatches, StopRequest, check_gradient_sync
from flowmaps.train.ema import EMA
from flowmaps.train.guard import DivergenceError, DivergenceGuard, diagnose, summarize
from flowmaps.train.precision import compile_model, grad_scaler, with_precision
from flowmaps.train.tensorboard import TensorBoardLog

logger = logging.getLogger("flowmaps.train")
LOG_FILE = "train_log.jsonl"
DIVERGENCE_FILE = "divergence.json"


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    train_seconds: float


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped training after ``step`` steps; ``checkpoint`` holds the state to resume."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(f"stopped by signal {signum} after {step} steps; checkpoint {checkpoint}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    o = cfg.optim
    kw = dict(lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam, "adamw": torch.optim.AdamW}[o.optimizer]
    return cls(params, **kw)


def lr_factor(cfg: Config, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or cosine decay to 0 at the last step."""
    o, total = cfg.optim, cfg.train.steps
    if o.warmup_steps > 0 and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.lr_schedule == "constant":
        return 1.0
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class StepResult:
    """What one optimiser step did: ``status`` is ``ok``, ``overflow`` (fp16, skipped by the scaler),
    ``nonfinite`` (skipped, a strike) or ``spike`` (a loss spike, skipped); the values are this
    process's, detached."""

    status: str
    loss: torch.Tensor
    grad_norm: torch.Tensor
    outputs: list[LossOutput]
    stop: bool
    reports: list[dict[str, Any]] = field(default_factory=list)
    mean_loss: float = math.nan  # over ranks; computed when the spike guard is on


class RunLog:
    """``train_log.jsonl``, written by rank 0: one JSON record per logged step or event."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.file = None

    def open(self, keep_before: Optional[int]) -> None:
        """Start the log; on resume keep the records of steps before ``keep_before`` (drop what was redone)."""
        if not self.enabled:
            return
        lines = []
        if keep_before is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", -1) < keep_before:
                        lines.append(line)
                except ValueError:
                    break  # a line cut by a kill ends the usable log
        self.path.write_text("".join(f"{line}\n" for line in lines))
        self.file = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class Trainer:
    """One training run on this process: built from the config, then ``start`` / ``run`` / ``finish``."""

    def __init__(self, cfg: Config, out_dir: Path, dist_ctx: DistributedContext, progress: bool):
        self.cfg, self.out_dir, self.dist, self.progress = cfg, Path(out_dir), dist_ctx, progress
        device = dist_ctx.device
        torch.manual_seed(cfg.train.seed)
        self.data = get_data(cfg.data.name, seed=cfg.train.seed)
        options = {k: v for k, v in cfg.method.items() if k != "name"}
        schedule = get_schedule(cfg.train.schedule)
        teacher = load_teacher(cfg.teacher, self.data, device, schedule) if cfg.teacher is not None else None
        self.method = build_method(cfg.method["name"], schedule, teacher=teacher, **options)
        self.model = build_model(cfg, self.data.dim).to(device)  # the plain FlowMap: saved, EMA'd, replayed
        self.model.sampler = self.method.sampler
        self.ema = EMA(self.model, cfg.optim.ema_decay)
        self.optimizer = make_optimizer(cfg, self.model.parameters())
        self.auxiliary = AuxiliaryNetworks(self.method.auxiliary_networks((self.data.dim,)), dist_ctx)
        self.scaler = grad_scaler(cfg.train.precision, device)
        self.replay_model = with_precision(self.model, cfg.train.precision, device)
        network = self.replay_model
        if cfg.train.compile:
            rtol = 1e-4 if cfg.train.precision == "fp32" else 3e-2
            network = compile_model(network, self.data.dim, device, getattr(self.method, "jvp_backend", "auto"), rtol)
        self.train_model = dist_ctx.wrap(network)  # what the method calls
        self.batches = ShardedBatches(self.data, cfg.train.batch_size, cfg.train.grad_accum, dist_ctx, cfg.train.seed)
        self.store = CheckpointStore(self.out_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best)
        self.guard = DivergenceGuard(cfg.guard)
        self.log = RunLog(self.out_dir / LOG_FILE, dist_ctx.is_main)
        self.tensorboard = TensorBoardLog(self.out_dir) if cfg.train.tensorboard and dist_ctx.is_main else None
        self.step = 0  # optimiser steps done
        self.first_step = 0
        self.interval = torch.zeros(2, device=device)  # loss sum and count of healthy steps since the last checkpoint
        self.last_saved: Optional[int] = None
        self.reports: list[dict[str, Any]] = []

    # -- start ---------------------------------------------------------------------------------------

    def start(self, resume: bool, overwrite: bool) -> None:
        """Prepare the run directory; on ``resume`` restore the newest valid checkpoint."""
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.store.remove_temporaries()
        self.dist.barrier()
        if resume:
            loaded = self.store.latest_valid(report=self._warn)
            if loaded is None:
                self._warn(f"no valid checkpoint in {self.store.root}; starting from step 0")
            else:
                self._restore(loaded)
                self._info(f"resuming from {loaded.checkpoint.path} ({self.step} steps done)")
        else:
            existing = self.store.checkpoints()
            if existing and not overwrite:
                raise ValueError(
                    f"{self.out_dir} already holds checkpoints of a run (up to step {existing[-1].step}); continue it "
                    f"with `flowmaps train --resume {self.out_dir}`, or pass --overwrite to start again"
                )
            self.dist.barrier()
            if existing and self.dist.is_main:
                shutil.rmtree(self.store.root)
            self.method.initialize(self.model)
            self.ema = EMA(self.model, self.cfg.optim.ema_decay)
        self.first_step = self.step
        if self.dist.is_main:
            save_config(self.cfg, self.out_dir / runs.CONFIG_FILE)
            (self.out_dir / runs.DATA_INFO_FILE).write_text(json.dumps({"dim": self.data.dim, "name": self.data.name}))
        self.log.open(keep_before=self.step if resume else None)

    def _restore(self, loaded: LoadedCheckpoint) -> None:
        state = loaded.state
        if len(state["rng"]) != self.dist.world_size:
            self._warn(f"{loaded.checkpoint.path} was written by {len(state['rng'])} process(es), this run has "
                       f"{self.dist.world_size}: the data shards continue their streams, the global RNG states "
                       "of missing ranks are taken from rank 0")
        loaded.apply_weights(self.model, self.ema.model)
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.ema.num_updates = int(state["ema_updates"])
        self.batches.load_state_dict(state["data"], state["generators"])
        self.guard.load_state_dict(state["guard"])
        self.method.load_state_dict(state["method"])
        self.auxiliary.load_state_dict(state.get("auxiliary", {}))
        restore_rng(state["rng"][self.dist.rank if self.dist.rank < len(state["rng"]) else 0])
        self.step = int(state["step"])
        self.last_saved = self.step
        self.interval.zero_()

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> float:
        """Train up to ``train.steps``; returns the seconds spent."""
        from tqdm.auto import tqdm

        total = self.cfg.train.steps
        start = time.perf_counter()
        bar = tqdm(total=total, initial=self.step, desc=f"{self.method.name} on {self.data.name}",
                   disable=not (self.progress and self.dist.is_main), mininterval=1.0)
        with StopRequest() as stop_request:
            while self.step < total:
                result = self.train_step(self.step, stop_request.signum is not None)
                handler = {"nonfinite": self._on_nonfinite, "spike": self._on_spike}.get(result.status)
                if handler is not None and handler(result) == "rollback":
                    bar.n = self.step
                    bar.refresh()
                else:
                    self._advance(result, total, time.perf_counter() - start)
                    bar.update(1)
                    if self.step % self.cfg.train.log_every == 0:
                        bar.set_postfix(loss=f"{float(result.loss):.4f}", refresh=False)
                if result.stop:
                    self._stop(stop_request.signum)
        bar.close()
        return time.perf_counter() - start

    def _advance(self, result: StepResult, total: int, elapsed: float) -> None:
        """Count a finished (or skipped) step: loss bookkeeping, log record, periodic checkpoint."""
        index, self.step = self.step, self.step + 1
        if result.status == "ok":
            self.interval += torch.stack([result.loss, torch.ones_like(result.loss)])
        if result.status not in ("nonfinite", "spike") and (index % self.cfg.train.log_every == 0 or self.step == total):
            self._log_step(index, result, elapsed)
        every = self.cfg.checkpoint.every
        if every > 0 and (self.step % every == 0 or self.step == total):
            self.save_checkpoint()

    def train_step(self, step: int, stop_requested: bool) -> StepResult:
        """One optimiser step over this process's shards; skipped (and diagnosed) when non-finite."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.optim.lr * lr_factor(self.cfg, step) * self.guard.lr_scale
        micro = self.batches.next()
        context = LossContext(step, self.cfg.train.steps, self.ema.model, self.auxiliary.modules)
        self.optimizer.zero_grad(set_to_none=True)
        self.auxiliary.zero_grad()
        outputs = []
        for i, mb in enumerate(micro):
            with self._gradient_sync(i == len(micro) - 1):
                out = self.method.loss(self.train_model, mb.batch, mb.generator, context)
                total = out.loss.float() if out.auxiliary_loss is None else out.loss.float() + out.auxiliary_loss.float()
                self.scaler.scale(total / len(micro)).backward()
            outputs.append(out)
        self.scaler.unscale_(self.optimizer)
        if step - self.first_step < self.cfg.distributed.check_steps:
            check_gradient_sync(self.dist, self.model.parameters(), step)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip).detach()
        loss = torch.stack([o.loss.detach().float() for o in outputs]).mean()
        flags = torch.stack([~torch.isfinite(loss), ~torch.isfinite(grad_norm),
                             torch.tensor(stop_requested, device=loss.device)]).float()
        loss_bad, grad_bad, stop = (bool(v) for v in self.dist.max(flags).tolist())
        fp16 = self.cfg.train.precision == "fp16"
        status = "nonfinite" if loss_bad or (grad_bad and not fp16) else "overflow" if grad_bad else "ok"
        result = StepResult(status, loss, grad_norm, outputs, stop)
        if status == "ok" and self.cfg.guard.spike_factor:
            result.mean_loss = float(self.dist.sum(loss.reshape(1))) / self.dist.world_size  # the same on every rank
            status = result.status = "spike" if self.guard.is_spike(result.mean_loss) else status
        if status == "ok":
            self.scaler.step(self.optimizer)
            self.auxiliary.step(self.scaler)
            self.ema.update(self.model)
        elif status == "nonfinite":
            local = diagnose(self.method, self.replay_model, micro, outputs, context, float(grad_norm),
                             losses_finite=not loss_bad, rank=self.dist.rank)
            result.reports = self.dist.gather(local)
        self.scaler.update()
        return result

    @contextlib.contextmanager
    def _gradient_sync(self, sync: bool) -> Iterator[None]:
        """DDP's ``no_sync`` for all but the last micro-batch of a step (their gradients accumulate locally)."""
        if sync or not self.dist.enabled:
            yield
        else:
            with self.train_model.no_sync():
                yield

    # -- events --------------------------------------------------------------------------------------

    def _on_nonfinite(self, result: StepResult) -> str:
        """Log the step's reports and apply the guard's decision; returns it (``skip`` or ``rollback``)."""
        step = self.step
        action = self.guard.strike()
        record = {"step": step, "event": "nonfinite", "action": action, "strikes": self.guard.strikes,
                  "reports": result.reports}
        message = (f"{summarize(step, result.reports)} (strike {self.guard.strikes}/{self.cfg.guard.max_strikes}; "
                   f"{action})")
        return self._act(record, message, f"{self.guard.strikes} non-finite step(s) since the last checkpoint")

    def _on_spike(self, result: StepResult) -> str:
        """Log a skipped loss spike and apply the guard's decision; returns it (``skip`` or ``rollback``)."""
        step, loss = self.step, result.mean_loss
        median = statistics.median(self.guard.recent)
        action = self.guard.spike()
        terms = {k: float(v) for k, v in result.outputs[0].terms.items()}
        record = {"step": step, "event": "spike", "action": action, "loss": loss, "median_loss": median, "terms": terms}
        message = (f"step {step}: loss {loss:.4g} is {loss / median:.0f}x the median of the last "
                   f"{len(self.guard.recent)} steps (terms {terms}); step skipped ({action})")
        return self._act(record, message, f"{self.cfg.guard.max_strikes} loss spikes in a row")

    def _act(self, record: dict[str, Any], message: str, cause: str) -> str:
        """Report a skipped step (log, terminal, divergence reports), then carry out ``record["action"]``."""
        self.reports.append(record)
        self.log.write(record)
        self._warn(message)
        if record["action"] == "skip":
            return "skip"
        return self._roll_back_or_stop(record["step"], record["action"], cause)

    def _roll_back_or_stop(self, step: int, action: str, cause: str) -> str:
        """Restore the last good checkpoint with a lower learning rate, or stop with ``DivergenceError``."""
        loaded = self.store.latest_valid(report=self._warn) if action == "rollback" else None
        if loaded is None:
            if action == "rollback":
                why = "no checkpoint to roll back to"
            elif self.cfg.guard.on_divergence == "stop":
                why = "guard.on_divergence=stop"
            else:
                why = f"rollbacks used up ({self.guard.rollbacks}/{self.cfg.guard.max_rollbacks})"
            self._diverged(step, f"{cause}, {why}")
        guard_state = self.guard.state_dict()
        self._restore(loaded)
        self.guard.load_state_dict(guard_state)
        self.guard.rolled_back()
        self.first_step = self.step
        self.log.write({"step": step, "event": "rollback", "to_step": self.step, "lr_scale": self.guard.lr_scale})
        self._warn(f"rolled back to {loaded.checkpoint.path} (step {self.step}) with the learning rate scaled by "
                   f"{self.guard.lr_scale:g}")
        return action

    def _diverged(self, step: int, why: str) -> None:
        existing = self.store.checkpoints()
        message = (f"training diverged at step {step}: {why}. Reports: {self.out_dir / DIVERGENCE_FILE}; "
                   f"last checkpoint: {existing[-1].path if existing else 'none'}")
        if self.dist.is_main:
            (self.out_dir / DIVERGENCE_FILE).write_text(json.dumps(self.reports, indent=1))
        self.log.write({"step": step, "event": "stop", "reason": why})
        raise DivergenceError(message, self.reports)

    def _stop(self, signum: Optional[int]) -> None:
        checkpoint = self.save_checkpoint()
        self.log.write({"step": self.step - 1, "event": "interrupted", "signal": signum, "steps_done": self.step})
        raise TrainingInterrupted(signum or signal.SIGTERM, self.step, checkpoint.path)

    def _log_step(self, step: int, result: StepResult, elapsed: float) -> None:
        n = len(result.outputs)
        local = {
            "loss": float(result.loss),
            **{f"loss/{k}": sum(float(o.terms[k]) for o in result.outputs) / n for k in result.outputs[0].terms},
            **{f"diag/{k}": sum(float(o.diagnostics[k]) for o in result.outputs) / n
               for k in result.outputs[0].diagnostics},
        }
        ranks = self.dist.gather(local)
        if not self.dist.is_main:
            return
        averaged = {k: sum(r[k] for r in ranks if k in r) / sum(k in r for r in ranks) for k in local}
        record = {"step": step, **averaged, "grad_norm": float(result.grad_norm),
                  "lr": self.optimizer.param_groups[0]["lr"], "elapsed_s": round(elapsed, 3)}
        if result.status == "overflow":
            record["event"] = "fp16_overflow"
        self.log.write(record)
        if self.tensorboard is not None:
            self.tensorboard.scalars(step, record)

    # -- checkpoints ---------------------------------------------------------------------------------

    def save_checkpoint(self) -> Checkpoint:
        """Write a checkpoint of ``self.step`` steps (collective: every rank calls it; rank 0 writes)."""
        loss_sum, count = self.dist.sum(self.interval).tolist()
        self.interval.zero_()
        metric = loss_sum / count if count > 0 else None
        gathered = self.dist.gather({"rng": capture_rng(), "generators": self.batches.state_dict()["generators"]})
        self.guard.checkpointed()
        path = self.store.path_for(self.step)
        if self.dist.is_main and self.last_saved != self.step:
            state = {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ema_updates": self.ema.num_updates,
                "data": self.data.state_dict(),
                "guard": self.guard.state_dict(),
                "method": self.method.state_dict(),
                "auxiliary": self.auxiliary.state_dict(),
                "rng": [g["rng"] for g in gathered],
                "generators": {k: v for g in gathered for k, v in g["generators"].items()},
            }
            self.store.save(self.step, self.model, self.ema.model, state, metric)
        self.last_saved = self.step
        return Checkpoint(path, self.step, metric)

    # -- end -----------------------------------------------------------------------------------------

    def finish(self, train_seconds: float, evaluate_at_end: bool) -> RunResult:
        """Write the final weights and (rank 0) evaluate."""
        self.log.close()
        if not self.dist.is_main:
            return RunResult(self.out_dir, {}, train_seconds)
        save_weights(self.model, self.out_dir / runs.WEIGHTS_FILE)
        save_weights(self.ema.model, self.out_dir / runs.EMA_WEIGHTS_FILE)
        results: dict[str, Any] = {}
        if evaluate_at_end:
            results, panels = evaluate(self.ema.model, self.data, self.cfg.eval, self.cfg.train.seed, self.dist.device,
                                       self.method.sampler, self.method.schedule)
            plot_panels(panels, self.out_dir / "samples.png",
                        title=f"{self.method.name} on {self.data.name}, {self.cfg.train.steps} steps")
            (self.out_dir / "metrics.md").write_text(metrics_table(results) + "\n")
        summary = {"method": self.method.name, "data": self.data.name, "steps": self.cfg.train.steps,
                   "train_seconds": round(train_seconds, 2), "samplers": results}
        (self.out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        if evaluate_at_end:
            write_report(self.out_dir)
        if self.tensorboard is not None:
            self.tensorboard.summary(self.step, results, self.out_dir / "samples.png")
            self.tensorboard.close()
        return RunResult(self.out_dir, summary, train_seconds)

    def _info(self, message: str) -> None:
        if self.dist.is_main:
            logger.info(message)

    def _warn(self, message: str) -> None:
        if self.dist.is_main:
            logger.warning(message)


def train(
    cfg: Config,
    out_dir: Path,
    progress: bool = True,
    evaluate_at_end: bool = True,
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> RunResult:
    """Train a flow map as ``cfg`` says, writing the run directory ``out_dir``.

    ``resume=True`` continues from the newest valid checkpoint in ``out_dir`` (from step 0 when there
    is none). A fresh start refuses a directory that holds checkpoints unless ``overwrite=True``.
    Under ``torchrun`` every process calls this; rank 0 writes the directory and evaluates.
    Raises ``TrainingInterrupted`` after SIGTERM/SIGINT (a checkpoint was written) and
    ``DivergenceError`` when the divergence guard gives up.
    """
    dist_ctx = DistributedContext.setup(cfg.train.device, cfg.distributed.backend)
    try:
        trainer = Trainer(cfg, out_dir, dist_ctx, progress)
        try:
            trainer.start(resume, overwrite)
            seconds = trainer.run()
        finally:
            trainer.log.close()
        return trainer.finish(seconds, evaluate_at_end)
    finally:
        dist_ctx.close()


def default_run_dir(cfg: Config, root: Optional[Path] = None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = Path(cfg.data.name).stem
    return (root or Path("runs")) / f"{cfg.method['name']}-{name}-{stamp}"
