"""GradWatchCallback inside model.fit, checked against tf.GradientTape on a twin model."""

from __future__ import annotations

import json

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs Keras 3")
tf = pytest.importorskip("tensorflow", reason="the Keras backend needs TensorFlow")

from tf_helpers import data, make_model, tape_step, twin, weights_equal

import gradwatch
from gradwatch_tf import GradWatchCallback


@pytest.mark.parametrize("cell", ["SimpleRNN", "LSTM", "GRU"])
def test_norms_and_profile_match_gradient_tape(cell):
    model = make_model(cell)
    truth_model = twin(model)
    x, y = data()
    per, glob, temporal = tape_step(truth_model, x, y)

    model.compile(keras.optimizers.SGD(0.01), "mse")
    cb = GradWatchCallback(sinks=["memory"], profile_every=1)
    hist = model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, callbacks=[cb])
    (rec,) = cb.records
    assert rec.global_norm == pytest.approx(glob, rel=1e-5)
    assert set(rec.param_norms) == set(per)
    for name, value in per.items():
        assert rec.param_norms[name] == pytest.approx(value, rel=1e-5, abs=1e-9)
    assert set(rec.layer_norms) == {"rnn", "head"}
    assert hist.history["grad_norm"][0] == pytest.approx(glob, rel=1e-5)
    profile = rec.temporal["rnn"]
    np.testing.assert_allclose(profile.norms, temporal, rtol=1e-4, atol=1e-10)
    # Spectral norm of every gate block against numpy's exact SVD of the kernel it saw.
    kernel = truth_model.get_layer("rnn").cell.recurrent_kernel.numpy()
    units = kernel.shape[0]
    gates = {"SimpleRNN": [""], "LSTM": list("ifco"), "GRU": list("zrh")}[cell]
    assert len(rec.spectral) == len(gates)
    for k, gate in enumerate(gates):
        cell_name = {"SimpleRNN": "simple_rnn_cell", "LSTM": "lstm_cell", "GRU": "gru_cell"}[cell]
        name = f"rnn/{cell_name}/recurrent_kernel" + (f"[{gate}]" if gate else "")
        exact = np.linalg.norm(kernel[:, k * units : (k + 1) * units], 2)
        assert rec.spectral[name] == pytest.approx(exact, rel=1e-3)


def test_jit_compile_and_steps_per_execution_record_every_step():
    model = make_model("LSTM")
    truth_model = twin(model)
    x, y = data(n=12)
    truth_opt = keras.optimizers.SGD(0.05)
    truth = [tape_step(truth_model, x[i : i + 2], y[i : i + 2], truth_opt) for i in range(0, 12, 2)]

    model.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=True, steps_per_execution=3)
    cb = GradWatchCallback(sinks=["memory"], profile_every=2)
    hist = model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    recs = cb.records
    assert [r.step for r in recs] == [1, 2, 3, 4, 5, 6]
    for rec, (per, glob, temporal) in zip(recs, truth):
        assert rec.global_norm == pytest.approx(glob, rel=1e-4)
        for name, value in per.items():
            assert rec.param_norms[name] == pytest.approx(value, rel=1e-4, abs=1e-8)
    assert [bool(r.temporal) for r in recs] == [True, True, False, True, False, True]
    np.testing.assert_allclose(recs[3].temporal["rnn"].norms, truth[3][2], rtol=1e-3)
    assert len(hist.history["grad_norm"]) == 1
    np.testing.assert_allclose(model.get_weights()[0], truth_model.get_weights()[0], rtol=1e-4, atol=1e-6)


def test_fixed_policy_equals_keras_global_clipnorm():
    model = make_model("GRU")
    reference = twin(model)
    x, y = data(n=8)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    reference.compile(keras.optimizers.SGD(0.1, global_clipnorm=0.05), "mse")
    cb = GradWatchCallback(policy="fixed", max_norm=0.05, sinks=["memory"])
    hist = model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    reference.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    recs = cb.records
    assert all(r.clip is not None and r.clip.policy == "fixed" and r.clip.threshold == 0.05 for r in recs)
    assert all(r.clip.scale == pytest.approx(min(1.0, 0.05 / (r.global_norm + 1e-6))) for r in recs)
    assert hist.history["clip_threshold"] == [0.05]


