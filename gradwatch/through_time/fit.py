"""Fits of a propagation profile (rate, horizon) and the aggregate over probed sequences.

Everything a backend measures per probed sequence comes here as logs of gains, one row per
sequence, and leaves as the two numbers of the contract (shared/API.md, "Through time"):

* ``max_gains[j]``: the largest singular value of ds_T/ds_{T-j}, the **max** over the
  probed sequences: Pascanu et al.'s bounds are on this quantity, and one sequence that
  carries a gradient far back is enough for the layer to be able to learn from it;
* ``gains[j]``: the RMS gain ||ds_T/ds_{T-j}||_F / sqrt(dim s), a typical direction, the
  **median** over the probed sequences (taken on logs; for an even count the geometric mean
  of the two middle ones), so one sequence whose state resets does not drag it to zero.

``rate`` and ``horizon`` are fitted on ``max_gains``: a vanishing alert then never carries
a rate above 1, and a ReLU RNN in which a few sequences reset while the others carry a
growing gradient is judged on the ones that carry it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["HORIZON_FRACTION", "aggregate", "aggregate_logs", "horizon", "rate"]

#: A state is "reached" while the gain back to it is at least this (``vanish_ratio``'s default).
HORIZON_FRACTION = 1e-3


def rate(gains: Sequence[float] | np.ndarray) -> float:
    """Per-step factor of a propagation profile: ``gains[j] ~ rate ** j``.

    Exp of the slope of the least-squares line, with intercept, through (j, log gains[j])
    over every j with a finite, positive gain (exact zeros are the underflow of a vanished
    gradient and carry no slope). Below 1: vanishing; above 1: exploding. 0 when the gain
    is exactly zero from the first step back on (a state that forgets everything at once:
    dead ReLUs, a closed gate); NaN with fewer than two usable steps otherwise.
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


def horizon(gains: Sequence[float] | np.ndarray, ratio: float = HORIZON_FRACTION) -> int:
    """Steps back until the gain first falls below ``ratio``: the smallest j with
    ``gains[j] < ratio``; ``len(gains)`` when it never does (the whole sequence is
    reached). NaN and +inf are never "below"."""
    arr = np.asarray(gains, dtype=np.float64).reshape(-1)
    below = np.flatnonzero(arr < ratio)  # NaN compares False
    return int(below[0]) if below.size else int(arr.size)


def aggregate_logs(log_rms: Any, log_top: Any, ops: Any) -> tuple[Any, Any]:
    """:func:`aggregate` in log space (for a backend that keeps logs: a vanished gain of
    1e-300 does not fit in float32): (log gains, log max_gains), each (T,)."""
    srt = ops.sort(log_rms, 1)
    p = log_rms.shape[1]
    if p is None:  # a graph traced for any batch size: the count is known only at run time
        return _median_sorted(srt, ops), ops.amax(log_top, 1)
    lo, hi = (int(p) - 1) // 2, int(p) // 2
    return 0.5 * (srt[:, lo] + srt[:, hi]), ops.amax(log_top, 1)


def _median_sorted(srt: Any, ops: Any) -> Any:
    """Median along axis 1 of rows sorted along it, when their length is not static: the
    mean of the entries whose index i has |2i - (p - 1)| <= 1 (the middle one, or the two
    middle ones), with only the protocol's elementwise ops and cumsum."""
    zero = ops.zeros_like(srt)
    index = ops.cumsum(zero + 1.0, 1) - 1.0
    last = ops.amax(index, 1)[:, None]
    off = 2.0 * index - last
    middle = (off <= 1.0) & (off >= -1.0)
    picked = ops.where(middle, srt, zero)
    return ops.cumsum(picked, 1)[:, -1] / ops.cumsum(ops.where(middle, zero + 1.0, zero), 1)[:, -1]


def aggregate(log_rms: Any, log_top: Any, ops: Any) -> tuple[Any, Any]:
    """(gains, max_gains) over j from per-sequence logs, both shaped (T, P).

    ``log_rms[j, p]`` = log of the RMS gain of sequence p, ``log_top[j, p]`` = log of its
    largest singular value; ``ops`` is a :class:`~gradwatch.through_time.ops.TensorOps`
    (numpy here, torch or keras.ops in the backends): the same rule on every backend.
    Returns float tensors (T,) of gains (median over sequences, on logs) and max_gains
    (max over sequences). NaN rows (a sequence whose state went non-finite) count in the
    max as NaN, so a non-finite product is never hidden.
    """
    med, top = aggregate_logs(log_rms, log_top, ops)
    return ops.exp(med), ops.exp(top)
