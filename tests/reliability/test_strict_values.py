"""Strict values: finite where finite is meant, no repeated YAML keys, no alias bombs, and mixture
weights renormalised with an announcement."""

import json
import logging
import time

import pytest

from flowmaps.build import config_from_dict
from flowmaps.cli import main
from flowmaps.data import get_data
from flowmaps.train.config import ConfigError, apply_override, read_config_file
from tests.reliability.support import TINY


@pytest.mark.parametrize("assignment,message", [
    ("optim.lr=inf", "optim.lr must be a finite positive number; got inf"),
    ("optim.lr=.inf", "optim.lr must be a finite positive number; got inf"),
    ("optim.grad_clip=.nan", "optim.grad_clip must be a finite non-negative number; got nan"),
    ("optim.weight_decay=-.inf", "optim.weight_decay must be a finite non-negative number"),
    ("guard.lr_factor=nan", "guard.lr_factor must be a finite number; got nan"),
    ("guard.spike_factor=.inf", "guard.spike_factor must be a finite number"),
    ("method.diagonal_fraction=.nan", "diagonal_fraction of method 'lsd' must be finite"),
])
def test_non_finite_values_are_refused_by_name(assignment, message):
    values: dict = {}
    apply_override(values, assignment)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(values)


def test_non_finite_values_from_the_cli(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), *TINY, "--set", "optim.grad_clip=.nan"]) == 2
    assert "optim.grad_clip must be a finite non-negative number; got nan" in capsys.readouterr().err


def test_duplicate_yaml_keys_are_refused(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 0.1\n  beta1: 0.8\n  lr: 0.001\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' \(first given on line 2\)"):
        read_config_file(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("train:\n  steps: 5\ntrain:\n  seed: 1\n")
    assert main(["train", "--config", str(tmp_path / "d.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert "duplicate key 'train'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        apply_override({}, "method.schedule={a: 1, a: 2}")


def test_merge_keys_may_still_be_overridden(tmp_path):
    (tmp_path / "m.yaml").write_text("optim:\n  <<: {lr: 0.1, beta1: 0.8}\n  lr: 0.001\n")
    assert read_config_file(tmp_path / "m.yaml")["optim"] == {"lr": 0.001, "beta1": 0.8}


def test_an_alias_bomb_is_refused_quickly(tmp_path):
    """Nine levels of nine aliases: 9^9 (387 million) values from a few hundred bytes."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    lines.append("method: {name: lsd, bomb: *a9}")
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than 100000 values"):
        read_config_file(tmp_path / "bomb.yaml")
    assert time.perf_counter() - start < 5
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="deep"):
        read_config_file(tmp_path / "deep.yaml")


def test_a_mixture_spec_with_repeated_keys_is_refused(tmp_path):
    (tmp_path / "m.yaml").write_text("weights: [1]\nmeans: [[0, 0]]\nstds: [[1, 1]]\nweights: [2]\n")
    with pytest.raises(ValueError, match="duplicate key 'weights'"):
        get_data(str(tmp_path / "m.yaml"))
    (tmp_path / "m.json").write_text('{"weights": [1], "means": [[0, 0]], "stds": [[1, 1]], "means": [[1, 1]]}')
    with pytest.raises(ValueError, match=r"duplicate key\(s\) \['means'\]"):
        get_data(str(tmp_path / "m.json"))


def test_mixture_weights_that_do_not_sum_to_one_are_renormalised_with_a_warning(tmp_path, caplog):
    components = {"means": [[0, 0], [1, 1]], "stds": [[1, 1], [1, 1]]}
    (tmp_path / "m.json").write_text(json.dumps({"weights": [1, 3], **components}))
    with caplog.at_level(logging.WARNING, logger="flowmaps.data"):
        data = get_data(str(tmp_path / "m.json"))
    assert data.mixture.weights.tolist() == [0.25, 0.75]
    assert "the weights sum to 4, not 1; renormalised to [0.25, 0.75]" in caplog.text
    caplog.clear()
    (tmp_path / "n.json").write_text(json.dumps({"weights": [0.5, 0.5], **components}))
    get_data(str(tmp_path / "n.json"))
    assert "renormalised" not in caplog.text
