"""Linear measurement operators ``y = A x`` for inverse problems, on samples of any shape.

An operator maps a batch ``x`` ``[B, *shape]`` to measurements ``[B, *out]``. ``matrix(shape)`` is the
dense ``[M, D]`` matrix of the flattened map (the exact posterior of spec §9 needs it), and
``solve_gram(v, a, b)`` solves ``(a A A^T + b I) z = v`` on measurements (pseudoinverse-guided
posterior guidance needs it; closed form for masks and average pooling).

Built-ins, by name (``parse_operator``):

- ``A.npy``: any ``[M, D]`` matrix acting on the flattened sample (``MatrixOperator``);
- ``inpaint:half``: observe the first half of the sample (the top rows of an image, the first
  coordinates of a vector) and fill in the rest; ``inpaint:MASK.npy``: observe where a boolean mask
  of one sample's shape is true (``MaskOperator``);
- ``downsample:K``: ``K x K`` average pooling of images ``[C, H, W]`` (``DownsampleOperator``);
- ``denoise``: the identity (``IdentityOperator``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf


class OperatorError(ValueError):
    """An operator that does not fit the data, or a malformed operator spec."""


class LinearOperator(ABC):
    """``y = A x`` on ``[B, *shape]`` batches."""

    name: str = "operator"
    gram_scale: float = 1.0  # g with A A^T = g I, for the default ``solve_gram``

    @abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise ``OperatorError`` unless the operator applies to samples of ``shape``."""

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one measurement of a sample of ``shape``."""
        self.check_shape(shape)
        return tuple(self(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])

    def matrix(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The dense float64 ``[M, D]`` matrix of the flattened map, built column by column."""
        self.check_shape(shape)
        dim = math.prod(shape)
        basis = torch.eye(dim, dtype=torch.float64).reshape(dim, *shape)
        return self(basis).reshape(dim, -1).T.contiguous()

    def solve_gram(self, v: torch.Tensor, a: torch.Tensor, b: float) -> torch.Tensor:
        """``(a A A^T + b I)^-1 v`` for measurements ``v`` ``[B, *out]`` and per-row scalars ``a`` ``[B]``.
        Default: for operators whose rows are orthonormal up to ``gram_scale`` (``A A^T = g I``)."""
        return v / (a.reshape(-1, *[1] * (v.dim() - 1)) * self.gram_scale + b)


class MatrixOperator(LinearOperator):
    """A dense ``[M, D]`` matrix on the flattened sample."""

    name = "matrix"

    def __init__(self, matrix: torch.Tensor | np.ndarray):
        a = torch.as_tensor(np.asarray(matrix) if not isinstance(matrix, torch.Tensor) else matrix)
        if a.dim() != 2 or 0 in a.shape:
            raise OperatorError(f"an operator matrix must be a non-empty [M, D] array; got shape {tuple(a.shape)}")
        if a.dtype.is_complex or not (a.dtype.is_floating_point or a.dtype in (torch.int32, torch.int64)):
            raise OperatorError(f"an operator matrix must hold real numbers; got {a.dtype}")
        a = a.to(torch.float64)
        if not bool(torch.isfinite(a).all()):
            raise OperatorError("the operator matrix has non-finite entries")
        self.a = a

    def check_shape(self, shape: tuple[int, ...]) -> None:
        if math.prod(shape) != self.a.shape[1]:
            raise OperatorError(f"the operator matrix is [{self.a.shape[0]}, {self.a.shape[1]}] but one sample "
                                f"has shape {list(shape)} ({math.prod(shape)} numbers)")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.a.to(device=x.device, dtype=x.dtype).T

    def matrix(self, shape: tuple[int, ...]) -> torch.Tensor:
        self.check_shape(shape)
        return self.a.clone()

    def solve_gram(self, v: torch.Tensor, a: torch.Tensor, b: float) -> torch.Tensor:
        gram = (self.a @ self.a.T).to(device=v.device, dtype=v.dtype)
        eye = torch.eye(gram.shape[0], device=v.device, dtype=v.dtype)
        systems = a.reshape(-1, 1, 1).to(v.dtype) * gram + b * eye
        return torch.linalg.solve(systems, v)


class MaskOperator(LinearOperator):
    """Observe the entries where ``mask`` (one sample's shape, boolean) is true: ``y = x[mask]``."""

    name = "inpaint"

    def __init__(self, mask: torch.Tensor):
        if mask.dtype != torch.bool:
            raise OperatorError(f"an inpainting mask must be boolean; got {mask.dtype}")
        if not bool(mask.any()):
            raise OperatorError("the inpainting mask observes nothing (no true entry)")
        self.mask = mask

    @classmethod
    def half(cls, shape: tuple[int, ...]) -> MaskOperator:
        """The first half observed: an image's top ``H // 2`` rows, a vector's first ``D // 2`` entries."""
        mask = torch.zeros(shape, dtype=torch.bool)
        if len(shape) >= 2:
            mask[..., : shape[-2] // 2, :] = True
        else:
            mask[..., : max(1, shape[-1] // 2)] = True
        return cls(mask)

    def check_shape(self, shape: tuple[int, ...]) -> None:
        if tuple(self.mask.shape) != tuple(shape):
            raise OperatorError(f"the inpainting mask has shape {list(self.mask.shape)}, a sample {list(shape)}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.mask.to(x.device)]


class DownsampleOperator(LinearOperator):
    """``K x K`` average pooling of ``[C, H, W]`` images (``A A^T = I / K^2``)."""

    name = "downsample"

    def __init__(self, factor: int):
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise OperatorError(f"the down-sampling factor must be a positive integer; got {factor!r}")
        self.factor = factor
        self.gram_scale = 1.0 / factor**2

    def check_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 3 or shape[1] % self.factor or shape[2] % self.factor:
            raise OperatorError(f"downsample:{self.factor} needs [C, H, W] images with H and W divisible by "
                                f"{self.factor}; a sample has shape {list(shape)}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return nnf.avg_pool2d(x, self.factor)


class IdentityOperator(LinearOperator):
    """``y = x``: denoising."""

    name = "denoise"

    def check_shape(self, shape: tuple[int, ...]) -> None:
        return None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


def parse_operator(spec: str, shape: tuple[int, ...]) -> LinearOperator:
    """The operator named by ``spec`` (see the module docstring) for samples of ``shape``, checked to fit."""
    kind, _, arg = spec.partition(":")
    if kind == "inpaint":
        op: LinearOperator = MaskOperator.half(shape) if arg == "half" else MaskOperator(
            torch.as_tensor(_load_array(arg, "inpainting mask")))
    elif kind == "downsample":
        if not arg.isdigit():
            raise OperatorError(f"downsample:K needs a positive integer K; got {spec!r}")
        op = DownsampleOperator(int(arg))
    elif kind == "denoise" and not arg:
        op = IdentityOperator()
    elif spec.endswith(".npy"):
        op = MatrixOperator(_load_array(spec, "operator matrix"))
    else:
        raise OperatorError(f"unknown operator {spec!r}; use A.npy (a [M, D] matrix), inpaint:half, "
                            "inpaint:MASK.npy, downsample:K or denoise")
    op.check_shape(tuple(shape))
    return op


def _load_array(path: str, what: str) -> np.ndarray:
    file = Path(path)
    if not file.is_file():
        raise OperatorError(f"{what} file {path!r} does not exist")
    try:
        return np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise OperatorError(f"cannot read the {what} {path}: {err}") from err
