"""Facts the remedies read when an alert is written (``monitor.live``), for Keras layers.

Why not the attach-time ``meta["forget_bias"]``: training moves the forget-gate bias,
and an alert at step 120 that quotes the bias of step 0 as "now" teaches users to
distrust the rest of the message. The reader is called only when an alert about a
recurrence is written (rare, rate-limited), so its one small host read costs nothing on
other steps. On JAX inside ``fit`` the trained values live in the trainer's state, not
in the layer's variables (Keras writes them back when it syncs, at the latest at the end
of an epoch), so the reader takes the bias from that state when the model has one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

__all__ = ["cell_forget_bias", "forget_bias_reader", "site_forget_bias"]


def _to_numpy(value: Any) -> np.ndarray:
    try:
        import keras

        return np.asarray(keras.ops.convert_to_numpy(value), np.float64).reshape(-1)
    except Exception:  # noqa: BLE001 - a tf.Variable outside Keras' converter
        return np.asarray(value.numpy() if hasattr(value, "numpy") else value, np.float64).reshape(-1)


def _current(variable: Any, model: Any) -> Any:
    """The variable's value now: on JAX during ``fit`` the trainer's state holds it (the
    variable itself is stale or purged until Keras syncs)."""
    state = getattr(model, "_jax_state", None) if model is not None else None
    if state and not getattr(model, "_jax_state_synced", True):
        values = state.get("trainable_variables")
        if values is not None:
            for v, value in zip(model.trainable_variables, values):
                if v is variable:
                    return value
    return variable.value if hasattr(variable, "value") else variable


def cell_forget_bias(cell: Any, model: Any = None) -> float | None:
    """The mean forget-gate bias (Keras gate order i, f, c, o) of an ``LSTMCell`` now (0
    without a bias: the gate starts at sigmoid(0)); None for other cells. Raises where the
    value cannot be read (a variable still being built inside a trace)."""
    if type(cell).__name__ != "LSTMCell":
        return None
    bias = getattr(cell, "bias", None)
    if bias is None:
        return 0.0
    b = _to_numpy(_current(bias, model))
    units = int(cell.units)
    return float(b[units : 2 * units].mean())


def site_forget_bias(site: Any) -> float | None:
    """The smallest mean forget-gate bias over a recurrent site's directions, for the run
    file's header and the remedies' fallback; None unless every direction is an LSTM whose
    bias can be read now."""
    try:
        means = [cell_forget_bias(getattr(layer, "cell", None)) for _, layer in site.directions]
    except Exception:  # noqa: BLE001 - still being initialised inside a trace
        return None
    if not means or any(m is None for m in means):
        return None
    return min(m for m in means if m is not None)


def forget_bias_reader(sites: Iterable[Any], model_ref: Callable[[], Any] | None = None) -> Callable[[str, str], float | None]:
    """``read(layer, recurrence)``: :func:`cell_forget_bias` of that direction of a site,
    None for other layers. ``sites`` have ``name`` and ``directions`` ([(recurrence, RNN
    layer)]); ``model_ref`` (a weak reference) lets the JAX trainer's state be read."""
    by_name = {s.name: s for s in sites}

    def read(layer: str, recurrence: str) -> float | None:
        site = by_name.get(layer)
        for name, rnn in site.directions if site is not None else ():
            if name == recurrence:
                return cell_forget_bias(getattr(rnn, "cell", None), model_ref() if model_ref is not None else None)
        return None

    return read
