"""Policies: replayed norm sequences, properties, exact resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradwatch import ConfigError
from gradwatch._numerics import unitwise_norm
from gradwatch.policies import AGC, AutoClip, FixedNorm, ZClip
from tests.reference import agc_clip

norms_st = st.lists(st.floats(min_value=1e-6, max_value=1e6, allow_nan=False), min_size=1, max_size=120)


def make(name: str):
    return {
        "fixed": lambda: FixedNorm(1.0),
        "autoclip": lambda: AutoClip(10.0),
        "autoclip_window": lambda: AutoClip(25.0, history=7),
        "zclip": lambda: ZClip(warmup=5),
        "zclip_capped": lambda: ZClip(warmup=3, max_norm=50.0),
    }[name]()


POLICIES = ["fixed", "autoclip", "autoclip_window", "zclip", "zclip_capped"]


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=60, deadline=None)
@given(norms=norms_st)
def test_scale_in_unit_interval_and_clipping_never_raises_a_norm(name, norms):
    pol = make(name)
    for n in norms:
        d = pol.decide(n)
        assert 0.0 < d.scale <= 1.0
        assert n * d.scale <= n
        if d.scale < 1.0:
            # clipped norms land on the threshold, short of it only by clip_grad_norm_'s +1e-6
            assert n > d.threshold
            assert n * d.scale <= d.threshold * (1 + 1e-12)
            assert n * d.scale >= d.threshold * n / (n + 1e-6) * (1 - 1e-12)


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=40, deadline=None)
@given(norms=norms_st, cut=st.integers(min_value=0, max_value=120))
def test_state_round_trips_through_json_and_resume_matches(name, norms, cut):
    cut = min(cut, len(norms))
    straight = make(name)
    expected = [straight.decide(n) for n in norms]
    first = make(name)
    got = [first.decide(n) for n in norms[:cut]]
    state = json.loads(json.dumps(first.state_dict()))
    assert state == first.state_dict()
    resumed = make(name)
    resumed.load_state_dict(state)
    got += [resumed.decide(n) for n in norms[cut:]]
    assert got == expected  # exact, not approximate


def test_fixed_matches_clip_grad_norm_formula():
    pol = FixedNorm(2.0)
    assert pol.decide(1.0).scale == 1.0
    d = pol.decide(8.0)
    assert d.scale == 2.0 / (8.0 + 1e-6)  # clip_grad_norm_'s clip_coef
    assert d.threshold == 2.0 and d.policy == "fixed"


@settings(max_examples=50, deadline=None)
@given(norms=norms_st, p=st.floats(min_value=0.5, max_value=100.0))
def test_autoclip_threshold_is_numpy_percentile_of_history(norms, p):
    pol = AutoClip(percentile=p)
    for i, n in enumerate(norms):
        d = pol.decide(n)
        assert d.threshold == pytest.approx(float(np.percentile(norms[: i + 1], p)), rel=1e-12, abs=1e-300)


def test_autoclip_window_forgets_old_norms():
    pol = AutoClip(percentile=50.0, history=3)
    for n in [100.0, 100.0, 100.0, 1.0, 1.0, 1.0]:
        d = pol.decide(n)
    assert d.threshold == 1.0


def test_autoclip_ignores_nonfinite_norms():
    pol = AutoClip(50.0)
    pol.decide(1.0)
    d = pol.decide(math.nan)
    assert d.scale == 1.0
    assert pol.state_dict()["state"]["norms"] == [1.0]


def zclip_reference(norms, alpha, z_thr, warmup):
    """ZClip written out directly from the paper's update rules, as a second implementation."""
    out = []
    buf = []
    mean = var = None
    for g in norms:
        if mean is None:
            buf.append(g)
            if len(buf) == warmup:
                mean = sum(buf) / len(buf)
                var = sum((x - mean) ** 2 for x in buf) / len(buf)
            out.append(1.0)
            continue
        std = var**0.5
        z = (g - mean) / (std + 1e-6)
        if z > z_thr:
            thr = mean + (z_thr * std) / (z / z_thr)
        else:
            thr = mean + z_thr * std
        clipped = min(g, thr)
        out.append(1.0 if g <= thr else thr / (g + 1e-6))
        mean = alpha * mean + (1 - alpha) * clipped
        var = alpha * var + (1 - alpha) * (clipped - mean) ** 2
    return out


def test_zclip_matches_reference_on_a_spiky_sequence():
    rng = np.random.default_rng(1)
    norms = list(np.exp(rng.normal(0, 0.2, 300)))
    for i in (60, 61, 200):
        norms[i] *= 40
    pol = ZClip(alpha=0.97, z_threshold=2.5, warmup=25)
    got = [pol.decide(float(n)).scale for n in norms]
    ref = zclip_reference([float(n) for n in norms], 0.97, 2.5, 25)
    np.testing.assert_allclose(got, ref, rtol=1e-9)
    assert got[60] < 0.1 and got[200] < 0.1  # the spikes are pulled back hard


def test_zclip_skips_warmup_steps():
    pol = ZClip(warmup=10)
    assert all(pol.decide(x).scale == 1.0 for x in [1.0, 1e6, 1.0, 2.0, 3.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_zclip_max_norm_caps_every_step():
    pol = ZClip(warmup=2, max_norm=0.5)
    for n in [1.0, 1.0, 1.0, 1.0]:
        d = pol.decide(n)
        assert d.threshold <= 0.5 and d.scale == pytest.approx(0.5, rel=1e-5)


def test_agc_reference_matches_hand_computation():
    w = np.array([[3.0, 4.0], [0.0, 0.0]])  # unit norms 5 and 0 (-> eps)
    g = np.array([[0.3, 0.4], [1.0, 0.0]])  # unit grad norms 0.5 and 1
    out = agc_clip(w, g, clip_factor=0.01, eps=1e-3, unit_axis=0)
    # unit 0: 0.5 > 0.01*5 -> scaled to norm 0.05; unit 1: 1 > 0.01*1e-3 -> norm 1e-5
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), [0.05, 1e-5], rtol=1e-4)
    np.testing.assert_allclose(out[0] / np.linalg.norm(out[0]), g[0] / np.linalg.norm(g[0]))


def test_agc_leaves_small_gradients_alone_and_handles_keras_layout():
    w = np.ones((3, 2))  # keras (in, out): units are columns
    g = np.full((3, 2), 1e-4)
    np.testing.assert_array_equal(agc_clip(w, g, 0.01, 1e-3, unit_axis=-1), g)
    assert unitwise_norm(w, -1).shape == (1, 2)
    np.testing.assert_allclose(unitwise_norm(np.array([3.0, 4.0])), [5.0, 5.0])


@pytest.mark.parametrize(
    "make_bad, option",
    [
        (lambda: FixedNorm(0.0), "max_norm"),
        (lambda: AutoClip(percentile=0), "percentile"),
        (lambda: AutoClip(history=0), "history"),
        (lambda: ZClip(alpha=1.5), "alpha"),
        (lambda: ZClip(z_threshold=-1.0), "z_threshold"),
        (lambda: ZClip(warmup=0), "warmup"),
        (lambda: AGC(clip_factor=-0.1), "clip_factor"),
    ],
)
def test_policy_constructors_reject_bad_values_naming_them(make_bad, option):
    with pytest.raises(ConfigError) as err:
        make_bad()
    assert err.value.option == option
    assert option in str(err.value) and "received" in str(err.value)


def test_load_state_of_another_policy_is_refused():
    with pytest.raises(ConfigError, match="zclip"):
        FixedNorm().load_state_dict(ZClip().state_dict())
