"""Training-iteration cost of every registered method, as a ratio to flow matching (``fm``).

One process times every method on the same network (``--backbone``: an MLP of ``--width`` and
``--depth``, or a registered image backbone such as ``unet`` or ``dit`` with its shape-adapted
defaults for ``--shape``; the same initial weights for all), the same batch and the same optimiser (Adam); an iteration is
``method.loss`` + ``backward`` + ``optimizer.step``. Methods are timed round-robin, ``--repeats``
rounds of ``--iters`` iterations each, so slow drifts of a shared machine hit all methods alike; the
table reports each method's median seconds per iteration and its ratio to ``fm``'s median from the
same run. Teacher methods get a frozen network of the student's size as their teacher (the
forward-pass-equivalent costs of spec §3 assume one).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over two iterations minus what was
allocated before them; on the CPU (Linux), the peak resident set size of a fresh process
(``--memory-of NAME``, one per method) during two iterations minus its resident size before them
(the kernel's peak is reset through ``/proc/self/clear_refs``), which includes allocator effects and
is approximate to a few MB.

    python benchmarks/method_cost.py                    # all methods, CPU, one thread
    python benchmarks/method_cost.py --compare-backend func   # plus each JVP method with torch.func.jvp
    python benchmarks/method_cost.py --methods fm lsd meanflow --device cuda
    python benchmarks/method_cost.py --backbone unet --shape 1,28,28 --batch 64 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from typing import Optional

import torch

from flowmaps.flow_map import FlowMap
from flowmaps.jvp import JVP_BACKENDS
from flowmaps.methods import (
    Batch, LossContext, build_method, describe_methods, get_method_class, method_names, method_options,
)
from flowmaps.nets import MLP, build_backbone
from flowmaps.train.config import ModelConfig
from flowmaps.schedules import LinearSchedule
from flowmaps.teachers import FlowMapTeacher


def takes_jvp_backend(name: str) -> bool:
    """Whether the method computes JVPs through the engine (its class has a ``jvp_backend`` option)."""
    return "jvp_backend" in method_options(name)


def network(args: argparse.Namespace) -> FlowMap:
    """The timed network: ``--backbone`` for samples of ``--shape``."""
    if args.backbone == "mlp":
        return FlowMap(MLP(args.dim, args.width, args.depth))
    return FlowMap(build_backbone(ModelConfig(args.backbone), args.shape), shape=args.shape)


def network_label(args: argparse.Namespace) -> str:
    if args.backbone == "mlp":
        return f"MLP {args.width} x {args.depth}"
    return f"{args.backbone} ({sum(p.numel() for p in network(args).parameters()):,} parameters, default options)"


def make_setup(name: str, args: argparse.Namespace, device: torch.device, backend: Optional[str] = None):
    """The method (with ``jvp_backend=backend`` if given), a fresh student (same initial weights for
    every method), its optimiser, a batch, the generator and the method's auxiliary networks."""
    torch.manual_seed(0)
    model = network(args).to(device)
    teacher = None
    if get_method_class(name).needs_teacher:
        torch.manual_seed(1)
        teacher = FlowMapTeacher(network(args).to(device))
    options = {"jvp_backend": backend} if backend is not None else {}
    method = build_method(name, LinearSchedule(), teacher=teacher, **options)
    auxiliary = {k: a.module.to(device) for k, a in method.auxiliary_networks(args.shape).items()}
    optimizer = torch.optim.Adam([*model.parameters(), *(p for m in auxiliary.values() for p in m.parameters())],
                                 lr=1e-4)
    g = torch.Generator(device=device).manual_seed(0)
    batch = Batch(torch.randn(args.batch, *args.shape, generator=g, device=device))
    return method, model, optimizer, batch, g, auxiliary


def iteration(method, model, optimizer, batch, generator, auxiliary, step: int, total: int) -> None:
    """One training iteration, the method's auxiliary networks (FreeFlow's denoiser) trained beside the
    model by the same optimiser, as the trainer does with one of their own."""
    out = method.loss(model, batch, generator, LossContext(step, total, auxiliary=auxiliary))
    optimizer.zero_grad(set_to_none=True)
    (out.loss if out.auxiliary_loss is None else out.loss + out.auxiliary_loss).backward()
    optimizer.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_methods(
    variants: dict[str, tuple[str, Optional[str]]], args: argparse.Namespace, device: torch.device
) -> dict[str, dict]:
    """Median seconds per iteration of each ``label -> (method, jvp backend or None)`` variant,
    timed round-robin over ``args.repeats`` rounds."""
    setups, results = {}, {}
    total = args.repeats * args.iters + args.warmup
    for name, (method_name, backend) in variants.items():
        try:
            setups[name] = make_setup(method_name, args, device, backend)
            for i in range(args.warmup):
                iteration(*setups[name], i, total)
            results[name] = {"times": []}
        except Exception as err:  # a broken method is reported, the others are still measured
            results[name] = {"error": f"{type(err).__name__}: {err}"}
            setups.pop(name, None)
    for r in range(args.repeats):
        for name, setup in setups.items():
            sync(device)
            start = time.perf_counter()
            for i in range(args.iters):
                iteration(*setup, args.warmup + r * args.iters + i, total)
            sync(device)
            results[name]["times"].append((time.perf_counter() - start) / args.iters)
    for name in setups:
        results[name]["median_s"] = statistics.median(results[name]["times"])
    return results


