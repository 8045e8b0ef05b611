"""Small models and ground truth (plain tf.GradientTape, never gradwatch's own output)."""

from __future__ import annotations

import keras
import numpy as np

CELLS = {"SimpleRNN": keras.layers.SimpleRNN, "LSTM": keras.layers.LSTM, "GRU": keras.layers.GRU}


def make_model(cell: str = "LSTM", timesteps: int = 6, features: int = 3, units: int = 4, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((timesteps, features))
    h = CELLS[cell](units, name="rnn")(inp)
    out = keras.layers.Dense(1, name="head")(h)
    return keras.Model(inp, out)


def twin(model: keras.Model) -> keras.Model:
    """An identical, independent copy (same architecture, same weights)."""
    other = keras.models.clone_model(model)
    other.set_weights(model.get_weights())
    return other


def data(n: int = 8, timesteps: int = 6, features: int = 3, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, timesteps, features)).astype("float32")
    y = rng.standard_normal((n, 1)).astype("float32")
    return x, y


def tape_step(model: keras.Model, x: np.ndarray, y: np.ndarray, optimizer=None):
    """Ground truth: per-variable gradient norms, global norm, per-timestep input norms.

    Optionally applies the (unclipped) gradients with ``optimizer``.
    """
    import tensorflow as tf  # TensorFlow's autodiff: the TensorFlow backend's ground truth

    xt = tf.constant(x)
    loss_fn = keras.losses.MeanSquaredError()
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xt)
        loss = loss_fn(y, model(xt, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    dx = tape.gradient(loss, xt).numpy().astype(np.float64)
    per = {
        v.path: float(np.linalg.norm(g.numpy().astype(np.float64))) for v, g in zip(model.trainable_variables, grads)
    }
    glob = float(np.sqrt(sum(n * n for n in per.values())))
    temporal = np.sqrt(np.sum(dx * dx, axis=(0, 2)))
    if optimizer is not None:
        optimizer.apply(grads, model.trainable_variables)
    return per, glob, temporal


def weights_equal(a: keras.Model, b: keras.Model) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))
