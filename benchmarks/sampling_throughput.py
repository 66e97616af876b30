"""Sampling throughput per NFE: the flow-map sampler against the diagonal ODE sampler (same network).

    OMP_NUM_THREADS=1 python benchmarks/sampling_throughput.py                # fresh MLP 256 x 3, 2D
    OMP_NUM_THREADS=1 python benchmarks/sampling_throughput.py --run runs/demo
    OMP_NUM_THREADS=1 python benchmarks/sampling_throughput.py --backbone unet --shape 1,28,28 --batch 256

Throughput does not depend on the weights, so without ``--run`` a freshly initialised backbone of
the default experiment's size is timed. Prints a Markdown table (and writes it with ``--out``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flowmaps.bench.throughput import sampling_throughput, throughput_table
from flowmaps.flow_map import FlowMap
from flowmaps.nets import MLP, build_backbone
from flowmaps.runs import data_info
from flowmaps.train.config import ModelConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a trained run directory (default: a fresh MLP)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--backbone", default="mlp", help="a registered backbone, with its defaults for --shape")
    parser.add_argument("--shape", default="1,28,28", help="sample shape of a backbone other than mlp")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write the table to this Markdown file")
    args = parser.parse_args()

    if args.run:
        from flowmaps import load

        model, shape = load(args.run, device=args.device), data_info(Path(args.run)).shape
        what = f"run {args.run}"
    elif args.backbone == "mlp":
        model = FlowMap(MLP(args.dim, width=args.width, depth=args.depth)).to(args.device).eval().requires_grad_(False)
        shape, what = (args.dim,), f"MLP {args.width} x {args.depth}, {args.dim}D"
    else:
        shape = tuple(int(v) for v in args.shape.split(","))
        model = FlowMap(build_backbone(ModelConfig(args.backbone), shape)).to(args.device).eval().requires_grad_(False)
        what = f"{args.backbone} (default options), samples {list(shape)}"
    rows = sampling_throughput(model, shape, batch=args.batch, repeats=args.repeats)
    header = (f"Sampling throughput, {what}, batch {args.batch}, device {args.device}, "
              f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")
    text = header + "\n\n" + throughput_table(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