def peak_memory_mb(name: str, args: argparse.Namespace, device: torch.device) -> float:
    """Peak memory of two iterations of ``name`` in this process (see the module docstring)."""
    setup = make_setup(name, args, device)
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for i in range(2):
            iteration(*setup, i, 2)
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM) to the current one
    for i in range(2):
        iteration(*setup, i, 2)
    return (_status_kib("VmHWM") - before) / 1024


def _status_kib(key: str) -> int:
    """A ``/proc/self/status`` entry in KiB (``VmRSS``: resident now; ``VmHWM``: peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}: CPU peak memory needs Linux")


def memory_in_fresh_process(name: str, args: argparse.Namespace) -> Optional[float]:
    cmd = [sys.executable, __file__, "--memory-of", name, "--device", args.device, "--width", str(args.width),
           "--depth", str(args.depth), "--batch", str(args.batch), "--dim", str(args.dim), "--backbone", args.backbone,
           "--shape", ",".join(map(str, args.shape))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return None
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"])


def table(results: dict[str, dict], memory: dict[str, Optional[float]], compare: Optional[str]) -> str:
    rows = {r["name"]: r for r in describe_methods()}
    ref_t = results.get("fm", {}).get("median_s")
    ref_m = memory.get("fm")
    extra = f" | time / fm with `{compare}`" if compare else ""
    lines = ["| method | rule | setting | cost (FPE, spec) | spec cost / 3 | ms / iteration | time / fm "
             f"| peak memory (MB) | memory / fm{extra} |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if compare else "")]
    for name in rows:
        res = results.get(name)
        if res is None:
            continue
        info = rows[name]
        head = f"| {name} | {info['rule']} | {info['setting']} | {info['cost']} | {info['cost'] / 3:.2f} "
        if "error" in res:
            lines.append(head + f"| failed: {res['error'][:80]} | | | |" + (" |" if compare else ""))
            continue
        t = res["median_s"]
        m = memory.get(name)
        ratio_t = f"{t / ref_t:.2f}" if ref_t else ""
        mem = f"{m:.0f}" if m is not None else "n/a"
        ratio_m = f"{m / ref_m:.2f}" if m is not None and ref_m else ""
        other = results.get(f"{name} [{compare}]", {}).get("median_s") if compare else None
        tail = (f" | {other / ref_t:.2f}" if other and ref_t else " | ") if compare else ""
        lines.append(head + f"| {1000 * t:.1f} | {ratio_t} | {mem} | {ratio_m}{tail} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=None, help="method names (default: every registered method)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=2, help="vector dimension of the mlp")
    parser.add_argument("--backbone", default="mlp", help="a registered backbone (mlp, unet, dit)")
    parser.add_argument("--shape", default=None, help="sample shape for other backbones, e.g. 1,28,28 (default)")
    parser.add_argument("--repeats", type=int, default=21, help="round-robin rounds (the median is taken)")
    parser.add_argument("--iters", type=int, default=1, help="iterations per method and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    parser.add_argument("--compare-backend", choices=[b for b in JVP_BACKENDS if b != "auto"],
                        help="also time every JVP method with this jvp_backend, in the same rounds (extra column)")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: one method's CPU peak memory
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.shape = (args.dim,) if args.backbone == "mlp" else tuple(int(v) for v in (args.shape or "1,28,28").split(","))
    device = torch.device(args.device)
    if args.memory_of:
        print(json.dumps({"peak_mb": peak_memory_mb(args.memory_of, args, device)}))
        return 0
    names = args.methods or method_names()
    unknown = sorted(set(names) - set(method_names()))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; registered: {method_names()}")
    if "fm" not in names:
        names = ["fm"] + names
    variants: dict[str, tuple[str, Optional[str]]] = {name: (name, None) for name in names}
    if args.compare_backend:
        variants.update({f"{name} [{args.compare_backend}]": (name, args.compare_backend)
                         for name in names if takes_jvp_backend(name)})
    results = time_methods(variants, args, device)
    memory: dict[str, Optional[float]] = {}
    if not args.no_memory:
        for name in names:
            if "error" in results[name]:
                continue
            memory[name] = peak_memory_mb(name, args, device) if device.type == "cuda" else memory_in_fresh_process(name, args)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device {device}, "
          f"{args.threads} thread(s); {network_label(args)}, batch {args.batch} x {list(args.shape)}; "
          f"median of {args.repeats} rounds x {args.iters} iterations")
    print(table(results, memory, args.compare_backend))
    return 0


if __name__ == "__main__":
    sys.exit(main())
