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


def _profile(m, norms_by_layer, step_norm=1.0):
    m.bind(["rnn.w"])
    return feed(m, norms=np.array([step_norm]), temporal=norms_by_layer)


def test_temporal_vanishing_named_with_gain_horizon_and_remedy():
    m = monitor()
    prof = 0.8 ** np.arange(100)[::-1]  # fades going back: earliest = 0.8**99 ~ 2.5e-10
    r = _profile(m, {"enc.rnn": prof})
    (e,) = m.events
    assert e.kind == "vanishing" and e.layer == "enc.rnn" and e.severity == logging.WARNING
    assert e.value == pytest.approx(0.8**99)
    assert "'enc.rnn'" in e.message and "LSTM" in e.message and "forget-gate" in e.message
    assert r.temporal["enc.rnn"].gain == pytest.approx(0.8)


def test_temporal_exploding_when_earliest_exceeds_1000x_last():
    m = monitor()
    _profile(m, {"rnn": 1.1 ** np.arange(100)[::-1]})  # earliest = 1.1**99 ~ 1.25e4 x last
    (e,) = m.events
    assert e.kind == "exploding" and e.layer == "rnn"
    assert e.value == pytest.approx(1.1**99)
    assert "clip" in e.message


def test_healthy_profile_raises_nothing():
    m = monitor()
    _profile(m, {"lstm": 0.99 ** np.arange(100)[::-1]})
    assert m.events == []


def test_temporal_thresholds_are_options():
    m = monitor(vanish_ratio=0.5)
    _profile(m, {"lstm": 0.99 ** np.arange(100)[::-1]})  # earliest/peak = 0.37 < 0.5
    assert [e.kind for e in m.events] == ["vanishing"]


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
    vanish = 0.5 ** np.arange(50)[::-1]
    for _ in range(25):
        feed(m, norms=np.array([1.0]), temporal={"rnn": vanish})
    steps = [e.step for e in m.events]
    assert steps == [1, 11, 21]
    assert [e.suppressed for e in m.events] == [0, 9, 9]
    assert "9 similar alerts suppressed since step 2" in m.events[1].message


def test_rate_limit_is_per_layer():
    m = monitor(alert_every=100)
    m.bind(["a.w"])
    vanish = 0.5 ** np.arange(50)[::-1]
    feed(m, norms=np.array([1.0]), temporal={"a": vanish, "b": vanish})
    assert sorted(e.layer for e in m.events) == ["a", "b"]