def test_nonfinite_batch_is_skipped_in_graph():
    model = make_model("LSTM")
    reference = twin(model)
    x, y = data(n=4)
    x[2, 1, 0] = np.nan  # second batch of two
    model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=True)
    reference.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=True)
    cb = GradWatchCallback(on_nonfinite="skip", sinks=["memory"])
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    reference.fit(x[:2], y[:2], batch_size=2, epochs=1, verbose=0, shuffle=False)
    assert weights_equal(model, reference)
    assert int(model.optimizer.iterations.numpy()) == 1
    first, second = cb.records
    assert not first.skipped and second.skipped
    assert "rnn/lstm_cell/kernel" in second.nonfinite
    assert any(e.kind == "nonfinite" for e in cb.events)


def test_nonfinite_raise_stops_fit_before_the_update():
    model = make_model("SimpleRNN")
    x, y = data(n=2)
    x[0, 0, 0] = np.inf
    model.compile(keras.optimizers.SGD(0.1), "mse")
    before = [w.copy() for w in model.get_weights()]
    cb = GradWatchCallback(on_nonfinite="raise", sinks=["memory"])
    with pytest.raises(gradwatch.NonFiniteGradientError) as info:
        model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[cb])
    assert info.value.step == 1 and "rnn/simple_rnn_cell/kernel" in info.value.params
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert "apply" not in vars(model.optimizer)


def test_fit_restores_the_model_and_saved_model_has_no_gradwatch(tmp_path):
    inp = keras.Input((5, 2))
    masked = keras.layers.Masking()(inp)
    h = keras.layers.Bidirectional(keras.layers.LSTM(3, return_sequences=True), name="bi")(masked)
    h = keras.layers.GRU(3, name="gru")(h)
    model = keras.Model(inp, keras.layers.Dense(1, name="head")(h))
    plain = twin(model)
    x, y = data(n=4, timesteps=5, features=2)
    x[:, :2] = 0.0  # masked timesteps
    opt = keras.optimizers.Adam(0.01)
    model.compile(opt, "mse")
    plain.compile(keras.optimizers.Adam(0.01), "mse")
    cb = GradWatchCallback(sinks=["memory"], profile_every=1)
    model.fit(x, y, batch_size=2, epochs=2, verbose=0, shuffle=False, callbacks=[cb])
    plain.fit(x, y, batch_size=2, epochs=2, verbose=0, shuffle=False)
    # Observing only: training is bitwise what it is without gradwatch.
    assert weights_equal(model, plain)
    rec = cb.records[-1]
    assert set(rec.temporal) == {"bi", "gru"}
    assert rec.temporal["bi"].norms[:2] == (0.0, 0.0)  # masked steps get no gradient
    assert any(k.startswith("bi/forward_") and k.endswith("[f]") for k in rec.spectral)
    # Exactly as it was: no instance attribute left, apply is the class's method again.
    assert "apply" not in vars(opt)
    assert opt.apply.__func__ is type(opt).apply
    assert not any("call" in vars(layer) for layer in model._flatten_layers())
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert len(loaded.weights) == len(model.weights)
    assert not any("gradwatch" in v.path for v in loaded.weights + loaded.optimizer.variables)
    # A later fit without the callback runs none of gradwatch's ops (the traced step was dropped).
    n = len(cb.records)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False)
    plain.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False)
    assert weights_equal(model, plain)
    assert len(cb.records) == n


