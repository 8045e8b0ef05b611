"""Propagation through time in Keras (TemporalProfile.recurrences), the gate statistics of
the same replay, and the spectral norms, against numpy ground truth written here: the
per-step Jacobians of each Keras cell from the layer's weights, multiplied out in float64.
"""

from __future__ import annotations

import contextlib
import math
import threading

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs Keras 3")
tf = pytest.importorskip("tensorflow", reason="the Keras backend needs TensorFlow")

from keras_numpy_truth import ACTS, _gate, _sigmoid, cell_params, exact, step  # noqa: F401 - the numpy truth

import gradwatch
import gradwatch_tf
from gradwatch_tf import GradWatchCallback


def horizon(gains, ratio=1e-3):
    below = np.flatnonzero(np.asarray(gains) < ratio)
    return int(below[0]) if below.size else len(gains)


def rate(gains):
    return gradwatch.Propagation.from_gains(gains).rate


# ----------------------------------------------------------------------------- helpers


def data(n=10, t=12, f=3, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, t, f)).astype("float32"), rng.standard_normal((n, 1)).astype("float32")


def one_step(model, x, y, **options):
    """One optimizer step in fit at learning rate 0 (the weights stay what it saw)."""
    model.compile(keras.optimizers.SGD(0.0), "mse")
    cb = GradWatchCallback(sinks=["memory"], profile_every=1, **options)
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    (rec,) = cb.records
    return rec, cb


def single(layer, t=12, f=3, name="rnn"):
    inp = keras.Input((t, f))
    return keras.Model(inp, keras.layers.Dense(1, name="head")(layer(inp)))


def gains_of(rec, layer="rnn", recurrence="l0", top=False):
    r = rec.temporal[layer].recurrences[recurrence]
    return np.asarray(r.max_gains if top else r.gains)


def assert_gains(got, want, rtol=2e-4):
    """Equal in log (the values span many decades)."""
    np.testing.assert_allclose(
        np.log(got), np.log(want), rtol=0, atol=rtol * max(1.0, float(np.max(np.abs(np.log(want)))))
    )


# ----------------------------------------------------------------------------- exactness

CELLS = {
    "rnn-tanh": lambda: keras.layers.SimpleRNN(6, name="rnn"),
    "rnn-relu": lambda: keras.layers.SimpleRNN(6, activation="relu", name="rnn"),
    "rnn-softsign": lambda: keras.layers.SimpleRNN(6, activation="softsign", name="rnn"),  # derivative by autodiff
    "lstm": lambda: keras.layers.LSTM(4, name="rnn"),
    "gru": lambda: keras.layers.GRU(5, name="rnn"),
    "gru-reset-before": lambda: keras.layers.GRU(5, reset_after=False, name="rnn"),
    "rnn-cell": lambda: keras.layers.RNN(keras.layers.GRUCell(5, name="cell"), name="rnn"),
}


@pytest.mark.parametrize("cell", list(CELLS))
def test_small_state_propagation_is_exact(cell):
    model = single(CELLS[cell]())
    x, y = data()
    rec, _ = one_step(model, x, y)
    want, _ = exact(cell_params(model.get_layer("rnn")), x)
    got = gains_of(rec)
    assert got[0] == 1.0 and len(got) == 12
    assert_gains(got, want)
    top, _ = exact(cell_params(model.get_layer("rnn")), x, top=True)
    assert_gains(gains_of(rec, top=True), top)


@pytest.mark.parametrize(
    "make",
    [
        lambda: keras.layers.SimpleRNN(40, name="rnn"),
        lambda: keras.layers.LSTM(20, name="rnn"),
        lambda: keras.layers.GRU(32, reset_after=False, name="rnn"),
    ],
    ids=["rnn", "lstm", "gru"],
)
def test_large_state_estimate_is_within_1_5x_and_its_rate_within_5_percent(make):
    model = single(make(), t=40)
    x, y = data(n=12, t=40)
    want, _ = exact(cell_params(model.get_layer("rnn")), x)
    want_top, _ = exact(cell_params(model.get_layer("rnn")), x, top=True)
    model.compile(keras.optimizers.SGD(0.0), "mse")
    cb = GradWatchCallback(sinks=["memory"], profile_every=1)
    model.fit(
        np.concatenate([x] * 4),
        np.concatenate([y] * 4),
        batch_size=12,
        epochs=1,
        verbose=0,
        shuffle=False,
        callbacks=[cb],
    )
    assert len(cb.records) == 4  # four steps: four independent draws of the probe directions
    for rec in cb.records:
        got = gains_of(rec)
        assert np.max(np.abs(np.log(got / want))) < math.log(1.5)
        assert rate(got) == pytest.approx(rate(want), rel=0.05)
        top = gains_of(rec, top=True)
        # The largest gain: that of the block of dominant directions (tangents started at
        # several offsets, as on every backend), a lower bound within the contract's 1.5x.
        assert np.max(np.abs(np.log(top / want_top))) < math.log(1.5)
        assert np.all(top <= want_top * (1 + 1e-4))


