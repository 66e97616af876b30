"""Image data: class-folder trees read with Pillow, and Fashion-MNIST from Debian's IDX files."""

import gzip
import os

import numpy as np
import pytest
import torch
from PIL import Image

from flowmaps.data import data_fingerprint, get_data
from flowmaps.data.images import FASHION_MNIST_ENV
from tests.fashion_mnist import require_fashion_mnist


def _save(path, value, size=(6, 6), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = value if mode == "L" else (value, 255 - value, 0)
    Image.new(mode, size, fill).save(path)


@pytest.fixture
def folder(tmp_path):
    """Two classes (``cat`` = 0, ``dog`` = 1) of 6x6 greyscale PNGs whose pixel value encodes the class."""
    root = tmp_path / "pets"
    for i, value in enumerate((0, 51, 102)):
        _save(root / "cat" / f"{i}.png", value)
    for i, value in enumerate((204, 255)):
        _save(root / "dog" / f"{i}.png", value)
    (root / "dog" / "notes.txt").write_text("not an image: ignored")
    (root / ".cache").mkdir()
    return root


def test_image_folder_shape_labels_and_scaling(folder):
    data = get_data(str(folder), seed=1)
    assert data.name == "pets" and data.shape == (1, 6, 6) and data.num_classes == 2 and data.shared_order
    assert data.test_split() is None
    full = data.full_split()
    assert full.cond.tolist() == [0, 0, 0, 1, 1]
    assert torch.allclose(full.x0[:, 0, 0, 0], torch.tensor([-1.0, -0.6, -0.2, 0.6, 1.0]))
    g = torch.Generator()
    for _ in range(3):  # across epochs the labels follow their images
        batch = data.sample(4, g)
        assert batch.x0.shape == (4, 1, 6, 6) and bool((batch.x0.abs() <= 1).all())
        assert torch.equal(batch.cond, (batch.x0[:, 0, 0, 0] > 0).long())


def test_colour_images_are_rgb_channels(tmp_path):
    for k in ("a", "b"):
        _save(tmp_path / "rgb" / k / "x.png", 255, size=(5, 3), mode="RGB")
    Image.new("P", (5, 3)).save(tmp_path / "rgb" / "b" / "y.gif")  # a palette image becomes RGB too
    data = get_data(str(tmp_path / "rgb"))
    assert data.shape == (3, 3, 5) and data.full_split().x0.shape == (3, 3, 3, 5)
    assert torch.allclose(data.full_split().x0[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))


def test_image_folder_errors_name_the_file_or_folder(tmp_path, folder):
    (folder / "cat" / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(ValueError, match=r"cannot read image .*cat/broken.png"):
        get_data(str(folder))
    (folder / "cat" / "broken.png").unlink()
    _save(folder / "dog" / "big.png", 10, size=(7, 6))
    with pytest.raises(ValueError, match=r"image .*dog/big.png is 7x6 \(width x height\) L but .*cat/0.png is 6x6 "
                                         r"\(width x height\) L"):
        get_data(str(folder))
    (folder / "dog" / "big.png").unlink()
    _save(folder / "dog" / "colour.png", 10, mode="RGB")
    with pytest.raises(ValueError, match=r"dog/colour.png is 6x6 \(width x height\) RGB but .* is 6x6 .* L"):
        get_data(str(folder))
    (folder / "dog" / "colour.png").unlink()
    (folder / "empty").mkdir()
    (folder / "empty" / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder .*pets/empty holds no images"):
        get_data(str(folder))
    flat = tmp_path / "flat"
    _save(flat / "0.png", 0)
    with pytest.raises(ValueError, match=r"image folder .*flat has no class sub-folders"):
        get_data(str(flat))


def test_image_folder_fingerprint_is_deterministic_and_sees_changes(folder):
    first = data_fingerprint(str(folder))
    assert first.startswith("folder-sha256:") and first == data_fingerprint(str(folder))
    os.utime(folder / "cat" / "0.png", ns=(0, 0))
    touched = data_fingerprint(str(folder))
    _save(folder / "dog" / "2.png", 128)
    assert len({first, touched, data_fingerprint(str(folder))}) == 3


@pytest.fixture(scope="module")
def fashion(fashion_mnist_dir):
    return get_data("fashion-mnist")


def test_fashion_mnist_splits_shapes_labels_and_scaling(fashion):
    assert fashion.name == "fashion-mnist" and fashion.shape == (1, 28, 28) and fashion.num_classes == 10
    train, test = fashion.full_split(), fashion.test_split()
    assert train.x0.shape == (60000, 1, 28, 28) and test.x0.shape == (10000, 1, 28, 28)
    assert train.x0.dtype == torch.float32 and train.x0.min() == -1 and train.x0.max() == 1
    assert torch.bincount(train.cond).tolist() == [6000] * 10 and torch.bincount(test.cond).tolist() == [1000] * 10
    assert train.cond[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the IDX files' first labels
    assert test.cond[:5].tolist() == [9, 2, 1, 1, 6]
    batch = fashion.sample(8, torch.Generator())
    assert batch.x0.shape == (8, 1, 28, 28) and batch.cond.shape == (8,) and batch.cond.dtype == torch.int64
    assert data_fingerprint("fashion-mnist").startswith("builtin:fashion-mnist:")


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    for call in (get_data, data_fingerprint):
        with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist") as err:
            call("fashion-mnist")
        assert str(tmp_path) in str(err.value) and FASHION_MNIST_ENV in str(err.value)
        assert "train-images-idx3-ubyte.gz" in str(err.value)


def _write_idx(path, magic, array, cut=0):
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw[: len(raw) - cut]))


def _fake_fashion_mnist(root, n_train=3, n_test=2):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", 2051, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 2049, np.arange(n) % 10)


def test_fashion_mnist_idx_files_are_checked(tmp_path, monkeypatch):
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    _fake_fashion_mnist(tmp_path)
    data = get_data("fashion-mnist")
    assert data.full_split().x0.shape == (3, 1, 28, 28) and data.test_split().cond.tolist() == [0, 1]
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    _write_idx(labels, 2049, np.arange(3), cut=1)
    with pytest.raises(ValueError, match=r"IDX file .*train-labels-idx1-ubyte.gz announces shape \(3,\) \(3 bytes\) "
                                         r"but holds 2 bytes.*truncated"):
        get_data("fashion-mnist")
    _write_idx(labels, 2051, np.arange(3))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz must start with magic number 2049; found 2051"):
        get_data("fashion-mnist")
    _write_idx(labels, 2049, np.arange(4))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz holds images of shape .* and .* 4 labels"):
        get_data("fashion-mnist")
    _write_idx(labels, 2049, np.array([0, 10, 1]))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz holds label 10; the classes are 0..9"):
        get_data("fashion-mnist")
    _write_idx(labels, 2049, np.arange(3))
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:40])
    with pytest.raises(ValueError, match="cannot read IDX file .*t10k-images-idx3-ubyte.gz"):
        get_data("fashion-mnist")


def test_missing_fashion_mnist_fails_under_ci_and_skips_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must have Fashion-MNIST"):
        require_fashion_mnist()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="apt-get install dataset-fashion-mnist"):
        require_fashion_mnist()
    _fake_fashion_mnist(tmp_path)
    assert require_fashion_mnist() == tmp_path
