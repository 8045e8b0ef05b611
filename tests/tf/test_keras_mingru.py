"""Diagonal recurrences in Keras, on every backend: mingru-keras' ``MinGRU`` in ``fit`` and a
custom loop (its propagation against float64 numpy products of the layer's own gate, a_t =
1 - z_t from ``layer.gate(x)``, at the weights each profiled step used; its sensitivity
against the backend's autodiff; the alert and its remedy; training bitwise as if unwatched),
and a layer of the user's own declared with ``gradwatch_tf.register_recurrence``."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs keras")
pytest.importorskip("mingru_keras", reason="mingru-keras is not installed (`make test` installs it)")

from mingru_keras import MinGRU

from gradwatch_tf import GradWatchCallback

BACKEND = keras.backend.backend()
#: mingru-keras' associative scan does not trace in a TensorFlow ``fit`` ("as_list() is
#: not defined on an unknown TensorShape", unwatched alike): the TensorFlow runs are eager.
EAGER = BACKEND == "tensorflow"
T, F, UNITS, B = 24, 3, 6, 8


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((T, F))
    h = MinGRU(UNITS, name="mg")(inp)
    out = keras.layers.Dense(1)(keras.layers.Lambda(lambda s: s[:, -1])(h))
    return keras.Model(inp, out)


def _twin(model: keras.Model) -> keras.Model:
    twin = _model()
    twin.set_weights(model.get_weights())
    return twin


def _data(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, T, F)).astype("float32"), rng.standard_normal((B, 1)).astype("float32")


def _propagation_truth(layer, x):  # type: ignore[no-untyped-def]
    """(gains, max_gains) over j = 0 .. T-1: products of the layer's own decays 1 - z_t in
    float64, the RMS over units then the median over the 8 probed sequences, and the max."""
    z = keras.ops.convert_to_numpy(layer.gate(x[:8])).astype(np.float64)  # (P, T, D), the package's sigmoid
    a = 1.0 - z
    rms, top = np.empty((T, a.shape[0])), np.empty((T, a.shape[0]))
    for j in range(T):
        prod = np.prod(a[:, T - j :, :], axis=1) if j else np.ones(a.shape[::2])
        rms[j], top[j] = np.sqrt(np.mean(prod**2, axis=1)), prod.max(axis=1)
    return np.exp(np.median(np.log(rms), axis=1)), top.max(axis=1)


def _sensitivity_truth(model, x, y):  # type: ignore[no-untyped-def]
    """sqrt(sum over batch and features of (dL/dx_t)^2), x the MinGRU's input (the data)."""
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        g = np.asarray(jax.grad(lambda v: jnp.mean((model(v) - y) ** 2))(jnp.asarray(x)), np.float64)
    elif BACKEND == "torch":
        import torch

        v = torch.tensor(x, requires_grad=True)
        (g,) = torch.autograd.grad(torch.mean((model(v) - torch.tensor(y)) ** 2), v)
        g = g.double().numpy()
    else:
        import tensorflow as tf

        v = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(v)
            loss = tf.reduce_mean(tf.square(model(v) - y))
        g = tape.gradient(loss, v).numpy().astype(np.float64)
    return np.sqrt(np.sum(g * g, axis=(0, 2)))


def _fit(model, x, y, batches, cbs, **kw):  # type: ignore[no-untyped-def]
    model.compile(keras.optimizers.SGD(0.5), "mse", run_eagerly=EAGER)
    xs, ys = np.concatenate([x] * batches), np.concatenate([y] * batches)
    model.fit(xs, ys, batch_size=B, epochs=1, verbose=0, shuffle=False, callbacks=cbs, **kw)


def test_propagation_and_sensitivity_match_the_layer_itself_on_each_profiled_step():
    model = _model()
    x, y = _data()
    at1 = _twin(model)  # the weights step 1 used
    at3 = _twin(model)
    _fit(at3, x, y, 2, [])  # the weights step 3 used: two unwatched updates
    cb = GradWatchCallback(sinks=["memory"], profile_every=3)
    try:
        _fit(model, x, y, 4, [cb])
        by_step = {r.step: r for r in cb.records}
    finally:
        cb.close()
    for step, twin in ((1, at1), (3, at3)):
        prof = by_step[step].temporal["mg"]
        want_gains, want_top = _propagation_truth(twin.get_layer("mg"), x)
        (rec,) = prof.recurrences.values()
        np.testing.assert_allclose(rec.gains, want_gains, rtol=1e-4)
        np.testing.assert_allclose(rec.max_gains, want_top, rtol=1e-4)
        np.testing.assert_allclose(prof.norms, _sensitivity_truth(twin, x, y), rtol=1e-4)
        assert list(prof.recurrences) == ["l0"] and prof.horizon is not None
    assert "mg" not in by_step[2].temporal and "mg" not in by_step[4].temporal  # not profiled


