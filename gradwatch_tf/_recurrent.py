"""Recurrent layers: finding them, probing their input gradient per timestep, gate blocks.

The probe is a ``tf.custom_gradient`` identity put on the layer's input by wrapping the
layer's ``call`` on the instance (restored at close). Its gradient function writes the
per-timestep sum of squares of dL/dx_t into a fixed-shape variable (static shape: XLA).

Why the probe reads one of the layer's own trainable variables: Keras asks the tape for
gradients with respect to the model's trainable variables only, and TensorFlow prunes
every backward path that does not lead to one. The input of the first recurrent layer is
data, so a plain identity on it is never differentiated and its gradient function never
runs. Reading the layer's kernel inside the custom-gradient function puts the probe on a
path to a requested source; the probe returns an exact zero for that kernel, and adding
0.0 leaves the kernel's gradient bitwise unchanged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

logger = logging.getLogger("gradwatch")

#: Keras gate order in the columns of ``recurrent_kernel`` (units, k * units).
GATES: dict[str, tuple[str, ...]] = {
    "LSTMCell": ("i", "f", "c", "o"),
    "GRUCell": ("z", "r", "h"),
    "SimpleRNNCell": ("",),
}
RNN_LAYERS = ("SimpleRNN", "LSTM", "GRU")


@dataclass
class SpectralBlock:
    """One gate block of a recurrent kernel and the warm-start vector of its power iteration."""

    name: str  # e.g. "lstm/lstm_cell/recurrent_kernel[f]"
    kernel: Any  # keras Variable
    start: int
    stop: int
    vector: tf.Variable | None = None
    #: True while ``vector`` is not yet near the singular vector (no exact warm start was
    #: possible): the first profiled step then iterates longer.
    cold: tf.Variable | None = None


@dataclass
class RecurrentSite:
    """A probed layer: a SimpleRNN/LSTM/GRU or a Bidirectional around one."""

    layer: Any
    name: str  # the layer's path: the key of ``temporal``
    cells: list[Any] = field(default_factory=list)
    length: int | None = None  # timesteps, when static
    anchor: Any = None  # a trainable variable of the layer (see module docstring)
    sq: tf.Variable | None = None  # per-timestep sum of squares of dL/dx_t
    gate_stats: tf.Variable | None = None  # [mean forget gate, log path gain] (LSTM)
    frozen: bool = False  # the ring layout is fixed: create no more variables


def kind_of(site: RecurrentSite) -> str:
    """What the core's remedies need to know: "lstm", "gru", "rnn_tanh", "rnn_relu", ..."""
    cell = site.cells[0] if site.cells else None
    name = _class_name(cell)
    if name == "LSTMCell":
        return "lstm"
    if name == "GRUCell":
        return "gru"
    act = getattr(getattr(cell, "activation", None), "__name__", "tanh")
    return f"rnn_{act}"


def _class_name(obj: Any) -> str:
    return type(obj).__name__


def _is_rnn(layer: Any) -> bool:
    keras = _keras()
    return isinstance(layer, keras.layers.RNN) and _class_name(getattr(layer, "cell", None)) in GATES


def _keras() -> Any:
    import keras

    return keras


def _walk(layer: Any) -> list[Any]:
    """Every layer under ``layer`` (depth first), the layer itself excluded."""
    out = []
    for sub in getattr(layer, "_layers", []) or []:
        out.append(sub)
        out.extend(_walk(sub))
    return out


def _input_length(layer: Any) -> int | None:
    """Static number of timesteps of the layer's input, if the model knows it."""
    for getter in (
        lambda: layer.input.shape,
        lambda: next(iter(layer._build_shapes_dict.values())),
    ):
        try:
            shape = getter()
            if isinstance(shape, (list, tuple)) and shape and isinstance(shape[0], (list, tuple)):
                shape = shape[0]
            n = shape[1]
            if n is not None:
                return int(n)
        except Exception:  # noqa: BLE001, S112 - any missing attribute means "unknown"
            continue
    return None


