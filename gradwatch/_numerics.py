"""Numpy maths of the core that is not a policy: unit norms, fits of propagation profiles.

(Policies live in :mod:`gradwatch.policies`, written once over an array-ops layer.)
"""

from __future__ import annotations


import numpy as np

from gradwatch.through_time import fit as _fit

__all__ = ["HORIZON_FRACTION", "propagation_horizon", "propagation_rate", "unitwise_norm"]

HORIZON_FRACTION = _fit.HORIZON_FRACTION


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


# The fits live in the through-time engine; these names stay for existing callers.
propagation_rate = _fit.rate
propagation_horizon = _fit.horizon