def test_state_round_trips_through_json_and_resume_matches():
    x, y = data(n=12)
    opts = {"policy": gradwatch.policies.ZClip(warmup=2, z_threshold=0.5), "sinks": ["memory"], "profile_every": 0}

    whole = make_model("LSTM")
    part = twin(whole)
    whole.compile(keras.optimizers.SGD(0.1), "mse")
    cb_whole = GradWatchCallback(**opts)
    whole.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb_whole])

    part.compile(keras.optimizers.SGD(0.1), "mse")
    cb1 = GradWatchCallback(**opts)
    part.fit(x[:6], y[:6], batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb1])
    state = json.loads(json.dumps(cb1.state_dict()))
    cb2 = GradWatchCallback(**opts)
    cb2.load_state_dict(state)
    part.fit(x[6:], y[6:], batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb2])

    resumed = cb1.records + cb2.records
    assert [r.step for r in resumed] == [r.step for r in cb_whole.records] == [1, 2, 3, 4, 5, 6]
    assert [r.clip.threshold for r in resumed] == pytest.approx([r.clip.threshold for r in cb_whole.records])
    assert any(r.clip.scale < 1 for r in cb_whole.records)
    for a, b in zip(whole.get_weights(), part.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_loss_scale_optimizer_measures_unscaled_gradients():
    model = make_model("GRU")
    truth_model = twin(model)
    x, y = data(n=4)
    _, glob, _ = tape_step(truth_model, x, y)
    model.compile(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01)), "mse")
    cb = GradWatchCallback(sinks=["memory"])
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[cb])
    assert cb.records[0].global_norm == pytest.approx(glob, rel=1e-4)
    assert "apply" not in vars(model.optimizer.inner_optimizer)


def test_bad_option_is_rejected_at_construction():
    with pytest.raises(gradwatch.ConfigError):
        GradWatchCallback(on_nonfinite="explode")


def test_a_failing_profiler_is_logged_once_and_disabled(monkeypatch, caplog):
    from gradwatch.through_time.spectral import HostSpectral

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug in the spectral norm")

    monkeypatch.setattr(HostSpectral, "__call__", broken)  # in fit, the host computes them (as on JAX)
    model = make_model("LSTM")
    plain = twin(model)
    x, y = data(n=8)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    plain.compile(keras.optimizers.SGD(0.1), "mse")
    cb = GradWatchCallback(sinks=["memory"], profile_every=1)
    with caplog.at_level("ERROR", logger="gradwatch"):
        model.fit(x, y, batch_size=2, epochs=2, verbose=0, shuffle=False, callbacks=[cb])
    plain.fit(x, y, batch_size=2, epochs=2, verbose=0, shuffle=False)
    errors = [r for r in caplog.records if r.levelname == "ERROR" and "spectral" in r.getMessage()]
    assert len(errors) == 1
    assert len(cb.records) == 8 and all(not r.spectral for r in cb.records)
    assert all(r.temporal for r in cb.records)  # the rest of the profile still works
    assert weights_equal(model, plain)


def _numpy_lstm_forget_gates(x, kernel, recurrent, bias):
    """A plain numpy LSTM (Keras gate order i, f, c, o); returns outputs and forget gates."""
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))
    units = recurrent.shape[0]
    h = np.zeros((x.shape[0], units))
    c = np.zeros_like(h)
    hs, fs = [], []
    for t in range(x.shape[1]):
        z = x[:, t] @ kernel + h @ recurrent + bias
        i, f, g, o = (z[:, k * units : (k + 1) * units] for k in range(4))
        c = sig(f) * c + sig(i) * np.tanh(g)
        h = sig(o) * np.tanh(c)
        hs.append(h)
        fs.append(sig(f))
    return np.stack(hs, 1), np.stack(fs, 1)


def test_lstm_forget_gate_statistics():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 3))
    h = keras.layers.LSTM(4, return_sequences=True, name="rnn")(inp)
    model = keras.Model(inp, keras.layers.Dense(1, name="head")(keras.layers.Flatten()(h)))
    x, y = data(n=4)
    kernel, recurrent, bias = (w.astype(np.float64) for w in model.get_layer("rnn").get_weights())
    hs, fs = _numpy_lstm_forget_gates(x.astype(np.float64), kernel, recurrent, bias)
    np.testing.assert_allclose(hs, model.get_layer("rnn")(x).numpy(), rtol=1e-4, atol=1e-6)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    cb = GradWatchCallback(sinks=["memory"], profile_every=1)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[cb])
    gate = cb.records[0].gates["rnn"]
    assert gate.gate == "forget"  # the same name as the torch backend
    assert gate.mean == pytest.approx(fs.mean(), rel=1e-5)
    assert gate.log_path_gain == pytest.approx(np.log(fs).sum(axis=1).mean(), rel=1e-5)


