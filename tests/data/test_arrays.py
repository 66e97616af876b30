"""``.npy`` and ``.npz`` array files: shapes, pixel scaling, labels that follow their samples, and errors."""

import numpy as np
import pytest
import torch

from flowmaps.data import get_data


def _draws(data, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [data.sample(n, g) for n in sizes]


def test_npy_epochs_cover_every_row_once_and_resume(tmp_path):
    arr = np.arange(20, dtype=np.float32).reshape(10, 2)
    np.save(tmp_path / "d.npy", arr)
    data = get_data(str(tmp_path / "d.npy"))
    assert data.shape == (2,) and data.num_classes == 0 and data.shared_order and data.test_split() is None
    batches = _draws(data, [3, 3, 3, 1])
    rows = torch.cat([b.x0 for b in batches])
    assert all(b.cond is None for b in batches)
    assert sorted(rows[:, 0].tolist()) == sorted(arr[:, 0].tolist())
    state = data.state_dict()
    g = torch.Generator()
    nxt = data.sample(4, g).x0
    again = get_data(str(tmp_path / "d.npy"))
    again.load_state_dict(state)
    assert torch.equal(again.sample(4, g).x0, nxt)
    assert torch.equal(data.full_split().x0, torch.from_numpy(arr))


def test_npy_images_float_kept_and_uint8_scaled(tmp_path):
    floats = np.random.default_rng(0).normal(size=(5, 3, 4, 6)).astype(np.float64)
    np.save(tmp_path / "f.npy", floats)
    data = get_data(str(tmp_path / "f.npy"))
    batch = data.sample(5, torch.Generator())
    assert data.shape == (3, 4, 6) and data.dim == 72 and batch.x0.shape == (5, 3, 4, 6)
    assert batch.x0.dtype == torch.float32
    assert torch.allclose(data.full_split().x0, torch.from_numpy(floats).float())
    pixels = np.zeros((4, 1, 2, 2), dtype=np.uint8)
    pixels[:, 0, 0, 0], pixels[:, 0, 1, 1], pixels[:, 0, 0, 1] = 255, 51, 127
    np.save(tmp_path / "u.npy", pixels)
    x = get_data(str(tmp_path / "u.npy")).sample(4, torch.Generator()).x0
    assert x.dtype == torch.float32 and x.shape == (4, 1, 2, 2)
    assert torch.allclose(x[0, 0], torch.tensor([[1.0, 127 / 127.5 - 1], [-1.0, -0.6]]))


def test_npy_with_nan_is_rejected_naming_file_and_index(tmp_path):
    arr = np.zeros((5, 2))
    arr[3, 1] = np.nan
    np.save(tmp_path / "bad.npy", arr)
    with pytest.raises(ValueError, match=r"bad.npy contains 1 non-finite value\(s\).*row 3, column 1"):
        get_data(str(tmp_path / "bad.npy"))
    images = np.zeros((3, 1, 4, 4), dtype=np.float32)
    images[1, 0, 2, 3] = np.inf
    np.save(tmp_path / "img.npy", images)
    with pytest.raises(ValueError, match=r"img.npy contains 1 non-finite.*sample 1, channel 0, row 2, column 3"):
        get_data(str(tmp_path / "img.npy"))


def test_npy_wrong_rank_and_truncation_are_rejected(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((4, 2, 2)))
    with pytest.raises(ValueError, match=r"bad.npy must hold samples of shape \[N, D\] or images of shape "
                                         r"\[N, C, H, W\]; got shape \(4, 2, 2\)"):
        get_data(str(tmp_path / "bad.npy"))
    np.save(tmp_path / "cut.npy", np.zeros((8, 2)))
    raw = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[:-8])
    with pytest.raises(ValueError, match=r"cut.npy: its header announces shape \(8, 2\).*truncated"):
        get_data(str(tmp_path / "cut.npy"))


