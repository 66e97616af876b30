"""The ``flowmaps`` command line: ``train``, ``sample``, ``posterior``, ``steer``, ``bench``, ``methods``.

The CLI only parses arguments, builds a validated config and calls the library. Data-parallel
training runs the same command under torchrun: ``torchrun --nproc_per_node N -m flowmaps train ...``
(only rank 0 prints; see ``docs/training.md``).
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from flowmaps.build import config_from_dict, read_run_config
from flowmaps.methods import method_names
from flowmaps.samplers import SAMPLERS
from flowmaps.train.config import Config, ConfigError, apply_override, read_config_file


_RESUME_CONFLICTS = ("config", "data", "method", "batch_size", "seed", "teacher", "guidance", "init_from", "out",
                     "overwrite")
_RESUME_SETTABLE = ("train.steps", "train.device", "train.log_every", "train.compile", "train.grad_accum",
                    "checkpoint.", "guard.", "distributed.", "eval.")


def _config_from_args(args: argparse.Namespace) -> Config:
    values = read_config_file(args.config) if args.config else {}
    shortcuts = {"data.name": args.data, "method.name": args.method, "train.steps": args.steps,
                 "train.batch_size": args.batch_size, "train.seed": args.seed, "train.device": args.device,
                 "guidance.teacher_scale": args.guidance, "train.init_from": args.init_from}
    if args.teacher is not None:
        values["teacher"] = args.teacher
    for key, value in shortcuts.items():
        if value is not None:
            section, name = key.split(".")
            if section == "method" and isinstance(values.get("method"), dict) and values["method"].get("name") != value:
                values["method"] = {}  # options of another method do not carry over
            if isinstance(values.get(section), str):
                values[section] = {"name": values[section]}
            values.setdefault(section, {})[name] = value
    for assignment in args.set or []:
        apply_override(values, assignment)
    return config_from_dict(values)


def _resume_config(args: argparse.Namespace) -> tuple[Path, Config]:
    """The config saved in the run directory, with the few changes a resumed run may take."""
    from flowmaps.runs import CONFIG_FILE

    run_dir = Path(args.resume)
    given = [f"--{name.replace('_', '-')}" for name in _RESUME_CONFLICTS if getattr(args, name)]
    if given:
        raise ValueError(f"--resume continues {run_dir} with its own {CONFIG_FILE}; it cannot be combined with "
                         f"{', '.join(given)}")
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is not a flowmaps run directory (no {CONFIG_FILE}) and cannot be resumed")
    values = read_run_config(run_dir / CONFIG_FILE)
    for key, value in (("steps", args.steps), ("device", args.device)):
        if value is not None:
            values.setdefault("train", {})[key] = value
    for assignment in args.set or []:
        if not assignment.split("=", 1)[0].startswith(_RESUME_SETTABLE):
            raise ConfigError(f"--set {assignment} would change what a resumed run computes; only "
                              f"{', '.join(_RESUME_SETTABLE)} can be set with --resume (start a new run instead)")
        apply_override(values, assignment)
    return run_dir, config_from_dict(values)


class _StderrHandler(logging.Handler):
    """Training messages on the current ``sys.stderr``, prefixed like every CLI message."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"flowmaps: {self.format(record)}", file=sys.stderr)


def _show_training_messages() -> None:
    logger = logging.getLogger("flowmaps")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
    logger.setLevel(logging.INFO)


