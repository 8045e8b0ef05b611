"""Detectors on synthetic norm sequences."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from gradwatch import ConfigError
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


# ----------------------------------------------------------------- jumps at any step
def test_a_1e8x_jump_at_step_3_is_exploding_during_the_warm_up():
    # pytorch/examples word_language_model (RNN_RELU, its own lr): the norms of its first steps.
    m = monitor()
    feed_global_norms(m, [0.188, 1.28, 8.31e16])
    (e,) = [e for e in m.events if e.kind == "exploding"]
    assert e.step == 3 and e.value == 8.31e16
    assert e.threshold == pytest.approx(1e4 * 1.28)  # jump_ratio x the largest previous norm
    assert "jump_ratio" in e.message and "1.28" in e.message and "at any step" in e.message


def test_jump_ratio_is_an_option_and_validated():
    m = monitor(jump_ratio=100.0, alert_every=0)
    feed_global_norms(m, [1.0, 2.0, 250.0, 2.0, 210.0])
    # 210 > 100 x 2: the 250 of the first jump stays out of the largest previous norm
    assert [e.step for e in m.events if e.kind == "exploding"] == [3, 5]
    for bad in (1.0, 0.5, math.inf, "big", True):
        with pytest.raises(ConfigError, match="jump_ratio"):
            monitor(jump_ratio=bad)


def test_no_jump_alarm_on_10000_lognormal_steps_or_a_30x_early_ramp():
    rng = np.random.default_rng(7)
    ramp = 0.05 * 30.0 ** (np.arange(20) / 19.0) * np.exp(rng.normal(0.0, 0.3, 20))  # x30 over 20 steps
    m = monitor(alert_every=0)
    feed_global_norms(m, np.concatenate([ramp, 1.5 * np.exp(rng.normal(0.0, 0.3, 10_000))]))
    assert [e for e in m.events if e.kind == "exploding"] == []


def test_a_jump_does_not_blind_the_detector_to_a_later_spike():
    norms = [1.0 + 0.01 * (i % 7) for i in range(200)]
    norms[2] = 1e9
    norms[150] = 100.0
    m = monitor(alert_every=0)
    feed_global_norms(m, norms)
    assert [e.step for e in m.events if e.kind == "exploding"] == [3, 151]


# ------------------------------------------------------- a changed parameter set
def _step(m, norms_by_param):
    return m.observe({k: np.array([v]) for k, v in norms_by_param.items()})


def test_unfreezing_a_large_backbone_is_not_a_spike_and_true_spikes_are_still_caught(caplog):
    rng = np.random.default_rng(3)
    m = monitor(alert_every=0)
    for _ in range(50):  # the head alone
        _step(m, {"head.w": float(np.exp(rng.normal(0.0, 0.1)))})
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        for i in range(60):  # a backbone with 100x the head's norm joins: the global norm is ~100x
            head, backbone = np.exp(rng.normal(0.0, 0.1, 2))
            _step(m, {"head.w": float(head), "backbone.w": float(100 * backbone)})
    assert [e for e in m.events if e.kind == "exploding"] == []
    notes = [r.getMessage() for r in caplog.records if "parameters with a gradient changed" in r.getMessage()]
    assert len(notes) == 1 and "step 51" in notes[0] and "(1 joined, 0 left)" in notes[0]
    r = _step(m, {"head.w": 50.0, "backbone.w": 50 * 100.0})  # a real 50x spike of the same set
    (e,) = [e for e in m.events if e.kind == "exploding"]
    assert e.step == r.step == 111


def test_a_jump_of_the_parameters_present_in_both_steps_is_caught_when_the_set_changes():
    m = monitor()
    _step(m, {"head.w": 1.0})
    _step(m, {"head.w": 1.1})
    _step(m, {"head.w": 1e9, "backbone.w": 1.0})
    (e,) = [e for e in m.events if e.kind == "exploding"]
    assert e.step == 3 and "present in both steps" in e.message


def test_spike_state_with_its_parameter_set_round_trips_through_json():
    import json

    m = monitor(alert_every=0)
    for i in range(30):
        _step(m, {"head.w": 1.0 + 0.01 * (i % 5)})
    state = json.loads(json.dumps(m.state_dict()))
    fresh = monitor(alert_every=0)
    fresh.load_state_dict(state)
    for mon in (m, fresh):
        _step(mon, {"head.w": 1.02, "backbone.w": 100.0})  # same change after the resume: re-based, no alert
        _step(mon, {"head.w": 1.02, "backbone.w": 1e9})  # a jump of the new set
    assert [(e.step, e.message) for e in fresh.events] == [(e.step, e.message) for e in m.events]
    assert [e.step for e in m.events if e.kind == "exploding"] == [32]


# ------------------------------------------------------------ markedly worse re-alerts
def _ev(step, value, way, kind="vanishing", layer="lm.rnn", threshold=35.0):
    from gradwatch import GradEvent

    return GradEvent(kind=kind, step=step, severity=logging.WARNING, message=f"{kind} at {step}.", layer=layer,
                     value=value, threshold=threshold, worse_when=way)


def test_a_horizon_that_halves_is_re_alerted_inside_the_rate_limit():
    from gradwatch.dispatch import RateLimiter

    lim = RateLimiter(100)
    # the tanh LM of issue 15: horizon 12, 11 (held), 4 (re-alerted), 3 (held: not half of 4), 1 (half, 3 shorter)
    out = [lim.admit(_ev(s, h, "lower")) for s, h in ((10, 12.0), (20, 11.0), (30, 4.0), (40, 3.0), (50, 1.0))]
    assert [e is not None for e in out] == [True, False, True, False, True]
    assert "Worse than at step 10: horizon 12 → 4." in out[2].message
    assert out[2].suppressed == 1 and "1 similar alert suppressed since step 20" in out[2].message
    assert "Worse than at step 30: horizon 4 → 1." in out[4].message


def test_a_horizon_must_also_drop_two_steps_and_events_without_a_direction_stay_limited():
    from gradwatch.dispatch import RateLimiter

    lim = RateLimiter(100)
    assert lim.admit(_ev(1, 3.0, "lower")) is not None
    assert lim.admit(_ev(2, 1.5, "lower")) is None  # half, but only 1.5 steps shorter
    assert lim.admit(_ev(3, 2.0, None, kind="exploding")) is not None  # another kind: its own limit
    assert lim.admit(_ev(4, 2e9, None, kind="exploding")) is None  # no direction: rate-limited as before


def test_an_exploding_value_10x_the_last_admitted_one_passes():
    from gradwatch.dispatch import RateLimiter

    lim = RateLimiter(100)
    kinds = dict(kind="exploding", layer=None)
    values = ((5, 20.0), (6, 150.0), (7, 199.0), (8, 200.0), (9, 1500.0))
    out = [lim.admit(_ev(s, v, "higher", **kinds)) for s, v in values]
    assert [e is not None for e in out] == [True, False, False, True, False]
    assert "Worse than at step 5: 20 → 200." in out[3].message and out[3].suppressed == 2


def test_a_spike_that_grows_10x_is_re_alerted_through_the_monitor():
    norms = [1.0 + 0.01 * (i % 7) for i in range(100)]
    norms[40], norms[60], norms[80] = 50.0, 100.0, 5000.0
    m = monitor(alert_every=100)
    feed_global_norms(m, norms)
    ex = [e for e in m.events if e.kind == "exploding"]
    assert [e.step for e in ex] == [41, 81] and "Worse than at step 41" in ex[1].message


def test_worse_state_survives_the_rate_limiters_state_dict():
    import json

    from gradwatch.dispatch import RateLimiter

    a = RateLimiter(100)
    a.admit(_ev(10, 12.0, "lower"))
    a.admit(_ev(20, 11.0, "lower"))
    b = RateLimiter(100)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for lim in (a, b):
        e = lim.admit(_ev(30, 4.0, "lower"))
        assert e is not None and e.suppressed == 1 and "horizon 12 → 4" in e.message
    old = RateLimiter(100)
    old.load_state_dict({"vanishing|lm.rnn": [10, 0, 0]})  # a state saved before the values were kept
    assert old.admit(_ev(20, 1.0, "lower")) is None


@pytest.mark.parametrize(
    "live, says",
    [
        (None, "(it is 0.2 now)"),  # no live fact: the one reported at attach
        (lambda layer, rec: 1 / 0, "(it is 0.2 now)"),  # a failing one: the same, and the alert still goes out
        (lambda layer, rec: 1.5 if (layer, rec) == ("rnn", "l0") else None, "the forget-gate bias is already 1.5"),
    ],
    ids=["attach-time", "failing", "live"],
)
def test_the_lstm_remedy_reads_the_forget_bias_live_when_the_backend_offers_it(live, says):
    m = monitor()
    m.meta["forget_bias"] = {"rnn": 0.2}
    if live is not None:
        m.live["forget_bias"] = live
    _profile(m, {"rnn": 0.8 ** np.arange(100)}, kinds={"rnn": "lstm"})
    (e,) = m.events
    assert e.kind == "vanishing" and says in e.message, e.message
