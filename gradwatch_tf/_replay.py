"""Propagation through time on a Keras layer's own forward trajectory (in graph, XLA too).

What is measured (docs/API.md, "Through time"): for one direction of a recurrent layer,
``gains[j] = ||ds_T/ds_{T-j}||_F / sqrt(dim s)``, j = 0 .. T-1 steps back from the last
*processed* step, s = h (SimpleRNN, GRU) or (h, c) (LSTM), and the largest singular
value of the same product, per probed sequence (the engine's rule then takes the median
of the first and the max of the second over the first
min(B, 8) sequences of the batch).

How, and why this way:

* **Replay.** Keras' loop exposes neither the states nor the gates of every step, so on
  profiled steps the probed sequences are run again through the cell's own weights,
  with exactly what the layer's call saw: its input, its mask (a masked step keeps the
  state, as Keras' ``rnn`` does, so its Jacobian is the identity), its initial state
  (``initial_state=`` or a stateful layer's states) and, in training, the cell's own
  dropout masks of that call. A reversed direction (``go_backwards``, the backward half
  of a ``Bidirectional``) is replayed in its processing order, so j counts back along
  the reversed sequence. Everything is cut from the user's graph (``stop_gradient``).
* **Jacobian products without Jacobians.** The state Jacobians are never formed: probe
  rows are carried backwards through the closed-form vector-Jacobian product of the cell
  (one matmul with the recurrent kernel per step), and for rows Q whose squares sum to
  one, ``||Q P_j||_F^2`` is the measured ``||P_j||_F^2 / dim s``.
  *Exact* when dim s <= 16: Q is the identity (over sqrt(dim s)).
  *Estimated* above that, without bias (Hutchinson's estimator, deflated): the first row
  is the dominant direction at s_T, found by carrying a random tangent forward through
  every step (the forward-mode twin of the VJP, in the forward pass), counted exactly;
  the other rows are r random orthonormal directions of its complement, drawn afresh at
  each profiled step (``stateless_normal`` seeded by the step, then QR), weighted
  (dim s - 1) / r; r = 2 per sequence for 8 sequences (16 over the sequences, at least
  2 each, when fewer). Why deflate: long products are dominated by a few directions,
  where plain random probes are least reliable; counting the top one exactly halves the
  rows needed for the same accuracy. Against exact products (numpy, float64; tanh RNN
  48 units, LSTM 24, GRU 40 either way, 60 steps, 60 draws each) the worst error over
  every j was a factor 1.26 (95th percentile 1.2) and the fitted rate within 0.3%; the
  contract allows 1.5 and 5%. Cost, per profiled step only: 8 sequences forward (the
  tangent rides along: the kernel it reads is in cache) and 24 probe rows backward;
  for LSTM(256) over 100 steps about 0.3 of a training step of a batch of 32 on CPU,
  dominated by the two loops' matmuls with the recurrent kernel.
* **No underflow.** The probe rows are renormalised at every step and the log of the
  factor accumulated, so a gain of 1e-300 is represented exactly (float32 would flush it
  to zero after a few dozen steps of a vanishing tanh RNN); the host receives
  ``exp(log gain)`` in float64.
* **Gate statistics** (LSTM forget gate f, GRU update gate z, Keras' keep gate
  h = z h_prev + (1 - z) h~) come from the same replay: the probed sequences, the
  user's initial state, unmasked steps only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from gradwatch_tf._cells import CELLS, RecurrentCell

__all__ = ["EXACT_DIM", "MAX_SEQUENCES", "Trajectory", "measure", "random_rows", "supported"]

#: Sequences of the batch replayed (the first ones): the contract's min(B, 8).
MAX_SEQUENCES = 8
#: States of at most this dimension are measured exactly (identity probe rows).
EXACT_DIM = 16
_TINY = 1e-30


class Trajectory:
    """One direction of one call: what the replay needs, cut to the probed sequences.

    ``x`` [b, T, F], ``mask`` [b, T] (bool) or None, ``states`` the initial states
    ([b, units] each) or None for zeros, ``input_mask`` / ``recurrent_mask`` the cell's
    dropout masks of the call (a tensor, a list of one per gate, or None), in the
    *caller's* time order; ``backwards`` reverses time for the replay.
    """

    def __init__(
        self,
        x: Any,
        mask: Any = None,
        states: Sequence[Any] | None = None,
        *,
        backwards: bool = False,
        input_mask: Any = None,
        recurrent_mask: Any = None,
    ) -> None:
        x = _first(x)
        self.x = tf.reverse(x, [1]) if backwards else x
        m = None
        if mask is not None:
            m = _first(tf.cast(mask, tf.bool), cast=False)
            if m.shape.rank == 3:
                m = m[:, :, 0]
            m = tf.reverse(m, [1]) if backwards else m
        self.mask = m
        self.states = None if states is None else [_first(s) for s in states]
        self.input_mask = _cut(input_mask)
        self.recurrent_mask = _cut(recurrent_mask)


def _first(t: Any, cast: bool = True) -> tf.Tensor:
    t = tf.stop_gradient(tf.convert_to_tensor(t))[:MAX_SEQUENCES]
    return tf.cast(t, tf.float32) if cast else t


def _cut(m: Any) -> Any:
    if m is None:
        return None
    if isinstance(m, (list, tuple)):
        return [_first(v) for v in m]
    return _first(m)


def supported(cell: Any) -> bool:
    return type(cell).__name__ in CELLS


def measure(cell: Any, traj: Trajectory, *, training: bool, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Per-sequence logs [2, T, b] (float32; row 0 the RMS gain, row 1 the largest singular
    value of ds_T/ds_{T-j}; j = 0 is 0) and, for gated cells, the keep gate's [mean, mean
    over units of sum_t log gate] on the probed sequences. The engine's aggregate
    (:func:`gradwatch.through_time.fit.aggregate_logs`) turns them into the contract's two
    profiles.

    ``seed`` (int64 [2]) draws the random directions of an estimate (see the module
    docstring); an exact measurement ignores it.
    """
    model = CELLS[type(cell).__name__](cell, traj, training)
    u = model.units
    dim = u * model.parts
    xz = tf.transpose(model.xz, [1, 0, 2])  # time-major [T, b, G*u]
    steps = int(xz.shape[0])
    b = tf.shape(xz)[1]
    mask = None if traj.mask is None else tf.transpose(traj.mask)  # [T, b]
    if traj.states is not None:
        init = [tf.cast(s, tf.float32) for s in traj.states][: model.parts]
    else:
        init = [tf.zeros(tf.stack([b, u]), tf.float32) for _ in range(model.parts)]
    exact = dim <= EXACT_DIM
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)

    # Forward: states, the factors of every step's Jacobian, the keep gate and (for an
    # estimate) the tangent that finds the dominant direction at s_T, in one loop: the
    # kernel each step reads serves the tangent from cache. A masked step keeps its
    # state and the tangent: its Jacobian is the identity.
    mask2 = None if mask is None else mask[:, :, None]
    n_fac = model.n_factors

    def fwd(t: tf.Tensor, carry: Any) -> Any:
        states, tng, ta = carry
        new, rec = model.step(xz[t], states)
        fac, keep = model.factors(rec, states)
        if not exact:
            tn = model.jvp(tng, fac)
        if mask2 is not None:
            m = mask2[t]
            new = [tf.where(m, n, s) for n, s in zip(new, states)]
            if not exact:
                tn = [tf.where(m, n, o) for n, o in zip(tn, tng)]
        if not exact:
            scale = tf.math.rsqrt(tf.maximum(tf.add_n([tf.reduce_sum(n * n, -1, keepdims=True) for n in tn]), _TINY))
            tng = [n * scale for n in tn]
        return new, tng, ta.write(t, tf.concat(fac + ([] if keep is None else [keep]), -1))

    width = (n_fac + (model.gate_name is not None)) * u
    ta = tf.TensorArray(tf.float32, size=steps, element_shape=tf.TensorShape([None, width]))
    t0 = tf.random.stateless_normal(tf.stack([b, dim]), seed=seeds[0], dtype=tf.float32)
    t0 = t0 / tf.norm(t0, axis=-1, keepdims=True)
    _, top, ta = _scan(steps, fwd, (init, [t0[:, p * u : (p + 1) * u] for p in range(model.parts)], ta))
    stacked = ta.stack()  # [T, b, width]
    fac = stacked[..., : n_fac * u]
    gate = _gate_stats(stacked[..., n_fac * u :], mask) if model.gate_name is not None else None
    if steps < 2:
        return tf.zeros(tf.stack([2, steps, b]), tf.float32), gate
    if exact:
        rows = tf.tile(tf.eye(dim, dtype=tf.float32)[None], tf.stack([b, 1, 1])) / math.sqrt(dim)
        unweight = [math.sqrt(dim)] * dim
    else:
        r = random_rows(traj.x.shape[0])
        rows = _deflated_rows(tf.concat(top, -1), r, seeds[1])
        unweight = [math.sqrt(dim)] + [math.sqrt(dim) / math.sqrt((dim - 1) / r)] * r
    return _carry_back(model, fac, mask, rows, steps, tf.constant(unweight, tf.float32)), gate