def test_bidirectional_has_a_forward_and_a_reversed_recurrence():
    inp = keras.Input((12, 3))
    bi = keras.layers.Bidirectional(keras.layers.LSTM(3, name="inner"), name="bi")
    model = keras.Model(inp, keras.layers.Dense(1)(bi(inp)))
    x, y = data()
    rec, _ = one_step(model, x, y)
    prof = rec.temporal["bi"]
    assert list(prof.recurrences) == ["l0", "l0_reverse"]
    fwd, fwd_gate = exact(cell_params(bi.forward_layer), x)
    back, back_gate = exact(cell_params(bi.backward_layer), x, backwards=True)
    assert_gains(gains_of(rec, "bi", "l0"), fwd)
    assert_gains(gains_of(rec, "bi", "l0_reverse"), back)
    # The gate statistics are those of the direction whose memory path closes most.
    mean, log_gain = min(fwd_gate, back_gate, key=lambda g: g[1])
    assert rec.gates["bi"].mean == pytest.approx(mean, rel=1e-5)
    assert rec.gates["bi"].log_path_gain == pytest.approx(log_gain, rel=1e-5)


def test_go_backwards_gets_what_the_forward_layer_gets_on_reversed_input():
    x, y = data(t=30)
    back = single(keras.layers.SimpleRNN(8, go_backwards=True, name="rnn"), t=30)
    fwd = single(keras.layers.SimpleRNN(8, name="rnn"), t=30)
    fwd.set_weights(back.get_weights())
    rec_back, cb_back = one_step(back, x, y)
    rec_fwd, cb_fwd = one_step(fwd, x[:, ::-1].copy(), y)
    assert_gains(gains_of(rec_back), gains_of(rec_fwd), rtol=1e-5)
    assert_gains(gains_of(rec_back), exact(cell_params(back.get_layer("rnn")), x, backwards=True)[0])
    kinds = lambda cb: sorted(e.kind for e in cb.events if e.layer == "rnn")
    assert kinds(cb_back) == kinds(cb_fwd)


@pytest.mark.parametrize("where", ["post", "pre"])
def test_padding_gets_the_verdict_of_the_unpadded_data(where):
    x, y = data(t=30)
    pad = np.zeros((len(x), 4, 3), np.float32)
    padded = np.concatenate([x, pad] if where == "post" else [pad, x], axis=1)
    plain = single(keras.layers.GRU(6, name="rnn"), t=30)
    inp = keras.Input((34, 3))
    layer = keras.layers.GRU(6, name="rnn")
    masked = keras.Model(inp, keras.layers.Dense(1, name="head")(layer(keras.layers.Masking()(inp))))
    masked.set_weights(plain.get_weights())
    rec_plain, cb_plain = one_step(plain, x, y)
    rec_pad, cb_pad = one_step(masked, padded, y)
    g_plain, g_pad = gains_of(rec_plain), gains_of(rec_pad)
    if where == "post":  # four identity steps at the end, then the data's own gains
        np.testing.assert_allclose(g_pad[:5], 1.0, rtol=1e-6)
        assert_gains(g_pad[4:], g_plain, rtol=1e-5)
    else:  # the data's gains, then the product over all its steps, carried through the padding
        assert_gains(g_pad[:30], g_plain, rtol=1e-5)
        assert np.ptp(np.log(g_pad[30:])) < 1e-6
    mask = np.abs(padded).sum(-1) > 0
    assert_gains(g_pad, exact(cell_params(layer), padded, mask=mask)[0])
    verdict = lambda cb: sorted(e.kind for e in cb.events if e.layer == "rnn")
    assert verdict(cb_pad) == verdict(cb_plain) == ["vanishing"]
    assert rec_pad.temporal["rnn"].horizon - rec_plain.temporal["rnn"].horizon == (4 if where == "post" else 0)