class SubclassedGRU(keras.Model):
    def __init__(self):
        super().__init__()
        self.rnn = keras.layers.GRU(4, name="gru")
        self.head = keras.layers.Dense(1, name="head")

    def call(self, x):
        return self.head(self.rnn(x))


@pytest.mark.parametrize("kind", ["sequential", "subclassed"])
def test_models_built_inside_the_first_step_are_watched_fully(kind):
    # No Input: Keras builds these models inside the first traced step, so gradwatch
    # binds the variables and creates its probes there.
    if kind == "sequential":
        model = keras.Sequential(
            [keras.layers.LSTM(4, return_sequences=True, name="lstm"), keras.layers.Flatten(), keras.layers.Dense(1)]
        )
    else:
        model = SubclassedGRU()
    x, y = data(n=4)
    model.compile(keras.optimizers.SGD(0.0), "mse")  # lr 0: the weights stay what the step saw
    cb = GradWatchCallback(sinks=["memory"], profile_every=1)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[cb])
    xt = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xt)
        loss = keras.losses.MeanSquaredError()(y, model(xt, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    (rec,) = cb.records
    assert len(rec.param_norms) == len(model.trainable_variables)
    assert rec.global_norm == pytest.approx(float(tf.linalg.global_norm(grads)), rel=1e-5)
    (profile,) = rec.temporal.values()
    dx = tape.gradient(loss, xt).numpy()
    np.testing.assert_allclose(profile.norms, np.sqrt((dx.astype(np.float64) ** 2).sum(axis=(0, 2))), rtol=1e-4)
    assert rec.spectral
    # Gate statistics (LSTM forget gate, GRU update gate) and propagation come from the
    # forward hook, which exists from the first traced step on.
    assert {g.gate for g in rec.gates.values()} == {"forget" if kind == "sequential" else "update"}
    assert list(profile.recurrences) == ["l0"] and profile.propagation[0] == 1.0


def test_first_fit_traces_the_step_once_and_trains_bitwise_as_unwatched(monkeypatch):
    """Keras on TensorFlow creates Adam's slots inside the first trace of its train step,
    and a ``tf.function`` that created variables is traced again. The callback builds the
    optimizer before the fit: the watched step is traced once, and the weights and the
    optimizer's variables (names and values) are bitwise the unwatched twin's."""
    traces: list[int] = []
    own = keras.Model.train_step

    def counted(self, data):
        traces.append(id(self))
        return own(self, data)

    monkeypatch.setattr(keras.Model, "train_step", counted)
    model = make_model("LSTM")
    plain = twin(model)
    x, y = data()
    model.compile(keras.optimizers.Adam(0.01), "mse")
    plain.compile(keras.optimizers.Adam(0.01), "mse")
    model.fit(x, y, batch_size=2, epochs=2, verbose=0, shuffle=False, callbacks=[GradWatchCallback(sinks=["memory"])])
    plain.fit(x, y, batch_size=2, epochs=2, verbose=0, shuffle=False)
    assert traces.count(id(model)) == 1 and traces.count(id(plain)) >= 1
    assert weights_equal(model, plain)
    mine, theirs = model.optimizer.variables, plain.optimizer.variables
    assert [v.path.split("/", 1)[1] for v in mine] == [v.path.split("/", 1)[1] for v in theirs]  # (adam, adam_1)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(mine, theirs))


def test_a_custom_train_step_builds_its_optimizer_itself():
    """A model with its own ``train_step`` may apply the optimizer to fewer variables than
    the model's: the callback leaves the optimizer unbuilt for Keras to build."""

    class Own(keras.Model):
        def train_step(self, data):
            return super().train_step(data)

    inp = keras.Input((6, 3))
    model = Own(inp, keras.layers.Dense(1)(keras.layers.LSTM(4)(inp)))
    model.compile(keras.optimizers.Adam(0.01), "mse")
    seen: list[bool] = []

    class Look(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen.append(self.model.optimizer.built)

    x, y = data()
    cb = GradWatchCallback(sinks=["memory"])
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[cb, Look()])
    assert seen == [False] and model.optimizer.built and len(cb.records) == 4
