"""Self-attention under forward-mode JVPs: which formulations are exact, and what a JVP training step costs.

Candidates, each ``softmax(q k^T / sqrt(d)) v`` over ``[B, heads, N, d]``:

- ``sdpa``: ``F.scaled_dot_product_attention`` with torch's choice of kernel (on CPU the flash kernel,
  which has no forward-mode rule);
- ``sdpa-math``: the same forced to its math backend (``sdpa_kernel(SDPBackend.MATH)``);
- ``hand, torch.softmax``: the formula with ``torch.softmax``;
- ``hand, elementary softmax``: ``flowmaps.nets.layers.attention`` (``exp(z - max) / sum``).

"Correct" means: the tangent and the gradient of ``sum(w * tangent)`` in the query projection's
weight match float64 central differences, under ``torch.func.jvp`` (func) and
``torch.autograd.forward_ad`` (fwAD); an error is reported by its kind. Timings are float32 medians
of ``--repeats`` on a self-attention layer (qkv projection, attention, output projection): a forward,
and a JVP step (``torch.func.jvp`` along ``dx``, then ``backward`` of a loss of the tangent), and the
JVP step's ratio to the elementary hand-written one.

    OMP_NUM_THREADS=1 python benchmarks/attention_jvp.py                # batch 64, 64 tokens, 4 x 32
    OMP_NUM_THREADS=1 python benchmarks/attention_jvp.py --batch 8 --tokens 16 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Optional

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flowmaps.nets.layers import attention

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def hand_torch_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v


def sdpa_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)


CANDIDATES: dict[str, Attention] = {
    "sdpa": F.scaled_dot_product_attention,
    "sdpa-math": sdpa_math,
    "hand, torch.softmax": hand_torch_softmax,
    "hand, elementary softmax": attention,
}
REFERENCE = "hand, elementary softmax"


class Layer(torch.nn.Module):
    """Tokens ``[B, N, heads * head_dim]`` -> qkv -> ``attend`` -> output projection."""

    def __init__(self, attend: Attention, heads: int, head_dim: int):
        super().__init__()
        self.attend, self.heads = attend, heads
        self.qkv = torch.nn.Linear(heads * head_dim, 3 * heads * head_dim)
        self.out = torch.nn.Linear(heads * head_dim, heads * head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.out(self.attend(q, k, v).transpose(1, 2).reshape(b, n, -1))


def tangent(layer: Layer, x: torch.Tensor, dx: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "func":
        return torch.func.jvp(layer, (x,), (dx,))[1]
    with fwAD.dual_level():
        return fwAD.unpack_dual(layer(fwAD.make_dual(x, dx))).tangent


def check(attend: Attention, backend: str) -> str:
    """``"yes"``, ``"no (tangent ...)"`` / ``"no (gradient ...)"`` or the kind of error raised."""
    torch.manual_seed(0)
    layer = Layer(attend, 2, 4).double()
    x, dx = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    h = 1e-6
    try:
        d = tangent(layer, x, dx, backend)
        with torch.no_grad():
            fd = (layer(x + h * dx) - layer(x - h * dx)) / (2 * h)
        if not torch.allclose(d, fd, atol=1e-6, rtol=1e-5):
            return f"no (tangent off by {float((d - fd).abs().max()):.1e})"
        w = torch.randn_like(d)
        (d * w).sum().backward()
        weight = layer.qkv.weight
        direction = torch.randn_like(weight)
        analytic = float((weight.grad * direction).sum())

        def value(delta: float) -> float:
            with torch.no_grad():
                weight.add_(delta * direction)
                out = float((tangent(layer, x, dx, backend) * w).sum())
                weight.sub_(delta * direction)
            return out

        numeric = (value(1e-5) - value(-1e-5)) / 2e-5
        if abs(analytic - numeric) > 1e-5 * max(1.0, abs(numeric)):
            return f"no (gradient {analytic:.4f} vs {numeric:.4f})"
        return "yes"
    except (RuntimeError, NotImplementedError) as error:
        message = str(error)
        if "forward AD" in message:
            return "fails (no forward-mode rule)"
        if "inplace" in message:
            return "fails (backward: in-place error)"
        return f"fails ({type(error).__name__})"


def median_ms(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def timings(attend: Attention, args: argparse.Namespace) -> tuple[Optional[float], Optional[float]]:
    """Forward ms and JVP-step ms in float32 (``None`` where the JVP step raises)."""
    torch.manual_seed(0)
    layer = Layer(attend, args.heads, args.head_dim)
    x = torch.randn(args.batch, args.tokens, args.heads * args.head_dim)
    dx = torch.randn_like(x)

    def forward() -> None:
        with torch.no_grad():
            layer(x)

    def jvp_step() -> None:
        layer.zero_grad(set_to_none=True)
        primal, d = torch.func.jvp(layer, (x,), (dx,))
        (primal.square().mean() + d.square().mean()).backward()

    forward_ms = median_ms(forward, args.repeats)
    try:
        return forward_ms, median_ms(jvp_step, args.repeats)
    except (RuntimeError, NotImplementedError):
        return forward_ms, None


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = {name: (check(fn, "func"), check(fn, "forward_ad"), *timings(fn, args)) for name, fn in CANDIDATES.items()}
    reference = rows[REFERENCE][3]
    print(f"batch {args.batch}, {args.tokens} tokens, {args.heads} heads x {args.head_dim}, float32, "
          f"{args.threads} thread(s), torch {torch.__version__}\n")
    print("| implementation | correct (func) | correct (fwAD) | forward ms | jvp+backward ms | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (func_ok, fwad_ok, forward_ms, step_ms) in rows.items():
        step = "fails" if step_ms is None else f"{step_ms:.2f}"
        ratio = "" if step_ms is None or reference is None else f"{step_ms / reference:.2f}"
        print(f"| {name} | {func_ok} | {fwad_ok} | {forward_ms:.2f} | {step} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
