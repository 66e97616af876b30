"""Optional TensorBoard logging (``train.tensorboard``; ``pip install flowmaps[tensorboard]``).

The same scalars as ``train_log.jsonl`` (the loss, every ``loss/<term>`` and ``diag/<name>``, the
gradient norm and the learning rate) at every logged step, and at the end of the run the metrics
of every sampler and the sample panels (``samples.png``), under ``RUN_DIR/tensorboard/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

EXTRA_HINT = "train.tensorboard needs TensorBoard: pip install 'flowmaps[tensorboard]'"


def check_available() -> None:
    """``ImportError`` with the install command unless TensorBoard can be imported."""
    try:
        import tensorboard  # noqa: F401
    except ImportError as err:
        raise ImportError(EXTRA_HINT) from err


class TensorBoardLog:
    """A ``SummaryWriter`` on ``RUN_DIR/tensorboard`` fed with the trainer's log records."""

    def __init__(self, run_dir: Path):
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def scalars(self, step: int, record: dict[str, Any]) -> None:
        """Every numeric entry of a log record but the step and the time."""
        for key, value in record.items():
            if key not in ("step", "elapsed_s") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)

    def summary(self, step: int, samplers: dict[str, dict[str, float]], samples_png: Path) -> None:
        """The end-of-run metrics (``metrics/<metric>/<sampler>``) and the sample panels."""
        for sampler, row in samplers.items():
            for metric, value in row.items():
                if metric != "nfe":
                    self.writer.add_scalar(f"metrics/{metric}/{sampler}", value, step)
        if samples_png.is_file():
            import matplotlib.image

            image = matplotlib.image.imread(str(samples_png))[..., :3]
            self.writer.add_image("samples", np.ascontiguousarray(image), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
