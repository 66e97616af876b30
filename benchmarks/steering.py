"""Steering and inverse problems on held-in mixtures (exact posteriors), and on Fashion-MNIST (``--images``).

    OMP_NUM_THREADS=2 python benchmarks/steering.py --out results/steering/steering.md --figures docs/figures
    OMP_NUM_THREADS=2 python benchmarks/steering.py --images --image-run RUN --out results/steering/images.md

Mixtures: ``8gaussians`` and ``ring`` (2-D, built in) and ``mix16``, a 16-D six-component mixture
served as ``[1, 4, 4]`` images (its spec is written under ``--runs``). Each gets linear-Gaussian
measurements ``y = A x_true + n``, ``n ~ N(0, s^2 I)``, of one fixed prior sample ``x_true``: a
projection with ``s = 0.3``, the same projection with ``s = 0.1`` (2-D: ``A = [[1, 0.5]]``; 16-D: a
fixed random ``[4, 16]`` matrix), and for ``mix16`` also ``inpaint:half`` (the top two rows) with
``s = 0.1``. The target is the exact posterior (``GaussianMixture.posterior``); each contestant's
score is the energy distance of its ``n`` samples to ``n`` exact posterior samples, beside the floor
(the mean distance of ``FLOOR_SETS`` further exact sets of ``n`` to that reference) and their ratio.
In two dimensions a single exact set's distance ranges from about 0.2x to 4x that mean (the mode
weights of ``n`` samples fluctuate), so the target's contestants (``TARGET``: the consistent weighted
samplers at the middle budget with the most particles) run ``--seeds`` seeds and report their mean
distance, and the target table compares only those.

Contestants: every steering method (``flowmaps.steering.STEERERS``) at several budgets of NFE per
particle (a backward pass counts two) and particle counts, with two models: ``exact``, the
mixture's exact flow map (the method's own error; its ODE integrated to ``rtol`` 1e-5) and ``lsd``,
an LSD flow map trained here through ``flowmaps train`` (``--steps``; a finished run of that many
steps under ``--runs`` is reused). ``posterior-guidance`` gets ``data_std`` = the prior's overall std.

Images (``--images``): the class-conditional LSD U-Net of ``--image-run`` on Fashion-MNIST (by default
``results/steering/runs/lsd-fashion-mnist``, trained by ``flowmaps train --config configs/fashion-mnist.yaml
--steps 830 --set method.diagonal_warmup=0.5 --out results/steering/runs/lsd-fashion-mnist``): half-image
inpainting of 8 test images (masked-region MSE per method, grid ``steering-inpaint.png``), and class
steering of the unconditional model (null labels) by the in-project classifier's ``log p(K | x)``
(classifier accuracy for class K and classifier-feature FD to real test images of class K, grid
``steering-class.png``).

Prints Markdown tables and writes them to ``--out`` with a JSON of every row beside it (same stem).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import flowmaps
from flowmaps.build import load_config
from flowmaps.cli import main as cli
from flowmaps.data import get_data
from flowmaps.flow_map import FlowMap
from flowmaps.metrics import energy_distance
from flowmaps.oracle import GaussianMixture
from flowmaps.steering import LinearGaussianLikelihood, steer
from flowmaps.steering.operators import MatrixOperator, parse_operator
from flowmaps.train.rundir import read_status

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE_RUN = "results/steering/runs/lsd-fashion-mnist"
EXACT_RTOL, EXACT_ATOL = 1e-5, 1e-6
EXACT_CHUNK = 4096
SEED = 0
FLOOR_SETS = 8


def mix16_spec() -> dict[str, Any]:
    """The 16-D held-in mixture: 6 components, unequal weights, anisotropic stds, means at scale ~1.5."""
    rng = np.random.default_rng(16)
    means = rng.uniform(-1.5, 1.5, size=(6, 16)).round(3)
    stds = rng.uniform(0.15, 0.5, size=(6, 16)).round(3)
    return {"weights": [0.3, 0.22, 0.18, 0.14, 0.1, 0.06], "means": means.tolist(), "stds": stds.tolist(),
            "shape": [1, 4, 4]}


def prior_std(mixture: GaussianMixture) -> float:
    """The prior's overall std: ``sqrt(trace(Cov) / D)``."""
    w, mu, c = mixture.weights, mixture.means, mixture.stds
    mean = w @ mu
    var = (w[:, None] * (c**2 + mu**2)).sum(0) - mean**2
    return float(var.mean().sqrt())


