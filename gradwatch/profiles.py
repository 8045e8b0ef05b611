"""Through-time records: what gradwatch measured along the time axis of a recurrent layer.

:class:`TemporalProfile` (per layer: input-gradient sensitivity and the propagation of
each recurrence) and :class:`Propagation` (per recurrence: gains, rate, horizon), with
their plain-dict codecs. Frozen values of plain Python numbers, like every record;
importable from :mod:`gradwatch.records` and from ``gradwatch`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from gradwatch.through_time import fit as _fit

__all__ = ["Propagation", "TemporalProfile", "extreme"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _empty() -> Mapping[str, Any]:
    return _EMPTY


@dataclass(frozen=True, slots=True)
class Propagation:
    """How one recurrence of a layer carries a gradient back through its own state.

    Index j = steps back from the last processed step, j = 0 .. T-1, on this step's forward
    trajectory, in processing order (for a reversed direction j counts back along the
    reversed sequence); s is h (RNN, GRU), (h, c) (LSTM, h projected with ``proj_size``),
    or the whole state of a diagonal recurrence (minGRU, Mamba); padded / masked steps are
    the identity. Over the probed sequences (the first ``min(batch, 8)``; under DDP,
    every rank's):

    * ``max_gains[j]``: the largest singular value ||ds_T/ds_{T-j}||_2, the **max** over
      the sequences (the quantity of Pascanu et al.'s bounds);
    * ``gains[j]``: the RMS gain ||ds_T/ds_{T-j}||_F / sqrt(dim s) (a typical direction),
      the **median** over the sequences;
    * ``rate``: exp of the slope of the least-squares line through (j, log max_gains[j])
      (< 1 vanishing, > 1 exploding); ``horizon``: steps back until ``max_gains`` falls
      below ``vanish_ratio`` (T if it never does).

    ``max_gains[0] == gains[0] == 1``. Exact when dim s <= 16 and for diagonal recurrences;
    above, estimated (the backend's docstring states how, and its measured error). Run
    files written before max gains existed read back with ``max_gains == ()``; their rate
    and horizon were fitted on ``gains``.
    """

    gains: tuple[float, ...]
    rate: float
    horizon: int
    max_gains: tuple[float, ...] = ()

    @classmethod
    def from_gains(
        cls,
        gains: Sequence[float] | np.ndarray,
        vanish_ratio: float = _fit.HORIZON_FRACTION,
        max_gains: Sequence[float] | np.ndarray | None = None,
    ) -> Propagation:
        """Fit ``rate`` and ``horizon`` with the core's maths: on ``max_gains`` when given
        (the contract), else on ``gains``."""
        arr = tuple(np.asarray(gains, dtype=np.float64).reshape(-1).tolist())
        top = () if max_gains is None else tuple(np.asarray(max_gains, dtype=np.float64).reshape(-1).tolist())
        basis = top if top else arr
        return cls(arr, _fit.rate(basis), _fit.horizon(basis, vanish_ratio), top)

    @property
    def length(self) -> int:
        return len(self.gains)

    @property
    def peak(self) -> float:
        """The largest gain over any number of steps back (of ``max_gains`` when measured;
        NaN ignored)."""
        basis = self.max_gains or self.gains
        finite = [g for g in basis if not math.isnan(g)]
        return max(finite) if finite else math.nan

    @property
    def peak_step(self) -> int:
        """The j at which :attr:`peak` is reached."""
        basis = self.max_gains or self.gains
        return max(range(len(basis)), key=lambda i: -math.inf if math.isnan(basis[i]) else basis[i]) if basis else 0


def extreme(recurrences: Mapping[str, Propagation]) -> tuple[str, Propagation] | None:
    """The recurrence whose rate is farthest from 1 in log (NaN rates count least)."""
    best: tuple[str, Propagation] | None = None
    best_d = -1.0
    for name, p in recurrences.items():
        r = p.rate
        d = abs(math.log(r)) if math.isfinite(r) and r > 0 else (math.inf if r in (0.0, math.inf) else -0.5)
        if best is None or d > best_d:
            best, best_d = (name, p), d
    return best


@dataclass(frozen=True, slots=True)
class TemporalProfile:
    """What gradwatch measured along the time axis of one recurrent layer.

    Two different questions, both answered:

    * *Sensitivity*, ``norms[t]``: the L2 norm of dL/dx_t over batch and features, x being
      the layer's input sequence, for each timestep t in forward order. It says which
      timesteps the loss draws its gradient from; a trained model that uses only x_1 has
      its largest norm at t=1, and that is healthy.
    * *Propagation*, ``recurrences``: one :class:`Propagation` per (layer, direction),
      keyed ``"l0"``, ``"l1"``, ``"l0_reverse"``, ...: how the recurrence itself carries
      a gradient back through its state. Vanishing and exploding gradients (Pascanu et al.
      2013) are properties of this Jacobian product, and gradwatch alerts on it only.

    ``propagation``, ``gain`` (the fitted per-step rate) and ``horizon`` are those of the
    most extreme recurrence (the one whose rate is farthest from 1 in log). A profile without
    a propagation measurement has ``recurrences == {}``, ``propagation == ()``, ``gain``
    NaN and ``horizon is None`` (never 0: 0 would read as "the gradient dies at once").
    Clearer names beside them: :attr:`sensitivity` (= ``norms``), :attr:`rate` (= ``gain``),
    :attr:`gains` (= ``propagation``), :attr:`max_gains`.
    """

    norms: tuple[float, ...]
    gain: float
    horizon: int | None
    #: Gains of the most extreme recurrence (see :class:`Propagation`); () when not measured.
    propagation: tuple[float, ...] = ()
    #: One :class:`Propagation` per (layer, direction): "l0", "l1", "l0_reverse", ...
    recurrences: Mapping[str, Propagation] = field(default_factory=_empty)

    @classmethod
    def build(
        cls,
        norms: Sequence[float] | np.ndarray = (),
        recurrences: Mapping[str, Any] | None = None,
        vanish_ratio: float = _fit.HORIZON_FRACTION,
        max_gains: Mapping[str, Any] | None = None,
    ) -> TemporalProfile:
        """A profile from input-gradient norms and per-recurrence gains (arrays or
        :class:`Propagation`\\ s; ``max_gains`` the largest singular values per recurrence,
        on which rate and horizon are fitted); either may be empty."""
        tops = max_gains or {}
        recs = {
            k: v if isinstance(v, Propagation) else Propagation.from_gains(v, vanish_ratio, tops.get(k))
            for k, v in (recurrences or {}).items()
        }
        worst = extreme(recs)
        p = worst[1] if worst is not None else None
        return cls(
            norms=tuple(float(v) for v in np.asarray(norms, dtype=np.float64).reshape(-1)),
            gain=p.rate if p is not None else math.nan,
            horizon=p.horizon if p is not None else None,
            propagation=p.gains if p is not None else (),
            recurrences=MappingProxyType(recs),
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_profile_from_dict, (_profile_dict(self),))

    @property
    def sensitivity(self) -> tuple[float, ...]:
        """``norms``: ||dL/dx_t|| per timestep, forward order."""
        return self.norms

    @property
    def rate(self) -> float:
        """``gain``: the per-step factor of the most extreme recurrence (NaN: not measured)."""
        return self.gain

    @property
    def gains(self) -> tuple[float, ...]:
        """``propagation``: RMS gains of the most extreme recurrence (() : not measured)."""
        return self.propagation

    @property
    def max_gains(self) -> tuple[float, ...]:
        """Largest-singular-value gains of the most extreme recurrence (() : not measured)."""
        worst = extreme(self.recurrences)
        return worst[1].max_gains if worst is not None else ()

    @property
    def measured(self) -> bool:
        """Whether this profile carries a propagation measurement."""
        return bool(self.recurrences)

    @property
    def length(self) -> int:
        """Timesteps of the profile (of the propagation when measured, else of ``norms``)."""
        return len(self.propagation) if self.propagation else len(self.norms)

    @property
    def earliest_over_peak(self) -> float:
        """Sensitivity: norms[0] / max(norms), the share of the peak input gradient that
        x_1 gets (small is healthy when the loss does not need x_1)."""
        peak = max(self.norms) if self.norms else 0.0
        return self.norms[0] / peak if peak > 0 else math.nan


def _propagation_dict(r: Propagation) -> dict[str, Any]:
    out: dict[str, Any] = {"gains": list(r.gains), "rate": r.rate, "horizon": r.horizon}
    if r.max_gains:
        out["max_gains"] = list(r.max_gains)
    return out


def _profile_dict(p: TemporalProfile) -> dict[str, Any]:
    out: dict[str, Any] = {"norms": list(p.norms), "gain": p.gain, "horizon": p.horizon}
    if p.propagation:
        out["propagation"] = list(p.propagation)
    if p.recurrences:
        out["recurrences"] = {k: _propagation_dict(r) for k, r in p.recurrences.items()}
    return out


def _profile_from_dict(p: Mapping[str, Any]) -> TemporalProfile:
    recs = p.get("recurrences") or {}
    hor = p.get("horizon")
    return TemporalProfile(
        norms=tuple(float(x) for x in p["norms"]),
        gain=float(p["gain"]),
        # Files written before "not measured" was None said 0 for a profile without recurrences.
        horizon=None if hor is None or not recs else int(hor),
        propagation=tuple(float(x) for x in p.get("propagation") or ()),
        recurrences=MappingProxyType(
            {
                str(k): Propagation(
                    tuple(float(x) for x in r["gains"]),
                    float(r["rate"]),
                    int(r["horizon"]),
                    tuple(float(x) for x in r.get("max_gains") or ()),
                )
                for k, r in recs.items()
            }
        ),
    )
