"""Mixed precision confined to the network, and torch.compile checked against eager JVP tangents."""

import pytest
import torch
from torch import nn

from flowmaps.flow_map import FlowMap
from flowmaps.jvp import jvp
from flowmaps.nets import MLP
from flowmaps.train.loop import train
from flowmaps.train.precision import (
    AutocastModel, CompileCheckError, check_compiled_tangents, check_precision, compile_model, grad_scaler,
)
from tests.train.tiny import tiny_config


def _flow_map(seed: int = 0, num_freqs: int = 3) -> FlowMap:
    torch.manual_seed(seed)
    return FlowMap(MLP(2, width=32, depth=2, num_freqs=num_freqs))


def _inputs(n: int = 16):
    g = torch.Generator().manual_seed(1)
    x, u = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)
    s = torch.rand(n, generator=g)
    return x, u, s, s * torch.rand(n, generator=g)


def _tangent(model, x, u, s, t):
    return jvp(lambda x_, s_, t_: model(x_, s_, t_, check_times=False), (x, s, t), (u, torch.ones_like(s),
               torch.ones_like(t)))


def test_autocast_keeps_embedding_tangent_and_output_in_fp32():
    """The mechanism, on the CPU's autocast: low precision inside the matrix products only."""
    model = _flow_map()
    wrapped = AutocastModel(model, "cpu", torch.bfloat16)
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen.setdefault(name, out.dtype)
        return hook

    model.net.embed.register_forward_hook(record("embed"))
    model.net.layers[0].register_forward_hook(record("linear"))
    x, u, s, t = _inputs()
    primal, tangent = _tangent(wrapped, x, u, s, t)
    assert seen == {"embed": torch.float32, "linear": torch.bfloat16}
    assert primal.dtype == tangent.dtype == torch.float32
    ref_primal, ref_tangent = _tangent(model, x, u, s, t)
    assert torch.allclose(tangent, ref_tangent, rtol=0.05, atol=0.05 * float(ref_tangent.detach().abs().max()))
    tangent.pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_precision_choices():
    check_precision("fp32", torch.device("cpu"))
    with pytest.raises(ValueError, match="train.precision=fp16 needs a CUDA device"):
        check_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="must be one of"):
        check_precision("fp8", torch.device("cpu"))
    assert not grad_scaler("fp32", torch.device("cpu")).is_enabled()
    assert grad_scaler("fp16", torch.device("cpu")).is_enabled()


class _DropsTimeTangent(nn.Module):
    """A stand-in for a compiler that silently loses the tangent of ``t`` (the failure the check exists for)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, s, t, cond=None, **kw):
        return self.model(x, s, t.detach(), cond, **kw)


class _Fails(nn.Module):
    def forward(self, *args, **kw):
        raise NotImplementedError("no forward-mode rule")


def test_compile_check_rejects_wrong_or_failing_tangents():
    model = _flow_map()
    with pytest.raises(CompileCheckError, match="fails in torch"):
        check_compiled_tangents(_Fails(), model, (2,), torch.device("cpu"))
    with pytest.raises(CompileCheckError, match="tangent differs from the eager one"):
        check_compiled_tangents(_DropsTimeTangent(model), model, (2,), torch.device("cpu"), backend="func")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["func", "finite_difference"])
def test_compiled_and_eager_tangents_agree(backend):
    model = _flow_map()
    compiled = compile_model(model, (2,), torch.device("cpu"), backend)
    x, u, s, t = _inputs()
    (pc, tc), (pe, te) = _tangent(compiled, x, u, s, t), _tangent(model, x, u, s, t)
    assert torch.allclose(tc, te, rtol=1e-4, atol=1e-5) and torch.allclose(pc, pe, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_training_with_compile(tmp_path):
    result = train(tiny_config(train={"steps": 3, "compile": True}, checkpoint={"every": 0}), tmp_path / "r",
                   progress=False, evaluate_at_end=False)
    assert (result.run_dir / "model.safetensors").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision runs on CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda(tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    result = train(tiny_config(train={"steps": 6, "precision": precision, "device": "cuda"}), tmp_path / "r",
                   progress=False, evaluate_at_end=False)
    import json

    log = [json.loads(line) for line in (result.run_dir / "train_log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log if "loss" in r)