def test_every_layer_of_a_stack_has_its_own_recurrence():
    inp = keras.Input((12, 3))
    first = keras.layers.LSTM(4, return_sequences=True, name="first")
    second = keras.layers.GRU(5, name="second")
    mid = first(inp)
    model = keras.Model(inp, keras.layers.Dense(1)(second(mid)))
    x, y = data()
    h = keras.Model(inp, mid)(x).numpy()
    rec, _ = one_step(model, x, y)
    assert_gains(gains_of(rec, "first"), exact(cell_params(first), x)[0])
    assert_gains(gains_of(rec, "second"), exact(cell_params(second), h)[0])


def test_the_users_initial_state_is_where_the_trajectory_starts():
    x, y = data()
    rng = np.random.default_rng(5)
    h0, c0 = (rng.standard_normal((len(x), 4)).astype("float32") * 2.0 for _ in range(2))
    inp, ih, ic = keras.Input((12, 3)), keras.Input((4,)), keras.Input((4,))
    lstm = keras.layers.LSTM(4, name="rnn")
    model = keras.Model([inp, ih, ic], keras.layers.Dense(1)(lstm(inp, initial_state=[ih, ic])))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    cb = GradWatchCallback(sinks=["memory"], profile_every=1)
    model.fit([x, h0, c0], y, batch_size=len(x), epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    (rec,) = cb.records
    want, (mean, log_gain) = exact(cell_params(lstm), x, init=[h0, c0])
    assert_gains(gains_of(rec), want)
    zero_start, _ = exact(cell_params(lstm), x)
    assert np.max(np.abs(np.log(want / zero_start))) > 1e-3  # the start matters here
    gate = rec.gates["rnn"]
    assert gate.gate == "forget"
    assert gate.mean == pytest.approx(mean, rel=1e-5)
    assert gate.log_path_gain == pytest.approx(log_gain, rel=1e-5)


def test_a_stateful_layer_starts_from_the_states_it_carried_over():
    x, y = data(n=8)
    inp = keras.Input(batch_shape=(4, 12, 3))
    gru = keras.layers.GRU(5, stateful=True, name="rnn")
    model = keras.Model(inp, keras.layers.Dense(1)(gru(inp)))
    starts = []

    class States(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            starts.append([v.numpy().copy() for v in gru.states])

    model.compile(keras.optimizers.SGD(0.0), "mse")
    cb = GradWatchCallback(sinks=["memory"], profile_every=1)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False, callbacks=[States(), cb])
    assert np.abs(starts[1][0]).max() > 0.1  # the second batch starts where the first ended
    for k, rec in enumerate(cb.records):
        assert_gains(gains_of(rec), exact(cell_params(gru), x[4 * k : 4 * k + 4], init=starts[k])[0])


def test_dropout_replays_the_masks_the_layer_used(monkeypatch):
    x, y = data(n=6, f=3)
    lstm = keras.layers.LSTM(4, dropout=0.3, recurrent_dropout=0.4, name="rnn")
    model = single(lstm)
    rng = np.random.default_rng(7)
    masks = {
        3: [(rng.random((6, 3)) > 0.3).astype("float32") / 0.7 for _ in range(4)],  # input (F = 3)
        4: [(rng.random((6, 4)) > 0.4).astype("float32") / 0.6 for _ in range(4)],  # recurrent (u = 4)
    }
    monkeypatch.setattr(
        lstm.cell,
        "_create_dropout_mask",
        lambda step_input, rate: [tf.constant(m) for m in masks[step_input.shape[-1]]],
    )
    rec, _ = one_step(model, x, y)
    want, (mean, _) = exact(cell_params(lstm), x, dp=masks[3], rdp=masks[4])
    assert_gains(gains_of(rec), want)
    assert rec.gates["rnn"].mean == pytest.approx(mean, rel=1e-5)
    without, _ = exact(cell_params(lstm), x)
    assert np.max(np.abs(np.log(want / without))) > 1e-2  # the masks matter here


def test_gate_statistics_of_a_layer_without_return_sequences_use_the_first_eight_sequences():
    x, y = data(n=12)
    model = single(keras.layers.GRU(5, name="rnn"))  # return_sequences=False
    rec, _ = one_step(model, x, y)
    _, (mean, log_gain) = exact(cell_params(model.get_layer("rnn")), x)
    gate = rec.gates["rnn"]
    assert gate.gate == "update"
    assert gate.mean == pytest.approx(mean, rel=1e-5)
    assert gate.log_path_gain == pytest.approx(log_gain, rel=1e-5)


def test_a_trained_model_is_measured_on_the_weights_of_each_step():
    x, y = data(n=32, t=15)
    model = single(keras.layers.LSTM(4, name="rnn"), t=15)
    seen = []

    class Weights(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(cell_params(self.model.get_layer("rnn")))

    model.compile(keras.optimizers.Adam(0.05), "mse")
    cb = GradWatchCallback(sinks=["memory"], profile_every=1)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[Weights(), cb])
    assert len(cb.records) == 8
    assert np.abs(seen[-1]["U"] - seen[0]["U"]).max() > 0.05  # the weights did move
    for k, rec in enumerate(cb.records):
        batch = x[(k % 4) * 8 : (k % 4 + 1) * 8]
        assert_gains(gains_of(rec), exact(seen[k], batch)[0])


def test_alerts_agree_with_the_exact_horizon():
    x, y = data(t=60)
    model = single(keras.layers.SimpleRNN(12, name="rnn"), t=60)
    _, cb = one_step(model, x, y)
    want, _ = exact(cell_params(model.get_layer("rnn")), x, top=True)  # the horizon is judged on the largest gain
    assert horizon(want) < 60
    (event,) = [e for e in cb.events if e.layer == "rnn"]
    assert event.kind == "vanishing" and event.value == horizon(want)
    assert f"after {horizon(want)} of 60 steps" in event.message


# ----------------------------------------------------------------------------- where it runs


@pytest.mark.parametrize("compile_mode", ["graph", "xla"])
def test_custom_gradient_tape_loop_measures_propagation(compile_mode):
    x, y = data(n=8, t=12)
    model = single(keras.layers.GRU(5, name="rnn"))
    opt = keras.optimizers.SGD(0.0)
    opt.build(model.trainable_variables)
    watch = gradwatch_tf.watch(model, opt, sinks=["memory"], profile_every=2)

    @tf.function(jit_compile=compile_mode == "xla")
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(y, model(x))  # training not passed: the tape says so
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))

    for _ in range(3):
        train_step(tf.constant(x), tf.constant(y))
    recs = watch.records
    watch.close()
    assert [bool(r.temporal) for r in recs] == [True, True, False]
    want, _ = exact(cell_params(model.get_layer("rnn")), x)
    for rec in recs[:2]:
        assert_gains(gains_of(rec), want)