def test_npz_labels_follow_their_samples_across_epochs_and_resume(tmp_path):
    y = np.array([2, 0, 1, 2, 1, 0, 0], dtype=np.int32)
    x = np.repeat(y[:, None].astype(np.float32), 3, axis=1) * 10 + np.arange(7)[:, None]  # x encodes its label
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = get_data(str(tmp_path / "d.npz"), seed=3)
    assert data.num_classes == 3 and data.shape == (3,) and data.test_split() is None
    batches = _draws(data, [4, 5, 6])
    for b in batches:
        assert b.cond.dtype == torch.int64 and torch.equal(b.cond, (b.x0[:, 0] // 10).long())
    state = data.state_dict()
    g = torch.Generator()
    nxt = data.sample(5, g)
    again = get_data(str(tmp_path / "d.npz"), seed=3)
    again.load_state_dict(state)
    resumed = again.sample(5, g)
    assert torch.equal(resumed.x0, nxt.x0) and torch.equal(resumed.cond, nxt.cond)
    assert torch.equal(data.full_split().cond, torch.from_numpy(y).long())


def test_npz_images_and_num_classes_key(tmp_path):
    x = np.full((4, 1, 3, 3), 255, dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 1, 0]), num_classes=np.array(5))
    data = get_data(str(tmp_path / "d.npz"))
    batch = data.sample(4, torch.Generator())
    assert data.num_classes == 5 and data.shape == (1, 3, 3) and bool((batch.x0 == 1).all())
    np.savez(tmp_path / "u.npz", x=np.zeros((3, 2)))
    assert get_data(str(tmp_path / "u.npz")).sample(2, torch.Generator()).cond is None


@pytest.mark.parametrize("y,extra,message", [
    (np.array([0, 1, -1, 0, -2]), {}, r"must be >= 0; the first bad label is y\[2\] = -1"),
    (np.array([0.0, 1.0, 1.0, 0.0, 1.0]), {}, "must be integers; got dtype float64"),
    (np.array([0, 1, 1]), {}, r"must have shape \[N\] = \[5\] \(one per sample\); got shape \(3,\)"),
    (np.zeros((5, 1), dtype=int), {}, r"must have shape \[N\] = \[5\]"),
    (np.array([0, 1, 3, 2, 4]), {"num_classes": np.array(3)},
     r"must be below num_classes = 3; the first bad label is y\[2\] = 3"),
    (np.array([0, 1, 1, 0, 0]), {"num_classes": np.array(0)}, "num_classes .* must be a positive integer scalar"),
    (np.array([0, 1, 1, 0, 0]), {"num_classes": np.array([2])}, "num_classes .* must be a positive integer scalar"),
])
def test_npz_bad_labels_are_named(tmp_path, y, extra, message):
    np.savez(tmp_path / "bad.npz", x=np.zeros((5, 2)), y=y, **extra)
    with pytest.raises(ValueError, match=message) as err:
        get_data(str(tmp_path / "bad.npz"))
    assert "bad.npz" in str(err.value)


def test_npz_bad_keys_and_contents_are_named(tmp_path):
    np.savez(tmp_path / "k.npz", x=np.zeros((3, 2)), labels=np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match=r"k.npz has keys \['labels', 'x'\]; it needs 'x' and may have 'y' and "
                                         r"'num_classes' \(unknown: \['labels'\]\)"):
        get_data(str(tmp_path / "k.npz"))
    np.savez(tmp_path / "nox.npz", y=np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="nox.npz has keys .'y'.; it needs 'x'"):
        get_data(str(tmp_path / "nox.npz"))
    np.savez(tmp_path / "nc.npz", x=np.zeros((3, 2)), num_classes=np.array(2))
    with pytest.raises(ValueError, match="nc.npz gives num_classes but no labels y"):
        get_data(str(tmp_path / "nc.npz"))
    np.savez(tmp_path / "obj.npz", x=np.array([{}, {}], dtype=object))
    with pytest.raises(ValueError, match="obj.npz.*holds Python objects"):
        get_data(str(tmp_path / "obj.npz"))
    x = np.zeros((3, 2))
    x[2, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    with pytest.raises(ValueError, match=r"array 'x' of data file .*nan.npz contains 1 non-finite.*row 2, column 0"):
        get_data(str(tmp_path / "nan.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="cannot read data file .*junk.npz"):
        get_data(str(tmp_path / "junk.npz"))
