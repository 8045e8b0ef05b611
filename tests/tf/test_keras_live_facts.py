"""The LSTM remedy quotes the forget-gate bias as it is when the alert is written (the
backend's live fact), not as it was when the callback attached. Any Keras backend."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs keras")

from gradwatch_tf import GradWatchCallback  # noqa: E402


def _set_forget_bias(layer, value: float) -> None:
    cell = layer.cell
    b = keras.ops.convert_to_numpy(cell.bias.value).copy()
    b[cell.units : 2 * cell.units] = value
    cell.bias.assign(b)


def test_the_remedy_reads_the_forget_bias_when_it_writes_the_alert(monkeypatch):
    if keras.backend.backend() == "jax":  # replay compiled at once, so step 1 is measured
        from gradwatch_tf import _kkept

        monkeypatch.setattr(_kkept, "BACKGROUND_COMPILE", False)
    keras.utils.set_random_seed(0)
    inp = keras.Input((40, 3))
    lstm = keras.layers.LSTM(4, unit_forget_bias=False, name="rnn")
    model = keras.Model(inp, keras.layers.Dense(1)(lstm(inp)))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    _set_forget_bias(lstm, -3.0)  # forgets within a few steps: a vanishing alert
    x = np.random.default_rng(0).standard_normal((8, 40, 3)).astype("float32")
    y = np.zeros((8, 1), "float32")
    cb = GradWatchCallback(sinks=["memory"], profile_every=1, alert_every=0, replay_every=1)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[cb])
    _set_forget_bias(lstm, -4.25)  # training moved it (here: by hand, between two fits)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[cb])
    events = [e for e in cb.events if e.kind == "vanishing"]
    cb.close()
    assert len(events) >= 2, [e.message for e in cb.events]
    assert "(it is -3 now)" in events[0].message, events[0].message
    assert "(it is -4.25 now)" in events[-1].message, events[-1].message
