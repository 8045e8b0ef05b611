"""Diagonal (gated linear) recurrences in Keras, exact from their decays: mingru-keras'
``MinGRU``, on every backend.

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

from collections.abc import Callable
from typing import Any

from keras import ops

from gradwatch.through_time.diagonal import diagonal_logs
from gradwatch.through_time.fit import aggregate_logs
from gradwatch.through_time.plan import PROBED
from gradwatch_tf._kops import KERAS_TENSORS

__all__ = ["DIAGONAL", "Diagonal", "diagonal_of", "mingru_log_decay", "site_logs"]


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


def diagonal_of(layer: Any) -> Diagonal | None:
    """The declaration matching ``layer``'s class or one of its bases, else None."""
    for cls in type(layer).__mro__:
        found = DIAGONAL.get(f"{cls.__module__}.{cls.__qualname__}")
        if found is not None:
            return found
    return None


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
