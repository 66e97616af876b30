"""The training loop: shards -> method loss -> guarded optimiser step -> EMA -> log -> checkpoint.

``train(cfg, out_dir)`` trains on one process, or on every process that ``torchrun`` started (see
``flowmaps.train.distributed``), and writes a run directory: ``config.yaml`` (resolved),
``data_info.json``, ``train_log.jsonl``, ``checkpoints/``, and at the end ``model.safetensors``,
``model_ema.safetensors``, ``metrics.json`` (and, with evaluation, ``metrics.md``, ``samples.png``).

A run survives interruptions: checkpoints (``flowmaps.train.checkpoint``) hold everything the
next steps depend on, so ``train(cfg, out_dir, resume=True)`` continues bit-identically on the CPU;
SIGTERM/SIGINT write a checkpoint and raise ``TrainingInterrupted``; non-finite steps and loss spikes
go to the divergence guard (``flowmaps.train.guard``). ``docs/training.md`` is the user's guide.

The directory holds one run at a time (``flowmaps.train.rundir``): rank 0 holds ``run.lock`` for the
life of the process (``flowmaps.train.lock``), records the run's identity in every artefact, keeps
``status.json`` up to date (``running`` at the start and at each checkpoint, then ``finished``,
``interrupted``, ``diverged`` or ``failed``), and retires the final artefacts of an earlier session
before training starts, so final weights exist only beside the status and config they belong to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from flowmaps.build import build_model, configured_method_options, load_run_config, resolve_config
from flowmaps.data import DataSource, data_fingerprint, get_data
from flowmaps.files import WriteError, describe_os_error, dumps, json_safe, read_json, write_json, write_text_atomic
from flowmaps.evaluation import check_eval_config, evaluate, metrics_table
from flowmaps.methods import LossContext, LossOutput, build_method
from flowmaps.plots import plot_panels
from flowmaps.report import write_report
from flowmaps.schedules import Schedule, get_schedule
from flowmaps.teachers import GuidedTeacher, Teacher, load_teacher
from flowmaps.train.auxiliary import AuxiliaryNetworks
from flowmaps.train.checkpoint import (
    STATE_FILE, Checkpoint, CheckpointError, CheckpointStore, LoadedCheckpoint, capture_rng, restore_rng,
    save_weights_with_manifest,
)
from flowmaps.train.config import Config, ConfigError, config_text
from flowmaps.train.distributed import DistributedContext, ShardedBatches, StopRequest, check_gradient_sync
from flowmaps.train.ema import EMA
from flowmaps.train.guard import DivergenceError, DivergenceGuard, diagnose, summarize
from flowmaps.train.initialization import initialize_from, source_model_options
from flowmaps.train.lock import RunLock
from flowmaps.train.precision import compile_model, grad_scaler, with_precision
from flowmaps.train.rundir import (
    CONFIG_FILE, DATA_INFO_FILE, DIVERGENCE_FILE, EMA_WEIGHTS_FILE, LOG_FILE, METRICS_FILE, METRICS_TABLE_FILE,
    SAMPLES_FILE, WEIGHTS_FILE, WEIGHTS_MANIFEST_FILE, RunDirectoryError, RunIdentity, RunStatus, check_directory,
    clear_final_artefacts, config_hash, file_config_hash, missing_ancestors, new_run_id, prepare_new_run, read_status,
    remove_if_empty, remove_leftovers, write_status,
)
from flowmaps.train.tensorboard import TensorBoardLog

logger = logging.getLogger("flowmaps.train")
# what a checkpoint's state.pt must hold for the trainer to restore it (``auxiliary`` is optional: older runs)
_STATE_KEYS = {"step": int, "optimizer": dict, "scaler": dict, "ema_updates": int, "data": dict, "guard": dict,
               "method": dict, "rng": list, "generators": dict}
_RESUME_CHECKED = ("data", "method", "teacher", "guidance", "model", "shape", "num_classes")  # what a resumed run must share with its checkpoint


@dataclass
class RunResult:
    """What ``train`` did: ``trained`` is false when a resumed run was already finished under its config."""

    run_dir: Path
    metrics: dict[str, Any]
    train_seconds: float
    trained: bool = True


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped training after ``step`` steps; ``checkpoint`` holds the state to resume."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(f"stopped by signal {signum} after {step} steps; checkpoint {checkpoint}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


def check_classes(cfg: Config, data: DataSource) -> None:
    """A class-conditional model (``model.num_classes = K``) needs labelled data whose labels fit in
    ``K`` classes; an unconditional one trains on any data (labels are then not used)."""
    k = cfg.model.num_classes
    if k == 0:
        if data.num_classes:
            logger.info(f"{data.name!r} has {data.num_classes} classes but model.num_classes = 0: training an "
                        "unconditional model (set model.num_classes to use the labels)")
        return
    if data.num_classes == 0:
        raise ConfigError(f"model.num_classes = {k} asks for a class-conditional model, but the data {cfg.data.name!r} "
                          "has no labels (use .npz with y, a class-folder tree, fashion-mnist or a mixture spec with "
                          "labels; or model.num_classes = 0)")
    if data.num_classes > k:
        raise ConfigError(f"the data {cfg.data.name!r} has {data.num_classes} classes (labels up to "
                          f"{data.num_classes - 1}) but model.num_classes = {k}: labels out of range")


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
        write_text_atomic(self.path, "".join(f"{line}\n" for line in lines))
        self.file = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as strict JSON (non-finite numbers as strings, ``flowmaps.files.dumps``)."""
        if self.file is not None:
            try:
                self.file.write(dumps(record) + "\n")
                self.file.flush()
            except OSError as err:
                raise WriteError(f"cannot write {describe_os_error(err, self.path)}", err.errno, self.path) from err

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class Trainer:
    """One training run on this process: built from the config (``resume``: a run that continues its own
    record), then ``start`` / ``run`` / ``finish``."""

    def __init__(self, cfg: Config, out_dir: Path, dist_ctx: DistributedContext, progress: bool, resume: bool = False):
        self.cfg, self.out_dir, self.dist, self.progress = cfg, Path(out_dir), dist_ctx, progress
        device = dist_ctx.device
        torch.manual_seed(cfg.train.seed)
        self.data = get_data(cfg.data.name, seed=cfg.train.seed)
        check_classes(cfg, self.data)
        check_eval_config(cfg.eval, self.data)
        options = configured_method_options(cfg)
        schedule = get_schedule(cfg.train.schedule)
        teacher = self._teacher(device, schedule)
        self.method = build_method(cfg.method["name"], schedule, teacher=teacher, **options)
        # the run records every option it trains with, so a later change of a default cannot alter its meaning
        # a resumed run's network is the one it recorded (its init_from source may be gone by now)
        inherited = source_model_options(str(self.out_dir) if resume else cfg.train.init_from, cfg.model.backbone)
        cfg = self.cfg = resolve_config(cfg, self.data.shape, self.method, inherited)
        self.model = build_model(cfg, self.data.shape).to(device)  # the plain FlowMap: saved, EMA'd, replayed
        self.model.sampler = self.method.sampler
        self.model.grid_rho = float(cfg.method.get("grid_rho", 1.0))  # as flowmaps.load sets it
        self.ema = EMA(self.model, cfg.optim.ema_decay)
        self.optimizer = make_optimizer(cfg, self.model.parameters())
        self.auxiliary = AuxiliaryNetworks(self.method.auxiliary_networks(self.data.shape, cfg.model.num_classes), dist_ctx)
        self.scaler = grad_scaler(cfg.train.precision, device)
        self.replay_model = with_precision(self.model, cfg.train.precision, device)
        network = self.replay_model
        if cfg.train.compile:
            rtol = 1e-4 if cfg.train.precision == "fp32" else 3e-2
            network = compile_model(network, self.data.shape, device, getattr(self.method, "jvp_backend", "auto"), rtol)
        self.train_model = dist_ctx.wrap(network)  # what the method calls
        self.batches = ShardedBatches(self.data, cfg.train.batch_size, cfg.train.grad_accum, dist_ctx, cfg.train.seed,
                                      labels=cfg.model.num_classes > 0, label_dropout=cfg.train.label_dropout,
                                      guidance_range=cfg.train.guidance_range,
                                      guidance_draw=cfg.train.guidance_draw)
        self.store = CheckpointStore(self.out_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best)
        self.guard = DivergenceGuard(cfg.guard)
        self.log = RunLog(self.out_dir / LOG_FILE, dist_ctx.is_main)
        self.tensorboard: Optional[TensorBoardLog] = None  # opened by start, once the run directory is ours
        self.step = 0  # optimiser steps done
        self.first_step = 0
        self.interval = torch.zeros(2, device=device)  # loss sum and count of healthy steps since the last checkpoint
        self.last_saved: Optional[int] = None
        self.reports: list[dict[str, Any]] = []
        self.identity = RunIdentity(dist_ctx.gather(new_run_id())[0], config_hash(cfg))  # rank 0's id on every rank
        self.status: Optional[RunStatus] = None  # rank 0's status.json, once the run has started
        self.partially_restored = False  # a checkpoint passed its checks but failed half-way through restoring
        self.described = json_safe({"data": data_fingerprint(cfg.data.name), "method": cfg.method,
                                    "teacher": cfg.teacher, "guidance": dataclasses.asdict(cfg.guidance),
                                    "model": cfg.model.to_dict(),
                                    "shape": list(self.data.shape), "num_classes": self.data.num_classes})

    def _teacher(self, device: torch.device, schedule: Schedule) -> Optional[Teacher]:
        """The distillation teacher (``--teacher``), guided when the ``guidance`` section says so or when
        the student takes a guidance scale (each row's own, ``train.guidance_range``)."""
        cfg = self.cfg
        if cfg.teacher is None:
            return None
        teacher = load_teacher(cfg.teacher, self.data, device, schedule)
        g = cfg.guidance
        if g.teacher_scale == 1.0 and g.weak_teacher is None and cfg.train.guidance_range is None:
            return teacher  # a guidance-conditioned student's scales guide the teacher row by row
        weak = None if g.weak_teacher is None else load_teacher(g.weak_teacher, self.data, device, schedule)
        return GuidedTeacher(teacher, g.teacher_scale, weak)

    # -- start ---------------------------------------------------------------------------------------

    def start(self, resume: bool, restart: bool = False) -> bool:
        """Begin the run in its directory (locked, and for a new run cleared, by ``train``); returns
        ``False`` when a resumed run is already finished under this config (nothing to do).

        ``resume`` restores the newest valid checkpoint that belongs to this run (same data, method,
        teacher and model; ``RunDirectoryError`` otherwise) and refuses a target of fewer steps than done.
        Without a valid checkpoint it refuses too, unless ``restart``: then the run starts again from step 0.
        """
        previous = read_status(self.out_dir) if resume else None
        if self.dist.is_main:
            remove_leftovers(self.out_dir)
            self.store.remove_temporaries()
        self.dist.barrier()
        loaded = None
        if resume:
            if previous is not None and self._already_finished(previous):
                self._info(f"{self.out_dir} is already finished ({previous.describe()}): nothing to do")
                return False
            if previous is not None and previous.step > self.cfg.train.steps:
                self._refuse_shrinking(previous.step)
            loaded = self.store.latest_valid(report=self._warn, use=self._resume_from)
            if loaded is None:
                self._without_checkpoint(restart)
            else:
                run_id = (loaded.run or {}).get("run_id") or (previous.run_id if previous is not None else None)
                self.identity = RunIdentity(run_id or self.identity.run_id, self.identity.config_hash)
                self._info(f"resuming from {loaded.checkpoint.path} ({self.step} steps done)")
        if loaded is None:
            self._initialize()
            self.ema = EMA(self.model, self.cfg.optim.ema_decay)
        self.first_step = self.step
        if self.dist.is_main:
            self._begin(previous if resume else None, restarted=resume and loaded is None)
        self.log.open(keep_before=self.step if loaded is not None else None)
        if self.cfg.train.tensorboard and self.dist.is_main:
            self.tensorboard = TensorBoardLog(self.out_dir)
        return True

    def _initialize(self) -> None:
        """A fresh run's weights: ``train.init_from``'s EMA weights, else the method's own initialisation."""
        spec = self.cfg.train.init_from
        if spec is None:
            self.method.initialize(self.model)
            return
        source = initialize_from(spec, self.model, self.data.shape, self.cfg.model.num_classes, self.dist.device)
        self._info(f"initialised from {spec} ({source.provenance['weights']}, run {source.provenance['run_id']})")

    def _already_finished(self, previous: RunStatus) -> bool:
        """``status.json`` says finished under the ``config.yaml`` beside it, which asks for nothing this
        resume changes, and the final weights are there."""
        files = (WEIGHTS_FILE, EMA_WEIGHTS_FILE, WEIGHTS_MANIFEST_FILE)
        return (previous.state == "finished" and previous.step == self.cfg.train.steps
                and all((self.out_dir / f).is_file() for f in files)
                and file_config_hash(self.out_dir) == previous.config_hash
                and load_run_config(self.out_dir / CONFIG_FILE) == self.cfg)

    def _refuse_shrinking(self, done: int) -> None:
        raise RunDirectoryError(
            f"{self.out_dir} has done {done} steps; train.steps={self.cfg.train.steps} would shrink the run below what "
            f"it has done (and its config would claim fewer steps than its weights had): give --steps {done} or more")

    def _without_checkpoint(self, restart: bool) -> None:
        """A resume found no checkpoint it can use: refuse, or (``restart``) start again from step 0."""
        if not restart:
            raise RunDirectoryError(
                f"{self.out_dir} has no valid checkpoint to resume from (in {self.store.root}); pass --restart "
                "(train(..., restart=True)) to start this run again from step 0 with its config.yaml")
        if self.partially_restored:
            raise RunDirectoryError(
                f"{self.out_dir}: a checkpoint failed half-way through restoring, so --restart cannot start cleanly "
                "in this process; run the same command again")
        self._warn(f"no valid checkpoint in {self.store.root}: --restart starts the run again from step 0")

    def _begin(self, previous: Optional[RunStatus], restarted: bool) -> None:
        """Rank 0: retire an earlier session's final artefacts, then write status, config and data info."""
        carried = previous.sessions if previous is not None and previous.run_id == self.identity.run_id else []
        session = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "from_step": self.step,
                   "steps": self.cfg.train.steps, "config_hash": self.identity.config_hash}
        self.status = RunStatus("running", self.step, self.cfg.train.steps, self.identity.run_id,
                                self.identity.config_hash, sessions=[*carried, session])
        if previous is None and not restarted:
            write_status(self.out_dir, self.status)
        else:
            kept = clear_final_artefacts(self.out_dir, previous, lambda: write_status(self.out_dir, self.status))
            if kept is not None:
                earlier = previous.describe() if previous is not None else "written without status.json"
                self._info(f"moved the final artefacts of the earlier session ({earlier}) to {kept}")
        if restarted and self.store.root.exists():
            shutil.rmtree(self.store.root)
        write_text_atomic(self.out_dir / CONFIG_FILE, config_text(self.cfg))
        write_json(self.out_dir / DATA_INFO_FILE, {"name": self.data.name, "dim": self.data.dim,
                                                   "shape": list(self.data.shape),
                                                   "num_classes": self.cfg.model.num_classes,
                                                   "data_classes": self.data.num_classes})

    def set_status(self, state: str, message: Optional[str] = None) -> None:
        """Rank 0: record ``state`` at the current step in ``status.json``."""
        if self.dist.is_main and self.status is not None:
            self.status.state, self.status.step, self.status.message = state, self.step, message
            write_status(self.out_dir, self.status)

    def record_failure(self, err: BaseException) -> None:
        """Record that ``err`` ended the run (``failed``; ``interrupted`` for a second Ctrl-C, which leaves
        no checkpoint). When even ``status.json`` cannot be written, a note on ``err`` says so: ``err``
        stays the error raised."""
        state = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        try:
            self.set_status(state, f"{type(err).__name__}: {err}")
        except OSError as write_error:
            err.add_note(f"status.json could not be updated either: {write_error}")

    def _resume_from(self, loaded: LoadedCheckpoint) -> None:
        """Check that ``loaded`` belongs to this run and fits its step target, then restore it."""
        if loaded.run is None:
            self._warn(f"{loaded.checkpoint.path} was written before checkpoints recorded their run: its data, "
                       "method and model cannot be checked against config.yaml")
        else:
            for key in _RESUME_CHECKED:
                if key in loaded.run and loaded.run[key] != self.described[key]:
                    raise RunDirectoryError(
                        f"{self.out_dir} cannot be resumed: its checkpoint {loaded.checkpoint.path.name} was trained "
                        f"with {key} {loaded.run[key]!r}, but this run has {key} {self.described[key]!r} "
                        "(a changed config.yaml or data file); start a new run instead (another --out, or --overwrite)")
        if loaded.checkpoint.step > self.cfg.train.steps:
            self._refuse_shrinking(loaded.checkpoint.step)
        self._restore(loaded)

    def _restore(self, loaded: LoadedCheckpoint) -> None:
        """Restore the training state of ``loaded``; ``CheckpointError`` when its ``state.pt`` lacks what a
        run needs (the caller then falls back to an earlier checkpoint)."""
        state, path = loaded.state, loaded.checkpoint.path
        wrong = [f"{k} (missing)" if k not in state else f"{k} ({type(state[k]).__name__}, expected {t.__name__})"
                 for k, t in _STATE_KEYS.items() if not isinstance(state.get(k), t)]
        if not wrong and not state["rng"]:
            wrong = ["rng (empty)"]
        if wrong:
            raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is not a training state: {', '.join(wrong)}")
        if len(state["rng"]) != self.dist.world_size:
            self._warn(f"{loaded.checkpoint.path} was written by {len(state['rng'])} process(es), this run has "
                       f"{self.dist.world_size}: the data shards continue their streams, the global RNG states "
                       "of missing ranks are taken from rank 0")
        try:
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
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as err:
            self.partially_restored = True
            raise CheckpointError(
                f"checkpoint {path}: {STATE_FILE} cannot be restored ({type(err).__name__}: {err})") from err
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
        guard_state = self.guard.state_dict()  # the guard's own count of rollbacks, not the checkpoint's
        loaded = self.store.latest_valid(report=self._warn, use=self._restore) if action == "rollback" else None
        if loaded is None:
            if action == "rollback":
                why = "no checkpoint to roll back to"
            elif self.cfg.guard.on_divergence == "stop":
                why = "guard.on_divergence=stop"
            else:
                why = f"rollbacks used up ({self.guard.rollbacks}/{self.cfg.guard.max_rollbacks})"
            self._diverged(step, f"{cause}, {why}")
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
            write_json(self.out_dir / DIVERGENCE_FILE, {"run_id": self.identity.run_id,
                                                        "config_hash": self.identity.config_hash, "step": step,
                                                        "reason": why, "reports": self.reports})
        self.log.write({"step": step, "event": "stop", "reason": why})
        self.set_status("diverged", f"at step {step}: {why}")
        raise DivergenceError(message, self.reports)

    def _stop(self, signum: Optional[int]) -> None:
        checkpoint = self.save_checkpoint()
        self.log.write({"step": self.step - 1, "event": "interrupted", "signal": signum, "steps_done": self.step})
        self.set_status("interrupted", f"by signal {signum}; checkpoint {checkpoint.path.name}")
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
            run = {"run_id": self.identity.run_id, "config_hash": self.identity.config_hash, **self.described}
            self.store.save(self.step, self.model, self.ema.model, state, metric, run=run)
            self.set_status("running")
        self.last_saved = self.step
        return Checkpoint(path, self.step, metric)

    # -- end -----------------------------------------------------------------------------------------

    def finish(self, train_seconds: float, evaluate_at_end: bool) -> RunResult:
        """Write the final weights with their manifest, (rank 0) evaluate, and record ``finished`` last."""
        self.log.close()
        if not self.dist.is_main:
            return RunResult(self.out_dir, {}, train_seconds)
        identity = self.identity.metadata()
        final = {self.out_dir / WEIGHTS_FILE: self.model, self.out_dir / EMA_WEIGHTS_FILE: self.ema.model}
        metadata = {**identity, "flowmaps_step": str(self.step)}
        save_weights_with_manifest(final, self.out_dir / WEIGHTS_MANIFEST_FILE, metadata)
        results: dict[str, Any] = {}
        if evaluate_at_end:
            results, panels = evaluate(self.ema.model, self.data, self.cfg.eval, self.cfg.train.seed, self.dist.device,
                                       self.method.sampler, self.method.schedule, self.described["data"])
            plot_panels(panels, self.out_dir / SAMPLES_FILE, metadata=identity,
                        title=f"{self.method.name} on {self.data.name}, {self.cfg.train.steps} steps")
            write_text_atomic(self.out_dir / METRICS_TABLE_FILE,
                              f"{metrics_table(results)}\n\n_run {self.identity.run_id}, config "
                              f"{self.identity.config_hash[:16]}_\n")
        summary = {"method": self.method.name, "data": self.data.name, "steps": self.cfg.train.steps,
                   "train_seconds": round(train_seconds, 2), "samplers": results, "run_id": self.identity.run_id,
                   "config_hash": self.identity.config_hash}
        write_json(self.out_dir / METRICS_FILE, summary, indent=2)
        if evaluate_at_end:
            write_report(self.out_dir)
        if self.tensorboard is not None:
            self.tensorboard.summary(self.step, results, self.out_dir / "samples.png")
            self.tensorboard.close()
        self.set_status("finished")
        return RunResult(self.out_dir, summary, train_seconds)

    def _info(self, message: str) -> None:
        if self.dist.is_main:
            logger.info(message)

    def _warn(self, message: str) -> None:
        if self.dist.is_main:
            logger.warning(message)


