"""Per-timestep sensitivity ||dL/dx_t|| of a recurrent layer in ``fit``, on TensorFlow and
on Keras' torch backend, against the backend's own autodiff of the same loss on a twin
model (the weights the step used). JAX has none yet (its jitted backward keeps nothing
for the host)."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs keras")

from gradwatch_tf import GradWatchCallback

BACKEND = keras.backend.backend()
pytestmark = pytest.mark.skipif(BACKEND == "jax", reason="no per-timestep sensitivity on JAX yet")


def _truth(model, x, y, deep):  # type: ignore[no-untyped-def]
    """sqrt(sum over batch and features of (dL/dh_t)^2) for every t, h the LSTM's input
    and L the mean squared error."""
    rnn, head = model.get_layer("rnn"), model.layers[-1]
    if BACKEND == "torch":
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
