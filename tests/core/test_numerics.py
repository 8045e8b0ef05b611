"""The core's maths of propagation profiles."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradwatch import Propagation, TemporalProfile
from gradwatch._numerics import propagation_horizon, propagation_rate


@pytest.mark.parametrize("g", [0.5, 0.9, 1.0, 1.1, 2.0])
def test_rate_of_a_geometric_propagation_is_its_ratio(g):
    assert propagation_rate(g ** np.arange(60)) == pytest.approx(g, rel=1e-9)


def test_rate_ignores_underflowed_zeros():
    gains = 0.5 ** np.arange(30)
    gains[20:] = 0.0
    assert propagation_rate(gains) == pytest.approx(0.5)


def test_rate_is_zero_when_nothing_gets_past_the_first_step():
    # A ReLU RNN whose units are all dead: ds_T/ds_{T-1} is exactly 0.
    assert propagation_rate([1.0, 0.0, 0.0]) == 0.0


def test_rate_is_nan_without_two_usable_points():
    assert math.isnan(propagation_rate([]))
    assert math.isnan(propagation_rate([1.0]))
    assert math.isnan(propagation_rate([1.0, math.nan, math.nan]))


def test_horizon_is_the_first_step_back_below_the_ratio():
    gains = np.ones(100)
    gains[40:] = 1e-4
    assert propagation_horizon(gains, 1e-3) == 40
    assert propagation_horizon([1.0, np.nan, np.inf, 1e-5], 1e-3) == 3


def test_horizon_is_the_length_when_never_below():
    assert propagation_horizon(np.linspace(1, 2, 50)) == 50


def test_profile_takes_the_most_extreme_recurrence_and_keeps_sensitivity():
    p = TemporalProfile.build([1e-6, 1.0, 2.0], {"l0": 0.99 ** np.arange(3), "l0_reverse": 3.0 ** np.arange(3)})
    assert p.earliest_over_peak == pytest.approx(5e-7)
    assert p.gain == pytest.approx(3.0) and p.propagation == (1.0, 3.0, 9.0) and p.length == 3
    assert set(p.recurrences) == {"l0", "l0_reverse"}
    assert isinstance(p.recurrences["l0"], Propagation) and p.recurrences["l0"].horizon == 3
    empty = TemporalProfile.build([1.0, 2.0])
    assert math.isnan(empty.gain) and empty.horizon is None and empty.propagation == () and empty.length == 2
