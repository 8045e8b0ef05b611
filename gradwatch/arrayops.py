"""The small array-ops layer the clipping policies are written against.

A policy's maths is defined once (:mod:`gradwatch.policies`), as pure functions of
arrays. The core runs it with :data:`NUMPY` on the host; a backend that decides on the
device runs the *same* function with its own implementation of these few operations
(``gradwatch_tf._ops.TF`` inside the traced step, ``gradwatch_torch._tensors.TORCH`` for
unit-wise factors), so there is no second copy of any policy to drift from the first.

Every operation is element-wise or a whole-array reduction on float64 / int64 / bool
arrays of static shape: what XLA needs, and all the policies need.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["NUMPY", "ArrayOps", "NumpyOps"]


@runtime_checkable
class ArrayOps(Protocol):
    """The operations a policy may use. ``dtype`` is one of "float64", "int64", "bool"."""

    name: str

    def asarray(self, x: Any, dtype: str) -> Any:
        """``x`` (a Python number, list or array) as an array of ``dtype``."""
        ...

    def cast(self, x: Any, dtype: str) -> Any: ...

    def where(self, cond: Any, a: Any, b: Any) -> Any: ...

    def minimum(self, a: Any, b: Any) -> Any: ...

    def maximum(self, a: Any, b: Any) -> Any: ...

    def sqrt(self, x: Any) -> Any: ...

    def floor(self, x: Any) -> Any: ...

    def isfinite(self, x: Any) -> Any: ...

    def ones_like(self, x: Any) -> Any: ...

    def logical_and(self, a: Any, b: Any) -> Any: ...

    def logical_or(self, a: Any, b: Any) -> Any: ...

    def logical_not(self, a: Any) -> Any: ...

    def equal(self, a: Any, b: Any) -> Any: ...

    def sum(self, x: Any) -> Any:
        """Sum of every element (a scalar)."""
        ...

    def sort(self, x: Any) -> Any:
        """A 1-D array in ascending order (+inf last)."""
        ...

    def take(self, x: Any, i: Any) -> Any:
        """``x[i]`` for a 1-D ``x`` and an integer scalar ``i``."""
        ...

    def put(self, x: Any, i: Any, v: Any) -> Any:
        """A copy of the 1-D ``x`` with ``x[i] = v`` (``x`` itself is not changed)."""
        ...


class NumpyOps:
    """:class:`ArrayOps` on numpy arrays: the host implementation (and the reference)."""

    name = "numpy"

    def asarray(self, x: Any, dtype: str) -> np.ndarray:
        return np.asarray(x, dtype=dtype)

    def cast(self, x: Any, dtype: str) -> np.ndarray:
        return np.asarray(x).astype(dtype)

    def where(self, cond: Any, a: Any, b: Any) -> np.ndarray:
        return np.where(cond, a, b)

    def minimum(self, a: Any, b: Any) -> np.ndarray:
        return np.minimum(a, b)

    def maximum(self, a: Any, b: Any) -> np.ndarray:
        return np.maximum(a, b)

    def sqrt(self, x: Any) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return np.sqrt(x)

    def floor(self, x: Any) -> np.ndarray:
        return np.floor(x)

    def isfinite(self, x: Any) -> np.ndarray:
        return np.isfinite(x)

    def ones_like(self, x: Any) -> np.ndarray:
        return np.ones_like(x)

    def logical_and(self, a: Any, b: Any) -> np.ndarray:
        return np.logical_and(a, b)

    def logical_or(self, a: Any, b: Any) -> np.ndarray:
        return np.logical_or(a, b)

    def logical_not(self, a: Any) -> np.ndarray:
        return np.logical_not(a)

    def equal(self, a: Any, b: Any) -> np.ndarray:
        return np.equal(a, b)

    def sum(self, x: Any) -> np.ndarray:
        return np.sum(x)

    def sort(self, x: Any) -> np.ndarray:
        return np.sort(x)

    def take(self, x: Any, i: Any) -> np.ndarray:
        return np.asarray(x)[int(i)]

    def put(self, x: Any, i: Any, v: Any) -> np.ndarray:
        y = np.array(x, copy=True)
        y[int(i)] = v
        return y


#: The host implementation every core path uses.
NUMPY = NumpyOps()