def find_sites(model: Any) -> list[RecurrentSite]:
    """Every SimpleRNN / LSTM / GRU of the model, a Bidirectional counting as one site
    (its input is what both directions read; its two cells are both kept for spectra)."""
    keras = _keras()
    sites: list[RecurrentSite] = []
    inner: set[int] = set()
    layers = _walk(model)
    for layer in layers:
        if isinstance(layer, keras.layers.Bidirectional):
            cells = []
            for sub in (layer.forward_layer, layer.backward_layer):
                inner.add(id(sub))
                if _is_rnn(sub):
                    cells.append(sub.cell)
            if cells:
                sites.append(RecurrentSite(layer, layer.path, cells, _input_length(layer)))
    for layer in layers:
        if id(layer) in inner or not _is_rnn(layer):
            continue
        sites.append(RecurrentSite(layer, layer.path, [layer.cell], _input_length(layer)))
    return sites


def ensure_site_variables(site: RecurrentSite, make: Callable[..., tf.Variable], x: Any = None) -> None:
    """Create the site's probe (and forget-gate) variables once the layer is built.

    Called eagerly at attach for a built model, or from inside the first traced call of
    an unbuilt one (``tf.init_scope`` lifts the creation out of the graph, as Keras does
    for its own lazily built variables). ``x`` (the layer input) gives the sequence
    length when the model did not record it.
    """
    if site.frozen:
        return
    site.name = getattr(site.layer, "path", None) or site.layer.name
    if site.anchor is None:
        trainable = list(site.layer.trainable_weights)
        site.anchor = trainable[0] if trainable else None
    if site.anchor is None:
        return
    length = site.length
    if length is None and x is not None and hasattr(x, "shape") and x.shape.rank == 3 and x.shape[1] is not None:
        length = int(x.shape[1])
    if length is None:
        length = _input_length(site.layer)
    with tf.init_scope():
        if site.sq is None and length is not None:
            site.length = length
            site.sq = make(np.zeros([length], np.float32), tf.float32, "gradwatch_temporal")
        if site.gate_stats is None and forget_gate_feasible(site):
            site.gate_stats = make(np.zeros([2], np.float32), tf.float32, "gradwatch_gates")


def spectral_blocks(site: RecurrentSite) -> list[SpectralBlock]:
    blocks = []
    for cell in site.cells:
        kernel = getattr(cell, "recurrent_kernel", None)
        gates = GATES.get(_class_name(cell))
        if kernel is None or gates is None or len(kernel.shape) != 2:
            continue
        units = int(kernel.shape[0])
        if int(kernel.shape[1]) != units * len(gates):
            continue
        for i, gate in enumerate(gates):
            name = kernel.path + (f"[{gate}]" if gate else "")
            blocks.append(SpectralBlock(name, kernel, i * units, (i + 1) * units))
    return blocks


def make_probe(
    site: RecurrentSite, make: Callable[..., tf.Variable], on_error: Callable[[BaseException], None]
) -> Callable[[Any], Any]:
    """The identity whose gradient records per-timestep sums of squares into ``site.sq``."""

    def probe(x: Any) -> Any:
        try:
            return _probed(x)
        except Exception as exc:  # noqa: BLE001 - the layer then runs unprobed
            on_error(exc)
            return x

    def _probed(x: Any) -> Any:
        ensure_site_variables(site, make, x)
        sq_var, anchor = site.sq, site.anchor
        if sq_var is None or anchor is None:
            return x
        if not (hasattr(x, "shape") and x.shape.rank == 3 and x.shape[1] == int(sq_var.shape[0])):
            return x
        anchor_var = variable_of(anchor)
        if not isinstance(anchor_var, tf.Variable):
            # Keras is building the layer in a stateless (symbolic) pass; the real
            # forward pass comes after and is probed then.
            return x

        @tf.custom_gradient
        def _identity(x: tf.Tensor) -> Any:
            anchor_var.read_value()

            def grad(dy: tf.Tensor, variables: Any = None) -> Any:
                zeros = [tf.zeros_like(v) for v in (variables or [])]
                try:
                    sq = tf.reduce_sum(tf.square(tf.cast(dy, tf.float32)), axis=[0, 2])
                    write = sq_var.assign(sq)
                    with tf.control_dependencies([write]):
                        return tf.identity(dy), [tf.identity(z) for z in zeros]
                except Exception as exc:  # noqa: BLE001 - never break the backward pass
                    on_error(exc)
                    return dy, zeros

            return tf.identity(x), grad

        return _identity(x)

    return probe


