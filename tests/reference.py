"""Independent numpy references the tests check gradwatch against (not gradwatch code)."""

from __future__ import annotations

import numpy as np


def unit_norms(x: np.ndarray, unit_axis: int = 0) -> np.ndarray:
    """L2 norm of each unit (slice along ``unit_axis``), broadcastable against ``x``;
    a vector or scalar is one unit."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim <= 1:
        return np.full_like(x, np.sqrt(np.sum(x * x)))
    axis = unit_axis % x.ndim
    others = tuple(a for a in range(x.ndim) if a != axis)
    return np.sqrt(np.sum(x * x, axis=others, keepdims=True))


def agc_clip(param: np.ndarray, grad: np.ndarray, clip_factor: float = 0.01, eps: float = 1e-3, unit_axis: int = 0) -> np.ndarray:
    """Brock et al. (2021), eq. 3, written out: each unit's gradient is limited to
    clip_factor * max(||W_unit||, eps)."""
    g = np.asarray(grad, dtype=np.float64)
    limit = clip_factor * np.maximum(unit_norms(param, unit_axis), eps)
    gn = unit_norms(g, unit_axis)
    factor = np.ones_like(gn)
    big = gn > limit
    factor[big] = limit[big] / gn[big]
    return g * factor