def test_a_fast_forgetting_mingru_gets_the_vanishing_alert_with_its_own_remedy():
    model = _model()
    x, y = _data()
    cb = GradWatchCallback(sinks=["memory"])
    try:
        _fit(model, x, y, 1, [cb])
    finally:
        cb.close()
    (prof,) = (r.temporal["mg"] for r in cb.records if "mg" in r.temporal)
    assert prof.horizon < T  # 1 - z_t near 0.5 at initialisation (no bias yet)
    (alert,) = [e for e in cb.events if e.kind == "vanishing"]
    assert alert.layer == "mg" and "the bias of gate in mingru-keras" in alert.message
    assert cb.watch.monitor.meta["recurrent_layers"]["mg"] == "mingru"


def test_training_is_bitwise_as_if_unwatched():
    model = _model()
    twin = _twin(model)
    x, y = _data()
    cb = GradWatchCallback(sinks=["memory"], profile_every=1)
    try:
        _fit(model, x, y, 3, [cb])
    finally:
        cb.close()
    _fit(twin, x, y, 3, [])
    assert len(cb.records) == 3 and all("mg" in r.temporal for r in cb.records)
    for a, b in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_custom_loop_measures_it_too():
    """``gradwatch.watch(model, optimizer)`` around a loop that takes the gradients with the
    backend's own autodiff and calls ``optimizer.apply``: the same propagation, at the
    weights of the step."""
    import gradwatch
    from tests.tf.test_keras_backends import autodiff_grads

    model = _model()
    twin = _twin(model)
    x, y = _data()
    opt = keras.optimizers.SGD(0.5)
    with gradwatch.watch(model, opt, sinks=["memory"], profile_every=1) as w:
        for _ in range(2):
            grads = autodiff_grads(model, x, y)
            opt.apply([keras.ops.convert_to_tensor(g) for g in grads], model.trainable_variables)
        records = w.records
    assert [r.step for r in records] == [1, 2]
    want_gains, want_top = _propagation_truth(twin.get_layer("mg"), x)
    (rec,) = records[0].temporal["mg"].recurrences.values()
    np.testing.assert_allclose(rec.gains, want_gains, rtol=1e-4)
    np.testing.assert_allclose(rec.max_gains, want_top, rtol=1e-4)
    assert records[1].temporal["mg"].recurrences["l0"].gains != rec.gains  # step 2's own weights