def variable_of(v: Any) -> tf.Variable:
    """The ``tf.Variable`` behind a Keras variable (``.value`` may be a plain tensor while
    Keras is still initialising it inside a trace)."""
    inner = getattr(v, "_value", None)
    if isinstance(inner, tf.Variable):
        return inner
    value = getattr(v, "value", v)
    return value if isinstance(value, tf.Variable) else v


def forget_gate_feasible(site: RecurrentSite) -> bool:
    """Forget-gate statistics can be recomputed exactly from the layer's input and output
    when the output holds every timestep (``return_sequences=True``), the layer runs
    forwards, and no dropout perturbs the gates (a plain LSTM, not a Bidirectional)."""
    layer = site.layer
    cell = getattr(layer, "cell", None)
    return (
        _class_name(cell) == "LSTMCell"
        and getattr(layer, "return_sequences", False)
        and not getattr(layer, "return_state", False)
        and not getattr(layer, "go_backwards", False)
        and not getattr(cell, "dropout", 0)
        and not getattr(cell, "recurrent_dropout", 0)
        and not getattr(layer, "stateful", False)
    )


def forget_gate_stats(cell: Any, x: tf.Tensor, h: tf.Tensor, mask: Any = None) -> tf.Tensor:
    """[mean of f_t, mean over batch and units of sum_t log f_t] for a Keras LSTM.

    f_t = recurrent_activation(x_t W_f + h_{t-1} U_f + b_f), with h_{-1} = 0 and Keras'
    gate order i, f, c, o in the columns; h is the layer's output sequence. Masked
    timesteps (where the layer keeps its state) are left out of both statistics.
    """
    units = int(cell.units)
    x = tf.stop_gradient(tf.cast(x, tf.float32))
    h = tf.stop_gradient(tf.cast(h, tf.float32))
    h_prev = tf.concat([tf.zeros_like(h[:, :1]), h[:, :-1]], axis=1)
    w = tf.convert_to_tensor(cell.kernel.value)[:, units : 2 * units]
    u = tf.convert_to_tensor(cell.recurrent_kernel.value)[:, units : 2 * units]
    z = tf.einsum("btf,fu->btu", x, tf.cast(w, tf.float32)) + tf.einsum("btv,vu->btu", h_prev, tf.cast(u, tf.float32))
    if cell.use_bias:
        z = z + tf.cast(tf.convert_to_tensor(cell.bias.value)[units : 2 * units], tf.float32)
    f = tf.cast(cell.recurrent_activation(z), tf.float32)
    if mask is not None:
        m = tf.cast(mask, tf.float32)[:, :, None] * tf.ones_like(f)
    else:
        m = tf.ones_like(f)
    mean = tf.reduce_sum(f * m) / tf.maximum(tf.reduce_sum(m), 1.0)
    log_gain = tf.reduce_sum(tf.math.log(tf.maximum(f, 1e-30)) * m, axis=1)  # (batch, units)
    return tf.stack([mean, tf.reduce_mean(log_gain)])


def wrap_call(
    site: RecurrentSite,
    probe: Callable[[Any], Any],
    after: Callable[[Any, Any, Any], None] | None = None,
) -> Callable[[], None]:
    """Put ``probe`` on the first argument of ``layer.call`` (instance attribute).

    Returns the function that restores the layer: it deletes the instance attribute, so
    ``layer.call`` is the class's method again and nothing of gradwatch stays on the layer
    (a model saved afterwards contains no trace of it).
    """
    layer = site.layer
    original = layer.call

    @functools.wraps(original)
    def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
        outputs = original(probe(inputs), *args, **kwargs)
        if after is not None:
            after(inputs, outputs, kwargs.get("mask"))
        return outputs

    object.__setattr__(layer, "call", call)

    def restore() -> None:
        if layer.__dict__.get("call") is call:
            object.__delattr__(layer, "call")

    return restore
