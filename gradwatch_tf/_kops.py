"""The core's array-ops layer on ``keras.ops``: the policies of :mod:`gradwatch.policies`
run inside the compiled step of any Keras backend (jit on JAX, eager or compiled torch)
as written, with no twin of any policy.

On JAX without ``jax_enable_x64`` there is no float64 or int64: "float64" is then the
widest float the backend has (float32) and "int64" is int32; the tests compare at that
precision.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

__all__ = ["KERAS_OPS", "KERAS_TENSORS", "KerasOps", "KerasTensors", "widest"]


def widest(dtype: str) -> str:
    """``dtype`` as the backend can hold it (float64/int64 need x64 on JAX)."""
    if keras.backend.backend() == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            return {"float64": "float32", "int64": "int32"}.get(dtype, dtype)
    return dtype


def _is_tensor(x: Any) -> bool:
    return not isinstance(x, (int, float, bool)) and hasattr(x, "dtype")


def _pair(a: Any, b: Any) -> tuple[Any, Any]:
    """Give a Python number the dtype of the tensor it meets (and two tensors one dtype)."""
    if _is_tensor(a) and not _is_tensor(b):
        b = ops.cast(b, keras.backend.standardize_dtype(a.dtype))
    elif _is_tensor(b) and not _is_tensor(a):
        a = ops.cast(a, keras.backend.standardize_dtype(b.dtype))
    return a, b


class KerasOps:
    """:class:`gradwatch.ArrayOps` on ``keras.ops`` (every Keras backend)."""

    name = "keras"

    def asarray(self, x: Any, dtype: str) -> Any:
        return ops.cast(x, widest(dtype)) if _is_tensor(x) else ops.convert_to_tensor(x, dtype=widest(dtype))

    def cast(self, x: Any, dtype: str) -> Any:
        return ops.cast(x, widest(dtype))

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return ops.where(cond, *_pair(a, b))

    def minimum(self, a: Any, b: Any) -> Any:
        return ops.minimum(*_pair(a, b))

    def maximum(self, a: Any, b: Any) -> Any:
        return ops.maximum(*_pair(a, b))

    def sqrt(self, x: Any) -> Any:
        return ops.sqrt(x)

    def floor(self, x: Any) -> Any:
        return ops.floor(x)

    def isfinite(self, x: Any) -> Any:
        return ops.isfinite(x)

    def ones_like(self, x: Any) -> Any:
        return ops.ones_like(x)

    def logical_and(self, a: Any, b: Any) -> Any:
        return ops.logical_and(a, b)

    def logical_or(self, a: Any, b: Any) -> Any:
        return ops.logical_or(a, b)

    def logical_not(self, a: Any) -> Any:
        return ops.logical_not(a)

    def equal(self, a: Any, b: Any) -> Any:
        return ops.equal(*_pair(a, b))

    def sum(self, x: Any) -> Any:
        return ops.sum(x)

    def sort(self, x: Any) -> Any:
        return ops.sort(x)

    def take(self, x: Any, i: Any) -> Any:
        return ops.take(x, ops.cast(i, "int32"))

    def put(self, x: Any, i: Any, v: Any) -> Any:
        i = ops.reshape(ops.cast(i, "int32"), (1, 1))
        return ops.scatter_update(x, i, ops.reshape(ops.cast(v, keras.backend.standardize_dtype(x.dtype)), (1,)))


#: The implementation every in-step policy runs with on a non-TensorFlow backend.
KERAS_OPS = KerasOps()


class KerasTensors:
    """The through-time engine's :class:`~gradwatch.through_time.ops.TensorOps` on
    ``keras.ops``: the engine's aggregate over probed sequences runs as written on the
    JAX and torch Keras replay."""

    def exp(self, x: Any) -> Any:
        return ops.exp(x)

    def log(self, x: Any) -> Any:
        return ops.log(x)

    def sort(self, x: Any, axis: int) -> Any:
        return ops.sort(x, axis=axis)

    def amax(self, x: Any, axis: int) -> Any:
        return ops.max(x, axis=axis)

    def cumsum(self, x: Any, axis: int) -> Any:
        return ops.cumsum(x, axis=axis)

    def flip(self, x: Any, axis: int) -> Any:
        return ops.flip(x, axis=axis)

    def logsumexp(self, x: Any, axis: int) -> Any:
        return ops.logsumexp(x, axis=axis)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return ops.where(cond, a, b)

    def concat(self, xs: list[Any], axis: int) -> Any:
        return ops.concatenate(xs, axis=axis)

    def zeros_like(self, x: Any) -> Any:
        return ops.zeros_like(x)


#: The engine's tensor operations in ``keras.ops``.
KERAS_TENSORS = KerasTensors()
