import pytest
import torch

from flowmaps.time_pairs import TimePairSampler, progress_of

CPU = torch.device("cpu")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_split_and_ordering():
    sampler = TimePairSampler(diagonal_fraction=0.25)
    pairs = sampler.sample(100, _gen(), CPU)
    assert pairs.t_diag.shape == (25,) and pairs.s.shape == (75,) and pairs.t.shape == (75,)
    assert bool((pairs.s >= pairs.t).all())
    assert bool(((pairs.s <= 1) & (pairs.t >= 0)).all())


def test_uniform_triangle_marginals():
    pairs = TimePairSampler(0.0).sample(200_000, _gen(), CPU)
    # max of two uniforms has mean 2/3, min has mean 1/3
    assert abs(pairs.s.mean().item() - 2 / 3) < 0.01 and abs(pairs.t.mean().item() - 1 / 3) < 0.01


def test_uniform_gap_draws_every_jump_length_equally_often():
    """gap ~ U(0, 1), t | gap ~ U(0, 1 - gap), s = t + gap; the diagonal rows stay uniform."""
    pairs = TimePairSampler(0.5, "uniform_gap").sample(400_000, _gen(), CPU)
    gap = pairs.s - pairs.t
    assert bool((gap >= 0).all()) and bool((pairs.s <= 1).all()) and bool((pairs.t >= 0).all())
    counts = torch.histc(gap, bins=10, min=0.0, max=1.0) / gap.numel()
    assert torch.allclose(counts, torch.full((10,), 0.1), atol=0.003)  # the triangle gives 0.19 ... 0.01
    long = gap > 0.5
    relative = pairs.t[long] / (1 - gap[long])  # uniform on [0, 1] given the gap
    assert abs(relative.mean().item() - 0.5) < 0.005 and abs(relative.var().item() - 1 / 12) < 0.002
    assert abs(pairs.t_diag.mean().item() - 0.5) < 0.005 and abs(pairs.t_diag.var().item() - 1 / 12) < 0.002
    triangle = TimePairSampler(0.0).sample(400_000, _gen(), CPU)
    assert ((triangle.s - triangle.t) > 0.9).float().mean().item() < 0.012 < (gap > 0.9).float().mean().item()


def test_both_directions_and_logit_normal():
    sampler = TimePairSampler(0.0, distribution="logit_normal", direction="both")
    pairs = sampler.sample(1000, _gen(), CPU)
    assert 0.4 < (pairs.s > pairs.t).float().mean().item() < 0.6


def test_logit_normal_draws_can_have_their_own_distributions():
    """MeanFlow's CIFAR-10 recipe: source ~ sigmoid(N(-0.6, 1.6)), target ~ sigmoid(N(-4, 1.6)), ordered."""
    same = TimePairSampler(0.0, "logit_normal", logit_mean=-0.6, logit_std=1.6).sample(50_000, _gen(), CPU)
    split = TimePairSampler(0.0, "logit_normal", logit_mean=(-0.6, -4.0), logit_std=1.6).sample(50_000, _gen(), CPU)
    assert bool((split.s >= split.t).all())
    assert split.t.mean().item() < same.t.mean().item() - 0.1
    assert torch.logit(split.t).median().item() < -3.0


def test_gap_logit_normal_follows_tvm():
    """Gap ~ sigmoid(N(-0.8, 1)); target ~ sigmoid(N(-0.4, 1)) truncated to t <= 1 - gap; s = t + gap."""
    sampler = TimePairSampler(0.0, "gap_logit_normal", logit_mean=-0.4, gap_logit_mean=-0.8, gap_logit_std=1.0)
    pairs = sampler.sample(100_000, _gen(), CPU)
    gap = pairs.s - pairs.t
    assert bool((gap > 0).all()) and bool((pairs.s <= 1 + 1e-6).all()) and bool((pairs.t >= 0).all())
    assert abs(torch.logit(gap).mean().item() + 0.8) < 0.02
    assert abs(torch.logit(gap).std().item() - 1.0) < 0.02


def test_gap_curriculum_scales_every_gap():
    sampler = TimePairSampler(0.0, max_gap_start=0.1, gap_warmup=0.5)
    assert sampler.max_gap(0.0) == pytest.approx(0.1)
    assert sampler.max_gap(0.25) == pytest.approx(0.55)
    assert sampler.max_gap(0.5) == 1.0 and sampler.max_gap(1.0) == 1.0
    early = sampler.sample(10_000, _gen(), CPU, progress=0.0)
    late = sampler.sample(10_000, _gen(), CPU, progress=1.0)
    assert torch.allclose(early.s - early.t, 0.1 * (late.s - late.t), atol=1e-6)
    assert torch.equal(early.s, late.s)


def test_progress():
    assert progress_of(0, 100) == 0.0 and progress_of(50, 100) == 0.5 and progress_of(200, 100) == 1.0
    assert progress_of(3, 0) == 1.0


@pytest.mark.parametrize("kw,msg", [({"diagonal_fraction": 1.5}, "diagonal_fraction"),
                                    ({"distribution": "beta"}, "time distribution"),
                                    ({"direction": "up"}, "direction"),
                                    ({"logit_std": 0.0}, "logit_std"),
                                    ({"logit_mean": (1.0, 2.0, 3.0)}, "logit_mean must be a number or a pair"),
                                    ({"max_gap_start": 0.0}, "max_gap_start"),
                                    ({"gap_warmup": 2.0}, "gap_warmup")])
def test_bad_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TimePairSampler(**kw)
