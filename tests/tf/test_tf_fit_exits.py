"""Every way out of a watched ``fit`` restores the model and optimizer and flushes the sinks.

Keras' ``fit`` has no try/finally: a callback, the input pipeline or Ctrl-C can leave it
without ``on_train_end``. The reference is an unwatched clone trained the same way after
the crash (plain SGD: no optimizer state, so a fresh copy of it is the same optimizer).
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs Keras 3")

from tf_helpers import data, make_model, twin

import gradwatch
from gradwatch_tf import GradWatchCallback

FUNCTIONS = ("train_function", "test_function", "predict_function")
BATCHES = 4  # per epoch: 8 samples, batch size 2


class RaiseOnEpochEnd(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise RuntimeError("a user's callback failed")


class InterruptAtBatch(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 1:
            raise KeyboardInterrupt


def _failing_generator(x, y):
    for i in range(0, 4, 2):  # two good batches, then the pipeline fails
        yield x[i : i + 2], y[i : i + 2]
    raise ValueError("the input pipeline failed")


def _crash(model, cb, way, x, y):
    if way == "callback":
        with pytest.raises(RuntimeError, match="callback failed"):
            model.fit(x, y, batch_size=2, epochs=2, verbose=0, shuffle=False, callbacks=[cb, RaiseOnEpochEnd()])
        return BATCHES
    if way == "interrupt":
        with pytest.raises(KeyboardInterrupt):
            model.fit(x, y, batch_size=2, epochs=2, verbose=0, shuffle=False, callbacks=[cb, InterruptAtBatch()])
        return 2
    assert way == "generator"
    with pytest.raises(Exception, match="input pipeline failed"):
        model.fit(_failing_generator(x, y), steps_per_epoch=BATCHES, epochs=1, verbose=0, callbacks=[cb])
    return 2


@pytest.mark.parametrize("way", ["callback", "generator", "interrupt"])
def test_every_way_out_of_fit_restores_model_and_optimizer(way, tmp_path):
    x, y = data(n=8)
    model = make_model("LSTM")
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.evaluate(x, y, verbose=0)  # the user's own test and predict functions exist
    model.predict(x, verbose=0)
    users = {a: getattr(model, a) for a in FUNCTIONS}
    path = tmp_path / "run.jsonl"
    cb = GradWatchCallback(policy="fixed", max_norm=1e-4, sinks=[f"jsonl:{path}"], log_every=1000)

    crashed_steps = _crash(model, cb, way, x, y)

    # The crashed fit's steps are in the run file at once (log_every has not come round).
    steps = gradwatch.read_run(path).steps.step.tolist()
    assert steps == list(range(1, crashed_steps + 1))

    # A plain fit afterwards runs none of gradwatch's ops: as an unwatched clone.
    clone = twin(model)
    clone.compile(keras.optimizers.SGD(0.1), "mse")
    before = [w.copy() for w in model.get_weights()]
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False)
    clone.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), clone.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(model.get_weights(), before))
    assert moved > 1e-3  # clipped at 1e-4, 4 steps of lr 0.1 could move 4e-5 at most
    assert "apply" not in vars(model.optimizer)
    assert "call" not in vars(model.get_layer("rnn"))
    for a in ("test_function", "predict_function"):
        assert getattr(model, a) is users[a]
    assert not hasattr(model.train_function, "__gradwatch_guarded__")

    # The next watched fit continues the run file, without the plain fit's steps.
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    cb.close()
    steps = gradwatch.read_run(path).steps.step.tolist()
    assert steps == list(range(1, crashed_steps + BATCHES + 1))
    assert "apply" not in vars(model.optimizer)


@pytest.mark.skipif(
    keras.backend.backend() == "jax",
    reason="on JAX a wrapper that heals inside the next fit's jit trace cannot take gradwatch's variables out of "
    "the state that fit is already tracing; there the guards (tested above) are what restores",
)
def test_a_stale_wrapper_heals_even_after_recompiling(tmp_path):
    """No guard saw the fit end (simulated: the callback never hears of it) and the model
    was compiled again, so the later fit traces afresh through gradwatch's wrappers: they
    restore everything and delegate."""
    x, y = data(n=8)
    model = make_model("LSTM")
    model.compile(keras.optimizers.SGD(0.1), "mse")
    cb = GradWatchCallback(policy="fixed", max_norm=1e-4, sinks=["memory"])
    cb._guard_fit = lambda frame, model: None  # no guard: only self-healing is left

    class Abort(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb, Abort()])
    assert "apply" in vars(model.optimizer)  # left behind: what self-healing is for
    optimizer = model.optimizer
    model.compile(optimizer, "mse")  # drops the traced functions: the next fit retraces
    clone = twin(model)
    clone.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False)
    clone.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), clone.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert "apply" not in vars(model.optimizer)
    assert "call" not in vars(model.get_layer("rnn"))
    assert len(cb.records) == 1