# -- a layer of the user's own, declared --------------------------------------------------------
class Leaky(keras.layers.Layer):
    """A gated leaky integrator written by hand: h_t = a_t h_{t-1} + (1 - a_t) u_t with
    a_t = sigmoid(x_t W + b), a Python loop over the steps (traces on every backend)."""

    def __init__(self, units: int, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.units = units

    def build(self, shape) -> None:  # type: ignore[no-untyped-def]
        self.w = self.add_weight(shape=(shape[-1], self.units), initializer="glorot_uniform", name="w")
        self.b = self.add_weight(shape=(self.units,), initializer=keras.initializers.Constant(1.0), name="b")
        self.v = self.add_weight(shape=(shape[-1], self.units), initializer="glorot_uniform", name="v")

    def call(self, x):  # type: ignore[no-untyped-def]
        a = keras.ops.sigmoid(keras.ops.matmul(x, self.w) + self.b)
        u = keras.ops.matmul(x, self.v)
        h = keras.ops.zeros_like(u[:, 0])
        out = []
        for t in range(x.shape[1]):
            h = a[:, t] * h + (1.0 - a[:, t]) * u[:, t]
            out.append(h)
        return keras.ops.stack(out, axis=1)


def _leaky_decay(layer, x):  # type: ignore[no-untyped-def]
    """log a_t of :class:`Leaky`, in ``keras.ops``: what a declaration hands gradwatch."""
    return keras.ops.log_sigmoid(keras.ops.matmul(x, layer.w) + layer.b)


def _fit_leaky(name: str = "leaky") -> tuple[GradWatchCallback, np.ndarray | None]:
    """A traced ``fit`` of one step of a model around a :class:`Leaky` named ``name``: the
    callback and the max gains numpy computes from the layer's decays (float64 products)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((T, F))
    out = keras.layers.Dense(1)(keras.layers.Lambda(lambda s: s[:, -1])(Leaky(UNITS, name=name)(inp)))
    model = keras.Model(inp, out)
    layer = model.get_layer(name)
    w, b = (keras.ops.convert_to_numpy(v).astype(np.float64) for v in (layer.w, layer.b))
    x, y = _data()
    a = 1.0 / (1.0 + np.exp(-(x[:8].astype(np.float64) @ w + b)))  # the decays, by numpy
    model.compile(keras.optimizers.SGD(0.1), "mse")  # traced on every backend (no eager needed)
    cb = GradWatchCallback(sinks=["memory"])
    try:
        model.fit(x, y, batch_size=B, epochs=1, verbose=0, callbacks=[cb])
    finally:
        cb.close()
    return cb, np.array([np.prod(a[:, T - j :, :], axis=1).max() if j else 1.0 for j in range(T)])


def test_a_declared_layer_of_ones_own_is_measured_exactly_and_undeclared_left_alone():
    import gradwatch_tf

    with pytest.raises(TypeError, match="decay must be callable"):
        gradwatch_tf.register_recurrence(Leaky, decay=None)
    declared = gradwatch_tf.register_recurrence(Leaky, decay=_leaky_decay, kind="leaky")
    try:
        cb, top = _fit_leaky()
    finally:
        gradwatch_tf.unregister_recurrence(declared)
    np.testing.assert_allclose(cb.records[0].temporal["leaky"].recurrences["l0"].max_gains, top, rtol=1e-4)
    assert cb.watch.monitor.meta["recurrent_layers"]["leaky"] == "leaky"
    cb, _ = _fit_leaky()
    assert not cb.records[0].temporal  # no longer declared: not a recurrence to gradwatch


def test_a_plugin_declares_a_keras_layer_through_the_same_hook_as_a_pytorch_module():
    """A package ships its Keras layer's declaration by entry point: ``Recurrence`` named by
    qualified name, ``decay(layer, x)``; a loop-cell declaration (PyTorch-only) is skipped."""
    from gradwatch.hookspecs import hookimpl
    from gradwatch.plugins import get_plugin_manager
    from gradwatch.through_time.families import Recurrence

    class Plugin:
        @hookimpl
        def gradwatch_register_recurrences(self):  # type: ignore[no-untyped-def]
            return [
                Recurrence(f"{Leaky.__module__}.Leaky", decay=_leaky_decay, kind="fromplugin"),
                Recurrence(f"{Leaky.__module__}.Leaky", step=True, kind="loopcell"),  # not for Keras
            ]

    pm, plugin = get_plugin_manager(), Plugin()
    pm.register(plugin)
    try:
        cb, top = _fit_leaky()
    finally:
        pm.unregister(plugin)
    np.testing.assert_allclose(cb.records[0].temporal["leaky"].recurrences["l0"].max_gains, top, rtol=1e-4)
    assert cb.watch.monitor.meta["recurrent_layers"]["leaky"] == "fromplugin"


def test_a_broken_plugin_is_logged_and_the_fit_goes_on(caplog):  # type: ignore[no-untyped-def]
    from gradwatch.hookspecs import hookimpl
    from gradwatch.plugins import get_plugin_manager

    class Broken:
        @hookimpl
        def gradwatch_register_recurrences(self):  # type: ignore[no-untyped-def]
            raise RuntimeError("plugin bug")

    pm, plugin = get_plugin_manager(), Broken()
    pm.register(plugin)
    try:
        model, (x, y) = _model(), _data()
        cb = GradWatchCallback(sinks=["memory"])
        try:
            _fit(model, x, y, 2, [cb])
        finally:
            cb.close()
    finally:
        pm.unregister(plugin)
    assert len(cb.records) == 2 and "mg" in cb.records[0].temporal  # the built-in MinGRU still measured
    assert "gradwatch_register_recurrences failed (RuntimeError: plugin bug)" in caplog.text
