import json

import numpy as np
import pytest
import torch

from flowmaps.data import BUILTIN, get_data


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_sets_are_2d_finite_and_seeded(name):
    data = get_data(name)
    a = data.sample(512, torch.Generator().manual_seed(0))
    b = get_data(name).sample(512, torch.Generator().manual_seed(0))
    assert a.shape == (512, 2) and torch.isfinite(a).all() and torch.equal(a, b)
    assert 0.2 < a.std().item() < 1.5


def test_checkerboard_support():
    x = get_data("checkerboard").sample(20000, torch.Generator().manual_seed(0))
    assert bool((x.abs() <= 1).all())
    u = (x + 1) / 2
    assert bool(((torch.floor(4 * u[:, 0]) + torch.floor(4 * u[:, 1])) % 2 == 0).all())
    # all 8 squares are used, roughly equally
    cells = (torch.floor(4 * u[:, 0]) * 4 + torch.floor(4 * u[:, 1])).long()
    counts = torch.bincount(cells, minlength=16)
    assert (counts > 0).sum() == 8 and counts.max() < 1.1 * counts[counts > 0].min()


def test_npy_epochs_cover_every_row_once(tmp_path):
    arr = np.arange(20, dtype=np.float32).reshape(10, 2)
    np.save(tmp_path / "d.npy", arr)
    data = get_data(str(tmp_path / "d.npy"))
    g = torch.Generator()
    rows = torch.cat([data.sample(3, g) for _ in range(3)] + [data.sample(1, g)])
    assert sorted(rows[:, 0].tolist()) == sorted(arr[:, 0].tolist())
    state = data.state_dict()
    nxt = data.sample(4, g)
    again = get_data(str(tmp_path / "d.npy"))
    again.load_state_dict(state)
    assert torch.equal(again.sample(4, g), nxt)


def test_npy_with_nan_is_rejected(tmp_path):
    arr = np.zeros((5, 2))
    arr[3, 1] = np.nan
    np.save(tmp_path / "bad.npy", arr)
    with pytest.raises(ValueError, match=r"non-finite value\(s\).*row 3, column 1"):
        get_data(str(tmp_path / "bad.npy"))


def test_npy_wrong_rank_is_rejected(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((4, 2, 2)))
    with pytest.raises(ValueError, match=r"shape \[N, D\]; got shape \(4, 2, 2\)"):
        get_data(str(tmp_path / "bad.npy"))


def test_mixture_spec_json_and_yaml(tmp_path):
    spec = {"weights": [1, 3], "means": [[0, 0], [2, 1]], "stds": [[0.1, 0.1], [0.2, 0.3]]}
    (tmp_path / "m.json").write_text(json.dumps(spec))
    (tmp_path / "m.yaml").write_text("weights: [1, 3]\nmeans: [[0, 0], [2, 1]]\nstds: [[0.1, 0.1], [0.2, 0.3]]\n")
    for f in ("m.json", "m.yaml"):
        data = get_data(str(tmp_path / f))
        x = data.sample(40000, torch.Generator().manual_seed(0))
        assert data.mixture is not None and data.dim == 2
        assert torch.allclose(x.mean(0), torch.tensor([1.5, 0.75]), atol=0.03)


def test_bad_mixture_spec_and_unknown_data(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"weights": [1], "means": [[0, 0]]}))
    with pytest.raises(ValueError, match=r"missing keys \['stds'\]"):
        get_data(str(tmp_path / "m.json"))
    with pytest.raises(ValueError, match="unknown data 'swissroll'"):
        get_data("swissroll")
    with pytest.raises(ValueError, match="does not exist"):
        get_data(str(tmp_path / "missing.npy"))
