"""gradwatch.watch on custom tf.GradientTape loops (apply_gradients / apply intercepted)."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs Keras 3")
tf = pytest.importorskip("tensorflow", reason="the Keras backend needs TensorFlow")

from tf_helpers import data, make_model, tape_step, twin

import gradwatch
import gradwatch_tf


def _train_step(model, optimizer, compile_mode):
    loss_fn = keras.losses.MeanSquaredError()

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    if compile_mode == "eager":
        return step
    return tf.function(step, jit_compile=compile_mode == "xla")


@pytest.mark.parametrize("compile_mode", ["eager", "graph", "xla"])
def test_custom_loop_records_every_step(compile_mode):
    model = make_model("GRU")
    truth_model = twin(model)
    x, y = data(n=8)
    truth_opt = keras.optimizers.SGD(0.05)
    truth = [tape_step(truth_model, x[i : i + 2], y[i : i + 2], truth_opt) for i in range(0, 8, 2)]

    opt = keras.optimizers.SGD(0.05)
    opt.build(model.trainable_variables)
    watch = gradwatch.watch(model, opt, sinks=["memory"], profile_every=1)
    assert watch.backend == "tf"
    step = _train_step(model, opt, compile_mode)
    for i in range(0, 8, 2):
        step(tf.constant(x[i : i + 2]), tf.constant(y[i : i + 2]))
    if compile_mode != "xla":  # per-step host processing: records exist without a read
        assert watch.monitor.step_count == 4
    recs = watch.records
    assert [r.step for r in recs] == [1, 2, 3, 4]
    for rec, (per, glob, temporal) in zip(recs, truth):
        assert rec.global_norm == pytest.approx(glob, rel=1e-4)
        np.testing.assert_allclose(rec.temporal["rnn"].norms, temporal, rtol=1e-3)
    watch.close()
    assert "apply" not in vars(opt)
    watch.close()  # idempotent


def test_close_makes_an_already_traced_step_stand_aside():
    model = make_model("LSTM")
    plain = twin(model)
    x, y = data(n=4)
    opt = keras.optimizers.SGD(0.1)
    opt.build(model.trainable_variables)
    plain_opt = keras.optimizers.SGD(0.1)
    plain_opt.build(plain.trainable_variables)
    with gradwatch_tf.watch(model, opt, policy="fixed", max_norm=1e-3, sinks=["memory"]) as watch:
        step = _train_step(model, opt, "graph")
        step(tf.constant(x), tf.constant(y))
        assert watch.records[0].clip.scale < 1.0
    plain_step = _train_step(plain, plain_opt, "graph")
    plain.set_weights(model.get_weights())
    # The tf.function traced with gradwatch inside must no longer clip after close.
    step(tf.constant(x), tf.constant(y))
    plain_step(tf.constant(x), tf.constant(y))
    for a, b in zip(model.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_watching_the_same_optimizer_twice_is_an_error():
    model = make_model("SimpleRNN")
    opt = keras.optimizers.Adam()
    opt.build(model.trainable_variables)
    with (
        gradwatch_tf.watch(model, opt, sinks=["memory"]),
        pytest.raises(gradwatch.GradwatchError, match="already watched"),
    ):
        gradwatch_tf.watch(model, opt, sinks=["memory"])


@pytest.mark.parametrize("compile_mode", ["eager", "graph"])
def test_raise_in_a_custom_loop_changes_nothing(compile_mode):
    model = make_model("LSTM")
    x, y = data(n=2)
    x[1, 3, 2] = np.nan
    opt = keras.optimizers.Adam(0.1)
    opt.build(model.trainable_variables)
    before = [w.copy() for w in model.get_weights()]
    step = _train_step(model, opt, compile_mode)
    with gradwatch_tf.watch(model, opt, on_nonfinite="raise", sinks=["memory"]):
        # Eagerly the error is gradwatch's own; inside a tf.function TensorFlow wraps the
        # host callback's exception in a tf.errors.OpError that carries its message.
        expected = gradwatch.NonFiniteGradientError if compile_mode == "eager" else tf.errors.OpError
        with pytest.raises(expected, match="Non-finite gradient"):
            step(tf.constant(x), tf.constant(y))
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert int(opt.iterations.numpy()) == 0


def test_a_watch_that_records_nothing_says_so_at_close(caplog):
    """Issue 19: a Keras watch whose optimizer never steps (the user applies gradients
    with another optimizer) must not record 0 steps in silence."""
    import logging

    import keras

    import gradwatch

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    watched = keras.optimizers.SGD(0.1)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        w = gradwatch.watch(model, watched, sinks=[])
        w.close()
    assert any("recording 0 steps" in r.getMessage() for r in caplog.records)
