"""The ``DataSource`` contract and ``get_data``'s dispatch: built-in sets, fingerprints, unknown specs."""

import json

import numpy as np
import pytest
import torch

from flowmaps.data import BUILTIN, data_fingerprint, get_data
from flowmaps.methods.base import Batch


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_sets_are_2d_unlabelled_finite_and_seeded(name):
    data = get_data(name)
    a = data.sample(512, torch.Generator().manual_seed(0))
    b = get_data(name).sample(512, torch.Generator().manual_seed(0))
    assert isinstance(a, Batch) and a.cond is None
    assert data.shape == (2,) and data.dim == 2 and data.num_classes == 0
    assert a.x0.shape == (512, 2) and a.x0.dtype == torch.float32 and torch.isfinite(a.x0).all()
    assert torch.equal(a.x0, b.x0) and 0.2 < a.x0.std().item() < 1.5
    assert data.test_split() is None and data.full_split() is None and not data.shared_order


def test_checkerboard_support():
    x = get_data("checkerboard").sample(20000, torch.Generator().manual_seed(0)).x0
    assert bool((x.abs() <= 1).all())
    u = (x + 1) / 2
    assert bool(((torch.floor(4 * u[:, 0]) + torch.floor(4 * u[:, 1])) % 2 == 0).all())
    # all 8 squares are used, roughly equally
    cells = (torch.floor(4 * u[:, 0]) * 4 + torch.floor(4 * u[:, 1])).long()
    counts = torch.bincount(cells, minlength=16)
    assert (counts > 0).sum() == 8 and counts.max() < 1.1 * counts[counts > 0].min()


def test_unknown_and_missing_data(tmp_path):
    with pytest.raises(ValueError, match="unknown data 'swissroll'.*fashion-mnist.*folder of class sub-folders"):
        get_data("swissroll")
    for name in ("missing.npy", "missing.npz", "missing.json"):
        with pytest.raises(ValueError, match=f"data file .*{name} does not exist"):
            get_data(str(tmp_path / name))


def test_fingerprints_name_what_was_read(tmp_path):
    assert data_fingerprint("moons") == "builtin:moons"
    np.save(tmp_path / "a.npy", np.zeros((3, 2)))
    np.save(tmp_path / "b.npy", np.ones((3, 2)))
    fa, fb = data_fingerprint(str(tmp_path / "a.npy")), data_fingerprint(str(tmp_path / "b.npy"))
    assert fa.startswith("sha256:") and fa != fb and fa == data_fingerprint(str(tmp_path / "a.npy"))
    (tmp_path / "m.json").write_text(json.dumps({"weights": [1], "means": [[0]], "stds": [[1]]}))
    assert data_fingerprint(str(tmp_path / "m.json")).startswith("sha256:")
