"""Embedding gradients (``tf.IndexedSlices`` with repeated ids) measured as the dense gradient.

References: ``tf.GradientTape`` on a twin with each gradient made dense by
``tf.convert_to_tensor`` (which sums repeated ids), and ``Adam(global_clipnorm=c)`` applied
to those dense gradients. (Given the slices themselves, Keras' own ``global_clipnorm``
makes the same mistake: it takes the norm of the slices' values, sqrt(2) for one row
looked up twice where the gradient's norm is 2.)
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs Keras 3")
tf = pytest.importorskip("tensorflow", reason="the Keras backend needs TensorFlow")

if keras.backend.backend() != "tensorflow":  # IndexedSlices are TensorFlow's
    pytest.skip("IndexedSlices gradients exist on the TensorFlow backend only", allow_module_level=True)

from tf_helpers import twin

from gradwatch_tf import GradWatchCallback

VOCAB, DIM, T = 20, 4, 6


def _model() -> keras.Model:
    keras.utils.set_random_seed(3)
    inp = keras.Input((T,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, DIM, name="emb")(inp)
    h = keras.layers.GlobalAveragePooling1D()(h)
    out = keras.layers.Dense(1, name="head")(h)
    return keras.Model(inp, out)


def _data(n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    x = rng.integers(0, 5, size=(n, T)).astype("int32")  # 5 ids over 48 places: many repeats
    y = rng.standard_normal((n, 1)).astype("float32")
    return x, y


def _dense_norms(model: keras.Model, x: np.ndarray, y: np.ndarray) -> tuple[dict[str, float], float]:
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    assert isinstance(grads[0], tf.IndexedSlices)  # the case under test
    per = {v.path: float(np.linalg.norm(tf.convert_to_tensor(g).numpy().astype(np.float64))) for v, g in zip(model.trainable_variables, grads)}
    return per, float(np.sqrt(sum(n * n for n in per.values())))


@pytest.mark.parametrize("jit", [False, True])
def test_embedding_norms_sum_repeated_ids(jit):
    model = _model()
    x, y = _data()
    per, glob = _dense_norms(twin(model), x, y)
    emb = model.get_layer("emb").embeddings.path
    model.compile(keras.optimizers.SGD(0.0), "mse", jit_compile=jit)
    cb = GradWatchCallback(sinks=["memory"])
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, callbacks=[cb])
    (rec,) = cb.records
    assert rec.param_norms[emb] == pytest.approx(per[emb], rel=1e-5)
    assert rec.global_norm == pytest.approx(glob, rel=1e-5)


def _reference_fit(model, x, y, optimizer, *, dense: bool, max_norm: float) -> None:
    """The fit below by hand: batches of 4, 2 epochs, gradients clipped to ``max_norm``
    on the norm of the dense gradient (``tf.convert_to_tensor`` sums repeated ids)."""
    for _epoch in range(2):
        for i in range(0, len(x), 4):
            with tf.GradientTape() as tape:
                loss = keras.losses.MeanSquaredError()(y[i : i + 4], model(x[i : i + 4], training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            if dense:  # the optimizer's own global_clipnorm clips
                optimizer.apply([tf.convert_to_tensor(g) for g in grads], model.trainable_variables)
                continue
            norm = np.sqrt(sum(float(np.sum(np.square(tf.convert_to_tensor(g).numpy(), dtype=np.float64))) for g in grads))
            factor = min(1.0, max_norm / norm)
            grads = [tf.IndexedSlices(g.values * factor, g.indices, g.dense_shape) if isinstance(g, tf.IndexedSlices) else g * factor for g in grads]
            optimizer.apply(grads, model.trainable_variables)


@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_fixed_policy_on_embedding_clips_on_the_dense_norm(optimizer):
    """SGD: against ``SGD(global_clipnorm=c)`` on the dense gradients. Adam treats repeated
    slices its own way (its second moment squares each slice before they are summed), so
    its reference gets the slices themselves, scaled by hand by min(1, c / dense norm)."""
    c = 0.01
    model = _model()
    reference = twin(model)
    x, y = _data(16)
    make = getattr(keras.optimizers, optimizer)
    model.compile(make(0.05), "mse")
    cb = GradWatchCallback(policy="fixed", max_norm=c, sinks=["memory"])
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, shuffle=False, callbacks=[cb])
    if optimizer == "SGD":
        _reference_fit(reference, x, y, make(0.05, global_clipnorm=c), dense=True, max_norm=c)
    else:
        _reference_fit(reference, x, y, make(0.05), dense=False, max_norm=c)
    assert len(cb.records) == 8 and all(r.clip is not None and r.clip.clipped for r in cb.records)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_agc_on_embedding_uses_the_summed_rows():
    """AGC (Brock et al. 2021) by hand on the dense gradient: each unit (a column of a
    Keras kernel, the whole of a vector) scaled by min(1, 0.01 max(|w|, 1e-3) / |g|)."""
    model = _model()
    reference = twin(model)
    x, y = _data()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    cb = GradWatchCallback(policy="agc", sinks=["memory"])
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, callbacks=[cb])
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, reference(x, training=True))
    grads = tape.gradient(loss, reference.trainable_variables)
    for v, g in zip(reference.trainable_variables, grads):
        w, g = v.numpy().astype(np.float64), tf.convert_to_tensor(g).numpy().astype(np.float64)
        axes = tuple(range(w.ndim - 1)) if w.ndim > 1 else None
        wn = np.sqrt(np.sum(w * w, axis=axes, keepdims=True))
        gn = np.sqrt(np.sum(g * g, axis=axes, keepdims=True))
        limit = np.maximum(wn, 1e-3) * 0.01
        factor = np.where(gn > limit, limit / np.maximum(gn, 1e-6), 1.0)
        assert np.any(factor < 1)
        v.assign((w - 0.1 * g * factor).astype(np.float32))
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
