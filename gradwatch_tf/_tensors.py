"""In-graph maths: gradient norms, unit-wise norms, spectral norms (iterated to a tolerance).

Everything here runs inside the user's ``tf.function`` (and under XLA), so it uses only
static shapes, ``tf.where`` instead of Python branches on tensors, and ``tf.Variable``\\ s
for state. (The clipping policies are not here: the core's own definitions run in graph
with :mod:`gradwatch_tf._ops`.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

__all__ = ["FUSE_MAX_NUMEL", "FUSE_MAX_TOTAL", "SPECTRAL_MAX_ITER", "SPECTRAL_TOL", "all_finite", "grad_stats", "power_iteration", "power_iterations", "runner_up_start", "scale", "squared_norm", "summed_rows", "top_right_singular_vector", "unit_axes", "unitwise_norm"]


def summed_rows(g: tf.IndexedSlices) -> tf.Tensor:
    """The rows of an ``IndexedSlices`` gradient with repeated indices summed, as the dense
    gradient has them (an ``Embedding`` looked up twice with one id gets two slices whose
    SUM is that row's gradient: the norm of the slices themselves is wrong), without
    densifying to the variable's shape.

    Static shapes only, so it also runs under XLA (``tf.unique`` has a dynamic output):
    sort the indices, number the runs of equal ones, and segment-sum into as many rows as
    there are slices; the rows past the number of distinct indices are zero, which
    changes no norm, finiteness or unit-wise norm.
    """
    idx = g.indices
    order = tf.argsort(idx, stable=True)
    s = tf.gather(idx, order)
    previous = tf.concat([s[:1] - 1, s[:-1]], 0)  # differs from s at every run's start
    run = tf.cumsum(tf.cast(tf.not_equal(s, previous), tf.int32)) - 1
    return tf.math.unsorted_segment_sum(tf.gather(g.values, order), run, tf.shape(idx)[0])


def squared_norm(g: tf.Tensor) -> tf.Tensor:
    """Sum of squares of a gradient in float32, as float64 (one scalar per variable)."""
    if isinstance(g, tf.IndexedSlices):
        g = summed_rows(g)
    return tf.cast(tf.reduce_sum(tf.square(tf.cast(g, tf.float32))), tf.float64)


#: Dense gradients of at most this many elements are measured together (issue 18) ...
#: Only tiny ones pay: the segment sums cost several ns an element against a reduction's
#: fraction of one, so past about a thousand elements a gradient's own two ops are
#: cheaper (an LSTM(128) pair's gradients, 205K elements: 2.2 ms fused at 64K a tensor,
#: 0.2 ms at 1K; an LSTM(64)'s: 0.2-0.3 ms against 0.04 ms; graph calls timed in a loop).
FUSE_MAX_NUMEL = 1 << 10
#: ... up to this many elements in all (the segment ids are a constant of the graph).
FUSE_MAX_TOTAL = 1 << 20


def _fusable(g: Any) -> bool:
    if g is None or isinstance(g, tf.IndexedSlices) or not g.dtype.is_floating:
        return False
    shape = g.shape
    return shape.is_fully_defined() and shape.num_elements() <= FUSE_MAX_NUMEL


def grad_stats(grads: list[Any]) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
    """Squared norm (float64 scalar) and finiteness (bool scalar) of each gradient; a
    None gradient is 0.0 and finite.

    Why fused: TensorFlow's executor runs a graph op by op, a few µs each, so five ops per
    gradient are a fixed cost per step that a small model's step (9 ms for an LSTM(64))
    feels. The small dense gradients are flattened into one buffer and reduced by one
    segment sum (their squares in float32, as :func:`squared_norm` squares them, summed
    in float64); finiteness is a second segment sum of the buffer times zero, which is
    NaN exactly for a segment holding a NaN or an Inf (and cannot overflow). Large or
    sparse gradients keep their own ops (copying them would cost more than it saves).
    """
    sq: list[Any] = [None] * len(grads)
    fin: list[Any] = [None] * len(grads)
    small = [j for j, g in enumerate(grads) if _fusable(g)]
    sizes = [int(grads[j].shape.num_elements()) for j in small]
    if len(small) >= 2 and sum(sizes) <= FUSE_MAX_TOTAL:
        k = len(small)
        flat = tf.concat([tf.reshape(tf.cast(grads[j], tf.float32), [-1]) for j in small], 0)
        ids = tf.constant(np.repeat(np.arange(k, dtype=np.int32), sizes))
        sums = tf.math.unsorted_segment_sum(tf.cast(tf.square(flat), tf.float64), ids, k)
        ok = tf.logical_not(tf.math.is_nan(tf.math.unsorted_segment_sum(flat * 0.0, ids, k)))
        for j, s, f in zip(small, tf.unstack(sums), tf.unstack(ok)):
            sq[j], fin[j] = s, f
    for j, g in enumerate(grads):
        if sq[j] is None:
            sq[j] = squared_norm(g) if g is not None else tf.constant(0.0, tf.float64)
            fin[j] = _finite(g) if g is not None else tf.constant(True)
    return sq, fin


def _finite(g: Any) -> tf.Tensor:
    """:func:`all_finite`, for a dense gradient as the sum of the gradient times zero (NaN
    exactly when an element is NaN or Inf, and it cannot overflow): two vectorised ops and
    no boolean copy of the gradient."""
    if isinstance(g, tf.IndexedSlices) or not g.dtype.is_floating:
        return all_finite(g)
    return tf.math.is_finite(tf.reduce_sum(g * tf.zeros([], g.dtype)))


def all_finite(g: tf.Tensor) -> tf.Tensor:
    if isinstance(g, tf.IndexedSlices):
        g = summed_rows(g)  # two finite slices of one row may sum to Inf
    return tf.reduce_all(tf.math.is_finite(g))


def unit_axes(ndim: int) -> list[int] | None:
    """Axes reduced for a unit-wise norm of a Keras weight.

    Keras kernels are (in, out) (Dense, recurrent kernels) or (..., in, out) (conv), so
    a unit (output neuron) is a slice along the LAST axis: reduce every other axis.
    Vectors and scalars (biases, gains) are one unit: reduce everything (None).
    """
    if ndim <= 1:
        return None
    return list(range(ndim - 1))


def unitwise_norm(x: tf.Tensor) -> tf.Tensor:
    """L2 norm of each unit (a column of a Keras ``(in, out)`` kernel), broadcastable to
    ``x``: the norm AGC compares between weights and gradient (Brock et al. 2021)."""
    x = tf.cast(x, tf.float32)
    axes = unit_axes(x.shape.rank)
    if axes is None:
        return tf.ones_like(x) * tf.sqrt(tf.reduce_sum(tf.square(x)))
    return tf.sqrt(tf.reduce_sum(tf.square(x), axis=axes, keepdims=True))


#: Stop iterating when the Rayleigh quotient (sigma^2) changes by less than this,
#: relatively, in one iteration.
SPECTRAL_TOL = 1e-7
#: ... or after this many iterations.
SPECTRAL_MAX_ITER = 500


def power_iteration(w: tf.Tensor, v: tf.Variable, second: tf.Variable | None = None, *, tol: float = SPECTRAL_TOL, max_iter: int = SPECTRAL_MAX_ITER) -> tf.Tensor:
    """Largest singular value of ``w``, iterated to a tolerance from a warm start.

    Orthogonal iteration on W^T W with two vectors (``v``, the previous top right singular
    vector, and ``second``, the previous runner-up; a random one when None), in float64,
    with a 2 x 2 Rayleigh-Ritz step each iteration, until the top Ritz value (sigma^2)
    changes by less than ``tol`` relatively (at most ``max_iter`` iterations). Why this
    and not two warm iterations: at a high learning rate the kernel moves far between
    profiles and two iterations lagged by up to 29%; here the error is below 1e-3 of
    sigma unless the top two singular values are within a fraction of a percent of each
    other (then either is within that fraction). Two vectors rather than one: when the
    top two singular values swap between profiles, the old top vector is the new runner-
    up, and a single vector would stall near the second value. Measured on a random
    256 x 256 block (a hard case: its top singular values are close): about 1 ms when the
    weights did not move, 8 ms after a 10% change, 15 ms after a 50% change, within 1e-6
    of numpy's SVD each time. The vectors are written back for the next profile; the
    exact value (``numpy.linalg.norm(w, 2)``) is the reference of the tests.
    """
    w = tf.cast(w, tf.float64)
    n = int(w.shape[1])
    x1 = tf.cast(v.read_value(), tf.float64)
    if second is not None:
        x2 = tf.cast(second.read_value(), tf.float64)
    else:
        x2 = tf.random.stateless_normal([n], seed=[20131, 7], dtype=tf.float64)
    q, _ = tf.linalg.qr(tf.stack([x1, x2], axis=1))  # [n, 2] orthonormal

    def ritz(q: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """W^T W q, and the top Ritz value and vector (in q's basis) of W^T W on span(q)."""
        y = tf.matmul(w, q)
        m = tf.matmul(y, y, transpose_a=True)  # 2 x 2, symmetric
        a, b, d = m[0, 0], m[0, 1], m[1, 1]
        lam = 0.5 * (a + d) + tf.sqrt(tf.square(0.5 * (a - d)) + tf.square(b))
        e1 = tf.stack([lam - d, b])
        e2 = tf.stack([b, lam - a])
        e = tf.where(tf.norm(e1) >= tf.norm(e2), e1, e2)
        e = tf.where(tf.norm(e) > 0, e / tf.maximum(tf.norm(e), 1e-300), tf.constant([1.0, 0.0], tf.float64))
        return tf.matmul(w, y, transpose_a=True), lam, e

    def body(i: tf.Tensor, q: tf.Tensor, prev: tf.Tensor, lam: tf.Tensor) -> Any:
        z, new, _ = ritz(q)
        q, _ = tf.linalg.qr(z)
        return i + 1, q, lam, new

    def more(i: tf.Tensor, q: tf.Tensor, prev: tf.Tensor, lam: tf.Tensor) -> tf.Tensor:
        moving = tf.abs(lam - prev) > tol * tf.abs(lam)
        return tf.logical_and(i < max_iter, tf.logical_or(i < 2, moving))

    zero = tf.constant(0.0, tf.float64)
    _, q, _, _ = tf.while_loop(more, body, (tf.constant(0), q, zero, zero), maximum_iterations=max_iter)
    _, lam, e = ritz(q)
    top = tf.linalg.matvec(q, e)
    runner_up = tf.linalg.matvec(q, tf.stack([-e[1], e[0]]))
    writes = [v.assign(tf.cast(top, v.dtype))]
    if second is not None:
        writes.append(second.assign(tf.cast(runner_up, second.dtype)))
    with tf.control_dependencies(writes):
        return tf.identity(tf.cast(tf.sqrt(tf.maximum(lam, 0.0)), tf.float32))


def power_iterations(
    ws: list[tf.Tensor],
    vs: list[tf.Variable],
    seconds: list[tf.Variable | None],
    *,
    tol: float = SPECTRAL_TOL,
    max_iter: int = SPECTRAL_MAX_ITER,
) -> list[tf.Tensor]:
    """:func:`power_iteration` of several blocks of one shape in ONE batched ``while`` loop.

    Why: an LSTM has four gate blocks, and four loops (QR and a 2 x 2 Rayleigh-Ritz step
    inside each) are four times the graph to trace and optimise in the first ``fit``
    (measured: the spectral norms were about 0.85 unwatched first fits of CPU time on
    TensorFlow). Each block keeps its own stopping rule: a block whose Ritz value has
    settled (or that reached ``max_iter``) is frozen (``tf.where``) while the others go
    on, and a frozen block never moves again, so each block's iterates and its count are
    those of its own :func:`power_iteration`.
    """
    w = tf.cast(tf.stack(ws), tf.float64)  # [k, r, n]
    n = int(w.shape[2])
    x1 = tf.stack([tf.cast(v.read_value(), tf.float64) for v in vs])
    x2 = tf.stack(
        [
            tf.cast(s.read_value(), tf.float64)
            if s is not None
            else tf.random.stateless_normal([n], seed=[20131, 7], dtype=tf.float64)
            for s in seconds
        ]
    )
    q, _ = tf.linalg.qr(tf.stack([x1, x2], axis=2))  # [k, n, 2] orthonormal columns

    def ritz(q: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        y = tf.matmul(w, q)
        m = tf.matmul(y, y, transpose_a=True)  # [k, 2, 2], symmetric
        a, b, d = m[:, 0, 0], m[:, 0, 1], m[:, 1, 1]
        lam = 0.5 * (a + d) + tf.sqrt(tf.square(0.5 * (a - d)) + tf.square(b))
        e1 = tf.stack([lam - d, b], axis=1)
        e2 = tf.stack([b, lam - a], axis=1)
        e = tf.where((tf.norm(e1, axis=1) >= tf.norm(e2, axis=1))[:, None], e1, e2)
        ne = tf.norm(e, axis=1, keepdims=True)
        e = tf.where(ne > 0, e / tf.maximum(ne, 1e-300), tf.constant([[1.0, 0.0]], tf.float64))
        return tf.matmul(w, y, transpose_a=True), lam, e

    def moving(i: tf.Tensor, prev: tf.Tensor, lam: tf.Tensor) -> tf.Tensor:
        settled = tf.abs(lam - prev) <= tol * tf.abs(lam)
        return tf.logical_and(i < max_iter, tf.logical_or(i < 2, tf.logical_not(settled)))

    def body(i: tf.Tensor, q: tf.Tensor, prev: tf.Tensor, lam: tf.Tensor) -> Any:
        go = moving(i, prev, lam)
        z, new, _ = ritz(q)
        q_next, _ = tf.linalg.qr(z)
        return i + 1, tf.where(go[:, None, None], q_next, q), tf.where(go, lam, prev), tf.where(go, new, lam)

    def more(i: tf.Tensor, q: tf.Tensor, prev: tf.Tensor, lam: tf.Tensor) -> tf.Tensor:
        return tf.reduce_any(moving(i, prev, lam))

    zeros = tf.zeros([len(ws)], tf.float64)
    _, q, _, _ = tf.while_loop(more, body, (tf.constant(0), q, zeros, zeros), maximum_iterations=max_iter)
    _, lam, e = ritz(q)
    top = tf.einsum("kni,ki->kn", q, e)
    runner_up = tf.einsum("kni,ki->kn", q, tf.stack([-e[:, 1], e[:, 0]], axis=1))
    writes = [v.assign(tf.cast(top[j], v.dtype)) for j, v in enumerate(vs)]
    writes += [s.assign(tf.cast(runner_up[j], s.dtype)) for j, s in enumerate(seconds) if s is not None]
    with tf.control_dependencies(writes):
        sigma = tf.identity(tf.cast(tf.sqrt(tf.maximum(lam, 0.0)), tf.float32))
    return tf.unstack(sigma)


def runner_up_start(top: np.ndarray) -> np.ndarray:
    """A unit vector orthogonal to ``top``: the power iteration's second start vector."""
    t = np.asarray(top, np.float64)
    x: np.ndarray = np.random.default_rng(0).standard_normal((t.shape[0],))
    x = x - t * float(t @ x) / max(float(t @ t), 1e-30)
    out: np.ndarray = (x / max(float(np.linalg.norm(x)), 1e-30)).astype(np.float32)
    return out


def top_right_singular_vector(w: np.ndarray) -> np.ndarray:
    """Exact warm start, computed once on the host when a watch attaches."""
    _, _, vt = np.linalg.svd(np.asarray(w, dtype=np.float64), full_matrices=False)
    return vt[0].astype(np.float32)


def scale(g: Any, factor: tf.Tensor) -> Any:
    """``g * factor`` in g's dtype; IndexedSlices keep their sparsity."""
    if isinstance(g, tf.IndexedSlices):
        return tf.IndexedSlices(g.values * tf.cast(factor, g.values.dtype), g.indices, g.dense_shape)
    return g * tf.cast(factor, g.dtype)