def _train(args: argparse.Namespace) -> int:
    from flowmaps.train.distributed import GradientSyncError, is_main_process
    from flowmaps.train.loop import TrainingInterrupted, default_run_dir, train
    from flowmaps.train.precision import CompileCheckError

    if args.restart and not args.resume:
        raise ValueError("--restart goes with --resume RUN_DIR (it restarts that run from step 0 when it has no "
                         "valid checkpoint); a new run needs no flag, and --overwrite replaces one")
    if args.resume:
        out, cfg = _resume_config(args)
    else:
        cfg = _config_from_args(args)
        out = Path(args.out) if args.out else default_run_dir(cfg)
    say = print if is_main_process() else (lambda *a, **k: None)
    _show_training_messages()
    verb = "resuming" if args.resume else "training"
    say(f"flowmaps: {verb} {cfg.method['name']} on {cfg.data.name} for {cfg.train.steps} steps -> {out}")
    start = time.perf_counter()
    try:
        result = train(cfg, out, progress=not args.no_progress, resume=bool(args.resume), overwrite=args.overwrite,
                       restart=args.restart)
    except TrainingInterrupted as stop:
        say(f"flowmaps: stopped by {signal.Signals(stop.signum).name} after {stop.step} steps; checkpoint "
            f"{stop.checkpoint}; continue with `flowmaps train --resume {out}`")
        return 128 + stop.signum
    except (GradientSyncError, CompileCheckError) as err:
        print(f"flowmaps: error: {err}", file=sys.stderr)
        return 2
    if not result.trained:
        return 0  # already finished under this config; the trainer said so
    table = (out / "metrics.md").read_text() if (out / "metrics.md").exists() else ""
    say(table)
    say(f"flowmaps: done in {time.perf_counter() - start:.1f}s (training {result.train_seconds:.1f}s); "
        f"wrote {out}/samples.png, metrics.json, metrics.md")
    return 0


def guided_condition(labels: Optional[torch.Tensor], w: float, model: Any) -> Any:
    """``--guidance W``: the labels with scale ``w`` on every row, for a model that takes it (checked:
    finite, ``>= 0``, a guidance input, within the trained range)."""
    from flowmaps.conditions import guided
    from flowmaps.nets.embeddings import check_guidance_input

    if labels is None:
        raise ValueError("--guidance needs class labels: this run's model is unconditional or --class none was given")
    cond = guided(labels, w)
    check_guidance_input(cond.scale, model.takes_guidance, model.guidance_range)
    return cond