def test_steps_per_execution_replays_each_profiled_step_on_its_own_batch():
    x, y = data(n=12, t=12)
    model = single(keras.layers.SimpleRNN(6, name="rnn"))
    model.compile(keras.optimizers.SGD(0.0), "mse", steps_per_execution=3, jit_compile=True)
    cb = GradWatchCallback(sinks=["memory"], profile_every=2)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    params = cell_params(model.get_layer("rnn"))
    recs = cb.records
    assert [bool(r.temporal.get("rnn") and r.temporal["rnn"].recurrences) for r in recs] == [
        True,
        True,
        False,
        True,
        False,
        True,
    ]
    for k in (0, 1, 3, 5):
        assert_gains(gains_of(recs[k]), exact(params, x[2 * k : 2 * k + 2])[0])


def test_the_kept_copies_are_capped_in_bytes_and_the_steps_left_out_say_so(monkeypatch, caplog):
    """With the kept copies capped (``_kkept.KEPT_BYTES``) to one slot, an execution of
    three steps keeps its last profiled step only: steps 1 and 4 are left out (no number
    of another step's), 2 and 6 measured exactly; an INFO line says how many are kept."""
    import logging

    from gradwatch_tf import _kkept

    monkeypatch.setattr(_kkept, "KEPT_BYTES", 1)
    x, y = data(n=12, t=12)
    model = single(keras.layers.SimpleRNN(6, name="rnn"))
    model.compile(keras.optimizers.SGD(0.0), "mse", steps_per_execution=3, jit_compile=True)
    cb = GradWatchCallback(sinks=["memory"], profile_every=2)
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    recs = cb.records
    measured = [bool(r.temporal.get("rnn") and r.temporal["rnn"].recurrences) for r in recs]
    assert measured == [False, True, False, False, False, True]
    params = cell_params(model.get_layer("rnn"))
    for k in (1, 5):
        assert_gains(gains_of(recs[k]), exact(params, x[2 * k : 2 * k + 2])[0])
    assert "1 of the 2 profiled steps an execution can hold keep their inputs" in caplog.text


