"""Distil a diffusers model with flowmaps: a class-conditional Fashion-MNIST UNet against its own DDIM.

    OMP_NUM_THREADS=2 python benchmarks/distill_diffusers.py --out results/distill-diffusers
    python benchmarks/distill_diffusers.py --quick --out /tmp/distill-diffusers-quick   (a smoke run)

1. Teacher: a diffusers ``UNet2DModel`` with a class table of ``K + 1`` embeddings, the last the null
   class (the convention of ``flowmaps.teachers.diffusers``), trained with diffusers' own recipe on
   ``DDPMScheduler`` (Stable Diffusion's scaled-linear betas, ``SCHEDULER``):
   ``x_tau = sqrt(abar_tau) x_0 + sqrt(1 - abar_tau) eps`` at uniform random timesteps ``tau``
   (``add_noise``), the loss ``|eps_hat(x_tau, tau, c) - eps|^2`` (epsilon prediction), AdamW with a
   warm-up and cosine decay, labels dropped to the null class with probability ``--label-dropout``
   (classifier-free training, Ho & Salimans 2022, arXiv 2207.12598), and an EMA of the weights
   (diffusers' ``EMAModel``) as the saved model: ``DIR/unet`` and ``DIR/scheduler``
   (``save_pretrained``), the folder ``--teacher diffusers:DIR`` reads.
2. Students: ``flowmaps.train.loop.train`` with ``teacher: diffusers:DIR`` (the adapter of spec §8
   turns the eps prediction into our velocity, ``t = 0`` data, ``t = 1`` noise). Each method of
   ``--methods`` distils the conditional teacher (``w = 1``) and the guided teacher
   ``v_w = v(x, t, None) + w (v(x, t, c) - v(x, t, None))`` at ``w = --guidance`` (spec §7,
   ``guidance.teacher_scale``); the first method also trains a guidance-conditioned student
   ``F(x, s, t, c, w)`` on ``w ~ U[--guidance-range]`` (``model.guidance``, ``train.guidance_range``;
   Meng et al. 2023, arXiv 2210.03142), scored at ``w = 1`` and ``w = --guidance``.
3. Scores: the in-project classifier's feature space (``flowmaps.evaluation.ImageScorer``: Fréchet
   distance, precision, recall against the test split, class accuracy of the samples for their
   labels; the floor is one half of the test split against the other). Every row is scored on the
   same ``--n-samples`` noises and labels. The teacher is sampled with diffusers' ``DDIMScheduler``
   (``eta = 0``, trailing timesteps, classifier-free guidance on the predicted noise, two network
   calls per step when ``w != 1``) at ``--ddim-steps``; each student with its method's sampler at
   ``--sample-steps``. The ratio is a row's FD over the teacher's FD at its largest DDIM step count
   and the same ``w`` (the targets: 4 steps within 1.2x, 1 step within 2x).

Prints the Markdown table and writes it (``distill_diffusers.md``), the raw results
(``distill_diffusers.json``) and a sample grid per row (``samples/``) under ``--out``, with the
teacher in ``--out/teacher`` and each student's run directory beside it. The defaults take about
75 minutes on a 2-core CPU with two threads (the teacher about 9, the three ``cd`` students of 1,500
steps 11 to 15 each, scoring about 6), ``--quick`` well under a minute.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from flowmaps.build import config_from_dict, resolve_device
from flowmaps.conditions import Condition, guided
from flowmaps.data import DataSource, data_fingerprint, get_data
from flowmaps.evaluation import ImageScorer, sample_in_chunks
from flowmaps.methods import get_method_class
from flowmaps.plots import save_image_grid
from flowmaps.runs import load
from flowmaps.samplers import sample
from flowmaps.schedules import get_schedule
from flowmaps.files import read_json
from flowmaps.teachers.diffusers import SCHEDULER_CONFIG, VP_SCHEDULERS, import_diffusers, load_diffusers_teacher
from flowmaps.train.loop import train

DATA = "fashion-mnist"
# Stable Diffusion's betas: the last timestep keeps alpha = 0.068 of the signal, where DDPM's linear 1e-4..0.02
# keeps 0.0064, so that x0_hat = (x - sigma eps_hat) / alpha amplifies the noise prediction's error 15x
# rather than 150x: a short CPU training of DDPM's betas drifts off the data at the first DDIM steps.
SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
TARGETS = {4: 1.2, 1: 2.0}  # student steps: the largest FD ratio to the teacher's largest-step DDIM that meets the goal
COLUMNS = ("fd", "precision", "recall", "class_accuracy")
QUICK = {"teacher_steps": 40, "teacher_batch": 16, "teacher_channels": [8, 16, 16], "student_steps": 6,
         "batch": 16, "student_channels": 8, "n_samples": 32}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/distill-diffusers")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of a minute or two: a tiny teacher and students, few steps and samples "
                             "(sizes given explicitly still apply)")
    parser.add_argument("--teacher", metavar="DIR", help="use this trained diffusers folder (unet/, scheduler/) "
                                                         "instead of training a teacher")
    parser.add_argument("--teacher-steps", type=int, default=2000, help="teacher training steps")
    parser.add_argument("--teacher-batch", type=int, default=64)
    parser.add_argument("--teacher-lr", type=float, default=1e-3)
    parser.add_argument("--teacher-channels", type=int, nargs=3, default=[16, 32, 64], metavar="C",
                        help="channels of the UNet's three levels (28, 14 and 7 px; multiples of 8)")
    parser.add_argument("--label-dropout", type=float, default=0.1,
                        help="share of the teacher's labels dropped to the null class")
    parser.add_argument("--methods", nargs="+", default=["cd"], help="flowmaps teacher methods (`flowmaps methods`)")
    parser.add_argument("--student-steps", type=int, default=1500, help="training steps of each student")
    parser.add_argument("--batch", type=int, default=64, help="student batch size")
    parser.add_argument("--student-lr", type=float, default=1e-3)
    parser.add_argument("--student-channels", type=int, default=0,
                        help="channels of the student U-Net's first level (0: the backbone's default)")
    parser.add_argument("--guidance", type=float, default=2.0, help="guidance scale w of the guided teacher")
    parser.add_argument("--guidance-range", type=float, nargs=2, default=[1.0, 3.0], metavar=("LOW", "HIGH"),
                        help="scales the guidance-conditioned student is trained on (it must contain --guidance)")
    parser.add_argument("--n-samples", type=int, default=500, help="samples scored per row")
    parser.add_argument("--ddim-steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--sample-steps", type=int, nargs="+", default=[1, 2, 4], help="sampling steps of the students")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    for name in args.methods:
        cls = get_method_class(name)
        if not cls.needs_teacher or cls.initializes_from_teacher:
            parser.error(f"--methods {name}: a student here distils the diffusers teacher, so it needs a method that "
                         "takes a teacher and does not start from the teacher's own network (see `flowmaps methods`, "
                         "setting teacher; not ect)")
    low, high = args.guidance_range
    if not 0 <= low <= args.guidance <= high:
        parser.error(f"--guidance {args.guidance} must lie in --guidance-range [{low}, {high}]")
    if any(c < 8 or c % 8 for c in args.teacher_channels):
        parser.error(f"--teacher-channels must be multiples of 8 (the UNet's group norms have 8 groups); "
                     f"got {args.teacher_channels}")
    counts = {"--teacher-steps": [args.teacher_steps], "--teacher-batch": [args.teacher_batch],
              "--student-steps": [args.student_steps], "--batch": [args.batch], "--ddim-steps": args.ddim_steps,
              "--sample-steps": args.sample_steps}
    bad = [name for name, values in counts.items() if min(values) < 1]
    if bad:
        parser.error(f"{', '.join(bad)} must be positive")
    if args.n_samples < 4:
        parser.error(f"--n-samples must be at least 4 (the k = 3 nearest neighbours of precision and recall); "
                     f"got {args.n_samples}")
    return args


# -- the teacher ---------------------------------------------------------------------------------------


def train_teacher(data: DataSource, folder: Path, args: argparse.Namespace, device: torch.device) -> float:
    """Train the class-conditional UNet with diffusers' DDPM recipe (module docstring) and save it in
    ``folder``; returns the training seconds."""
    diffusers = import_diffusers()
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    torch.manual_seed(args.seed)
    channels, size = data.shape[0], data.shape[1:]
    unet = diffusers.UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=tuple(args.teacher_channels), down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3, norm_num_groups=8, num_class_embeds=data.num_classes + 1).to(device)
    scheduler = diffusers.DDPMScheduler(**SCHEDULER, prediction_type="epsilon", clip_sample=False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.teacher_lr, weight_decay=1e-6)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, args.teacher_steps // 20), args.teacher_steps)
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True, power=0.75)
    gen = torch.Generator().manual_seed(args.seed)
    start, losses = time.perf_counter(), []
    for step in range(args.teacher_steps):
        batch = data.sample(args.teacher_batch, gen)
        x0, labels = batch.x0.to(device), batch.cond.to(device)
        dropped = (torch.rand(labels.shape, generator=gen) < args.label_dropout).to(device)
        labels = torch.where(dropped, data.num_classes, labels)  # the null class: the last embedding
        noise = torch.randn(x0.shape, generator=gen).to(device)
        tau = torch.randint(0, scheduler.config.num_train_timesteps, labels.shape, generator=gen).to(device)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, tau), tau, class_labels=labels).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        ema.step(unet.parameters())
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, args.teacher_steps // 10) == 0:
            recent = losses[-max(1, args.teacher_steps // 10):]
            print(f"teacher step {step + 1}/{args.teacher_steps}: loss {sum(recent) / len(recent):.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    ema.copy_to(unet.parameters())
    unet.save_pretrained(folder / "unet")
    scheduler.save_pretrained(folder / "scheduler")
    return seconds


def load_unet(folder: Path, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """The teacher UNet (frozen, as ``flowmaps.teachers.diffusers`` checks and loads it) and its scheduler's
    config, which must be of a DDPM path (DDIM samples it)."""
    config = read_json(folder / "scheduler" / SCHEDULER_CONFIG, "scheduler config")
    if not isinstance(config, dict) or config.get("_class_name") not in VP_SCHEDULERS:
        raise ValueError(f"{folder}: the teacher's scheduler must be one of {', '.join(VP_SCHEDULERS)} (DDIM samples "
                         f"a DDPM path); got {config.get('_class_name') if isinstance(config, dict) else config!r}")
    return load_diffusers_teacher(folder, device).unet, config


@torch.no_grad()
def ddim_sample(unet: Any, scheduler_config: dict[str, Any], noise: torch.Tensor, labels: torch.Tensor, steps: int,
                w: float) -> torch.Tensor:
    """Deterministic DDIM (``eta = 0``) of diffusers in ``steps`` steps from ``noise`` for ``labels``,
    guided on the predicted noise ``eps_u + w (eps_c - eps_u)`` when ``w != 1`` (``eps_u``: the null class)."""
    ddim = import_diffusers().DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing",
                                                        clip_sample=False, set_alpha_to_one=True)
    ddim.set_timesteps(steps, device=noise.device)
    null = torch.full_like(labels, unet.config.num_class_embeds - 1)
    x = noise * ddim.init_noise_sigma
    for tau in ddim.timesteps:
        if w == 1.0:
            eps = unet(x, tau, class_labels=labels).sample
        else:
            eps_c, eps_u = unet(torch.cat([x, x]), tau, class_labels=torch.cat([labels, null])).sample.chunk(2)
            eps = eps_u + w * (eps_c - eps_u)
        x = ddim.step(eps, tau, x, eta=0.0).prev_sample
    return x


# -- the students --------------------------------------------------------------------------------------


def students(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each method's conditional and guided-teacher students, and the first method's guidance-conditioned one,
    with the config sections they change and the scales they are scored at."""
    rows = []
    for method in args.methods:
        rows.append({"name": method, "method": method, "label": method, "scales": [1.0], "sections": {}})
        rows.append({"name": f"{method}-guided", "method": method, "label": f"{method}, teacher w = {args.guidance:g}",
                     "scales": [args.guidance], "sections": {"guidance": {"teacher_scale": args.guidance}}})
    low, high, first = *args.guidance_range, args.methods[0]
    rows.append({"name": f"{first}-w-conditioned", "method": first, "label": f"{first}, w in [{low:g}, {high:g}]",
                 "scales": sorted({1.0, args.guidance}),
                 "sections": {"model": {"guidance": True}, "train": {"guidance_range": [low, high]}}})
    return rows