def class_labels(spec: Optional[str], n: int, num_classes: int, device: torch.device,
                 flag: str = "--class") -> Optional[torch.Tensor]:
    """The ``[n]`` labels ``--class`` asks for: ``K`` or ``K1,K2,...`` (cycled over the samples), ``all``
    (every class in turn; the default of a class-conditional model) or ``none`` (the null class: the
    unconditional model, ``None``). An unconditional model takes no ``--class``. ``flag`` names the option in
    messages (``flowmaps posterior`` and ``steer`` call it ``--label``)."""
    if num_classes == 0:
        if spec not in (None, "none"):
            raise ValueError(f"{flag} {spec}: this run's model is unconditional (model.num_classes = 0); it takes no "
                             "class labels")
        return None
    spec = "all" if spec is None else spec
    if spec == "none":
        return None
    if spec == "all":
        classes = list(range(num_classes))
    else:
        try:
            classes = [int(k) for k in spec.split(",")]
        except ValueError as err:
            raise ValueError(f"{flag} must be a class index, a comma-separated list of them, all or none; "
                             f"got {spec!r}") from err
        bad = [k for k in classes if not 0 <= k < num_classes]
        if bad:
            raise ValueError(f"{flag} {spec}: class {bad[0]} is out of range: this model has {num_classes} classes "
                             f"(0..{num_classes - 1})")
    return torch.tensor(classes, device=device).repeat(-(-n // len(classes)))[:n]


def _sample(args: argparse.Namespace) -> int:
    from flowmaps.build import load_run_config, resolve_device
    from flowmaps.files import write_json, write_npy_atomic
    from flowmaps.memory import check_fits, out_of_memory
    from flowmaps.evaluation import sample_in_chunks
    from flowmaps.plots import save_image_grid
    from flowmaps.runs import CONFIG_FILE, data_info, load
    from flowmaps.samplers import get_sampler, grid_rho_of, sample_ode, time_grid
    from flowmaps.schedules import get_schedule

    if args.nfe < 1 or args.n < 1:
        raise ValueError(f"--nfe and --n must be positive; got --nfe {args.nfe}, --n {args.n}")
    if args.rho is not None:
        time_grid(args.nfe, rho=args.rho)  # checks --rho before the model loads
    device = resolve_device(args.device)
    out = Path(args.out if args.out.endswith(".npy") else f"{args.out}.npy")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the path of the .npy file to write")
    run_dir = Path(args.run_dir)
    model = load(run_dir, ema=not args.raw, device=device, allow_unfinished=args.allow_unfinished)
    sampler = None if args.ode else get_sampler(args.sampler or model.sampler)
    if sampler is not None:
        sampler.check_steps(args.nfe)
    cfg = load_run_config(run_dir / CONFIG_FILE)
    rho = grid_rho_of(model, args.rho)  # default: the grids it was trained on
    grid = time_grid(args.nfe, rho=rho)
    shape = data_info(run_dir).shape
    labels = class_labels(args.classes, args.n, model.num_classes, device)
    cond = labels if args.guidance is None else guided_condition(labels, args.guidance, model)
    dim = math.prod(shape)
    request = f"--n {args.n} ({args.n} samples of shape {list(shape)})"
    check_fits(4 * args.n * 8 * dim, device, request)  # noise, samples, copies and a few activations per sample
    try:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        noise = torch.randn(args.n, *shape, generator=gen, device=device)
        with torch.no_grad():
            if sampler is None:
                x = sample_in_chunks(lambda z, c: sample_ode(model, z, grid, "euler", c), noise, cond)
            else:
                x = sample_in_chunks(lambda z, c: sampler.sample(model, z, args.nfe, c, rho=rho,
                                                                 schedule=get_schedule(cfg.train.schedule),
                                                                 generator=gen), noise, cond)
        array = x.cpu().numpy()
    except (MemoryError, torch.OutOfMemoryError) as err:
        raise out_of_memory(err, request, device) from err
    _refuse_nonfinite(array, f"samples from {run_dir} ({model.provenance['weights']})", out)
    write_npy_atomic(out, array)
    name = "ode_euler" if sampler is None else sampler.name
    source = model.provenance
    meta = {"run": str(run_dir), "sampler": name, "method_sampler": model.sampler, "nfe": args.nfe, "rho": rho,
            "n": args.n, "seed": args.seed, "weights": "raw" if args.raw else "ema", "weights_file": source["weights"],
            "run_id": source["run_id"], "config_hash": source["config_hash"], "run_state": source["state"],
            "shape": list(shape), "classes": None if labels is None else labels.cpu().tolist(),
            "guidance": args.guidance}
    write_json(out.with_suffix(".json"), meta)
    if len(shape) == 3:
        save_image_grid(x, out.with_suffix(".png"))
    print(f"flowmaps: wrote {args.n} samples ({name}, {args.nfe} NFE) to {out} (metadata {out.with_suffix('.json')})")
    return 0


def _refuse_nonfinite(array: np.ndarray, what: str, out: Path) -> None:
    """Refuse to write samples with a NaN or inf in any row (``what`` names them)."""
    bad_rows = int((~np.isfinite(array.reshape(array.shape[0], -1))).any(axis=1).sum())
    if bad_rows:
        raise FloatingPointError(f"{bad_rows} of {array.shape[0]} {what} are non-finite (NaN or inf): the map "
                                 f"overflows; nothing was written to {out}")


def _steering_output(args: argparse.Namespace) -> Path:
    out = Path(args.out if args.out.endswith(".npy") else f"{args.out}.npy")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the path of the .npy file to write")
    return out


def _steering_setup(args: argparse.Namespace) -> dict[str, Any]:
    """What both steering commands check and load before their reward: the sampler's options and particles
    (checked before the model loads), the run's model, config, sample shape and condition."""
    from flowmaps.build import load_run_config, resolve_device
    from flowmaps.runs import CONFIG_FILE, data_info, load
    from flowmaps.schedules import get_schedule
    from flowmaps.steering import build_steerer
    from flowmaps.steering.base import check_count
    from flowmaps.steering.cli_support import method_options, particle_count

    check_count(args.n, "--n (the number of samples)")
    check_count(args.nfe, "--nfe (the NFE budget per particle)")
    given = {"eta": args.eta, "ess_threshold": args.ess_threshold, "lookahead": args.lookahead, "select": args.select,
             "data_std": args.data_std, "map_steps": args.map_steps}
    method_options(args.method, given)  # refuses an unknown method or a flag it does not take, before loading
    particles = particle_count(args.method, args.particles)
    out = _steering_output(args)
    device = resolve_device(args.device)
    run_dir = Path(args.run_dir)
    model = load(run_dir, ema=not args.raw, device=device, allow_unfinished=args.allow_unfinished)
    cfg = load_run_config(run_dir / CONFIG_FILE)
    info = data_info(run_dir)
    options = method_options(args.method, given, get_schedule(cfg.train.schedule))
    steerer = build_steerer(args.method, **options)
    steerer.steps_for(args.nfe, particles)  # a budget below one step's cost fails here, before any reward is built
    labels = class_labels(args.label, args.n, model.num_classes, device, flag="--label")
    cond = labels if args.guidance is None else guided_condition(labels, args.guidance, model)
    return {"out": out, "device": device, "run_dir": run_dir, "model": model, "cfg": cfg, "info": info,
            "shape": tuple(info.shape), "steerer": steerer, "particles": particles, "labels": labels, "cond": cond}


def _steering_run(args: argparse.Namespace, setup: dict[str, Any], reward: Any, meta: dict[str, Any],
                  extra_files: dict[str, np.ndarray]) -> int:
    """Steer, then write the samples, ``extra_files`` (``<out stem>.<name>.npy``), the metrics JSON, an image
    grid for image runs, and the exact reference's energy distance for a mixture run; print one line."""
    from flowmaps.files import write_json, write_npy_atomic
    from flowmaps.memory import check_fits, out_of_memory
    from flowmaps.plots import save_image_grid
    from flowmaps.steering import LinearGaussianLikelihood, QuadraticReward, steer
    from flowmaps.steering.cli_support import exact_scores, prior_of, run_mixture

    out, device, shape, model = setup["out"], setup["device"], setup["shape"], setup["model"]
    particles, run_dir = setup["particles"], setup["run_dir"]
    request = f"--n {args.n} x --particles {particles} ({args.n * particles} particles of shape {list(shape)})"
    check_fits(4 * args.n * particles * 8 * math.prod(shape), device, request)  # particles, copies, a few activations
    gen = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    try:
        result = steer(model, reward, args.n, setup["steerer"], nfe=args.nfe, particles=particles, cond=setup["cond"],
                       generator=gen, shape=shape)
    except (MemoryError, torch.OutOfMemoryError) as err:
        raise out_of_memory(err, request, device) from err
    seconds = time.perf_counter() - start
    array = result.samples.detach().cpu().numpy()
    _refuse_nonfinite(array, f"steered samples from {run_dir}", out)
    exact: dict[str, Any] = {}
    mixture = run_mixture(setup["cfg"].data.name, setup["info"].name, shape)
    if mixture is not None and isinstance(reward, LinearGaussianLikelihood) and args.n > 1:
        prior, what = prior_of(mixture, setup["cond"])
        if prior is None:
            exact = {"exact_reference": None, "exact_reference_note": what}
        else:
            a, y, s = reward.dense()
            target = prior.posterior(a, y, s)  # a quadratic reward's tilt: s = 1 / sqrt(lambda) (spec §9)
            kind = "tilt" if isinstance(reward, QuadraticReward) else "posterior"
            exact = {"exact_reference": f"the exact {kind} of {what}", **exact_scores(result.samples, target, args.seed)}

    write_npy_atomic(out, array)
    files = {}
    for name, value in extra_files.items():
        path = out.with_name(f"{out.stem}.{name}.npy")
        write_npy_atomic(path, value)
        files[f"{name}_file"] = str(path)
    source, labels = model.provenance, setup["labels"]
    summary = {**result.metrics(), "command": args.command, "run": str(run_dir), "method": result.extra.get(
        "method", args.method), **meta, "seed": args.seed, "nfe_budget": args.nfe, "wall_seconds": round(seconds, 3),
        "shape": list(shape), "classes": None if labels is None else labels.cpu().tolist(), "guidance": args.guidance,
        "model_weights": "raw" if args.raw else "ema", "weights_file": source["weights"], "run_id": source["run_id"],
        "config_hash": source["config_hash"], "run_state": source["state"], **files, **exact}
    write_json(out.with_suffix(".json"), summary)
    if len(shape) == 3:
        save_image_grid(result.samples.detach().cpu(), out.with_suffix(".png"))
    distance = (f"; energy distance to the exact target {exact['energy_distance']:.4f} (floor "
                f"{exact['energy_distance_floor']:.4f})" if "energy_distance" in exact else "")
    print(f"flowmaps: wrote {args.n} samples ({result.extra.get('method', args.method)}, {particles} particle(s), "
          f"{result.nfe}/{args.nfe} NFE per particle, ESS {result.ess:.2f}) to {out}; reward mean "
          f"{summary['reward_mean']:.4g}{distance} ({out.with_suffix('.json')})")
    return 0


def _posterior(args: argparse.Namespace) -> int:
    from flowmaps.oracle import check_noise_std
    from flowmaps.steering import LinearGaussianLikelihood, parse_operator
    from flowmaps.steering.cli_support import load_array, load_truth, measure

    noise_std = check_noise_std(args.noise_std, "--noise-std")
    if (args.measurement is None) == (args.truth is None):
        raise ValueError("flowmaps posterior takes exactly one of --measurement y.npy (a measurement) and --truth "
                         "x.npy (a clean sample to measure); got " + ("both" if args.measurement else "neither"))
    setup = _steering_setup(args)
    shape = setup["shape"]
    operator = parse_operator(args.operator, shape)
    extra: dict[str, np.ndarray] = {}
    if args.truth is not None:
        truth = load_truth(args.truth, shape)
        y = measure(operator, truth, noise_std, args.seed)
        extra = {"truth": truth[0].numpy(), "measurement": y.numpy()}
    else:
        y = torch.as_tensor(load_array(args.measurement, "measurement"))
    reward = LinearGaussianLikelihood(operator, y, noise_std, shape)
    meta = {"reward": "likelihood", "operator": args.operator, "noise_std": noise_std,
            "measurement": args.measurement, "truth": args.truth}
    return _steering_run(args, setup, reward, meta, extra)


def _steer(args: argparse.Namespace) -> int:
    from flowmaps.steering.cli_support import parse_reward

    setup = _steering_setup(args)
    reward = parse_reward(args.reward, setup["cfg"].data.name, setup["shape"], args.reward_scale, setup["device"])
    meta = {"reward": args.reward, "reward_scale": args.reward_scale}
    return _steering_run(args, setup, reward, meta, {})


def _methods(args: argparse.Namespace) -> int:
    from flowmaps.methods import describe_methods, get_method_class, method_options, option_docs

    if args.name:
        defaults, docs = method_options(args.name), option_docs(args.name)
        row = next(r for r in describe_methods() if r["name"] == args.name)
        print(f"{args.name}: {row['summary']}\n  rule {row['rule']}, setting {row['setting']}, cost {row['cost']}, "
              f"sampler {row['sampler']}\n\n{'option':<22}{'default':<22}meaning")
        for key in sorted(defaults):
            print(f"{key:<22}{str(defaults[key]):<22}{docs.get(key, '')}")
        cls = get_method_class(args.name)
        for preset, values in cls.presets.items():
            print(f"preset {preset}: {values}")
        for backbone, preset in cls.backbone_presets.items():
            print(f"on the {backbone} backbone, unless the config names a preset: preset {preset}")
        for backbone, values in cls.backbone_defaults.items():
            print(f"on the {backbone} backbone, unless the config sets them (optim.lr, model options): {values}")
        return 0
    rows = describe_methods()
    print(f"{'name':<15}{'rule':<15}{'setting':<19}{'cost':>5}  {'sampler':<13}summary")
    for r in rows:
        print(f"{r['name']:<15}{r['rule']:<15}{r['setting']:<19}{r['cost']:>5}  {r['sampler']:<13}{r['summary']}")
    return 0


def _backbones(args: argparse.Namespace) -> int:
    from flowmaps.nets import backbone_entry, backbone_names

    if args.name:
        entry = backbone_entry(args.name)
        defaults, docs = entry.options.defaults(), entry.options.docs()
        print(f"{args.name}: {entry.summary}\n  model.num_classes > 0 adds a class embedding with a null class\n\n"
              f"{'option':<24}{'default':<18}meaning")
        for key in sorted(defaults):
            print(f"{key:<24}{str(defaults[key]):<18}{docs.get(key, '')}")
        return 0
    for name in backbone_names():
        print(f"{name:<8}{backbone_entry(name).summary}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from flowmaps.bench import FULL, QUICK, run_bench, write_report

    cfg = QUICK if args.quick else FULL
    changes = {"datasets": args.data, "methods": args.methods, "steps": args.steps,
               "batch_size": args.batch_size, "n_samples": args.n_samples, "device": args.device}
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be at least 1; got {args.seeds}")
        changes["seeds"] = list(range(args.seeds))
    cfg = cfg.replace(**{k: v for k, v in changes.items() if v is not None})
    out = Path(args.out) if args.out else Path("results") / f"bench-{'quick-' if args.quick else ''}{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"flowmaps: benchmarking {', '.join(cfg.methods) if cfg.methods else 'every registered method'} on "
          f"{', '.join(cfg.datasets)} with seeds {cfg.seeds} -> {out}")
    result = run_bench(cfg, out, log=(lambda m: print(m, flush=True)) if not args.no_progress else (lambda _: None),
                       jobs=args.jobs)
    print(write_report(result, out))
    print(f"flowmaps: bench done in {result.seconds:.0f}s; wrote {out}/table.md, results.csv, summary.csv and plots")
    return 0


def _report(args: argparse.Namespace) -> int:
    from flowmaps.report import write_report

    if (args.run_dir is None) == (args.bench is None):
        raise ValueError("flowmaps report takes a run directory or --bench DIR (one of them)")
    path = write_report(Path(args.bench if args.bench else args.run_dir), bench=args.bench is not None)
    print(f"flowmaps: wrote {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    try:
        from flowmaps.export import export_diffusers

        out = export_diffusers(args.run_dir, args.diffusers, ema=not args.raw, allow_unfinished=args.allow_unfinished)
    except ImportError as err:
        print(f"flowmaps: error: {err}", file=sys.stderr)
        return 2
    print(f"flowmaps: exported {args.run_dir} to {out} (load it with flowmaps.export.FlowMapPipeline.from_pretrained)")
    return 0


def _name_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return names


def _steering_flags(p: argparse.ArgumentParser) -> None:
    """The sampler flags ``flowmaps posterior`` and ``flowmaps steer`` share."""
    from flowmaps.steering import STEERERS
    from flowmaps.steering.best_of_n import SELECTIONS
    from flowmaps.steering.tilting import LOOKAHEADS

    p.add_argument("run_dir", metavar="RUN", help="a trained run directory")
    p.add_argument("--method", default="fmtt", metavar="{" + ",".join(sorted(STEERERS)) + "}",
                   help="steering sampler (default fmtt): fmtt (flow-map look-ahead tilting, Jarzynski weights with "
                        "particles > 1), dps (denoiser look-ahead), smc (twisted SMC), noise-smc (tempered SMC on the "
                        "flow map's noise with pCN moves; no reward gradient), best-of-n (best of --particles "
                        "flow-map samples), posterior-guidance (PiGDM; linear-Gaussian rewards only)")
    p.add_argument("--nfe", type=int, default=16,
                   help="network evaluations per particle, a backward pass counting 2 (default 16); the sampler "
                        "takes the most steps that fit")
    p.add_argument("--n", type=int, default=256, help="number of samples (default 256)")
    p.add_argument("--particles", type=int, metavar="P",
                   help="particles per sample (default 8 for smc, noise-smc and best-of-n, 1 for the others; dps "
                        "and posterior-guidance take only 1)")
    p.add_argument("--eta", type=float, help="fmtt/dps/smc: noise level of the tilted SDE (0: deterministic; "
                                             "sampler default 1, smc 0.25)")
    p.add_argument("--ess-threshold", type=float, metavar="F",
                   help="fmtt/smc/noise-smc: resample a group when its ESS fraction falls below F (sampler default "
                        "0.5; noise-smc also tempers to it)")
    p.add_argument("--map-steps", type=int, metavar="M",
                   help="noise-smc only: flow-map steps of its noise-to-data map (default 1; M NFE per move)")
    p.add_argument("--lookahead", choices=LOOKAHEADS, help="smc only: the twist's look-ahead (default flow_map)")
    p.add_argument("--select", choices=SELECTIONS,
                   help="best-of-n only: keep the highest reward (max, default) or draw one by exp(r) (resample)")
    p.add_argument("--data-std", type=float, metavar="C",
                   help="posterior-guidance only: the data's std c in its covariance r_t^2 = c^2 sigma^2 / (alpha^2 c^2 "
                        "+ sigma^2) (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True,
                   help="output .npy file; <out stem>.json gets the metrics (and <out stem>.png the images)")
    p.add_argument("--label", metavar="K",
                   help="class-conditional models: condition every sample on class K (a comma-separated list is "
                        "cycled; all, the default, or none), as flowmaps sample --class")
    p.add_argument("--guidance", type=float, metavar="W",
                   help="guidance scale w of a guidance-conditioned model, as flowmaps sample --guidance")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="steer a run that has not finished from its newest valid checkpoint instead of refusing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowmaps", description="Train and sample flow maps F(x, s, t).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a flow map (no arguments: the default checkerboard LSD experiment)")
    p.add_argument("--config", help="YAML or TOML config file")
    p.add_argument("--data", help="built-in set (checkerboard, moons, 8gaussians, spirals, ring), fashion-mnist, "
                                  ".npy / .npz (images [N, C, H, W], labels y), a folder of class sub-folders of "
                                  "images, or a mixture spec .json/.yaml")
    p.add_argument("--method", help="training method (see `flowmaps methods`)")
    p.add_argument("--steps", type=int, help="training steps")
    p.add_argument("--batch-size", type=int, help="batch size")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--teacher", help="for distillation methods: 'exact' (mixture data), 'exact:SPEC' (another "
                                     "mixture spec), a trained RUN_DIR, or 'diffusers:DIR' (a diffusers UNet2DModel "
                                     "and scheduler; the diffusers extra)")
    p.add_argument("--guidance", type=float, metavar="W",
                   help="distil the teacher's classifier-free guided velocity at scale W (guidance.teacher_scale; "
                        "1: conditional, 0: unconditional; a class-conditional model)")
    p.add_argument("--init-from", metavar="RUN_DIR",
                   help="start a fresh run from the EMA weights of the finished run RUN_DIR (train.init_from; same "
                        "data shape, classes and model section; not with --resume)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", help="run directory (default runs/<method>-<data>-<time>)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override any config key (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its newest valid checkpoint (takes --steps, --device and "
                        "--set for checkpoint/guard/eval keys); see docs/training.md")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out directory that holds a run or other files: deletes flowmaps' own "
                        "files there (never any other) first")
    p.add_argument("--restart", action="store_true",
                   help="with --resume: when RUN_DIR has no valid checkpoint, start the run again from step 0 "
                        "(without it, such a resume refuses)")
    p.set_defaults(func=_train)

    p = sub.add_parser("sample", help="draw samples from a trained run")
    p.add_argument("run_dir")
    p.add_argument("--nfe", type=int, default=1, help="network evaluations (flow-map steps)")
    p.add_argument("--n", type=int, default=1000, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .npy file")
    p.add_argument("--rho", type=float,
                   help="steps on the grid t_k = (1 - k/N)^RHO (1: uniform; 2-2.5 packs them towards the data; "
                        "default: the method's grid_rho, the grids its grid distillation trained, else 1)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS),
                   help="override the method's own sampler (flow_map composes F; consistency jumps to data and "
                        "re-noises; one_step takes F(eps, 1, 0)); written into the output's .json metadata")
    p.add_argument("--ode", action="store_true", help="use the diagonal as an Euler ODE sampler instead")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--class", dest="classes", metavar="K",
                   help="class-conditional models: a class, a comma-separated list (cycled), all (default) or none")
    p.add_argument("--guidance", type=float, metavar="W",
                   help="guidance scale w of a guidance-conditioned model (model.guidance; 1: conditional, 0: "
                        "unconditional), within the range it was trained on")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="sample a run that has not finished (running, interrupted, diverged, failed) from its newest "
                        "valid checkpoint instead of refusing")
    p.set_defaults(func=_sample)

    p = sub.add_parser("posterior", help="sample the posterior p(x | y) of a linear measurement y = A x + noise "
                                         "with a trained run as the prior",
                       description="Samples of p(x | y) for y = A x + n, n ~ N(0, S^2 I), the run as the prior: the "
                                   "reward -|A x - y|^2 / (2 S^2). Writes the samples, <out stem>.json (reward, NFE, "
                                   "ESS; for a mixture run the energy distance to the exact posterior and its floor) "
                                   "and for image runs <out stem>.png.")
    _steering_flags(p)
    p.add_argument("--operator", required=True, metavar="SPEC",
                   help="A.npy (an [M, D] matrix on the flattened sample), inpaint:half, inpaint:MASK.npy (a boolean "
                        "mask of one sample's shape), downsample:K (K x K average pooling of images) or denoise")
    p.add_argument("--measurement", metavar="Y.npy", help="one measurement: the operator's output for one sample "
                                                          "(any shape with that many entries)")
    p.add_argument("--truth", metavar="X.npy",
                   help="instead of --measurement: a clean sample of the run's shape, measured as A x + S * N(0, I) "
                        "(noise drawn with --seed); writes <out stem>.truth.npy and <out stem>.measurement.npy")
    p.add_argument("--noise-std", type=float, required=True, metavar="S", help="the measurement noise std (> 0)")
    p.set_defaults(func=_posterior)

    p = sub.add_parser("steer", help="sample a trained run tilted by a reward, p(x) exp(r(x))",
                       description="Samples of p(x) exp(r(x)) for the run's model p. Writes the samples, "
                                   "<out stem>.json (reward, NFE, ESS; for a quadratic reward on a mixture run the "
                                   "energy distance to the exact tilted mixture and its floor) and for image runs "
                                   "<out stem>.png.")
    _steering_flags(p)
    p.add_argument("--reward", required=True, metavar="SPEC",
                   help="classifier:K (log p(K | x) under the in-project classifier of the run's image data, e.g. "
                        "fashion-mnist; trained once and cached) or quadratic:FILE.npz (arrays B [M, D], b [M] and "
                        "a scalar strength lambda > 0: r = -lambda |B x - b|^2 / 2)")
    p.add_argument("--reward-scale", type=float, default=1.0, metavar="C",
                   help="classifier rewards: r = C log p(K | x) (default 1)")
    p.set_defaults(func=_steer)

    p = sub.add_parser("bench", help="train every method with an equal budget and measure it against exact samples")
    p.add_argument("--quick", action="store_true", help="a few-minute run (8gaussians, 2 seeds, 150 steps, 1024 samples)")
    p.add_argument("--data", type=_name_list, help="comma-separated data specs (default: checkerboard,8gaussians)")
    p.add_argument("--methods", type=_name_list, help="comma-separated method names (default: every registered one)")
    p.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    p.add_argument("--steps", type=int, help="training steps per method")
    p.add_argument("--batch-size", type=int, help="batch size per method")
    p.add_argument("--n-samples", type=int, help="samples per sampler for the metrics")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--out", help="results directory (default results/bench-<time>)")
    p.add_argument("--jobs", type=int, default=1,
                   help="training runs at once, each in its own process with one torch thread (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no per-run progress lines")
    p.set_defaults(func=_bench)

    p = sub.add_parser("report", help="(re)write the self-contained report.html of a run or a bench directory")
    p.add_argument("run_dir", nargs="?", help="a run directory")
    p.add_argument("--bench", metavar="DIR", help="a bench directory instead of a run")
    p.set_defaults(func=_report)

    p = sub.add_parser("export", help="write a trained run as a diffusers folder (FlowMapEulerDiscreteScheduler; "
                                      "needs pip install flowmaps[diffusers])")
    p.add_argument("run_dir")
    p.add_argument("--diffusers", required=True, metavar="DIR",
                   help="the folder to write (missing, empty or an earlier export)")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="export a run that has not finished from its newest valid checkpoint instead of refusing")
    p.set_defaults(func=_export)

    p = sub.add_parser("methods", help="list training methods with their rule, setting, cost and sampler; "
                                       "with a NAME, that method's options with their defaults and meaning")
    p.add_argument("name", nargs="?", choices=method_names(), metavar="NAME", help="a method (see the list)")
    p.set_defaults(func=_methods)

    from flowmaps.nets import backbone_names

    p = sub.add_parser("backbones", help="list network backbones (model.backbone); with a NAME, its options")
    p.add_argument("name", nargs="?", choices=backbone_names(), metavar="NAME", help="a backbone (see the list)")
    p.set_defaults(func=_backbones)
    return parser


def _error_text(err: BaseException) -> str:
    """The message of a failure a user can cause: an ``OSError`` from the system gets its file and cause
    worded (``flowmaps.files.describe_os_error``); flowmaps' own errors already say what and where."""
    from flowmaps.files import WriteError, describe_os_error

    if isinstance(err, OSError) and not isinstance(err, WriteError) and err.filename is not None:
        return describe_os_error(err)
    return str(err) or type(err).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    from flowmaps.train.rundir import RunDirectoryError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, OSError, FloatingPointError, RunDirectoryError, MemoryError,
            torch.OutOfMemoryError) as err:
        print(f"flowmaps: error: {_error_text(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