def test_layers_with_an_undeclared_sequence_length_are_measured():
    inp = keras.Input((None, 3))
    model = keras.Model(inp, keras.layers.Dense(1)(keras.layers.LSTM(4, name="rnn")(inp)))
    x, y = data()
    rec, _ = one_step(model, x, y)
    assert_gains(gains_of(rec), exact(cell_params(model.get_layer("rnn")), x)[0])
    assert len(rec.temporal["rnn"].norms) == 12


def test_evaluation_and_unprofiled_steps_do_not_replay():
    x, y = data(n=10)
    model = single(keras.layers.LSTM(4, name="rnn"))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    cb = GradWatchCallback(sinks=["memory"], profile_every=3)
    last_replayed = []

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):  # after validation
            att = cb.watch.attachment
            (site,) = att._sites
            # fit keeps what the host replays (gradwatch_tf._tfhost): the last step kept
            last_replayed.append(int(max(att._host._kept[id(site)].wstep.numpy())))

    model.fit(x, y, batch_size=2, epochs=1, verbose=0, validation_data=(x, y), callbacks=[cb, Probe()])
    assert [bool(r.temporal) for r in cb.records] == [True, False, True, False, False]
    # The counter reads 6 (a profiled step) during validation: still no replay there.
    assert last_replayed == [3]


