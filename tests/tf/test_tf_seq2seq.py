"""keras-io's addition_rnn shape: an encoder LSTM, RepeatVector, a decoder LSTM, trained
by `fit` with a last batch smaller than the others. TensorFlow retraces the step for the
odd batch with an unknown batch size, so there the number of probed sequences is only
known when the step runs."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs keras")
pytest.importorskip("tensorflow", reason="the Keras backend needs TensorFlow")

from test_tf_propagation import assert_gains, cell_params, data, exact, gains_of

from gradwatch_tf import GradWatchCallback


def test_a_decoder_after_repeat_vector_is_measured_on_every_batch_size(caplog):
    inp = keras.Input((12, 3))
    enc = keras.layers.LSTM(4, name="enc")
    dec = keras.layers.LSTM(5, return_sequences=True, name="dec")
    code = keras.layers.RepeatVector(6)(enc(inp))
    model = keras.Model(inp, keras.layers.Dense(1)(dec(code)))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x, _ = data(n=23)
    y = np.zeros((23, 6, 1), "float32")
    repeated = keras.Model(inp, code)(x).numpy()
    cb = GradWatchCallback(sinks=["memory"], profile_every=1, replay_every=1)
    model.fit(x, y, batch_size=9, epochs=1, verbose=0, shuffle=False, callbacks=[cb])  # 9, 9, then 5
    assert "replay failed" not in caplog.text
    assert len(cb.records) == 3
    for rec, start in zip(cb.records, (0, 9, 18)):
        batch = slice(start, start + 9)
        assert_gains(gains_of(rec, "enc"), exact(cell_params(enc), x[batch])[0])
        assert_gains(gains_of(rec, "dec"), exact(cell_params(dec), repeated[batch])[0])  # median of 8, then of 5
        assert_gains(gains_of(rec, "dec", top=True), exact(cell_params(dec), repeated[batch], top=True)[0])
