"""The checkerboard record: a flow map trained for a fixed wall-clock budget on a CPU, scored with
Boffi et al.'s metric (KL of the target to a 50 x 50 histogram of 64k samples on [-1, 1]^2), under
both estimators of the target's bin probabilities: exact (``kl_K``) and the density at the bin centres
(``kl_mid_K``, our best reading of their App. G.1; its floor is far higher).

    OMP_NUM_THREADS=2 python benchmarks/checkerboard_record.py \\
        --config benchmarks/configs/checkerboard_record.yaml --minutes 30 --out results/record

The run is budgeted in wall-clock time, not steps: after the linear warm-up the learning rate
follows a cosine in elapsed *training* time (``lr = lr_0 (1 + cos(pi * elapsed / budget)) / 2``)
and training stops when the budget is spent, so the schedule fits whatever share of the CPU the
run gets. The batch may grow late in training (``--late-batch``, from ``--late-fraction`` of the
budget on). The loop is ``flowmaps.train.loop.train``'s (method loss, gradient clipping, Adam,
EMA) with only the schedule made time-based, plus the guard's loss-spike filter (``--skip-spikes
K``, ``guard.spike_factor`` of the trainer): a step whose loss exceeds ``K`` times the median of the
previous 200 accepted losses leaves the weights, optimiser and EMA untouched; the number of skipped
steps is reported. A run of ``SPIKE_STREAK`` spikes in a row means the loss has left the median's
level, usually because one accepted step moved the weights somewhere bad; refusing every later step
would freeze them there. So the run rolls back, as the trainer's guard does: the weights, optimiser
and EMA return to the last healthy snapshot (taken every ``SNAPSHOT_EVERY`` steps, before the update
of a step whose loss was no spike) and the learning rate is halved from then on (``rollbacks`` in
``record.json``). Without a snapshot, or after ``MAX_ROLLBACKS`` rollbacks, it is a divergence:
training stops, says so, and the EMA weights of the accepted steps are scored
(``diverged_at_step``). Every ``--curve-every`` seconds of training the EMA weights are saved; after
training (outside the budget) each snapshot is scored, which gives the curve of KL against training
time and steps. Writes ``record.json``, ``curve.csv``, ``record.md``, ``samples.png`` and the run
directory (``config.yaml``, weights) into ``--out``. The final score also samples the diagonal's
probability-flow ODE (Heun, ``--ode-steps`` steps, 64 by default; 0 skips it, which makes short
screening runs cheaper). The flow map is scored on the uniform grids (the comparison with Boffi et
al.) and, when ``--sampler-rho`` or the method's ``grid_rho`` is not 1, also on the grids
``t_k = (1 - k/N)^rho`` (``flowmaps.samplers.time_grid``; ``kl_K_rho``), which ``samples.png`` shows.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch

from flowmaps import metrics, runs
from flowmaps.build import build_model, config_from_dict, configured_method_options, resolve_config
from flowmaps.data import get_data
from flowmaps.methods import LossContext, build_method
from flowmaps.plots import plot_panels
from flowmaps.samplers import check_rho, sample_flow_map, sample_ode, time_grid
from flowmaps.schedules import get_schedule
from flowmaps.train.checkpoint import load_weights, save_weights
from flowmaps.train.config import GuardConfig, apply_override, read_config_file, save_config
from flowmaps.train.ema import EMA
from flowmaps.train.guard import DivergenceGuard
from flowmaps.train.loop import make_optimizer

SPIKE_STREAK = 50  # spikes in a row that roll the run back (or end it as diverged)
SNAPSHOT_EVERY = 500  # steps between snapshots of healthy weights to roll back to
MAX_ROLLBACKS = 2
BOFFI_LSD = {1: 0.086, 8: 0.070}  # Boffi et al. 2025, LSD on the checkerboard (their Table)
NFE = (1, 2, 4, 8, 16)
N_SAMPLES = 65536


def score(model: torch.nn.Module, seed: int, n: int = N_SAMPLES, ode_steps: int = 0, rho: float = 1.0) -> dict[str, float]:
    """Histogram KL (50 x 50 on [-1, 1]^2, ``n`` samples) of the flow map at each NFE (and the ODE),
    under both estimators of the target's bin probabilities (``flowmaps.metrics.checkerboard_bin_probs``).

    ``kl_K`` (exact bin probabilities) and ``kl_mid_K`` (the density at the bin centres) on the uniform
    grid; with ``rho != 1`` also ``kl_K_rho`` and ``kl_mid_K_rho`` on ``time_grid(K, rho=rho)``.
    """
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 2, generator=gen)
    samples = {}
    with torch.no_grad():
        for k in NFE:
            samples[f"{k}"] = sample_flow_map(model, noise, k)
        if rho != 1:
            for k in NFE[1:]:
                samples[f"{k}_rho"] = sample_flow_map(model, noise, time_grid(k, rho=rho))
        if ode_steps:
            samples[f"ode_{ode_steps}"] = sample_ode(model, noise, ode_steps, "heun")
    return {f"kl_{prefix}{key}": metrics.histogram_kl(target, x) for prefix, target in _targets().items()
            for key, x in samples.items()}


def _targets() -> dict[str, torch.Tensor]:
    """The two estimators' bin probabilities, keyed by the prefix of their results."""
    return {"": metrics.checkerboard_bin_probs(50), "mid_": metrics.checkerboard_bin_probs(50, estimator="midpoint")}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="flowmaps config (YAML/TOML): data, model, method, optim")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget in wall-clock minutes")
    parser.add_argument("--late-batch", type=int, default=0, help="batch size from --late-fraction on (0: unchanged)")
    parser.add_argument("--late-fraction", type=float, default=0.7)
    parser.add_argument("--curve-every", type=float, default=150.0, help="seconds of training between snapshots")
    parser.add_argument("--eval-seed", type=int, default=1234)
    parser.add_argument("--ode-steps", type=int, default=64,
                        help="Heun steps of the diagonal's ODE in the final score (0: skip it, e.g. for screening)")
    parser.add_argument("--sampler-rho", type=float, default=None, metavar="RHO",
                        help="also score the flow map on the grids t_k = (1 - k/N)^RHO (default: the method's "
                             "grid_rho, if any; the uniform grid is always scored)")
    parser.add_argument("--skip-spikes", type=float, default=0.0, metavar="K",
                        help="skip steps whose loss exceeds K x the median of the last 200 (0: off)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.skip_spikes < 0 or 0 < args.skip_spikes <= 1:
        parser.error(f"--skip-spikes must be 0 (off) or above 1; got {args.skip_spikes}")

    values = read_config_file(args.config)
    for assignment in args.set:
        apply_override(values, assignment)
    cfg = config_from_dict(values)
    if cfg.data.name != "checkerboard":
        raise SystemExit(f"the record is defined on the checkerboard; the config says data.name={cfg.data.name!r}")
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cpu")
    data = get_data(cfg.data.name, seed=cfg.train.seed)
    options = configured_method_options(cfg)
    method = build_method(cfg.method["name"], get_schedule(cfg.train.schedule), **options)
    cfg = resolve_config(cfg, data.shape, method)  # what it trains with, recorded in full
    try:
        rho = check_rho(args.sampler_rho if args.sampler_rho is not None else cfg.method.get("grid_rho", 1.0),
                        "--sampler-rho")
    except ValueError as err:
        parser.error(str(err))
    out = Path(args.out)
    (out / "curve").mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / runs.CONFIG_FILE)
    (out / runs.DATA_INFO_FILE).write_text(json.dumps({"dim": 2, "name": "checkerboard"}))

    model = build_model(cfg, data.dim).to(device)
    ema = EMA(model, cfg.optim.ema_decay)
    optimizer = make_optimizer(cfg, model.parameters())
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    budget = 60.0 * args.minutes
    warmup = cfg.optim.warmup_steps

    snapshots: list[tuple[int, float, Path]] = []
    elapsed, step, next_snapshot = 0.0, 0, args.curve_every
    spikes = DivergenceGuard(GuardConfig(spike_factor=args.skip_spikes, spike_window=200, max_strikes=SPIKE_STREAK,
                                         on_divergence="rollback", max_rollbacks=MAX_ROLLBACKS, lr_factor=0.5))
    healthy: Optional[dict] = None
    skipped: list[int] = []
    rollbacks: list[int] = []
    diverged_at: Optional[int] = None
    log = (out / "train_log.jsonl").open("w")
    while elapsed < budget:
        tick = time.perf_counter()
        progress = elapsed / budget
        factor = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr * factor * spikes.lr_scale
        batch_size = args.late_batch if args.late_batch and progress >= args.late_fraction else cfg.train.batch_size
        batch = data.sample(batch_size, generator)
        # curricula see the elapsed share of the budget: the step count the budget would reach at this pace
        total_steps = max(step + 1, round(step / progress)) if progress > 0 else 10**9
        loss = method.loss(model, batch, generator, LossContext(step, total_steps, ema.model))
        if not torch.isfinite(loss.loss):
            raise FloatingPointError(f"non-finite loss at step {step}")
        value = float(loss.loss.detach())
        if spikes.is_spike(value):
            skipped.append(step)
            action = spikes.spike()
            if action == "rollback" and healthy is not None:
                model.load_state_dict(healthy["model"])
                optimizer.load_state_dict(healthy["optimizer"])
                ema.model.load_state_dict(healthy["ema"])
                spikes.rolled_back()
                rollbacks.append(step)
                print(f"record: {SPIKE_STREAK} losses in a row above {args.skip_spikes} x the running median at "
                      f"step {step}; rolled back to step {healthy['step']}, learning rate x{spikes.lr_scale:g}")
            elif action != "skip":
                diverged_at = step - SPIKE_STREAK + 1
                print(f"record: diverged at step {diverged_at}: {SPIKE_STREAK} losses in a row above "
                      f"{args.skip_spikes} x the running median; training stops, the EMA weights are scored")
        else:
            if args.skip_spikes and step > 0 and step % SNAPSHOT_EVERY == 0:
                healthy = {"step": step, "model": copy.deepcopy(model.state_dict()),
                           "optimizer": copy.deepcopy(optimizer.state_dict()), "ema": copy.deepcopy(ema.model.state_dict())}
            optimizer.zero_grad(set_to_none=True)
            loss.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
            optimizer.step()
            ema.update(model)
        step += 1
        elapsed += time.perf_counter() - tick
        if step % 500 == 0:
            log.write(json.dumps({"step": step, "elapsed_s": round(elapsed, 1), "lr": group["lr"], "batch": batch_size,
                                  "loss": value, "skipped_spikes": len(skipped), **{k: float(v) for k, v in loss.terms.items()}}) + "\n")
            log.flush()
        if elapsed >= next_snapshot:
            path = out / "curve" / f"ema_{step:07d}.safetensors"
            save_weights(ema.model, path)
            snapshots.append((step, elapsed, path))
            next_snapshot += args.curve_every
        if diverged_at is not None:
            break
    log.close()
    save_weights(model, out / runs.WEIGHTS_FILE)
    save_weights(ema.model, out / runs.EMA_WEIGHTS_FILE)
    wall = {"train_seconds": round(elapsed, 1), "steps": step, "skipped_spikes": len(skipped),
            "skipped_steps": skipped[:100], "rollbacks": rollbacks, "diverged_at_step": diverged_at}
    print(f"record: trained {step} steps in {elapsed:.0f}s of training time ({len(skipped)} loss spikes skipped)")

    final = score(ema.model, args.eval_seed, ode_steps=args.ode_steps, rho=rho)
    exact_samples = data.sample(N_SAMPLES, torch.Generator().manual_seed(args.eval_seed)).x0
    floors = {f"floor{'_' + p.rstrip('_') if p else ''}": metrics.histogram_kl(t, exact_samples) for p, t in _targets().items()}
    curve = []
    probe = build_model(cfg, 2)
    for snap_step, snap_elapsed, path in snapshots:
        load_weights(probe, path)
        curve.append({"step": snap_step, "train_seconds": round(snap_elapsed, 1), **score(probe.eval(), args.eval_seed, rho=rho)})
    if not snapshots or snapshots[-1][0] != step:
        curve.append({"step": step, "train_seconds": round(elapsed, 1), **{k: v for k, v in final.items() if "ode" not in k}})
    with (out / "curve.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(curve[-1]))
        writer.writeheader()
        writer.writerows(curve)
    result = {**wall, **floors, **final, "boffi_lsd": BOFFI_LSD, "config": cfg.to_dict(),
              "late_batch": args.late_batch, "late_fraction": args.late_fraction, "minutes": args.minutes,
              "skip_spikes": args.skip_spikes, "sampler_rho": rho,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    (out / "record.json").write_text(json.dumps(result, indent=2))
    lines = ["| sampler | NFE | KL, exact-bin estimator | KL, midpoint estimator | Boffi et al. LSD |",
             "|---|---|---|---|---|"]

    def row(label: str, nfe: object, key: str, boffi: object = "") -> str:
        return f"| {label} | {nfe} | {final[f'kl_{key}']:.4f} | {final[f'kl_mid_{key}']:.4f} | {boffi} |"

    lines += [row("flow map", k, f"{k}", BOFFI_LSD.get(k, "")) for k in NFE]
    if rho != 1:
        lines += [row(f"flow map, grid rho {rho:g}", k, f"{k}_rho", BOFFI_LSD.get(k, "")) for k in NFE[1:]]
    if args.ode_steps:
        lines += [row("ODE heun (diagonal)", 2 * args.ode_steps, f"ode_{args.ode_steps}")]
    lines += [f"| exact samples (floor) | | {floors['floor']:.4f} | {floors['floor_mid']:.4f} | |"]
    (out / "record.md").write_text("\n".join(lines) + "\n")
    gen = torch.Generator().manual_seed(args.eval_seed)
    noise = torch.randn(N_SAMPLES, 2, generator=gen)
    with torch.no_grad():
        panels = {"data": data.sample(N_SAMPLES, gen).x0,
                  **{f"{k} step{'s' * (k > 1)}": sample_flow_map(ema.model, noise, time_grid(k, rho=rho)) for k in NFE}}
    grid = "uniform grid" if rho == 1 else f"grid rho {rho:g}"
    plot_panels(panels, out / "samples.png", title=f"checkerboard record: {step} steps, {elapsed / 60:.1f} min, {grid}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
