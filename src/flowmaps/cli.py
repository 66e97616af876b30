"""The ``flowmaps`` command line: ``train``, ``sample``, ``methods``.

The CLI only parses arguments, builds a validated config and calls the library.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from flowmaps.train.config import ConfigError, apply_override, config_from_dict, read_config_file


def _train(args: argparse.Namespace) -> int:
    from flowmaps.train.loop import default_run_dir, train

    values = read_config_file(args.config) if args.config else {}
    shortcuts = {"data.name": args.data, "method.name": args.method, "train.steps": args.steps,
                 "train.batch_size": args.batch_size, "train.seed": args.seed, "train.device": args.device}
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
    cfg = config_from_dict(values)
    out = Path(args.out) if args.out else default_run_dir(cfg)
    print(f"flowmaps: training {cfg.method['name']} on {cfg.data.name} for {cfg.train.steps} steps -> {out}")
    start = time.perf_counter()
    result = train(cfg, out, progress=not args.no_progress)
    table = (out / "metrics.md").read_text() if (out / "metrics.md").exists() else ""
    print(table)
    print(f"flowmaps: done in {time.perf_counter() - start:.1f}s (training {result.train_seconds:.1f}s); "
          f"wrote {out}/samples.png, metrics.json, metrics.md")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from flowmaps.runs import DATA_INFO_FILE, load
    from flowmaps.samplers import sample_flow_map, sample_ode
    import json

    if args.nfe < 1 or args.n < 1:
        raise ValueError(f"--nfe and --n must be positive; got --nfe {args.nfe}, --n {args.n}")
    model = load(args.run_dir, ema=not args.raw, device=args.device)
    dim = json.loads((Path(args.run_dir) / DATA_INFO_FILE).read_text())["dim"]
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(args.seed)
    noise = torch.randn(args.n, dim, generator=gen, device=device)
    with torch.no_grad():
        x = sample_ode(model, noise, args.nfe, "euler") if args.ode else sample_flow_map(model, noise, args.nfe)
    np.save(args.out, x.cpu().numpy())
    print(f"flowmaps: wrote {args.n} samples ({'ODE' if args.ode else 'flow map'}, {args.nfe} NFE) to {args.out}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from flowmaps.methods import describe_methods

    rows = describe_methods()
    print(f"{'name':<14}{'rule':<15}{'setting':<19}{'cost':>5}  summary")
    for r in rows:
        print(f"{r['name']:<14}{r['rule']:<15}{r['setting']:<19}{r['cost']:>5}  {r['summary']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowmaps", description="Train and sample flow maps F(x, s, t).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a flow map (no arguments: the default checkerboard LSD experiment)")
    p.add_argument("--config", help="YAML or TOML config file")
    p.add_argument("--data", help="built-in set (checkerboard, moons, 8gaussians, spirals, ring), .npy, or mixture .json/.yaml")
    p.add_argument("--method", help="training method (see `flowmaps methods`)")
    p.add_argument("--steps", type=int, help="training steps")
    p.add_argument("--batch-size", type=int, help="batch size")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--teacher", help="for distillation methods: 'exact' (mixture data) or a trained RUN_DIR")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", help="run directory (default runs/<method>-<data>-<time>)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override any config key (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser("sample", help="draw samples from a trained run")
    p.add_argument("run_dir")
    p.add_argument("--nfe", type=int, default=1, help="network evaluations (flow-map steps)")
    p.add_argument("--n", type=int, default=1000, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .npy file")
    p.add_argument("--ode", action="store_true", help="use the diagonal as an Euler ODE sampler instead")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_sample)

    p = sub.add_parser("methods", help="list training methods with their rule, setting and cost")
    p.set_defaults(func=_methods)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"flowmaps: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
