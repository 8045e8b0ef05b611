"""In-graph maths: gradient norms, unit-wise norms, the clipping policies, power iteration.

Everything here runs inside the user's ``tf.function`` (and under XLA), so it uses only
static shapes, ``tf.where`` instead of Python branches on tensors, and ``tf.Variable``\\ s
for state. The policies mirror the numpy reference in :mod:`gradwatch.policies` line by
line (same constants, same order of operations) and are tested against it on the same
norm sequences; their state is kept in float64 so the comparison is exact to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

#: Added to the norm before dividing (as ``clip_grad_norm_`` and gradwatch.policies do).
CLIP_EPS = 1e-6
#: In-graph AutoClip keeps at most this many norms when ``history=None`` (the numpy
#: reference keeps all of them). A percentile over the last 8192 steps differs from the
#: all-time one only on runs long enough for the norm distribution to drift, and a
#: fixed-size buffer is what XLA needs. Sorting it costs about 0.1 ms a step on a CPU core.
AUTOCLIP_CAPACITY = 8192

VariableFactory = Callable[..., tf.Variable]


def plain_variable(initial: Any, dtype: tf.DType, name: str) -> tf.Variable:
    """A non-trainable variable outside any strategy (the default factory)."""
    return tf.Variable(initial, dtype=dtype, trainable=False, name=name)


def squared_norm(g: tf.Tensor) -> tf.Tensor:
    """Sum of squares of a gradient in float32, as float64 (one scalar per variable)."""
    if isinstance(g, tf.IndexedSlices):
        g = g.values
    return tf.cast(tf.reduce_sum(tf.square(tf.cast(g, tf.float32))), tf.float64)


def all_finite(g: tf.Tensor) -> tf.Tensor:
    if isinstance(g, tf.IndexedSlices):
        g = g.values
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
    """Tensor twin of ``gradwatch._numerics.unitwise_norm(x, unit_axis=-1)``."""
    x = tf.cast(x, tf.float32)
    axes = unit_axes(x.shape.rank)
    if axes is None:
        return tf.ones_like(x) * tf.sqrt(tf.reduce_sum(tf.square(x)))
    return tf.sqrt(tf.reduce_sum(tf.square(x), axis=axes, keepdims=True))


def agc_factor(param: tf.Tensor, grad_for_norm: tf.Tensor, clip_factor: float, eps: float) -> tf.Tensor:
    """Per-unit factor of ``gradwatch._numerics.agc_clip`` (Brock et al. 2021, eq. 3).

    ``grad_for_norm`` is the gradient whose unit norms decide (the all-reduced one under a
    distribution strategy); the factor, being linear, is then applied to each replica's
    share, which keeps the summed gradient exactly the clipped global one.
    """
    p_norm = tf.maximum(unitwise_norm(param), eps)
    g_norm = unitwise_norm(grad_for_norm)
    max_norm = clip_factor * p_norm
    return tf.where(g_norm > max_norm, max_norm / tf.maximum(g_norm, 1e-6), tf.ones_like(g_norm))


def _clip_scale(threshold: tf.Tensor, norm: tf.Tensor) -> tf.Tensor:
    """``gradwatch.policies.clip_scale``: 1 if norm <= threshold, else threshold / (norm + 1e-6)."""
    one = tf.constant(1.0, tf.float64)
    return tf.where(norm <= threshold, one, tf.minimum(one, threshold / (norm + CLIP_EPS)))


class GraphPolicy:
    """A clipping policy whose state lives in ``tf.Variable``\\ s.

    ``decide(norm)`` (float64 scalar tensor, possibly non-finite) returns
    ``(threshold, scale)`` float64 tensors and updates the state in-graph exactly as the
    reference ``update(norm)`` does. ``state_dict``/``load_state_dict`` use the reference
    policy's JSON layout so a state can move between backends and the core.
    """

    name = ""
    unitwise = False

    def __init__(self, ref: Any, make: VariableFactory = plain_variable) -> None:
        """``ref`` is the core policy object whose parameters this twin copies."""

    def decide(self, norm: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError


class GraphFixedNorm(GraphPolicy):
    """Pascanu et al. 2013: scale = max_norm / (norm + 1e-6) above max_norm, else 1 (also
    for a non-finite norm)."""

    name = "fixed"

    def __init__(self, ref: Any, make: VariableFactory = plain_variable) -> None:
        self.max_norm = float(ref.max_norm)

    def decide(self, norm: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        thr = tf.constant(self.max_norm, tf.float64)
        finite = tf.math.is_finite(norm)
        safe = tf.where(finite, norm, tf.zeros_like(norm))
        return thr, tf.where(finite, _clip_scale(thr, safe), tf.ones_like(norm))

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.name, "version": 1, "max_norm": self.max_norm}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.max_norm = float(state["max_norm"])


class GraphAutoClip(GraphPolicy):
    """Seetharaman et al. 2020: threshold = p-th percentile (linear interpolation) of the
    norms seen so far, the current one included.

    The norms sit in a ring of ``history`` slots (``AUTOCLIP_CAPACITY`` when
    ``history=None``); empty slots hold +inf so one static-shape sort puts the valid
    norms first.
    """

    name = "autoclip"

    def __init__(self, ref: Any, make: VariableFactory = plain_variable) -> None:
        self.percentile = float(ref.percentile)
        self.history = ref.history
        self.capacity = int(ref.history) if ref.history is not None else AUTOCLIP_CAPACITY
        self.buf = make(np.full([self.capacity], np.inf), tf.float64, "gradwatch_autoclip_norms")
        self.n = make(0, tf.int64, "gradwatch_autoclip_count")

    def _threshold(self, buf: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
        w = tf.minimum(n, self.capacity)
        s = tf.sort(buf)
        pos = tf.cast(w - 1, tf.float64) * (self.percentile / 100.0)
        lo = tf.cast(tf.floor(pos), tf.int64)
        hi = tf.minimum(lo + 1, w - 1)
        frac = pos - tf.cast(lo, tf.float64)
        lo_v = tf.gather(s, tf.maximum(lo, 0))
        hi_v = tf.gather(s, tf.maximum(hi, 0))
        thr = lo_v + (hi_v - lo_v) * frac
        return tf.where(w > 0, thr, tf.constant(math.inf, tf.float64))

    def decide(self, norm: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        finite = tf.math.is_finite(norm)
        n = self.n.read_value()
        slot = tf.math.floormod(n, self.capacity)
        pushed = tf.tensor_scatter_nd_update(self.buf.read_value(), tf.reshape(slot, [1, 1]), tf.reshape(norm, [1]))
        new_buf = tf.where(finite, pushed, self.buf.read_value())
        new_n = tf.where(finite, n + 1, n)
        thr = self._threshold(new_buf, new_n)
        safe = tf.where(finite, norm, tf.zeros_like(norm))
        scale = tf.where(finite, _clip_scale(thr, safe), tf.ones_like(norm))
        with tf.control_dependencies([self.buf.assign(new_buf), self.n.assign(new_n)]):
            return tf.identity(thr), tf.identity(scale)

    def state_dict(self) -> dict[str, Any]:
        buf = self.buf.numpy()
        n = int(self.n.numpy())
        w = min(n, self.capacity)
        start = n - w
        norms = [float(buf[(start + i) % self.capacity]) for i in range(w)]
        return {
            "policy": self.name,
            "version": 1,
            "percentile": self.percentile,
            "history": self.history,
            "norms": norms,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        norms = [float(v) for v in state["norms"]][-self.capacity :]
        buf = np.full([self.capacity], np.inf)
        buf[: len(norms)] = norms
        self.buf.assign(buf)
        self.n.assign(len(norms))


class GraphZClip(GraphPolicy):
    """Kumar et al. 2025 (ZClip), the reciprocal rule, as :class:`gradwatch.policies.ZClip`."""

    name = "zclip"

    def __init__(self, ref: Any, make: VariableFactory = plain_variable) -> None:
        self.alpha = float(ref.alpha)
        self.z = float(ref.z_threshold)
        self.warmup = int(ref.warmup)
        self.max_norm = None if ref.max_norm is None else float(ref.max_norm)
        self.seen = make(0, tf.int64, "gradwatch_zclip_seen")
        self.buf = make(np.zeros([self.warmup]), tf.float64, "gradwatch_zclip_warmup")
        self.mean = make(0.0, tf.float64, "gradwatch_zclip_mean")
        self.var = make(0.0, tf.float64, "gradwatch_zclip_var")

    def decide(self, norm: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        f64 = tf.float64
        cap = tf.constant(math.inf if self.max_norm is None else self.max_norm, f64)
        one = tf.constant(1.0, f64)
        finite = tf.math.is_finite(norm)
        x_in = tf.where(finite, norm, tf.zeros_like(norm))
        seen = self.seen.read_value()
        mean = self.mean.read_value()
        var = self.var.read_value()
        buf = self.buf.read_value()
        in_warmup = seen < self.warmup

        # Warm-up branch: collect; on the last warm-up step, mean and population variance.
        wbuf = tf.tensor_scatter_nd_update(
            buf, tf.reshape(tf.minimum(seen, self.warmup - 1), [1, 1]), tf.reshape(x_in, [1])
        )
        w_mean = tf.reduce_sum(wbuf) / self.warmup
        w_var = tf.reduce_sum(tf.square(wbuf - w_mean)) / self.warmup
        done = tf.equal(seen + 1, self.warmup)
        warm_mean = tf.where(done, w_mean, mean)
        warm_var = tf.where(done, w_var, var)
        warm_scale = _clip_scale(cap, x_in) if self.max_norm is not None else one

        # Steady branch.
        std = tf.sqrt(var)
        z = (x_in - mean) / (std + CLIP_EPS)
        spike = z > self.z
        safe_z = tf.where(spike, z, one)
        thr = tf.where(spike, mean + self.z * self.z * std / safe_z, mean + self.z * std)
        thr = tf.minimum(thr, cap)
        st_scale = _clip_scale(thr, x_in)
        xc = tf.minimum(x_in, thr)
        st_mean = self.alpha * mean + (1.0 - self.alpha) * xc
        st_var = self.alpha * var + (1.0 - self.alpha) * tf.square(xc - st_mean)

        # Threshold reported for a non-finite norm (state unchanged).
        cur_thr = tf.where(in_warmup, cap, tf.minimum(mean + self.z * std, cap))

        threshold = tf.where(finite, tf.where(in_warmup, cap, thr), cur_thr)
        scale = tf.where(finite, tf.where(in_warmup, warm_scale, st_scale), one)
        new_seen = tf.where(finite & in_warmup, seen + 1, seen)
        new_buf = tf.where(finite & in_warmup & ~done, wbuf, tf.where(finite & done, tf.zeros_like(buf), buf))
        new_mean = tf.where(finite, tf.where(in_warmup, warm_mean, st_mean), mean)
        new_var = tf.where(finite, tf.where(in_warmup, warm_var, st_var), var)
        with tf.control_dependencies(
            [self.seen.assign(new_seen), self.buf.assign(new_buf), self.mean.assign(new_mean), self.var.assign(new_var)]
        ):
            return tf.identity(threshold), tf.identity(scale)

    def state_dict(self) -> dict[str, Any]:
        seen = int(self.seen.numpy())
        buf = self.buf.numpy()
        return {
            "policy": self.name,
            "version": 1,
            "alpha": self.alpha,
            "z_threshold": self.z,
            "warmup": self.warmup,
            "max_norm": self.max_norm,
            "seen": seen,
            "buffer": [float(v) for v in buf[: seen if seen < self.warmup else 0]],
            "mean": float(self.mean.numpy()),
            "var": float(self.var.numpy()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        buf = np.zeros([self.warmup])
        vals = [float(v) for v in state["buffer"]]
        buf[: len(vals)] = vals
        self.seen.assign(int(state["seen"]))
        self.buf.assign(buf)
        self.mean.assign(float(state["mean"]))
        self.var.assign(float(state["var"]))


class GraphAGC(GraphPolicy):
    """Brock et al. 2021, unit-wise. Stateless; the clipping itself is in :func:`agc_factor`."""

    name = "agc"
    unitwise = True

    def __init__(self, ref: Any, make: VariableFactory = plain_variable) -> None:
        self.clip_factor = float(ref.clip_factor)
        self.eps = float(ref.eps)

    def decide(self, norm: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:  # pragma: no cover - unit-wise
        return tf.constant(self.clip_factor, tf.float64), tf.constant(1.0, tf.float64)

    def decision(self, before: tf.Tensor, after: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """As ``AGC.decision_from_norms``: scale = min(1, after / before), 1 if undefined."""
        ok = tf.math.is_finite(before) & tf.math.is_finite(after) & (before > 0)
        safe_before = tf.where(ok, before, tf.ones_like(before))
        scale = tf.where(ok, tf.minimum(tf.constant(1.0, tf.float64), after / safe_before), tf.ones_like(before))
        return tf.constant(self.clip_factor, tf.float64), scale

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.name, "version": 1, "clip_factor": self.clip_factor, "eps": self.eps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.clip_factor = float(state["clip_factor"])
        self.eps = float(state["eps"])


GRAPH_POLICIES: dict[str, type[GraphPolicy]] = {
    "fixed": GraphFixedNorm,
    "autoclip": GraphAutoClip,
    "zclip": GraphZClip,
    "agc": GraphAGC,
}


def graph_policy(ref: Any, make: VariableFactory = plain_variable) -> GraphPolicy | None:
    """The in-graph twin of a resolved core policy object, or None if there is none.

    A policy from a plugin that has no in-graph twin cannot run inside the graph; the
    caller then falls back to observing only and logs that once.
    """
    if ref is None:
        return None
    cls = GRAPH_POLICIES.get(getattr(ref, "name", ""))
    if cls is None:
        return None
    return cls(ref, make)


def power_iteration(w: tf.Tensor, v: tf.Variable, iters: int) -> tf.Tensor:
    """Largest singular value of ``w`` by power iteration on W^T W, warm-started from ``v``.

    ``v`` keeps the right singular vector between profiled steps, so one or two
    iterations per profile track a slowly changing kernel (FACTS: within ~3% after one
    step, at about 1 ms for 256 units).
    """
    w = tf.cast(w, tf.float32)
    x = v.read_value()
    for _ in range(iters):
        u = tf.linalg.matvec(w, x)
        x = tf.linalg.matvec(w, u, transpose_a=True)
        x = x / tf.maximum(tf.norm(x), 1e-30)
    sigma = tf.norm(tf.linalg.matvec(w, x))
    with tf.control_dependencies([v.assign(x)]):
        return tf.identity(sigma)


def top_right_singular_vector(w: np.ndarray) -> np.ndarray:
    """Exact warm start, computed once on the host when a watch attaches."""
    _, _, vt = np.linalg.svd(np.asarray(w, dtype=np.float64), full_matrices=False)
    return vt[0].astype(np.float32)


def stack_sq_norms(grads: Sequence[Any]) -> tf.Tensor:
    return tf.stack([squared_norm(g) if g is not None else tf.constant(0.0, tf.float64) for g in grads])