def test_a_layer_whose_replay_is_costly_replays_on_every_nth_profiled_step():
    # LSTM(256) at batch 256: a replay (8 sequences, 20 steps, 6 probe rows, 4 dominant
    # tangents refined) counts about 0.25 of the layer's training step
    # (gradwatch_tf._kreplay.costs), more than the 5% budget, so only every n-th
    # profiled step replays (the first always); the per-timestep norms and spectral norms
    # stay on every profiled step.
    x, y = data(n=2560, t=20, f=8)
    model = single(keras.layers.LSTM(256, name="rnn"), t=20, f=8)
    model.compile(keras.optimizers.SGD(0.0), "mse")
    cb = GradWatchCallback(sinks=["memory"], profile_every=1)
    model.fit(x, y, batch_size=256, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    replayed = [bool(r.temporal["rnn"].recurrences) for r in cb.records]
    assert replayed[0] and not all(replayed)
    n = replayed[1:].index(True) + 1
    assert replayed == [k % n == 0 for k in range(10)]
    assert [bool(r.gates) for r in cb.records] == replayed
    assert all(len(r.temporal["rnn"].norms) == 20 and r.spectral for r in cb.records)


# ----------------------------------------------------------------------------- the theory


def test_tanh_rnn_on_100_steps_vanishes():
    x, y = data(n=16, t=100, f=4)
    model = single(keras.layers.SimpleRNN(32, name="rnn"), t=100, f=4)
    rec, cb = one_step(model, x, y)
    prof = rec.temporal["rnn"]
    assert prof.horizon < 100 and prof.gain < 1
    assert horizon(exact(cell_params(model.get_layer("rnn")), x, top=True)[0]) == pytest.approx(prof.horizon, abs=2)
    assert [e.kind for e in cb.events if e.layer == "rnn"] == ["vanishing"]


def test_relu_rnn_with_recurrent_kernel_1_1_identity_explodes():
    x, y = data(n=16, t=100, f=4)
    layer = keras.layers.SimpleRNN(
        32, activation="relu", recurrent_initializer=keras.initializers.Identity(1.1), name="rnn"
    )
    model = single(layer, t=100, f=4)
    rec, cb = one_step(model, x, y)
    prof = rec.temporal["rnn"]
    assert prof.gain > 1.05 and max(prof.propagation) > 1e3
    (event,) = [e for e in cb.events if e.layer == "rnn"]
    assert event.kind == "exploding"
    assert "recurrence 'l0'" in event.message and "clipping" in event.message


def _first_sign(rng, n, t):
    """The label is the sign of the first input; t - 1 steps of Gaussian noise follow it."""
    x = rng.standard_normal((n, t, 1)).astype("float32")
    sign = rng.integers(0, 2, size=n).astype("float32") * 2 - 1
    x[:, 0, 0] = sign
    return x, (sign > 0).astype("float32")


def test_a_healthy_lstm_solving_a_long_range_task_raises_no_through_time_alert():
    rng = np.random.default_rng(0)
    t, units = 40, 16
    x, y = _first_sign(rng, 2048, t)
    inp = keras.Input((t, 1))
    forget_bias_2 = keras.initializers.Constant(np.r_[np.zeros(units), np.full(units, 2.0), np.zeros(2 * units)])
    lstm = keras.layers.LSTM(units, unit_forget_bias=False, bias_initializer=forget_bias_2, name="lstm")
    model = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(lstm(inp)))
    model.compile(keras.optimizers.Adam(5e-3), "binary_crossentropy", metrics=["accuracy"])
    cb = GradWatchCallback(sinks=["memory"], profile_every=10)
    model.fit(x, y, batch_size=64, epochs=3, verbose=0, callbacks=[cb])
    x_test, y_test = _first_sign(rng, 512, t)
    assert model.evaluate(x_test, y_test, verbose=0)[1] > 0.9  # it solves the task
    profiled = [r.temporal["lstm"] for r in cb.records if r.temporal]
    assert len(profiled) == 10 and all(p.horizon == t for p in profiled)
    # Its memory path carries the gradient the whole way: never vanishing. (Its most
    # amplified direction may grow past explode_ratio late in training: that is judged on
    # the largest singular value by contract, and then said with that number.)
    assert [e for e in cb.events if e.layer == "lstm" and e.kind == "vanishing"] == []
    for e in cb.events:
        if e.layer == "lstm":
            assert e.kind == "exploding" and e.value > 1e3 and "largest singular value" in e.message


# ----------------------------------------------------------------------------- spectral norms


