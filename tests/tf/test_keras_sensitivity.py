"""Per-timestep sensitivity ||dL/dx_t|| of a recurrent layer in ``fit`` and in a custom
loop, on every Keras backend, against the backend's own autodiff of the same loss on a
twin model (the weights the step used)."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs keras")

from gradwatch_tf import GradWatchCallback

BACKEND = keras.backend.backend()


def _truth(model, x, y, deep):  # type: ignore[no-untyped-def]
    """sqrt(sum over batch and features of (dL/dh_t)^2) for every t, h the LSTM's input
    and L the mean squared error."""
    rnn, head = model.get_layer("rnn"), model.layers[-1]
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        pre = model.get_layer("pre") if deep else None
        h = pre(jnp.asarray(x)) if deep else jnp.asarray(x)
        dh = jax.grad(lambda h: jnp.mean((head(rnn(h, training=True)) - y) ** 2))(h)
        dh = np.asarray(dh, np.float64)
    elif BACKEND == "torch":
        import torch

        h = torch.tensor(x)
        h = (model.get_layer("pre")(h) if deep else h).detach().requires_grad_(True)
        loss = torch.mean((head(rnn(h, training=True)) - torch.tensor(y)) ** 2)
        (dh,) = torch.autograd.grad(loss, h)
        dh = dh.double().numpy()
    else:
        import tensorflow as tf

        h = tf.constant(x)
        h = model.get_layer("pre")(h) if deep else h
        with tf.GradientTape() as tape:
            tape.watch(h)
            loss = tf.reduce_mean(tf.square(head(rnn(h, training=True)) - y))
        dh = tape.gradient(loss, h).numpy().astype(np.float64)
    return np.sqrt(np.sum(dh * dh, axis=(0, 2)))


@pytest.mark.parametrize("deep", [False, True])
def test_sensitivity_matches_autodiff_on_profiled_steps(deep):
    """``deep``: the LSTM reads the output of a Dense layer (its input needs a gradient
    anyway) rather than the data."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 3))
    h = keras.layers.Dense(3, name="pre")(inp) if deep else inp
    model = keras.Model(inp, keras.layers.Dense(1)(keras.layers.LSTM(5, name="rnn")(h)))
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((8, 6, 3)).astype("float32"), rng.standard_normal((8, 1)).astype("float32")
    want = _truth(twin, x, y, deep)
    cb = GradWatchCallback(sinks=["memory"], profile_every=2)
    try:
        model.fit(np.concatenate([x, x, x]), np.concatenate([y, y, y]), batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
        by_step = {r.step: r for r in cb.records}
        np.testing.assert_allclose(by_step[1].temporal["rnn"].norms, want, rtol=1e-4)
        assert by_step[2].temporal["rnn"].norms is not None and len(by_step[2].temporal["rnn"].norms) == 6
        assert "rnn" not in by_step[3].temporal  # not profiled
    finally:
        cb.close()



def test_sensitivity_of_a_later_profiled_step_and_training_bitwise_unwatched():
    """A later profiled step carries its own sensitivity (step 4's, against autodiff at
    the weights step 4 used), an unprofiled one none; and the probe changes nothing in
    training: the watched fits' weights are bitwise the unwatched twin's (on JAX the
    probe's backward computes dL/dx of a data input on every step, and must leave every
    gradient as it was)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 3))
    model = keras.Model(inp, keras.layers.Dense(1)(keras.layers.LSTM(5, name="rnn")(inp)))
    plain = keras.models.clone_model(model)
    plain.set_weights(model.get_weights())
    for m in (model, plain):
        m.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((32, 6, 3)).astype("float32"), rng.standard_normal((32, 1)).astype("float32")
    cb = GradWatchCallback(sinks=["memory"], profile_every=2)
    try:
        model.fit(x[:24], y[:24], batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[cb])  # steps 1-3
        twin = keras.models.clone_model(model)
        twin.set_weights(model.get_weights())
        want = _truth(twin, x[24:], y[24:], deep=False)
        model.fit(x[24:], y[24:], batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[cb])  # step 4
        by_step = {r.step: r for r in cb.records}
        assert sorted(s for s, r in by_step.items() if "rnn" in r.temporal) == [1, 2, 4]
        np.testing.assert_allclose(by_step[4].temporal["rnn"].norms, want, rtol=1e-4)
    finally:
        cb.close()
    plain.fit(x[:24], y[:24], batch_size=8, epochs=1, verbose=0, shuffle=False)
    plain.fit(x[24:], y[24:], batch_size=8, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), plain.get_weights()):
        assert np.array_equal(a, b)


@pytest.mark.skipif(BACKEND == "tensorflow", reason="TensorFlow's custom loop: tests/tf/test_tf_custom_loop.py")
def test_sensitivity_in_a_custom_loop():
    """``gradwatch.watch`` around a loop that takes the backend's own gradients (JAX:
    ``jax.grad`` of ``stateless_call``; torch: ``torch.autograd.grad``) and applies them:
    the profiled steps' sensitivity is the autodiff one, the others have none."""
    import gradwatch

    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 3))
    model = keras.Model(inp, keras.layers.Dense(1)(keras.layers.LSTM(5, name="rnn")(inp)))
    opt = keras.optimizers.SGD(0.1)
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((24, 6, 3)).astype("float32"), rng.standard_normal((24, 1)).astype("float32")
    wants = []
    with gradwatch.watch(model, opt, profile_every=2, sinks=["memory"]) as watch:
        for i in range(0, 24, 8):
            twin = keras.models.clone_model(model)
            twin.set_weights(model.get_weights())
            wants.append(_truth(twin, x[i : i + 8], y[i : i + 8], deep=False))
            grads = _grads(model, x[i : i + 8], y[i : i + 8])
            opt.apply(grads, model.trainable_variables)
        by_step = {r.step: r for r in watch.records}
    assert sorted(by_step) == [1, 2, 3]
    np.testing.assert_allclose(by_step[1].temporal["rnn"].norms, wants[0], rtol=1e-4)
    np.testing.assert_allclose(by_step[2].temporal["rnn"].norms, wants[1], rtol=1e-4)
    assert "rnn" not in by_step[3].temporal


