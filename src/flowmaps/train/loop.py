"""The training loop: data -> method loss -> optimiser step -> EMA -> log; then evaluate and save."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from flowmaps import runs
from flowmaps.build import build_model, resolve_device
from flowmaps.data import get_data
from flowmaps.evaluation import evaluate, metrics_table
from flowmaps.methods import Batch, LossContext, build_method
from flowmaps.plots import plot_panels
from flowmaps.schedules import get_schedule
from flowmaps.teachers import load_teacher
from flowmaps.train.checkpoint import save_weights
from flowmaps.train.config import Config, save_config
from flowmaps.train.ema import EMA


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    train_seconds: float


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


def train(cfg: Config, out_dir: Path, progress: bool = True, evaluate_at_end: bool = True) -> RunResult:
    """Train a flow map as ``cfg`` says, writing a run directory at ``out_dir``."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    data = get_data(cfg.data.name, seed=cfg.train.seed)
    schedule = get_schedule(cfg.train.schedule)
    options = {k: v for k, v in cfg.method.items() if k != "name"}
    teacher = load_teacher(cfg.teacher, data, device) if cfg.teacher is not None else None
    method = build_method(cfg.method["name"], schedule, teacher=teacher, **options)
    model = build_model(cfg, data.dim).to(device)
    ema = EMA(model, cfg.optim.ema_decay)
    optimizer = make_optimizer(cfg, model.parameters())
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)

    save_config(cfg, out_dir / runs.CONFIG_FILE)
    (out_dir / runs.DATA_INFO_FILE).write_text(json.dumps({"dim": data.dim, "name": data.name}))
    log_path = out_dir / "train_log.jsonl"
    log = log_path.open("w")
    start = time.perf_counter()
    bar = tqdm(range(cfg.train.steps), desc=f"{method.name} on {data.name}", disable=not progress, mininterval=1.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr * lr_factor(cfg, step)
        batch = Batch(data.sample(cfg.train.batch_size, generator))
        out = method.loss(model, batch, generator, LossContext(step, cfg.train.steps, ema.model))
        if not torch.isfinite(out.loss):
            terms = {k: float(v) for k, v in out.terms.items()}
            raise FloatingPointError(f"non-finite loss at step {step} (method {method.name}); terms: {terms}")
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        ema.update(model)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps - 1:
            record = {
                "step": step,
                "loss": float(out.loss.detach()),
                "grad_norm": float(grad_norm),
                "lr": optimizer.param_groups[0]["lr"],
                "elapsed_s": round(time.perf_counter() - start, 3),
                **{f"loss/{k}": float(v) for k, v in out.terms.items()},
                **{f"diag/{k}": float(v) for k, v in out.diagnostics.items()},
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{record['loss']:.4f}")
    log.close()
    train_seconds = time.perf_counter() - start
    save_weights(model, out_dir / runs.WEIGHTS_FILE)
    save_weights(ema.model, out_dir / runs.EMA_WEIGHTS_FILE)

    results: dict[str, Any] = {}
    if evaluate_at_end:
        results, panels = evaluate(ema.model, data, cfg.eval, cfg.train.seed, device)
        plot_panels(panels, out_dir / "samples.png", title=f"{method.name} on {data.name}, {cfg.train.steps} steps")
        (out_dir / "metrics.md").write_text(metrics_table(results) + "\n")
    summary = {"method": method.name, "data": data.name, "steps": cfg.train.steps,
               "train_seconds": round(train_seconds, 2), "samplers": results}
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    return RunResult(out_dir, summary, train_seconds)


def default_run_dir(cfg: Config, root: Optional[Path] = None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = Path(cfg.data.name).stem
    return (root or Path("runs")) / f"{cfg.method['name']}-{name}-{stamp}"
