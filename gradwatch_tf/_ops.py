"""The core's array-ops layer on TensorFlow tensors.

With these, the clipping policies of :mod:`gradwatch.policies` run inside the user's
traced step (``tf.function``, XLA) as written, on float64 scalars and fixed-shape
buffers: there is no TensorFlow twin of any policy.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

__all__ = ["TF", "TF_TENSORS", "TfOps", "TfTensors"]

_DTYPES = {"float64": tf.float64, "int64": tf.int64, "bool": tf.bool}


def _pair(a: Any, b: Any) -> tuple[Any, Any]:
    """Give a Python number the dtype of the tensor it meets (tf.where does not)."""
    if isinstance(a, (tf.Tensor, tf.Variable)) and not isinstance(b, (tf.Tensor, tf.Variable)):
        b = tf.cast(b, a.dtype)
    elif isinstance(b, (tf.Tensor, tf.Variable)) and not isinstance(a, (tf.Tensor, tf.Variable)):
        a = tf.cast(a, b.dtype)
    return a, b


class TfOps:
    """:class:`gradwatch.ArrayOps` for TensorFlow (graph mode and XLA)."""

    name = "tensorflow"

    def asarray(self, x: Any, dtype: str) -> tf.Tensor:
        return tf.cast(x, _DTYPES[dtype]) if isinstance(x, (tf.Tensor, tf.Variable)) else tf.constant(x, _DTYPES[dtype])

    def cast(self, x: Any, dtype: str) -> tf.Tensor:
        return tf.cast(x, _DTYPES[dtype])

    def where(self, cond: Any, a: Any, b: Any) -> tf.Tensor:
        a, b = _pair(a, b)
        return tf.where(cond, a, b)

    def minimum(self, a: Any, b: Any) -> tf.Tensor:
        return tf.minimum(*_pair(a, b))

    def maximum(self, a: Any, b: Any) -> tf.Tensor:
        return tf.maximum(*_pair(a, b))

    def sqrt(self, x: Any) -> tf.Tensor:
        return tf.sqrt(x)

    def floor(self, x: Any) -> tf.Tensor:
        return tf.floor(x)

    def isfinite(self, x: Any) -> tf.Tensor:
        return tf.math.is_finite(x)

    def ones_like(self, x: Any) -> tf.Tensor:
        return tf.ones_like(x)

    def logical_and(self, a: Any, b: Any) -> tf.Tensor:
        return tf.logical_and(a, b)

    def logical_or(self, a: Any, b: Any) -> tf.Tensor:
        return tf.logical_or(a, b)

    def logical_not(self, a: Any) -> tf.Tensor:
        return tf.logical_not(a)

    def equal(self, a: Any, b: Any) -> tf.Tensor:
        return tf.equal(*_pair(a, b))

    def sum(self, x: Any) -> tf.Tensor:
        return tf.reduce_sum(x)

    def sort(self, x: Any) -> tf.Tensor:
        return tf.sort(x)

    def take(self, x: Any, i: Any) -> tf.Tensor:
        return tf.gather(x, i)

    def put(self, x: Any, i: Any, v: Any) -> tf.Tensor:
        return tf.tensor_scatter_nd_update(x, tf.reshape(tf.cast(i, tf.int64), [1, 1]), tf.reshape(tf.cast(v, x.dtype), [1]))


#: The TensorFlow implementation every in-graph policy runs with.
TF = TfOps()


class TfTensors:
    """The through-time engine's :class:`~gradwatch.through_time.ops.TensorOps` on
    TensorFlow tensors (graph mode and XLA): its shared rules run in the traced step."""

    name = "tensorflow"

    def exp(self, x: Any) -> tf.Tensor:
        return tf.exp(x)

    def log(self, x: Any) -> tf.Tensor:
        return tf.math.log(x)

    def sort(self, x: Any, axis: int) -> tf.Tensor:
        return tf.sort(x, axis=axis)

    def amax(self, x: Any, axis: int) -> tf.Tensor:
        return tf.reduce_max(x, axis=axis)

    def cumsum(self, x: Any, axis: int) -> tf.Tensor:
        return tf.cumsum(x, axis=axis)

    def flip(self, x: Any, axis: int) -> tf.Tensor:
        return tf.reverse(x, [axis])

    def logsumexp(self, x: Any, axis: int) -> tf.Tensor:
        return tf.reduce_logsumexp(x, axis=axis)

    def where(self, cond: Any, a: Any, b: Any) -> tf.Tensor:
        return tf.where(cond, a, b)

    def concat(self, xs: list[Any], axis: int) -> tf.Tensor:
        return tf.concat(xs, axis)

    def zeros_like(self, x: Any) -> tf.Tensor:
        return tf.zeros_like(x)


#: The engine's tensor operations in TensorFlow.
TF_TENSORS = TfTensors()
