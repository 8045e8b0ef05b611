"""gradwatch for Keras 3 on any backend (JAX, PyTorch, TensorFlow): ``watch`` for custom
loops, ``GradWatchCallback`` for fit.

Importing this package does not import Keras or a framework (the plugin entry point lives
here); the two public names load them on first use. On TensorFlow the step below runs in
TensorFlow (``gradwatch_tf.attach``), through-time diagnosis included; on JAX and torch
the same records, policies, skip/raise, run files and TensorBoard come from a step written
in ``keras.ops`` (:mod:`gradwatch_tf.portable`), and the propagation through time of
recurrent layers from a ``keras.ops`` replay (:mod:`gradwatch_tf._ksites`), the spectral
norms of their gate blocks from the host (:mod:`gradwatch.through_time.spectral`);
per-timestep sensitivity on all three (on JAX from the jitted step's own backward).

On TensorFlow:

How it behaves, and why:

* Everything per step happens inside the traced step (``tf.function``, XLA, any
  ``steps_per_execution``): ``optimizer.apply`` is wrapped on the optimizer *instance*
  and restored by deleting that attribute. Between fits the callback keeps its traced
  step aside and suspends the attachment (optimizer restored, nothing measured), and
  puts Keras' own untraced function back, so an unwatched ``fit``, ``evaluate`` or
  ``predict`` runs none of gradwatch's ops; the next ``fit`` with the same callback,
  model, optimizer and compilation resumes and reuses that trace instead of retracing.
  A ``tf.function`` of a custom loop traced while watched keeps gradwatch's ops after
  ``close()``, but they then stand aside (no clipping, no skipping).
* The host reads one ring buffer (``steps_per_execution`` rows for ``fit``) per batch end.
  ``gradwatch.watch`` reads after each step when eager, through a ``tf.py_function``
  per step inside a ``tf.function``, and under ``jit_compile=True`` when ``watch.records``
  is read (the ring holds 256 steps).
* ``on_nonfinite="raise"``: the update is skipped in-graph (and every later update until
  the host has seen it), then ``NonFiniteGradientError`` is raised on the host: from the
  callback's batch end (fit stops, the optimizer is restored first) or from the step of
  an eager loop. Inside a ``tf.function`` TensorFlow wraps it in a ``tf.errors.OpError``
  carrying the same message. Nothing has changed in either case.
* Policies run in-graph: the definitions of :mod:`gradwatch.policies` themselves, executed
  with TensorFlow ops (:mod:`gradwatch_tf._ops`), state in ``tf.Variable``\\ s.
* Mixed precision: under ``LossScaleOptimizer`` the inner optimizer's ``apply`` is
  wrapped, so gradients are measured unscaled; steps the loss scaler drops as overflows
  never reach it and have no record.
* Distribution strategies: gradients (and probe sums) are all-reduced for measuring,
  so records show the global norm; the per-replica gradients go on to Keras scaled by
  the same factors.
* Recurrent layers (SimpleRNN, LSTM, GRU, ``RNN`` of one of their cells, Bidirectional,
  stacked, ``go_backwards``, masking, ``initial_state``, stateful, dropout): on profiled
  steps, inside the forward pass of a training step, the first min(B, 8) sequences are
  replayed through each direction's own weights exactly as the layer ran them (its mask,
  initial state and dropout masks) to measure propagation through time, the gains of
  ds_T/ds_{T-j} (exact for states of up to 16 numbers, an estimate within the contract's
  1.5x above that: :mod:`gradwatch_tf._kreplay`, the replay of every Keras backend), and
  the LSTM forget / GRU update gate statistics of the same sequences. A layer whose replay would cost more than the plan's
  share (5% of the profiled steps, or 1.5% of all steps with spaced profiles) replays on
  every n-th profiled step only (n from shapes:
  :func:`gradwatch_tf._propagation.replay_period`). Per-timestep norms of dL/dx
  (sensitivity) come from a probe on the layer's input. Both need a sequence length that
  is static in the traced step (``Input((None, F))`` is fine when the data has one).
  Spectral norms of the recurrent gate blocks are iterated to a tolerance (within 0.1% of
  the exact value).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradwatch_tf.callback import GradWatchCallback

__all__ = ["GradWatchCallback", "register_recurrence", "unregister_recurrence", "watch"]


def watch(model: Any, optimizer: Any | None = None, **options: Any) -> Any:
    """``gradwatch.watch`` without the backend dispatch (see docs/API.md).

    Intercepts ``optimizer.apply`` (``apply_gradients`` goes through it) of ``optimizer``
    or, when it is None, of ``model.optimizer``; returns a ``gradwatch.Watch``.
    """
    from gradwatch import watch_with
    from gradwatch_tf.plugin import attach_any, check_optimizer

    check_optimizer(optimizer)

    return watch_with(lambda monitor: attach_any(model, optimizer, monitor), model, **options)


def register_recurrence(layer_type: Any, *, decay: Any, kind: str = "custom", weights: Any = None) -> Any:
    """Declare a Keras layer as a diagonal recurrence h_t = a_t * h_{t-1} + b_t: gradwatch
    then measures its propagation exactly from ``decay(layer, x) -> log a_t`` (written in
    ``keras.ops``; ``x`` the probed sequences of the layer's input), on every Keras backend.
    See :func:`gradwatch_tf._kdiag.register_recurrence`; returns the declaration (for
    :func:`unregister_recurrence`). A package ships the same through the plugin hook
    ``gradwatch_register_recurrences`` (a ``Recurrence`` naming its layer, the same
    ``decay(layer, x)``). Imports Keras."""
    from gradwatch_tf._kdiag import register_recurrence as register

    return register(layer_type, decay=decay, kind=kind, weights=weights)


def unregister_recurrence(declared: Any) -> None:
    """Undo :func:`register_recurrence`."""
    from gradwatch_tf._kdiag import unregister_recurrence as unregister

    unregister(declared)


def __getattr__(name: str) -> Any:
    if name == "GradWatchCallback":
        from gradwatch_tf.callback import GradWatchCallback

        return GradWatchCallback
    raise AttributeError(f"module 'gradwatch_tf' has no attribute {name!r}")
