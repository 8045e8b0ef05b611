"""The host's spectral norms (Keras on JAX and torch) against numpy's SVD, at every call,
while the blocks move."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradwatch.through_time.spectral import EXACT_BELOW, HostSpectral


@pytest.mark.parametrize("size", [EXACT_BELOW // 2, 96, 256])
def test_within_tolerance_of_svd_as_weights_move(size):
    rng = np.random.default_rng(size)
    w = rng.standard_normal((size, size)) / math.sqrt(size)
    track = HostSpectral()
    for change in (0.0, 0.01, 0.1, 0.5, 0.0, 1.0):
        w = w + change * rng.standard_normal(w.shape) / math.sqrt(size)
        got = track("k[f]", w.astype(np.float32))
        exact = np.linalg.norm(w.astype(np.float32).astype(np.float64), 2)
        assert got == pytest.approx(exact, rel=2e-3)
        assert got <= exact * (1 + 1e-9)  # a Ritz value never exceeds sigma_max
    if size > EXACT_BELOW:
        assert track.last_iterations >= 4  # Lanczos, not the SVD


def test_a_new_top_direction_is_found():
    """The previous top singular vector becomes the runner-up: the warm start alone would
    stall near the old value; the random part finds the new top one."""
    rng = np.random.default_rng(0)
    n = 128
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.linspace(1.0, 0.1, n)
    track = HostSpectral()
    assert track("w", (u * s) @ v.T) == pytest.approx(1.0, rel=2e-3)
    s2 = s.copy()
    s2[0], s2[1] = 0.9, 1.3  # the old top direction falls behind a new one
    assert track("w", (u * s2) @ v.T) == pytest.approx(1.3, rel=2e-3)


def test_blocks_tracked_apart_and_non_finite_is_nan():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((100, 100)), 3 * rng.standard_normal((100, 100))
    track = HostSpectral()
    for _ in range(2):
        assert track("a", a) == pytest.approx(np.linalg.norm(a, 2), rel=2e-3)
        assert track("b", b) == pytest.approx(np.linalg.norm(b, 2), rel=2e-3)
    bad = a.copy()
    bad[3, 4] = np.nan
    assert math.isnan(track("a", bad))
    with pytest.raises(ValueError, match="'c'"):
        track("c", np.zeros(3))
