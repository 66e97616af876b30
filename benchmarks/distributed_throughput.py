"""Training throughput with 1 process and with N processes (torchrun, DDP), at the same global batch.

Each configuration runs ``flowmaps train`` in a fresh process group and reads ``train_seconds``
from ``metrics.json`` (the training loop alone: no start-up, evaluation or checkpoints). Rows:

- 1 process, 1 thread;
- 1 process, N threads (the same cores used by one process instead of N);
- N processes (``torchrun --nproc_per_node N``), 1 thread each.

Usage (CPU, gloo)::

    python benchmarks/distributed_throughput.py --method lsd --steps 300 --batch-size 2048

On GPUs pass ``--device cuda``: each process takes ``cuda:LOCAL_RANK`` (NCCL), so ``--nproc`` must not
exceed the number of visible GPUs, and the thread rows are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run(out: Path, nproc: int, threads: int, args: argparse.Namespace) -> float:
    """Train once; returns the training seconds reported by the run."""
    flags = ["train", "--method", args.method, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
             "--out", str(out), "--no-progress", "--device", args.device,
             "--set", f"model.width={args.width}", "--set", f"model.depth={args.depth}",
             "--set", "checkpoint.every=0", "--set", f"train.log_every={args.steps}",
             "--set", "eval.n_samples=256", "--set", "eval.nfe=[1]", "--set", "eval.ode_steps=2"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "flowmaps"]
                if nproc > 1 else [sys.executable, "-m", "flowmaps"])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(launcher + flags, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"training failed ({nproc} processes):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads((out / "metrics.json").read_text())["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lsd")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=2048, help="global batch (split over the processes)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    args = parser.parse_args()

    rows = [(1, 1)]
    if args.device == "cpu":
        rows.append((1, args.nproc))
    rows.append((args.nproc, 1))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (nproc, threads) in enumerate(rows):
            seconds = run(Path(tmp) / f"run{i}", nproc, threads, args)
            results.append((nproc, threads, seconds))
    base = results[0][2]
    print(f"method {args.method}, MLP {args.width}x{args.depth}, global batch {args.batch_size}, {args.steps} steps, "
          f"device {args.device}\n")
    print("| processes | threads/process | batch/process | train s | steps/s | samples/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for nproc, threads, seconds in results:
        print(f"| {nproc} | {threads if args.device == 'cpu' else '-'} | {args.batch_size // nproc} | {seconds:.1f} | "
              f"{args.steps / seconds:.1f} | {args.steps * args.batch_size / seconds:,.0f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
