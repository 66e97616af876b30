"""Optional TensorBoard logging (``train.tensorboard``, the ``tensorboard`` extra, installed by ``make test``)."""

import pytest

from flowmaps.build import config_from_dict
from flowmaps.train import tensorboard
from flowmaps.train.config import ConfigError
from flowmaps.train.loop import train
from tests.train.tiny import tiny_values
from tests.unavailable import unavailable


def require_tensorboard() -> None:
    try:
        tensorboard.check_available()
    except ImportError as err:
        unavailable("the tensorboard extra", f"the tensorboard extra is not installed (make test installs it): {err}")


def test_a_run_logs_its_scalars_and_samples(tmp_path):
    require_tensorboard()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = tiny_values(train={"steps": 6, "log_every": 2, "tensorboard": True}, eval={"n_samples": 256, "nfe": [1]})
    train(config_from_dict(values), tmp_path / "run", progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss", "loss/diagonal", "loss/lagrangian", "grad_norm", "lr"} <= scalars
    assert "metrics/energy_distance/flow map, 1 step" in scalars
    assert [e.step for e in events.Scalars("loss")] == [0, 2, 4, 5]
    assert events.Tags()["images"] == ["samples"]


def test_without_the_extra_the_config_names_the_install_command(monkeypatch):
    def missing() -> None:
        raise ImportError(tensorboard.EXTRA_HINT)

    monkeypatch.setattr(tensorboard, "check_available", missing)
    with pytest.raises(ConfigError, match=r"pip install 'flowmaps\[tensorboard\]'"):
        config_from_dict({"train": {"tensorboard": True}})
