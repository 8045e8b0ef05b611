"""Detectors on synthetic norm sequences."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from tests.core.helpers import feed, feed_global_norms, monitor


def test_no_exploding_alarm_on_10000_stationary_lognormal_steps():
    rng = np.random.default_rng(123)
    m = monitor(alert_every=0)
    feed_global_norms(m, np.exp(rng.normal(0.0, 0.3, 10_000)))
    assert [e for e in m.events if e.kind == "exploding"] == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_50x_spike_is_flagged_at_the_step_where_it_happens(seed):
    rng = np.random.default_rng(seed)
    norms = np.exp(rng.normal(0.0, 0.3, 2_000))
    norms[1234] *= 50
    m = monitor()
    feed_global_norms(m, norms)
    exploding = [e for e in m.events if e.kind == "exploding"]
    assert [e.step for e in exploding] == [1235]  # steps count from 1
    assert exploding[0].severity == logging.WARNING
    assert exploding[0].value == pytest.approx(norms[1234])
    assert "1235" in exploding[0].message and "clip" in exploding[0].message


def test_spike_statistics_survive_a_spike_so_the_next_one_is_caught():
    norms = [1.0 + 0.01 * (i % 7) for i in range(300)]
    norms[100] = 100.0
    norms[250] = 100.0
    m = monitor(alert_every=0)
    feed_global_norms(m, norms)
    assert [e.step for e in m.events if e.kind == "exploding"] == [101, 251]


def test_norm_ceiling_flags_from_the_first_step():
    m = monitor(norm_ceiling=10.0)
    feed_global_norms(m, [20.0])
    (e,) = [e for e in m.events if e.kind == "exploding"]
    assert e.step == 1 and e.threshold == 10.0 and "norm_ceiling" in e.message


def _profile(m, gains_by_layer, norms_by_layer=None, kinds=None):
    """One step whose recurrent layers propagate with the given gains (recurrence "l0")."""
    m.bind(["rnn.w"])
    if kinds:
        m.meta["recurrent_layers"] = kinds
    prop = {layer: {"l0": g} for layer, g in gains_by_layer.items()}
    return feed(m, norms=np.array([1.0]), temporal=norms_by_layer or {}, propagation=prop)


def test_temporal_vanishing_names_layer_recurrence_horizon_and_rnn_remedies():
    m = monitor()
    gains = 0.8 ** np.arange(100)  # 0.8**31 = 9.9e-4: below 1e-3 after 31 steps back
    r = _profile(m, {"enc.rnn": gains}, kinds={"enc.rnn": "rnn_tanh"})
    (e,) = m.events
    assert e.kind == "vanishing" and e.layer == "enc.rnn" and e.severity == logging.WARNING
    assert e.value == 31 and e.threshold == 100
    assert "'enc.rnn'" in e.message and "'l0'" in e.message and "31 of 100 steps" in e.message
    assert "gated cell" in e.message and "orthogonal" in e.message and "bptt" in e.message
    prof = r.temporal["enc.rnn"]
    assert prof.gain == pytest.approx(0.8) and prof.horizon == 31 and prof.recurrences["l0"].horizon == 31


@pytest.mark.parametrize("kind, says, never", [("lstm", "forget-gate bias", "LSTM or GRU"), ("gru", "update-gate bias", "LSTM or GRU")])
def test_vanishing_remedies_fit_the_layer_kind(kind, says, never):
    m = monitor()
    _profile(m, {"cell": 0.5 ** np.arange(40)}, kinds={"cell": kind})
    (e,) = m.events
    assert says in e.message and never not in e.message


def test_temporal_exploding_when_a_gain_exceeds_explode_ratio():
    m = monitor()
    _profile(m, {"rnn": 1.1 ** np.arange(100)})  # 1.1**99 ~ 1.25e4 > 1e3
    (e,) = m.events
    assert e.kind == "exploding" and e.layer == "rnn"
    assert e.value == pytest.approx(1.1**99)
    assert "clip" in e.message and "99 steps" in e.message


def test_healthy_propagation_raises_nothing():
    m = monitor()
    _profile(m, {"lstm": 0.99 ** np.arange(100)})
    assert m.events == []


def test_a_trained_model_that_draws_on_x1_is_not_flagged():
    # Sensitivity peaked at t=1 (the model uses the first input) with healthy propagation:
    # the input profile alone must never raise a through-time alert.
    m = monitor()
    norms = {"lstm": 1e4 * 0.9 ** np.arange(100)}  # x_1 gets 1e4 x what x_100 gets
    _profile(m, {"lstm": 0.995 ** np.arange(100)}, norms_by_layer=norms)
    assert m.events == []
    m2 = monitor()
    m2.bind(["rnn.w"])
    feed(m2, norms=np.array([1.0]), temporal={"lstm": 1e-9 * 0.9 ** np.arange(100)[::-1]})  # no propagation measured
    assert m2.events == [] and math.isnan(m2.records[-1].temporal["lstm"].gain)


def test_temporal_thresholds_are_options():
    m = monitor(vanish_ratio=0.5)
    _profile(m, {"lstm": 0.99 ** np.arange(100)})  # 0.99**69 = 0.4998 < 0.5
    (e,) = m.events
    assert e.kind == "vanishing" and e.value == 69
    m = monitor(explode_ratio=2.0)
    _profile(m, {"rnn": 1.01 ** np.arange(100)})  # 1.01**99 = 2.7 > 2
    assert [e.kind for e in m.events] == ["exploding"]


def test_the_worst_recurrence_of_a_stack_is_named():
    m = monitor()
    m.bind(["lstm.w"])
    prop = {"lstm": {"l0": 0.99 ** np.arange(50), "l1": 0.6 ** np.arange(50), "l1_reverse": 0.7 ** np.arange(50)}}
    r = feed(m, norms=np.array([1.0]), propagation=prop)
    (e,) = m.events
    assert "'l1'" in e.message
    prof = r.temporal["lstm"]
    assert prof.gain == pytest.approx(0.6) and prof.propagation == tuple(0.6 ** np.arange(50))


def test_vanishing_layer_norm_after_patience_steps():
    m = monitor(vanish_floor=1e-6, vanish_patience=5, alert_every=0)
    m.bind(["enc.w", "dec.w"])
    for _ in range(4):
        feed(m, norms=np.array([1e-9, 1.0]))
    assert m.events == []
    feed(m, norms=np.array([1e-9, 1.0]))
    (e,) = m.events
    assert e.kind == "vanishing" and e.layer == "enc" and e.step == 5
    feed(m, norms=np.array([1.0, 1.0]))  # recovers: the count restarts
    for _ in range(4):
        feed(m, norms=np.array([1e-9, 1.0]))
    assert len(m.events) == 1


def test_nonfinite_names_the_parameter_and_layer():
    m = monitor()
    m.bind(["enc.w", "dec.w", "dec.b"])
    r = feed(m, norms=np.array([1.0, math.nan, math.inf]))
    assert r.nonfinite == ("dec.w", "dec.b")
    (e,) = [e for e in m.events if e.kind == "nonfinite"]
    assert e.severity == logging.ERROR and e.param == "dec.w" and e.layer == "dec"
    assert "'dec.w'" in e.message and "'dec.b'" in e.message


def test_alerts_of_one_kind_and_layer_are_rate_limited_and_counted():
    m = monitor(alert_every=10)
    m.bind(["rnn.w"])
    vanish = {"rnn": {"l0": 0.5 ** np.arange(50)}}
    for _ in range(25):
        feed(m, norms=np.array([1.0]), propagation=vanish)
    steps = [e.step for e in m.events]
    assert steps == [1, 11, 21]
    assert [e.suppressed for e in m.events] == [0, 9, 9]
    assert "9 similar alerts suppressed since step 2" in m.events[1].message


def test_rate_limit_is_per_layer():
    m = monitor(alert_every=100)
    m.bind(["a.w"])
    vanish = {"l0": 0.5 ** np.arange(50)}
    feed(m, norms=np.array([1.0]), propagation={"a": vanish, "b": vanish})
    assert sorted(e.layer for e in m.events) == ["a", "b"]


def test_an_alert_quotes_the_singular_value_of_its_own_recurrence():
    m = monitor()
    m.bind(["bi/fwd/cell/recurrent_kernel"])
    m.meta["recurrent_layers"] = {"bi": "lstm"}
    m.meta["recurrence_weights"] = {"bi": {"l0": ["bi/fwd/cell/recurrent_kernel"], "l0_reverse": ["bi/bwd/cell/recurrent_kernel"]}}
    spectral = {"bi/fwd/cell/recurrent_kernel[f]": 0.7, "bi/bwd/cell/recurrent_kernel[f]": 3.5}
    prop = {"bi": {"l0": 0.5 ** np.arange(40), "l0_reverse": 0.99 ** np.arange(40)}}  # the forward one vanishes
    feed(m, norms=np.array([1.0]), propagation=prop, spectral=spectral)
    (e,) = m.events
    assert "'l0'" in e.message and "0.7 (bi/fwd/cell/recurrent_kernel[f])" in e.message and "3.5" not in e.message
