"""The few tensor operations the engine's shared steps need, per framework.

The engine's rules (the aggregate over sequences, the diagonal recurrences' products) are
written once against this protocol and run where the numbers are: numpy here (the
reference and plain-numpy users), torch tensors in ``gradwatch_torch`` and ``keras.ops``
in ``gradwatch_tf``, so nothing is copied to the host to be reduced.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

__all__ = ["NUMPY_TENSORS", "NumpyTensors", "TensorOps"]


class TensorOps(Protocol):
    """Axis-wise operations on a framework's tensors (``axis`` is an int)."""

    def exp(self, x: Any) -> Any: ...
    def log(self, x: Any) -> Any: ...
    def sort(self, x: Any, axis: int) -> Any: ...
    def amax(self, x: Any, axis: int) -> Any: ...
    def cumsum(self, x: Any, axis: int) -> Any: ...
    def flip(self, x: Any, axis: int) -> Any: ...
    def logsumexp(self, x: Any, axis: int) -> Any: ...
    def where(self, cond: Any, a: Any, b: Any) -> Any: ...
    def concat(self, xs: list[Any], axis: int) -> Any: ...
    def zeros_like(self, x: Any) -> Any: ...


class NumpyTensors:
    """:class:`TensorOps` on numpy arrays (float64 in, float64 out)."""

    name = "numpy"

    def exp(self, x: Any) -> np.ndarray:
        with np.errstate(over="ignore"):
            return np.exp(x)

    def log(self, x: Any) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(x)

    def sort(self, x: Any, axis: int) -> np.ndarray:
        return np.sort(x, axis=axis)

    def amax(self, x: Any, axis: int) -> np.ndarray:
        return np.max(x, axis=axis)

    def cumsum(self, x: Any, axis: int) -> np.ndarray:
        return np.cumsum(x, axis=axis)

    def flip(self, x: Any, axis: int) -> np.ndarray:
        return np.flip(x, axis=axis)

    def logsumexp(self, x: Any, axis: int) -> np.ndarray:
        m = np.max(x, axis=axis, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        with np.errstate(divide="ignore", over="ignore"):
            return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(x - m), axis=axis))

    def where(self, cond: Any, a: Any, b: Any) -> np.ndarray:
        return np.where(cond, a, b)

    def concat(self, xs: list[Any], axis: int) -> np.ndarray:
        return np.concatenate(xs, axis=axis)

    def zeros_like(self, x: Any) -> np.ndarray:
        return np.zeros_like(x)


NUMPY_TENSORS = NumpyTensors()
