"""Diagonal (gated linear) recurrences in Keras, exact from their decays: mingru-keras'
``MinGRU`` and any layer declared with :func:`register_recurrence` or by a plugin
(``gradwatch_register_recurrences``, :func:`plugin_declarations`), on every backend.

For h_t = a_t * h_{t-1} + b_t the state Jacobian product over j steps back is
diag(prod a_k): propagation is a reverse cumulative sum of log a_t
(:func:`gradwatch.through_time.diagonal_logs`, the engine's rule, run here in
``keras.ops``), exact at any size, O(P T D) for the probed sequences. There is nothing to
replay and nothing to keep for the host: the log decays come from the layer's input and
weights, so the step computes the profile itself, on profiled steps only (a ``cond`` in
a compiled step, nothing at all on the other steps of an eager one).

``MinGRU`` (mingru-keras 0.1: ``h_t = h_{t-1} + z_t (h~_t - h_{t-1})`` by an associative
scan): a_t = 1 - z_t with z_t = sigmoid(gate(x_t)), so log a_t = -softplus(x_t W + b),
from the gate ``Dense``'s pre-activation (1 - sigmoid would lose a decay near 0 or 1 to
rounding); state (units,). Matched by qualified class name, without importing the package.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from keras import ops

from gradwatch.through_time.diagonal import diagonal_logs
from gradwatch.through_time.families import matches
from gradwatch.through_time.fit import aggregate_logs
from gradwatch.through_time.plan import PROBED
from gradwatch_tf._kops import KERAS_TENSORS

logger = logging.getLogger("gradwatch")

__all__ = [
    "DIAGONAL",
    "Diagonal",
    "diagonal_of",
    "mingru_log_decay",
    "plugin_declarations",
    "register_recurrence",
    "site_logs",
    "unregister_recurrence",
]


def mingru_log_decay(layer: Any, x: Any) -> Any:
    """mingru-keras ``MinGRU``: log(1 - z_t) = -softplus(x W + b) of its ``gate`` Dense, (P, T, units)."""
    dense = layer.gate
    g = ops.matmul(ops.cast(x, "float32"), ops.cast(dense.kernel, "float32"))
    if getattr(dense, "bias", None) is not None:
        g = g + ops.cast(dense.bias, "float32")
    return -ops.softplus(g)


class Diagonal:
    """A diagonal recurrence gradwatch knows in Keras: its family (the remedies' ``kind``)
    and ``log_decay(layer, x) -> log a`` (P, T, ...) from the probed rows of its input."""

    def __init__(self, kind: str, log_decay: Callable[[Any, Any], Any], weights: Callable[[Any], list[Any]]) -> None:
        self.kind = kind
        self.log_decay = log_decay
        self.weights = weights


#: Qualified class name -> what gradwatch knows of that layer.
DIAGONAL: dict[str, Diagonal] = {
    "mingru_keras.core.MinGRU": Diagonal(
        "mingru", mingru_log_decay, lambda layer: [v for v in (layer.gate.kernel, layer.gate.bias) if v is not None]
    ),
}


#: The process's own declarations (:func:`register_recurrence`), the latest first.
_DECLARED: list[tuple[type | str, Diagonal]] = []


def register_recurrence(
    layer_type: type | str,
    *,
    decay: Callable[[Any, Any], Any],
    kind: str = "custom",
    weights: Callable[[Any], list[Any]] | None = None,
) -> Diagonal:
    """Declare a Keras layer as a diagonal recurrence h_t = a_t * h_{t-1} + b_t, so that
    gradwatch measures its propagation (exactly, from the decays) and its sensitivity, and
    judges it, on every backend, in ``fit`` and in custom loops. Returns the declaration.

    ``layer_type``: the layer's class (its subclasses match too) or its qualified name
    ``"module.Class"`` (matched on the class and its bases, nothing imported).
    ``decay(layer, x) -> log_a``: the log of the decays, (P, T, ...) (any trailing state
    shape; -inf for a gate that closes), from ``x``, the first ``min(B, 8)`` sequences of
    the layer's first input (P, T, F), and the layer's weights as they are before the
    step's update. Written in ``keras.ops``: it runs inside the compiled step (``jit``,
    ``tf.function``) on profiled steps only. Unlike the PyTorch declaration
    (``gradwatch_torch.register_recurrence``, whose decay sees the call's arguments and
    output) it sees the input only: the step computes it, nothing of the call is kept.
    ``kind``: the family in records and alerts (its remedies when gradwatch knows it, e.g.
    ``"mingru"``; ``"custom"`` by default). ``weights(layer)``: the variables the decay
    reads (default: the layer's trainable weights; the sensitivity probe ties a data input
    to the first). Applies to watches and callbacks attached from now on.
    """
    if not isinstance(layer_type, (type, str)):
        raise TypeError(f"register_recurrence: layer_type must be a class or a qualified name, got {type(layer_type).__name__}")
    if not callable(decay):
        raise TypeError(f"register_recurrence: decay must be callable (layer, x) -> log_a, got {type(decay).__name__}")
    declared = Diagonal(str(kind), decay, weights or (lambda layer: list(layer.trainable_weights)))
    _DECLARED.insert(0, (layer_type, declared))
    return declared


def unregister_recurrence(declared: Diagonal) -> None:
    """Undo :func:`register_recurrence` (a declaration not registered is ignored)."""
    _DECLARED[:] = [(t, d) for t, d in _DECLARED if d is not declared]


def plugin_declarations() -> list[tuple[type | str, Diagonal]]:
    """The diagonal declarations the plugins ship through ``gradwatch_register_recurrences``
    (a :class:`~gradwatch.through_time.families.Recurrence` with ``decay=fn``, the Keras
    signature ``fn(layer, x) -> log_a``). One hook serves both backends: a declaration
    names its framework's class, so a PyTorch module's never matches a Keras layer. Loop
    cells (``step=True``) are PyTorch-only and skipped here. A failing plugin is logged and
    ignored: it must not stop the callback."""
    try:
        from gradwatch.plugins import get_plugin_manager
        from gradwatch.through_time.families import declarations

        found = declarations(get_plugin_manager())
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop the watch
        logger.error("gradwatch: gradwatch_register_recurrences failed (%s: %s); plugin recurrences are ignored.", type(exc).__name__, exc)
        return []
    return [
        (r.module_type, Diagonal(r.kind, r.decay, lambda layer: list(layer.trainable_weights)))
        for r in found
        if r.decay is not None
    ]


def diagonal_of(layer: Any, plugins: list[tuple[type | str, Diagonal]] | None = None) -> Diagonal | None:
    """The declaration matching ``layer``'s class or one of its bases (the core's rule,
    :func:`gradwatch.through_time.families.matches`), else None: the process's own
    (:func:`register_recurrence`, latest first), then the plugins' (``plugins``, from
    :func:`plugin_declarations` once per model; looked up here when None), then the built-ins."""
    cls = type(layer)
    found = plugin_declarations() if plugins is None else plugins
    return next((d for declared, d in [*_DECLARED, *found, *DIAGONAL.items()] if matches(declared, cls)), None)


def site_logs(diag: Diagonal, layer: Any, x: Any) -> Any:
    """Log gains and log max gains [2, 1, T] (float32) of the first ``PROBED`` sequences of
    ``x`` (B, T, F): the engine's rule (median over sequences of the RMS gain, max of the
    largest), row j = j steps back from the last step."""
    rows = x[:PROBED]
    log_a = diag.log_decay(layer, rows)  # (P, T, ...)
    p, t = int(log_a.shape[0]), int(log_a.shape[1])
    log_a = ops.transpose(ops.reshape(log_a, (p, t, -1)), (1, 0, 2))  # (T, P, S), processing order
    log_rms, log_top = diagonal_logs(log_a, KERAS_TENSORS)
    gains, top = aggregate_logs(log_rms, log_top, KERAS_TENSORS)
    return ops.reshape(ops.stack([gains, top]), (2, 1, t))
