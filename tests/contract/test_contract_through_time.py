"""Propagation through time (shared/API.md, "Through time"), each backend against the
core's float64 reference (gradwatch.through_time.reference), the same way on both.

Each case builds the layer in its framework, takes one watched step at learning rate 0
with profile_every=1 and reads ``record.temporal[layer].recurrences``; the reference is
computed here in numpy from the layer's own weights (in PyTorch's layout, see
adapters.py), sequence by sequence over the first min(batch, 8): each step's state
Jacobian from ``cell_jacobians``, the identity at a padded / masked step (the state
carried), the sequence reversed for a reversed direction, a stacked layer fed the
numpy outputs of the layer below; then ``propagation_from_jacobians``. State dims are
at most 16, where the contract says exact: relative error <= 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradwatch
from gradwatch.through_time.fit import aggregate
from gradwatch.through_time.ops import NUMPY_TENSORS
from gradwatch.through_time.reference import cell_jacobians, propagation_from_jacobians
from tests.contract.adapters import TT_CASES, Recurrence, ThroughTime

PROBED = 8
RTOL = 1e-4
TINY = 1e-30  # entries below it are not compared (float32 underflow)


def _sig(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _step(kind: str, w: dict[str, np.ndarray], x: np.ndarray, h: np.ndarray, c: np.ndarray | None):
    """One forward step in PyTorch's equations, float64: (h, c)."""
    b_ih = w.get("bias_ih", np.zeros(w["weight_ih"].shape[0]))
    b_hh = w.get("bias_hh", np.zeros(w["weight_hh"].shape[0]))
    gi, gh = w["weight_ih"] @ x + b_ih, w["weight_hh"] @ h + b_hh
    if kind == "rnn_tanh":
        return np.tanh(gi + gh), None
    if kind == "gru":
        u = h.shape[0]
        r, z = _sig(gi[:u] + gh[:u]), _sig(gi[u : 2 * u] + gh[u : 2 * u])
        n = np.tanh(gi[2 * u :] + r * gh[2 * u :])
        return (1 - z) * n + z * h, None
    u = w["weight_hh"].shape[0] // 4
    pre = gi + gh
    i, f, g, o = _sig(pre[:u]), _sig(pre[u : 2 * u]), np.tanh(pre[2 * u : 3 * u]), _sig(pre[3 * u :])
    c = f * c + i * g
    h = o * np.tanh(c)
    return (h if "weight_hr" not in w else w["weight_hr"] @ h), c


