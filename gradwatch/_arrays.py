"""The numpy front end: gradients given as arrays in, statistics out, decisions applied.

What :meth:`Monitor.observe` and :meth:`Monitor.clip_gradients` do for a framework that
has no backend (JAX, plain numpy): reduce each gradient to its squared norm in float64,
flag non-finite ones, and for a unit-wise policy clip each unit with the policy's own
``unit_factor`` run on numpy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from gradwatch import _numerics
from gradwatch._layout import StepStats
from gradwatch.arrayops import NUMPY
from gradwatch.errors import ConfigError
from gradwatch.records import StepRecord

__all__ = ["apply_decision", "stats_from_arrays"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _unit_params(policy: Any, params: Mapping[str, Any] | None, names: Sequence[str]) -> Mapping[str, Any]:
    if params is None or set(params) != set(names):
        raise ConfigError(
            f"policy {policy!r} clips unit by unit against the weights: pass params= with the same keys as the "
            f"gradients.",
            option="policy",
            value=policy,
        )
    return params


def _unitwise(policy: Any, param: Any, grad: Any, unit_axis: int) -> np.ndarray:
    g = np.asarray(grad, dtype=np.float64)
    with np.errstate(all="ignore"):
        factor = policy.unit_factor(_numerics.unitwise_norm(np.asarray(param), unit_axis), _numerics.unitwise_norm(g, unit_axis), NUMPY)
    return g * factor  # type: ignore[no-any-return]


def stats_from_arrays(
    grads: Mapping[str, Any],
    params: Mapping[str, Any] | None,
    policy: Any,
    unit_axis: int,
    temporal: Mapping[str, Any] | None = None,
    propagation: Mapping[str, Any] | None = None,
    spectral: Mapping[str, float] | None = None,
    max_gains: Mapping[str, Any] | None = None,
) -> StepStats:
    """One step's :class:`StepStats` from gradients as arrays (anything ``np.asarray`` takes)."""
    names = tuple(grads)
    arrays = [np.asarray(g) for g in grads.values()]
    sq = np.fromiter((np.sum(np.square(a, dtype=np.float64)) for a in arrays), dtype=np.float64, count=len(arrays))
    nonfinite = None
    if not np.isfinite(sq).all():  # a finite gradient can still overflow its square: look at the values
        nonfinite = np.fromiter((not np.isfinite(a).all() for a in arrays), dtype=bool, count=len(arrays))
    clipped = None
    if getattr(policy, "unitwise", False):
        ps = _unit_params(policy, params, names)
        clipped = np.fromiter(
            (np.sum(np.square(_unitwise(policy, ps[k], g, unit_axis))) for k, g in zip(names, arrays)), dtype=np.float64, count=len(arrays)
        )
    return StepStats(
        sq, nonfinite, temporal or _EMPTY, propagation=propagation or _EMPTY, max_gains=max_gains or _EMPTY,
        spectral=spectral or _EMPTY, clipped_sq_norms=clipped,
    )


def apply_decision(grads: Mapping[str, Any], record: StepRecord, policy: Any, params: Mapping[str, Any] | None, unit_axis: int) -> dict[str, np.ndarray]:
    """The gradients after ``record``'s decision: unchanged without a clip, scaled by
    ``record.clip.scale``, or clipped unit by unit for a unit-wise policy."""
    if record.clip is None:
        return {k: np.asarray(g) for k, g in grads.items()}
    if getattr(policy, "unitwise", False):
        ps = _unit_params(policy, params, tuple(grads))
        return {k: _unitwise(policy, ps[k], g, unit_axis) for k, g in grads.items()}
    if record.clip.scale >= 1.0:
        return {k: np.asarray(g) for k, g in grads.items()}
    s = record.clip.scale
    return {k: np.asarray(g) * s for k, g in grads.items()}
