"""Propagation through time in ``keras.ops``: one replay for every Keras backend.

What is measured (shared/API.md, "Through time"): for one direction of a recurrent
layer, per probed sequence (the first min(B, 8), :data:`gradwatch.through_time.plan.PROBED`)
and j = 0 .. T-1 steps back from the last *processed* step, the RMS gain
``||ds_T/ds_{T-j}||_F / sqrt(dim s)`` and the largest singular value of the same
product; the engine's rule (:func:`gradwatch.through_time.fit.aggregate_logs`: median of
the first, max of the second over the sequences) makes the contract's two profiles.

How (the method of :mod:`gradwatch_torch._sweeps`, in ``keras.ops`` so that the same
code runs inside ``jax.jit``, on torch, and on TensorFlow traced into the user's step by
:mod:`gradwatch_tf._propagation`, XLA included, and on numpy on the host while no compiled
replay is ready (:mod:`gradwatch_tf._knumpy`: ``ops`` here is ``keras.ops`` or numpy's);
backend code only where keras.ops has no common path: :func:`normal`, :func:`scan`, an
activation's derivative by autodiff):

* **Forward** (:func:`scan`): the probed sequences run again through the cell's own
  weights from what the layer's call saw (input, mask, initial state, and the cell's
  dropout masks of the call where the caller captured them), a masked step
  keeping its state (its Jacobian the identity), a reversed direction in its processing
  order. Each step leaves the factors of its Jacobian (:mod:`gradwatch_tf._kcells`).
* **Backward** (:func:`scan`, reversed): a block of probe rows carried from s_T back to
  s_1 through the closed-form VJPs; at every step the block's Gram matrix (its trace the
  Frobenius norm, its largest eigenvalue the largest singular value, ``ops.eigh`` once
  over all steps). Rows are rescaled every step, the log of the scale accumulated, so a
  gain of 1e-300 stays representable; the host receives logs and takes ``exp`` in float64.
* **Exact** for dim s <= 16 (:data:`~gradwatch.through_time.plan.EXACT_DIM`): the block
  is the identity. **Estimated** above (the torch backend's estimator, the plan's
  constants): the dominant directions at s_T, found by random tangents started 1, 4,
  16, ... and T-1 steps before the end (:func:`~gradwatch.through_time.plan.dominant_starts`)
  carried forward alongside the states, made orthonormal, counted exactly; and
  :func:`~gradwatch.through_time.plan.complement_probes` random orthonormal rows of their
  complement, weighted (dim s - k) / r (Hutchinson's estimator, deflated). The largest
  singular value is that of the block: a lower bound, tight because the block holds the
  dominant directions. Measured error against the float64 reference in
  tests/contract/test_contract_through_time.py (every Keras backend) and
  tests/tf/test_tf_propagation.py (inside fit).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradwatch.through_time.plan import EXACT_DIM, PROBED, complement_probes, dominant_starts
from gradwatch_tf._kcells import KCELLS
from gradwatch_tf._knumpy import backend, ops

__all__ = ["costs", "measure", "normal", "probed_count", "scan", "site_salt"]


def site_salt(layer: Any) -> int:
    """A layer's share of its replay's probe seeds, from its name: stable across runs, and
    the same on TensorFlow's path and the ``keras.ops`` one."""
    import zlib

    return zlib.crc32(str(layer.name).encode()) & 0xFFFF

_TINY = 1e-30


