"""The host's replay on numpy (gradwatch_tf._knumpy), on every Keras backend: the same
``keras.ops`` replay code run on numpy arrays, against the float64 truth of
:mod:`keras_numpy_truth`, with masks, initial states, a reversed direction and each cell
kind; an estimated state (dim > 16) within the contract's factor; and numpy only in the
thread that asked for it (a background thread traces the compiled replay meanwhile)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs keras")

from keras_numpy_truth import cell_params, exact

from gradwatch_tf import _knumpy

CASES = {
    "lstm-masked-initial-state": (lambda: keras.layers.LSTM(4), {"mask": True, "init": True}),
    "gru-reset-before-backwards": (lambda: keras.layers.GRU(5, reset_after=False, go_backwards=True), {}),
    "gru-masked": (lambda: keras.layers.GRU(5), {"mask": True}),
    "simplernn-relu": (lambda: keras.layers.SimpleRNN(6, activation="relu"), {}),
}


def _built(layer, x):  # type: ignore[no-untyped-def]
    layer(x)
    return layer


def _inputs(rng, n=8, t=10, f=3):  # type: ignore[no-untyped-def]
    x = rng.standard_normal((n, t, f)).astype("float32")
    mask = np.ones((n, t), bool)
    for k in range(n):  # ragged sequences: padding at the end, as Keras' masking gives
        mask[k, t - k % 4 :] = False
    return x, mask


@pytest.mark.parametrize("case", list(CASES))
def test_numpy_replay_is_the_float64_truth(case):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(1)
    make, opts = CASES[case]
    x, mask = _inputs(rng)
    layer = _built(make(), x)
    u = layer.cell.units
    parts = 2 if type(layer.cell).__name__ == "LSTMCell" else 1
    init = [rng.standard_normal((8, u)).astype("float32") for _ in range(parts)] if opts.get("init") else None
    m = mask if opts.get("mask") else None
    backwards = bool(getattr(layer, "go_backwards", False))
    weights = [(v, np.asarray(v.numpy())) for v in layer.cell.weights]
    logs, gate = _knumpy.replay(
        [("l0", layer)], x, None if m is None else m.astype("float32"), [init], [None], weights, step=1, salt=0
    )
    params = cell_params(layer)
    want, want_gate = exact(params, x, mask=m, init=init, backwards=backwards)
    top, _ = exact(params, x, mask=m, init=init, backwards=backwards, top=True)
    np.testing.assert_allclose(np.exp(logs[0, 0]), want, rtol=1e-4)
    np.testing.assert_allclose(np.exp(logs[1, 0]), top, rtol=1e-4)
    if want_gate is None:
        assert gate is None
    else:
        np.testing.assert_allclose(gate, want_gate, rtol=1e-4)


def test_numpy_replay_of_a_large_state_is_within_the_estimate_contract():
    """dim s = 24 (> 16, EXACT_DIM): the estimate from random directions (numpy's own
    draws): within a factor 1.5 of the exact gains at every j, and the largest singular
    value never above the exact one."""
    keras.utils.set_random_seed(0)
    x, _ = _inputs(np.random.default_rng(2), t=14, f=4)
    layer = _built(keras.layers.LSTM(12), x)
    weights = [(v, np.asarray(v.numpy())) for v in layer.cell.weights]
    params = cell_params(layer)
    want = exact(params, x)[0]
    top = exact(params, x, top=True)[0]
    for step in (1, 2, 3):  # three seeds
        logs, _ = _knumpy.replay([("l0", layer)], x, None, [None], [None], weights, step=step, salt=0)
        ratio = np.exp(logs[0, 0]) / want
        assert np.all((ratio > 1 / 1.5) & (ratio < 1.5)), ratio
        assert np.all(np.exp(logs[1, 0]) <= top * (1 + 1e-4))
        assert np.all(np.exp(logs[1, 0]) >= top / 1.5)


def test_numpy_ops_only_in_the_thread_that_asked():
    seen = {}

    def other() -> None:
        seen["other"] = _knumpy.backend()

    with _knumpy.on_numpy():
        seen["here"] = _knumpy.backend()
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert isinstance(_knumpy.ops.matmul(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32)), np.ndarray)
    assert seen == {"here": "numpy", "other": keras.backend.backend()}
    assert _knumpy.backend() == keras.backend.backend()


def test_an_activation_numpy_cannot_differentiate_is_not_replayable():
    x = np.zeros((2, 5, 3), np.float32)
    assert _knumpy.replayable([("l0", _built(keras.layers.LSTM(4), x))])
    assert not _knumpy.replayable([("l0", _built(keras.layers.LSTM(4, activation="softsign"), x))])
