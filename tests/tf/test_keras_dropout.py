"""Dropout in training on every Keras backend: the replay applies the very masks the call
drew (input and recurrent, one per gate where the cell draws one per gate), checked
against the float64 Jacobians of :mod:`keras_numpy_truth` with the same masks. Before,
JAX and torch left a layer with dropout unmeasured."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs keras")

from keras_numpy_truth import cell_params, exact

from gradwatch_tf import GradWatchCallback, _kkept

CASES = {
    "lstm": lambda: keras.layers.LSTM(4, dropout=0.3, recurrent_dropout=0.4, name="rnn"),
    "gru": lambda: keras.layers.GRU(5, dropout=0.3, recurrent_dropout=0.4, name="rnn"),
    "gru-reset-before": lambda: keras.layers.GRU(5, dropout=0.3, recurrent_dropout=0.4, reset_after=False, name="rnn"),
    "rnn-input-only": lambda: keras.layers.SimpleRNN(6, dropout=0.3, name="rnn"),
}


def _log_close(got, want, atol=2e-4):  # type: ignore[no-untyped-def]
    got, want = np.log(np.asarray(got)), np.log(np.asarray(want))
    np.testing.assert_allclose(got, want, rtol=0, atol=atol * max(1.0, float(np.max(np.abs(want)))))


@pytest.mark.parametrize("host", ["compiled", "numpy"])
@pytest.mark.parametrize("case", list(CASES))
def test_dropout_masks_of_the_call_are_replayed(monkeypatch, case, host):
    """The host's replay (TensorFlow, JAX) compiled at once, or on numpy as by default in
    a fit this short (on torch both are the same eager replay)."""
    if host == "numpy" and keras.backend.backend() == "torch":
        pytest.skip("torch Keras replays in its hook: no host replay")
    monkeypatch.setattr(_kkept, "BACKGROUND_COMPILE", host == "numpy")
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 12, 3)).astype("float32")
    y = rng.standard_normal((6, 1)).astype("float32")
    layer = CASES[case]()
    inp = keras.Input((12, 3))
    model = keras.Model(inp, keras.layers.Dense(1, name="head")(layer(inp)))
    cell = layer.cell
    count = getattr(cell, "dropout_mask_count", None)

    def draw(n, rate):  # type: ignore[no-untyped-def]
        one = lambda: (rng.random((6, n)) > rate).astype("float32") / (1 - rate)
        return one() if count is None else [one() for _ in range(count)]

    masks = {3: draw(3, 0.3), cell.units: draw(cell.units, 0.4)}

    def fixed(step_input, rate):  # type: ignore[no-untyped-def]
        m = masks[int(step_input.shape[-1])]
        return [keras.ops.convert_to_tensor(v) for v in m] if isinstance(m, list) else keras.ops.convert_to_tensor(m)

    monkeypatch.setattr(cell, "_create_dropout_mask", fixed)
    model.compile(keras.optimizers.SGD(0.0), "mse")
    cb = GradWatchCallback(sinks=["memory"], profile_every=1)
    try:
        model.fit(x, y, batch_size=6, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
        (rec,) = cb.records
    finally:
        cb.close()
    got = rec.temporal["rnn"].recurrences["l0"]
    per_gate = lambda m: [m] if count is None else m
    dp = per_gate(masks[3])
    rdp = per_gate(masks[cell.units]) if float(cell.recurrent_dropout) > 0 else None
    params = cell_params(layer)
    want, _ = exact(params, x, dp=dp, rdp=rdp)
    _log_close(got.gains, want)
    _log_close(got.max_gains, exact(params, x, dp=dp, rdp=rdp, top=True)[0])
    without, _ = exact(params, x)
    assert np.max(np.abs(np.log(want / without))) > 1e-2  # the masks matter here