def normal(shape: tuple[int, ...], seed: Any) -> Any:
    """Standard normal float32 draws from an integer ``seed`` (a Python int or an int
    tensor, traced under ``jax.jit``): the user's random state is never touched.
    Backend code here only because ``keras.random`` takes no traced seed."""
    where = backend()
    if where == "jax":
        import jax

        return jax.random.normal(jax.random.PRNGKey(ops.cast(seed, "int32")), shape, "float32")
    if where == "tensorflow":
        import tensorflow as tf

        s = tf.cast(seed, tf.int64)
        return tf.random.stateless_normal(shape, seed=tf.stack([s, s // 7919 + 1]), dtype=tf.float32)
    rng = np.random.default_rng(int(ops.convert_to_numpy(seed)) % (2**63))
    return ops.convert_to_tensor(rng.standard_normal(shape).astype(np.float32))


def _parts(w: Any, u: int, parts: int) -> list[Any]:
    return [w[..., p * u : (p + 1) * u] for p in range(parts)]


def _unit_rows(w: Any) -> Any:
    return w / ops.sqrt(ops.maximum(ops.sum(w * w, axis=-1, keepdims=True), _TINY))


def _orthonormal(w: Any) -> Any:
    """Orthonormal rows spanning the rows of ``w`` [b, k, d] (QR)."""
    q, _ = ops.qr(ops.transpose(w, (0, 2, 1)))
    return ops.transpose(q, (0, 2, 1))


def scan(f: Any, init: Any, xs: Any, reverse: bool = False, ys: Any = None) -> tuple[Any, Any]:
    """``ops.scan`` (jax.lax.scan's contract), except on TensorFlow: Keras' TensorFlow
    ``scan`` stacks the per-step outputs in arrays shaped like the carry, so outputs of
    another structure fail. There one ``tf.while_loop`` writing TensorArrays whose element
    shapes ``ys`` gives (a tuple of shapes, one per output of ``f``, which returns a tuple
    of tensors, the batch None where the trace does not know it; None when ``f`` outputs
    nothing): declared rather than learnt from a peeled first step, which doubled the
    graph and its optimisation time in the first fit. The steps (``xs``' leading axis)
    are static."""
    if backend() != "tensorflow":
        return ops.scan(f, init, xs, reverse=reverse)  # type: ignore[no-any-return]
    import tensorflow as tf

    flat = tf.nest.flatten(xs)
    n = int(flat[0].shape[0])
    shapes = [] if ys is None else [tf.TensorShape(s) for s in ys]
    arrays0 = [tf.TensorArray(tf.float32, size=n, element_shape=s) for s in shapes]

    def body(i: Any, c: Any, arrays: list[Any]) -> Any:
        c, y = f(c, tf.nest.pack_sequence_as(xs, [x[i] for x in flat]))
        arrays = [a.write(i, v) for a, v in zip(arrays, y or ())]
        return (i - 1 if reverse else i + 1), c, arrays

    i0 = tf.constant(n - 1 if reverse else 0)
    cond = (lambda i, _c, _a: i >= 0) if reverse else (lambda i, _c, _a: i < n)
    _, carry, arrays = tf.while_loop(cond, body, (i0, init, arrays0), maximum_iterations=n)
    if ys is None:
        return carry, None
    stacked = [a.stack() for a in arrays]
    for v, s in zip(stacked, shapes):
        v.set_shape(tf.TensorShape([n]).concatenate(s))
    return carry, tuple(stacked)


def _cut(v: Any) -> Any:
    """What the call saw, for the probed sequences: float32, cut from any gradient."""
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return [_cut(t) for t in v]
    return ops.cast(ops.stop_gradient(ops.convert_to_tensor(v))[:PROBED], "float32")


def probed_count(batch: int | None) -> int:
    """The probed sequences an estimate's complement probes are sized for: min(B, PROBED)
    when the batch is known when traced; PROBED when it is not (TensorFlow retraces fit's
    last, smaller batch with an unknown size): then a batch under PROBED gets the probes
    per sequence of a full one (as TensorFlow's replay always did)."""
    return PROBED if batch is None else max(1, min(int(batch), PROBED))


def costs(directions: list[Any], feat: int, seq: int, probed: int) -> tuple[float, float]:
    """(one replay, one sequence's training): multiply-adds with the layers' kernels, from
    shapes, for the cost model of both Keras paths (TensorFlow's in-graph period and
    JAX/torch's host one). Training: forward and backward, 3 T (F + u) G u per sequence and
    direction. The replay of ``probed`` sequences, as :func:`measure` runs it: the input
    projection, the forward pass, and each step's vector products with the recurrent kernel:
    the k dominant tangents carried forward over all T steps, the k + r rows of the block
    carried back, and the short tangents' refinement (``REFINE_ROUNDS`` round trips over
    their last ``REFINE_STEPS`` steps); an exact state carries its dim rows back only.
    Measured (benchmarks/analysis.md): a TensorFlow LSTM(256) replay over 100 steps (input
    64) costs about 0.35 of a training step of batch 32 while this count says 1.34: the
    count errs on the expensive side (replays spaced further than the budget needs), never
    the cheap one."""
    replay = train = 0.0
    for layer in directions:
        model = KCELLS[type(layer.cell).__name__]
        u, g = int(layer.cell.units), model.gates
        dim = u * model.parts
        if dim <= EXACT_DIM or seq < 2:
            vectors = dim * seq
        else:
            offsets = dominant_starts(seq)
            k, r = len(offsets), complement_probes(probed)
            refine = 2 * REFINE_ROUNDS * min(max((o for o in offsets if o <= REFINE_STEPS), default=0), seq)
            vectors = k * seq + (k + r) * seq + k * refine
        train += 3.0 * seq * (feat + u) * g * u
        replay += probed * seq * feat * g * u + 2.0 * probed * seq * g * u * u + probed * vectors * g * u * u
    return replay, train


def measure(
    cell: Any,
    x: Any,
    mask: Any,
    states: list[Any] | None,
    *,
    backwards: bool,
    seed: Any,
    dropout: tuple[Any, Any] | None = None,
) -> tuple[Any, Any]:
    """Per-sequence logs [2, T, b] (row 0 the RMS gain, row 1 the largest singular value
    of ds_T/ds_{T-j}; j = 0 gives 0) and, for a gated cell, the keep gate's [mean, mean
    over units of sum_t log gate] on the probed sequences (None otherwise).

    ``x`` [B, T, F] as the call saw it (B may be unknown inside a TensorFlow trace),
    ``mask`` [B, T] (or [B, T, 1]) or None, ``states`` the initial state parts or None
    (zeros), ``seed`` an integer (tensor) for the random directions of an estimate,
    ``dropout`` the (input, recurrent) masks the cell applied in this call
    (:func:`gradwatch_tf._kcells.dropout_masks`) or None.
    """
    dp, rdp = (None, None) if dropout is None else dropout
    model = KCELLS[type(cell).__name__](cell, _cut(dp), _cut(rdp))
    u, parts = model.units, model.parts
    dim = u * parts
    x = _cut(x)
    steps = int(x.shape[1])
    b_known = probed_count(x.shape[0])
    xz = ops.transpose(model.project(x), (1, 0, 2))  # time-major [T, b, G*u]
    m = ops.ones_like(xz[..., :1])  # [T, b, 1]
    if mask is not None:
        m = _cut(mask)
        if len(m.shape) == 3:
            m = m[:, :, 0]
        m = ops.transpose(m, (1, 0))[:, :, None]  # [T, b, 1]
    if backwards:
        xz, m = ops.flip(xz, 0), ops.flip(m, 0)
    if states is not None:
        init = _cut(list(states))[:parts]
    else:
        init = [ops.zeros_like(xz[0, :, :u]) for _ in range(parts)]
    b = ops.shape(x)[0]  # an int, or a tensor where the trace does not know it
    exact = dim <= EXACT_DIM
    offsets = dominant_starts(steps) if not exact and steps > 1 else []
    k = len(offsets)
    seeds = normal((b, k, dim), seed) if not exact else None
    start = ops.convert_to_tensor(np.array([steps - o for o in offsets] or [0], np.int32)[None, :, None])
    times = ops.arange(steps, dtype="int32")
    gated = model.gate_name is not None

    def fwd(carry: Any, inp: Any) -> Any:
        states_c, tng = carry
        t, xt, mt = inp
        new, fac, keep = model.step(xt, states_c)
        keep_m = ops.zeros_like(new[0]) if keep is None else keep
        new = [ops.where(mt > 0, n, s) for n, s in zip(new, states_c)]
        if not exact:
            moved = ops.concatenate(model.jvp(_parts(tng, u, parts), [f[:, None, :] for f in fac]), -1)
            moved = ops.where(mt[:, :, None] > 0, moved, tng)
            tng = _unit_rows(ops.where(t >= start, moved, seeds))
        return (new, tng), (ops.stack(fac, 0), keep_m)

    tng0 = seeds if not exact else ops.zeros_like(xz[0, :, None, :1])
    bs = x.shape[0]  # static, or None
    (_, tng), (fac, keep) = scan(fwd, (init, tng0), (times, xz, m), ys=((model.n_factors, bs, u), (bs, u)))
    gate = _gate_stats(keep, m[..., 0]) if gated else None
    if steps < 2:
        return ops.zeros_like(ops.stack([m[..., 0], m[..., 0]])), gate
    if exact:
        rows = ops.eye(dim, dtype="float32")[None] + ops.zeros_like(xz[0, :, None, :1])
        weights = np.ones(dim, np.float32)
    else:
        q = _orthonormal(_refine_short(model, tng, offsets, fac, m))
        r = complement_probes(b_known)
        v = normal((b, r, dim), seed * 2 + 1)
        v = v - ops.matmul(ops.matmul(v, ops.transpose(q, (0, 2, 1))), q)
        rows = ops.concatenate([q, _orthonormal(v)], 1)
        weights = np.array([1.0] * k + [(dim - k) / r] * r, np.float32)
    return _carry_back(model, fac, m, rows, ops.convert_to_tensor(weights), dim), gate


#: Tangents over at most this many steps get more power iterations (u <- A A^T u over
#: their own steps, as :mod:`gradwatch_torch._sweeps` does): short products are where
#: one pass from a random start is weakest, and they are cheap.
REFINE_STEPS = 16
REFINE_ROUNDS = 2


def _refine_short(model: Any, tng: Any, offsets: list[int], fac: Any, m: Any) -> Any:
    """``tng`` [b, k, d] with those of offset <= REFINE_STEPS iterated further, each only
    over its own last ``offset`` steps (the other rows pass through unchanged)."""
    u, parts = model.units, model.parts
    steps = int(fac.shape[0])
    short = [o for o in offsets if o <= REFINE_STEPS]
    if not short:
        return tng
    span = max(short)
    first = np.array([steps - o if o <= REFINE_STEPS else steps for o in offsets], np.int32)
    first = ops.convert_to_tensor(first[None, :, None])
    xs = (ops.arange(steps - span, steps, dtype="int32"), fac[steps - span :], m[steps - span :])

    def back(w: Any, inp: Any) -> Any:
        t, f, mt = inp
        new = ops.concatenate(model.vjp(_parts(w, u, parts), [f[i][:, None, :] for i in range(model.n_factors)]), -1)
        return _unit_rows(ops.where(ops.logical_and(t >= first, mt[:, :, None] > 0), new, w)), None

    def fwd(w: Any, inp: Any) -> Any:
        t, f, mt = inp
        new = ops.concatenate(model.jvp(_parts(w, u, parts), [f[i][:, None, :] for i in range(model.n_factors)]), -1)
        return _unit_rows(ops.where(ops.logical_and(t >= first, mt[:, :, None] > 0), new, w)), None

    def round_trip(_: Any, w: Any) -> Any:  # one loop around both sweeps: each compiled once
        w, _ys = scan(back, w, xs, reverse=True)
        return scan(fwd, w, xs)[0]

    return ops.fori_loop(0, REFINE_ROUNDS, round_trip, tng)


def _carry_back(model: Any, fac: Any, m: Any, rows: Any, weights: Any, dim: int) -> Any:
    """Rows [b, K, d] at s_T through the VJPs of steps T-1 .. 1: logs [2, T, b]."""
    u, parts = model.units, model.parts

    def bwd(carry: Any, inp: Any) -> Any:
        us, acc = carry
        f, mt = inp
        new = ops.concatenate(model.vjp(_parts(us, u, parts), [f[i][:, None, :] for i in range(model.n_factors)]), -1)
        new = ops.where(mt[:, :, None] > 0, new, us)
        gram = ops.matmul(new, ops.transpose(new, (0, 2, 1)))  # [b, K, K]
        sq = ops.sum(new * new, axis=(1, 2))  # [b]
        scale = ops.sqrt(ops.maximum(sq, _TINY))
        return (new / scale[:, None, None], acc + ops.log(scale)), (gram, acc)

    acc0 = ops.zeros_like(rows[:, 0, 0])
    bs, k = rows.shape[0], rows.shape[1]
    _, (grams, accs) = scan(bwd, (rows, acc0), (fac[1:], m[1:]), reverse=True, ys=((bs, k, k), (bs,)))
    grams, accs = ops.flip(grams, 0), ops.flip(accs, 0)  # j = 1 .. T-1
    diag = ops.diagonal(grams, axis1=-2, axis2=-1)  # [T-1, b, K]
    log_rms = 0.5 * (ops.log(ops.sum(diag * weights, -1)) - math.log(dim)) + accs
    ok = ops.all(ops.isfinite(grams), axis=(-2, -1))
    safe = ops.where(ok[..., None, None], grams, ops.zeros_like(grams))
    lam = ops.maximum(ops.max(ops.eigh(safe)[0], axis=-1), 0.0)
    log_top = ops.where(ok, 0.5 * ops.log(lam), float("nan")) + accs
    logs = ops.stack([log_rms, log_top], 0)  # [2, T-1, b]
    return ops.concatenate([ops.zeros_like(logs[:, :1]), logs], 1)


def _gate_stats(gate: Any, valid: Any) -> Any:
    """[mean gate, mean over sequences and units of sum_t log gate], unmasked steps only
    (``gate`` [T, b, u], ``valid`` [T, b])."""
    w = valid[:, :, None] * ops.ones_like(gate)
    mean = ops.sum(gate * w) / ops.maximum(ops.sum(w), 1.0)
    log_sum = ops.sum(ops.log(ops.maximum(gate, _TINY)) * w, axis=0)
    return ops.stack([mean, ops.mean(log_sum)])
