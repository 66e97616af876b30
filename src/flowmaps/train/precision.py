"""Mixed precision and compilation of the network for training.

Precision (``train.precision``): ``fp32`` (default, every device), ``bf16`` or ``fp16`` (CUDA only).
Low precision is confined to the network: ``AutocastModel`` runs the ``FlowMap`` under
``torch.autocast`` and returns ``F`` / ``V`` in fp32, so everything a method builds from them (the
JVP tangent it receives, the targets, residuals and the loss) is fp32. Inside the network autocast
lowers only matrix products and convolutions; the time embedding (sines and cosines of the times)
and the final ``F = x + (t - s) V`` are element-wise and stay fp32. ``fp16`` adds loss scaling
(``torch.amp.GradScaler``); an fp16 overflow is the scaler's business (step skipped, scale lowered),
not a divergence strike.

Compilation (``train.compile``): ``torch.compile`` of the network. Methods keep calling it like the
eager model; whether a JVP backend runs through the compiled graph depends on the torch version
(in torch 2.13, ``func`` tangents fall back to eager and ``forward_ad`` / ``double_backward`` fail
under compilation), and a compiler can silently drop or alter tangents. ``check_compiled_tangents``
therefore compares a compiled JVP with the eager one before training starts and refuses to train
when they disagree or the compiled JVP fails.
"""

from __future__ import annotations

from typing import Any, Union

import torch
from torch import nn

from flowmaps.jvp import flow_jvp

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class AutocastModel(nn.Module):
    """Call ``module`` under ``torch.autocast(device_type, dtype)`` and return its output in fp32."""

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> Union[torch.Tensor, tuple[torch.Tensor, ...]]:
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.module(*args, **kwargs)
        if isinstance(out, tuple):  # an output and its tangent (the "fused" JVP backend)
            return tuple(o.float() for o in out)
        return out.float()


def check_precision(name: str, device: torch.device) -> None:
    """Reject a low precision where it cannot run: autocast is used on CUDA only."""
    if name not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {sorted(PRECISIONS)}; got {name!r}")
    if name == "fp32":
        return
    if device.type != "cuda":
        raise ValueError(f"train.precision={name} needs a CUDA device (mixed precision runs on GPUs); this run is on "
                         f"{device}. Use train.precision=fp32 on the CPU")
    if name == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("train.precision=bf16 is not supported by this GPU; use fp16 or fp32")


def with_precision(model: nn.Module, name: str, device: torch.device) -> nn.Module:
    """``model`` itself for fp32, else ``AutocastModel(model)``; ``check_precision`` first."""
    check_precision(name, device)
    return model if name == "fp32" else AutocastModel(model, device.type, PRECISIONS[name])


def grad_scaler(name: str, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16; a disabled scaler (every call a pass-through) otherwise."""
    return torch.amp.GradScaler(device.type, enabled=name == "fp16")


class CompileCheckError(RuntimeError):
    """A JVP through the compiled network fails or disagrees with the eager one."""


def check_compiled_tangents(
    compiled: nn.Module,
    eager: nn.Module,
    shape: tuple[int, ...],
    device: torch.device,
    backend: str = "auto",
    rtol: float = 1e-4,
) -> float:
    """Compare ``(F, dF)`` along the tangent ``(dx, ds, dt) = (u, 1, 1)`` through both modules.

    Returns the largest difference relative to the eager tangent's scale; raises
    ``CompileCheckError`` when it exceeds ``rtol`` or when the compiled JVP fails.
    """
    g = torch.Generator().manual_seed(0)
    n = 16
    x = torch.randn(n, *shape, generator=g).to(device)
    u = torch.randn(n, *shape, generator=g).to(device)
    s = torch.rand(n, generator=g).to(device)
    t = s * torch.rand(n, generator=g).to(device)
    ones = torch.ones_like(s)

    def run(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        primal, tangent = flow_jvp(model, x, s, t, dx=u, ds=ones, dt=ones, backend=backend, grad="none")
        return primal.detach().float(), tangent.detach().float()

    eager_out = run(eager)
    try:
        compiled_out = run(compiled)
    except Exception as err:  # compiler failures have no common type
        raise CompileCheckError(
            f"train.compile=true: a JVP (backend {backend!r}) through the compiled network fails in torch "
            f"{torch.__version__}: {type(err).__name__}: {err}. Set train.compile=false or use another jvp_backend"
        ) from err
    worst = 0.0
    for name, a, b in (("F", eager_out[0], compiled_out[0]), ("tangent", eager_out[1], compiled_out[1])):
        rel = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
        worst = max(worst, rel)
        if not rel <= rtol:
            raise CompileCheckError(
                f"train.compile=true: the compiled network's {name} differs from the eager one by {rel:.3g} "
                f"(relative, backend {backend!r}; tolerance {rtol:g}); set train.compile=false"
            )
    return worst


def compile_model(model: nn.Module, shape: tuple[int, ...], device: torch.device, backend: str, rtol: float = 1e-4) -> nn.Module:
    """``torch.compile(model)``, once ``check_compiled_tangents`` found it to agree with ``model``."""
    compiled = torch.compile(model)
    check_compiled_tangents(compiled, model, shape, device, backend, rtol)
    return compiled


__all__ = [
    "AutocastModel", "CompileCheckError", "PRECISIONS", "check_compiled_tangents", "check_precision",
    "compile_model", "grad_scaler", "with_precision",
]
