"""GradWatchCallback over several ``fit`` calls: one trace, complete run files, clean exits."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs Keras 3")
tf = pytest.importorskip("tensorflow", reason="the Keras backend needs TensorFlow")

from tf_helpers import data, make_model, tape_step, twin

import gradwatch
from gradwatch_tf import GradWatchCallback


class Counting(keras.layers.Layer):
    """An identity whose Python body counts its runs: it runs when a step is traced, never
    when a trace is reused."""

    calls = 0

    def call(self, x):
        type(self).calls += 1
        return x


def counted_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 3))
    h = keras.layers.LSTM(4, name="rnn")(Counting(name="count")(inp))
    return keras.Model(inp, keras.layers.Dense(1, name="head")(h))


def fit_traces(model, x, y, callbacks, fits=3) -> list[int]:
    out = []
    for _ in range(fits):
        before = Counting.calls
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
        out.append(Counting.calls - before)
    return out


def memory_sink(cb):
    return next(s for s in cb.monitor.sinks if isinstance(s, gradwatch.MemorySink))


def no_gradwatch_left(model) -> bool:
    opt = model.optimizer
    return "apply" not in vars(opt) and not any("call" in vars(layer) for layer in model._flatten_layers())


def test_later_fits_reuse_the_first_trace():
    x, y = data(n=8)
    plain = counted_model()
    plain.compile(keras.optimizers.Adam(0.01), "mse")
    unwatched = fit_traces(plain, x, y, [])
    model = counted_model()
    model.compile(keras.optimizers.Adam(0.01), "mse")
    cb = GradWatchCallback(sinks=["memory"], profile_every=1)
    watched = fit_traces(model, x, y, [cb])
    assert watched[0] > 0
    assert watched[1:] == unwatched[1:] == [0, 0]
    assert [r.step for r in cb.records] == list(range(1, 7))


def test_records_of_a_reused_trace_match_gradient_tape():
    model = make_model("GRU")
    truth_model = twin(model)
    x, y = data(n=4)
    truth_opt = keras.optimizers.SGD(0.1)
    truth = [tape_step(truth_model, x, y, truth_opt) for _ in range(3)]
    model.compile(keras.optimizers.SGD(0.1), "mse")
    cb = GradWatchCallback(sinks=["memory"], profile_every=1)
    for _ in range(3):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[cb])
    recs = cb.records
    assert [r.step for r in recs] == [1, 2, 3]
    for rec, (_, glob, temporal) in zip(recs, truth):
        assert rec.global_norm == pytest.approx(glob, rel=1e-5)
        np.testing.assert_allclose(rec.temporal["rnn"].norms, temporal, rtol=1e-4, atol=1e-10)


def test_policy_acts_in_every_fit_and_its_state_carries_over():
    x, y = data(n=12)
    opts = {"policy": gradwatch.policies.ZClip(warmup=2, z_threshold=0.5), "sinks": ["memory"], "profile_every": 0}
    whole = make_model("LSTM")
    split = twin(whole)
    whole.compile(keras.optimizers.SGD(0.1), "mse")
    split.compile(keras.optimizers.SGD(0.1), "mse")
    cb_whole = GradWatchCallback(**opts)
    whole.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb_whole])
    cb = GradWatchCallback(**opts)
    for i in range(0, 12, 4):
        split.fit(x[i : i + 4], y[i : i + 4], batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    assert any(r.clip.scale < 1 for r in cb.records[2:])  # clipping happened in later fits
    assert [r.clip.threshold for r in cb.records] == pytest.approx([r.clip.threshold for r in cb_whole.records])
    for a, b in zip(whole.get_weights(), split.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_a_later_unwatched_fit_runs_no_gradwatch_ops():
    # A policy that clips every step to almost nothing: if any of its ops ran in the
    # unwatched fit, the weights would barely move there.
    model = make_model("LSTM")
    x, y = data(n=4)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    cb = GradWatchCallback(policy="fixed", max_norm=1e-9, sinks=["memory"], profile_every=1)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[cb])
    assert no_gradwatch_left(model)
    plain = twin(model)
    plain.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    plain.fit(x, y, batch_size=4, epochs=1, verbose=0)
    for a, b in zip(model.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert len(cb.records) == 1


@pytest.mark.parametrize("change", ["compile", "jit_compile", "run_eagerly"])
def test_a_changed_compilation_is_traced_again_and_measured(change):
    model = make_model("SimpleRNN")
    truth_model = twin(model)
    x, y = data(n=4)
    first = keras.optimizers.SGD(0.1)
    model.compile(first, "mse")
    cb = GradWatchCallback(sinks=["memory"])
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[cb])
    tape_step(truth_model, x, y, keras.optimizers.SGD(0.1))
    if change == "compile":
        model.compile(keras.optimizers.SGD(0.1), "mse", steps_per_execution=2)
    else:
        setattr(model, change, True)
    _, glob, _ = tape_step(truth_model, x, y)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[cb])
    assert [r.step for r in cb.records] == [1, 2]
    assert cb.records[1].global_norm == pytest.approx(glob, rel=1e-5)
    assert "apply" not in vars(first) and no_gradwatch_left(model)


def test_run_file_has_every_step_at_the_end_of_fit_without_close(tmp_path):
    path = tmp_path / "run.jsonl"
    model = make_model("LSTM")
    x, y = data(n=12)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    cb = GradWatchCallback(sinks=[f"jsonl:{path}"], log_every=4)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[cb])  # 6 steps
    steps = [r.step for r in gradwatch.read_jsonl(path) if isinstance(r, gradwatch.StepRecord)]
    assert steps[-1] == 6
    model.fit(x[:6], y[:6], batch_size=2, epochs=1, verbose=0, callbacks=[cb])  # 3 more
    steps = [r.step for r in gradwatch.read_jsonl(path) if isinstance(r, gradwatch.StepRecord)]
    assert steps[-1] == 9
    cb.close()


def test_fit_stopped_by_an_exception_flushes_and_restores():
    model = make_model("GRU")
    x, y = data(n=8)
    x[6, 0, 0] = 1e3  # the fourth batch of two: the input pipeline fails there

    def check(xi, yi):
        tf.debugging.assert_less(tf.reduce_max(xi), 100.0, message="bad batch")
        return xi, yi

    bad = tf.data.Dataset.from_tensor_slices((x, y)).map(check).batch(2)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    cb = GradWatchCallback(sinks=["memory"], log_every=50)
    with pytest.raises(tf.errors.InvalidArgumentError, match="bad batch"):
        model.fit(bad, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    sink = memory_sink(cb)
    assert [r.step for r in sink.records] == [3]
    assert sink.records[0].window.steps == 3
    assert no_gradwatch_left(model)
    assert not hasattr(model.train_function, "__gradwatch_guarded__")  # the one Keras made
    # The next fit goes on counting.
    model.fit(x[:6], y[:6], batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    assert [r.step for r in cb.records] == [1, 2, 3, 4, 5, 6]


def test_nonfinite_raise_flushes_the_window():
    model = make_model("SimpleRNN")
    x, y = data(n=4)
    x[2, 0, 0] = np.inf  # second batch
    model.compile(keras.optimizers.SGD(0.1), "mse")
    cb = GradWatchCallback(on_nonfinite="raise", sinks=["memory"])
    with pytest.raises(gradwatch.NonFiniteGradientError):
        model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    sink = memory_sink(cb)
    assert [r.step for r in sink.records] == [2]
    assert no_gradwatch_left(model)


def test_close_after_fits_leaves_the_model_as_it_was():
    model = make_model("LSTM")
    x, y = data(n=4)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    users = model.train_function
    cb = GradWatchCallback(sinks=["memory"], profile_every=1)
    for _ in range(2):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[cb])
        assert model.train_function is users
    cb.close()
    cb.close()
    assert no_gradwatch_left(model) and model.train_function is users
    assert cb._kept is None and cb._functions is None


def test_state_loaded_between_fits_reaches_the_kept_trace():
    model = make_model("LSTM")
    x, y = data(n=6)
    model.compile(keras.optimizers.SGD(0.0), "mse")
    cb = GradWatchCallback(sinks=["memory"], profile_every=2)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb])  # steps 1-3
    state = cb.state_dict()
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb])  # steps 4-6
    cb.load_state_dict(state)  # back to step 3: the in-graph step counter must follow
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    last = cb.records[-3:]
    assert [r.step for r in last] == [4, 5, 6]
    assert [bool(r.temporal) for r in last] == [True, False, True]  # profiled: step 1 and even steps


def test_a_fit_refused_at_train_begin_leaves_the_callback_usable():
    model = make_model("GRU")
    x, y = data(n=4)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    cb = GradWatchCallback(sinks=["memory"])
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[cb])
    other = gradwatch.watch(model)  # holds the optimizer now
    with pytest.raises(gradwatch.GradwatchError, match="already watched"):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[cb])
    other.close()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[cb])
    assert [r.step for r in cb.records] == [1, 2]
    cb.close()
    assert no_gradwatch_left(model)
