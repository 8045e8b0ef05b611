"""Numpy maths of the core that is not a policy: unit norms, fits of propagation profiles.

(Policies live in :mod:`gradwatch.policies`, written once over an array-ops layer.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["HORIZON_FRACTION", "propagation_horizon", "propagation_rate", "unitwise_norm"]

#: A state is "reached" while the gain back to it is at least this (``vanish_ratio``'s default).
HORIZON_FRACTION = 1e-3


def unitwise_norm(x: np.ndarray, unit_axis: int = 0) -> np.ndarray:
    """L2 norm of each unit (output neuron) of a parameter, broadcastable against ``x``.

    A unit is one slice along ``unit_axis``: rows of a PyTorch ``(out, in)`` weight or a
    conv ``(out, in, kh, kw)`` kernel (``unit_axis=0``), columns of a Keras ``(in, out)``
    kernel (``unit_axis=-1``). Vectors and scalars (biases, gains) are one unit. This is
    the norm of Brock et al. (2021), section 4.1.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim <= 1:
        return np.full_like(x, np.sqrt(np.sum(x * x)))
    axis = unit_axis % x.ndim
    reduce_axes = tuple(a for a in range(x.ndim) if a != axis)
    return np.sqrt(np.sum(x * x, axis=reduce_axes, keepdims=True))


def propagation_rate(gains: Sequence[float] | np.ndarray) -> float:
    """Per-step factor of a propagation profile: ``gains[j] ~ rate ** j``.

    Least-squares fit of log(gains[j]) = a + j log(rate) over the steps whose gain is
    finite and positive (exact zeros are float underflow of a vanished gradient and carry
    no slope). Below 1: vanishing; above 1: exploding. 0 when the gain is exactly zero
    from the first step back on (a state that forgets everything at once: dead ReLUs,
    a closed gate); NaN with fewer than two usable steps otherwise.
    """
    arr = np.asarray(gains, dtype=np.float64).reshape(-1)
    j = np.arange(arr.size, dtype=np.float64)
    ok = np.isfinite(arr) & (arr > 0)
    if int(ok.sum()) < 2:
        if arr.size >= 2 and ok[0] and arr[1] == 0.0:
            return 0.0
        return math.nan
    j = j[ok]
    y = np.log(arr[ok])
    jc = j - j.mean()
    denom = float(np.dot(jc, jc))
    if denom == 0.0:
        return math.nan
    slope = float(np.dot(jc, y - y.mean())) / denom
    return float(math.exp(slope)) if slope < 700 else math.inf


def propagation_horizon(gains: Sequence[float] | np.ndarray, ratio: float = HORIZON_FRACTION) -> int:
    """Steps back until the gain first falls below ``ratio``: the smallest j with
    ``gains[j] < ratio``; ``len(gains)`` when it never does (the whole sequence is
    reached). NaN and +inf are never "below"."""
    arr = np.asarray(gains, dtype=np.float64).reshape(-1)
    below = np.flatnonzero(arr < ratio)  # NaN compares False
    return int(below[0]) if below.size else int(arr.size)