def _run(r: Recurrence, x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One sequence through one recurrence: (Jacobians (T, d, d) in processing order,
    outputs (T, H) in the sequence's own time order)."""
    if r.reverse:
        x, mask = x[::-1], mask[::-1]
    hp = r.weights["weight_hh"].shape[1]
    h = np.zeros(hp)
    c = np.zeros(r.weights["weight_hh"].shape[0] // 4) if r.kind == "lstm" else None
    d = hp + (0 if c is None else c.shape[0])
    jacs, outs = [], []
    for t in range(x.shape[0]):
        if mask[t]:
            jacs.append(cell_jacobians(r.kind, x[t : t + 1], r.weights, h, c)[0])
            h, c = _step(r.kind, r.weights, x[t], h, c)
        else:  # padded / masked: the state carried, the Jacobian the identity
            jacs.append(np.eye(d))
        outs.append(h)
    outs = np.stack(outs)
    return np.stack(jacs), (outs[::-1] if r.reverse else outs)


def _reference(case: ThroughTime) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """(gains, max_gains) of every recurrence, float64."""
    x = case.x[:PROBED].astype(np.float64)
    mask = case.mask[:PROBED]
    outputs: dict[tuple[str, str], np.ndarray] = {}
    want = {}
    for r in case.recurrences:
        inp = x if not r.source else np.concatenate([outputs[s] for s in r.source], axis=-1)
        runs = [_run(r, inp[p], mask[p]) for p in range(inp.shape[0])]
        outputs[(r.layer, r.key)] = np.stack([o for _, o in runs])
        want[(r.layer, r.key)] = propagation_from_jacobians(np.stack([j for j, _ in runs]))
    return want


def _case(backend, name: str) -> ThroughTime:
    if name in backend.TT_SKIP:
        pytest.skip(backend.TT_SKIP[name])
    return backend.through_time(name)


def _close(got, want, what: str) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: {got.shape} != {want.shape}"
    keep = want >= TINY
    np.testing.assert_allclose(got[keep], want[keep], rtol=RTOL, atol=0, err_msg=what)


@pytest.mark.parametrize("name", TT_CASES)
def test_propagation_is_the_float64_reference(through_time, name):
    """gains (median RMS gain) and max_gains (max largest singular value) of every
    recurrence, within 1e-4 of the reference; the recurrences are exactly the layer x
    direction keys; j = 0 is 1."""
    case = _case(through_time, name)
    want = _reference(case)
    expected: dict[str, set[str]] = {}
    for layer, key in want:
        expected.setdefault(layer, set()).add(key)
    assert {n: set(keys) for n, keys in case.got.items() if keys} == expected
    for (layer, key), (gains, top) in want.items():
        prop = case.got[layer][key]
        assert isinstance(prop, gradwatch.Propagation)
        assert prop.gains[0] == pytest.approx(1.0) and prop.max_gains[0] == pytest.approx(1.0)
        _close(prop.gains, gains, f"{name} {layer}/{key} gains")
        _close(prop.max_gains, top, f"{name} {layer}/{key} max_gains")


@pytest.mark.parametrize("name", ["lstm", "masked"])
def test_rate_and_horizon_are_fitted_on_max_gains(through_time, name):
    """rate: exp of the least-squares slope (with intercept) of log max_gains over j
    (entries > 0); horizon: the first j where max_gains < vanish_ratio (1e-3), else T."""
    case = _case(through_time, name)
    for (layer, key), (_, top) in _reference(case).items():
        prop = case.got[layer][key]
        j = np.flatnonzero(top > 0)
        slope = np.polyfit(j, np.log(top[j]), 1)[0]
        assert prop.rate == pytest.approx(float(np.exp(slope)), rel=1e-3), f"{layer}/{key}"
        below = np.flatnonzero(top < 1e-3)
        assert prop.horizon == (int(below[0]) if below.size else len(top)), f"{layer}/{key}"


# -- the Keras estimate (dim s > 16) ---------------------------------------------------
ESTIMATE_SEEDS = 6
EST_T, EST_F = 16, 6


def _compiled(keras, layer):
    """measure() compiled once where the backend compiles (eager JAX would compile each
    scan at every call; TensorFlow traces it once, with the batch unknown as in fit's last
    batch), plain on torch."""
    from gradwatch_tf._kreplay import measure

    def run(x, seed):
        return measure(layer.cell, x, None, None, backwards=False, seed=seed)[0]

    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(run)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        spec = [tf.TensorSpec([None, EST_T, EST_F], tf.float32), tf.TensorSpec([], tf.int32)]
        return tf.function(run, input_signature=spec)
    return lambda x, seed: run(x, int(seed))


@pytest.mark.parametrize("cls,units,batch", [("LSTM", 12, 8), ("GRU", 20, 2)], ids=["lstm-24", "gru-20-2-sequences"])
def test_keras_estimate_within_1_5x_everywhere_and_1_25x_for_95_percent_of_seeds(backend, cls, units, batch):
    """Above dim 16 the Keras replay (gradwatch_tf._kreplay: a dominant block from
    tangents started 1, 4, 16, ... T-1 steps back, refined, and complement rows) against
    the float64 reference over several probe seeds: within 1.5x at every j, the gains
    within 1.25x for 95% of seeds, max_gains a lower bound. JAX and torch Keras (PyTorch's
    estimate: tests/torch/test_torch_propagation.py), TensorFlow too (the same replay,
    traced into the user's step there: tests/tf/test_tf_propagation.py)."""
    if backend.name != "keras":
        pytest.skip("the keras.ops replay is the Keras backends'")
    import keras

    keras.utils.set_random_seed(1)
    layer = getattr(keras.layers, cls)(units)
    x = np.random.default_rng(0).standard_normal((batch, EST_T, EST_F)).astype(np.float32)
    layer(x)
    cell = layer.cell
    rec_kernel = keras.ops.convert_to_numpy(cell.recurrent_kernel.value)
    cell.recurrent_kernel.assign(rec_kernel * 1.5)  # off the orthogonal start: a spread spectrum
    kind, weights = backend._torch_layout(cell)
    rec = Recurrence("rnn", "l0", kind, weights)
    runs = [_run(rec, x[p].astype(np.float64), np.ones(EST_T, bool)) for p in range(batch)]
    gains, top = propagation_from_jacobians(np.stack([j for j, _ in runs]))
    ok = top > 1e-30
    fn = _compiled(keras, layer)
    worst_gain, worst_top = [], []
    for seed in range(ESTIMATE_SEEDS):
        logs = np.asarray(keras.ops.convert_to_numpy(fn(x, np.int32(seed))), np.float64)
        got_gains, got_top = aggregate(logs[0], logs[1], NUMPY_TENSORS)
        worst_gain.append(np.exp(np.abs(np.log(got_gains[ok] / gains[ok])).max()))
        worst_top.append(np.exp(np.abs(np.log(got_top[ok] / top[ok])).max()))
        assert np.all(got_top[ok] <= top[ok] * (1 + 1e-4)), "max_gains is a lower bound"
    assert max(worst_gain) < 1.5 and max(worst_top) < 1.5, (worst_gain, worst_top)
    assert np.percentile(worst_gain, 95) < 1.25, worst_gain
