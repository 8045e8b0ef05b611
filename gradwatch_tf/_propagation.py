"""The forward-pass hook of a recurrent layer: on profiled steps, measure propagation.

:func:`gradwatch_tf._recurrent.wrap_call` shows the hook every call of the layer. When the
call belongs to a training step (a gradient tape is recording, or ``training=True``),
the hook adds, after the layer's own ops, one ``tf.cond`` on the profiling rule
(:func:`gradwatch.profile_due` on gradwatch's step counter, and only while the watch is
active; a layer whose replay would cost more than the plan's share of the training time
replays on every n-th profiled step only, :func:`replay_period`): then it replays each direction
of the layer
(:func:`gradwatch_tf._kreplay.measure`, the one ``keras.ops`` replay of every Keras
backend, here traced into the user's step) and writes the log gains, the gate statistics and
the step they belong to into the site's variables; on every other step it does nothing.
The in-graph step (:mod:`gradwatch_tf._step`) reads them; a replay that did not happen
for this very step (the layer was not called in it) reads as missing, never as stale.

In ``fit`` (the callback) the hook only *keeps* what the replay needs on profiled steps,
and the host replays it beside the step (:mod:`gradwatch_tf._tfhost`): a replay traced
into Keras' train function was most of a watched first ``fit``'s extra time. A custom
loop (``gradwatch.watch``) replays in graph, as described here.

Why in the forward pass: everything the replay needs (the input, mask, initial state and
dropout masks of this call) exists there, in the same traced function, with no tensor
kept across graphs; and the step counter exists from the first trace on, even for a model
Keras builds inside its first step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from gradwatch import profile_due
from gradwatch.options import profiled_ordinal
from gradwatch.through_time.fit import aggregate_logs
from gradwatch.through_time.plan import PROBED, REPLAY_FREE, REPLAY_SHARE, REPLAY_SHARE_OF_TRAINING
from gradwatch_tf import _kcells, _kdiag, _kreplay, _recurrent
from gradwatch_tf._ops import TF, TF_TENSORS

__all__ = ["ReplayHook", "replay_period"]


def replay_period(site: _recurrent.RecurrentSite, x: Any, profile_every: int = 1) -> tf.Tensor:
    """Replay on every n-th profiled step (int64 n >= 1; the first profiled step always).

    The plan's rule (:func:`gradwatch.through_time.plan.replay_every`, in graph because
    the batch size may only be known at run time): n = ceil(replay cost / (share x the
    layer's own training cost)), share = max(REPLAY_SHARE, REPLAY_SHARE_OF_TRAINING x
    ``profile_every``), both costs counted in the multiply-adds of the matmuls with the
    layer's kernels, from shapes only (:func:`gradwatch_tf._kreplay.costs`, the count JAX
    and torch Keras use too), the training's batch and the probed sequences known at run
    time. Counting only this layer's training (not the rest of the model) errs on the
    cheap side.
    """
    seq, feat = int(x.shape[1]), int(x.shape[2])
    batch = tf.cast(tf.shape(x)[0], tf.float64)
    probed = _kreplay.probed_count(x.shape[0])
    flops, per_sequence = _kreplay.costs([layer for _, layer in site.directions], feat, seq, probed)
    b = tf.minimum(batch, float(PROBED))
    replay = tf.constant(flops / probed, tf.float64) * b  # the count is linear in the probed sequences
    train = tf.constant(per_sequence, tf.float64) * batch
    share = max(REPLAY_SHARE, REPLAY_SHARE_OF_TRAINING * max(int(profile_every), 1))
    n = tf.math.ceil(replay / (share * tf.maximum(train, 1.0)) - 1e-9)
    n = tf.where(2.0 * replay <= REPLAY_FREE, tf.constant(1.0, tf.float64), tf.maximum(n, 1.0))  # the plan's free replays
    return tf.cast(n, tf.int64)


def _recording() -> bool:
    """A gradient tape is recording this forward pass (a training step follows)."""
    try:
        from tensorflow.python.eager import record

        return bool(record.could_possibly_record())
    except Exception:  # noqa: BLE001 - private API moved: rely on ``training`` alone
        return False


@dataclass
class _Call:
    args: _recurrent.CallArgs
    training: bool
    states: list[list[Any] | None]  # initial states per direction (None: zeros)


class ReplayHook:
    """See the module docstring. ``counters()`` gives (step counter, active flag) as
    ``tf.Variable``\\ s; ``fail(exc)`` reports an error once and disables the hook."""

    def __init__(
        self,
        site: _recurrent.RecurrentSite,
        *,
        make_var: Callable[..., tf.Variable],
        counters: Callable[[], tuple[tf.Variable, tf.Variable]],
        profile_every: int,
        salt: int,
        fail: Callable[[BaseException], None],
        disabled: Callable[[], bool],
        replay_every: int | None = None,
        host: Any = None,
    ) -> None:
        self.site = site
        #: ``fit``: a :class:`gradwatch_tf._tfhost.HostProfile`; the step keeps, the host replays.
        self._host = host
        self._keeper: Any = None  # the keep's own tf.function (:meth:`_keep`)
        self._replay_every = replay_every  # the option; None: the cost model (replay_period)
        self._make = make_var
        self._counters = counters
        self._every = max(int(profile_every), 1)
        self._salt = int(salt)
        self._fail = fail
        self._disabled = disabled

    def before(self, args: _recurrent.CallArgs) -> _Call | None:
        """Decide whether this call is measured; capture what changes during the call."""
        site = self.site
        for slot in site.dropout.values():
            slot.clear()
        if self._disabled():
            return None
        try:
            x = args.inputs
            if not (hasattr(x, "shape") and x.shape.rank == 3):
                return None
            _recurrent.ensure_site_variables(site, self._make, x)
            if site.prop is None or x.shape[1] != int(site.prop.shape[2]):
                return None
            if site.anchor is None or not isinstance(_recurrent.variable_of(site.anchor), tf.Variable):
                return None  # Keras building the layer symbolically: the real pass comes later
            training = args.training if isinstance(args.training, bool) else bool(args.training is not None)
            if not (training or _recording()):
                return None  # evaluation or prediction: no optimizer step follows
            return _Call(args, training, self._initial_states(args.initial_state))
        except Exception as exc:  # noqa: BLE001 - measuring is optional
            self._fail(exc)
            return None

    def _initial_states(self, given: Any) -> list[list[Any] | None]:
        """Per direction: the states the layer starts from, read now (a stateful layer
        overwrites its own during the call)."""
        directions = self.site.directions
        if given is not None:
            flat = list(given) if isinstance(given, (list, tuple)) else [given]
            per = len(flat) // len(directions)
            return [flat[i * per : (i + 1) * per] or None for i in range(len(directions))]
        out: list[list[Any] | None] = []
        for _, layer in directions:
            states = getattr(layer, "states", None) if getattr(layer, "stateful", False) else None
            if states is None:
                out.append(None)
                continue
            flat = list(states) if isinstance(states, (list, tuple)) else [states]
            out.append([tf.identity(tf.convert_to_tensor(getattr(v, "value", v))) for v in flat])
        return out

    def after(self, call: _Call) -> None:
        """Add the profiled-step replay (inside ``tf.cond``) after the layer's ops; in
        ``fit``, what the host's replay needs instead (:mod:`gradwatch_tf._tfhost`)."""
        try:
            if self._host is not None and self.site.diag is None:  # fit: keep what the host's replay needs
                self._keep(call)
                return
            step, profiled, replay_due = self._schedule(call.args.inputs)
            due = tf.logical_and(profiled, replay_due)
            tf.cond(due, lambda: self._measure(call, step), lambda: tf.constant(False))
        except Exception as exc:  # noqa: BLE001 - measuring is optional
            self._fail(exc)

    def _schedule(self, x: Any) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """(step, profiled, replay due): the k-th profiled step (from 0) replays when k
        is a multiple of the period."""
        step_var, active = self._counters()
        step = step_var.read_value()
        k = profiled_ordinal(step, self._every)
        if self.site.diag is not None:  # exact and cheap: every profiled step
            period = tf.constant(1, tf.int64)
        elif self._replay_every:
            period = tf.constant(self._replay_every, tf.int64)
        else:
            period = replay_period(self.site, x, self._every)
        profiled = tf.logical_and(profile_due(step, self._every, TF), active.read_value())
        return step, profiled, tf.equal(tf.math.floormod(k, period), 0)

    def _keep(self, call: _Call) -> None:
        """On profiled steps, the call's first sequences, states and dropout masks and the
        cells' weights into the host's buffers. Built as a ``tf.function`` of its own,
        traced once and called from each trace of the step: Keras traces its train step
        twice in the first ``fit``, and this is a good part of gradwatch's share of it."""
        site, host = self.site, self._host
        drops = []
        for _, layer in site.directions:
            masks = site.dropout.get(id(layer.cell), {})
            drops.append(_kcells.dropout_masks(layer.cell, call.training, masks.get("input"), masks.get("recurrent")))
        if self._keeper is None:

            def keep(x: Any, mask: Any, states: Any, drops: Any) -> tf.Tensor:
                step, profiled, replay_due = self._schedule(x)
                slot = host.slot(step, self._every)
                return tf.cond(
                    profiled,
                    lambda: host.keep(site, x, mask, states, drops, step, slot, replay_due, self._salt),
                    lambda: tf.constant(False),
                )

            self._keeper = tf.function(keep, autograph=False)
        self._keeper(call.args.inputs, call.args.mask, call.states, drops)

    def _measure(self, call: _Call, step: tf.Tensor) -> tf.Tensor:
        site = self.site
        if site.diag is not None:  # from the decays (gradwatch_tf._kdiag): nothing to replay
            logs = _kdiag.site_logs(site.diag, site.layer, call.args.inputs)
            assert site.prop is not None and site.prop_step is not None
            writes = [site.prop.assign(tf.cast(logs, tf.float32)), site.prop_step.assign(tf.cast(step, tf.int64))]
            with tf.control_dependencies(writes):
                return tf.constant(True)
        drops = []
        for _, layer in site.directions:
            masks = site.dropout.get(id(layer.cell), {})
            drops.append(_kcells.dropout_masks(layer.cell, call.training, masks.get("input"), masks.get("recurrent")))
        logs, gate = site_logs(site, call.args.inputs, call.args.mask, call.states, drops, step, self._salt)
        assert site.prop is not None and site.prop_step is not None
        writes = [site.prop.assign(logs), site.prop_step.assign(tf.cast(step, tf.int64))]
        if site.gate_stats is not None and gate is not None:
            writes.append(site.gate_stats.assign(gate))
        with tf.control_dependencies(writes):
            return tf.constant(True)


