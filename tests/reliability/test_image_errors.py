"""Bad image and label input through the CLI: a named error, exit status 2, nothing trained or written.

An image that does not fit the backbone, labels out of range, labels given to an unconditional model,
a conditional model without labels, a class folder with a corrupt image, NaN pixels and a missing
Fashion-MNIST (with the install hint).
"""

import numpy as np
import pytest
from PIL import Image

from flowmaps.cli import main

QUICK = ["--steps", "2", "--batch-size", "8", "--no-progress", "--set", "eval.n_samples=16", "--set", "eval.nfe=[1]",
         "--set", "eval.ode_steps=1", "--set", "checkpoint.every=0"]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "flowmaps: error: " in err and "Traceback" not in err, err
    return err


def _images(tmp_path, labels=None, name="images.npz", shape=(16, 1, 8, 8)):
    x = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / name
    np.savez(path, x=x, **({} if labels is None else {"y": np.asarray(labels)}))
    return path


def _train_fails(tmp_path, capsys, args) -> str:
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *QUICK, *args]) == 2
    assert not out.exists() or not any(out.glob("*.safetensors"))
    return _error(capsys)


@pytest.mark.parametrize("backbone,options,message", [
    ("unet", ["--set", "model.channel_mult=[1,2,2,2,2]"], "channel_mult"),
    ("dit", ["--set", "model.patch_size=3"], "patch_size"),
    ("unet", ["--set", "model.chanels=8"], "chanels"),
])
def test_an_image_that_does_not_fit_the_backbone_is_named(tmp_path, capsys, backbone, options, message):
    data = _images(tmp_path)
    assert message in _train_fails(tmp_path, capsys, ["--data", str(data), "--set", f"model.backbone={backbone}",
                                                      *options])


def test_image_backbones_refuse_vector_data(tmp_path, capsys):
    err = _train_fails(tmp_path, capsys, ["--data", "moons", "--set", "model.backbone=unet"])
    assert "(2,)" in err


def test_labels_beyond_the_model_classes_are_named(tmp_path, capsys):
    data = _images(tmp_path, labels=np.arange(16) % 5)
    err = _train_fails(tmp_path, capsys, ["--data", str(data), "--set", "model.num_classes=3"])
    assert "5 classes" in err and "model.num_classes = 3" in err


def test_a_conditional_model_needs_labelled_data(tmp_path, capsys):
    err = _train_fails(tmp_path, capsys, ["--data", str(_images(tmp_path)), "--set", "model.num_classes=3"])
    assert "has no labels" in err


def test_negative_labels_are_named(tmp_path, capsys):
    data = _images(tmp_path, labels=[0, 1, -2] + [0] * 13)
    assert "images.npz" in _train_fails(tmp_path, capsys, ["--data", str(data), "--set", "model.num_classes=3"])


def test_nan_pixels_are_named(tmp_path, capsys):
    x = np.zeros((8, 1, 4, 4), dtype=np.float32)
    x[3, 0, 1, 2] = np.nan
    np.save(tmp_path / "nan.npy", x)
    err = _train_fails(tmp_path, capsys, ["--data", str(tmp_path / "nan.npy")])
    assert "nan.npy" in err and "non-finite" in err


def test_a_corrupt_image_in_a_class_folder_is_named(tmp_path, capsys):
    for c in ("cat", "dog"):
        (tmp_path / "folder" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((6, 6), 40 * i, dtype=np.uint8)).save(tmp_path / "folder" / c / f"{i}.png")
    (tmp_path / "folder" / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    assert "broken.png" in _train_fails(tmp_path, capsys, ["--data", str(tmp_path / "folder")])


def test_a_missing_fashion_mnist_names_the_install_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLOWMAPS_FASHION_MNIST", str(tmp_path / "nowhere"))
    assert "apt-get install dataset-fashion-mnist" in _train_fails(tmp_path, capsys, ["--data", "fashion-mnist"])


def test_sampling_refuses_labels_an_unconditional_model_cannot_take(tmp_path, capsys):
    data = _images(tmp_path, labels=np.arange(16) % 2)
    run = tmp_path / "cond"
    assert main(["train", "--data", str(data), "--out", str(run), *QUICK, "--set", "model.num_classes=2"]) == 0
    assert main(["sample", str(run), "--n", "4", "--class", "2", "--out", str(tmp_path / "s.npy")]) == 2
    assert "class 2 is out of range" in _error(capsys)
    plain = tmp_path / "plain"
    assert main(["train", "--data", str(data), "--out", str(plain), *QUICK]) == 0
    assert main(["sample", str(plain), "--n", "4", "--class", "1", "--out", str(tmp_path / "s.npy")]) == 2
    assert "unconditional" in _error(capsys)
    assert main(["sample", str(run), "--n", "4", "--class", "0,1", "--out", str(tmp_path / "s.npy")]) == 0
    assert np.load(tmp_path / "s.npy").shape == (4, 1, 8, 8) and (tmp_path / "s.png").is_file()
