"""Dropout in training on every Keras cell: the replay applies the very masks the call drew
(input and recurrent, per gate where the cell draws one per gate) where the cell applies
them, checked against the float64 Jacobians of tests/tf/test_tf_propagation.py (the LSTM
case is there). A state above 16 numbers puts the masks against the estimate's rows."""

from __future__ import annotations

import math

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs keras")
tf = pytest.importorskip("tensorflow", reason="the Keras backend needs TensorFlow")

from test_tf_propagation import assert_gains, cell_params, data, exact, gains_of, one_step, single


@pytest.mark.parametrize(
    "make,count",
    [
        (lambda: keras.layers.GRU(5, dropout=0.3, recurrent_dropout=0.4, name="rnn"), 3),
        (lambda: keras.layers.GRU(5, dropout=0.3, recurrent_dropout=0.4, reset_after=False, name="rnn"), 3),
        (lambda: keras.layers.SimpleRNN(6, dropout=0.3, recurrent_dropout=0.4, name="rnn"), None),
    ],
    ids=["gru", "gru-reset-before", "rnn"],
)
def test_dropout_of_every_cell_replays_its_masks_per_gate(monkeypatch, make, count):
    """The masks enter the replay where each cell applies them (GRU: per gate, the
    candidate's on h before the reset gate multiplies it when reset_after=False)."""
    x, y = data(n=6, f=3)
    layer = make()
    model = single(layer)
    rng = np.random.default_rng(11)

    def draw(n, rate):
        one = lambda: (rng.random((6, n)) > rate).astype("float32") / (1 - rate)
        return one() if count is None else [one() for _ in range(count)]

    units = layer.cell.units
    masks = {3: draw(3, 0.3), units: draw(units, 0.4)}
    monkeypatch.setattr(
        layer.cell,
        "_create_dropout_mask",
        lambda step_input, rate: tf.nest.map_structure(tf.constant, masks[step_input.shape[-1]]),
    )
    rec, _ = one_step(model, x, y)
    dp, rdp = ([m] if count is None else m for m in (masks[3], masks[units]))  # the reference: one per gate
    want, _ = exact(cell_params(layer), x, dp=dp, rdp=rdp)
    assert_gains(gains_of(rec), want)
    assert_gains(gains_of(rec, top=True), exact(cell_params(layer), x, dp=dp, rdp=rdp, top=True)[0])
    without, _ = exact(cell_params(layer), x)
    assert np.max(np.abs(np.log(want / without))) > 1e-2  # the masks matter here


def test_dropout_on_a_large_state_is_estimated_within_the_contract(monkeypatch):
    x, y = data(n=8, t=30, f=3)
    layer = keras.layers.GRU(24, dropout=0.2, recurrent_dropout=0.3, name="rnn")
    model = single(layer, t=30)
    rng = np.random.default_rng(5)
    masks = {n: [(rng.random((8, n)) > 0.3).astype("float32") / 0.7 for _ in range(3)] for n in (3, 24)}
    monkeypatch.setattr(
        layer.cell,
        "_create_dropout_mask",
        lambda step_input, rate: [tf.constant(m) for m in masks[step_input.shape[-1]]],
    )
    rec, _ = one_step(model, x, y)
    want, _ = exact(cell_params(layer), x, dp=masks[3], rdp=masks[24])
    top, _ = exact(cell_params(layer), x, dp=masks[3], rdp=masks[24], top=True)
    assert np.max(np.abs(np.log(gains_of(rec) / want))) < math.log(1.5)
    assert np.max(np.abs(np.log(gains_of(rec, top=True) / top))) < math.log(1.5)
    assert np.all(gains_of(rec, top=True) <= top * (1 + 1e-4))