class ExactBackbone(nn.Module):
    """The exact average velocity of a mixture on ``[B, *shape]`` samples (flattened for the oracle), its
    ODE integrated to ``rtol`` / ``atol`` (looser than the oracle's default 1e-9, for speed), in chunks of
    ``chunk`` rows; under autograd each chunk is recomputed in the backward pass (activation
    checkpointing), so a look-ahead through the integrator of ``n * K`` rows fits in memory."""

    def __init__(self, mixture: GaussianMixture, rtol: float = EXACT_RTOL, atol: float = EXACT_ATOL,
                 chunk: int = EXACT_CHUNK):
        super().__init__()
        self.mixture, self.rtol, self.atol, self.chunk = mixture, rtol, atol, chunk

    def _average(self, flat: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        gap = (t - s)[:, None].to(flat.dtype)
        diagonal = gap.abs() < 1e-6
        safe = torch.where(diagonal, torch.ones_like(gap), gap)
        average = (self.mixture.flow_map(flat, s, t, rtol=self.rtol, atol=self.atol) - flat) / safe
        if bool(diagonal.any()):
            average = torch.where(diagonal, self.mixture.velocity(flat, t), average)
        return average

    def forward(self, x, s, t, cond=None):
        flat = x.flatten(1)
        if bool(((t - s).abs() < 1e-6).all()):
            return self.mixture.velocity(flat, t, cond).reshape(x.shape)
        assert cond is None, "the benchmark's exact maps are unconditional"
        grad = torch.is_grad_enabled() and flat.requires_grad
        parts = []
        for i in range(0, flat.shape[0], self.chunk):
            rows = (flat[i:i + self.chunk], s[i:i + self.chunk], t[i:i + self.chunk])
            parts.append(checkpoint(self._average, *rows, use_reentrant=False) if grad else self._average(*rows))
        return torch.cat(parts).reshape(x.shape)


def exact_model(mixture: GaussianMixture, shape: tuple[int, ...]) -> FlowMap:
    return FlowMap(ExactBackbone(mixture), shape=shape)


# ----- data and measurements -----------------------------------------------------------------------
def datasets(runs: Path, names: list[str]) -> list[dict[str, Any]]:
    """``{name, data (the --data spec), mixture, shape}`` of each held-in mixture."""
    out = []
    for name in names:
        if name == "mix16":
            runs.mkdir(parents=True, exist_ok=True)
            spec = runs / "mix16.json"
            spec.write_text(json.dumps(mix16_spec()))
            source = get_data(str(spec))
            out.append({"name": name, "data": str(spec), "mixture": source.mixture, "shape": tuple(source.shape)})
        else:
            source = get_data(name)
            out.append({"name": name, "data": name, "mixture": source.mixture, "shape": tuple(source.shape)})
    return out


def measurements(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The measurement settings of one data set: ``{name, operator, noise_std, y, x_true, reward}``."""
    mixture, shape = data["mixture"], data["shape"]
    g = torch.Generator().manual_seed(1234)
    x_true = mixture.sample(1, g).reshape(1, *shape)
    if mixture.dim == 2:
        projection = MatrixOperator(torch.tensor([[1.0, 0.5]]))
    else:
        projection = MatrixOperator(torch.randn(4, mixture.dim, generator=torch.Generator().manual_seed(4)) / 4.0)
    settings = [("proj s=0.3", projection, 0.3), ("proj s=0.1", projection, 0.1)]
    if mixture.dim > 2:
        settings.append(("inpaint:half s=0.1", parse_operator("inpaint:half", shape), 0.1))
    out = []
    for name, op, s in settings:
        clean = op(x_true.double())[0]
        y = (clean + s * torch.randn(clean.shape, generator=g, dtype=torch.float64)).float()
        reward = LinearGaussianLikelihood(op, y, s, shape)
        out.append({"name": name, "operator": op, "noise_std": s, "y": y, "x_true": x_true, "reward": reward})
    return out


# ----- contestants --------------------------------------------------------------------------------
def contestants(budgets: list[int], particles: list[int], equal_total: bool) -> list[tuple[str, dict, int, int]]:
    """``(label, options, nfe per particle, particles)``: the one-particle methods at every budget, the
    weighted ones at every particle count at the middle budget (16 by default), SMC also at every
    budget with the fewest particles; with ``equal_total`` the one-particle methods also at the NFE per
    sample of the weighted ones with the fewest particles."""
    mid = middle_budget(budgets)
    few = min(particles)
    single = sorted(set(budgets) | ({mid * few} if equal_total else set()))
    out: list[tuple[str, dict, int, int]] = []
    for label, options in (("fmtt", {}), ("dps", {}), ("posterior-guidance", {})):
        out += [(label, options, b, 1) for b in single]
    out += [("fmtt", {}, mid, k) for k in particles]
    out += [("smc", {}, b, few) for b in budgets if b != mid]
    out += [("smc", {}, mid, k) for k in particles]
    out += [("noise-smc", {}, mid, k) for k in particles]
    for select in ("max", "resample"):
        out += [(f"best-of-n ({select})", {"select": select}, mid, k) for k in particles]
    return out


# the target's contestants (run with --seeds seeds at the middle budget with the most particles): the weighted
# samplers that are consistent for the tilted target; fmtt's Jarzynski weights are left out for time (a backward
# pass through the exact map's ODE per step)
TARGET = ("smc", "noise-smc", "best-of-n (resample)")


def middle_budget(budgets: list[int]) -> int:
    return 16 if 16 in budgets else budgets[len(budgets) // 2]


def method_name(label: str) -> str:
    return label.split(" ")[0]


def posterior_reference(setting: dict[str, Any], data: dict[str, Any], n: int):
    """``(exact posterior samples [n, *shape], floor, the largest of the floor sets' distances, the exact
    samples' mean reward)``."""
    reward, shape = setting["reward"], data["shape"]
    a, y, s = reward.dense()
    post = data["mixture"].posterior(a, y, s)
    ref = post.sample(n, torch.Generator().manual_seed(77)).reshape(n, *shape)
    floors = [energy_distance(post.sample(n, torch.Generator().manual_seed(78 + i)).reshape(n, *shape), ref)
              for i in range(FLOOR_SETS)]
    return ref, sum(floors) / FLOOR_SETS, max(floors), float(reward(ref).double().mean())


def run_contestant(model: nn.Module, reward, n: int, label: str, options: dict, nfe: int, k: int,
                   data_std: float, eta: float | None = None, seed: int = SEED):
    method = method_name(label)
    extra = {"data_std": data_std} if method == "posterior-guidance" else {}
    if eta is not None and method in ("fmtt", "dps", "smc"):
        extra["eta"] = eta
    start = time.perf_counter()
    result = steer(model, reward, n, method, nfe=nfe, particles=k, generator=torch.Generator().manual_seed(seed),
                   **options, **extra)
    return result, time.perf_counter() - start


def trained_run(data: dict[str, Any], runs: Path, steps: int, eval_samples: int = 1024) -> tuple[Path, float]:
    """The LSD run of ``data`` under ``runs`` (trained through the CLI unless a finished run of ``steps``
    steps is there) and its training wall seconds (0 when reused)."""
    run = runs / f"lsd-{data['name']}"
    status = read_status(run) if (run / "status.json").exists() else None
    if status is not None and status.state == "finished" and load_config(run / "config.yaml").train.steps == steps:
        print(f"reusing the finished run {run}", flush=True)
        return run, 0.0
    start = time.perf_counter()
    assert cli(["train", "--data", data["data"], "--method", "lsd", "--steps", str(steps), "--out", str(run),
                "--overwrite", "--no-progress", "--set", f"eval.n_samples={eval_samples}", "--set", "eval.nfe=[1,4]",
                "--set", "eval.ode_steps=2"]) == 0
    return run, time.perf_counter() - start


HEADER = ("| data | measurement | model | method | budget | NFE/particle | particles | NFE/sample | seeds | ED | "
          "floor | ED/floor | mean reward | ESS | s |")


def row_line(r: dict[str, Any]) -> str:
    def num(key: str, fmt: str) -> str:
        value = r.get(key)
        return "" if value is None else format(value, fmt)

    return (f"| {r['data']} | {r['measurement']} | {r['model']} | {r['method']} | {num('budget', 'd')} | "
            f"{num('nfe_per_particle', 'd')} | {num('particles', 'd')} | {num('nfe_per_sample', 'd')} | "
            f"{num('seeds', 'd')} | {r['ed']:.4g} | {r['floor']:.4g} | {r['ratio']:.2f} | {r['reward_mean']:.3g} | "
            f"{num('ess', '.2f')} | {num('seconds', '.1f')} |")


def table(rows: list[dict[str, Any]]) -> str:
    return "\n".join([HEADER, "|" + "---|" * 15] + [row_line(r) for r in rows])


def findings(rows: list[dict[str, Any]], mid: int, seeds: int) -> str:
    """At the middle budget, per data / measurement / model: the best of the seed-averaged contestants,
    its ED over the floor, and the largest single exact set's ED over the floor beside it."""
    lines = [f"best at {mid} NFE per particle (mean of {seeds} seeds) | ED/floor | one exact set, at most | within 2x",
             "---|---|---|---"]
    spread = {(r["data"], r["measurement"]): r["floor_max"] / r["floor"] for r in rows
              if r["method"] == "exact posterior"}
    keys = list(dict.fromkeys((r["data"], r["measurement"], r["model"]) for r in rows
                              if r["method"] != "exact posterior"))
    for key in keys:
        group = [r for r in rows if (r["data"], r["measurement"], r["model"]) == key and r.get("budget") == mid
                 and r.get("seeds") == seeds]
        if not group:
            continue
        best = min(group, key=lambda r: r["ed"])
        lines.append(f"{' / '.join(key)}: {best['method']} (K = {best['particles']}) | {best['ratio']:.2f} | "
                     f"{spread[key[:2]]:.2f} | {'yes' if best['ratio'] <= 2 else 'no'}")
    return "\n".join("| " + line + " |" for line in lines)


def figure_2d(panels: dict[str, torch.Tensor], prior: torch.Tensor, setting: dict[str, Any], path: Path) -> None:
    """Scatter panels: the exact posterior and each method's samples, over the prior and the line A x = y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2.1 * len(panels), 2.3), sharex=True, sharey=True)
    a = setting["operator"].a[0].double()
    y = float(setting["y"][0])
    xs = torch.linspace(-1.6, 1.6, 2)
    for ax, (title, x) in zip(axes, panels.items()):
        ax.scatter(prior[:, 0], prior[:, 1], s=1, c="0.85", rasterized=True)
        ax.plot(xs, (y - a[0] * xs) / a[1], c="tab:red", lw=0.6)
        ax.scatter(x[:, 0], x[:, 1], s=1.5, c="tab:blue", alpha=0.5, rasterized=True)
        ax.set_title(title, fontsize=7)
        ax.set_xlim(-1.6, 1.6)
        ax.set_ylim(-1.6, 1.6)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_panels(k: int) -> dict[str, tuple[str, int] | None]:
    """The panels of ``steering-2d.png``: title -> (contestant label, particles); ``k`` the most particles."""
    return {"exact posterior": None, "FMTT": ("fmtt", 1), f"FMTT, K = {k}": ("fmtt", k), "DPS": ("dps", 1),
            f"SMC, K = {k}": ("smc", k), f"noise SMC, K = {k}": ("noise-smc", k),
            f"best-of-{k} (max)": ("best-of-n (max)", k),
            f"best-of-{k} (resample)": ("best-of-n (resample)", k)}


def mixtures_bench(args) -> list[dict[str, Any]]:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    runs = Path(args.runs)
    rows: list[dict[str, Any]] = []
    models, wanted = args.models, figure_panels(max(args.particles))
    mid, most = middle_budget(args.budgets), max(args.particles)
    for data in datasets(runs, args.data):
        loaded: dict[str, nn.Module] = {}
        if "exact" in models:
            loaded["exact"] = exact_model(data["mixture"], data["shape"])
        if "lsd" in models:
            run, seconds = trained_run(data, runs, args.steps, 256 if args.quick else 1024)
            print(f"{data['name']}: lsd run {run} ({seconds:.0f} s of training)", flush=True)
            loaded["lsd"] = flowmaps.load(run)
        data_std = prior_std(data["mixture"])
        for setting in measurements(data):
            ref, floor, floor_max, ref_reward = posterior_reference(setting, data, args.n)
            base = {"data": data["name"], "measurement": setting["name"]}
            rows.append({**base, "model": "", "method": "exact posterior", "ed": floor, "floor": floor, "ratio": 1.0,
                         "floor_max": floor_max, "reward_mean": ref_reward})
            print(row_line(rows[-1]), flush=True)
            panels = {"exact posterior": ref}
            for model_name, model in loaded.items():
                for label, options, nfe, k in contestants(args.budgets, args.particles, not args.quick):
                    seeds = args.seeds if (nfe == mid and k == most and label in TARGET) else 1
                    eds, seconds = [], 0.0
                    for seed in range(SEED, SEED + seeds):
                        result, took = run_contestant(model, setting["reward"], args.n, label, options, nfe, k,
                                                      data_std, args.eta, seed)
                        eds.append(energy_distance(result.samples, ref))
                        seconds += took
                        if seed == SEED:
                            first, m = result, result.metrics()
                    ed = sum(eds) / seeds
                    rows.append({**base, "model": model_name, "method": label, "budget": nfe,
                                 "nfe_per_particle": m["nfe_per_particle"], "particles": m["particles"],
                                 "nfe_per_sample": m["nfe_per_sample"], "steps": m["steps"], "seeds": seeds, "ed": ed,
                                 "eds": eds, "floor": floor, "ratio": ed / floor, "reward_mean": m["reward_mean"],
                                 "ess": m["ess"], "resamples": m["resamples"], "eta": m.get("eta"),
                                 "acceptance": m.get("acceptance"), "seconds": seconds})
                    result = first
                    print(row_line(rows[-1]), flush=True)
                    if model_name == "exact" and nfe == 16:
                        for title, want in wanted.items():
                            if want == (label, k):
                                panels[title] = result.samples
            if (args.figures and data["name"] == "8gaussians" and setting["name"] == "proj s=0.1"
                    and len(panels) == len(wanted)):
                prior = data["mixture"].sample(2000, torch.Generator().manual_seed(5))
                figure_2d({k: panels[k] for k in wanted}, prior, setting, Path(args.figures) / "steering-2d.png")
    return rows


# ----- images -------------------------------------------------------------------------------------
def image_grid(rows: list[tuple[str, torch.Tensor]], path: Path, cell: float = 0.55) -> None:
    """A grid of ``[C, H, W]`` images in ``[-1, 1]``: one labelled row per entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(x.shape[0] for _, x in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(cell * cols + 1.3, cell * len(rows)), squeeze=False)
    for i, (title, x) in enumerate(rows):
        for j in range(cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < x.shape[0]:
                ax.imshow(x[j, 0].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
        axes[i, 0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=6)
    fig.subplots_adjust(left=1.2 / (cell * cols + 1.3), right=0.99, top=0.99, bottom=0.01, wspace=0.04, hspace=0.04)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def images_bench(args) -> tuple[str, dict[str, Any]]:
    from flowmaps.data.sources import data_fingerprint
    from flowmaps.evaluation import classifier_data
    from flowmaps.metrics import load_or_train_classifier
    from flowmaps.metrics.images import frechet_distance
    from flowmaps.samplers import sample
    from flowmaps.steering import ClassifierReward

    run = Path(args.image_run)
    if not (run / "config.yaml").is_file():
        message = f"images: no trained run at {run} (pass --image-run DIR); skipped"
        print(message)
        return message, {}
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = flowmaps.load(run)
    data = get_data("fashion-mnist")
    test = data.test_split()
    shape = tuple(model.shape)
    data_std = float(data.full_split().x0.std())
    classifier = load_or_train_classifier(data_fingerprint("fashion-mnist"), lambda: classifier_data(data),
                                          data.num_classes)
    net = classifier.model.eval().requires_grad_(False)
    out: dict[str, Any] = {"run": str(run), "data_std": data_std, "classifier_accuracy": classifier.accuracy}
    lines = []
    figures = Path(args.figures) if args.figures else None

    # (1) inpainting: the top half observed, noise std 0.05, one steer call per test image
    op = parse_operator("inpaint:half", shape)
    hidden = ~op.mask
    picks = [int((test.cond == c).nonzero()[0, 0]) for c in range(args.inpaint_images)]
    truth = test.x0[picks]
    g = torch.Generator().manual_seed(99)
    methods = [("unsteered", None, 1), ("fmtt", {}, 1), ("dps", {}, 1), ("smc", {}, 8), ("noise-smc", {}, 8),
               ("posterior-guidance", {"data_std": data_std}, 1)]
    inpaint_rows, grid = [], [("truth", truth), ("observed", torch.where(op.mask, truth, torch.full_like(truth, -1)))]
    for label, options, k in methods:
        samples, seconds, nfe = [], 0.0, 0
        for i, x in enumerate(truth):
            y = op(x[None])[0] + 0.05 * torch.randn(int(op.mask.sum()), generator=g)
            reward = LinearGaussianLikelihood(op, y, 0.05, shape)
            start = time.perf_counter()
            if options is None:
                noise = torch.randn(args.inpaint_samples, *shape, generator=torch.Generator().manual_seed(i))
                with torch.no_grad():
                    s = sample(model, noise, args.image_nfe)
                nfe = args.image_nfe
            else:
                result = steer(model, reward, args.inpaint_samples, label, nfe=args.image_nfe, particles=k,
                               generator=torch.Generator().manual_seed(i), **options)
                s, nfe = result.samples, result.nfe
            seconds += time.perf_counter() - start
            samples.append(s)
        x = torch.stack(samples)  # [images, samples, C, H, W]
        err = (x - truth[:, None]).pow(2)
        mse_hidden = float(err[:, :, hidden].mean())
        mse_seen = float(err[:, :, op.mask].mean())
        inpaint_rows.append({"method": label, "particles": k, "nfe_per_particle": nfe, "mse_masked": mse_hidden,
                             "mse_observed": mse_seen, "seconds": seconds})
        grid.append((label if k == 1 else f"{label}, K = {k}", x[:, 0]))
    lines += [(f"Inpainting (inpaint:half, noise std 0.05), {len(picks)} test images x {args.inpaint_samples} samples, "
              f"{args.image_nfe} NFE per particle budget:"), "",
              "| method | particles | NFE/particle | MSE masked half | MSE observed half | s |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['particles']} | {r['nfe_per_particle']} | {r['mse_masked']:.4f} | "
              f"{r['mse_observed']:.4f} | {r['seconds']:.1f} |" for r in inpaint_rows]
    out["inpainting"] = inpaint_rows
    if figures:
        image_grid(grid, figures / "steering-inpaint.png")

    # (2) class steering of the unconditional model (null labels) by log p_classifier(K | x)
    k_class, n = args.class_k, args.class_n
    real = test.x0[test.cond == k_class]
    reference = net.features(real[: real.shape[0] // 2])
    floor_set = real[real.shape[0] // 2:][:n]

    def scores(x: torch.Tensor) -> tuple[float, float]:
        with torch.no_grad():
            feats = torch.cat([net.features(b) for b in x.split(512)])
            acc = float((net.head(feats).argmax(1) == k_class).double().mean())
        return acc, frechet_distance(feats, reference)

    reward = ClassifierReward(net, k_class, num_classes=data.num_classes)
    class_rows = []
    acc, fd = scores(floor_set)
    class_rows.append({"method": f"real test images of class {k_class}", "n": floor_set.shape[0], "accuracy": acc,
                       "fd": fd})
    noise = torch.randn(n, *shape, generator=torch.Generator().manual_seed(3))
    for label, cond in (("unconditional model, no steering", None),
                        (f"class-conditional model (label {k_class})", torch.full((n,), k_class))):
        start = time.perf_counter()
        with torch.no_grad():
            x = torch.cat([sample(model, noise[i:i + 256], args.image_nfe, None if cond is None else cond[i:i + 256])
                           for i in range(0, n, 256)])
        seconds = time.perf_counter() - start
        acc, fd = scores(x)
        class_rows.append({"method": label, "particles": 1, "nfe_per_particle": args.image_nfe, "n": n,
                           "accuracy": acc, "fd": fd, "seconds": seconds})
    grid = [(f"class {k_class}, conditional", x[:10])]
    for label, options, k in (("fmtt", {}, 1), ("dps", {}, 1), ("smc", {}, 8), ("noise-smc", {}, 8),
                              ("best-of-n", {}, 8)):
        start = time.perf_counter()
        result = steer(model, reward, n, label, nfe=args.image_nfe, particles=k,
                       generator=torch.Generator().manual_seed(3), **options)
        seconds = time.perf_counter() - start
        acc, fd = scores(result.samples)
        class_rows.append({"method": label, "particles": k, "nfe_per_particle": result.nfe, "n": n, "accuracy": acc,
                           "fd": fd, "reward_mean": float(result.reward.mean()), "ess": result.ess, "seconds": seconds})
        grid.append((label if k == 1 else f"{label}, K = {k}", result.samples[:10]))
    lines += ["", (f"Class steering of the unconditional model to class {k_class} (reward log p(K | x), the in-project "
              f"classifier, test accuracy {classifier.accuracy:.3f}); FD in its features to "
              f"{reference.shape[0]} real test images of class {k_class}:"), "",
              "| method | particles | NFE/particle | n | accuracy for class K | FD | s |",
              "|---|---|---|---|---|---|---|"]
    for r in class_rows:
        lines.append(f"| {r['method']} | {r.get('particles', '')} | {r.get('nfe_per_particle', '')} | {r['n']} | "
                     f"{r['accuracy']:.3f} | {r['fd']:.2f} | {format(r['seconds'], '.1f') if 'seconds' in r else ''} |")
    out["class_steering"] = {"class": k_class, "rows": class_rows}
    if figures:
        image_grid(grid, figures / "steering-class.png")
    return "\n".join(lines), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["8gaussians", "ring", "mix16"],
                        choices=["8gaussians", "ring", "mix16"])
    parser.add_argument("--models", nargs="+", default=["exact", "lsd"], choices=["exact", "lsd"])
    parser.add_argument("--n", type=int, default=1000, help="samples per contestant (and exact samples)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16, 32], help="NFE per particle")
    parser.add_argument("--particles", type=int, nargs="+", default=[8, 32], help="of the weighted methods")
    parser.add_argument("--steps", type=int, default=6000, help="training steps of each LSD map")
    parser.add_argument("--seeds", type=int, default=3,
                        help="seeds of the target's contestants (the weighted methods at the middle budget with the "
                             "most particles), whose mean distance they report")
    parser.add_argument("--eta", type=float,
                        help="the tilted SDE's noise level for fmtt, dps and smc (default: theirs, 1 for fmtt and dps, "
                             "0.25 for smc)")
    parser.add_argument("--runs", default="results/steering/runs", help="where the LSD runs are trained / reused")
    parser.add_argument("--figures", help="write the figures (steering-2d.png, ...) to this folder")
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny n, one budget, few training steps")
    parser.add_argument("--images", action="store_true", help="the Fashion-MNIST part instead of the mixtures")
    parser.add_argument("--image-run", default=DEFAULT_IMAGE_RUN, help="a class-conditional Fashion-MNIST run")
    parser.add_argument("--image-nfe", type=int, default=16, help="NFE per particle of the image contestants")
    parser.add_argument("--inpaint-images", type=int, default=8)
    parser.add_argument("--inpaint-samples", type=int, default=4, help="samples per inpainted image")
    parser.add_argument("--class-k", type=int, default=7, help="the class steered to")
    parser.add_argument("--class-n", type=int, default=256, help="samples of the class-steering contestants")
    parser.add_argument("--out", help="write the Markdown here, the JSON beside it (.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.budgets, args.particles, args.steps = min(args.n, 64), [16], [4], min(args.steps, 30)
        args.seeds = min(args.seeds, 2)
        args.inpaint_images, args.inpaint_samples, args.class_n = 2, 2, 16
    if args.n < 2 or min(args.budgets) < 1 or min(args.particles) < 2 or args.seeds < 1:
        parser.error("--n must be >= 2, budgets >= 1, particle counts >= 2 and --seeds >= 1")
    start = time.perf_counter()
    if args.images:
        text, payload = images_bench(args)
    else:
        rows = mixtures_bench(args)
        text = table(rows) + "\n\n" + findings(rows, middle_budget(args.budgets), args.seeds)
        payload = {"rows": rows}
    payload.update({"seconds": time.perf_counter() - start, "argv": argv, "n": args.n})
    text += f"\n\n_total {payload['seconds']:.0f} s_\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