def student_config(args: argparse.Namespace, method: str, teacher: Path, num_classes: int,
                   sections: dict[str, Any]) -> Any:
    """The flowmaps config of a student of ``method`` distilling ``teacher``, with ``sections`` merged in."""
    values: dict[str, Any] = {
        "data": DATA, "teacher": f"diffusers:{teacher}",
        "model": {"backbone": "unet", "num_classes": num_classes,
                  **({"channels": args.student_channels} if args.student_channels else {})},
        "method": {"name": method},
        "optim": {"lr": args.student_lr, "warmup_steps": max(1, args.student_steps // 10), "ema_decay": 0.995},
        "train": {"steps": args.student_steps, "batch_size": args.batch, "seed": args.seed, "device": args.device,
                  "log_every": max(1, args.student_steps // 10)},
        "checkpoint": {"every": 0},
    }
    for section, entries in sections.items():
        values.setdefault(section, {}).update(entries)
    return config_from_dict(values)


# -- scoring -------------------------------------------------------------------------------------------


class Scores:
    """Every row's samples from the same noises and labels, scored by the in-project classifier."""

    def __init__(self, data: DataSource, args: argparse.Namespace, device: torch.device, out: Path):
        gen = torch.Generator().manual_seed(args.seed + 7919)
        self.labels = data.sample(args.n_samples, gen).cond.to(device)
        self.noise = torch.randn(args.n_samples, *data.shape, generator=gen).to(device)
        self.scorer = ImageScorer(data, data_fingerprint(DATA), device, args.n_samples)
        self.floor = self.scorer.floor()
        self.out, self.seed = out, args.seed
        self.rows: list[dict[str, Any]] = []

    def add(self, key: str, row: dict[str, Any], fn: Callable[[torch.Tensor, Condition], torch.Tensor],
            cond: Condition) -> None:
        """Sample ``fn(noise, cond)`` in chunks, score it, keep ``row`` with its scores and save a grid as ``key``."""
        start = time.perf_counter()
        x = sample_in_chunks(fn, self.noise, cond)
        seconds = time.perf_counter() - start
        scores = self.scorer(x, self.labels.cpu())
        self.rows.append({**row, "sample_seconds": round(seconds, 2),
                          **{k: v for k, v in scores.items() if not isinstance(v, dict)}})
        save_image_grid(x[:64], self.out / "samples" / f"{key}-w{row['w']:g}-{row['steps']}.png")
        print(f"{row['model']} (w = {row['w']:g}), {_steps(row['steps'])}: FD {scores['fd']:.4g}, class accuracy "
              f"{scores.get('class_accuracy', float('nan')):.3f} ({seconds:.0f} s)", flush=True)

    def teacher(self, unet: Any, scheduler_config: dict[str, Any], steps: list[int], w: float) -> None:
        for k in steps:
            self.add("teacher", {"model": "teacher", "sampler": "DDIM", "w": w, "steps": k,
                                 "nfe": k * (1 if w == 1.0 else 2)},
                     lambda z, c: ddim_sample(unet, scheduler_config, z, c, k, w), self.labels)

    def student(self, student: dict[str, Any], steps: list[int], w: float) -> None:
        model = load(student["run"], device=self.noise.device)
        cond = guided(self.labels, w) if model.takes_guidance else self.labels
        for k in steps:
            gen = torch.Generator(device=self.noise.device).manual_seed(self.seed + k)  # consistency re-noising

            def draw(z: torch.Tensor, c: Condition) -> torch.Tensor:
                with torch.no_grad():
                    return sample(model, z, k, c, schedule=get_schedule(student["schedule"]), generator=gen)

            self.add(student["name"], {"model": student["label"], "sampler": model.sampler, "w": w, "steps": k,
                                       "nfe": k}, draw, cond)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's ``fd_ratio``: its FD over the teacher's at its largest DDIM step count and the same scale."""
    reference = {}
    for row in rows:
        if row["model"] == "teacher" and row["steps"] >= reference.get(row["w"], (0, 0))[0]:
            reference[row["w"]] = (row["steps"], row["fd"])
    for row in rows:
        row["fd_ratio"] = row["fd"] / reference[row["w"]][1] if row["w"] in reference else float("nan")


def table(rows: list[dict[str, Any]], floor: dict[str, Any], ddim_steps: int) -> str:
    lines = [f"| model | sampler | w | steps | NFE | FD | FD / teacher {ddim_steps}-step DDIM | precision | recall "
             "| class acc |", "|---|---|---|---|---|---|---|---|---|---|",
             f"| floor (test halves) | | | | | {_cell(floor, 'fd')} | | "
             + " | ".join(_cell(floor, c) for c in COLUMNS[1:]) + " |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['w']:g} | {r['steps']} | {r['nfe']} | {_cell(r, 'fd')} | "
                     f"{r['fd_ratio']:.2f}x | " + " | ".join(_cell(r, c) for c in COLUMNS[1:]) + " |")
    return "\n".join(lines)


def _steps(k: int) -> str:
    return f"{k} step{'s' if k > 1 else ''}"


def _cell(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    return f"{value:.4g}" if isinstance(value, (int, float)) else ""


def verdicts(rows: list[dict[str, Any]]) -> str:
    """Each student row at a step count with a target: its ratio against the target."""
    lines = []
    for r in rows:
        if r["model"] != "teacher" and r["steps"] in TARGETS:
            goal = TARGETS[r["steps"]]
            lines.append(f"- {r['model']} (w = {r['w']:g}), {_steps(r['steps'])}: "
                         f"{r['fd_ratio']:.2f}x (target {goal:g}x: {'met' if r['fd_ratio'] <= goal else 'missed'})")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    import_diffusers().utils.logging.set_verbosity_error()  # not its advice to install accelerate at every load
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = get_data(DATA, seed=args.seed)
    teacher = Path(args.teacher) if args.teacher else out / "teacher"
    summary: dict[str, Any] = {"args": vars(args), "teacher": str(teacher)}
    if not args.teacher:
        summary["teacher_train_seconds"] = round(train_teacher(data, teacher, args, device), 1)
    unet, scheduler_config = load_unet(teacher, device)
    summary["teacher_parameters"] = sum(p.numel() for p in unet.parameters())
    trained = []
    for s in students(args):
        cfg = student_config(args, s["method"], teacher, data.num_classes, s["sections"])
        print(f"student {s['label']}: {cfg.method['name']} for {cfg.train.steps} steps", flush=True)
        result = train(cfg, out / s["name"], progress=False, evaluate_at_end=False, overwrite=True)
        trained.append({**s, "run": out / s["name"], "schedule": cfg.train.schedule,
                        "train_seconds": round(result.train_seconds, 1)})
    scores = Scores(data, args, device, out)
    scales = sorted({w for s in trained for w in s["scales"]})
    for w in scales:
        scores.teacher(unet, scheduler_config, args.ddim_steps, w)
    for s in trained:
        for w in s["scales"]:
            scores.student(s, args.sample_steps, w)
    add_ratios(scores.rows)
    trained_for = ("" if args.teacher else
                   f", trained {args.teacher_steps} steps in {summary['teacher_train_seconds']:.0f} s")
    text = (f"{table(scores.rows, scores.floor, max(args.ddim_steps))}\n\n{verdicts(scores.rows)}\n\n"
            f"teacher: {summary['teacher_parameters']} parameters{trained_for}"
            + "; students: " + ", ".join(f"{s['label']} {args.student_steps} steps in {s['train_seconds']:.0f} s"
                                         for s in trained) + f"; {args.n_samples} samples per row\n")
    summary.update(rows=scores.rows, floor={k: v for k, v in scores.floor.items() if not isinstance(v, dict)},
                   students=[{k: str(v) if isinstance(v, Path) else v for k, v in s.items()} for s in trained])
    (out / "distill_diffusers.md").write_text(text)
    (out / "distill_diffusers.json").write_text(json.dumps(summary, indent=2, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
