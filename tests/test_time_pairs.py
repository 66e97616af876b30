import pytest
import torch

from flowmaps.time_pairs import TimePairSampler


def test_split_and_ordering():
    sampler = TimePairSampler(diagonal_fraction=0.25)
    pairs = sampler.sample(100, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert pairs.t_diag.shape == (25,) and pairs.s.shape == (75,) and pairs.t.shape == (75,)
    assert bool((pairs.s >= pairs.t).all())
    assert bool(((pairs.s <= 1) & (pairs.t >= 0)).all())


def test_uniform_triangle_marginals():
    pairs = TimePairSampler(0.0).sample(200_000, torch.Generator().manual_seed(0), torch.device("cpu"))
    # max of two uniforms has mean 2/3, min has mean 1/3
    assert abs(pairs.s.mean().item() - 2 / 3) < 0.01 and abs(pairs.t.mean().item() - 1 / 3) < 0.01


def test_both_directions_and_logit_normal():
    sampler = TimePairSampler(0.0, distribution="logit_normal", direction="both")
    pairs = sampler.sample(1000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert 0.4 < (pairs.s > pairs.t).float().mean().item() < 0.6


@pytest.mark.parametrize("kw,msg", [({"diagonal_fraction": 1.5}, "diagonal_fraction"),
                                    ({"distribution": "beta"}, "time distribution"),
                                    ({"direction": "up"}, "direction")])
def test_bad_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TimePairSampler(**kw)