def site_logs(
    site: _recurrent.RecurrentSite, x: Any, mask: Any, states: list[Any], drops: list[Any], step: Any, salt: int
) -> tuple[tf.Tensor, tf.Tensor | None]:
    """The replay of every direction of ``site`` on what a call saw: log gains and log max
    gains [2, R, T] (the engine's rule: median over sequences of the RMS gain, max of the
    top one) and the gate statistics of the direction whose memory path closes most
    (lowest log path gain, the one a vanishing alert is about; None for a cell without a
    keep gate). ``states`` and ``drops`` per direction (None: zeros, no dropout). Traced
    into the step (a custom loop) or into the host's replay function (``fit``:
    :mod:`gradwatch_tf._tfhost`)."""
    logs, gates = [], []
    for i, (_, layer) in enumerate(site.directions):
        seed = tf.cast(step, tf.int64) * 4099 + (int(salt) * 16 + i)  # as the JAX/torch sites draw
        per_seq, gate = _kreplay.measure(
            layer.cell,
            x,
            mask,
            states[i],
            backwards=bool(getattr(layer, "go_backwards", False)),
            seed=seed,
            dropout=drops[i],
        )
        logs.append(tf.stack(aggregate_logs(per_seq[0], per_seq[1], TF_TENSORS)))  # per_seq: [2, T, b]
        gates.append(gate)
    out = tf.transpose(tf.stack(logs), [1, 0, 2])  # [2, R, T]
    if site.gate_stats is None or any(g is None for g in gates):
        return out, None
    per = tf.stack(gates)  # [R, 2]
    return out, tf.gather(per, tf.argmin(per[:, 1]))
