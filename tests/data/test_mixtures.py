"""Mixture spec files: exact samples, labelled components, image-shaped samples, and named errors."""

import json

import pytest
import torch

from flowmaps.data import get_data
from flowmaps.teachers import ExactTeacher

LABELLED = {"weights": [1, 1, 2], "means": [[-4, 0], [4, 0], [4, 8]], "stds": [[0.1, 0.1]] * 3, "labels": [0, 1, 1]}


def _spec(tmp_path, spec, name="m.json"):
    (tmp_path / name).write_text(json.dumps(spec))
    return str(tmp_path / name)


def test_mixture_spec_json_and_yaml(tmp_path):
    _spec(tmp_path, {"weights": [1, 3], "means": [[0, 0], [2, 1]], "stds": [[0.1, 0.1], [0.2, 0.3]]})
    (tmp_path / "m.yaml").write_text("weights: [1, 3]\nmeans: [[0, 0], [2, 1]]\nstds: [[0.1, 0.1], [0.2, 0.3]]\n")
    for f in ("m.json", "m.yaml"):
        data = get_data(str(tmp_path / f))
        batch = data.sample(40000, torch.Generator().manual_seed(0))
        assert data.mixture is not None and data.dim == 2 and data.shape == (2,) and data.num_classes == 0
        assert batch.cond is None and data.test_split() is None
        assert torch.allclose(batch.x0.mean(0), torch.tensor([1.5, 0.75]), atol=0.03)


def test_labelled_mixture_samples_carry_their_components_class(tmp_path):
    data = get_data(_spec(tmp_path, LABELLED))
    assert data.num_classes == 2 and data.mixture.labels.tolist() == [0, 1, 1]
    batch = data.sample(4000, torch.Generator().manual_seed(0))
    assert batch.cond.dtype == torch.int64 and torch.equal(batch.cond, (batch.x0[:, 0] > 0).long())
    assert abs(batch.cond.float().mean().item() - 0.75) < 0.03  # class 1 holds 3/4 of the weight
    unlabelled = get_data(_spec(tmp_path, {k: v for k, v in LABELLED.items() if k != "labels"}, "u.json"))
    again = unlabelled.sample(4000, torch.Generator().manual_seed(0))
    assert torch.equal(again.x0, batch.x0)  # labels do not change what a seed draws


def test_shape_key_serves_image_shaped_samples_with_flat_exact_answers(tmp_path):
    spec = {"weights": [1, 1], "means": [[0.0] * 16, [1.0] * 16], "stds": [[0.5] * 16] * 2, "labels": [0, 1],
            "shape": [1, 4, 4]}
    data = get_data(_spec(tmp_path, spec))
    batch = data.sample(6, torch.Generator().manual_seed(0))
    assert data.shape == (1, 4, 4) and data.dim == 16 and data.mixture.dim == 16
    assert batch.x0.shape == (6, 1, 4, 4) and batch.cond.shape == (6,)
    teacher = ExactTeacher(data.mixture)
    t = torch.full((6,), 0.5)
    v = teacher.velocity(batch.x0, t, batch.cond)
    assert v.shape == (6, 1, 4, 4)
    assert torch.allclose(v.reshape(6, 16), data.mixture.velocity(batch.x0.reshape(6, 16), t, batch.cond))


@pytest.mark.parametrize("change,message", [
    ({"labels": [0, 2, 2]}, r"labels must use every class 0 .. 2; class\(es\) \[1\] have no component"),
    ({"labels": [0, 1.5, 1]}, "labels must be a list of integers"),
    ({"labels": [0, True, 1]}, "labels must be a list of integers"),
    ({"labels": [0, 1]}, r"labels must have shape \[K\] = \[3\]"),
    ({"labels": [0, -1, 1]}, "labels must be >= 0; component 1 has label -1"),
    ({"labels": 1}, "labels must be a list of integers"),
    ({"shape": [3]}, r"shape \[3\] has 3 values but the means have dimension 2"),
    ({"shape": [2, 0]}, "shape must be a non-empty list of positive integers"),
    ({"shape": "2"}, "shape must be a non-empty list of positive integers"),
    ({"colours": [1]}, r"unknown keys \['colours'\] \(the keys are weights, means, stds \(and optionally labels, shape"),
])
def test_bad_labels_and_shape_in_a_spec_are_named(tmp_path, change, message):
    path = _spec(tmp_path, {**LABELLED, **change}, "bad.json")
    with pytest.raises(ValueError, match=message) as err:
        get_data(path)
    assert "mixture spec" in str(err.value) and "bad.json" in str(err.value)


def test_missing_keys_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"missing keys \['stds'\]"):
        get_data(_spec(tmp_path, {"weights": [1], "means": [[0, 0]]}))
    with pytest.raises(ValueError, match="must be a mapping"):
        get_data(_spec(tmp_path, [1, 2]))