def _grads(model, x, y):  # type: ignore[no-untyped-def]
    """The MSE loss's gradients by the backend's own autodiff, as backend tensors."""
    tvars = model.trainable_variables
    if BACKEND == "jax":
        import jax

        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss_of(trainable):  # type: ignore[no-untyped-def]
            pred, _ = model.stateless_call(trainable, non_trainable, x, training=True)
            return keras.losses.MeanSquaredError()(y, pred)

        return jax.grad(loss_of)([v.value for v in tvars])
    import torch

    loss = keras.losses.MeanSquaredError()(torch.as_tensor(y), model(torch.as_tensor(x), training=True))
    return list(torch.autograd.grad(loss, [v.value for v in tvars]))


def _lean_fit(lean: bool, monkeypatch, steps: int = 17, spe: int = 1):  # type: ignore[no-untyped-def]
    from gradwatch_tf import _kkept
    from gradwatch_tf import callback as callback_module
    from gradwatch_tf._ksites import PortableThroughTime
    from gradwatch_tf.portable import PortableAttachment

    taps, traces = [], []
    tap, parts = PortableThroughTime._tap, PortableThroughTime.parts

    def counted(self, site, x):  # type: ignore[no-untyped-def]
        taps.append(site.name)  # once per trace that holds the probe
        return tap(self, site, x)

    def traced(self, step, host_step, active):  # type: ignore[no-untyped-def]
        traces.append(self.lean)  # once per trace of a train function
        return parts(self, step, host_step, active)

    with monkeypatch.context() as m:
        m.setattr(_kkept, "BACKGROUND_COMPILE", False)  # every profiled step replayed: comparable
        m.setattr(PortableThroughTime, "_tap", counted)
        m.setattr(PortableThroughTime, "parts", traced)
        if lean:
            m.setattr(callback_module, "LEAN_SAVING_JAX", 1e9)  # worth it at once
        else:
            m.setattr(PortableAttachment, "lean_due", lambda self, steps: False)
        keras.utils.set_random_seed(0)
        inp = keras.Input((6, 3))
        model = keras.Model(inp, keras.layers.Dense(1, name="head")(keras.layers.LSTM(5, name="rnn")(inp)))
        model.compile(keras.optimizers.Adam(1e-2), "mse", steps_per_execution=spe)
        rng = np.random.default_rng(1)
        x = rng.standard_normal((4 * steps, 6, 3)).astype("float32")
        y = rng.standard_normal((4 * steps, 1)).astype("float32")
        cb = GradWatchCallback(sinks=["memory"], profile_every=5)
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
        cb.taps, cb.traces = taps, traces
        return model, cb


@pytest.mark.skipif(BACKEND != "jax", reason="the lean train function of JAX (TensorFlow's: test_tf_lean_step.py)")
@pytest.mark.parametrize("spe", [1, 3])
def test_jax_lean_steps_change_no_record_and_no_weight(monkeypatch, spe):
    """On JAX the full train function's probe computes dL/dx of a data input on every step;
    executions without a profiled step run a lean function without it. The records (the
    profiled steps' sensitivity and propagation included) and the weights are the same,
    bitwise, as with the full function on every step."""
    lean_model, lean_cb = _lean_fit(True, monkeypatch, spe=spe)
    full_model, full_cb = _lean_fit(False, monkeypatch, spe=spe)
    try:
        assert lean_cb._functions._lean is not None and lean_cb._functions.lean_ran
        assert full_cb._functions._lean is None
        # two traces (JAX caches traces by function: the lean one needs its own), the
        # probe in the full one only
        assert lean_cb.traces == [False, True] and full_cb.traces == [False]
        assert lean_cb.taps == full_cb.taps == ["rnn"]
        assert [r.to_dict() for r in lean_cb.records] == [r.to_dict() for r in full_cb.records]
        assert all(np.array_equal(a, b) for a, b in zip(lean_model.get_weights(), full_model.get_weights()))
        profiled = [r.step for r in lean_cb.records if r.temporal]
        assert profiled == [1, 5, 10, 15]
        assert all(len(lean_cb.records[s - 1].temporal["rnn"].norms) == 6 for s in profiled)
    finally:
        lean_cb.close()
        full_cb.close()
