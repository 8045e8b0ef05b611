"""Numpy maths of the core that is not a policy: unit norms, fits of temporal profiles.

(Policies live in :mod:`gradwatch.policies`, written once over an array-ops layer.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["HORIZON_FRACTION", "temporal_gain", "temporal_horizon", "unitwise_norm"]

#: A timestep is "reached" while its gradient norm is at least this fraction of the peak.
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


def temporal_gain(norms: Sequence[float] | np.ndarray) -> float:
    """Per-timestep growth factor of a gradient going back in time.

    Least-squares fit of log(norm_t) = a + b*t over the timesteps whose norm is finite and
    positive (exact zeros are float underflow of a vanished gradient and carry no slope);
    the gain is exp(-b), the factor one step further back multiplies the norm by. A gain
    below 1 means the gradient fades as it travels back (vanishing), above 1 that it grows
    (exploding). NaN when fewer than two timesteps are usable.
    """
    arr = np.asarray(norms, dtype=np.float64).reshape(-1)
    t = np.arange(arr.size, dtype=np.float64)
    ok = np.isfinite(arr) & (arr > 0)
    if int(ok.sum()) < 2:
        return math.nan
    t = t[ok]
    y = np.log(arr[ok])
    tc = t - t.mean()
    denom = float(np.dot(tc, tc))
    if denom == 0.0:
        return math.nan
    slope = float(np.dot(tc, y - y.mean())) / denom
    return float(math.exp(-slope)) if -slope < 700 else math.inf


def temporal_horizon(norms: Sequence[float] | np.ndarray, fraction: float = HORIZON_FRACTION) -> int:
    """Timesteps back from the peak until the norm first falls below ``fraction`` x peak.

    The sequence length when it never does (the whole sequence is reached). 0 for an
    empty or all-zero / non-finite profile.
    """
    arr = np.asarray(norms, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        return 0
    finite = np.where(np.isfinite(arr), arr, -np.inf)
    peak_i = int(np.argmax(finite))
    peak = finite[peak_i]
    if not peak > 0:
        return 0
    below = np.nonzero(finite[:peak_i] < fraction * peak)[0]
    if below.size == 0:
        return int(arr.size)
    return int(peak_i - below[-1])
