"""Sampling throughput per NFE: the flow-map sampler against the diagonal ODE sampler (same network).

    OMP_NUM_THREADS=1 python benchmarks/sampling_throughput.py                # fresh MLP 256 x 3, 2D
    OMP_NUM_THREADS=1 python benchmarks/sampling_throughput.py --run runs/demo

Throughput does not depend on the weights, so without ``--run`` a freshly initialised backbone of
the default experiment's size is timed. Prints a Markdown table (and writes it with ``--out``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flowmaps.bench.throughput import sampling_throughput, throughput_table
from flowmaps.flow_map import FlowMap
from flowmaps.nets import MLP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a trained run directory (default: a fresh MLP)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write the table to this Markdown file")
    args = parser.parse_args()

    if args.run:
        from flowmaps import load

        model, dim = load(args.run, device=args.device), json.loads((Path(args.run) / "data_info.json").read_text())["dim"]
        what = f"run {args.run}"
    else:
        model = FlowMap(MLP(args.dim, width=args.width, depth=args.depth)).to(args.device).eval().requires_grad_(False)
        dim, what = args.dim, f"MLP {args.width} x {args.depth}, {args.dim}D"
    rows = sampling_throughput(model, dim, batch=args.batch, repeats=args.repeats)
    header = (f"Sampling throughput, {what}, batch {args.batch}, device {args.device}, "
              f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")
    text = header + "\n\n" + throughput_table(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