#: Timesteps per iteration of the replay's loops. Unrolling 4 or 10 steps was measured
#: and saved nothing on CPU (the matmuls dominate), so the traced graph stays small.
UNROLL = 1


def _scan(steps: int, body: Any, carry: Any) -> Any:
    """``carry = body(t, carry)`` for t = 0 .. steps-1, ``UNROLL`` steps per iteration of
    one ``tf.while_loop`` (the remainder unrolled after it)."""
    loops, rest = divmod(steps, UNROLL)

    def group(i: tf.Tensor, c: Any) -> Any:
        for k in range(UNROLL):
            c = body(i * UNROLL + k, c)
        return i + 1, c

    if loops:
        _, carry = tf.while_loop(lambda i, _c: i < loops, group, (tf.constant(0), carry), maximum_iterations=loops)
    for k in range(rest):
        carry = body(tf.constant(loops * UNROLL + k), carry)
    return carry


def random_rows(sequences: int | None) -> int:
    """Random probe rows per sequence of an estimate: 16 over the probed sequences, at
    least 2 each (the noise of the geometric mean then stays about the same)."""
    b = MAX_SEQUENCES if sequences is None else max(1, min(int(sequences), MAX_SEQUENCES))
    return max(2, -(-16 // b))


def _deflated_rows(top: tf.Tensor, r: int, seed: tf.Tensor) -> tf.Tensor:
    """[b, 1 + r, dim] probe rows whose squares sum to 1 per sequence: the dominant
    direction ``top`` (weight 1) and r random orthonormal directions of its complement
    (weight (dim - 1) / r), all over dim (see the module docstring)."""
    dim = int(top.shape[-1])
    b = tf.shape(top)[0]
    g = tf.random.stateless_normal(tf.stack([b, dim, r]), seed=seed, dtype=tf.float32)
    g = g - top[:, :, None] * tf.reduce_sum(top[:, :, None] * g, axis=1, keepdims=True)
    q = tf.transpose(tf.linalg.qr(g)[0], [0, 2, 1]) * math.sqrt((dim - 1) / r)  # [b, r, dim]
    return tf.concat([top[:, None, :], q], 1) / math.sqrt(dim)


def _carry_back(
    model: RecurrentCell, factors: tf.Tensor, mask: tf.Tensor | None, rows: tf.Tensor, steps: int, unweight: tf.Tensor
) -> tf.Tensor:
    """Probe rows through the VJPs of steps T-1 .. 1, renormalised at each step (one scale
    per sequence, its log accumulated). Per j and sequence: the log of the block's
    Frobenius norm (the rows are weighted so that it is the RMS gain) and the log of the
    largest singular value of the unweighted rows (``unweight`` [k] undoes the weights):
    [2, T, b]. ``factors`` [T, b, n_factors * u] are :meth:`RecurrentCell.factors`'."""
    u = model.units
    us0 = [rows[..., p * u : (p + 1) * u] for p in range(model.parts)]
    b = tf.shape(rows)[0]
    fac4 = factors[:, :, None, :]  # [T, b, 1, n * u]: against rows [b, k, u]
    mask4 = None if mask is None else mask[:, :, None, None]
    outer = unweight[:, None] * unweight[None, :]  # [k, k]

    def bwd(i: tf.Tensor, carry: Any) -> Any:
        us, acc, ta = carry
        t = steps - 1 - i
        new = model.vjp(us, tf.split(fac4[t], model.n_factors, axis=-1))
        if mask4 is not None:
            keep_t = mask4[t]
            new = [tf.where(keep_t, n, o) for n, o in zip(new, us)]
        gram = tf.add_n([tf.matmul(n, n, transpose_b=True) for n in new]) * outer  # [b, k, k], unweighted rows
        # A non-finite trajectory (NaN input, overflow) must give NaN, never stop the step:
        # the eigensolver refuses non-finite input, so it gets zeros there.
        ok = tf.reduce_all(tf.math.is_finite(gram), axis=[1, 2])
        safe = tf.where(ok[:, None, None], gram, tf.zeros_like(gram))
        lam = tf.where(ok, tf.maximum(tf.linalg.eigvalsh(safe)[:, -1], 0.0), tf.fill(tf.shape(ok), float("nan")))
        top = tf.math.log(lam) * 0.5 + acc[:, 0, 0]
        sq = tf.add_n([tf.reduce_sum(n * n, axis=[1, 2], keepdims=True) for n in new])  # [b, 1, 1]
        acc_new = acc + 0.5 * tf.math.log(sq)
        scale = tf.math.rsqrt(tf.maximum(sq, _TINY))
        return [n * scale for n in new], acc_new, ta.write(i, tf.stack([acc_new[:, 0, 0], top]))

    ta = tf.TensorArray(tf.float32, size=steps - 1, element_shape=tf.TensorShape([2, None]))
    acc0 = tf.zeros(tf.stack([b, 1, 1]), tf.float32)
    _, _, ta = _scan(steps - 1, bwd, (us0, acc0, ta))
    logs = tf.transpose(ta.stack(), [1, 0, 2])  # [2, T-1, b], j = 1 .. T-1
    return tf.concat([tf.zeros(tf.stack([2, 1, b]), tf.float32), logs], 1)


def _gate_stats(gate: tf.Tensor, mask: tf.Tensor | None) -> tf.Tensor:
    """[mean gate, mean over sequences and units of sum_t log gate], unmasked steps only."""
    w = tf.ones_like(gate) if mask is None else tf.cast(mask, tf.float32)[:, :, None] * tf.ones_like(gate)
    mean = tf.reduce_sum(gate * w) / tf.maximum(tf.reduce_sum(w), 1.0)
    log_sum = tf.reduce_sum(tf.math.log(tf.maximum(gate, _TINY)) * w, axis=0)  # [b, u]
    return tf.stack([mean, tf.reduce_mean(log_sum)])
