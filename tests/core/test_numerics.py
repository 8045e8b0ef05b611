"""The reference maths of temporal profiles."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradwatch import TemporalProfile
from gradwatch._numerics import temporal_gain, temporal_horizon


@pytest.mark.parametrize("g", [0.5, 0.9, 1.0, 1.1, 2.0])
def test_gain_of_a_geometric_profile_is_its_ratio(g):
    norms = g ** np.arange(60)[::-1]  # norm at t is g**(T-1-t): factor g per step back
    assert temporal_gain(norms) == pytest.approx(g, rel=1e-9)


def test_gain_ignores_underflowed_zeros():
    norms = 0.5 ** np.arange(30)[::-1]
    norms[:10] = 0.0
    assert temporal_gain(norms) == pytest.approx(0.5)


def test_gain_is_nan_without_two_usable_points():
    assert math.isnan(temporal_gain([0.0, 0.0, 1.0]))
    assert math.isnan(temporal_gain([]))


def test_horizon_counts_steps_back_from_the_peak_to_below_a_thousandth():
    norms = np.ones(100)
    norms[:40] = 1e-4
    norms[99] = 2.0
    # the peak is at t=99; going back, t=39 is the first below 2e-3 (1/1000 of it): 60 steps
    assert temporal_horizon(norms) == 60


def test_horizon_is_the_length_when_never_below():
    assert temporal_horizon(np.linspace(1, 2, 50)) == 50


def test_profile_ratios():
    p = TemporalProfile.from_norms([1e-6, 1.0, 2.0])
    assert p.earliest_over_peak == pytest.approx(5e-7)
    assert p.earliest_over_last == pytest.approx(5e-7)
    assert p.length == 3 and p.horizon == 2
