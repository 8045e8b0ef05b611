"""The core's through-time engine: aggregate rule, diagonal recurrences, reference, records."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gradwatch import Propagation, StepRecord, TemporalProfile
from gradwatch.through_time import aggregate, diagonal_propagation, horizon, rate
from gradwatch.through_time.ops import NUMPY_TENSORS
from gradwatch.through_time.reference import cell_jacobians, diagonal_jacobians, propagation_from_jacobians


def test_aggregate_takes_the_max_of_top_gains_and_the_median_of_rms_gains():
    log_rms = np.log(np.array([[1.0, 1.0, 1.0, 1.0], [0.1, 2.0, 4.0, 1e-9]]))
    log_top = np.log(np.array([[1.0, 1.0, 1.0, 1.0], [0.5, 3.0, 9.0, 1e-9]]))
    gains, top = aggregate(log_rms, log_top, NUMPY_TENSORS)
    assert top[1] == pytest.approx(9.0)
    # median of (1e-9, 0.1, 2, 4) on logs: the geometric mean of 0.1 and 2
    assert gains[1] == pytest.approx(math.sqrt(0.1 * 2.0))
    assert gains[0] == top[0] == 1.0


class _UnknownWidth:
    """Rows whose count is unknown until run time, as in a graph traced for any batch."""

    def __init__(self, a: np.ndarray) -> None:
        self.a, self.shape = a, (a.shape[0], None)


class _SortUnwrap(type(NUMPY_TENSORS)):
    def sort(self, x, axis):
        return super().sort(x.a if isinstance(x, _UnknownWidth) else x, axis)


@pytest.mark.parametrize("p", [1, 2, 5, 8])
def test_the_median_is_the_same_when_the_number_of_sequences_is_known_only_at_run_time(p):
    rng = np.random.default_rng(p)
    log_rms = rng.normal(size=(6, p))
    log_rms[2, 0] = -np.inf  # a gain that vanished to exactly zero
    gains, _ = aggregate(_UnknownWidth(log_rms), log_rms, _SortUnwrap())
    np.testing.assert_allclose(gains, np.exp(np.median(log_rms, axis=1)), rtol=1e-12)


def test_one_sequence_that_resets_does_not_make_the_layer_vanish():
    """Issue 16: 1 of 8 ReLU sequences resets (gain 0), the others grow 1.08x per step."""
    j = np.arange(30.0)
    grow = np.log(1.08) * j
    log_top = np.tile(grow[:, None], (1, 8))
    log_top[5:, 3] = -np.inf  # a reset: exactly zero from 5 steps back on
    gains, top = aggregate(log_top.copy(), log_top, NUMPY_TENSORS)
    assert rate(top) == pytest.approx(1.08, rel=1e-6)
    assert horizon(top) == 30
    assert gains[-1] == pytest.approx(1.08**29, rel=1e-6)


def test_diagonal_propagation_matches_the_products_of_its_jacobians():
    rng = np.random.default_rng(0)
    decays = rng.uniform(0.3, 1.0, (5, 40, 7))  # (P, T, S)
    want_gains, want_top = propagation_from_jacobians(diagonal_jacobians(decays))
    gains, top = diagonal_propagation(np.log(decays).transpose(1, 0, 2))
    np.testing.assert_allclose(gains, want_gains, rtol=1e-10)
    np.testing.assert_allclose(top, want_top, rtol=1e-10)
    # and by hand: one step back is the largest last decay, over sequences
    assert top[1] == pytest.approx(decays[:, -1].max())


def test_reference_tanh_rnn_jacobian_is_the_finite_difference_of_the_cell():
    rng = np.random.default_rng(1)
    H, F, T = 4, 3, 6
    w = {"weight_ih": rng.standard_normal((H, F)), "weight_hh": rng.standard_normal((H, H)) * 0.5}
    x = rng.standard_normal((T, F))
    jac = cell_jacobians("rnn_tanh", x, w)
    h = np.zeros(H)
    for t in range(T - 1):
        h = np.tanh(w["weight_ih"] @ x[t] + w["weight_hh"] @ h)
    eps = 1e-6
    num = np.stack(
        [
            (
                np.tanh(w["weight_ih"] @ x[T - 1] + w["weight_hh"] @ (h + eps * e))
                - np.tanh(w["weight_ih"] @ x[T - 1] + w["weight_hh"] @ (h - eps * e))
            )
            / (2 * eps)
            for e in np.eye(H)
        ],
        axis=1,
    )
    np.testing.assert_allclose(jac[T - 1], num, atol=1e-8)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_reference_gated_jacobians_are_finite_differences(kind):
    rng = np.random.default_rng(2)
    H, F, T = 3, 2, 5
    G = {"gru": 3, "lstm": 4}[kind]
    w = {
        "weight_ih": rng.standard_normal((G * H, F)),
        "weight_hh": rng.standard_normal((G * H, H)),
        "bias_ih": rng.standard_normal(G * H),
        "bias_hh": rng.standard_normal(G * H),
    }
    x = rng.standard_normal((T, F))
    jac = cell_jacobians(kind, x, w)

    def run(state: np.ndarray, t: int) -> np.ndarray:
        # one step from a given state, with the reference's own cell maths (via a 1-step sequence)
        h0, c0 = (state[:H], state[H:]) if kind == "lstm" else (state, None)
        j = cell_jacobians(kind, x[t : t + 1], w, h0, c0)  # noqa: F841 - exercises the path
        from gradwatch.through_time.reference import _sig

        pre_i = w["weight_ih"] @ x[t] + w["bias_ih"]
        if kind == "gru":
            gh = w["weight_hh"] @ h0 + w["bias_hh"]
            r = _sig(pre_i[:H] + gh[:H])
            z = _sig(pre_i[H : 2 * H] + gh[H : 2 * H])
            n = np.tanh(pre_i[2 * H :] + r * gh[2 * H :])
            return (1 - z) * n + z * h0
        pre = pre_i + w["weight_hh"] @ h0 + w["bias_hh"]
        i, f, g, o = _sig(pre[:H]), _sig(pre[H : 2 * H]), np.tanh(pre[2 * H : 3 * H]), _sig(pre[3 * H :])
        c = f * c0 + i * g
        return np.concatenate([o * np.tanh(c), c])

    d = 2 * H if kind == "lstm" else H
    state = rng.standard_normal(d) * 0.5
    t = 3
    jac_t = cell_jacobians(kind, x[t : t + 1], w, state[:H], state[H:] if kind == "lstm" else None)[0]
    eps = 1e-6
    num = np.stack([(run(state + eps * e, t) - run(state - eps * e, t)) / (2 * eps) for e in np.eye(d)], axis=1)
    np.testing.assert_allclose(jac_t, num, atol=1e-7)
    assert jac.shape == (T, d, d)


def test_rate_and_horizon_are_fitted_on_max_gains():
    gains = [1.0, 0.1, 0.01, 0.001, 1e-4]
    top = [1.0, 0.9, 0.81, 0.729, 0.6561]
    p = Propagation.from_gains(gains, 1e-3, top)
    assert p.rate == pytest.approx(0.9)
    assert p.horizon == 5
    assert p.max_gains == tuple(top)
    assert p.peak == 1.0


def test_not_measured_is_none_in_records_and_run_files():
    prof = TemporalProfile.build([1.0, 2.0, 3.0])
    assert prof.horizon is None and not prof.measured and math.isnan(prof.rate)
    rec = StepRecord(step=1, global_norm=1.0, temporal={"rnn": prof})
    back = StepRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert back.temporal["rnn"].horizon is None


def test_old_run_files_with_horizon_zero_and_no_recurrences_read_as_not_measured():
    old = {"step": 3, "global_norm": 1.0, "temporal": {"rnn": {"norms": [1.0], "gain": float("nan"), "horizon": 0}}}
    assert StepRecord.from_dict(old).temporal["rnn"].horizon is None


def test_max_gains_survive_the_round_trip():
    prof = TemporalProfile.build([1.0], {"l0": [1.0, 0.5, 0.2]}, 1e-3, {"l0": [1.0, 0.7, 0.4]})
    assert prof.max_gains == (1.0, 0.7, 0.4)
    rec = StepRecord(step=1, global_norm=1.0, temporal={"rnn": prof})
    back = StepRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert back.temporal["rnn"].recurrences["l0"].max_gains == (1.0, 0.7, 0.4)
    assert back.temporal["rnn"].horizon == 3