def _on_main(dist_ctx: DistributedContext, action: Callable[[], None]) -> None:
    """Run ``action`` on rank 0 and share its failure: rank 0 raises its error, every other rank a
    ``RunDirectoryError`` with its message, so that no rank waits for one that gave up."""
    error: Optional[Exception] = None
    if dist_ctx.is_main:
        try:
            action()
        except (RunDirectoryError, OSError, ValueError) as err:
            error = err
    if dist_ctx.enabled:
        message = dist_ctx.gather(None if error is None else str(error))[0]
        if error is None and message is not None:
            raise RunDirectoryError(f"rank 0 gave up: {message}")
    if error is not None:
        raise error


def train(
    cfg: Config,
    out_dir: Path,
    progress: bool = True,
    evaluate_at_end: bool = True,
    *,
    resume: bool = False,
    overwrite: bool = False,
    restart: bool = False,
) -> RunResult:
    """Train a flow map as ``cfg`` says, writing the run directory ``out_dir``.

    Rank 0 holds ``out_dir/run.lock`` until this returns (``RunLockedError`` when another live process
    holds it). A new run refuses a directory that holds anything (another run, or files flowmaps did not
    write) unless ``overwrite=True``, which deletes only flowmaps' own files (``flowmaps.train.rundir``).
    ``resume=True`` continues the run from its newest valid checkpoint, after checking that it belongs
    to this data, method and model; it refuses when there is none, unless ``restart=True`` (start again
    from step 0), and does nothing when the run already finished under ``cfg`` (``trained`` false).
    Under ``torchrun`` every process calls this; rank 0 writes the directory and evaluates. Folders this
    call created are removed again when it fails before writing anything into them (a config check that
    needs the data).
    Raises ``TrainingInterrupted`` after SIGTERM/SIGINT (a checkpoint was written), ``DivergenceError``
    when the divergence guard gives up, ``RunDirectoryError`` for a directory that cannot be used as
    asked and ``flowmaps.files.WriteError`` when the disk refuses a write; ``status.json`` records each.
    """
    out_dir = Path(out_dir)
    dist_ctx = DistributedContext.setup(cfg.train.device, cfg.distributed.backend)
    lock = RunLock(out_dir, warn=logger.warning)
    created = missing_ancestors(out_dir) if dist_ctx.is_main else []

    def take_directory() -> None:
        check_directory(out_dir)
        if resume and not out_dir.is_dir():
            raise FileNotFoundError(f"{out_dir} does not exist: there is no run to resume")
        out_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        if not resume:
            prepare_new_run(out_dir, overwrite)

    try:
        try:
            _on_main(dist_ctx, take_directory)
            return _train_locked(cfg, out_dir, dist_ctx, progress, evaluate_at_end, resume, restart)
        finally:
            lock.release()
            remove_if_empty(created)  # refused before it wrote anything (a data-dependent check): no empty --out
    finally:
        dist_ctx.close()


def _train_locked(cfg: Config, out_dir: Path, dist_ctx: DistributedContext, progress: bool, evaluate_at_end: bool,
                  resume: bool, restart: bool) -> RunResult:
    """``train`` once the directory is this process's: build, start, run, finish, recording a failure."""
    trainer: Optional[Trainer] = None
    try:
        trainer = Trainer(cfg, out_dir, dist_ctx, progress, resume)
        if not trainer.start(resume, restart):
            metrics = out_dir / METRICS_FILE
            summary = read_json(metrics, "metrics file") if metrics.is_file() else {}
            return RunResult(out_dir, summary, 0.0, trained=False)
        try:
            seconds = trainer.run()
        finally:
            trainer.log.close()
        return trainer.finish(seconds, evaluate_at_end)
    except (TrainingInterrupted, DivergenceError):
        raise  # status.json already says so
    except BaseException as err:
        if trainer is not None:
            trainer.record_failure(err)
        raise


def default_run_dir(cfg: Config, root: Optional[Path] = None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = Path(cfg.data.name).stem
    return (root or Path("runs")) / f"{cfg.method['name']}-{name}-{stamp}"
