"""Recurrent layers: finding them, wrapping their call, probing their input gradient, gate blocks.

The layer's ``call`` is wrapped on the instance (restored at close). The wrapper

* puts the *sensitivity probe* on the input: a ``tf.custom_gradient`` identity whose
  gradient function writes the per-timestep sum of squares of dL/dx_t into a
  fixed-shape variable (static shape: XLA);
* hands what the call saw (input, mask, initial state, training, the cells' dropout
  masks) to a hook that measures *propagation* on profiled steps
  (:mod:`gradwatch_tf._propagation`, :mod:`gradwatch_tf._kreplay`).

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
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from gradwatch_tf._kcells import GATE_ORDER, capture_dropout, gate_blocks
from gradwatch_tf._kdiag import diagonal_of, plugin_declarations

logger = logging.getLogger("gradwatch")

#: Keras gate order in the columns of ``recurrent_kernel`` (units, k * units).
GATES = GATE_ORDER
RNN_LAYERS = ("SimpleRNN", "LSTM", "GRU")


@dataclass
class SpectralBlock:
    """One gate block of a recurrent kernel and the warm-start vector of its power iteration."""

    name: str  # e.g. "lstm/lstm_cell/recurrent_kernel[f]"
    kernel: Any  # keras Variable
    start: int
    stop: int
    vector: tf.Variable | None = None
    #: True while ``vector`` has not been iterated yet (no exact warm start was possible).
    #: The iteration runs to a tolerance either way; kept for the attachment's state.
    cold: tf.Variable | None = None
    #: The runner-up right singular vector (the power iteration works on two vectors).
    second: tf.Variable | None = None


@dataclass
class RecurrentSite:
    """A probed layer: a SimpleRNN/LSTM/GRU (or ``RNN(cell)``), a Bidirectional around one,
    or a diagonal recurrence (``diag``: mingru-keras' MinGRU, measured from its decays)."""

    layer: Any
    name: str  # the layer's path: the key of ``temporal``
    cells: list[Any] = field(default_factory=list)
    length: int | None = None  # timesteps, when static
    anchor: Any = None  # a trainable variable of the layer (see module docstring)
    sq: tf.Variable | None = None  # per-timestep sum of squares of dL/dx_t
    #: [mean keep gate, mean sum_t log gate] of the last replay (LSTM forget, GRU update).
    gate_stats: tf.Variable | None = None
    frozen: bool = False  # the ring layout is fixed: create no more variables
    #: (recurrence name, RNN layer) per direction: ("l0", layer) or, for a Bidirectional,
    #: ("l0", forward_layer) and ("l0_reverse", backward_layer).
    directions: list[tuple[str, Any]] = field(default_factory=list)
    prop: tf.Variable | None = None  # [2, R, T] log gains and log max gains of the last replay
    prop_step: tf.Variable | None = None  # the optimizer step that replay was for
    #: Per cell (by id): the dropout masks the cell made during the current call.
    dropout: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: A diagonal recurrence (:mod:`gradwatch_tf._kdiag`, mingru-keras' MinGRU): no cells,
    #: measured in the step from its decays; None for the cells' layers.
    diag: Any = None

    @property
    def recurrences(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.directions)

    @property
    def gate_name(self) -> str | None:
        """"forget" (LSTM), "update" (GRU), None (SimpleRNN, or mixed directions)."""
        names = {_GATE_NAMES.get(_class_name(cell)) for cell in self.cells}
        return names.pop() if len(names) == 1 else None


#: The keep gate each gated cell reports: LSTM's forget gate f, GRU's update gate z
#: (Keras: h = z h_prev + (1 - z) h~, so z carries the state over, like f).
_GATE_NAMES = {"LSTMCell": "forget", "GRUCell": "update"}


def kind_of(site: RecurrentSite) -> str:
    """What the core's remedies need to know: "lstm", "gru", "rnn_tanh", "rnn_relu", ...
    (a diagonal recurrence: its family, "mingru")"""
    if site.diag is not None:
        return str(site.diag.kind)
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
    """Every SimpleRNN / LSTM / GRU (or ``RNN`` of one such cell) of the model, a
    Bidirectional counting as one site with two recurrences ("l0", "l0_reverse"): its
    input is what both directions read."""
    keras = _keras()
    sites: list[RecurrentSite] = []
    inner: set[int] = set()
    layers = _walk(model)
    for layer in layers:
        if isinstance(layer, keras.layers.Bidirectional):
            directions = []
            for name, sub in (("l0", layer.forward_layer), ("l0_reverse", layer.backward_layer)):
                inner.add(id(sub))
                if _is_rnn(sub):
                    directions.append((name, sub))
            if directions:
                cells = [sub.cell for _, sub in directions]
                sites.append(RecurrentSite(layer, layer.path, cells, _input_length(layer), directions=directions))
    for layer in layers:
        if id(layer) in inner or not _is_rnn(layer):
            continue
        sites.append(RecurrentSite(layer, layer.path, [layer.cell], _input_length(layer), directions=[("l0", layer)]))
    taken = {id(site.layer) for site in sites} | inner
    plugins = plugin_declarations()
    for layer in layers:  # diagonal recurrences (mingru-keras' MinGRU, declared layers)
        diag = diagonal_of(layer, plugins) if id(layer) not in taken else None
        if diag is not None:
            sites.append(RecurrentSite(layer, layer.path, [], _input_length(layer), directions=[("l0", layer)], diag=diag))
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
        if site.prop is None and site.length is not None and replay_feasible(site):
            rec = len(site.directions)
            site.prop = make(np.zeros([2, rec, site.length], np.float32), tf.float32, "gradwatch_propagation")
            site.prop_step = make(0, tf.int64, "gradwatch_propagation_step")
            if site.gate_name is not None:
                site.gate_stats = make(np.zeros([2], np.float32), tf.float32, "gradwatch_gates")


def recurrence_weights(site: RecurrentSite) -> dict[str, list[str]]:
    """Recurrence name -> the paths of its recurrent kernel (the prefix of its spectral
    names), so an alert about "l0_reverse" quotes that direction's singular value."""
    out: dict[str, list[str]] = {}
    for name, layer in site.directions:
        kernel = getattr(getattr(layer, "cell", None), "recurrent_kernel", None)
        if kernel is not None and isinstance(getattr(kernel, "path", None), str):
            out[name] = [kernel.path]
    return out


def spectral_blocks(site: RecurrentSite) -> list[SpectralBlock]:
    return [SpectralBlock(*block) for block in gate_blocks(site.cells)]


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


def replay_feasible(site: RecurrentSite) -> bool:
    """Propagation (and gate statistics) can be measured: every direction runs one of
    Keras' own cells (SimpleRNNCell, LSTMCell, GRUCell), whose Jacobians the replay
    knows (:mod:`gradwatch_tf._kcells`); the hook captures the cells' dropout masks."""
    from gradwatch_tf._kcells import supported

    if site.diag is not None:  # exact from its decays, at any size
        return True
    return bool(site.directions) and all(supported(layer.cell, True, masks=True) for _, layer in site.directions)


#: The name ``attach.py`` asks: the replay measures the gates of every gated layer now
#: (Bidirectional, ``return_sequences=False``, dropout and initial states included).
forget_gate_feasible = replay_feasible


@dataclass
class CallArgs:
    """What one call of a recurrent layer received, by meaning (not by position)."""

    inputs: Any
    initial_state: Any = None
    mask: Any = None
    training: Any = None


def _bind(signature: inspect.Signature | None, inputs: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallArgs:
    named: dict[str, Any] = dict(kwargs)
    if signature is not None:
        try:
            named = dict(signature.bind(inputs, *args, **kwargs).arguments)
        except TypeError:
            named = dict(kwargs)
    mask = named.get("mask")
    if isinstance(mask, (list, tuple)):
        mask = mask[0] if mask else None
    return CallArgs(inputs, named.get("initial_state"), mask, named.get("training"))


def wrap_call(
    site: RecurrentSite, probe: Callable[[Any], Any], hook: Any = None, live: Callable[[], bool] | None = None
) -> Callable[[], None]:
    """Put ``probe`` on the first argument of ``layer.call`` (instance attribute) and,
    with a ``hook`` (``before(CallArgs) -> context | None``, ``after(context)``), let it
    see every call; the cells' dropout masks are recorded for it.

    Returns the function that restores the layer and its cells: it deletes the instance
    attributes, so ``layer.call`` is the class's method again and nothing of gradwatch
    stays on the layer (a model saved afterwards contains no trace of it). Calling
    ``wrap_call`` again after that wraps again.

    ``live()`` is asked first at every call: False (the wrapper outside the fit it was
    installed for; the attachment has already restored everything) runs the layer's own
    call, nothing of gradwatch.
    """
    layer = site.layer
    original = layer.call
    try:
        signature: inspect.Signature | None = inspect.signature(original)
    except (TypeError, ValueError):
        signature = None
    # the cells' dropout masks of each call, into the site (restored with the layer)
    undo = [capture_dropout((cell, site.dropout.setdefault(id(cell), {})) for cell in site.cells)] if hook else []

    @functools.wraps(original)
    def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if live is not None and not live():
            return original(inputs, *args, **kwargs)
        context = None
        if hook is not None:
            try:
                context = hook.before(_bind(signature, inputs, args, kwargs))
            except Exception as exc:  # noqa: BLE001 - the hook reports its own errors; never the user's call
                logger.debug("gradwatch: recurrent hook failed: %r", exc)
        outputs = original(probe(inputs), *args, **kwargs)
        if context is not None:
            try:
                hook.after(context)
            except Exception as exc:  # noqa: BLE001 - as above
                logger.debug("gradwatch: recurrent hook failed: %r", exc)
        return outputs

    object.__setattr__(layer, "call", call)

    def restore() -> None:
        if layer.__dict__.get("call") is call:
            object.__delattr__(layer, "call")
        for fn in reversed(undo):
            fn()

    return restore