def test_spectral_norms_stay_exact_when_the_weights_move_fast():
    x, y = data(n=64, t=10)
    model = single(keras.layers.LSTM(16, name="rnn"), t=10)
    seen = []

    class Kernel(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(self.model.get_layer("rnn").cell.recurrent_kernel.numpy().astype(np.float64))

    model.compile(keras.optimizers.Adam(3e-2), "mse")
    cb = GradWatchCallback(sinks=["memory"], profile_every=1)
    model.fit(x, y * 10, batch_size=8, epochs=3, verbose=0, callbacks=[Kernel(), cb])
    assert np.abs(seen[-1] - seen[0]).max() > 0.3  # far from the warm start
    worst = 0.0
    for rec, kernel in zip(cb.records, seen):
        for g, gate in enumerate("ifco"):
            want = np.linalg.norm(kernel[:, g * 16 : (g + 1) * 16], 2)
            worst = max(worst, abs(rec.spectral[f"rnn/lstm_cell/recurrent_kernel[{gate}]"] / want - 1))
    assert worst < 0.01


def test_the_remedy_knows_keras_already_sets_the_forget_bias_to_1():
    """Issue 16: a Keras LSTM was told to set its forget bias to 1-3; Keras starts at 1."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((16, 200, 2)) * 3).astype("float32")
    y = rng.standard_normal((16, 1)).astype("float32")
    inp = keras.Input((200, 2))
    model = keras.Model(inp, keras.layers.Dense(1)(keras.layers.LSTM(6, name="lstm")(inp)))
    _, cb = one_step(model, x, y, vanish_ratio=0.5)
    assert cb.monitor.meta["forget_bias"] == {"lstm": pytest.approx(1.0)}
    (event,) = [e for e in cb.events if e.layer == "lstm"]
    assert event.kind == "vanishing" and "forget-gate bias is already 1" in event.message
    assert "(1 to 3)" not in event.message


@contextlib.contextmanager
def _pool_held(hold=True):
    """While held, the background thread (one worker) is busy: a trace started meanwhile,
    at setup or at a read, is not ready until the block ends."""
    from gradwatch_tf import _kkept

    gate = threading.Event()
    if hold:
        _kkept._pool().submit(gate.wait)
    try:
        yield
    finally:
        gate.set()


@pytest.mark.parametrize("activation, replayed", [("tanh", [1, 4]), ("softsign", [2, 4])])
def test_a_due_step_read_before_the_background_trace_is_replayed_on_numpy(monkeypatch, activation, replayed):
    """In ``fit`` the host replays beside the step with a function traced in the
    background (gradwatch_tf._tfhost); step 1 is due but read before that function is
    ready (the background thread held busy). A tanh LSTM is replayed on numpy then
    (gradwatch_tf._knumpy), so step 1 is measured and the period (``replay_every=3``) goes
    on: step 4. An activation numpy cannot differentiate (softsign: TensorFlow's autodiff)
    leaves step 1 unmeasured, and the next profiled step is replayed although the period
    does not make it due; then the period again (step 4)."""
    from gradwatch_tf import _kkept

    monkeypatch.setattr(_kkept, "BACKGROUND_COMPILE", True)
    monkeypatch.setattr(_kkept, "BACKGROUND_MIN_STEPS", 0)  # these one-step fits count as long ones
    x, y = data(n=2)
    model = single(keras.layers.LSTM(4, activation=activation, name="rnn"))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    cb = GradWatchCallback(sinks=["memory"], profile_every=1, replay_every=3)
    for i in range(5):  # one step a fit; the background trace done between fits
        with _pool_held(i == 0):  # the first fit reads step 1 before the trace is done
            model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
        _kkept.compiles_done()
    assert [r.step for r in cb.records] == [1, 2, 3, 4, 5]
    done = [r.step for r in cb.records if r.temporal.get("rnn") and r.temporal["rnn"].recurrences]
    assert done == replayed
    want = exact(cell_params(model.get_layer("rnn")), x)[0]  # SGD(0): every step's weights
    for r in cb.records:
        if r.step in done:
            np.testing.assert_allclose(gains_of(r), want, rtol=1e-4)


def _host(cb):
    att = cb._kept if cb._kept is not None else cb.watch.attachment
    return att._host


def test_a_fit_too_short_for_the_background_trace_replays_on_numpy(monkeypatch):
    """By default the host's replay function is traced in the background, but a fit with
    fewer steps left than BACKGROUND_MIN_STEPS would end before that trace: it traces
    nothing and replays on numpy, so a short run (the demo's 20 steps) gets its profile
    at step 1 without paying for a trace. A fit with more steps left starts the trace and
    replays on numpy until it is ready (here the background thread is held busy: step 1
    measured all the same). The spectral norms come from the host in both."""
    from gradwatch_tf import _kkept

    monkeypatch.setattr(_kkept, "BACKGROUND_COMPILE", True)
    monkeypatch.setattr(_kkept, "BACKGROUND_MIN_STEPS", 4)
    x, y = data(n=6)
    runs, traced = {}, {}
    for steps in (3, 6):  # 3 then 6 steps in the fit
        model = single(keras.layers.LSTM(4, name="rnn"))
        model.compile(keras.optimizers.SGD(0.0), "mse")
        cb = GradWatchCallback(sinks=["memory"], profile_every=100)
        with _pool_held(steps == 6):
            model.fit(x[:steps], y[:steps], batch_size=1, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
            traced[steps] = bool(_host(cb)._compiled)
        _kkept.compiles_done()
        runs[steps] = (cb.records[0], model)
    assert not traced[3] and traced[6]
    for rec, model in runs.values():
        layer = model.get_layer("rnn")
        np.testing.assert_allclose(gains_of(rec), exact(cell_params(layer), x[:1])[0], rtol=1e-4)
        kernel = layer.cell.recurrent_kernel.numpy()
        sigma = np.linalg.norm(kernel[:, 4:8].astype(np.float64), 2)
        assert rec.spectral[f"{layer.cell.recurrent_kernel.path}[f]"] == pytest.approx(sigma, rel=1e-2)
